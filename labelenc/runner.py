"""One training run (baseline, Step 1 or Step 2) or one evaluation, from a :class:`Config` to files on disk.

Data flows one way: config → datasets → detector (+ LabelEnc objective) → trainer → final weights → evaluation.
Only the main process writes files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from labelenc.config import Config, ConfigError, load_config, save_config
from labelenc.data.coco import CocoDetection
from labelenc.data.loader import build_datasets, build_eval_loader, build_train_loader, build_val_dataset
from labelenc.engine.checkpoint import Checkpointer, latest_checkpoint, load_file, save_file
from labelenc.engine.distributed import (
    all_gather_objects,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    local_device,
)
from labelenc.engine.hooks import (
    LossWeights,
    LRScheduler,
    MetricsWriter,
    PeriodicCheckpoint,
    ProgressBar,
    WeightAverage,
)
from labelenc.engine.optim import OPTIMIZERS
from labelenc.engine.schedule import WarmupMultiStep, scaled_lr
from labelenc.engine.trainer import Hook, Trainer, build_grad_scaler, move_to_device
from labelenc.errors import UserError
from labelenc.evaluation import CocoEvaluator
from labelenc.fileio import write_json_atomic, write_text_atomic
from labelenc.models import FAMILIES, build_detector
from labelenc.stages import STAGES, Objective, load_strictly, read_detector_weights

logger = logging.getLogger(__name__)

FINAL_WEIGHTS = "model_final.pth"
SUMMARY = "run_summary.json"
# Config keys that may differ on --resume: they change neither the model nor the batches nor the optimisation.
RESUMABLE_KEYS = ("train.max_bad_steps", "train.log_period", "train.checkpoint_period", "train.keep_checkpoints",
                  "data.num_workers", "data.strict", "model.download")


class RunDirError(UserError, RuntimeError):
    """The output directory holds another run that would be overwritten."""


@dataclass
class RunResult:
    """What a finished run wrote: its directory, final detector weights, COCO metrics and the stage's outputs.

    A stage that trains no detector has no weights (None) and no metrics (empty).
    """

    output_dir: Path
    weights: Path | None
    metrics: dict[str, dict[str, float]]
    wall_time: float
    outputs: dict[str, Path] = field(default_factory=dict)  # e.g. {"label_encoder": ...} for Step 1


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse to clobber a previous run unless asked: ``--resume`` continues it, ``--overwrite`` starts afresh.

    Returns whether the directory was created here (so that a run that fails before training can remove it).
    """
    has_run = (output_dir / FINAL_WEIGHTS).exists() or latest_checkpoint(output_dir) is not None
    if has_run and overwrite and is_main_process():
        shutil.rmtree(output_dir)
    elif has_run and not resume:
        raise RunDirError(f"{output_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    created = not output_dir.exists()
    if is_main_process():
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=output_dir).close()
        except OSError as err:
            raise RunDirError(f"output directory {output_dir} is not writable: {err.strerror}") from None
    return created


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def resume_config_changes(cfg: Config, output_dir: Path) -> dict[str, dict[str, object]]:
    """On resume the run's own ``config.yaml`` is the truth: refuse any difference that changes what is trained,
    naming each key; return the harmless ones (:data:`RESUMABLE_KEYS`) as ``{key: {"run": old, "now": new}}``."""
    path = output_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        saved = _flatten(load_config(path).model_dump(mode="json"))  # keys added since then take their defaults
    except ConfigError as err:
        raise RunDirError(f"--resume: cannot check the run against its own config: {err}") from None
    now = _flatten(cfg.model_dump(mode="json"))
    changed = {k: {"run": saved.get(k), "now": now.get(k)} for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k) and k != "output_dir"}  # a run may be moved to another folder
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE_KEYS}
    if refused:
        listed = "; ".join(f"{k}: run {v['run']!r}, now {v['now']!r}" for k, v in refused.items())
        raise RunDirError(
            f"--resume: this config differs from the run's own {path} ({listed}); resume with that file "
            f"(only {', '.join(RESUMABLE_KEYS)} may change) or start a new run in another output_dir"
        )
    return changed


def _record_config(cfg: Config, output_dir: Path, changes: dict) -> None:
    """Save the resolved config of a new run; a resumed run keeps it and logs harmless changes beside it."""
    path = output_dir / "config.yaml"
    if not path.is_file():
        save_config(cfg, path)
    elif changes:
        amendments = output_dir / "config_amendments.jsonl"
        previous = amendments.read_text() if amendments.is_file() else ""
        record = {"resumed": datetime.now(timezone.utc).isoformat(timespec="seconds"), "changes": changes}
        write_text_atomic(amendments, previous + json.dumps(record) + "\n")
        logger.info("--resume with changed %s: recorded in %s", ", ".join(changes), amendments)


def _configure_logging(output_dir: Path) -> logging.Handler | None:
    if not is_main_process():
        return None
    handler = logging.FileHandler(output_dir / "log.txt", delay=True)  # no empty log if nothing is ever logged
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("labelenc")
    for old in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def _close_log(handler: logging.Handler | None) -> None:
    """Detach a run's log file, so that nothing logged after the run (the next run's reuse, a report) lands in it."""
    if handler is not None:
        logging.getLogger("labelenc").removeHandler(handler)
        handler.close()


@dataclass
class RunSetup:
    device: torch.device
    output_dir: Path
    train_set: CocoDetection
    val_set: CocoDetection
    log: logging.Handler | None  # the run's log.txt on the main process, detached when the run ends


def start_run(
    cfg: Config, resume: bool, overwrite: bool,
    check_input_files: Callable[[list[str]], None] = lambda class_names: None,
) -> RunSetup:
    """Everything before the model: process group, run directory and log, seed, validated data, saved config.

    Nothing is written before the data passes validation and ``check_input_files(class names of the data)`` accepts
    the stage's input files: a directory created here is removed again if either fails.
    """
    device = local_device(cfg.train.device)
    init_distributed(device)
    output_dir = Path(cfg.output_dir)
    changes = resume_config_changes(cfg, output_dir) if resume else {}
    created = prepare_output_dir(output_dir, resume, overwrite)
    handler = _configure_logging(output_dir)
    torch.manual_seed(cfg.train.seed + get_rank())
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        train_set, val_set = build_datasets(cfg, with_masks=FAMILIES[cfg.model.family].with_masks)
        check_input_files(train_set.class_names)
    except UserError:
        _close_log(handler)
        if created and is_main_process() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    if is_main_process():
        _record_config(cfg, output_dir, changes)
    return RunSetup(device, output_dir, train_set, val_set, handler)


def num_classes_of(cfg: Config, train_set: CocoDetection) -> int:
    """The class count of the training data, refusing a ``model.num_classes`` that disagrees with it."""
    if cfg.model.num_classes is not None and cfg.model.num_classes != train_set.num_classes:
        raise UserError(
            f"model.num_classes={cfg.model.num_classes} but {train_set.annotation_file} has "
            f"{train_set.num_classes} categories"
        )
    return train_set.num_classes


def warn_of_cpu_bf16_convolutions(cfg: Config, device: torch.device) -> None:
    """Warn where torch's CPU bf16 convolution is known to compute wrong weight gradients: a 3x3 stride-2 conv
    whose input is one pixel wide (measured on torch 2.14.1: values up to 1e38 or inf, for input widths 1 and heights
    1-3), i.e. the FPN's P6 -> P7 conv wherever the resized image is at most 64 px wide."""
    if cfg.train.amp == "bf16" and device.type == "cpu" and cfg.model.min_size <= 64:
        logger.warning(
            "train.amp=bf16 on the CPU with model.min_size=%d: torch's CPU bf16 convolution gives wrong weight "
            "gradients (up to inf) for one-pixel-wide inputs, which the P7 conv of images at most 64 px wide has; "
            "use train.amp=off here", cfg.model.min_size)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """``train.optimizer`` over the trainable parameters, at the LR scaled linearly from the reference batch to
    ``train.batch_size``."""
    lr = scaled_lr(cfg.train.base_lr, cfg.train.reference_batch_size, cfg.train.batch_size)
    logger.info("global batch %d on %d process(es), lr %.5g (base %.5g for batch %d)", cfg.train.batch_size,
                get_world_size(), lr, cfg.train.base_lr, cfg.train.reference_batch_size)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    bias_lr, bias_decay = lr * cfg.train.bias_lr_factor, cfg.train.bias_weight_decay
    if bias_lr == lr and bias_decay in (None, cfg.train.weight_decay):
        groups = [{"params": [p for _, p in params]}]
    else:  # detectron2's BIAS_LR_FACTOR / WEIGHT_DECAY_BIAS (the authors' recipe: x2, no decay)
        biases = [p for name, p in params if name.endswith(".bias")]
        groups = [{"params": [p for name, p in params if not name.endswith(".bias")]},
                  {"params": biases, "lr": bias_lr,
                   "weight_decay": cfg.train.weight_decay if bias_decay is None else bias_decay}]
    return OPTIMIZERS[cfg.train.optimizer](groups, lr, cfg.train.momentum, cfg.train.weight_decay)


def build_lr_scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer, offset: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then x0.1 at the configured fractions of the schedule, which starts after ``offset`` iterations."""
    milestones = cfg.train.decay_milestones(cfg.train.max_iters, offset=offset)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupMultiStep(milestones, cfg.train.warmup_iters, cfg.train.warmup_factor)
    )


def build_weight_average(cfg: Config, detector: nn.Module) -> AveragedModel | None:
    """An exponential moving average of ``detector``'s parameters and buffers (BatchNorm statistics) with decay
    ``train.ema_decay``, or None without one. Averaging smooths the last iterations' noise out of the weights."""
    if cfg.train.ema_decay is None:
        return None
    return AveragedModel(detector, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)


def default_hooks(
    cfg: Config, objective: Objective, scheduler: torch.optim.lr_scheduler.LRScheduler, checkpointer: Checkpointer,
    description: str, detector: nn.Module,
) -> list[Hook]:
    """Loss-weight schedules, LR schedule, ``detector``'s weight average (with ``train.ema_decay``), periodic
    checkpoints, metrics log and progress bar, in that order."""
    average = checkpointer.average
    return [
        LossWeights(objective.weight_schedules),
        LRScheduler(scheduler),
        *([WeightAverage(average, detector)] if average is not None else []),
        PeriodicCheckpoint(checkpointer, cfg.train.checkpoint_period, cfg.train.keep_checkpoints),
        MetricsWriter(checkpointer.output_dir, cfg.train.log_period),
        ProgressBar(description),
    ]


def resume_or_start(checkpointer: Checkpointer, resume: bool) -> int:
    """The iteration to start from: the latest checkpoint's with ``resume`` (when there is one), else 0."""
    if resume and latest_checkpoint(checkpointer.output_dir) is not None:
        return checkpointer.resume()
    if resume:
        logger.info("--resume: no checkpoint in %s yet, starting at iteration 0", checkpointer.output_dir)
    return 0


def wrap_distributed(model: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` when several processes train, else ``model`` itself."""
    if get_world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def train(
    cfg: Config, stage: str = "baseline", inputs: Mapping[str, str] | None = None, resume: bool = False,
    overwrite: bool = False, init_weights: str | Path | None = None,
) -> RunResult:
    """Train one stage of :data:`~labelenc.stages.STAGES`, write its outputs and weights, then evaluate them (a
    stage that trains no detector writes its outputs only).

    ``inputs`` are the files the stage reads (Step 2: ``{"label_encoder": path}`` or ``{"teacher": path}``), checked
    before the run directory is written; ``init_weights`` loads detector weights before the stage's own
    initialisation and starts at iteration 0 (``resume`` continues a run instead).
    """
    recipe, inputs, start_time = STAGES[stage], dict(inputs or {}), time.perf_counter()
    recipe.check_inputs(inputs)
    with cpu_threads(cfg.train.threads):
        run = start_run(cfg, resume, overwrite, lambda class_names: recipe.check_input_files(cfg, class_names, inputs))
        try:
            device, output_dir, train_set = run.device, run.output_dir, run.train_set
            warn_of_cpu_bf16_convolutions(cfg, device)
            detector = build_detector(cfg.model, num_classes_of(cfg, train_set))
            if init_weights is not None:
                load_detector_weights(detector, init_weights, cfg, train_set.class_names)
            objective = recipe.build(cfg, detector, train_set.class_names, inputs)
            model = objective.model.to(device)
            if cfg.model.channels_last:
                model = model.to(memory_format=torch.channels_last)
            logger.info("%s: %d iterations", stage, objective.max_iter)
            optimizer = build_optimizer(cfg, model)
            scheduler = build_lr_scheduler(cfg, optimizer, objective.lr_offset)
            extra = {"config": cfg.model_dump(mode="json"), "stage": stage, "class_names": train_set.class_names,
                     "category_ids": train_set.label_to_category[1:]}
            scaler = build_grad_scaler(cfg.train.amp, device)
            average = build_weight_average(cfg, detector) if recipe.trains_detector else None
            machine = machine_description(device)
            checkpointer = Checkpointer(model, optimizer, scheduler, output_dir, extra, start_time, scaler, average,
                                        machine)
            start_iter = resume_or_start(checkpointer, resume)
            trainer = Trainer(
                wrap_distributed(model, device, recipe.find_unused_parameters), optimizer,
                build_train_loader(train_set, cfg, start_iter, get_rank(), get_world_size()), objective.max_iter,
                device,
                default_hooks(cfg, objective, scheduler, checkpointer, f"{stage} {output_dir.name}", detector),
                cfg.train.grad_clip, cfg.train.amp, cfg.train.max_bad_steps, scaler,
            )
            trainer.train(start_iter)
            save_outputs = objective.save_outputs if is_main_process() else None
            outputs = save_outputs(output_dir, extra["config"]) if save_outputs else {}
            final = detector if average is None else average.module
            weights, metrics = _save_and_evaluate(cfg, run, final, extra) if recipe.trains_detector else (None, {})
            trained_on = checkpointer.sessions(objective.max_iter)
            this_process = time.perf_counter() - start_time
            wall_time = checkpointer.earlier_wall_time + this_process  # a resumed run: its earlier processes too
            if is_main_process():
                summary = {"stage": stage, "iterations": objective.max_iter, "wall_time": wall_time,
                           "wall_time_this_process": this_process, "machine": machine,
                           "trained_on": trained_on, "inputs": file_record(inputs),
                           "outputs": file_record({**outputs, **({"detector": weights} if weights else {})}),
                           "metrics": metrics}
                if start_iter == objective.max_iter:  # a finished run evaluated again: it trained where it said
                    summary.update(_where_it_trained(output_dir))
                write_json_atomic(output_dir / SUMMARY, summary)
                wall_time = summary["wall_time"]
            return RunResult(output_dir, weights, metrics, wall_time, outputs)
        finally:
            _close_log(run.log)


def _where_it_trained(output_dir: Path) -> dict:
    """The training wall time and machines of the run's previous summary (none if there is none, or it is
    damaged)."""
    try:
        previous = json.loads((output_dir / SUMMARY).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    kept = ("wall_time", "machine", "trained_on")
    return {k: previous[k] for k in kept if isinstance(previous, dict) and k in previous}


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` inside the block (None: left as they are), restored after it."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def machine_description(device: torch.device | None = None) -> str:
    """Host, CPU threads, accelerator and torch build: where a run trained (on ``device``, with as many processes),
    or, without a device, this machine (where a report is written)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = f"CUDA {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "CPU"
    processes = f", {get_world_size()} processes" if get_world_size() > 1 else ""
    return (f"{platform.node() or 'unknown'} ({platform.machine()}, {torch.get_num_threads()} threads, {accelerator}"
            f"{processes}); torch {torch.__version__}")


def file_record(files: Mapping[str, str | Path]) -> dict[str, dict[str, str]]:
    """Files as a run's summary records what it read and wrote: absolute path and SHA-256 of the content, so that a
    finished run is known by its files wherever they have been moved since."""
    return {key: {"path": str(Path(path).resolve()), "sha256": _sha256(path)} for key, path in sorted(files.items())}


def input_difference(recorded: Mapping[str, object], inputs: Mapping[str, str]) -> str | None:
    """How ``inputs`` differ from the files a run recorded (:func:`file_record`), or None when they are the same
    files: the same content, read from the file or, where the file is not there (weights left behind when run
    folders were moved), from the summary of the run that wrote it; else the same path. Summaries written before
    contents were recorded hold paths alone, compared as paths."""
    if set(recorded) != set(inputs):
        return f"its inputs were {sorted(recorded)}, not {sorted(inputs)}"
    for key, path in sorted(inputs.items()):
        was = recorded[key] if isinstance(recorded[key], dict) else {"path": recorded[key]}
        now = str(Path(path).resolve())
        content = _sha256(path) if Path(path).is_file() else _sha256_written(path)
        if "sha256" in was and content is not None:
            if was["sha256"] != content:
                where = "" if Path(path).is_file() else f" that {Path(path).parent / SUMMARY} records writing"
                return f"its {key} was {was['path']} (sha256 {was['sha256'][:12]}...), not the content of {now}{where}"
        elif was["path"] != now:
            return f"its {key} was {was['path']}, not {now}"
    return None


def _sha256_written(path: str | Path) -> str | None:
    """The SHA-256 that the summary of the run folder holding ``path`` recorded for it when the run wrote it, or
    None (no such summary, or one written before outputs were recorded)."""
    try:
        outputs = json.loads((Path(path).parent / SUMMARY).read_text()).get("outputs", {})
        return next((f["sha256"] for f in outputs.values() if Path(f["path"]).name == Path(path).name), None)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError):
        return None


def _sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _save_and_evaluate(
    cfg: Config, run: RunSetup, detector: nn.Module, extra: dict
) -> tuple[Path, dict[str, dict[str, float]]]:
    """Write the trained detector as model_final.pth, then evaluate it and write its metrics beside it.

    Evaluation comes after the weights (and the last checkpoint) are written, so a failing evaluation loses nothing.
    """
    weights = run.output_dir / FINAL_WEIGHTS
    if is_main_process():
        save_file({"kind": "detector", "model": detector.state_dict(), **extra}, weights)
    metrics = evaluate_detector(detector, run.val_set, run.device, _iou_types(cfg), cfg.train.batch_size,
                                cfg.data.num_workers)
    if is_main_process():
        write_eval(weights, metrics)
    return weights, metrics


def _iou_types(cfg: Config) -> tuple[str, ...]:
    return ("bbox", "segm") if FAMILIES[cfg.model.family].with_masks else ("bbox",)


@torch.no_grad()
def evaluate_detector(
    detector: nn.Module,
    dataset: CocoDetection,
    device: torch.device,
    iou_types: tuple[str, ...],
    batch_size: int = 2,
    num_workers: int = 0,
) -> dict[str, dict[str, float]]:
    """COCO metrics of ``detector`` on ``dataset``; each process scores a shard, the main one summarises."""
    detector.eval()
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_category, iou_types)
    shard = torch.utils.data.Subset(dataset, range(get_rank(), len(dataset), get_world_size()))
    for batch in build_eval_loader(shard, batch_size, num_workers):
        images, targets = move_to_device(batch, device)
        outputs = detector(images)
        evaluator.update([int(t["image_id"]) for t in targets], outputs)
    evaluator.merge(all_gather_objects(evaluator.state()))
    return evaluator.summarize() if is_main_process() else {}


_DETECTOR_KEYS = ("family", "backbone", "fpn_channels")


def load_detector_weights(detector: nn.Module, weights: str | Path, cfg: Config, class_names: list[str]) -> None:
    """Load a weights file (``model_final.pth``, or a training checkpoint's detector part) strictly into ``detector``.

    The file records the config and classes it was trained with; any difference from ``cfg`` and ``class_names`` in
    what the detector is (family, backbone, FPN width, classes) is one error naming each difference.
    """
    model_state, _ = read_detector_weights(weights, cfg, class_names, _DETECTOR_KEYS)
    load_strictly(detector, model_state, weights)
    logger.info("loaded detector weights from %s", weights)


def _trained_categories(weights: str | Path) -> tuple[list[str], list[int]] | None:
    """The class names and COCO category ids a weights file records (label ``i + 1`` is ``category_ids[i]``), or None
    for a file without them (written before they were recorded, or not detector weights)."""
    state = load_file(weights, kind="weights")
    names, ids = state.get("class_names"), state.get("category_ids")
    if not (isinstance(names, list) and isinstance(ids, list) and len(names) == len(ids)):
        return None
    return [str(n) for n in names], [int(i) for i in ids]


def evaluate(cfg: Config, weights: str | Path) -> dict[str, dict[str, float]]:
    """Evaluate a weights file (final weights or a training checkpoint) on the validation split of ``cfg``.

    The categories come from the weights file, so only the validation split is read (and checked as a run checks
    it); a val split with other category ids is refused. Files without recorded category ids (older runs) take
    them from the training split instead, which is then read and checked too.
    """
    device = local_device(cfg.train.device)
    with_masks = FAMILIES[cfg.model.family].with_masks
    trained = _trained_categories(weights)
    if trained is None:
        train_set, val_set = build_datasets(cfg, with_masks=with_masks)
        class_names, num_classes = train_set.class_names, num_classes_of(cfg, train_set)
    else:
        class_names, category_ids = trained
        if cfg.model.num_classes is not None and cfg.model.num_classes != len(category_ids):
            raise UserError(f"model.num_classes={cfg.model.num_classes} but {weights} was trained on "
                            f"{len(category_ids)} categories")
        val_set = build_val_dataset(cfg, class_names, category_ids, with_masks, trained=str(weights))
        num_classes = len(category_ids)
    detector = build_detector(cfg.model.model_copy(update={"backbone_weights": None}), num_classes)
    load_detector_weights(detector, weights, cfg, class_names)
    with cpu_threads(cfg.train.threads):
        metrics = evaluate_detector(detector.to(device), val_set, device, _iou_types(cfg), cfg.train.batch_size,
                                    cfg.data.num_workers)
    if is_main_process():
        write_eval(Path(weights), metrics)
    return metrics


def write_eval(weights: Path, metrics: dict) -> Path:
    """Save COCO metrics as JSON beside the weights they belong to."""
    return write_json_atomic(weights.with_name(weights.stem + "_eval.json"), metrics)
