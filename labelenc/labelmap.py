"""Label maps: the ground truth rendered as a C x H x W image, the input of LabelEnc's encoder h."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["render_label_maps"]


def render_label_maps(
    boxes: list[Tensor],
    labels: list[Tensor],
    num_classes: int,
    height: int,
    width: int,
    masks: list[Tensor] | None = None,
    box_jitter: bool = False,
    generator: torch.Generator | None = None,
    classes: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Render per-image boxes (and optionally masks) into class-channel label maps, in time proportional to box area.

    For a box of class c with centre (cx, cy), width w and height h, pixel (row i, column j) of channel c gets
    ``v = 1 - max(|j - cx| / w, |i - cy| / h)`` where ``v >= 0.5`` (else 0); same-class overlaps take the max, and
    boxes with ``w <= 0`` or ``h <= 0`` contribute nothing. Since ``v >= 0.5`` only inside the box, only the pixels of
    each box's window are enumerated (all boxes at once) and scatter-maxed into the zero-initialised output.

    Args:
        boxes: N tensors [K, 4], xyxy in pixels of the padded H x W frame.
        labels: N int64 tensors [K], 0-based class ids.
        num_classes: C, the number of classes.
        height, width: size of the padded frame.
        masks: optional N tensors [K, h, w] (binary; h <= height, w <= width) covering the unpadded image from the
            top-left corner; v is multiplied by the mask value (0 outside the mask's extent).
        box_jitter: Step-1 augmentation: each box's values are multiplied by ``min(2 * U(0, 1), 1)``, i.e. with
            probability 0.5 by a uniform factor, one draw per box (in the order of the concatenated boxes).
        generator: RNG for the jitter (on the boxes' device); the global RNG if None.
        classes: optional 1-D int64 class ids; renders only these channels, in this order.
        dtype: output dtype (values are computed in float32).

    Returns:
        [N, C', H, W] tensor with C' = num_classes, or len(classes), on the device of ``classes`` or ``boxes[0]``.
    """
    n = len(boxes)
    device = classes.device if classes is not None else (boxes[0].device if n else torch.device("cpu"))
    channel_of_class = torch.arange(num_classes, device=device)
    if classes is not None:
        channel_of_class = torch.full((num_classes,), -1, dtype=torch.long, device=device)
        channel_of_class[classes] = torch.arange(len(classes), device=device)
    num_channels = num_classes if classes is None else len(classes)
    out = torch.zeros(n * num_channels * height * width, dtype=dtype, device=device)
    if n == 0:
        return out.view(0, num_channels, height, width)

    box = torch.cat([b.reshape(-1, 4) for b in boxes]).to(device=device, dtype=torch.float32)
    image = torch.repeat_interleave(torch.tensor([len(b) for b in boxes], device=device))
    channel = channel_of_class[torch.cat(list(labels)).to(device)]
    factor = None
    if box_jitter:
        factor = (2 * torch.rand(len(box), generator=generator, device=device)).clamp(max=1)

    # The region a box may be drawn into: the frame, or the mask's extent (outside it the value is 0 anyway).
    extents = [(height, width)] * n
    if masks is not None:
        extents = [(min(height, m.shape[-2]), min(width, m.shape[-1])) for m in masks]
    frame_h, frame_w = torch.tensor(extents, device=device)[image].unbind(1)

    x1, y1, x2, y2 = box.unbind(1)
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    # Pixel windows of the boxes, one pixel wider than [ceil(x1), floor(x2)] on each side so that float rounding
    # at the border is settled by the exact threshold below; clamped as floats so huge coordinates cannot overflow.
    left = (x1.clamp(-1, width).ceil() - 1).long().clamp(min=0)
    right = torch.minimum((x2.clamp(-1, width).floor() + 1).long(), frame_w - 1)
    top = (y1.clamp(-1, height).ceil() - 1).long().clamp(min=0)
    bottom = torch.minimum((y2.clamp(-1, height).floor() + 1).long(), frame_h - 1)
    cols = (right - left + 1).clamp(min=0)
    rows = torch.where((w > 0) & (h > 0) & (channel >= 0), bottom - top + 1, 0).clamp(min=0)

    # v is separable: 1 - max(dx(column), dy(row)). Enumerate the window columns and rows of all boxes, then the
    # pixels of every (box, row) segment as ranges of that box's columns.
    col_x, col_box = _ranges(left, cols)
    dx = (col_x - cx[col_box]).abs() / w[col_box]
    row_y, row_box = _ranges(top, rows)
    dy = (row_y - cy[row_box]).abs() / h[row_box]
    # Per-pixel gathers use index_select, several times faster than [] indexing on CPU.
    col_of_pixel, row_of_pixel = _ranges((torch.cumsum(cols, 0) - cols)[row_box], cols[row_box])
    x = col_x.index_select(0, col_of_pixel)
    v = 1 - torch.maximum(dx.index_select(0, col_of_pixel), dy.index_select(0, row_of_pixel))
    v = torch.where(v >= 0.5, v, 0)
    if masks is not None:
        mask_sizes = [m.shape[-2] * m.shape[-1] for m in masks for _ in range(len(m))]
        mask_start = torch.cumsum(torch.tensor([0] + mask_sizes[:-1], device=device), 0)
        flat_masks = torch.cat([m.reshape(-1) for m in masks]).to(device)
        mask_w = torch.tensor([m.shape[-1] for m in masks], device=device)[image]
        mask_row = mask_start[row_box] + row_y * mask_w[row_box]
        v = v * flat_masks.index_select(0, mask_row.index_select(0, row_of_pixel) + x).float()
    if factor is not None:
        v = v * factor[row_box].index_select(0, row_of_pixel)

    out_row = ((image * num_channels + channel)[row_box] * height + row_y) * width
    out.scatter_reduce_(0, out_row.index_select(0, row_of_pixel) + x, v.to(dtype), reduce="amax")
    return out.view(n, num_channels, height, width)


def _ranges(starts: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate the integer ranges [start, start + length); also return the index of the range of each value."""
    owner = torch.repeat_interleave(lengths)
    first = torch.cumsum(lengths, 0) - lengths
    return torch.arange(len(owner), device=lengths.device) + (starts - first).index_select(0, owner), owner
