"""The ``labelenc`` command: data generation, training (baseline, Step 1, Step 2), evaluation, the full pipeline,
the ablation tables and export."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from labelenc.engine.distributed import shutdown_distributed
from labelenc.errors import UserError, error_text
from labelenc.stages import STAGES, Stage
from labelenc.tables import TABLES

EXAMPLES = {
    "synth": "labelenc data synth --out data/synth --seed 0\n  labelenc data synth --out data/big --num-train 500 --image-size 256",
    "convert": "labelenc data convert --from voc data/VOCdevkit/VOC2007 --split trainval --out data/voc07_trainval.json\n"
    "  labelenc data convert --from yolo data/shapes --split train --out data/shapes_train.json --classes circle,square\n"
    "  labelenc data convert --from yolo data/shapes --out data/shapes.json --classes data/shapes/classes.txt",
    "check": "labelenc data check configs/demo_cpu.yaml\n  labelenc data check my_voc.yaml --strict\n"
    "  labelenc data check configs/demo_cpu.yaml data.strict=true",
    "train": "labelenc train configs/demo_cpu.yaml\n  labelenc train configs/demo_cpu.yaml --resume\n"
    "  labelenc train configs/demo_cpu.yaml train.batch_size=8 output_dir=runs/b8\n"
    "  labelenc train configs/demo_cpu.yaml --init-weights runs/demo/model_final.pth output_dir=runs/finetune",
    "eval": "labelenc eval configs/demo_cpu.yaml --weights runs/demo/seed0/baseline_1x/model_final.pth",
    "step1": "labelenc step1 configs/demo_cpu.yaml output_dir=runs/step1",
    "step2": "labelenc step2 configs/demo_cpu.yaml --label-encoder runs/step1/label_encoder.pth output_dir=runs/step2",
    "pipeline": "labelenc pipeline configs/demo_cpu.yaml\n"
    "  labelenc pipeline configs/demo_cpu.yaml --seeds 0,1,2 --jobs 2\n"
    "  labelenc pipeline configs/demo_cpu.yaml --skip-baselines --label-encoder runs/demo/seed0/step1/label_encoder.pth",
    "ablate": "labelenc ablate configs/demo_cpu.yaml --table 2\n"
    "  labelenc ablate configs/demo_cpu.yaml --table 3 --other-backbone resnet34\n"
    "  labelenc ablate configs/demo_cpu.yaml --table 4\n"
    "  labelenc ablate configs/demo_cpu.yaml --table 5\n"
    "  labelenc ablate configs/demo_cpu.yaml --table 6 --seeds 0,1,2\n"
    "  labelenc ablate configs/demo_cpu.yaml --table 6 --teacher runs/demo/seed0/baseline_2x/model_final.pth "
    "output_dir=runs/kd\n"
    "  labelenc ablate configs/demo_cpu.yaml --table 7 model.family=mask_rcnn output_dir=runs/mask",
    "export": "labelenc export configs/demo_cpu.yaml --weights runs/demo/seed0/step2/model_final.pth --format onnx "
    "--out runs/demo/detector.onnx\n"
    "  labelenc export configs/demo_cpu.yaml --weights runs/demo/seed0/step2/model_final.pth --format torchscript "
    "--out runs/demo/detector.pt",
}


def _parser(name: str, sub, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help, description=help, epilog=f"examples:\n  {EXAMPLES[name]}" if name in EXAMPLES else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.base_iters=300")


def _jobs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train up to N runs at once, each in its own process with 1/N of the CPU threads (runs "
                   "that wait for another's output start when it is written); with train.threads set, the numbers "
                   "do not depend on N")


def _stage_parser(stage: Stage, sub) -> None:
    """One training command per registered stage: config, overrides, resume / load options and the stage's inputs."""
    p = _parser(stage.command, sub, stage.help)
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in output_dir")
    p.add_argument("--init-weights", metavar="FILE", default=None,
                   help="start from these detector weights (model_final.pth or a checkpoint) at iteration 0")
    group = p.add_mutually_exclusive_group(required=True) if stage.one_input_of else p
    for run_input in stage.inputs:
        group.add_argument(run_input.flag, dest=run_input.name, required=not stage.one_input_of,
                           metavar="FILE", help=run_input.help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labelenc",
        description="LabelEnc (ECCV 2020) for torchvision detectors: train a label encoder (step1), use it to "
        "supervise a detector's backbone (step2), and compare with baselines (pipeline).",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES[k] for k in ("synth", "train", "pipeline")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser(
        "data", help="dataset tools: synth, convert, check",
        description="dataset tools: write the synthetic dataset (synth), convert VOC / YOLO to COCO JSON (convert), "
        "validate a config's data (check)",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES[k] for k in ("synth", "convert", "check")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    synth = _parser("synth", data_sub, "write the embedded synthetic COCO-format dataset (train and val splits)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--num-train", type=int, default=256)
    synth.add_argument("--num-val", type=int, default=64)
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--num-classes", type=int, default=4)
    synth.add_argument("--max-objects", type=int, default=6, help="objects per image at most (before occlusion)")
    synth.add_argument("--min-object-size", type=int, default=8,
                       help="shortest box side in pixels before occlusion (sides are log-uniform up to 0.7 of the "
                       "image)")
    convert = _parser(
        "convert", data_sub,
        "convert a Pascal VOC or YOLO dataset to one COCO JSON file (validated; boxes clipped, empty ones dropped); "
        "its image file names are relative to SRC, so use it as {annotations: OUT, images: SRC}",
    )
    convert.add_argument("--from", dest="source_format", required=True, choices=["voc", "yolo"],
                         help="format of SRC")
    convert.add_argument("src", metavar="SRC", help="voc: a VOC year folder (Annotations/, JPEGImages/, ImageSets/); "
                         "yolo: the folder holding images/ and labels/")
    convert.add_argument("--out", required=True, help="COCO JSON file to write")
    convert.add_argument("--split", default=None,
                         help="voc: ImageSets/Main/SPLIT.txt (default: all annotations); "
                         "yolo: images/SPLIT and labels/SPLIT")
    convert.add_argument("--classes", default=None,
                         help="class names a,b,c (or a file, one per line) in category-id order; default: voc infers "
                         "the sorted object names, yolo reads SRC/classes.txt or SRC/data.yaml")
    check = _parser(
        "check", data_sub,
        "validate the train and val data of a config (every image fully decoded): list every problem with its file "
        "and annotation id; exit 2 on errors (and on warnings with --strict)",
    )
    _config_args(check)
    check.add_argument("--strict", action="store_true", help="warnings (clipped or dropped boxes) fail the check too")

    stages = list(STAGES.values())
    _stage_parser(stages[0], sub)
    ev = _parser("eval", sub, "COCO-evaluate a weights file on the config's validation split")
    _config_args(ev)
    ev.add_argument("--weights", required=True, help="model_final.pth or a checkpoint_*.pth")
    for stage in stages[1:]:
        _stage_parser(stage, sub)
    pipe = _parser("pipeline", sub, "baseline 1x, baseline 2x, Step 1 and Step 2 on the same data; report table")
    _config_args(pipe)
    pipe.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (default: train.seed)")
    pipe.add_argument("--skip-baselines", action="store_true", help="run only Step 1 and Step 2")
    pipe.add_argument("--label-encoder", default=None, help="reuse this Step-1 label encoder instead of running step1")
    pipe.add_argument("--overwrite", action="store_true", help="replace previous runs in output_dir")
    _jobs_arg(pipe)
    ablate = _parser(
        "ablate", sub,
        "run the runs one of the paper's ablation tables needs (reusing finished runs in output_dir) and write "
        "output_dir/tableN.md, .json and .png: ours beside the paper's numbers, with paired seed statistics. "
        "2: reconstruction-only Step 1; 3: label encoder from another backbone's Step 1; 4: Step-1 detector alone; "
        "5: supervision vs initialisation in Step 2; 6: knowledge distillation; 7: Mask R-CNN",
    )
    _config_args(ablate)
    ablate.add_argument("--table", type=int, required=True, choices=sorted(TABLES), help="the paper's table number")
    ablate.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (default: train.seed)")
    ablate.add_argument("--other-backbone", default=None, metavar="NAME",
                        help="table 3: the Step-1 backbone whose label encoder is reused (required); table 6: the "
                        "teacher's backbone (default: the config's own)")
    ablate.add_argument("--teacher", default=None, metavar="FILE",
                        help="table 6: a trained teacher's model_final.pth (default: train one)")
    ablate.add_argument("--overwrite", action="store_true", help="replace previous runs in output_dir")
    _jobs_arg(ablate)
    export = _parser(
        "export", sub,
        "write the plain detector as TorchScript or ONNX and check the file against the PyTorch model on the "
        "config's validation images (PASS, or FAIL with exit 2 and the file renamed *.parity-failed.*)",
    )
    _config_args(export)
    export.add_argument("--weights", required=True, help="model_final.pth or a checkpoint_*.pth")
    export.add_argument("--format", required=True, choices=["torchscript", "onnx"], dest="export_format",
                        help="torchscript (torch.jit.script) or onnx (opset 17; needs pip install 'labelenc[export]')")
    export.add_argument("--out", required=True, help="file to write, e.g. runs/demo/detector.onnx")
    export.add_argument("--score-thresh", type=float, default=None,
                        help="score threshold saved in the exported model (default: torchvision's, 0.05; FCOS 0.2)")
    return parser


def _print_metrics(metrics: dict) -> None:
    for iou_type, values in metrics.items():
        shown = "  ".join(f"{k} {'n/a' if v is None else f'{100 * v:.1f}'}" for k, v in values.items())
        print(f"{iou_type}: {shown}")


def _data_convert(args: argparse.Namespace) -> None:
    from labelenc.data.formats import parse_class_names, voc_to_coco, write_coco, yolo_to_coco
    from labelenc.data.problems import DataValidationError, Problem, summarize
    from labelenc.data.validate import validate_coco

    convert = voc_to_coco if args.source_format == "voc" else yolo_to_coco
    problems: list[Problem] = []
    dataset = convert(args.src, args.split, parse_class_names(args.classes), problems)
    cleaned, found = validate_coco(dataset, args.src, args.src, check_pixels=False)
    problems += found
    if any(p.severity == "error" for p in problems):
        raise DataValidationError({args.src: problems})
    for problem in problems:
        print(problem, file=sys.stderr)
    out = write_coco(cleaned, args.out)
    print(f"{args.src}: {summarize({args.src: problems})}", file=sys.stderr)
    print(json.dumps({"annotations": str(out), "images": args.src, "num_images": len(cleaned["images"]),
                      "num_annotations": len(cleaned["annotations"]),
                      "classes": [c["name"] for c in cleaned["categories"]]}))


def _data_check(args: argparse.Namespace) -> None:
    from labelenc.config import load_config
    from labelenc.data.problems import summarize
    from labelenc.data.validate import check_data, report_problems
    from labelenc.models.detectors import FAMILIES

    cfg = load_config(args.config, args.overrides)
    checked = check_data(cfg, need_masks=FAMILIES[cfg.model.family].with_masks, check_pixels=True)
    report_problems(checked, strict=args.strict or cfg.data.strict, log=False)
    for split in checked.values():
        for problem in split.problems:
            print(problem)
    summary = summarize({name: split.problems for name, split in checked.items()})
    images = ", ".join(f"{name}: {len(split.dataset['images'])} images, {len(split.dataset['annotations'])} "
                       f"annotations" for name, split in checked.items())
    print(f"data check passed: {summary}; {images}")


def _dispatch_data(args: argparse.Namespace) -> None:
    if args.data_command == "convert":
        _data_convert(args)
        return
    if args.data_command == "check":
        _data_check(args)
        return
    from labelenc.data.synth import generate_synthetic_dataset

    paths = generate_synthetic_dataset(
        args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
        image_size=args.image_size, num_classes=args.num_classes, max_objects=args.max_objects,
        min_object_size=args.min_object_size,
    )
    print(json.dumps({k: str(v) for k, v in paths.items()}))


def _seeds(text: str | None, cfg) -> list[int]:
    """``--seeds 0,1,2`` as a list (default: the config's ``train.seed``); a malformed list is a clear error."""
    if not text:
        return [cfg.train.seed]
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: a seed is repeated")
    return seeds


def _dispatch(args: argparse.Namespace) -> None:
    from labelenc.config import load_config

    if args.command == "data":
        _dispatch_data(args)
        return
    cfg = load_config(args.config, args.overrides)
    if args.command == "pipeline":
        from labelenc.pipeline import run_pipeline

        run_pipeline(cfg, _seeds(args.seeds, cfg), args.skip_baselines, args.label_encoder, args.overwrite,
                     args.jobs)
        return
    if args.command == "ablate":
        from labelenc.experiments import run_experiment

        experiment = TABLES[args.table](cfg, args.other_backbone)
        given = {"teacher": args.teacher} if args.teacher else {}
        if args.teacher and args.table != 6:
            raise UserError(f"--teacher is for table 6 (knowledge distillation), not table {args.table}")
        run_experiment(cfg, experiment, _seeds(args.seeds, cfg), given, args.overwrite, f"table{args.table}",
                       args.jobs)
        return
    from labelenc import runner

    if args.command == "eval":
        _print_metrics(runner.evaluate(cfg, args.weights))
        return
    if args.command == "export":
        from labelenc.export import export_detector

        report = export_detector(cfg, args.weights, args.export_format, args.out, args.score_thresh)
        print("\n".join(report.lines()))
        if not report.passed:
            raise UserError(report.failure())
        return
    stage = next(stage for stage in STAGES.values() if stage.command == args.command)
    inputs = {i.name: getattr(args, i.name) for i in stage.inputs if getattr(args, i.name)}
    result = runner.train(cfg, stage.name, inputs, args.resume, args.overwrite, args.init_weights)
    if result.weights is not None:  # a stage that trains no detector (step1-recon) writes its outputs only
        print(f"weights: {result.weights}")
    for name, path in result.outputs.items():
        print(f"{name.replace('_', ' ')}: {path}")
    _print_metrics(result.metrics)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides accepted anywhere after the config, before or after options."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 logs and prints results
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not main_process:
        sys.stdout = open(os.devnull, "w")

    try:
        _dispatch(args)
    except UserError as err:
        print(f"labelenc: error: {error_text(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labelenc: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
