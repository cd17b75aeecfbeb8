"""Tests for the label-encoder artifact (labelenc/artifact.py): save/load, compatibility checks, Step-2 init."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from labelenc import runner
from labelenc.artifact import (
    IncompatibleLabelEncoder,
    build_label_encoder,
    check_compatible,
    encoder_metadata,
    init_detector_from_artifact,
    load_label_encoder,
    save_label_encoder,
)
from labelenc.config import Config
from labelenc.encoder import LabelEncoder
from labelenc.engine.checkpoint import CheckpointError, load_file, save_file
from labelenc.errors import UserError
from labelenc.models import build_detector, family_of

NUM_CLASSES = 3
CLASS_NAMES = ["rectangle", "ellipse", "triangle"]  # the synthetic set's classes, in label order




def meta_of(cfg: Config, class_names: list[str] = CLASS_NAMES) -> dict:
    """The metadata a run of ``cfg`` records for, or expects of, a label encoder."""
    return encoder_metadata(
        cfg.model.family, class_names, cfg.model.fpn_channels, cfg.labelenc.encoder_width, cfg.model.backbone
    )


def step1_parts(cfg: Config, seed: int = 0) -> tuple[nn.Module, LabelEncoder, dict]:
    """A (random) Step-1 detector and label encoder h for ``cfg``, and their metadata."""
    torch.manual_seed(seed)
    meta = meta_of(cfg)
    return build_detector(cfg.model, NUM_CLASSES), build_label_encoder(meta), meta


def write_artifact(path: Path, cfg: Config, seed: int = 0) -> tuple[nn.Module, LabelEncoder, dict]:
    """Save a label-encoder artifact for ``cfg`` to ``path`` and return what went into it."""
    detector, encoder, meta = step1_parts(cfg, seed)
    save_label_encoder(path, encoder, detector, meta, cfg.model_dump(mode="json"))
    return detector, encoder, meta


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys and bit-identical tensors."""
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def fpn_state(detector: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the detector's FPN tensors."""
    return {k: v.clone() for k, v in detector.backbone.fpn.state_dict().items()}


# -------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn"])
def test_save_load_round_trip(tiny_config: Callable[..., Config], tmp_path: Path, family: str) -> None:
    """The artifact gives back h's state, the head(s), the metadata and the config exactly; h rebuilds from meta."""
    cfg = tiny_config(family)
    path = tmp_path / "label_encoder.pth"
    detector, encoder, meta = write_artifact(path, cfg)

    artifact = load_label_encoder(path)

    assert artifact["kind"] == "label_encoder"
    assert artifact["meta"] == meta and artifact["config"] == cfg.model_dump(mode="json")
    assert states_equal(artifact["encoder"], encoder.state_dict())
    assert set(artifact["heads"]) == set(family_of(detector).head_modules)
    for name, state in artifact["heads"].items():
        assert states_equal(state, getattr(detector, name).state_dict())
    rebuilt = build_label_encoder(artifact["meta"])
    rebuilt.load_state_dict(artifact["encoder"], strict=True)
    maps = torch.rand(1, NUM_CLASSES, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(rebuilt(maps).values(), encoder(maps).values()))


def detector_weights_file(path: Path, cfg: Config) -> None:
    """A detector weights file as ``labelenc train`` writes model_final.pth."""
    save_file({"kind": "detector", "model": build_detector(cfg.model, NUM_CLASSES).state_dict()}, path)


def plain_state_dict_file(path: Path, cfg: Config) -> None:
    """A bare ``torch.save`` state dict (not a labelenc file)."""
    torch.save(build_detector(cfg.model, NUM_CLASSES).state_dict(), path)


@pytest.mark.parametrize(
    "make, message",
    [(detector_weights_file, "not a label-encoder file"), (plain_state_dict_file, "no format_version"), (None, "not found")],
    ids=["detector-weights", "plain-state-dict", "missing"],
)
def test_load_label_encoder_refuses_other_files(
    tiny_config: Callable[..., Config], tmp_path: Path, make: Callable[[Path, Config], None] | None, message: str
) -> None:
    """A detector weights file, a foreign file or a missing path is refused with a CheckpointError naming it."""
    path = tmp_path / "model_final.pth"
    if make is not None:
        make(path, tiny_config())
    with pytest.raises(CheckpointError, match=message) as info:
        load_label_encoder(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, UserError)


# ------------------------------------------------------------------------------------------ compatibility


def test_check_compatible_accepts_other_backbone_and_width(tiny_config: Callable[..., Config]) -> None:
    """Backbone and encoder width may differ between Step 1 and Step 2 (paper: h reused across backbones)."""
    step1 = meta_of(tiny_config())
    step2 = meta_of(tiny_config(model={"backbone": "resnet34"}, labelenc={"encoder_width": 0.125}))
    assert step1["step1_backbone"] != step2["step1_backbone"]
    check_compatible(step1, step2, "h.pth")


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"family": "faster_rcnn"}, ["family", "returned_layers"]),
        ({"class_names": ["rectangle", "ellipse", "star"]}, ["class_names"]),
        ({"class_names": CLASS_NAMES + ["star"]}, ["class_names"]),
        ({"fpn_channels": 32}, ["fpn_channels"]),
        ({"family": "mask_rcnn", "class_names": ["a", "b", "c"], "fpn_channels": 8},
         ["family", "returned_layers", "class_names", "fpn_channels"]),
    ],
    ids=["family", "class-names", "class-count", "fpn-channels", "all"],
)
def test_check_compatible_names_every_difference(changes: dict, named: list[str]) -> None:
    """An artifact for another family, class list or FPN is refused, and the message names each difference."""
    step1 = encoder_metadata("retinanet", CLASS_NAMES, 16, 0.0625, "resnet18")
    args = {"family": "retinanet", "class_names": CLASS_NAMES, "fpn_channels": 16, **changes}
    step2 = encoder_metadata(args["family"], args["class_names"], args["fpn_channels"], 0.0625, "resnet18")

    with pytest.raises(IncompatibleLabelEncoder) as info:
        check_compatible(step1, step2, "runs/s1/label_encoder.pth")

    message = str(info.value)
    assert "runs/s1/label_encoder.pth" in message
    assert isinstance(info.value, UserError)
    for key in ("family", "returned_layers", "class_names", "fpn_channels"):
        line = next((ln for ln in message.splitlines() if ln.strip().startswith(f"{key}:")), None)
        if key in named:
            assert line is not None, f"{key} not named in: {message}"
            assert repr(step1[key]) in line and repr(step2[key]) in line
        else:
            assert line is None, f"{key} wrongly named in: {message}"


def test_check_compatible_refuses_other_head_norm_and_reads_old_artifacts_as_the_default() -> None:
    """A Step-1 GroupNorm head does not load into a plain RetinaNet head: refused before training, naming
    head_norm; an artifact written before the key existed holds its family's torchvision head."""
    group = encoder_metadata("retinanet", CLASS_NAMES, 32, 0.0625, "resnet18", head_norm="group")
    plain = encoder_metadata("retinanet", CLASS_NAMES, 32, 0.0625, "resnet18")
    assert (group["head_norm"], plain["head_norm"]) == ("group", "none")
    with pytest.raises(IncompatibleLabelEncoder, match="head_norm: label encoder has 'group', this run has 'none'"):
        check_compatible(group, plain, "h.pth")
    for family, head_norm in (("retinanet", None), ("fcos", "group")):
        old = encoder_metadata(family, CLASS_NAMES, 32, 0.0625, "resnet18")
        del old["head_norm"]
        run = encoder_metadata(family, CLASS_NAMES, 32, 0.0625, "resnet18", head_norm=head_norm)
        check_compatible(old, run, "old.pth")
    old_retinanet = {k: v for k, v in plain.items() if k != "head_norm"}
    with pytest.raises(IncompatibleLabelEncoder, match="head_norm: label encoder has 'none'"):
        check_compatible(old_retinanet, group, "old.pth")


# ------------------------------------------------------------------------------------------- Step-2 init


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn"])
def test_init_copies_heads_and_matching_fpn_tensors(tiny_config: Callable[..., Config], family: str) -> None:
    """The head(s) load exactly; FPN output convs (and P6/P7) come from h's FPN, whose shapes match."""
    cfg = tiny_config(family)
    step1_detector, encoder, meta = step1_parts(cfg, seed=0)
    artifact = {
        "encoder": encoder.state_dict(),
        "heads": {n: getattr(step1_detector, n).state_dict() for n in family_of(step1_detector).head_modules},
        "meta": meta,
    }
    torch.manual_seed(1)
    detector = build_detector(cfg.model, NUM_CLASSES)
    assert not states_equal(detector.state_dict(), step1_detector.state_dict())  # a fresh, different init

    result = init_detector_from_artifact(detector, artifact)

    for name, state in artifact["heads"].items():
        assert states_equal(getattr(detector, name).state_dict(), state)
    h_fpn = encoder.fpn.state_dict()
    outputs = sorted(k for k in h_fpn if k.startswith(("layer_blocks.", "extra_blocks.")))
    if family == "retinanet":
        assert {"extra_blocks.p6.weight", "extra_blocks.p7.weight"} <= set(outputs)
    assert set(outputs) <= set(result["copied"])
    after = detector.backbone.fpn.state_dict()
    for key in outputs:
        assert torch.equal(after[key], h_fpn[key])
    # The backbone body is left alone.
    torch.manual_seed(1)
    fresh = build_detector(cfg.model, NUM_CLASSES)
    assert states_equal(detector.backbone.body.state_dict(), fresh.backbone.body.state_dict())


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34"])
def test_init_skips_lateral_convs_of_other_width(tiny_config: Callable[..., Config], backbone: str) -> None:
    """FPN lateral (inner) convs whose input channels differ from h's are skipped whole, weight and bias alike."""
    step1_detector, encoder, meta = step1_parts(tiny_config(), seed=0)
    artifact = {"encoder": encoder.state_dict(), "heads": {"head": step1_detector.head.state_dict()}, "meta": meta}
    torch.manual_seed(1)
    detector = build_detector(tiny_config(model={"backbone": backbone}).model, NUM_CLASSES)
    before = fpn_state(detector)
    inner = sorted(k for k in before if k.startswith("inner_blocks."))
    h_fpn = encoder.fpn.state_dict()
    assert all(h_fpn[k].shape != before[k].shape for k in inner if k.endswith("weight"))

    result = init_detector_from_artifact(detector, artifact)

    assert sorted(result["skipped"]) == inner
    assert set(result["copied"]).isdisjoint(inner)
    assert set(result["copied"]) | set(result["skipped"]) == set(before)
    after = detector.backbone.fpn.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in inner)


def test_init_logs_copied_and_skipped(tiny_config: Callable[..., Config], caplog: pytest.LogCaptureFixture) -> None:
    """The log names the loaded head(s) and every FPN tensor copied from h or left at its initialisation."""
    step1_detector, encoder, meta = step1_parts(tiny_config("faster_rcnn"), seed=0)
    artifact = {
        "encoder": encoder.state_dict(),
        "heads": {"rpn": step1_detector.rpn.state_dict(), "roi_heads": step1_detector.roi_heads.state_dict()},
        "meta": meta,
    }
    detector = build_detector(tiny_config("faster_rcnn").model, NUM_CLASSES)
    with caplog.at_level(logging.INFO, logger="labelenc.artifact"):
        result = init_detector_from_artifact(detector, artifact)
    text = caplog.text
    assert "rpn" in text and "roi_heads" in text
    assert result["copied"] and result["skipped"]
    copied_line = next(r.getMessage() for r in caplog.records if "copied" in r.getMessage())
    skipped_line = next(r.getMessage() for r in caplog.records if "left at" in r.getMessage())
    assert all(k in copied_line for k in result["copied"])
    assert all(k in skipped_line for k in result["skipped"])


def wrong_shape(state: dict[str, torch.Tensor], key: str) -> None:
    """Replace ``key`` by a tensor with one more element along its last dimension."""
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1) if state[key].dim() else torch.zeros(2)


def missing(state: dict[str, torch.Tensor], key: str) -> None:
    """Drop ``key``."""
    del state[key]


def unexpected(state: dict[str, torch.Tensor], key: str) -> None:
    """Add a key the head does not have."""
    state[key + "_extra"] = state[key].clone()


@pytest.mark.parametrize("corrupt", [wrong_shape, missing, unexpected], ids=["wrong-shape", "missing", "unexpected"])
@pytest.mark.parametrize("family, head", [("retinanet", "head"), ("faster_rcnn", "roi_heads"), ("faster_rcnn", "rpn")])
def test_init_refuses_head_that_does_not_load(
    tiny_config: Callable[..., Config], family: str, head: str, corrupt: Callable[[dict, str], None]
) -> None:
    """A head tensor that does not load strictly is an IncompatibleLabelEncoder naming the head, never a random init."""
    step1_detector, encoder, meta = step1_parts(tiny_config(family), seed=0)
    heads = {n: dict(getattr(step1_detector, n).state_dict()) for n in family_of(step1_detector).head_modules}
    corrupt(heads[head], sorted(heads[head])[-1])
    artifact = {"encoder": encoder.state_dict(), "heads": heads, "meta": meta}
    detector = build_detector(tiny_config(family).model, NUM_CLASSES)

    with pytest.raises(IncompatibleLabelEncoder, match=head):
        init_detector_from_artifact(detector, artifact)


def test_init_refuses_head_of_other_class_count(tiny_config: Callable[..., Config]) -> None:
    """A head trained for another number of classes does not load into this detector."""
    cfg = tiny_config()
    torch.manual_seed(0)
    other = build_detector(cfg.model, NUM_CLASSES + 2)
    encoder = build_label_encoder(meta_of(cfg))
    artifact = {"encoder": encoder.state_dict(), "heads": {"head": other.head.state_dict()}, "meta": meta_of(cfg)}
    with pytest.raises(IncompatibleLabelEncoder, match="head"):
        init_detector_from_artifact(build_detector(cfg.model, NUM_CLASSES), artifact)


# ---------------------------------------------------------------------------------------- through the runner


def test_step1_artifact_from_resnet18_trains_resnet34_step2(tiny_config: Callable[..., Config], tmp_path: Path) -> None:
    """A ResNet-18 Step-1 artifact initialises and supervises a ResNet-34 Step 2 (paper, Table 3: other backbone)."""
    cfg1 = tiny_config(train={"base_iters": 2}, output_dir=str(tmp_path / "step1"))
    step1 = runner.train(cfg1, "step1")
    artifact = load_label_encoder(step1.outputs["label_encoder"])
    assert artifact["meta"]["step1_backbone"] == "resnet18"
    assert artifact["meta"]["class_names"] == CLASS_NAMES

    cfg2 = tiny_config(model={"backbone": "resnet34"}, train={"base_iters": 2}, output_dir=str(tmp_path / "step2"))
    step2 = runner.train(cfg2, "step2", {"label_encoder": str(step1.outputs["label_encoder"])})

    final = load_file(step2.weights, kind="weights")
    detector = build_detector(cfg2.model, NUM_CLASSES)
    detector.load_state_dict(final["model"], strict=True)
    assert sum(p.numel() for p in detector.parameters()) > sum(
        p.numel() for p in build_detector(cfg1.model, NUM_CLASSES).parameters()
    )
    log = (tmp_path / "step2" / "log.txt").read_text()
    assert "loaded head from the label encoder" in log
    assert "FPN tensors copied from h: " in log and "layer_blocks.0.0.weight" in log
    assert "left at their initialisation" in log and "inner_blocks.0.0.weight" in log
    # The Step-2 weights file is a detector, not a label encoder: Step 2 cannot be chained on it by mistake.
    with pytest.raises(CheckpointError, match="not a label-encoder file"):
        load_label_encoder(step2.weights)


@pytest.mark.parametrize(
    "section, change, named",
    [("model", {"fpn_channels": 32}, "fpn_channels"), ("model", {"family": "faster_rcnn"}, "family")],
    ids=["fpn-channels", "family"],
)
def test_runner_step2_refuses_incompatible_artifact(
    tiny_config: Callable[..., Config], tmp_path: Path, section: str, change: dict, named: str
) -> None:
    """``train(step2)`` with an artifact for another FPN or family stops before training, naming the difference."""
    path = tmp_path / "h.pth"
    write_artifact(path, tiny_config(**{section: change}))
    cfg = tiny_config(output_dir=str(tmp_path / "step2"))

    with pytest.raises(IncompatibleLabelEncoder, match=named) as info:
        runner.train(cfg, "step2", {"label_encoder": str(path)})

    assert str(path) in str(info.value)
    assert not (tmp_path / "step2" / runner.FINAL_WEIGHTS).exists()
