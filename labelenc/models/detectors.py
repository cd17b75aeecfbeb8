"""torchvision detectors built from a config, and the one adapter call LabelEnc needs: head losses on any features.

Every family keeps torchvision's conventions: labels 1..C with 0 reserved for background, so the model is built
with ``num_classes = C + 1`` (as torchvision's own COCO detectors); training returns a loss dict, evaluation a list
of ``{"boxes", "scores", "labels"[, "masks"]}`` per image in input-image coordinates.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Callable

from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from labelenc.config import ModelConfig
from labelenc.models.backbones import build_backbone


@dataclass(frozen=True)
class Family:
    """What differs between detector families: pyramid levels, FPN extra block, head modules."""

    detector: type[nn.Module]
    returned_layers: tuple[int, ...]  # C2..C5 as 1..4, as torchvision's FPN extractors count them
    extra_blocks: Callable[[int], ExtraFPNBlock]
    head_modules: tuple[str, ...]  # attribute names of the detection head(s) on the model
    with_masks: bool = False
    num_levels: int = 5  # pyramid levels the head sees: P3-P7 (one-stage) or P2-P6 (R-CNN)


FAMILIES: dict[str, Family] = {
    "retinanet": Family(RetinaNet, (2, 3, 4), lambda c: LastLevelP6P7(c, c), ("head",)),
    "fcos": Family(FCOS, (2, 3, 4), lambda c: LastLevelP6P7(c, c), ("head",)),
    "faster_rcnn": Family(FasterRCNN, (1, 2, 3, 4), lambda c: LastLevelMaxPool(), ("rpn", "roi_heads")),
    "mask_rcnn": Family(MaskRCNN, (1, 2, 3, 4), lambda c: LastLevelMaxPool(), ("rpn", "roi_heads"), True),
}


def build_detector(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build the torchvision detector of ``cfg.family`` for ``num_classes`` object classes (background excluded)."""
    family = FAMILIES[cfg.family]
    backbone = build_backbone(
        cfg.backbone,
        cfg.backbone_weights,
        cfg.trainable_layers,
        list(family.returned_layers),
        cfg.fpn_channels,
        family.extra_blocks,
    )
    kwargs: dict = dict(min_size=cfg.min_size, max_size=cfg.max_size)
    levels = family.num_levels
    if cfg.anchor_sizes is not None:
        if len(cfg.anchor_sizes) != levels:
            raise ValueError(f"model.anchor_sizes needs {levels} sizes for {cfg.family}, got {len(cfg.anchor_sizes)}")
        if cfg.family == "retinanet":  # torchvision's RetinaNet default: 3 octave scales per level
            sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in cfg.anchor_sizes)
        else:
            sizes = tuple((s,) for s in cfg.anchor_sizes)
        kwargs["rpn_anchor_generator" if family.head_modules[0] == "rpn" else "anchor_generator"] = AnchorGenerator(
            sizes, ((0.5, 1.0, 2.0),) * levels
        )
    if family.head_modules[0] == "rpn":
        kwargs["box_detections_per_img"] = cfg.detections_per_image
    else:
        kwargs["detections_per_img"] = cfg.detections_per_image
    return family.detector(backbone, num_classes=num_classes + 1, **kwargs)


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` of a torchvision detector instance."""
    for family in (FAMILIES["mask_rcnn"], FAMILIES["faster_rcnn"], FAMILIES["retinanet"], FAMILIES["fcos"]):
        if isinstance(model, family.detector):
            return family
    raise TypeError(f"unsupported detector type {type(model).__name__}; expected RetinaNet, FCOS, Faster/Mask R-CNN")


def head_losses(
    model: nn.Module, images: ImageList, features: OrderedDict[str, Tensor], targets: list[dict[str, Tensor]]
) -> dict[str, Tensor]:
    """The detector's own training losses of its head(s) applied to ``features`` (backbone output or h(y)).

    ``images`` and ``targets`` are the output of ``model.transform``; matching, sampling and losses are
    torchvision's, called exactly as the model's own ``forward`` calls them.
    """
    if isinstance(model, GeneralizedRCNN):
        proposals, rpn_losses = model.rpn(images, features, targets)
        _, roi_losses = model.roi_heads(features, proposals, images.image_sizes, targets)
        return {**rpn_losses, **roi_losses}
    levels = list(features.values())
    head_outputs = model.head(levels)
    anchors = model.anchor_generator(images, levels)
    if isinstance(model, FCOS):
        return model.compute_loss(targets, head_outputs, anchors, [x.size(2) * x.size(3) for x in levels])
    if isinstance(model, RetinaNet):
        return model.compute_loss(targets, head_outputs, anchors)
    raise TypeError(f"unsupported detector type {type(model).__name__}")
