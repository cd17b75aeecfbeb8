"""labelenc.runner: a training run's files, and evaluation of its weights reproducing the end-of-training numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from labelenc.config import load_config
from labelenc.engine.checkpoint import load_file
from labelenc.errors import UserError
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


def test_init_weights_loads_the_detector_and_starts_at_iteration_zero(tiny_config, tmp_path) -> None:
    """``init_weights`` (detectron2's "load") takes a finished run's detector and trains a new run from iteration 0."""
    source = train(tiny_config(train={"base_iters": 2}, output_dir=str(tmp_path / "source")))
    frozen = {"base_lr": 1e-20, "momentum": 0.0, "weight_decay": 0.0, "base_iters": 3}  # parameters cannot move
    result = train(tiny_config(train=frozen, output_dir=str(tmp_path / "loaded")), init_weights=source.weights)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    start, end = load_file(source.weights)["model"], load_file(result.weights)["model"]
    params = [k for k in start if "running_" not in k and "num_batches" not in k]
    assert all(torch.allclose(start[k], end[k], atol=1e-6) for k in params)
    fresh = load_file(train(tiny_config(train=frozen, output_dir=str(tmp_path / "fresh"))).weights)["model"]
    assert not all(torch.allclose(start[k], fresh[k], atol=1e-6) for k in params)


def test_init_weights_of_another_detector_is_one_clear_error(tiny_config, tmp_path) -> None:
    source = train(tiny_config(train={"base_iters": 1}, output_dir=str(tmp_path / "source")))
    other = tiny_config("fcos", train={"base_iters": 1}, output_dir=str(tmp_path / "other"))
    with pytest.raises(UserError, match=f"{source.weights} does not fit the detector of this config"):
        train(other, init_weights=source.weights)


def test_a_failing_evaluation_never_loses_the_weights(tiny_config, synth_root, tmp_path) -> None:
    """Evaluation runs after the final weights and checkpoint are written: when it fails (a val image whose header
    is fine but whose data is truncated), they are on disk, and ``resume`` evaluates them without retraining."""
    val = tmp_path / "val"
    shutil.copytree(synth_root / "val", val)
    image = sorted(val.glob("*.png"))[0]
    intact = image.read_bytes()
    image.write_bytes(intact[: len(intact) // 2])
    cfg = tiny_config(train={"base_iters": 2, "checkpoint_period": 5}, data={"val": {
        "annotations": str(synth_root / "annotations/instances_val.json"), "images": str(val)}})
    with pytest.raises(UserError, match=f"cannot read image {image}"):
        train(cfg)
    out = Path(cfg.output_dir)
    assert (out / FINAL_WEIGHTS).is_file() and (out / "checkpoint_0000002.pth").is_file()
    assert not (out / SUMMARY).exists()
    weights = (out / FINAL_WEIGHTS).read_bytes()

    image.write_bytes(intact)
    result = train(cfg, resume=True)
    assert (out / FINAL_WEIGHTS).read_bytes() == weights
    assert json.loads((out / SUMMARY).read_text())["metrics"] == result.metrics
