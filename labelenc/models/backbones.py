"""Backbone + FPN construction for torchvision detectors, with local-only pretrained weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import get_model, get_model_weights
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _mobilenet_extractor,
    _resnet_fpn_extractor,
)
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.misc import FrozenBatchNorm2d

from labelenc.errors import UserError


class WeightsError(UserError, RuntimeError):
    """Pretrained weights that cannot be found or loaded; the message says what to do."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` with ``weights_only=True`` (a file is never executed)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise WeightsError(f"cannot read weights file {path}: {err}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return state


def resolve_backbone_weights(backbone: str, spec: str) -> dict[str, torch.Tensor]:
    """Return the classification-network state dict named by ``spec``: a file path or a torchvision weights name.

    Names are looked up in the local torch hub cache only; nothing is downloaded.
    """
    if Path(spec).suffix in {".pth", ".pt", ".bin"} or Path(spec).exists():
        return load_state_dict_file(spec)
    enum = get_model_weights(backbone)
    try:
        weights = enum[spec.split(".")[-1]]
    except KeyError:
        allowed = ", ".join(w.name for w in enum)
        raise WeightsError(
            f"model.backbone_weights={spec!r}: not a file and not a weights name of {backbone} ({allowed})"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        raise WeightsError(
            f"model.backbone_weights={spec!r}: {cached} is not in the local torch cache and this tool never downloads. "
            f"Fetch {weights.url} on a machine with internet access and pass the file path instead."
        )
    return load_state_dict_file(cached)


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: how its classification net becomes a C2..C5 extractor, and its limits."""

    extractor: Callable[[nn.Module, int, list[int], ExtraFPNBlock], BackboneWithFPN]
    max_trainable_layers: int  # torchvision's trainable_layers maximum for this network
    default_trainable_layers: int  # with pretrained weights (random init trains every layer)
    classifier_prefix: str  # state-dict prefix of the classification head, dropped from ImageNet weights


def _mobilenet_v3_extractor(
    net: nn.Module, layers: int, returned_layers: list[int], extra: ExtraFPNBlock
) -> BackboneWithFPN:
    # MobileNetV3 stages 1..5 sit at strides 4, 8, 16, 32, 32; use the last (widest) one as C5.
    stage_of_level = {1: 1, 2: 2, 3: 3, 4: 5}
    return _mobilenet_extractor(net, True, layers, [stage_of_level[k] for k in returned_layers], extra)


_RESNET = BackboneSpec(_resnet_fpn_extractor, 5, 3, "fc.")
BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": _RESNET,
    "resnet34": _RESNET,
    "resnet50": _RESNET,
    "resnet101": _RESNET,
    "mobilenet_v3_large": BackboneSpec(_mobilenet_v3_extractor, 6, 3, "classifier."),
}


def build_backbone(
    name: str,
    weights: str | None,
    trainable_layers: int | None,
    returned_layers: list[int],
    fpn_channels: int,
    extra_blocks: Callable[[int], ExtraFPNBlock],
) -> BackboneWithFPN:
    """Body ``name`` (a key of :data:`BACKBONES`) with an FPN of ``fpn_channels`` channels on C2..C5 (``returned_layers``
    in 1..4).

    As in torchvision: BatchNorm from random init, FrozenBatchNorm with pretrained weights; the first layers are
    frozen only for pretrained weights (``trainable_layers`` None: the backbone's default, all from random init).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    pretrained = weights is not None
    norm = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    net = get_model(name, weights=None, norm_layer=norm)
    if pretrained:
        state = resolve_backbone_weights(name, weights)
        head_prefix = spec.classifier_prefix
        state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
        result = net.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(head_prefix)]
        if missing or result.unexpected_keys:
            raise WeightsError(
                f"backbone weights {weights!r} do not fit {name}: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
    if trainable_layers is None:
        trainable_layers = spec.default_trainable_layers if pretrained else spec.max_trainable_layers
    elif trainable_layers > spec.max_trainable_layers:
        raise ValueError(f"model.trainable_layers={trainable_layers} is above {name}'s maximum of "
                         f"{spec.max_trainable_layers}")
    body = spec.extractor(net, trainable_layers, returned_layers, extra_blocks(256))
    if fpn_channels != 256:  # torchvision's extractors fix 256 FPN channels
        in_channels = [block[0].in_channels for block in body.fpn.inner_blocks]
        body.fpn = FeaturePyramidNetwork(in_channels, fpn_channels, extra_blocks=extra_blocks(fpn_channels))
        body.out_channels = fpn_channels
    return body
