"""Tests for the LabelEnc objectives (labelenc/method.py) and the zero-inference-cost guarantee of Step 2."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from labelenc import runner
from labelenc.artifact import build_label_encoder, encoder_metadata, load_label_encoder
from labelenc.config import Config
from labelenc.data.coco import CocoDetection
from labelenc.data.loader import collate
from labelenc.encoder import LabelEncoder
from labelenc.engine.checkpoint import latest_checkpoint, load_file
from labelenc.labelmap import render_label_maps
from labelenc.method import FeatureAdaption, LabelEncoderTarget, Step1, Step2, label_maps_of, loss_feature_distance
from labelenc.models import build_detector, family_of

NUM_CLASSES = 3
CLASS_NAMES = ["rectangle", "ellipse", "triangle"]
# Training images 0 and 3 of the synthetic set: labels [3, 3, 3] and [2, 3, 2, 3], i.e. class 1 is absent.
BATCH_INDICES = (0, 3)
FAMILY_NAMES = ["retinanet", "faster_rcnn", "mask_rcnn", "fcos"]




def synth_batch(synth_root: Path, with_masks: bool = True) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Two training images of the synthetic set as the training loader hands them over."""
    dataset = CocoDetection(synth_root / "annotations/instances_train.json", synth_root / "train", with_masks=with_masks)
    assert dataset.class_names == CLASS_NAMES
    return collate([dataset[i] for i in BATCH_INDICES])


def step2_of(detector: nn.Module, encoder: LabelEncoder, weight: float = 1.0) -> Step2:
    """Step 2 towards h(y) (mask-aware label maps for Mask R-CNN), as the step2 recipe builds it."""
    return Step2(detector, LabelEncoderTarget(encoder, family_of(detector).with_masks), weight)


def build_parts(cfg: Config, seed: int = 0) -> tuple[nn.Module, LabelEncoder]:
    """A tiny detector and a label encoder h built for it, as the runner builds them."""
    torch.manual_seed(seed)
    detector = build_detector(cfg.model, NUM_CLASSES)
    meta = encoder_metadata(
        cfg.model.family, CLASS_NAMES, cfg.model.fpn_channels, cfg.labelenc.encoder_width, cfg.model.backbone
    )
    return detector, build_label_encoder(meta)


def head_modules(detector: nn.Module) -> list[nn.Module]:
    """The detection head(s) d of a detector (RetinaNet/FCOS head, or RPN + ROI heads)."""
    return [getattr(detector, name) for name in family_of(detector).head_modules]


def grads(modules: nn.Module | list[nn.Module]) -> list[Tensor | None]:
    """The .grad of every parameter of ``modules``."""
    modules = modules if isinstance(modules, list) else [modules]
    return [p.grad for m in modules for p in m.parameters()]


def no_gradient(modules: nn.Module | list[nn.Module]) -> bool:
    """True when no parameter of ``modules`` received a non-zero gradient."""
    return all(g is None or not g.any() for g in grads(modules))


def some_gradient(modules: nn.Module | list[nn.Module]) -> bool:
    """True when some parameter of ``modules`` received a non-zero gradient."""
    return any(g is not None and bool(g.any()) for g in grads(modules))


def backward_of(model: nn.Module, loss: Tensor) -> None:
    """Backward of one loss term alone, starting from cleared gradients."""
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)


def has_hooks(module: nn.Module) -> bool:
    """True when any submodule carries a forward, forward-pre or backward hook."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in module.modules())


# --------------------------------------------------------------------------------------------- distance loss


def reference_layer_norm(x: Tensor) -> Tensor:
    """LN of Eq. 10 written out: per image, normalise over (C, H, W) with the biased variance and eps 1e-5."""
    flat = x.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    return (flat - mean) / torch.sqrt(var + 1e-5)


def random_levels(seed: int) -> OrderedDict[str, Tensor]:
    """Five FPN-like levels of unequal sizes, with level-dependent offsets and scales."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    return OrderedDict(
        (str(i), torch.randn(2, 6, h, w, generator=g, dtype=torch.float64) * (i + 1) + 3 * i)
        for i, (h, w) in enumerate(sizes)
    )


def test_loss_feature_distance_matches_formula() -> None:
    """L_dis = mean over all elements of (LN(a) - LN(e))² with per-level LN, all levels concatenated per image."""
    adapted, encoded = random_levels(0), random_levels(1)
    student = torch.cat([reference_layer_norm(x) for x in adapted.values()], dim=1)
    target = torch.cat([reference_layer_norm(x) for x in encoded.values()], dim=1)
    expected = ((student - target) ** 2).mean()

    loss = loss_feature_distance(adapted, encoded)

    assert loss.shape == ()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    # The formula discriminates: averaging per-level MSEs (levels of unequal size) would give another value.
    per_level = torch.stack([
        ((reference_layer_norm(a) - reference_layer_norm(e)) ** 2).mean() for a, e in zip(adapted.values(), encoded.values())
    ]).mean()
    assert not torch.isclose(per_level, expected, rtol=1e-3)


def test_loss_feature_distance_normalises_per_level_and_detaches_target() -> None:
    """Per-level affine changes of either side leave L_dis unchanged, and no gradient flows into the target side."""
    adapted = OrderedDict((k, v.clone().requires_grad_(True)) for k, v in random_levels(2).items())
    encoded = OrderedDict((k, v.clone().requires_grad_(True)) for k, v in random_levels(3).items())
    rescaled = OrderedDict((k, (i + 0.5) * v + 7 * i - 2) for i, (k, v) in enumerate(encoded.items()))
    # Equal up to GroupNorm's eps (1e-5 added to the variance).
    torch.testing.assert_close(
        loss_feature_distance(adapted, rescaled), loss_feature_distance(adapted, encoded), rtol=1e-4, atol=0
    )
    # Identical features up to a per-level affine map are at distance (almost) zero.
    assert loss_feature_distance(rescaled, encoded).item() < 1e-8

    loss_feature_distance(adapted, encoded).backward()

    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in adapted.values())
    assert all(v.grad is None for v in encoded.values())


def test_feature_adaption_structure() -> None:
    """A = conv3x3 → ReLU → conv3x3 → ReLU → conv3x3 (no final ReLU), C→C channels, one net shared by all levels."""
    channels = 8
    torch.manual_seed(0)
    adaption = FeatureAdaption(channels)
    leaves = [m for m in adaption.modules() if not list(m.children())]
    assert [type(m) for m in leaves] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Conv2d]
    convs = [m for m in leaves if isinstance(m, nn.Conv2d)]
    for conv in convs:
        assert (conv.in_channels, conv.out_channels) == (channels, channels)
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    # One set of weights for every level: exactly three convs' parameters.
    assert sum(p.numel() for p in adaption.parameters()) == 3 * (channels * channels * 9 + channels)

    levels = OrderedDict((str(i), torch.randn(2, channels, s, s + 1)) for i, s in enumerate((16, 8, 4, 2, 1)))
    out = adaption(levels)

    assert list(out) == list(levels)
    for key, x in levels.items():
        expected = convs[2](F.relu(convs[1](F.relu(convs[0](x)))))
        torch.testing.assert_close(out[key], expected)
    assert any((v < 0).any() for v in out.values()), "the last conv must not be followed by a ReLU"


@pytest.mark.parametrize("stage", ["step1", "step2"])
def test_objectives_own_one_adaption_net_of_fpn_width(tiny_config: Callable[..., Config], stage: str) -> None:
    """Step 1 and Step 2 each hold exactly one (shared) adaption net with the FPN's channel count."""
    detector, encoder = build_parts(tiny_config())
    model = Step1(detector, encoder) if stage == "step1" else step2_of(detector, encoder)
    adaptions = [m for m in model.modules() if isinstance(m, FeatureAdaption)]
    assert len(adaptions) == 1
    convs = [m for m in adaptions[0].modules() if isinstance(m, nn.Conv2d)]
    assert {(c.in_channels, c.out_channels) for c in convs} == {(16, 16)}


# ------------------------------------------------------------------------------------------------ label maps


@pytest.mark.parametrize("with_masks", [False, True], ids=["boxes", "masks"])
def test_label_maps_of_is_compact_render(with_masks: bool) -> None:
    """Maps hold the present classes only (labels 1..C → channels 0..C-1) and equal the dense render indexed by them."""
    num_classes = 5
    images = ImageList(torch.zeros(2, 3, 48, 56, dtype=torch.float64), [(48, 56), (40, 50)])
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 26.0], [20.0, 10.0, 50.0, 44.0]]), torch.tensor([[2.0, 2.0, 40.0, 36.0]])]
    labels = [torch.tensor([2, 5]), torch.tensor([5])]
    masks = [torch.ones(2, 48, 56, dtype=torch.uint8), torch.ones(1, 40, 50, dtype=torch.uint8)]
    masks[0][0, :, :18] = 0  # left part of the first instance is not object
    masks[1][0, 20:, :] = 0  # lower part of the last instance is not object
    targets = [{"boxes": b, "labels": lab, "masks": m} for b, lab, m in zip(boxes, labels, masks)]

    maps, classes = label_maps_of(images, targets, num_classes, box_jitter=False, with_masks=with_masks)

    assert classes.tolist() == [1, 4]
    assert maps.shape == (2, 2, 48, 56) and maps.dtype == torch.float64
    dense = render_label_maps(
        boxes, [lab - 1 for lab in labels], num_classes, 48, 56, masks=masks if with_masks else None, dtype=torch.float64
    )
    torch.testing.assert_close(maps, dense[:, classes], rtol=0, atol=0)
    # Values at box centres, independent of the renderer: 1 at the centre, unless the mask removes it.
    assert maps[0, 0, 16, 17].item() == (0.0 if with_masks else 1.0)  # centre (17, 16) of the class-2 box
    assert maps[0, 1, 27, 35].item() == 1.0  # centre (35, 27) of the class-5 box of image 0
    assert maps[1, 1, 19, 21].item() == 1.0  # centre (21, 19) of the class-5 box of image 1
    if with_masks:
        assert not maps[0, 0, :, :18].any() and not maps[1, 1, 20:].any()
    else:
        assert maps[0, 0, 16, 10].item() > 0.5 and maps[1, 1, 25, 21].item() > 0.5


def test_label_maps_of_jitter_only_scales_boxes_down() -> None:
    """Step-1 box jitter multiplies each box by a factor in [0, 1]: never above the plain map, same channels."""
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    boxes = torch.tensor([[float(4 * i), float(3 * i), float(4 * i + 20), float(3 * i + 24)] for i in range(10)])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2] * 5)}]
    plain, classes = label_maps_of(images, targets, 2, box_jitter=False, with_masks=False)
    torch.manual_seed(0)
    jittered, jitter_classes = label_maps_of(images, targets, 2, box_jitter=True, with_masks=False)
    assert torch.equal(classes, jitter_classes)
    assert (jittered <= plain + 1e-6).all()
    assert not torch.equal(jittered, plain)


# -------------------------------------------------------------------------------------------- Step-1 losses


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_step1_loss_names(tiny_config: Callable[..., Config], synth_root: Path, family: str) -> None:
    """Step 1 returns the detector's own losses, reconstruction_<name> for each, and feature_distance."""
    cfg = tiny_config(family)
    detector, encoder = build_parts(cfg)
    images, targets = synth_batch(synth_root, with_masks=family_of(detector).with_masks)
    detector.train()
    with torch.no_grad():
        own = set(detector(images, targets))
    model = Step1(detector, encoder, box_jitter=False).train()

    with torch.no_grad():
        losses = model(images, targets)

    assert set(losses) == own | {f"reconstruction_{k}" for k in own} | {"feature_distance"}
    assert all(v.shape == () and torch.isfinite(v) for v in losses.values())
    if family == "mask_rcnn":
        assert {"loss_mask", "reconstruction_loss_mask"} <= set(losses)


def test_step1_loss_weights_scale_each_term(tiny_config: Callable[..., Config], synth_root: Path) -> None:
    """reconstruction, detection and distance weights multiply exactly their own terms."""
    detector, encoder = build_parts(tiny_config())
    images, targets = synth_batch(synth_root, with_masks=False)
    model = Step1(detector, encoder, box_jitter=False).train()
    with torch.no_grad():
        unit = model(images, targets)
        model.loss_weights.update(reconstruction=2.0, detection=3.0, distance=0.5)
        weighted = model(images, targets)
    assert set(weighted) == set(unit)
    for name, value in unit.items():
        factor = 0.5 if name == "feature_distance" else 2.0 if name.startswith("reconstruction_") else 3.0
        torch.testing.assert_close(weighted[name], factor * value)


@pytest.mark.parametrize("stage", ["step1", "step2"])
@pytest.mark.parametrize("how", ["constructor", "schedule"])
def test_zero_distance_weight_removes_feature_distance(
    tiny_config: Callable[..., Config], synth_root: Path, stage: str, how: str
) -> None:
    """A zero distance weight (given, or set by the weight schedule) drops feature_distance and leaves A untouched."""
    detector, encoder = build_parts(tiny_config())
    images, targets = synth_batch(synth_root, with_masks=False)
    weight = 0.0 if how == "constructor" else 1.0
    model = Step1(detector, encoder, distance_weight=weight) if stage == "step1" else step2_of(detector, encoder, weight)
    if how == "schedule":
        model.loss_weights["distance"] = 0.0  # what the LossWeights hook does in warm-up / after the cut-off
    model.train()

    losses = model(images, targets)
    sum(losses.values()).backward()

    assert "feature_distance" not in losses
    assert all(p.grad is None for p in model.adaption.parameters())  # no weight decay on A while L3 is off
    assert some_gradient(detector.backbone)


# ----------------------------------------------------------------------------------- gradient isolation


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn"])
def test_step1_gradient_isolation(tiny_config: Callable[..., Config], synth_root: Path, family: str) -> None:
    """L3 reaches f and A but never h; L1 reaches h and d but never f; L2 reaches f and d but never h."""
    detector, encoder = build_parts(tiny_config(family))
    images, targets = synth_batch(synth_root, with_masks=False)
    model = Step1(detector, encoder).train()
    heads = head_modules(detector)
    losses = model(images, targets)
    reconstruction = sum(v for k, v in losses.items() if k.startswith("reconstruction_"))
    detection = sum(v for k, v in losses.items() if k != "feature_distance" and not k.startswith("reconstruction_"))

    backward_of(model, losses["feature_distance"])
    assert no_gradient(encoder)
    assert some_gradient(detector.backbone.body) and some_gradient(detector.backbone.fpn)
    assert some_gradient(model.adaption)
    assert no_gradient(heads)

    backward_of(model, reconstruction)
    assert some_gradient(encoder.body) and some_gradient(encoder.fpn)
    assert some_gradient(heads)
    assert no_gradient(detector.backbone)
    assert no_gradient(model.adaption)

    backward_of(model, detection)
    assert no_gradient(encoder)
    assert some_gradient(detector.backbone.body) and some_gradient(heads)


def test_step2_encoder_frozen_through_training(tiny_config: Callable[..., Config], synth_root: Path) -> None:
    """In Step 2, h has requires_grad False, stays in eval mode, gets no gradient and is bit-identical after steps."""
    detector, encoder = build_parts(tiny_config())
    images, targets = synth_batch(synth_root, with_masks=False)
    model = step2_of(detector, encoder)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    backbone_before = [p.detach().clone() for p in detector.backbone.parameters()]
    adaption_before = [p.detach().clone() for p in model.adaption.parameters()]
    # All parameters, h's included, with weight decay: a frozen h must not move even when handed to the optimizer.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)

    assert all(not p.requires_grad for p in encoder.parameters())
    for _ in range(3):
        model.train()
        assert detector.training and model.adaption.training
        assert not any(m.training for m in encoder.modules())
        losses = model(images, targets)
        assert "feature_distance" in losses and torch.isfinite(losses["feature_distance"])
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        assert all(p.grad is None for p in encoder.parameters())
        optimizer.step()

    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in encoder.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(backbone_before, detector.backbone.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(adaption_before, model.adaption.parameters()))
    assert not has_hooks(model)


@pytest.mark.parametrize("stage", ["step1", "step2"])
@pytest.mark.parametrize("family", ["retinanet", "mask_rcnn"])
def test_encoder_input_is_label_map_of_transformed_batch(
    tiny_config: Callable[..., Config], synth_root: Path, stage: str, family: str
) -> None:
    """h sees the compact label map of the resized batch; for Mask R-CNN it is mask-aware (0 outside the instances)."""
    detector, encoder = build_parts(tiny_config(family))
    images, targets = synth_batch(synth_root, with_masks=True)
    model = (Step1(detector, encoder, box_jitter=False) if stage == "step1" else step2_of(detector, encoder)).train()
    seen: list[tuple[Tensor, Tensor]] = []
    handle = encoder.register_forward_pre_hook(lambda module, args: seen.append((args[0].detach(), args[1])))
    try:
        with torch.no_grad():
            model(images, targets)
    finally:
        handle.remove()
    image_list, resized = detector.transform(images, [{k: v.clone() for k, v in t.items()} for t in targets])
    with_masks = family == "mask_rcnn"
    expected, expected_classes = label_maps_of(image_list, resized, NUM_CLASSES, False, with_masks)

    assert len(seen) == 1
    maps, classes = seen[0]
    assert classes.tolist() == expected_classes.tolist() == [1, 2]  # labels 2 and 3 present, class 1 absent
    torch.testing.assert_close(maps, expected, rtol=0, atol=0)
    box_only, _ = label_maps_of(image_list, resized, NUM_CLASSES, False, with_masks=False)
    if with_masks:
        assert not torch.equal(maps, box_only)
        for i, target in enumerate(resized):
            for k, c in enumerate(classes.tolist()):
                instances = target["masks"][target["labels"] == c + 1]
                covered = torch.zeros(maps.shape[-2:], dtype=torch.bool)
                if len(instances):
                    h, w = instances.shape[-2:]
                    covered[:h, :w] = instances.bool().any(0)
                assert not maps[i, k][~covered].any()
    else:
        torch.testing.assert_close(maps, box_only, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- zero inference cost


def test_step2_final_weights_are_a_plain_detector(tiny_config: Callable[..., Config], tmp_path: Path) -> None:
    """Step 2's model_final.pth loads strictly into the plain detector: same keys, same size, same predictions."""
    cfg1 = tiny_config(train={"base_iters": 2}, output_dir=str(tmp_path / "step1"))
    cfg2 = tiny_config(train={"base_iters": 2}, output_dir=str(tmp_path / "step2"))
    step1 = runner.train(cfg1, "step1")
    assert step1.outputs["label_encoder"].is_file()
    step2 = runner.train(cfg2, "step2", {"label_encoder": str(step1.outputs["label_encoder"])})

    final = load_file(step2.weights, kind="weights")
    assert final["kind"] == "detector"
    torch.manual_seed(123)
    baseline = build_detector(cfg2.model, NUM_CLASSES)
    assert set(final["model"]) == set(baseline.state_dict())
    assert sum(v.numel() for v in final["model"].values()) == sum(v.numel() for v in baseline.state_dict().values())
    loaded = build_detector(cfg2.model, NUM_CLASSES)
    loaded.load_state_dict(final["model"], strict=True)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in baseline.parameters())
    assert not has_hooks(loaded)

    # The training object (Step2 wrapper: detector + frozen h + A), restored from the last checkpoint of the run.
    artifact = load_label_encoder(step1.outputs["label_encoder"])
    trained = Step2(build_detector(cfg2.model, NUM_CLASSES), LabelEncoderTarget(build_label_encoder(artifact["meta"])))
    checkpoint = load_file(latest_checkpoint(cfg2.output_dir))
    assert checkpoint["iteration"] == cfg2.train.max_iters
    trained.load_state_dict(checkpoint["model"], strict=True)
    assert any(k.startswith("target.encoder.") for k in checkpoint["model"])
    assert any(k.startswith("adaption.") for k in checkpoint["model"])
    detector_part = {k[len("detector."):]: v for k, v in checkpoint["model"].items() if k.startswith("detector.")}
    assert set(detector_part) == set(final["model"])
    assert all(torch.equal(detector_part[k], final["model"][k]) for k in detector_part)
    # h was not changed by Step 2.
    assert all(torch.equal(checkpoint["model"][f"target.encoder.{k}"], v) for k, v in artifact["encoder"].items())

    dataset = CocoDetection(cfg2.data.val.annotations, cfg2.data.val.images)
    images, _ = collate([dataset[i] for i in range(4)])
    outputs = []
    for detector in (loaded, trained.detector):
        detector.eval()
        detector.score_thresh = 0.0  # keep every candidate so the comparison is not vacuous
        with torch.no_grad():
            outputs.append(detector(images))
    assert sum(len(o["boxes"]) for o in outputs[0]) > 0
    for ours, theirs in zip(*outputs):
        assert set(ours) == set(theirs) == {"boxes", "scores", "labels"}
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
