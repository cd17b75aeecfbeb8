"""Training-step cost of LabelEnc vs the plain detector: Baseline, Step 1 and Step 2 on the same batches.

Times full training iterations (forward + backward + optimizer step, through the package's own
``Trainer.run_step``) of the registered stages (``labelenc.stages.STAGES``: baseline, Step 1, Step 2 towards an
untrained h written by Step 1), each built by its own recipe around a freshly built detector with the same
initialisation, on the same batches, with
the run's optimizer, LR schedule and loss-weight schedules. Reports the median
ms/iteration over ``--iters`` timed iterations after ``--warmup`` untimed ones, the ratio to the baseline of the same
run, peak memory, and parameter counts (trainable, and of the exported detector, which must be identical for all
variants: LabelEnc adds no inference cost).

Each variant runs in its own subprocess (``--in-process`` to run them one after the other in this process), and the
variants are stepped in lockstep, one iteration each in rotating order, so that load changes on a shared machine
hit all of them alike. Memory is that process's own: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak
resident set size (``ru_maxrss``), with how far the training iterations raised it above the set-up peak (interpreter,
torch, batches and model). ``--in-process`` gives CUDA peaks (reset per variant) but no CPU memory figure.

Usage: python benchmarks/bench_train_step.py [--config configs/demo_cpu.yaml] [--family fcos] [--device cuda]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
from _common import machine_header, machine_info

from labelenc.config import Config, load_config
from labelenc.data.loader import build_datasets, build_train_loader
from labelenc.engine.hooks import LossWeights
from labelenc.engine.trainer import Trainer, move_to_device
from labelenc.errors import UserError
from labelenc.method import loss_feature_distance
from labelenc.models import FAMILIES, build_detector
from labelenc.runner import build_lr_scheduler, build_optimizer
from labelenc.stages import STAGES, Objective

# variant: (description, stage, phase); the phase picks the iteration whose loss weights are timed
VARIANTS = {
    "baseline": ("Baseline(detector)", "baseline", "first"),
    "step1": ("Step1(detector, h), λ2=1 (full cost)", "step1", "after_warmup"),
    "step1_warmup": ("Step1 warm-up, λ2=0 (no A, no L_dis)", "step1", "first"),
    "step2": ("Step2(detector, frozen h), λ=1", "step2", "first"),
    "floor": ("floor: baseline + A fwd/bwd + frozen-h fwd, each timed alone", "baseline", "first"),
}
DEFAULT_VARIANTS = ["baseline", "step1", "step1_warmup", "step2", "floor"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo_cpu.yaml", help="YAML run config")
    parser.add_argument("--family", choices=sorted(FAMILIES), help="override model.family")
    parser.add_argument("--backbone", help="override model.backbone (e.g. resnet18, resnet50)")
    parser.add_argument("--size", type=int, help="override model.min_size (and model.max_size unless --max-size)")
    parser.add_argument("--max-size", type=int, help="override model.max_size")
    parser.add_argument("--batch", type=int, help="override train.batch_size (images per iteration)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="override train.device")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config override, e.g. --set labelenc.encoder_width=1.0 (repeatable)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per variant before timing")
    parser.add_argument("--max-batches", type=int, default=8,
                        help="distinct batches prepared (cycled when warmup + iters is larger)")
    parser.add_argument("--num-classes", type=int, default=80, help="classes of synthesized data (no dataset)")
    parser.add_argument("--synthetic", action="store_true", help="synthesize batches even if the dataset exists")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--in-process", action="store_true",
                        help="run the variants one after the other in this process (CPU: no memory figure)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = []
    if args.family:
        overrides.append(f"model.family={args.family}")
        if FAMILIES[args.family].anchor_generator_arg is None:  # e.g. FCOS: points by stride, no anchor sizes
            overrides.append("model.anchor_sizes=null")
    if args.backbone:
        overrides.append(f"model.backbone={args.backbone}")
    if args.size:
        overrides.append(f"model.min_size={args.size}")
        overrides.append(f"model.max_size={args.max_size or args.size}")
    elif args.max_size:
        overrides.append(f"model.max_size={args.max_size}")
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    return load_config(args.config, overrides + list(args.set))


def device_of(cfg: Config) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def synthetic_batch(cfg: Config, num_classes: int, with_masks: bool, g: torch.Generator):
    """Random images (the resize target's size) with 1-8 random boxes of random classes each."""
    height = cfg.model.min_size
    width = min(cfg.model.max_size, round(height * 4 / 3))
    images, targets = [], []
    for _ in range(cfg.train.batch_size):
        n = int(torch.randint(1, 9, (), generator=g))
        wh = torch.rand(n, 2, generator=g) * torch.tensor([width / 2, height / 2]) + 4
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([width, height]) - wh)
        boxes = torch.cat([xy, xy + wh], 1)
        target = {"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (n,), generator=g)}
        if with_masks:
            masks = torch.zeros(n, height, width, dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in zip(masks, boxes.round().long().tolist()):
                m[y1:y2, x1:x2] = 1
            target["masks"] = masks
        images.append(torch.rand(3, height, width, generator=g))
        targets.append(target)
    return images, targets


def prepare(cfg: Config, args: argparse.Namespace):
    """The batches (same for every variant, deterministic from the seed), class names and their source."""
    family = FAMILIES[cfg.model.family]
    count = max(1, min(args.warmup + args.iters, args.max_batches))
    train_set = None
    if not args.synthetic:
        try:
            train_set, _ = build_datasets(cfg, with_masks=family.with_masks)
        except UserError as err:
            print(f"dataset not usable ({str(err).splitlines()[0]}); using synthetic batches")
    if train_set is not None:
        loader_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_workers": 0})})
        batches = list(itertools.islice(build_train_loader(train_set, loader_cfg, start_iter=0), count))
        names, source = train_set.class_names, f"dataset {train_set.annotation_file} ({len(train_set)} images)"
    else:
        g = torch.Generator().manual_seed(cfg.train.seed)
        batches = [synthetic_batch(cfg, args.num_classes, family.with_masks, g) for _ in range(count)]
        names = [f"class{i}" for i in range(args.num_classes)]
        source = f"synthetic ({args.num_classes} classes)"
    return batches, names, source


def fingerprint(batches) -> str:
    """A hash of the batch contents, to check that every subprocess trained on the same data."""
    h = hashlib.sha256()
    for images, targets in batches:
        for image, target in zip(images, targets):
            h.update(image.numpy().tobytes())
            for key in sorted(target):
                h.update(key.encode() + target[key].numpy().tobytes())
    return h.hexdigest()[:16]


def build_variant(name: str, cfg: Config, class_names: list[str], workdir: Path) -> tuple[Objective, int]:
    """The objective of one variant, built by its stage's recipe around a detector initialised from the seed, and
    the iteration it is timed at (Step 1 after its warm-up has the full cost; Step 2 reads an untrained h that a
    Step-1 recipe writes to ``workdir``)."""
    _, stage, phase = VARIANTS[name]
    inputs: dict[str, str] = {}
    if stage == "step2" or name == "floor":
        torch.manual_seed(cfg.train.seed)
        step1 = STAGES["step1"].build(cfg, build_detector(cfg.model, len(class_names)), class_names, {})
        inputs = {k: str(v) for k, v in step1.save_outputs(workdir, cfg.model_dump(mode="json")).items()}
    torch.manual_seed(cfg.train.seed)
    objective = STAGES[stage].build(cfg, build_detector(cfg.model, len(class_names)), class_names, inputs)
    if name == "floor":  # the Step-2 parts, to be timed on their own beside the baseline step
        step2 = STAGES["step2"].build(cfg, build_detector(cfg.model, len(class_names)), class_names, inputs).model
        objective.model.add_module("target", step2.target)
        objective.model.add_module("adaption", step2.adaption)
    return objective, objective.lr_offset if phase == "after_warmup" else 0


def count(params) -> int:
    return sum(p.numel() for p in params)


class VariantRun:
    """One variant ready to train on the batches: ``step()`` runs one ``Trainer.run_step``, ``result()`` sums up."""

    def __init__(self, name: str, cfg: Config, args: argparse.Namespace, batches, class_names: list[str]) -> None:
        self.name, self.warmup, self.batches = name, args.warmup, batches
        self.device = device_of(cfg)
        with tempfile.TemporaryDirectory() as workdir:
            objective, start_iter = build_variant(name, cfg, class_names, Path(workdir))
        self.model = objective.model.to(self.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = build_optimizer(cfg, self.model)
        build_lr_scheduler(cfg, optimizer, objective.lr_offset)  # sets the run's first LR; it is not stepped
        self.on_device = [move_to_device(b, self.device) for b in batches]
        self.data = itertools.cycle(self.on_device)
        self.parts_ms: dict[str, list[float]] = {"baseline step": [], "frozen h fwd": [], "A + L_dis fwd/bwd": []}
        self.trainer = Trainer(self.model, optimizer, self.data, start_iter + args.warmup + args.iters, self.device,
                               [LossWeights(objective.weight_schedules)], cfg.train.grad_clip, cfg.train.amp)
        self.trainer.iter = start_iter
        self.ms: list[float] = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.setup_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        torch.manual_seed(cfg.train.seed)  # the Step-1 box jitter draws from the global RNG

    def step(self) -> float:
        """One training iteration; its compute time in ms (the batch is already on the device)."""
        for hook in self.trainer.hooks:  # the loss weights of this iteration
            hook.before_step(self.trainer)
        batch = self.on_device[len(self.ms) % len(self.on_device)]  # the one run_step takes from the cycle
        self.trainer.run_step(self.data)  # forward, backward, optimizer step; .item() of the losses syncs CUDA
        self.trainer.iter += 1
        metrics = self.trainer.metrics
        self.ms.append((metrics["time"] - metrics["data_time"]) * 1e3)
        if self.name == "floor":
            self.ms[-1] += self._step2_parts(batch)
        return self.ms[-1]

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _step2_parts(self, batch) -> float:
        """Time what Step 2 must add to a baseline step at the least, each part alone: the frozen h (label maps
        included) forward, and the adaption net A with L_dis forward and backward on the step's features."""
        model, (images, targets) = self.model, batch
        dtype = self.trainer.amp_dtype
        autocast = {"device_type": self.device.type, "dtype": dtype, "enabled": dtype is not None}
        self.parts_ms["baseline step"].append(self.ms[-1])
        with torch.no_grad(), torch.autocast(**autocast):
            image_list, targets = model.detector.transform(images, targets)
            features = model.detector.backbone(image_list.tensors)
            start = self._sync()
            encoded = model.target(image_list, targets)
            h_ms = (self._sync() - start) * 1e3
        features = OrderedDict((k, v.detach().requires_grad_()) for k, v in features.items())
        start = self._sync()
        with torch.autocast(**autocast):
            loss = loss_feature_distance(model.adaption(features), encoded)
        loss.backward()
        a_ms = (self._sync() - start) * 1e3
        model.adaption.zero_grad(set_to_none=True)
        self.parts_ms["frozen h fwd"].append(h_ms)
        self.parts_ms["A + L_dis fwd/bwd"].append(a_ms)
        return h_ms + a_ms

    def result(self) -> dict:
        timed = self.ms[self.warmup:]
        detector = self.model.detector
        exported = detector.state_dict()
        result = {
            "variant": self.name,
            "ms_median": statistics.median(timed),
            "ms_min": min(timed),
            "ms_max": max(timed),
            "ms_all": self.ms,
            "trainable_params": count(self.trainable),
            "trainable_detector_params": count(p for p in detector.parameters() if p.requires_grad),
            "extra_params": count(self.model.parameters()) - count(detector.parameters()),
            "exported_params": count(detector.parameters()),
            "exported_state_numel": sum(v.numel() for v in exported.values()),
            "exported_signature": hashlib.sha256(
                json.dumps([(k, list(v.shape), str(v.dtype)) for k, v in exported.items()]).encode()
            ).hexdigest()[:16],
            "loss_terms": sorted(k for k in self.trainer.metrics if k not in ("loss", "lr", "time", "data_time")),
            "data_fingerprint": fingerprint(self.batches),
            "parts_ms_median": {k: statistics.median(v[self.warmup:]) for k, v in self.parts_ms.items() if v},
            "peak_cuda_mb": None,
            "peak_rss_mb": None,
            "rss_growth_mb": None,
        }
        if self.device.type == "cuda":
            result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return result


def child_main(args: argparse.Namespace) -> None:
    """Subprocess mode: set up one variant, then run one step per 'step' line on stdin; 'done' prints the result."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve_config(args)
    batches, names, _ = prepare(cfg, args)
    run = VariantRun(args._child, cfg, args, batches, names)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            print(f"{run.step()}", flush=True)
        elif line.strip() == "done":
            result = run.result()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process only
            result.update(peak_rss_mb=peak, rss_growth_mb=peak - run.setup_rss_mb)
            print(json.dumps(result), flush=True)
            return


class _Child:
    """A variant in its own process, stepped on request (so variants can be interleaved iteration by iteration)."""

    def __init__(self, name: str) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--_child", name]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("ready")

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> str:
        reply = self.proc.stdout.readline()
        if not reply:
            raise SystemExit(f"benchmark subprocess {self.proc.args[-1]} died (exit {self.proc.wait()})")
        return reply.strip()

    def _expect(self, text: str) -> None:
        if self._read() != text:
            raise SystemExit("unexpected reply from a benchmark subprocess")

    def step(self) -> float:
        return float(self._ask("step"))

    def result(self) -> dict:
        result = json.loads(self._ask("done"))
        self.proc.wait()
        return result


def run_interleaved(runs: list, steps: int) -> list[dict]:
    """Step the variants round-robin, rotating who goes first, so that load drift on a shared machine hits all."""
    for i in range(steps):
        for k in range(len(runs)):
            runs[(i + k) % len(runs)].step()
        print(f"  iteration {i + 1}/{steps} done for all variants", file=sys.stderr, flush=True)
    return [r.result() for r in runs]


def main() -> None:
    args = parse_args()
    if args._child:
        return child_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve_config(args)
    device = device_of(cfg)
    batches, names, source = prepare(cfg, args)
    info = machine_info(device)
    subprocesses = not args.in_process

    steps = args.warmup + args.iters
    if subprocesses:  # each variant in its own process (isolated peak RSS / CUDA peak), stepped in lockstep
        children = []
        for name in args.variants:
            print(f"setting up {name} in a subprocess ...", file=sys.stderr, flush=True)
            children.append(_Child(name))
        results = run_interleaved(children, steps)
    else:  # one variant after the other in this process; each is freed before the next
        results = []
        for name in args.variants:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            run = VariantRun(name, cfg, args, batches, names)
            results.append(run_interleaved([run], steps)[0])
            del run
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if len({r["data_fingerprint"] for r in results} | {fingerprint(batches)}) != 1:
        raise SystemExit("the variants did not train on the same batches")

    m = cfg.model
    print(machine_header(info))
    print(f"\n{m.family} {m.backbone} FPN-{m.fpn_channels}, min/max size {m.min_size}/{m.max_size}, "
          f"batch {cfg.train.batch_size}, encoder width {cfg.labelenc.encoder_width}, amp {cfg.train.amp}; "
          f"data: {source}, {len(batches)} distinct batch(es), the same for every variant; "
          f"median of {args.iters} timed iterations after {args.warmup} warm-up\n")
    base = next((r for r in results if r["variant"] == "baseline"), results[0])
    mem_key = "peak_cuda_mb" if device.type == "cuda" else "peak_rss_mb"
    mem_label = "peak CUDA MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"| variant | ms/iter (median) | min-max | ratio | {mem_label} | ratio | RSS growth MiB "
          "| trainable params | exported detector params |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mem = r[mem_key]
        mem_s = "n/a" if mem is None else f"{mem:.0f}"
        mem_ratio = "n/a" if mem is None or base[mem_key] is None else f"{mem / base[mem_key]:.2f}"
        growth = "n/a" if r["rss_growth_mb"] is None else f"{r['rss_growth_mb']:.0f}"
        r["ratio_vs_baseline"] = r["ms_median"] / base["ms_median"]
        print(f"| {VARIANTS[r['variant']][0]} | {r['ms_median']:.0f} | {r['ms_min']:.0f}-{r['ms_max']:.0f} "
              f"| {r['ratio_vs_baseline']:.2f} | {mem_s} | {mem_ratio} | {growth} "
              f"| {r['trainable_params'] / 1e6:.2f}M | {r['exported_params'] / 1e6:.3f}M |")

    for r in results:
        if r["parts_ms_median"]:
            parts = ", ".join(f"{k} {v:.0f} ms" for k, v in r["parts_ms_median"].items())
            print(f"\n{r['variant']}: medians of its parts, each timed alone: {parts}")
    ratios = {r["variant"]: r for r in results}
    targets = [("step2", "ms", 1.15), ("step2", "mem", 1.2), ("step1", "ms", 1.6)]
    print("\ntargets (issue 10): Step 2 <= 1.15x the baseline's time and <= 1.2x its memory; Step 1 <= 1.6x its time")
    for variant, what, limit in targets:
        if variant not in ratios:
            continue
        r = ratios[variant]
        ratio = r["ratio_vs_baseline"] if what == "ms" else (
            None if r[mem_key] is None or base[mem_key] is None else r[mem_key] / base[mem_key])
        if ratio is None:
            continue
        verdict = "met" if ratio <= limit else f"MISSED by {ratio - limit:.2f} ({100 * (ratio / limit - 1):.0f}%)"
        print(f"- {variant} {'time' if what == 'ms' else 'memory'}: {ratio:.2f}x (target {limit}x): {verdict}")
    same = len({(r["exported_params"], r["exported_state_numel"], r["exported_signature"]) for r in results}) == 1
    print(f"\nzero inference cost: the exported detector (state_dict keys, shapes, dtypes; {base['exported_params']:,} "
          f"parameters, {base['exported_state_numel']:,} tensor elements) is "
          f"{'IDENTICAL for all variants' if same else 'DIFFERENT between variants (!)'}; "
          f"h and the adaption net A are training-only")
    for r in results:
        if r["extra_params"]:
            print(f"- {r['variant']}: +{r['extra_params']:,} training-only parameters (h + A), "
                  f"trainable {r['trainable_params']:,} (detector {r['trainable_detector_params']:,})")
    print("\nnotes: Step-1 is timed with λ2=1; its first step1_warmup x base_iters iterations (λ2=0, no adaption net "
          "and no L_dis) cost the 'warm-up' row, and Step 2's last distance_cutoff fraction (λ=0) costs the baseline. "
          "Step 2 uses an untrained h (same cost as a trained one). Times are Trainer.run_step compute time "
          "(forward + backward + the config's optimizer step, batch already on the device), median; LR is the "
          "schedule's first value.")
    if device.type == "cuda":
        print("CUDA memory: torch.cuda.max_memory_allocated of each variant (model, optimizer state, batches, "
              "activations; not the CUDA context)")
    else:
        print("CPU memory: peak RSS of a fresh subprocess per variant (includes interpreter, torch and the batches); "
              "'RSS growth' is how far the training iterations raised it above the set-up peak."
              if subprocesses else "CPU memory: n/a (--in-process)")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other jobs share this "
              "machine, timings are noisy")
    if args.json:
        payload = {"header": info, "config": cfg.model_dump(mode="json"), "data": source,
                   "warmup": args.warmup, "iters": args.iters, "results": results, "exported_identical": same}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
