"""The paper's ablation stages (Tables 2 and 5): reconstruction-only Step 1, supervision-only and init-only Step 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw
from torch import nn

from labelenc import runner
from labelenc.artifact import load_label_encoder
from labelenc.config import Config, build_config
from labelenc.data.coco import CocoDetection
from labelenc.data.loader import collate
from labelenc.method import Baseline, FeatureAdaption, ReconstructionOnly, Step2
from labelenc.models import build_detector, family_of
from labelenc.stages import LABEL_ENCODER, STAGES, Objective

CLASSES = ["rectangle", "ellipse", "triangle"]


def batch(synth_root: Path, with_masks: bool = False) -> tuple[list[torch.Tensor], list[dict]]:
    """Two training images as the loader hands them over."""
    dataset = CocoDetection(synth_root / "annotations/instances_train.json", synth_root / "train",
                            with_masks=with_masks)
    return collate([dataset[i] for i in (0, 3)])


def heads_of(detector: nn.Module) -> dict[str, torch.Tensor]:
    """The state of the detector's head(s), keyed as in a label-encoder artifact (``head.<key>``)."""
    return {f"{name}.{k}": v.clone() for name in family_of(detector).head_modules
            for k, v in getattr(detector, name).state_dict().items()}


def artifact_heads(artifact: dict) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, state in artifact["heads"].items() for k, v in state.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def build(stage: str, cfg: Config, inputs: dict[str, str] | None = None, seed: int = 0) -> tuple[nn.Module, Objective]:
    """A fresh detector (seeded) and the stage's objective around it, as the runner builds them."""
    torch.manual_seed(seed)
    detector = build_detector(cfg.model, len(CLASSES))
    return detector, STAGES[stage].build(cfg, detector, CLASSES, inputs or {})


@pytest.fixture(scope="module")
def step1_encoder(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    """label_encoder.pth of a 2-iteration Step-1 run (retinanet, the tiny config)."""
    raw = tiny_raw(synth_root, tmp_path_factory.mktemp("step1") / "run")
    raw["train"]["base_iters"] = 2
    return runner.train(build_config(raw), "step1").outputs["label_encoder"]


# ------------------------------------------------------------------------------------ reconstruction-only Step 1


@pytest.mark.parametrize("family", ["retinanet", "mask_rcnn"])
def test_reconstruction_only_step1_trains_h_and_the_head_without_an_image_backbone(
    tiny_config: Callable[..., Config], synth_root: Path, family: str
) -> None:
    """Table 2: the optimizer holds h (with its FPN) and the head(s), nothing of the image backbone; both change."""
    cfg = tiny_config(family, train={"base_iters": 6})
    images, targets = batch(synth_root, with_masks=family == "mask_rcnn")
    torch.manual_seed(0)
    own = set(build_detector(cfg.model, len(CLASSES)).train()(images, targets))  # the detector's loss names
    detector, objective = build("step1_recon", cfg)
    model = objective.model
    assert isinstance(model, ReconstructionOnly) and detector.backbone is None
    assert (objective.max_iter, objective.lr_offset, objective.weight_schedules) == (6, 0, {})  # 1x, no warm-up
    optimizer = runner.build_optimizer(cfg, model)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    heads = [getattr(detector, name) for name in family_of(detector).head_modules]
    assert trained == {id(p) for m in [model.encoder, *heads] for p in m.parameters()}
    assert not [name for name, _ in model.named_parameters() if "backbone" in name]

    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = heads_of(detector)
    model.train()
    for _ in range(2):
        losses = model(images, targets)
        assert set(losses) == {f"reconstruction_{k}" for k in own}
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
    assert not same(encoder_before, model.encoder.state_dict())
    assert not same(head_before, heads_of(detector))


def test_reconstruction_only_run_writes_a_label_encoder_step2_accepts_and_no_detector(
    tiny_config: Callable[..., Config], tmp_path: Path
) -> None:
    """The run writes label_encoder.pth (no step1 backbone recorded) and run_summary.json without metrics, no
    model_final.pth; the normal Step 2 takes its label encoder."""
    cfg = tiny_config(train={"base_iters": 2}, output_dir=str(tmp_path / "recon"))
    result = runner.train(cfg, "step1_recon")

    assert result.weights is None and result.metrics == {}
    assert result.outputs == {"label_encoder": tmp_path / "recon" / LABEL_ENCODER}
    assert not (tmp_path / "recon" / runner.FINAL_WEIGHTS).exists()
    assert not list((tmp_path / "recon").glob("*_eval.json"))
    summary = json.loads((tmp_path / "recon" / runner.SUMMARY).read_text())
    assert summary["stage"] == "step1_recon" and summary["iterations"] == 2 and summary["metrics"] == {}
    artifact = load_label_encoder(result.outputs["label_encoder"])
    assert artifact["meta"]["step1_backbone"] is None and set(artifact["heads"]) == {"head"}

    step2 = runner.train(tiny_config(train={"base_iters": 1}, output_dir=str(tmp_path / "step2")), "step2",
                         {"label_encoder": str(result.outputs["label_encoder"])})
    assert step2.weights.is_file() and step2.metrics["bbox"]["AP"] is not None


# ------------------------------------------------------------------------------------ Step-2 ablations


def test_supervision_only_step2_starts_from_a_random_head(
    tiny_config: Callable[..., Config], synth_root: Path, step1_encoder: Path
) -> None:
    """Table 5, supervision only: the distance loss to h(y), but the seed's random head and FPN, not Step 1's."""
    cfg = tiny_config()
    artifact = load_label_encoder(step1_encoder)
    detector, objective = build("step2_supervision_only", cfg, {"label_encoder": str(step1_encoder)}, seed=7)
    fresh, _ = build("baseline", cfg, seed=7)

    assert isinstance(objective.model, Step2)
    assert same(heads_of(detector), heads_of(fresh))
    assert same(detector.backbone.fpn.state_dict(), fresh.backbone.fpn.state_dict())
    assert not same(heads_of(detector), artifact_heads(artifact))
    assert [objective.weight_schedules["distance"](i) for i in range(cfg.train.max_iters)] == [1.0] * 5 + [0.0]
    images, targets = batch(synth_root)
    with torch.no_grad():
        assert "feature_distance" in objective.model.train()(images, targets)
    assert STAGES["step2_supervision_only"].find_unused_parameters  # A is idle after the cut-off


def test_init_only_step2_starts_from_the_step1_head_without_distance_or_adaption(
    tiny_config: Callable[..., Config], synth_root: Path, step1_encoder: Path
) -> None:
    """Table 5, initialisation only: head (and FPN) from Step 1, the detector's own losses alone, no A built."""
    cfg = tiny_config()
    artifact = load_label_encoder(step1_encoder)
    detector, objective = build("step2_init_only", cfg, {"label_encoder": str(step1_encoder)}, seed=7)
    fresh, _ = build("baseline", cfg, seed=7)
    full, _ = build("step2", cfg, {"label_encoder": str(step1_encoder)}, seed=7)

    assert type(objective.model) is Baseline and objective.weight_schedules == {}
    assert same(heads_of(detector), artifact_heads(artifact))
    assert same(detector.state_dict(), full.state_dict())  # the initialisation of the normal Step 2
    assert not same(detector.backbone.fpn.state_dict(), fresh.backbone.fpn.state_dict())
    assert not any(isinstance(m, FeatureAdaption) for m in objective.model.modules())
    assert {k.split(".")[0] for k in objective.model.state_dict()} == {"detector"}  # no target, no adaption net
    images, targets = batch(synth_root)
    with torch.no_grad():
        losses = objective.model.train()(images, targets)
    assert set(losses) == {"classification", "bbox_regression"}
    assert not STAGES["step2_init_only"].find_unused_parameters


def test_init_only_run_logs_no_distance(tiny_config: Callable[..., Config], step1_encoder: Path) -> None:
    result = runner.train(tiny_config(train={"base_iters": 2}), "step2_init_only",
                          {"label_encoder": str(step1_encoder)})
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert not any("feature_distance" in r for r in records)
    assert "loaded head from the label encoder" in (result.output_dir / "log.txt").read_text()
