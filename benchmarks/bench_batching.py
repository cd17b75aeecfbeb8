"""Aspect-ratio grouping (``data.aspect_ratio_grouping``): the padding it saves and the training step it speeds up.

(a) Padding. Image sizes are drawn from an approximation of COCO train2017 (``COCO_LIKE_SIZES``: mostly 640 px on
the long side, 640x480 and 640x427 the commonest, about 2/3 landscape; a documented approximation, not the real
list). Each image is resized as torchvision's ``GeneralizedRCNNTransform`` does (short side 800, long side at most
1333; checked against the transform itself for every size of the table) and each batch is padded to the multiple
of 32 that holds its largest height and width. One epoch of batches comes from the package's own streams
(``SeededStream`` = today's random batches, ``GroupedSeededStream`` = grouped), for batch 2 and 16. Reported: the
mean padded frame (what the backbone, the FPN and LabelEnc's label maps cover) and padding pixels per image.

(b) Step time. One training iteration (forward, backward, SGD step through ``Trainer.run_step``) of the baseline
stage (``STAGES["baseline"]``, ``build_optimizer``) of RetinaNet R-50 FPN, 80 classes, 800/1333 px, batch 2, on
the same four images (640x480, 640x427 and their portrait twins, random pixels and boxes) batched two ways: grouped
(the two landscape images together, the two portrait ones together) and mixed (each landscape image with a portrait
one). One model is stepped, alternating grouped and mixed batches (who goes first alternates each round), so
that load changes on a shared machine hit both alike. Reported: median ms per iteration after ``--warmup`` rounds,
and the ratio. With no ImageNet weights in the local torch cache, the backbone gets random weights in the
pretrained layout (FrozenBatchNorm, stem and layer1 frozen: the paper's setting), so the compute is the paper's.

Usage: python benchmarks/bench_batching.py [--images 20000] [--iters 4] [--warmup 1] [--device cpu] [--skip-step]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torchvision
from _common import machine_header, machine_info
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from labelenc.config import load_config
from labelenc.data.loader import GroupedSeededStream, SeededStream
from labelenc.engine.hooks import LossWeights
from labelenc.engine.trainer import Trainer, move_to_device
from labelenc.errors import UserError
from labelenc.models import build_detector
from labelenc.runner import build_lr_scheduler, build_optimizer
from labelenc.stages import STAGES

# (width, height, share): an approximation of COCO train2017's image sizes. Almost every image is 640 px on its
# long side; 4:3 (640x480) and 3:2 (640x427, and 424..428 around it) are the commonest shapes, then 16:9, 5:4,
# 500x375 and squares; about 2/3 are landscape. Squares count as landscape (width >= height).
COCO_LIKE_SIZES = [
    (640, 480, 0.30), (640, 427, 0.22), (640, 360, 0.04), (640, 512, 0.02), (640, 400, 0.03), (500, 375, 0.03),
    (640, 640, 0.03),
    (480, 640, 0.17), (427, 640, 0.12), (375, 500, 0.02), (360, 640, 0.02),
]
MIN_SIZE, MAX_SIZE, DIVISIBLE = 800, 1333, 32


def resized(width: int, height: int, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE) -> tuple[int, int]:
    """(width, height) after GeneralizedRCNNTransform's resize: scale = min(800 / short, 1333 / long), floored."""
    scale = min(min_size / min(width, height), max_size / max(width, height))
    return math.floor(width * scale), math.floor(height * scale)


def padded(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """(width, height) of the batch tensor: the largest width and height, rounded up to a multiple of 32."""
    return (math.ceil(max(w for w, _ in sizes) / DIVISIBLE) * DIVISIBLE,
            math.ceil(max(h for _, h in sizes) / DIVISIBLE) * DIVISIBLE)


def check_against_torchvision() -> None:
    """resized() and padded() agree with torchvision's own transform for every size of the table."""
    transform = GeneralizedRCNNTransform(MIN_SIZE, MAX_SIZE, [0.0] * 3, [1.0] * 3).eval()
    for width, height, _ in COCO_LIKE_SIZES:
        with torch.no_grad():
            images, _ = transform([torch.zeros(3, height, width), torch.zeros(3, 480, 640)])
        sizes = [resized(width, height), resized(640, 480)]
        if [tuple(s) for s in images.image_sizes] != [(h, w) for w, h in sizes] or \
                tuple(images.tensors.shape[-2:]) != padded(sizes)[::-1]:
            raise SystemExit(f"size formula disagrees with torchvision for {width}x{height}")


class SizesOnly:
    """What the streams read of a CocoDetection: image ids, and the sizes recorded in the annotations."""

    def __init__(self, sizes: list[tuple[int, int]]) -> None:
        self.image_ids = list(range(1, len(sizes) + 1))
        self.coco = SimpleNamespace(imgs={i: {"width": w, "height": h} for i, (w, h) in zip(self.image_ids, sizes)})

    def __len__(self) -> int:
        return len(self.image_ids)


def padding_table(num_images: int, batch_sizes: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    shares = torch.tensor([s for _, _, s in COCO_LIKE_SIZES])
    picks = torch.multinomial(shares, num_images, replacement=True, generator=g).tolist()
    sizes = [COCO_LIKE_SIZES[k][:2] for k in picks]
    landscape = sum(w >= h for w, h in sizes) / num_images
    dataset = SizesOnly(sizes)
    print(f"## (a) padding: {num_images} images drawn from COCO_LIKE_SIZES ({landscape:.1%} landscape), resized to "
          f"{MIN_SIZE}/{MAX_SIZE} px, padded to a multiple of {DIVISIBLE} per batch; one epoch of batches\n")
    print("| batch | batching | batches | one-orientation batches | frame px/image | padding px/image "
          "| padding % of frame | frame ratio | padding ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in batch_sizes:
        rows = {}
        streams = {"mixed (today)": (SeededStream(dataset, None, seed), num_images // batch),
                   "grouped": (GroupedSeededStream(dataset, None, seed, batch), None)}
        for name, (stream, count) in streams.items():
            count = stream.batches_before(1) if count is None else count
            frame = pad = single = 0
            for b in range(count):
                members = [sizes[stream.index_at(b * batch + j)] for j in range(batch)]
                scaled = [resized(w, h) for w, h in members]
                pw, ph = padded(scaled)
                frame += pw * ph * batch
                pad += sum(pw * ph - w * h for w, h in scaled)
                single += len({w >= h for w, h in members}) == 1
            rows[name] = (count, single, frame / (count * batch), pad / (count * batch))
        base_frame, base_pad = rows["mixed (today)"][2:]
        for name, (count, single, frame, pad) in rows.items():
            print(f"| {batch} | {name} | {count} | {single / count:.1%} | {frame / 1e6:.3f} M | {pad / 1e6:.3f} M "
                  f"| {pad / frame:.1%} | {frame / base_frame:.3f} | {pad / base_pad:.3f} |")
    print()


def random_image(width: int, height: int, g: torch.Generator) -> tuple[torch.Tensor, dict]:
    n = int(torch.randint(3, 7, (), generator=g))
    wh = torch.rand(n, 2, generator=g) * torch.tensor([width / 2, height / 2]) + 8
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([width, height]) - wh)
    target = {"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 81, (n,), generator=g)}
    return torch.rand(3, height, width, generator=g), target


def build_model(args: argparse.Namespace, workdir: Path):
    """The config (batch 2) and its RetinaNet for 80 classes: the backbone weights the config names if the local torch
    cache has them, else random weights in the pretrained layout (FrozenBatchNorm, the paper's frozen layers)."""
    overrides = ["train.batch_size=2", f"train.device={args.device}"]
    cfg = load_config(args.config, overrides)
    torch.manual_seed(args.seed)
    try:
        return cfg, build_detector(cfg.model, 80), str(cfg.model.backbone_weights)
    except UserError as err:
        if cfg.model.backbone_weights is None:
            raise
        print(f"backbone weights not usable ({str(err).splitlines()[0]}); random weights instead", file=sys.stderr)
    path = workdir / "resnet50_random.pth"
    torch.save(getattr(torchvision.models, cfg.model.backbone)().state_dict(), path)
    cfg = load_config(args.config, [*overrides, f"model.backbone_weights={path}"])
    torch.manual_seed(args.seed)
    detector = build_detector(cfg.model, 80)
    return cfg, detector, "random, in the pretrained layout (FrozenBatchNorm, stem + layer1 frozen)"


def step_time(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as workdir:
        cfg, detector, weights = build_model(args, Path(workdir))
    class_names = [f"class{i}" for i in range(80)]
    objective = STAGES["baseline"].build(cfg, detector, class_names, {})
    model = objective.model.to(device)
    optimizer = build_optimizer(cfg, model)
    build_lr_scheduler(cfg, optimizer, objective.lr_offset)  # the run's first (warm-up) LR; not stepped
    trainer = Trainer(model, optimizer, [], 10**9, device, [LossWeights(objective.weight_schedules)],
                      cfg.train.grad_clip, cfg.train.amp)

    g = torch.Generator().manual_seed(args.seed)
    land_a, land_b = random_image(640, 480, g), random_image(640, 427, g)
    port_a, port_b = random_image(480, 640, g), random_image(427, 640, g)
    pairs = {"grouped": [(land_a, land_b), (port_a, port_b)], "mixed": [(land_a, port_a), (land_b, port_b)]}
    batches = {name: [move_to_device(([a[0], b[0]], [a[1], b[1]]), device) for a, b in two]
               for name, two in pairs.items()}
    m = cfg.model
    frames = {name: [padded([resized(img.shape[-1], img.shape[-2], m.min_size, m.max_size) for img in images])
                     for images, _ in bs] for name, bs in batches.items()}
    print(f"## (b) step time: {m.family} {m.backbone} FPN-{m.fpn_channels}, 80 classes, {m.min_size}/{m.max_size} px, "
          f"batch 2, baseline stage, amp {cfg.train.amp}, backbone {weights}; {args.warmup} warm-up + {args.iters} "
          "timed rounds, one grouped and one mixed step per round, alternating who goes first\n")
    times: dict[str, list[float]] = {name: [] for name in batches}
    names = list(batches)
    for round_ in range(args.warmup + args.iters):
        for k in range(len(names)):
            name = names[(round_ + k) % len(names)]
            for hook in trainer.hooks:
                hook.before_step(trainer)
            trainer.run_step(iter([batches[name][round_ % 2]]))
            trainer.iter += 1
            if trainer.metrics.get("skipped"):
                print(f"warning: step {trainer.iter} skipped (non-finite loss)", file=sys.stderr)
            if round_ >= args.warmup:
                times[name].append((trainer.metrics["time"] - trainer.metrics["data_time"]) * 1e3)
        print(f"  round {round_ + 1}/{args.warmup + args.iters} done", file=sys.stderr, flush=True)
    base = statistics.median(times["mixed"])
    print("| batching | padded frames (w x h) | frame px/image | ms/iter (median) | min-max | ratio vs mixed |")
    print("|---|---|---|---|---|---|")
    for name in ["mixed", "grouped"]:
        shown = ", ".join(f"{w}x{h}" for w, h in frames[name])
        area = statistics.mean(w * h for w, h in frames[name])
        ms = statistics.median(times[name])
        print(f"| {name} | {shown} | {area / 1e6:.3f} M | {ms:.0f} | {min(times[name]):.0f}-{max(times[name]):.0f} "
              f"| {ms / base:.3f} |")
    print("\nall times (ms): " + "; ".join(f"{k}: {', '.join(f'{t:.0f}' for t in v)}" for k, v in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=20000, help="images drawn for the padding table")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 16], help="global batch sizes, one row each")
    parser.add_argument("--config", default="configs/retinanet_r50_fpn_1x.yaml", help="the step-time model")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--iters", type=int, default=4, help="timed rounds (one grouped and one mixed step each)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-step", action="store_true", help="only the padding table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(torch.device(args.device))
    print(machine_header(info) + "\n")
    check_against_torchvision()
    padding_table(args.images, args.batches, args.seed)
    if not args.skip_step:
        step_time(args)
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"\nwarning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other jobs share this "
              "machine, timings are noisy")


if __name__ == "__main__":
    main()
