"""torchvision detectors built from a config, one small adapter per family.

An adapter (:class:`DetectorFamily`) owns everything that differs between families: the head modules, how the
family's own losses are computed on any feature dict (:meth:`~DetectorFamily.head_losses`), the pyramid levels,
the FPN extra block, the anchor settings and the head normalisations it can build (``model.head_norm``). Adding
a family is one new registered adapter; nothing else in the package asks which family a detector is.

Every family keeps torchvision's conventions: labels 1..C with 0 reserved for background, so the model is built
with ``num_classes = C + 1`` (as torchvision's own COCO detectors); training returns a loss dict, evaluation a list
of ``{"boxes", "scores", "labels"[, "masks"]}`` per image in input-image coordinates.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from functools import cache, partial
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead, _default_anchorgen
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from labelenc.models.backbones import build_backbone

if TYPE_CHECKING:
    from labelenc.config import ModelConfig

Features = OrderedDict[str, Tensor]
FAMILIES: dict[str, DetectorFamily] = {}
HEAD_NORMS = ("none", "group")  # model.head_norm: plain convolutions, or GroupNorm(GROUP_NORM_GROUPS) after each
GROUP_NORM_GROUPS = 32  # torchvision's GroupNorm heads (FCOS, retinanet_resnet50_fpn_v2) use GroupNorm(32, channels)


def register_family(family: type[DetectorFamily]) -> type[DetectorFamily]:
    """Class decorator: add one instance of an adapter to :data:`FAMILIES` under its ``name``."""
    FAMILIES[family.name] = family()
    return family


class DetectorFamily:
    """What LabelEnc needs to know about one torchvision detector family."""

    name: str
    detector: type[nn.Module]
    returned_layers: tuple[int, ...]  # C2..C5 as 1..4, as torchvision's FPN extractors count them
    head_modules: tuple[str, ...]  # attribute names of the detection head(s): what Step 1 hands to Step 2
    with_masks: bool = False
    num_levels: int = 5  # pyramid levels the head sees: P3-P7 (one-stage) or P2-P6 (R-CNN)
    head_norms: tuple[str, ...] = ("none",)  # model.head_norm values it can build; the first is torchvision's default
    anchor_generator_arg: str | None = "anchor_generator"  # None: the family takes no anchor sizes
    detections_arg: str = "detections_per_img"
    p6_sources: tuple[str, ...] = ("p5",)  # what the FPN's P6 may be computed from (model.p6_from)

    def extra_blocks(self, channels: int, c5_channels: int | None = None) -> ExtraFPNBlock:
        """The FPN's extra block on ``channels``-channel levels (also used on top of the label encoder h).

        ``c5_channels``: P6 is computed from C5, which has that many channels (``model.p6_from: c5``, only for a
        family whose :attr:`p6_sources` has "c5"); None: from P5.
        """
        raise NotImplementedError

    def anchor_scales(self, size: int) -> tuple[int, ...]:
        """Anchor sizes of one level from its base size (one scale by default)."""
        return (size,)

    def own_fields(self) -> dict[str, str]:
        """Constructor keywords that other model fields set, with the field that sets each."""
        return {"min_size": "model.min_size", "max_size": "model.max_size",
                self.detections_arg: "model.detections_per_image"}

    def constructor_settings(self) -> dict[str, bool | int | float]:
        """The keywords of torchvision's detector constructor that ``model.detector_kwargs`` may set, with their
        defaults: those with a number or bool default, less :meth:`own_fields`."""
        return {name: default for name, default in _numeric_keywords(self.detector).items()
                if name not in self.own_fields()}

    def head_norm(self, cfg: ModelConfig) -> str:
        """The head normalisation that ``cfg`` builds: ``model.head_norm``, or torchvision's default when unset."""
        return cfg.head_norm if cfg.head_norm is not None else self.head_norms[0]

    def fpn_channels_multiple(self, cfg: ModelConfig) -> int:
        """The FPN width must be a multiple of this: the group count of a GroupNorm head, otherwise 1."""
        return GROUP_NORM_GROUPS if self.head_norm(cfg) == "group" else 1

    def build_head(
        self, cfg: ModelConfig, channels: int, num_classes: int, anchor_generator: AnchorGenerator | None
    ) -> nn.Module | None:
        """The head module to pass to the detector, or None for the one torchvision builds by default.

        ``num_classes`` includes the background; ``anchor_generator`` is the one passed to the detector (None:
        torchvision's default). A family that lists more than its default in :attr:`head_norms` overrides this
        (:meth:`config_errors`, checked first, refuses any other value).
        """
        return None

    def config_errors(self, cfg: ModelConfig) -> list[str]:
        """What in a model config this family cannot build with, one message per problem."""
        errors = []
        if cfg.head_norm is not None and cfg.head_norm not in self.head_norms:
            errors.append(f"model.head_norm={cfg.head_norm!r} does not apply to {self.name} (allowed: "
                          f"{', '.join(self.head_norms)}; unset means {self.head_norms[0]!r}, torchvision's head)")
        if cfg.anchor_sizes is not None and self.anchor_generator_arg is None:
            errors.append(f"model.anchor_sizes does not apply to {self.name} (its points follow the FPN strides)")
        elif cfg.anchor_sizes is not None and len(cfg.anchor_sizes) != self.num_levels:
            errors.append(f"model.anchor_sizes needs {self.num_levels} sizes (one per pyramid level), "
                          f"got {len(cfg.anchor_sizes)}")
        multiple = self.fpn_channels_multiple(cfg)
        if cfg.fpn_channels % multiple:
            errors.append(f"model.fpn_channels must be a multiple of {multiple} for {self.name} with head_norm "
                          f"{self.head_norm(cfg)!r} (its head uses GroupNorm({multiple}))")
        errors += self._detector_kwargs_errors(cfg.detector_kwargs)
        if cfg.p6_from not in self.p6_sources:
            errors.append(f"model.p6_from={cfg.p6_from!r} does not apply to {self.name} (allowed: "
                          f"{', '.join(self.p6_sources)})")
        return errors

    def _detector_kwargs_errors(self, detector_kwargs: dict[str, bool | int | float]) -> list[str]:
        allowed, own_fields, errors = self.constructor_settings(), self.own_fields(), []
        for name, value in detector_kwargs.items():
            own_field = own_fields.get(name)
            if own_field:
                errors.append(f"model.detector_kwargs.{name}: set it with {own_field}")
            elif name not in allowed:
                errors.append(f"model.detector_kwargs.{name} is not a numeric setting of torchvision's "
                              f"{self.detector.__name__} (allowed: {', '.join(sorted(allowed))})")
            elif type(value) is not type(allowed[name]) and not (type(allowed[name]) is float and type(value) is int):
                kind = {bool: "true or false", int: "an integer", float: "a number"}[type(allowed[name])]
                errors.append(f"model.detector_kwargs.{name} must be {kind} like its default {allowed[name]!r}, "
                              f"got {value!r}")
        return errors

    def build(self, cfg: ModelConfig, num_classes: int) -> nn.Module:
        """The torchvision detector for ``num_classes`` object classes (background excluded)."""
        errors = self.config_errors(cfg)  # a validated ModelConfig has none; a model_copy(update=...) is not checked
        if errors:
            raise ValueError("; ".join(errors))
        backbone = build_backbone(cfg.backbone, cfg.backbone_weights, cfg.trainable_layers,
                                  list(self.returned_layers), cfg.fpn_channels, self.extra_blocks, cfg.download,
                                  cfg.frozen_bn, cfg.p6_from)
        kwargs: dict[str, Any] = {"min_size": cfg.min_size, "max_size": cfg.max_size,
                                  self.detections_arg: cfg.detections_per_image, **cfg.detector_kwargs}
        if cfg.anchor_sizes is not None:
            sizes = tuple(self.anchor_scales(s) for s in cfg.anchor_sizes)
            kwargs[self.anchor_generator_arg] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * self.num_levels)
        anchor_generator = kwargs.get(self.anchor_generator_arg) if self.anchor_generator_arg else None
        head = self.build_head(cfg, backbone.out_channels, num_classes + 1, anchor_generator)
        if head is not None:  # built after the backbone, as the detector builds its default head: the same RNG order
            kwargs["head"] = head
        return self.detector(backbone, num_classes=num_classes + 1, **kwargs)

    def head_losses(
        self, model: nn.Module, images: ImageList, features: Features, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """The family's own training losses of its head(s) on ``features`` (backbone output or h(y)).

        ``images`` and ``targets`` are the output of ``model.transform``; matching, sampling and losses are
        torchvision's, called exactly as the model's own ``forward`` calls them.
        """
        raise NotImplementedError


@cache
def _numeric_keywords(detector: type[nn.Module]) -> dict[str, bool | int | float]:
    """Keyword parameters with a number or bool default of ``detector``'s constructor and the ones it forwards
    ``**kwargs`` to (MaskRCNN to FasterRCNN)."""
    keywords: dict[str, bool | int | float] = {}
    for cls in reversed(detector.__mro__):
        if "__init__" in vars(cls):
            keywords.update({name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                             if type(p.default) in (bool, int, float)})
    return keywords


class _OneStage(DetectorFamily):
    returned_layers = (2, 3, 4)
    head_modules = ("head",)
    p6_sources = ("p5", "c5")  # torchvision's P6 from P5, or the authors' from C5 (their USE_C5)

    def extra_blocks(self, channels: int, c5_channels: int | None = None) -> ExtraFPNBlock:
        block = LastLevelP6P7(channels if c5_channels is None else c5_channels, channels)
        block.use_P5 = c5_channels is None  # torchvision infers it from in == out channels, which C5 may also have
        return block

    def head_outputs(self, model: nn.Module, images: ImageList, features: Features):
        levels = list(features.values())
        return levels, model.head(levels), model.anchor_generator(images, levels)


@register_family
class RetinaNetFamily(_OneStage):
    name, detector = "retinanet", RetinaNet
    head_norms = ("none", "group")  # torchvision's RetinaNet head, or retinanet_resnet50_fpn_v2's GroupNorm head

    def build_head(self, cfg, channels, num_classes, anchor_generator):
        if self.head_norm(cfg) == "none":
            return None
        # As retinanet_resnet50_fpn_v2 builds its head (its GIoU box loss and P6 from C5 are not part of this option).
        anchors = anchor_generator if anchor_generator is not None else _default_anchorgen()
        return RetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, GROUP_NORM_GROUPS))

    def anchor_scales(self, size: int) -> tuple[int, ...]:  # torchvision's default: 3 octave scales per level
        return (size, int(size * 2 ** (1 / 3)), int(size * 2 ** (2 / 3)))

    def head_losses(self, model, images, features, targets):
        _, outputs, anchors = self.head_outputs(model, images, features)
        return model.compute_loss(targets, outputs, anchors)


@register_family
class FCOSFamily(_OneStage):
    name, detector = "fcos", FCOS
    head_norms = ("group",)  # torchvision's FCOS head always has GroupNorm(32)
    anchor_generator_arg = None

    def head_losses(self, model, images, features, targets):
        levels, outputs, anchors = self.head_outputs(model, images, features)
        return model.compute_loss(targets, outputs, anchors, [x.size(2) * x.size(3) for x in levels])


@register_family
class FasterRCNNFamily(DetectorFamily):
    name, detector = "faster_rcnn", FasterRCNN
    head_norms = ("none",)  # torchvision's RPN and RoI heads have no normalisation; model.head_norm cannot change them
    returned_layers = (1, 2, 3, 4)
    head_modules = ("rpn", "roi_heads")
    anchor_generator_arg = "rpn_anchor_generator"
    detections_arg = "box_detections_per_img"

    def extra_blocks(self, channels: int, c5_channels: int | None = None) -> ExtraFPNBlock:
        if c5_channels is not None:
            raise ValueError(f"{self.name}'s P6 is max-pooled from P5; it cannot be computed from C5")
        return LastLevelMaxPool()

    def head_losses(self, model, images, features, targets):
        proposals, rpn_losses = model.rpn(images, features, targets)
        _, roi_losses = model.roi_heads(features, proposals, images.image_sizes, targets)
        return {**rpn_losses, **roi_losses}


@register_family
class MaskRCNNFamily(FasterRCNNFamily):
    name, detector = "mask_rcnn", MaskRCNN
    with_masks = True


def build_detector(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build the torchvision detector of ``cfg.family`` for ``num_classes`` object classes (background excluded)."""
    return FAMILIES[cfg.family].build(cfg, num_classes)


def family_of(model: nn.Module) -> DetectorFamily:
    """The adapter of a torchvision detector instance (its most derived registered class)."""
    for cls in type(model).__mro__:
        for family in FAMILIES.values():
            if family.detector is cls:
                return family
    raise TypeError(f"unsupported detector type {type(model).__name__}; registered: "
                    f"{', '.join(f.detector.__name__ for f in FAMILIES.values())}")


def head_losses(
    model: nn.Module, images: ImageList, features: Features, targets: list[dict[str, Tensor]]
) -> dict[str, Tensor]:
    """The detector's own losses of its head(s) on ``features`` (see :meth:`DetectorFamily.head_losses`)."""
    return family_of(model).head_losses(model, images, features, targets)
