"""Tests of labelenc.models: the four torchvision detectors learn, the head-loss adapter matches forward, backbones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from labelenc.config import ConfigError
from labelenc.data.coco import CocoDetection
from labelenc.data.loader import collate
from labelenc.models import FAMILIES, WeightsError, build_detector, family_of, head_losses
from labelenc.models.backbones import build_backbone

NUM_CLASSES = 3  # the synthetic set of conftest
# SGD (learning rate, steps) per family for overfitting one batch; Mask R-CNN from scratch needs the gradient clip.
SCHEDULES = {"retinanet": (0.05, 20), "fcos": (0.02, 15), "faster_rcnn": (0.02, 10), "mask_rcnn": (0.01, 10)}
GRAD_CLIP = 5.0




@pytest.fixture(scope="module")
def batch(synth_root: Path) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two fixed training images of the synthetic set with boxes, labels and masks."""
    ds = CocoDetection(synth_root / "annotations/instances_train.json", synth_root / "train", with_masks=True)
    images, targets = collate([ds[0], ds[1]])
    assert all(len(t["boxes"]) for t in targets)
    return images, targets


def _targets_for(family: str, targets: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{k: v for k, v in t.items() if k != "masks" or FAMILIES[family].with_masks} for t in targets]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_detector_overfits_a_fixed_batch(family: str, tiny_config, batch) -> None:
    """Each family built from the tiny config lowers its total training loss on one batch within a few SGD steps."""
    torch.manual_seed(0)
    model = build_detector(tiny_config(family).model, NUM_CLASSES)
    assert family_of(model) is FAMILIES[family] and isinstance(model, FAMILIES[family].detector)
    model.train()
    images, targets = batch[0], _targets_for(family, batch[1])
    lr, steps = SCHEDULES[family]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    totals = []
    for step in range(steps + 1):
        losses = model(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total), (step, losses)
        totals.append(total.item())
        if step == steps:
            break
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
    assert totals[-1] < 0.7 * totals[0], totals


@pytest.mark.parametrize("family", list(FAMILIES))
def test_head_losses_equal_the_models_own_losses(family: str, tiny_config, batch) -> None:
    """head_losses on model.transform's output and the backbone's features equals model(images, targets) exactly."""
    torch.manual_seed(0)
    model = build_detector(tiny_config(family).model, NUM_CLASSES).train()
    images, targets = batch[0], _targets_for(family, batch[1])
    torch.manual_seed(123)
    expected = model(images, targets)
    torch.manual_seed(123)
    image_list, transformed = model.transform(images, targets)
    features = model.backbone(image_list.tensors)
    got = head_losses(model, image_list, features, transformed)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    grads = torch.autograd.grad(sum(got.values()), list(features.values()), allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0  # the losses are differentiable in the features


ONE_STAGE = {"0": 8, "1": 4, "2": 2, "p6": 1, "p7": 1}  # P3..P7 side for a 64-pixel input
TWO_STAGE = {"0": 16, "1": 8, "2": 4, "3": 2, "pool": 1}  # P2..P6
BACKBONES = [  # every backbone and family, each layout with both FPN paths (torchvision's 256 and a rebuilt one)
    ("resnet18", 256, "retinanet"), ("resnet18", 24, "faster_rcnn"), ("resnet34", 32, "fcos"),
    ("resnet50", 24, "mask_rcnn"), ("resnet101", 24, "retinanet"), ("mobilenet_v3_large", 24, "retinanet"),
    ("mobilenet_v3_large", 256, "faster_rcnn"), ("mobilenet_v2", 256, "retinanet"), ("mobilenet_v2", 24, "mask_rcnn"),
    ("resnet50_dcn", 32, "fcos"),
]


@pytest.mark.parametrize("name, channels, family", BACKBONES, ids=[f"{n}-fpn{c}-{f}" for n, c, f in BACKBONES])
def test_backbone_pyramid_keys_strides_and_channels(name: str, channels: int, family: str) -> None:
    """Every backbone gives the family's FPN levels with the configured channels at strides 8..128 or 4..64."""
    spec = FAMILIES[family]
    levels = TWO_STAGE if spec.head_modules[0] == "rpn" else ONE_STAGE
    body = build_backbone(name, None, None, list(spec.returned_layers), channels, spec.extra_blocks).eval()
    assert body.out_channels == channels
    assert all(p.requires_grad for p in body.parameters())  # random init: nothing frozen
    with torch.no_grad():
        features = body(torch.rand(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in features.items()} == {k: (1, channels, s, s) for k, s in levels.items()}
    assert list(features) == list(levels)


@pytest.mark.parametrize("wrapped", [False, True], ids=["state_dict", "model_key"])
def test_local_backbone_weights_are_loaded(tiny_config, tmp_path: Path, wrapped: bool) -> None:
    """backbone_weights=FILE loads that ResNet state dict (also under a 'model' key), frozen BN, stem frozen."""
    torch.manual_seed(1)
    state = resnet18().state_dict()
    state["conv1.weight"] = torch.randn_like(state["conv1.weight"]) + 3.0
    state["layer4.1.conv2.weight"] = torch.randn_like(state["layer4.1.conv2.weight"]) - 2.0
    state["bn1.running_mean"] = torch.arange(64, dtype=torch.float32)
    state["bn1.running_var"] = torch.linspace(0.5, 2.0, 64)
    path = tmp_path / "r18.pth"
    torch.save({"model": state} if wrapped else state, path)
    cfg = tiny_config().model.model_copy(update={"backbone_weights": str(path)})
    body = build_detector(cfg, NUM_CLASSES).backbone.body
    assert torch.equal(body.conv1.weight, state["conv1.weight"])
    assert torch.equal(body.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert torch.equal(body.bn1.running_mean, state["bn1.running_mean"])
    assert torch.equal(body.bn1.running_var, state["bn1.running_var"])
    assert not body.conv1.weight.requires_grad and body.layer4[1].conv2.weight.requires_grad  # torchvision's 3


def test_unknown_weights_name_lists_the_known_ones(tiny_config) -> None:
    """A name that is neither a file nor a weights name of the backbone is refused with the valid names."""
    cfg = tiny_config().model.model_copy(update={"backbone_weights": "IMAGENET_BEST"})
    with pytest.raises(WeightsError, match="IMAGENET_BEST.*IMAGENET1K_V1"):
        build_detector(cfg, NUM_CLASSES)


class _Opaque:
    """An object that torch.load(weights_only=True) must refuse to unpickle."""


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"fc9.weight": torch.zeros(3), "conv1.weight": torch.zeros(64, 3, 7, 7)}, "do not fit resnet18"),
        ({"conv1.weight": torch.zeros(64, 3, 7, 7), "epoch": 3}, "state dict of tensors"),
        (_Opaque(), "cannot read weights file"),
        (b"not a torch file", "cannot read weights file"),
        (None, "weights file not found"),
    ],
    ids=["wrong-keys", "non-tensor", "pickled-object", "garbage", "missing"],
)
def test_unusable_weights_file_is_a_weights_error(tiny_config, tmp_path: Path, payload: object, message: str) -> None:
    """A weights file with wrong keys, non-tensors, code, garbage, or none at all is a WeightsError naming it."""
    path = tmp_path / "bad.pth"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    elif payload is not None:
        torch.save(payload, path)
    cfg = tiny_config().model.model_copy(update={"backbone_weights": str(path)})
    with pytest.raises(WeightsError, match=message) as info:
        build_detector(cfg, NUM_CLASSES)
    assert str(path) in str(info.value)


def test_detector_output_in_eval_mode(tiny_config, batch) -> None:
    """In eval mode a detector returns per-image boxes, scores and labels in 1..C (0 is background)."""
    torch.manual_seed(0)
    model = build_detector(tiny_config("faster_rcnn").model.model_copy(update={"detections_per_image": 7}),
                           NUM_CLASSES).eval()
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1
    with torch.no_grad():
        outputs = model(batch[0])
    assert len(outputs) == 2
    for out in outputs:
        assert set(out) >= {"boxes", "scores", "labels"} and len(out["boxes"]) <= 7
        assert ((out["labels"] >= 1) & (out["labels"] <= NUM_CLASSES)).all()
    assert isinstance(model.backbone.body.bn1, nn.BatchNorm2d)


# ------------------------------------------------------------------------------------- P6 from C5, frozen BN


@pytest.mark.parametrize("family, backbone, c5", [("retinanet", "resnet18", 512), ("fcos", "mobilenet_v2", 320)])
def test_p6_from_c5_takes_the_backbones_c5(family: str, backbone: str, c5: int, tiny_config) -> None:
    """model.p6_from=c5: the P6 conv reads C5 (its channels), P7 follows, and the pyramid keeps its shapes."""
    torch.manual_seed(0)
    cfg = tiny_config(family, model={"backbone": backbone, "p6_from": "c5"}).model
    fpn_channels = cfg.fpn_channels
    body = build_detector(cfg, NUM_CLASSES).backbone.eval()
    extra = body.fpn.extra_blocks
    assert extra.p6.in_channels == c5 == body.fpn.inner_blocks[-1][0].in_channels and not extra.use_P5
    assert extra.p7.in_channels == fpn_channels
    with torch.no_grad():
        features = body(torch.rand(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        k: (1, fpn_channels, s, s) for k, s in ONE_STAGE.items()}
    default = build_detector(tiny_config(family, model={"backbone": backbone}).model, NUM_CLASSES)
    assert default.backbone.fpn.extra_blocks.p6.in_channels == fpn_channels and default.backbone.fpn.extra_blocks.use_P5


def test_p6_from_c5_holds_when_c5_has_the_fpn_width() -> None:
    """torchvision's LastLevelP6P7 guesses P5 from in == out channels; the family says C5 explicitly."""
    assert not FAMILIES["retinanet"].extra_blocks(16, 16).use_P5
    assert FAMILIES["retinanet"].extra_blocks(16).use_P5


@pytest.mark.parametrize("family", ["faster_rcnn", "mask_rcnn"])
def test_p6_from_c5_is_refused_for_max_pooled_p6(family: str, tiny_config) -> None:
    with pytest.raises(ConfigError, match=f"model.p6_from='c5' does not apply to {family}"):
        tiny_config(family, model={"p6_from": "c5"})
    with pytest.raises(ValueError, match="cannot be computed from C5"):
        FAMILIES[family].extra_blocks(16, 512)


@pytest.mark.parametrize("frozen_bn, pretrained, norm", [
    (None, False, nn.BatchNorm2d), (True, False, FrozenBatchNorm2d), (False, True, nn.BatchNorm2d),
    (True, True, FrozenBatchNorm2d),
], ids=["default-random", "frozen-random", "batchnorm-pretrained", "frozen-pretrained"])
def test_frozen_bn_forces_the_backbone_norm(frozen_bn: bool | None, pretrained: bool, norm: type, tiny_config,
                                            tmp_path: Path) -> None:
    """model.frozen_bn True / False forces FrozenBatchNorm / BatchNorm whatever the weights; loaded statistics
    are the file's either way, and trainable_layers still freezes the first stages."""
    torch.manual_seed(0)
    state = resnet18().state_dict()
    state["bn1.running_mean"] = torch.arange(64, dtype=torch.float32)
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model = {"frozen_bn": frozen_bn, "backbone_weights": str(path) if pretrained else None, "trainable_layers": 3}
    body = build_detector(tiny_config(model=model).model, NUM_CLASSES).backbone.body
    norms = [m for m in body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(type(m) is norm for m in norms)
    assert torch.equal(body.bn1.running_mean, state["bn1.running_mean"]) == pretrained
    assert not body.conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad


# ------------------------------------------------------------------------------------- model.head_norm


def _group_norms(module: nn.Module) -> list[nn.GroupNorm]:
    return [m for m in module.modules() if isinstance(m, nn.GroupNorm)]


GN_HEAD = {"head_norm": "group", "fpn_channels": 32}  # GroupNorm(32) needs a multiple of 32 channels


@pytest.mark.parametrize("anchor_sizes", [[8, 16, 32, 64, 128], None], ids=["configured-anchors", "default-anchors"])
def test_retinanet_group_head_is_torchvisions_v2_head(tiny_config, anchor_sizes: list[int] | None) -> None:
    """head_norm=group builds RetinaNetHead(..., norm_layer=partial(GroupNorm, 32)) as retinanet_resnet50_fpn_v2:
    GroupNorm(32, C) after each of the 4 tower convolutions of both branches, bias-free convolutions, 9 anchors."""
    from functools import partial

    from torchvision.models.detection.retinanet import RetinaNetHead

    torch.manual_seed(0)
    model = build_detector(tiny_config(model={**GN_HEAD, "anchor_sizes": anchor_sizes}).model, NUM_CLASSES)
    norms = _group_norms(model.head)
    assert len(norms) == 8 and all(m.num_groups == 32 and m.num_channels == 32 for m in norms)
    assert len(_group_norms(model.head.classification_head.conv)) == len(_group_norms(model.head.regression_head.conv))
    v2 = RetinaNetHead(32, 9, NUM_CLASSES + 1, norm_layer=partial(nn.GroupNorm, 32))
    assert {k: v.shape for k, v in model.head.state_dict().items()} == {k: v.shape for k, v in v2.state_dict().items()}
    assert not _group_norms(model.backbone)  # only the head changes


def test_retinanet_default_head_is_unchanged(tiny_config) -> None:
    """Unset and head_norm=none build torchvision's plain RetinaNet head, bit for bit the same weights."""
    states = []
    for norm in (None, "none"):
        torch.manual_seed(0)
        model = build_detector(tiny_config(model={"head_norm": norm}).model, NUM_CLASSES)
        assert not _group_norms(model)
        assert model.head.classification_head.conv[0][0].bias is not None  # torchvision's v1 head: conv with bias
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("family, norm", [("fcos", None), ("fcos", "group"), ("faster_rcnn", "none"),
                                          ("mask_rcnn", None)])
def test_head_norm_the_family_already_has_changes_nothing(family: str, norm: str | None, tiny_config) -> None:
    """FCOS's torchvision head is GroupNorm(32) with or without head_norm=group; R-CNN heads have no norm."""
    torch.manual_seed(0)
    model = build_detector(tiny_config(family, model={"head_norm": norm}).model, NUM_CLASSES)
    heads = [getattr(model, name) for name in FAMILIES[family].head_modules]
    norms = [m for head in heads for m in _group_norms(head)]
    if family == "fcos":
        assert len(norms) == 8 and all(m.num_groups == 32 for m in norms)
    else:
        assert not norms


def test_retinanet_group_head_trains_and_detects(tiny_config, batch) -> None:
    """With the GroupNorm head RetinaNet still returns its loss dict in training and per-image detections in eval."""
    torch.manual_seed(0)
    model = build_detector(tiny_config(model=GN_HEAD).model, NUM_CLASSES).train()
    losses = model(*batch)
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(v.shape == () and torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        outputs = model(batch[0])
    assert isinstance(outputs, list) and len(outputs) == 2
    for out in outputs:
        assert set(out) >= {"boxes", "scores", "labels"}
        assert ((out["labels"] >= 1) & (out["labels"] <= NUM_CLASSES)).all()


def test_retinanet_group_head_learns_through_h(tiny_config, batch) -> None:
    """Step 1 shares the GroupNorm head between f(I) and h(y): head_losses on either gives finite losses whose
    gradients reach the GroupNorm parameters (and h's)."""
    from labelenc.artifact import build_label_encoder, encoder_metadata
    from labelenc.method import Step1

    torch.manual_seed(0)
    cfg = tiny_config(model=GN_HEAD).model
    model = build_detector(cfg, NUM_CLASSES).train()
    image_list, targets = model.transform(*batch)
    got = head_losses(model, image_list, model.backbone(image_list.tensors), targets)
    assert set(got) == {"classification", "bbox_regression"} and all(torch.isfinite(v) for v in got.values())
    norms = _group_norms(model.head)
    weights = [p for m in norms for p in (m.weight, m.bias)]
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(sum(got.values()), weights))

    encoder = build_label_encoder(encoder_metadata("retinanet", ["a", "b", "c"], cfg.fpn_channels, 0.0625, None))
    step1 = Step1(model, encoder, box_jitter=False).train()
    losses = step1(*batch)
    recon = [v for k, v in losses.items() if k.startswith("reconstruction_")]
    assert len(recon) == 2 and all(torch.isfinite(v) for v in losses.values())
    step1.zero_grad(set_to_none=True)
    sum(recon).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


@pytest.mark.parametrize("family, norm, allowed", [
    ("fcos", "none", "allowed: group"), ("faster_rcnn", "group", "allowed: none"),
    ("mask_rcnn", "group", "allowed: none"),
])
def test_head_norm_a_family_cannot_build_is_refused(family: str, norm: str, allowed: str, tiny_config) -> None:
    """A head_norm the family's torchvision head cannot honour is a ConfigError naming key, family and values."""
    with pytest.raises(ConfigError, match=f"model.head_norm='{norm}' does not apply to {family} \\({allowed};"):
        tiny_config(family, model={"head_norm": norm})


def test_group_head_needs_fpn_channels_multiple_of_32(tiny_config) -> None:
    """head_norm=group on RetinaNet needs fpn_channels % 32 == 0 (tiny_config's 16 is refused), as FCOS always."""
    with pytest.raises(ConfigError, match="model.fpn_channels must be a multiple of 32 for retinanet with head_norm "
                                          "'group'"):
        tiny_config(model={"head_norm": "group"})
    assert tiny_config(model={"head_norm": "none"}).model.fpn_channels == 16
    assert tiny_config(model=GN_HEAD).model.head_norm == "group"
    with pytest.raises(ConfigError, match="multiple of 32 for fcos"):
        tiny_config("fcos", model={"fpn_channels": 16})


def test_build_refuses_an_unvalidated_head_norm(tiny_config) -> None:
    """model_copy(update=...) skips validation: build_detector still refuses what the family cannot build."""
    cfg = tiny_config("fcos").model.model_copy(update={"head_norm": "none"})
    with pytest.raises(ValueError, match="model.head_norm='none' does not apply to fcos"):
        build_detector(cfg, NUM_CLASSES)
    cfg = tiny_config().model.model_copy(update={"head_norm": "group"})  # 16 channels
    with pytest.raises(ValueError, match="multiple of 32 for retinanet"):
        build_detector(cfg, NUM_CLASSES)


def test_detector_kwargs_reach_torchvisions_constructor(tiny_config, batch) -> None:
    """model.detector_kwargs set torchvision's own sampling sizes: Faster R-CNN then samples that many RoIs per image
    in training and keeps that many RPN proposals in evaluation; Mask R-CNN takes them too (forwarded by torchvision)."""
    torch.manual_seed(0)
    settings = {"box_batch_size_per_image": 8, "rpn_post_nms_top_n_test": 5}
    for family in ("faster_rcnn", "mask_rcnn"):
        model = build_detector(tiny_config(family, model={"detector_kwargs": settings}).model, NUM_CLASSES)
        images, targets = model.transform(batch[0], _targets_for(family, batch[1]))
        features = model.backbone(images.tensors)
        model.train()
        proposals, _ = model.rpn(images, features, targets)
        sampled, *_ = model.roi_heads.select_training_samples(proposals, targets)
        assert [len(p) for p in sampled] == [8, 8]
        model.eval()
        with torch.no_grad():
            proposals, _ = model.rpn(images, features)
        assert max(len(p) for p in proposals) == 5
    fcos = build_detector(tiny_config("fcos", model={"detector_kwargs": {"center_sampling_radius": 2}}).model, 3)
    assert fcos.center_sampling_radius == 2  # an int where torchvision's default is a float


@pytest.mark.parametrize("family, settings, message", [
    ("faster_rcnn", {"box_batch_size": 8}, r"model.detector_kwargs.box_batch_size is not a numeric setting of "
                                            r"torchvision's FasterRCNN \(allowed: box_batch_size_per_image, "),
    ("fcos", {"box_batch_size_per_image": 8}, "is not a numeric setting of torchvision's FCOS"),
    ("retinanet", {"min_size": 32}, "model.detector_kwargs.min_size: set it with model.min_size"),
    ("faster_rcnn", {"box_detections_per_img": 5}, "box_detections_per_img: set it with model.detections_per_image"),
    ("faster_rcnn", {"box_batch_size_per_image": 8.5}, "box_batch_size_per_image must be an integer like its "
                                                       "default 512, got 8.5"),
    ("retinanet", {"topk_candidates": True}, "topk_candidates must be an integer like its default 1000, got True"),
])
def test_detector_kwargs_torchvision_does_not_take_are_refused(family, settings, message, tiny_config) -> None:
    """A name the family's constructor lacks, one set by another model field, or a value of the wrong type is a
    ConfigError naming the key (torchvision would raise a bare TypeError, or silently accept 8.5 RoIs)."""
    with pytest.raises(ConfigError, match=message):
        tiny_config(family, model={"detector_kwargs": settings})
