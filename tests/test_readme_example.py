"""The README's "LabelEnc in your own training loop" example runs as written around a stock torchvision RetinaNet."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw

from labelenc.config import build_config
from labelenc.data.loader import build_datasets, build_train_loader
from labelenc.runner import train
from labelenc.stages import LABEL_ENCODER

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    section = README.read_text().split("## LabelEnc in your own training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_step2_example_runs(synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a Step-1 file for RetinaNet/FPN-256, the snippet trains and saves a plain torchvision state dict."""
    raw = tiny_raw(synth_root, tmp_path / "s1")
    raw["model"]["fpn_channels"] = 256  # retinanet_resnet50_fpn's FPN
    raw["train"]["base_iters"] = 1
    cfg = build_config(raw)
    train(cfg, "step1")
    monkeypatch.chdir(tmp_path)  # the snippet reads runs/s1/label_encoder.pth and writes detector.pth
    Path("runs/s1").mkdir(parents=True)
    (tmp_path / "s1" / LABEL_ENCODER).rename("runs/s1/label_encoder.pth")
    train_set, _ = build_datasets(cfg, with_masks=False)
    batches = build_train_loader(train_set, cfg, start_iter=0)
    loader = [next(iter(batches))]  # one batch of 2 images: RetinaNet R-50 runs at 800 px here
    namespace = {"num_classes": train_set.num_classes, "loader": loader, "cutoff": 1}
    exec(compile(_example(), str(README), "exec"), namespace)
    losses = namespace["losses"]
    assert {"classification", "bbox_regression", "feature_distance"} <= set(losses)
    state = torch.load("detector.pth", weights_only=True)
    assert state.keys() == namespace["detector"].state_dict().keys()
    assert not any(k.startswith(("target", "encoder", "adaption")) for k in state)
