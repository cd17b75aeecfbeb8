"""Modulated deformable convolution (DCNv2, Zhu et al., CVPR 2019) on ``torchvision.ops.deform_conv2d``."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import DeformConv2d, deform_conv2d

__all__ = ["ModulatedDeformConv2d"]


class ModulatedDeformConv2d(DeformConv2d):
    """A convolution whose kernel taps move by learned offsets and are weighted by a learned modulation.

    One ordinary convolution ``conv_offset`` (same kernel, stride, padding and dilation as the main one) predicts,
    at every output position, 2 offsets (dy, dx) and 1 modulation logit m per kernel tap; it starts at zero weight
    and zero bias, as in DCNv2. The modulation is ``2 * sigmoid(m)``, not DCNv2's ``sigmoid(m)`` (also used by
    maskrcnn-benchmark and mmcv): with zero offsets and m = 0 it is 1, so a fresh layer computes exactly the
    convolution with its weights, and a backbone given the ImageNet weights of the plain network starts from that
    network's features (with ``sigmoid(m)`` every deformable layer would start by halving its output).

    The main weight and bias keep ``nn.Conv2d``'s names and shapes, so a plain convolution's weights load into it;
    only ``conv_offset.*`` is new.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.taps = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(in_channels, 3 * self.taps, self.kernel_size, self.stride, self.padding,
                                     self.dilation)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ModulatedDeformConv2d:
        """The deformable version of ``conv``: same hyper-parameters, taking over its weight (and bias) tensors."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"only zero padding given as numbers can be made deformable, not {conv}")
        dcn = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None)
        dcn.weight = conv.weight
        dcn.bias = conv.bias
        return dcn

    def forward(self, x: Tensor) -> Tensor:
        """Predict offsets and modulation from ``x``, then convolve ``x`` at the moved taps (unlike
        ``DeformConv2d.forward``, which is given them)."""
        offset, logits = self.conv_offset(x).split([2 * self.taps, self.taps], dim=1)
        # Under AMP x and the offsets may be half / bfloat16 while the weight is float32: deform_conv2d mixes no
        # dtypes (and has no autocast rule on the CPU), so it runs in the weight's dtype, as torchvision's CUDA
        # autocast rule does, and returns x's.
        dtype = self.weight.dtype
        out = deform_conv2d(x.to(dtype), offset.to(dtype), self.weight, self.bias, self.stride, self.padding,
                            self.dilation, mask=(2 * logits.sigmoid()).to(dtype))
        return out.to(x.dtype)
