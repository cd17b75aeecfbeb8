"""Backbone + FPN construction for torchvision detectors, with pretrained weights from a file or torchvision."""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

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
from labelenc.models.dcn import ModulatedDeformConv2d

logger = logging.getLogger(__name__)

OFFLINE_ENV = "LABELENC_OFFLINE"  # set (to anything but 0 / false / no / off): never download weights
DOWNLOAD_TIMEOUT = 10.0  # s: to reach the weights' server, and for any one read of a download to stall


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


def offline() -> bool:
    """Whether ``LABELENC_OFFLINE`` forbids downloads (any value but empty, 0, false, no, off)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def torch_cache_file(url: str) -> Path:
    """Where torch.hub keeps the file of ``url``: ``<torch.hub.get_dir()>/checkpoints/<name>`` (honours
    ``TORCH_HOME``), the place torchvision's ``weights.get_state_dict`` reads and downloads to."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _unreachable(url: str, timeout: float) -> str | None:
    """Why no connection to ``url``'s server (or the proxy urllib would use) opens within ``timeout``; None if one does.

    Runs in a daemon thread joined with a timeout, so that a name lookup that hangs (which no socket timeout
    bounds) cannot hang the caller.
    """
    parts = urlparse(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or "", proxy_parts.port or 80
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"cannot connect to {host}:{port}: {err.strerror or str(err) or type(err).__name__}")

    thread = threading.Thread(target=connect, name="labelenc-weights-connect", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {timeout:g} s"


def resolve_backbone_weights(backbone: str, spec: str, download: bool = True) -> dict[str, torch.Tensor]:
    """Return the classification-network state dict named by ``spec``: a file path or a torchvision weights name.

    A name (e.g. ``IMAGENET1K_V1``, any weights of the torchvision network that ``backbone``, a key of
    :data:`BACKBONES`, is built from) is read from the torch cache (see
    :func:`torch_cache_file`); when the cache lacks it, torchvision downloads it there (``weights.get_state_dict``,
    hash checked), as for any torchvision user, unless ``download`` is False or ``LABELENC_OFFLINE`` is set. A
    download that is off or cannot happen (no network: found out within :data:`DOWNLOAD_TIMEOUT` seconds) is one
    :class:`WeightsError` naming the URL to fetch and the cache file to put it in.
    """
    if Path(spec).suffix in {".pth", ".pt", ".bin"} or Path(spec).exists():
        return load_state_dict_file(spec)
    enum = get_model_weights(BACKBONES[backbone].net)
    try:
        weights = enum[spec.split(".")[-1]]
    except KeyError:
        allowed = ", ".join(w.name for w in enum)
        raise WeightsError(
            f"model.backbone_weights={spec!r}: not a file and not a weights name of {backbone} ({allowed})"
        ) from None
    cached = torch_cache_file(weights.url)
    if cached.is_file():
        return load_state_dict_file(cached)
    fetch = (f"Fetch {weights.url} on a machine with internet access and put it at {cached} (the torch cache; "
             "TORCH_HOME moves it), or give a file's path as model.backbone_weights.")
    if not download or offline():
        off = "model.download is false" if not download else f"{OFFLINE_ENV}={os.environ[OFFLINE_ENV]}"
        raise WeightsError(f"model.backbone_weights={spec!r}: {cached} is not in the torch cache and downloading "
                           f"is off ({off}). {fetch}")
    reason = _unreachable(weights.url, DOWNLOAD_TIMEOUT)
    if reason is None:
        logger.info("downloading %s to %s", weights.url, cached)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # urllib's urlopen in torch.hub takes no timeout of its own
        try:
            state = weights.get_state_dict(progress=True, check_hash=True, map_location="cpu", weights_only=True)
        except Exception as err:  # URLError, timeouts, a hash mismatch (RuntimeError), an unreadable file
            cause = getattr(err, "reason", None) or err
            reason = (f"timed out: no data for {DOWNLOAD_TIMEOUT:g} s" if isinstance(cause, TimeoutError)
                      else str(cause) or type(cause).__name__)
        else:
            if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
                return state
            reason = "the downloaded file does not hold a state dict of tensors"
        finally:
            socket.setdefaulttimeout(previous)
    raise WeightsError(f"model.backbone_weights={spec!r}: {cached} is not in the torch cache and cannot be "
                       f"downloaded ({reason}). {fetch}")


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: the torchvision classification net it is built from, how that net becomes a C2..C5 extractor,
    and its limits."""

    net: str  # torchvision's name of the classification network (get_model); its weights names are the backbone's
    extractor: Callable[[nn.Module, int, list[int], ExtraFPNBlock], BackboneWithFPN]
    max_trainable_layers: int  # torchvision's trainable_layers maximum for this network
    default_trainable_layers: int  # with pretrained weights (random init trains every layer)
    classifier_prefix: str  # state-dict prefix of the classification head, dropped from ImageNet weights
    convert: Callable[[nn.Module], None] | None = None  # changes made to ``net`` in place before its weights load;
    # the state-dict entries it adds may be missing from the weights (they keep their initialisation)


def _mobilenet_v3_extractor(
    net: nn.Module, layers: int, returned_layers: list[int], extra: ExtraFPNBlock
) -> BackboneWithFPN:
    # MobileNetV3 stages 1..5 sit at strides 4, 8, 16, 32, 32; use the last (widest) one as C5.
    stage_of_level = {1: 1, 2: 2, 3: 3, 4: 5}
    return _mobilenet_extractor(net, True, layers, [stage_of_level[k] for k in returned_layers], extra)


# MobileNetV2's features: 0 the stem (stride 2), then inverted-residual blocks 1 (stride 2), 2-3 (4), 4-6 (8),
# 7-13 (16), 14-17 (32), then 18, a 1x1 conv to 1280 channels. C2..C5 are the last block at each stride, 3, 6, 13
# and 17 (24, 32, 96, 320 channels), as in the MobileNetV2 of FCOS / maskrcnn-benchmark, the authors' code base:
# torchvision's _mobilenet_extractor would return the first block at each stride instead (C4 = block 7, after one
# block at stride 16), and C5 = the 1280-channel conv only widens the FPN's lateral convolution.
_MOBILENET_V2_LEVELS = (3, 6, 13, 17)
_MOBILENET_V2_STAGES = (0, 2, 4, 7, 14)  # first block of the stem stage and of the stride-4..32 stages


def _mobilenet_v2_extractor(
    net: nn.Module, layers: int, returned_layers: list[int], extra: ExtraFPNBlock
) -> BackboneWithFPN:
    # Trainable layers count stages from the top, as for ResNet: 3 trains the stride-8..32 stages (C3..C5).
    features = net.features
    frozen_until = len(features) if layers == 0 else _MOBILENET_V2_STAGES[len(_MOBILENET_V2_STAGES) - layers]
    features[:frozen_until].requires_grad_(False)
    levels = [_MOBILENET_V2_LEVELS[k - 1] for k in returned_layers]
    return BackboneWithFPN(features, {str(index): str(i) for i, index in enumerate(levels)},
                           [features[index].out_channels for index in levels], 256, extra_blocks=extra)


def _deformable_resnet(net: nn.Module) -> None:
    """Make the 3x3 convolution (``conv2``) of every block of layer2..layer4 a modulated deformable one (DCNv2)
    that keeps its weight, as the authors' R-101-DCN (maskrcnn-benchmark's ``STAGE_WITH_DCN`` on stages 3..5)."""
    for layer in (net.layer2, net.layer3, net.layer4):
        for block in layer:
            block.conv2 = ModulatedDeformConv2d.from_conv(block.conv2)


_resnet = partial(BackboneSpec, extractor=_resnet_fpn_extractor, max_trainable_layers=5, default_trainable_layers=3,
                  classifier_prefix="fc.")
BACKBONES: dict[str, BackboneSpec] = {
    **{net: _resnet(net) for net in ("resnet18", "resnet34", "resnet50", "resnet101")},
    **{f"{net}_dcn": _resnet(net, convert=_deformable_resnet) for net in ("resnet50", "resnet101")},
    "mobilenet_v2": BackboneSpec("mobilenet_v2", _mobilenet_v2_extractor, 5, 3, "classifier."),
    "mobilenet_v3_large": BackboneSpec("mobilenet_v3_large", _mobilenet_v3_extractor, 6, 3, "classifier."),
}


def build_backbone(
    name: str,
    weights: str | None,
    trainable_layers: int | None,
    returned_layers: list[int],
    fpn_channels: int,
    extra_blocks: Callable[[int, int | None], ExtraFPNBlock],
    download: bool = True,
    frozen_bn: bool | None = None,
    p6_from: Literal["p5", "c5"] = "p5",
) -> BackboneWithFPN:
    """Body ``name`` (a key of :data:`BACKBONES`) with an FPN of ``fpn_channels`` channels on C2..C5 (``returned_layers``
    in 1..4).

    As in torchvision: BatchNorm from random init, FrozenBatchNorm with pretrained weights (``frozen_bn`` None; True
    or False forces one); the first layers are frozen only for pretrained weights (``trainable_layers`` None: the
    backbone's default, all from random init). ``weights`` is resolved by :func:`resolve_backbone_weights`
    (``download``: whether a name may be downloaded). ``extra_blocks(channels, c5_channels)`` makes the FPN's extra
    block; ``c5_channels`` is C5's channel count with ``p6_from="c5"`` (P6 computed from C5), None for P5.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    pretrained = weights is not None
    norm = FrozenBatchNorm2d if (pretrained if frozen_bn is None else frozen_bn) else nn.BatchNorm2d
    net = get_model(spec.net, weights=None, norm_layer=norm)
    keys = set(net.state_dict())
    if spec.convert is not None:
        spec.convert(net)
    if pretrained:
        state = resolve_backbone_weights(name, weights, download)
        head_prefix = spec.classifier_prefix
        state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
        result = net.load_state_dict(state, strict=False)
        added = set(net.state_dict()) - keys  # by spec.convert: weights of the plain network lack them
        missing = [k for k in result.missing_keys if not k.startswith(head_prefix) and k not in added]
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
    body = spec.extractor(net, trainable_layers, returned_layers, extra_blocks(256, None))
    in_channels = [block[0].in_channels for block in body.fpn.inner_blocks]
    c5_channels = in_channels[-1] if p6_from == "c5" else None
    if fpn_channels != 256 or c5_channels is not None:  # the extractors fix 256 FPN channels and P6 from P5
        body.fpn = FeaturePyramidNetwork(in_channels, fpn_channels,
                                         extra_blocks=extra_blocks(fpn_channels, c5_channels))
        body.out_channels = fpn_channels
    return body
