"""LabelEnc adds nothing at inference: the Step-2 detector is a plain torchvision detector, as large and as fast.

Trains, on a synthetic dataset written to a temporary folder, a tiny baseline run and a tiny Step 1 + Step 2 run of
the model of ``--config`` (``labelenc.runner.train``, ``--iters`` iterations each, on the CPU), then compares the two
detectors that ``labelenc eval`` / ``labelenc export`` load from their ``model_final.pth``: the Step-2 detector and the
plain (baseline) torchvision detector of the same config. Both are built by ``build_detector`` and must be of the same
torchvision class, with the same parameter and buffer names, shapes and counts. The Step-2 *training* module
(``STAGES["step2"].build``: detector + adaption nets + frozen label encoder h) is counted too: all of it but the
detector is left behind.

Latency: eval-mode forward (``torch.no_grad``) of ``--batch`` validation images, both detectors timed in the same
rounds, interleaved (the order alternates every round, so drift and load changes hit both alike), ``--warmup``
untimed rounds first; reported: median ms of ``--repeats`` rounds, the ratio of the medians and the median of the
per-round ratios. The two detectors have different weights, so their post-processing sees different numbers of
candidate boxes: detections per image are printed beside the times. On a shared CPU, ``--threads 1``: two threads
on two busy cores made single rounds up to several times slower, at random, for either detector.

Usage: python benchmarks/bench_export.py [--config configs/demo_cpu.yaml] [--family fcos] [--repeats 50] [--threads 1]
       [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import machine_header, machine_info

from labelenc.config import build_config
from labelenc.data.loader import build_datasets
from labelenc.data.synth import generate_synthetic_dataset
from labelenc.models import build_detector
from labelenc.runner import load_detector_weights, train
from labelenc.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo_cpu.yaml"),
                        help="its model section is used; data and schedule are replaced by tiny synthetic ones")
    parser.add_argument("--family", default=None, help="override model.family")
    parser.add_argument("--iters", type=int, default=4, help="training iterations of each tiny run")
    parser.add_argument("--batch", type=int, default=1, help="images per timed forward")
    parser.add_argument("--repeats", type=int, default=50, help="timed rounds (one forward of each detector)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (the report gives quartiles of the rounds)")
    return args


def tiny_runs(args: argparse.Namespace, workdir: Path):
    """Config, class names, baseline weights, Step-2 weights and the Step-1 label encoder of tiny CPU runs."""
    raw = yaml.safe_load(Path(args.config).read_text())
    model = dict(raw.get("model", {}))
    if args.family:
        model["family"] = args.family
        model.setdefault("anchor_sizes", None)
    model["backbone_weights"] = None
    size = max(64, int(model.get("min_size", 128)))
    data = generate_synthetic_dataset(workdir / "data", seed=0, num_train=16, num_val=8, image_size=size)
    base = {
        "model": model,
        "data": {split: {"annotations": str(data[split]), "images": str(workdir / "data" / split)}
                 for split in ("train", "val")} | {"num_workers": 0},
        "train": {"base_iters": args.iters, "batch_size": 2, "reference_batch_size": 16, "warmup_iters": 1,
                  "checkpoint_period": 10**6, "log_period": 10**6, "device": "cpu"},
        "labelenc": raw.get("labelenc", {}),
    }
    runs = {}
    for stage in ("baseline", "step1", "step2"):
        cfg = build_config({**base, "output_dir": str(workdir / stage)})
        inputs = {"label_encoder": str(runs["step1"].outputs["label_encoder"])} if stage == "step2" else None
        print(f"training tiny {stage} ({args.iters} iterations) ...", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints its evaluation summary
            runs[stage] = train(cfg, stage, inputs)
    class_names = build_datasets(cfg, with_masks=False)[0].class_names
    return cfg, class_names, runs["baseline"].weights, runs["step2"].weights, runs["step1"].outputs["label_encoder"]


def count(module: torch.nn.Module) -> tuple[int, int]:
    return sum(p.numel() for p in module.parameters()), sum(b.numel() for b in module.buffers())


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    for handler in logging.getLogger().handlers:  # the runner sets labelenc's loggers to INFO
        handler.setLevel(logging.WARNING)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        workdir = Path(tmp)
        cfg, class_names, baseline_weights, step2_weights, label_encoder = tiny_runs(args, workdir)
        detectors = {}
        for name, weights in (("plain (baseline)", baseline_weights), ("Step 2 (LabelEnc)", step2_weights)):
            detector = build_detector(cfg.model, len(class_names))
            load_detector_weights(detector, weights, cfg, class_names)
            detectors[name] = detector.to(device).eval()
        training = STAGES["step2"].build(cfg, build_detector(cfg.model, len(class_names)), class_names,
                                         {"label_encoder": str(label_encoder)}).model
        val = build_datasets(cfg, with_masks=False)[1]
        images = [val[i][0].as_subclass(torch.Tensor).to(device) for i in range(len(val))]

    plain, step2 = detectors.values()
    same_class = type(plain) is type(step2)
    shapes = [{k: tuple(v.shape) for k, v in d.state_dict().items()} for d in (plain, step2)]
    same_tensors = shapes[0] == shapes[1]
    counts = {name: count(d) for name, d in detectors.items()}
    training_params = count(training)[0]

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    batches = [images[(i * args.batch) % len(images):][: args.batch] or images[: args.batch]
               for i in range(len(images))]
    times: dict[str, list[float]] = {name: [] for name in detectors}
    dets: dict[str, list[int]] = {name: [] for name in detectors}
    names = list(detectors)
    print(f"timing {args.warmup} + {args.repeats} interleaved rounds ...", file=sys.stderr, flush=True)
    with torch.no_grad():
        for r in range(args.warmup + args.repeats):
            batch = batches[r % len(batches)]
            for name in (names if r % 2 == 0 else names[::-1]):
                sync()
                start = time.perf_counter()
                out = detectors[name](batch)
                sync()
                elapsed = (time.perf_counter() - start) * 1e3
                if r >= args.warmup:
                    times[name].append(elapsed)
                    dets[name].append(sum(len(o["boxes"]) for o in out))
    ratios = [s / p for p, s in zip(times[names[0]], times[names[1]])]
    median = {name: statistics.median(t) for name, t in times.items()}
    quart = {name: statistics.quantiles(t, n=4) for name, t in times.items()}

    info = machine_info(device)
    print(machine_header(info))
    m = cfg.model
    print(f"\n{m.family} {m.backbone} FPN-{m.fpn_channels}, {len(class_names)} classes, input {m.min_size}/"
          f"{m.max_size} px, {args.iters}-iteration tiny runs on synthetic {images[0].shape[-1]}-px images; forward of "
          f"{args.batch} image(s), eval, no_grad, {args.repeats} interleaved rounds after {args.warmup} warm-up.\n")
    print("| detector | class | parameters | buffers | median ms | p25-p75 ms | detections / forward |")
    print("|---|---|---|---|---|---|---|")
    for name, d in detectors.items():
        cls = f"{type(d).__module__}.{type(d).__name__}"
        print(f"| {name} | `{cls}` | {counts[name][0]:,} | {counts[name][1]:,} | {median[name]:.1f} "
              f"| {quart[name][0]:.1f}-{quart[name][2]:.1f} | {statistics.fmean(dets[name]):.1f} |")
    print(f"\nsame class: {same_class}; same parameter / buffer names and shapes: {same_tensors}; parameters "
          f"equal: {counts[names[0]][0] == counts[names[1]][0]}")
    print(f"Step-2 training module (detector + adaption nets + frozen h): {training_params:,} parameters, of which "
          f"{training_params - counts[names[1]][0]:,} are left behind in the exported detector")
    print(f"latency Step 2 / plain: ratio of medians {median[names[1]] / median[names[0]]:.3f}, median of per-round "
          f"ratios {statistics.median(ratios):.3f} (p25-p75 {statistics.quantiles(ratios, n=4)[0]:.3f}-"
          f"{statistics.quantiles(ratios, n=4)[2]:.3f})")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other jobs share this "
              "machine, timings are noisy")
    if args.json:
        payload = {"header": info, "args": vars(args), "same_class": same_class, "same_tensors": same_tensors,
                   "parameters": {k: v[0] for k, v in counts.items()}, "training_parameters": training_params,
                   "median_ms": median, "ratios": ratios, "times_ms": times, "detections": dets}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if not (same_class and same_tensors):
        raise SystemExit("the Step-2 detector is not the plain detector of the config")


if __name__ == "__main__":
    main()
