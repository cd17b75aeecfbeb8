"""Benchmark label-map rendering at COCO scale: the authors' per-box full-grid loop vs render_label_maps.

Usage: python benchmarks/bench_labelmap.py [--device cuda] [--repeats 3]
Prints a markdown table: time (median ms) and output memory (MB) per method, with ratios vs the authors' style.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from _common import machine_header, machine_info
from torch import Tensor

from labelenc.labelmap import render_label_maps


def authors_style(boxes: list[Tensor], labels: list[Tensor], num_classes: int, height: int, width: int) -> Tensor:
    """The authors' approach: a dense C x H x W map per image, each box evaluated on the full-image grid."""
    device = boxes[0].device
    maps = torch.zeros(len(boxes), num_classes, height, width, device=device)
    ys = torch.arange(height, dtype=torch.float32, device=device)[:, None]
    xs = torch.arange(width, dtype=torch.float32, device=device)[None, :]
    for image, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
        for (x1, y1, x2, y2), label in zip(image_boxes, image_labels):
            cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
            if w > 0 and h > 0:
                v = 1 - torch.maximum((xs - cx).abs() / w, (ys - cy).abs() / h)
                v[v < 0.5] = 0
                maps[image, label] = torch.maximum(maps[image, label], v)
    return maps


def coco_like_boxes(num_boxes: int, image_h: int, image_w: int, num_classes: int, g: torch.Generator):
    """Random boxes inside the image: sqrt(area) log-normal (median 64 px, sigma 1.25) and log-normal aspect ratio.

    With the x1.6 resize of COCO to 800 px this gives roughly COCO's 41% small / 34% medium / 24% large split.
    """
    side = torch.exp(math.log(64) + 1.25 * torch.randn(num_boxes, generator=g)).clamp(4, min(image_h, image_w))
    aspect = torch.exp(0.5 * torch.randn(num_boxes, generator=g))
    w = (side * aspect.sqrt()).clamp(max=image_w)
    h = (side / aspect.sqrt()).clamp(max=image_h)
    x1 = torch.rand(num_boxes, generator=g) * (image_w - w)
    y1 = torch.rand(num_boxes, generator=g) * (image_h - h)
    labels = torch.randint(0, num_classes, (num_boxes,), generator=g)
    return torch.stack([x1, y1, x1 + w, y1 + h], 1), labels


def measure(fn: Callable[[], Tensor], repeats: int, device: torch.device) -> tuple[float, Tensor]:
    """Median wall time in ms over `repeats` runs (after one untimed run, whose output is returned)."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=800, help="padded frame height")
    parser.add_argument("--width", type=int, default=1216, help="padded frame width")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--boxes", type=int, nargs="+", default=[7, 50], help="boxes per image, one row each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    image_h, image_w = args.height, args.width - 16  # the unpadded image inside the padded frame
    print(machine_header(machine_info(device)))
    print(f"frame {args.batch} x {args.num_classes} x {args.height} x {args.width}\n")
    print("| boxes/image | method | ms | ratio | output MB | ratio |")
    print("|---|---|---|---|---|---|")
    for boxes_per_image in args.boxes:
        g = torch.Generator().manual_seed(args.seed)
        batch = [coco_like_boxes(boxes_per_image, image_h, image_w, args.num_classes, g) for _ in range(args.batch)]
        boxes = [b.to(device) for b, _ in batch]
        labels = [l.to(device) for _, l in batch]
        present = torch.unique(torch.cat(labels))
        shape = (args.num_classes, args.height, args.width)
        methods = {
            "(a) authors' loop, dense": lambda: authors_style(boxes, labels, *shape),
            "(b) render_label_maps, dense": lambda: render_label_maps(boxes, labels, *shape),
            f"(c) render_label_maps, classes= ({len(present)} present)":
                lambda: render_label_maps(boxes, labels, *shape, classes=present),
        }
        results = {name: measure(fn, args.repeats, device) for name, fn in methods.items()}
        (ms_a, dense_a), (_, dense_b), (_, compact) = results.values()
        if not (torch.equal(dense_a, dense_b) and torch.equal(dense_a[:, present], compact)):
            raise SystemExit("outputs differ")
        mb_a = dense_a.numel() * dense_a.element_size() / 2**20
        for name, (ms, out) in results.items():
            mb = out.numel() * out.element_size() / 2**20
            print(f"| {boxes_per_image} | {name} | {ms:.1f} | {ms / ms_a:.3f} | {mb:.1f} | {mb / mb_a:.3f} |")
    print("\noutputs equal: (b) == (a) and (c) == (a)[:, classes]")


if __name__ == "__main__":
    main()
