"""The ``labelenc`` command: data generation, training (baseline, Step 1, Step 2), evaluation, the full pipeline."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from labelenc.errors import UserError

EXAMPLES = {
    "synth": "labelenc data synth --out data/synth --seed 0\n  labelenc data synth --out data/big --num-train 2000 --image-size 256",
    "train": "labelenc train configs/demo_cpu.yaml\n  labelenc train configs/retinanet_r50_1x.yaml train.batch_size=8 output_dir=runs/r50\n"
    "  labelenc train configs/demo_cpu.yaml --resume",
    "eval": "labelenc eval configs/demo_cpu.yaml --weights runs/demo/baseline_1x/model_final.pth",
    "step1": "labelenc step1 configs/demo_cpu.yaml output_dir=runs/step1",
    "step2": "labelenc step2 configs/demo_cpu.yaml --label-encoder runs/step1/label_encoder.pth output_dir=runs/step2",
    "pipeline": "labelenc pipeline configs/demo_cpu.yaml\n  labelenc pipeline configs/demo_cpu.yaml --seeds 0,1,2\n"
    "  labelenc pipeline configs/demo_cpu.yaml --skip-baselines --label-encoder runs/demo/step1/label_encoder.pth",
}


def _parser(name: str, sub, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help, description=help, epilog=f"examples:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.base_iters=300")


def _run_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in output_dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labelenc",
        description="LabelEnc (ECCV 2020) for torchvision detectors: train a label encoder (step1), use it to "
        "supervise a detector's backbone (step2), and compare with baselines (pipeline).",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES[k] for k in ("synth", "train", "pipeline")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="dataset tools", description="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    synth = _parser("synth", data_sub, "write the embedded synthetic COCO-format dataset (train and val splits)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--num-train", type=int, default=256)
    synth.add_argument("--num-val", type=int, default=64)
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--num-classes", type=int, default=4)

    _run_args(_parser("train", sub, "train a plain detector (the baseline) and evaluate it"))
    ev = _parser("eval", sub, "COCO-evaluate a weights file on the config's validation split")
    _config_args(ev)
    ev.add_argument("--weights", required=True, help="model_final.pth or a checkpoint_*.pth")
    _run_args(_parser("step1", sub, "LabelEnc Step 1: learn the label encoder; writes label_encoder.pth"))
    step2 = _parser("step2", sub, "LabelEnc Step 2: train a detector supervised by a frozen label encoder")
    _run_args(step2)
    step2.add_argument("--label-encoder", required=True, help="label_encoder.pth written by step1")
    pipe = _parser("pipeline", sub, "baseline 1x, baseline 2x, Step 1 and Step 2 on the same data; report table")
    _config_args(pipe)
    pipe.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (default: train.seed)")
    pipe.add_argument("--skip-baselines", action="store_true", help="run only Step 1 and Step 2")
    pipe.add_argument("--label-encoder", default=None, help="reuse this Step-1 label encoder instead of running step1")
    pipe.add_argument("--overwrite", action="store_true", help="replace previous runs in output_dir")
    return parser


def _print_metrics(metrics: dict) -> None:
    for iou_type, values in metrics.items():
        shown = "  ".join(f"{k} {100 * v:.1f}" for k, v in values.items())
        print(f"{iou_type}: {shown}")


def _dispatch(args: argparse.Namespace) -> None:
    from labelenc.config import load_config

    if args.command == "data":
        from labelenc.data.synth import generate_synthetic_dataset

        paths = generate_synthetic_dataset(
            args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
            image_size=args.image_size, num_classes=args.num_classes,
        )
        print(json.dumps({k: str(v) for k, v in paths.items()}))
        return
    cfg = load_config(args.config, args.overrides)
    if args.command == "pipeline":
        from labelenc.pipeline import run_pipeline

        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [cfg.train.seed]
        run_pipeline(cfg, seeds, args.skip_baselines, args.label_encoder, args.overwrite)
        return
    from labelenc import runner

    if args.command == "eval":
        _print_metrics(runner.evaluate(cfg, args.weights))
        return
    stage = {"train": "baseline", "step1": "step1", "step2": "step2"}[args.command]
    result = runner.train(cfg, stage, getattr(args, "label_encoder", None), args.resume, args.overwrite)
    print(f"weights: {result.weights}")
    if result.label_encoder:
        print(f"label encoder: {result.label_encoder}")
    _print_metrics(result.metrics)


def _without_worker_traceback(message: str) -> str:
    """A DataLoader worker re-raises our error with its traceback in the message: keep the error's own text."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        _dispatch(args)
    except UserError as err:
        print(f"labelenc: error: {_without_worker_traceback(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labelenc: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
