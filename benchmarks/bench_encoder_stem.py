"""What the compact label-map input saves in the label encoder's stem at COCO scale (dense C=80 vs K present classes).

The stem of h (``LabelEncoder``, width 1.0) is a 7x7 stride-2 convolution from the C label-map channels to 128.
Dense, it reads an [N, 80, H, W] map in which all channels of absent classes are zero; compact
(``LabelEncoder(..., classes=)``) it reads only the K channels of the classes present in the batch and the matching
K input slices of the stem weight, which gives the same result. This script compares, per K: input tensor bytes,
analytic stem FLOPs (2 * K * 128 * 49 * H/2 * W/2 per image), measured stem forward time, and the measured
end-to-end time of ``render_label_maps`` (dense vs ``classes=``) followed by the stem, checks that both outputs agree
and prints ratios vs dense.

K comes from a COCO-like draw (``--cats-per-image``, default 2.9 categories per image, 'person' in 54% of images,
union over the batch) and from the fixed values of ``--ks``.

Usage: python benchmarks/bench_encoder_stem.py [--batch 2] [--ks 3 6 12 80] [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import machine_header, machine_info
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_labelmap import coco_like_boxes  # noqa: E402  (COCO-like box sizes, shared with that benchmark)

from labelenc.artifact import build_label_encoder, encoder_metadata  # noqa: E402
from labelenc.labelmap import render_label_maps  # noqa: E402

STEM_OUT = 128  # stem output channels at width 1.0
KERNEL = 7


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2, help="images per batch (e.g. 16 for a full COCO batch)")
    parser.add_argument("--height", type=int, default=800, help="padded frame height")
    parser.add_argument("--width", type=int, default=1216, help="padded frame width")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--ks", type=int, nargs="*", default=[3, 6, 12, 80],
                        help="fixed numbers of classes present in the batch, one row each")
    parser.add_argument("--no-coco-sample", action="store_true", help="skip the COCO-like drawn K row")
    parser.add_argument("--cats-per-image", type=float, default=2.9, help="mean categories per image (COCO-like draw)")
    parser.add_argument("--person-prob", type=float, default=0.54, help="share of images with the 'person' class")
    parser.add_argument("--instances-per-category", type=float, default=2.5,
                        help="mean boxes per present category and image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10, help="at most this many timed runs per measurement")
    parser.add_argument("--budget", type=float, default=3.0,
                        help="seconds per measurement: no further run starts once the timed runs took this long "
                             "(the dense 80-channel stem on a CPU gets 1 run)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    return parser.parse_args()


def poisson(mean: float, g: torch.Generator) -> int:
    return int(torch.poisson(torch.tensor([float(mean)]), generator=g)) if mean > 0 else 0


def coco_like_image_labels(args: argparse.Namespace, g: torch.Generator) -> Tensor:
    """Labels of one image: 1 + Poisson(mean - 1) categories ('person' = 0 with --person-prob), each with
    1 + Poisson(instances - 1) boxes. An approximation of COCO's statistics, not a sample of COCO itself."""
    categories = 1 + poisson(args.cats_per_image - 1, g)
    person = bool(torch.rand(1, generator=g) < args.person_prob)
    others = torch.randperm(args.num_classes - 1, generator=g)[: categories - person] + 1
    cats = torch.cat([torch.zeros(int(person), dtype=torch.long), others])
    return torch.cat([c.repeat(1 + poisson(args.instances_per_category - 1, g)) for c in cats])


def k_distribution(args: argparse.Namespace, samples: int = 2000) -> dict:
    """Classes present in a batch (union over its images) under the COCO-like draw."""
    g = torch.Generator().manual_seed(args.seed + 1)
    ks = sorted(
        len(torch.unique(torch.cat([coco_like_image_labels(args, g) for _ in range(args.batch)])))
        for _ in range(samples)
    )
    return {"mean": statistics.fmean(ks), "median": statistics.median(ks), "p90": ks[int(0.9 * samples)],
            "max": ks[-1]}


def scenario(labels_per_image: list[Tensor], args: argparse.Namespace, g: torch.Generator):
    """COCO-like boxes (sizes as bench_labelmap) for the given per-image labels, inside the unpadded image."""
    image_h, image_w = args.height, args.width - 16  # the unpadded image inside the padded frame
    boxes = [coco_like_boxes(len(lab), image_h, image_w, args.num_classes, g)[0] for lab in labels_per_image]
    return boxes, labels_per_image


def fixed_k_labels(k: int, args: argparse.Namespace, g: torch.Generator) -> list[Tensor]:
    """K random classes present in the batch, each with 1 + Poisson(instances - 1) boxes on random images."""
    classes = torch.randperm(args.num_classes, generator=g)[:k]
    per_image: list[list[int]] = [[] for _ in range(args.batch)]
    for c in classes.tolist():
        for _ in range(1 + poisson(args.instances_per_category - 1, g)):
            per_image[int(torch.randint(args.batch, (), generator=g))].append(c)
    return [torch.tensor(labels, dtype=torch.long) for labels in per_image]


def measure(fn: Callable[[], Tensor], repeats: int, budget: float, warmup: bool, device: torch.device):
    """Median wall ms over up to ``repeats`` runs within ``budget`` seconds (after one untimed run if ``warmup``),
    the number of runs, the last output, and the peak CUDA memory above what was allocated before (MB; NaN on CPU)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if warmup:
        fn()
    times, out, peak = [], None, float("nan")
    for _ in range(repeats):
        out = None  # free the previous output before the next run
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        out = fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        if sum(times) > budget * 1e3:
            break
    return statistics.median(times), len(times), out, peak


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [f"class{i}" for i in range(args.num_classes)]
    encoder = build_label_encoder(encoder_metadata("retinanet", names, 256, 1.0, "resnet50")).to(device).eval()
    body = encoder.body  # the stem is LabelEncoder.body._stem: dense (classes=None) or compact (classes=K ids)
    assert body.stem.out_channels == STEM_OUT and body.stem.kernel_size == (KERNEL, KERNEL)
    n, c, fh, fw = args.batch, args.num_classes, args.height, args.width
    oh, ow = (fh + 6 - KERNEL) // 2 + 1, (fw + 6 - KERNEL) // 2 + 1

    def stem_gflop(k: int) -> float:
        return 2 * k * STEM_OUT * KERNEL * KERNEL * oh * ow * n / 1e9

    g = torch.Generator().manual_seed(args.seed)
    rows: list[tuple[str, list[Tensor]]] = []
    if not args.no_coco_sample:
        rows.append(("COCO-like draw", [coco_like_image_labels(args, g) for _ in range(n)]))
    rows += [(f"K={k}", fixed_k_labels(k, args, g)) for k in args.ks]

    info = machine_info(device)
    dist = k_distribution(args)
    warmed: set[tuple[int, ...]] = set()
    stem_rows, e2e_rows = [], []
    with torch.no_grad():
        for label, labels in rows:
            print(f"measuring {label} ...", file=sys.stderr, flush=True)
            boxes, labels = scenario(labels, args, g)
            boxes = [b.to(device) for b in boxes]
            labels = [lab.to(device) for lab in labels]
            present = torch.unique(torch.cat(labels))
            k = len(present)

            def dense() -> Tensor:
                return render_label_maps(boxes, labels, c, fh, fw)

            def compact() -> Tensor:
                return render_label_maps(boxes, labels, c, fh, fw, classes=present)

            maps_compact = compact()
            if not stem_rows:  # dense stem: the cost depends on the shape only, so it is measured once
                maps_dense = dense()
                ms, runs, _, _ = measure(lambda: body._stem(maps_dense, None), args.repeats, args.budget, True, device)
                warmed.add(tuple(maps_dense.shape))
                stem_rows.append({"input": "dense", "k": c, "input_mb": maps_dense.numel() * 4 / 2**20,
                                  "gflop": stem_gflop(c), "ms": ms, "runs": runs})
                del maps_dense
            shape = tuple(maps_compact.shape)
            ms, runs, _, _ = measure(lambda m=maps_compact: body._stem(m, present), args.repeats, args.budget,
                                     shape not in warmed, device)
            warmed.add(shape)
            stem_rows.append({"input": f"compact ({label})", "k": k, "input_mb": maps_compact.numel() * 4 / 2**20,
                              "gflop": stem_gflop(k), "ms": ms, "runs": runs})
            del maps_compact

            # End to end: render the label maps and run the stem (dense first: its output is the reference).
            ms_d, runs_d, out_d, peak_d = measure(lambda: body._stem(dense(), None), args.repeats, args.budget, False,
                                                  device)
            ms_c, runs_c, out_c, peak_c = measure(lambda: body._stem(compact(), present), args.repeats, args.budget,
                                                  False, device)
            diff = (out_d - out_c).abs().max().item()
            close = torch.allclose(out_c, out_d, rtol=1e-4, atol=1e-5 * out_d.abs().max().item())
            del out_d, out_c
            e2e_rows.append({"batch": label, "k": k, "boxes": sum(len(b) for b in boxes), "dense_ms": ms_d,
                             "compact_ms": ms_c, "runs": f"{runs_d}/{runs_c}", "dense_peak_mb": peak_d, "compact_peak_mb": peak_c,
                             "max_abs_diff": diff, "allclose": close})

    print(machine_header(info))
    print(f"\nLabelEncoder width 1.0 stem: conv {c}->{STEM_OUT}, {KERNEL}x{KERNEL}, stride 2; padded batch "
          f"{n} x {c} x {fh} x {fw} (fp32); stem output {n} x {STEM_OUT} x {oh} x {ow}. Classes present per batch "
          f"under the COCO-like draw ({args.cats_per_image} categories/image, batch {n}, 2000 draws): mean "
          f"{dist['mean']:.1f}, median {dist['median']}, p90 {dist['p90']}, max {dist['max']}. "
          f"Times: median of up to {args.repeats} runs within {args.budget:g} s per measurement (runs column), "
          "forward only (no_grad).\n")
    dense_row = stem_rows[0]
    print("| stem input | K channels | input MiB | ratio | stem GFLOP | ratio | stem ms | ratio | runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in stem_rows:
        print(f"| {r['input']} | {r['k']} | {r['input_mb']:.0f} | {r['input_mb'] / dense_row['input_mb']:.3f} "
              f"| {r['gflop']:.1f} | {r['gflop'] / dense_row['gflop']:.3f} | {r['ms']:.0f} "
              f"| {r['ms'] / dense_row['ms']:.3f} | {r['runs']} |")
    cuda = device.type == "cuda"
    print("\nrender_label_maps + stem, end to end (dense: all channels; compact: classes=present):\n")
    print("| batch | K | boxes | dense ms | compact ms | ratio |" + (" dense peak MiB | compact peak MiB | ratio |" if cuda
                                                                  else "") + " max abs diff | allclose | runs d/c |")
    print("|---|---|---|---|---|---|" + ("---|---|---|" if cuda else "") + "---|---|---|")
    for r in e2e_rows:
        mem = (f" {r['dense_peak_mb']:.0f} | {r['compact_peak_mb']:.0f} | "
               f"{r['compact_peak_mb'] / r['dense_peak_mb']:.3f} |") if cuda else ""
        print(f"| {r['batch']} | {r['k']} | {r['boxes']} | {r['dense_ms']:.0f} | {r['compact_ms']:.0f} "
              f"| {r['compact_ms'] / r['dense_ms']:.3f} |{mem} {r['max_abs_diff']:.2e} | {r['allclose']} | {r['runs']} |")
    print("\nnotes: dense stem time is measured once (a convolution's cost depends on the input shape, not on how "
          "many channels are zero); each compact shape gets one untimed warm-up run. Compact and dense outputs are "
          "compared element-wise (allclose rtol 1e-4, atol 1e-5 x max|output|).")
    if not cuda:
        print("CPU: peak memory not measured (input MiB is the tensor size); runs with 1 repetition are single timings.")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other jobs share this "
              "machine, timings are noisy")
    if args.json:
        payload = {"header": info, "args": vars(args), "k_distribution": dist,
                   "stem": stem_rows, "end_to_end": e2e_rows}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if not all(r["allclose"] for r in e2e_rows):
        raise SystemExit("compact and dense stem outputs differ")


if __name__ == "__main__":
    main()
