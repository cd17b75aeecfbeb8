"""The label encoding function h of LabelEnc (docs/method.md, "Label encoding function h").

h maps a C-channel label map (C = number of classes) into the detector's feature space (paper, Section 3.2,
Eq. 9). It is a ResNet-like network without any normalisation: a 7x7 stride-2 stem convolution (with bias and no
activation, as in the authors' code), then four bottleneck stages of {1, 2, 2, 1} blocks, each starting with
stride 2, giving C2..C5 at strides 4..32. On top sits a plain torchvision ``FeaturePyramidNetwork`` built like the
detector's (same returned levels, same extra block), so h(y) has the detector backbone's keys and shapes and its
FPN weights can initialise the detector's FPN in Step 2. How h's body is initialised is one of :data:`H_INITS`.
"""

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

__all__ = ["H_INITS", "LabelEncoder", "level_channels"]

_STEM_CHANNELS = 128
# (blocks, bottleneck width, out channels) of layer1..layer4, i.e. C2..C5.
_STAGES = ((1, 64, 256), (2, 128, 512), (2, 256, 1024), (1, 512, 2048))


def _scaled(channels: int, width: float) -> int:
    """Channel count under the width multiplier: max(8, round(channels * width)); width=1.0 keeps the paper's."""
    return max(8, round(channels * width))


def level_channels(returned_layers: Sequence[int], width: float) -> list[int]:
    """Channels of h's returned levels C2..C5 (``returned_layers`` in 1..4) under the width multiplier ``width``."""
    return [_scaled(_STAGES[k - 1][2], width) for k in returned_layers]


class _Bottleneck(nn.Module):
    """conv1x1 -> ReLU -> conv3x3 (carries the stride) -> ReLU -> conv1x1, plus shortcut, then ReLU; no norm."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1)
        self.conv3 = nn.Conv2d(width, out_channels, 1)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.conv1(x))
        y = F.relu(self.conv2(y))
        return F.relu(self.conv3(y) + self.shortcut(x))


def _init_kaiming_normal(body: nn.Module) -> None:
    """Every convolution ``kaiming_normal_`` (fan_out, ReLU) with zero biases, as torchvision initialises a ResNet."""
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _init_authors(body: nn.Module) -> None:
    """The authors' code: ``kaiming_uniform_(a=1)`` on the weights of every bottleneck convolution, the 1x1
    projection shortcut included; the stem and every bias keep PyTorch's default initialisation."""
    for block in body.modules():
        if isinstance(block, _Bottleneck):
            for conv in (block.conv1, block.conv2, block.conv3, block.shortcut):
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_uniform_(conv.weight, a=1)


H_INITS: dict[str, Callable[[nn.Module], None]] = {"kaiming_normal": _init_kaiming_normal, "authors": _init_authors}


class _LabelResNet(nn.Module):
    """Normalisation-free ResNet body returning the requested C2..C5 as an OrderedDict keyed "0", "1", ...

    Keys follow torchvision's ``IntermediateLayerGetter(return_layers={f"layer{k}": str(i)})``, and stages after
    the last returned one are not built, as there.
    """

    def __init__(self, num_classes: int, returned_layers: Sequence[int], width: float, init: str) -> None:
        super().__init__()
        if init not in H_INITS:
            raise ValueError(f"unknown initialisation {init!r} of h; allowed: {', '.join(H_INITS)}")
        self.num_classes = num_classes
        self.stem = nn.Conv2d(num_classes, _scaled(_STEM_CHANNELS, width), 7, stride=2, padding=3)
        in_channels = self.stem.out_channels
        for k, (blocks, mid, out) in enumerate(_STAGES[: max(returned_layers)], start=1):
            mid, out = _scaled(mid, width), _scaled(out, width)
            stage = [_Bottleneck(in_channels, mid, out, stride=2)]
            stage += [_Bottleneck(out, mid, out, stride=1) for _ in range(blocks - 1)]
            self.add_module(f"layer{k}", nn.Sequential(*stage))
            in_channels = out
        self.out_channels_list = level_channels(returned_layers, width)
        self.return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}
        H_INITS[init](self)

    def _stem(self, label_maps: Tensor, classes: Tensor | None) -> Tensor:
        """Stem on a dense map, or on a compact map holding only ``classes`` (absent channels are all zero)."""
        expected = self.num_classes if classes is None else classes.numel()
        if label_maps.shape[1] != expected:
            raise ValueError(
                f"label_maps has {label_maps.shape[1]} channels, expected {expected} "
                f"({'num_classes' if classes is None else 'len(classes)'})"
            )
        if classes is None:
            return self.stem(label_maps)
        if classes.numel() == 0:  # conv2d on 0 input channels yields 0 output channels; a zero channel gives bias only
            label_maps = label_maps.new_zeros(label_maps.shape[0], 1, *label_maps.shape[2:])
            classes = classes.new_zeros(1)
        weight = self.stem.weight[:, classes]
        return F.conv2d(label_maps, weight, self.stem.bias, self.stem.stride, self.stem.padding)

    def forward(self, label_maps: Tensor, classes: Tensor | None = None) -> OrderedDict[str, Tensor]:
        """Run the stem and stages, collecting the returned levels."""
        x = self._stem(label_maps, classes)
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name, stage in self.named_children():
            if name.startswith("layer"):
                x = stage(x)
                if name in self.return_layers:
                    out[self.return_layers[name]] = x
        return out


class LabelEncoder(nn.Module):
    """Label encoding function h: label map -> FPN features with the detector backbone's keys and shapes.

    Args:
        num_classes: C, the number of label-map channels (one per class).
        fpn_channels: channels of every FPN output; also ``out_channels`` (torchvision backbone contract).
        returned_layers: sorted subset of [1, 2, 3, 4] selecting C2..C5, as in torchvision's
            ``_resnet_fpn_extractor`` ([2, 3, 4] for RetinaNet/FCOS, [1, 2, 3, 4] for Faster/Mask R-CNN).
        extra_blocks: the detector's FPN extra block instance, e.g. ``LastLevelP6P7(fpn_channels, fpn_channels)``
            or ``LastLevelMaxPool()``; one that takes C5 must take h's (see :func:`level_channels`).
        width: channel multiplier of the body (see ``_scaled``); 1.0 gives the paper's widths.
        init: how the body is initialised, a key of :data:`H_INITS` (the FPN is torchvision's either way).

    Forward takes ``label_maps`` [N, C, H, W], or with ``classes`` (1-D int64, length K) a compact
    [N, K, H, W] map holding only those class channels in that order; both give the same features.
    """

    def __init__(
        self,
        num_classes: int,
        fpn_channels: int,
        returned_layers: Sequence[int],
        extra_blocks: ExtraFPNBlock | None,
        width: float = 1.0,
        init: str = "kaiming_normal",
    ) -> None:
        super().__init__()
        returned_layers = list(returned_layers)
        if not returned_layers or returned_layers != sorted(set(returned_layers) & {1, 2, 3, 4}):
            raise ValueError(f"returned_layers must be a sorted subset of [1, 2, 3, 4], got {returned_layers}")
        self.body = _LabelResNet(num_classes, returned_layers, width, init)
        self.fpn = FeaturePyramidNetwork(self.body.out_channels_list, fpn_channels, extra_blocks=extra_blocks)
        self.out_channels = fpn_channels
        self.num_classes = num_classes

    def forward(self, label_maps: Tensor, classes: Tensor | None = None) -> OrderedDict[str, Tensor]:
        """Encode label maps (dense, or compact with ``classes``) into FPN features keyed like the detector's."""
        return self.fpn(self.body(label_maps, classes))
