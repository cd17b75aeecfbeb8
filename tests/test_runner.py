"""labelenc.runner: a training run's files, and evaluation of its weights reproducing the end-of-training numbers."""

from __future__ import annotations

import json

import pytest
import yaml

from labelenc.config import load_config
from labelenc.runner import FINAL_WEIGHTS, SUMMARY, evaluate, train


@pytest.mark.parametrize("family", ["fcos", "mask_rcnn"])
def test_eval_of_final_weights_reproduces_training_metrics(family: str, tiny_config) -> None:
    """`labelenc eval` on model_final.pth (and on the last checkpoint) gives exactly the numbers training printed."""
    cfg = tiny_config(family, train={"base_iters": 3, "checkpoint_period": 3})
    result = train(cfg)
    assert set(result.metrics) == ({"bbox", "segm"} if family == "mask_rcnn" else {"bbox"})
    assert evaluate(cfg, result.weights) == result.metrics
    assert evaluate(cfg, result.output_dir / "checkpoint_0000003.pth") == result.metrics
    saved = json.loads((result.output_dir / "model_final_eval.json").read_text())
    assert saved == result.metrics


def test_run_directory_records_config_and_summary(tiny_config) -> None:
    """Every run writes its resolved config (reloadable, equal) and a summary beside its outputs."""
    cfg = tiny_config(train={"base_iters": 2})
    result = train(cfg)
    assert load_config(result.output_dir / "config.yaml") == cfg
    summary = json.loads((result.output_dir / SUMMARY).read_text())
    assert summary["stage"] == "baseline" and summary["iterations"] == 2
    assert summary["metrics"] == result.metrics
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert {"loss", "lr", "classification", "bbox_regression"} <= set(records[0])
    assert (result.output_dir / FINAL_WEIGHTS).is_file()
    assert yaml.safe_load((result.output_dir / "config.yaml").read_text())["output_dir"] == cfg.output_dir
