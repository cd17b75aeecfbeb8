"""One training run (baseline, Step 1 or Step 2) or one evaluation, from a :class:`Config` to files on disk.

Data flows one way: config → datasets → detector (+ LabelEnc objective) → trainer → final weights → evaluation.
Only the main process writes files.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from labelenc.artifact import (
    build_label_encoder,
    check_compatible,
    encoder_from_artifact,
    encoder_metadata,
    init_detector_from_artifact,
    load_label_encoder,
    save_label_encoder,
)
from labelenc.config import Config, save_config
from labelenc.data.coco import CocoDetection
from labelenc.data.loader import build_datasets, build_eval_loader, build_train_loader
from labelenc.engine.checkpoint import latest_checkpoint, load_file, save_file, write_text_atomic
from labelenc.engine.distributed import all_gather_objects, get_rank, get_world_size, init_distributed, is_main_process, local_device
from labelenc.engine.schedule import WarmupMultiStep, weight_on_between
from labelenc.engine.trainer import (
    Checkpointer,
    LossWeights,
    LRScheduler,
    MetricsWriter,
    PeriodicCheckpoint,
    ProgressBar,
    Trainer,
    move_to_device,
    scaled_lr,
)
from labelenc.errors import UserError
from labelenc.evaluation import CocoEvaluator
from labelenc.method import Baseline, Step1, Step2
from labelenc.models import FAMILIES, build_detector

logger = logging.getLogger(__name__)

Stage = Literal["baseline", "step1", "step2"]
FINAL_WEIGHTS = "model_final.pth"
LABEL_ENCODER = "label_encoder.pth"
SUMMARY = "run_summary.json"


class RunDirError(UserError, RuntimeError):
    """The output directory holds another run that would be overwritten."""


@dataclass
class RunResult:
    output_dir: Path
    weights: Path
    metrics: dict[str, dict[str, float]]
    wall_time: float
    label_encoder: Path | None = None


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a previous run unless asked: ``--resume`` continues it, ``--overwrite`` starts afresh."""
    has_run = (output_dir / FINAL_WEIGHTS).exists() or latest_checkpoint(output_dir) is not None
    if has_run and overwrite and is_main_process():
        shutil.rmtree(output_dir)
    elif has_run and not resume:
        raise RunDirError(f"{output_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if is_main_process():
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=output_dir).close()
        except OSError as err:
            raise RunDirError(f"output directory {output_dir} is not writable: {err.strerror}") from None


def _configure_logging(output_dir: Path) -> None:
    if not is_main_process():
        return
    handler = logging.FileHandler(output_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("labelenc")
    root.handlers = [h for h in root.handlers if not isinstance(h, logging.FileHandler)] + [handler]
    root.setLevel(logging.INFO)


def _seed(cfg: Config) -> None:
    torch.manual_seed(cfg.train.seed + get_rank())
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _num_classes(cfg: Config, train_set: CocoDetection) -> int:
    if cfg.model.num_classes is not None and cfg.model.num_classes != train_set.num_classes:
        raise UserError(
            f"model.num_classes={cfg.model.num_classes} but {train_set.annotation_file} has "
            f"{train_set.num_classes} categories"
        )
    return train_set.num_classes


@dataclass
class Objective:
    """What a stage trains: the module around the detector, its loss-weight schedules and its length."""

    model: nn.Module
    weight_schedules: dict
    max_iter: int
    lr_offset: int  # iterations before the 1x schedule starts (Step-1 warm-up): the LR decays move back by it
    meta: dict  # label-encoder metadata of this run


def build_objective(
    cfg: Config, stage: Stage, detector: nn.Module, train_set: CocoDetection, label_encoder: str | None
) -> Objective:
    """Baseline, Step 1 (Eq. 9, with its warm-up) or Step 2 (Eq. 7, with its cut-off) around ``detector``."""
    method, total = cfg.labelenc, cfg.train.max_iters
    meta = encoder_metadata(
        cfg.model.family, train_set.class_names, cfg.model.fpn_channels, method.encoder_width, cfg.model.backbone
    )
    if stage == "baseline":
        return Objective(Baseline(detector), {}, total, 0, meta)
    if stage == "step1":
        warmup = round(method.step1_warmup * cfg.train.base_iters)
        model = Step1(
            detector,
            build_label_encoder(meta),
            method.reconstruction_weight,
            method.detection_weight,
            method.distance_weight,
            method.box_jitter,
        )
        distance = weight_on_between(warmup, warmup + total, method.distance_weight)
        return Objective(model, {"distance": distance}, warmup + total, warmup, meta)
    if label_encoder is None:
        raise UserError("step2 needs a label encoder file (--label-encoder FILE) written by step1")
    artifact = load_label_encoder(label_encoder)
    check_compatible(artifact["meta"], meta, label_encoder)
    init_detector_from_artifact(detector, artifact)
    model = Step2(detector, encoder_from_artifact(artifact), method.distance_weight)
    cutoff = total - round(method.distance_cutoff * total)
    return Objective(model, {"distance": weight_on_between(0, cutoff, method.distance_weight)}, total, 0, artifact["meta"])


def train(
    cfg: Config,
    stage: Stage = "baseline",
    label_encoder: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> RunResult:
    """Train one stage as configured, write its weights (and Step 1's label encoder) and evaluate them."""
    start_time = time.perf_counter()
    device = local_device(cfg.train.device)
    init_distributed(device)
    output_dir = Path(cfg.output_dir)
    prepare_output_dir(output_dir, resume, overwrite)
    _configure_logging(output_dir)
    _seed(cfg)

    family = FAMILIES[cfg.model.family]
    train_set, val_set = build_datasets(cfg, with_masks=family.with_masks)  # validates the data first
    if is_main_process():
        save_config(cfg, output_dir / "config.yaml")
    detector = build_detector(cfg.model, _num_classes(cfg, train_set))
    objective = build_objective(cfg, stage, detector, train_set, label_encoder)
    model, max_iter = objective.model.to(device), objective.max_iter

    params = [p for p in model.parameters() if p.requires_grad]
    lr = scaled_lr(cfg.train.base_lr, cfg.train.reference_batch_size, cfg.train.batch_size)
    logger.info(
        "%s: %d iterations, global batch %d on %d process(es), lr %.5g (base %.5g for batch %d)",
        stage, max_iter, cfg.train.batch_size, get_world_size(), lr, cfg.train.base_lr, cfg.train.reference_batch_size,
    )
    optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    milestones = cfg.train.decay_milestones(cfg.train.max_iters, offset=objective.lr_offset)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupMultiStep(milestones, cfg.train.warmup_iters, cfg.train.warmup_factor)
    )
    extra = {"config": cfg.model_dump(mode="json"), "stage": stage}
    checkpointer = Checkpointer(model, optimizer, scheduler, output_dir, extra)
    start_iter = 0
    if resume and latest_checkpoint(output_dir) is not None:
        start_iter = checkpointer.resume()
    elif resume:
        logger.info("--resume: no checkpoint in %s yet, starting at iteration 0", output_dir)

    trained = model
    if get_world_size() > 1:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=stage != "baseline")
    hooks = [
        LossWeights(objective.weight_schedules),
        LRScheduler(scheduler),
        PeriodicCheckpoint(checkpointer, cfg.train.checkpoint_period),
        MetricsWriter(output_dir, cfg.train.log_period),
        ProgressBar(f"{stage} {output_dir.name}"),
    ]
    loader = build_train_loader(train_set, cfg, start_iter, get_rank(), get_world_size())
    trainer = Trainer(
        trained, optimizer, loader, max_iter, device, hooks, cfg.train.grad_clip, cfg.train.amp, cfg.train.max_bad_steps
    )
    trainer.train(start_iter)

    weights = output_dir / FINAL_WEIGHTS
    encoder_path = output_dir / LABEL_ENCODER if stage == "step1" else None
    if is_main_process():
        save_file({"kind": "detector", "model": detector.state_dict(), **extra}, weights)
        if encoder_path is not None:
            save_label_encoder(encoder_path, model.encoder, detector, objective.meta, extra["config"])
    metrics = evaluate_detector(detector, val_set, device, _iou_types(cfg), cfg.train.batch_size, cfg.data.num_workers)
    wall_time = time.perf_counter() - start_time
    if is_main_process():
        write_eval(weights, metrics)
        summary = {"stage": stage, "iterations": max_iter, "wall_time": wall_time, "metrics": metrics}
        write_text_atomic(output_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return RunResult(output_dir, weights, metrics, wall_time, encoder_path)


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


def evaluate(cfg: Config, weights: str | Path) -> dict[str, dict[str, float]]:
    """Evaluate a weights file (final weights or a training checkpoint) on the validation split of ``cfg``."""
    device = local_device(cfg.train.device)
    train_set, val_set = build_datasets(cfg, with_masks=False)
    detector = build_detector(cfg.model.model_copy(update={"backbone_weights": None}), _num_classes(cfg, train_set))
    state = load_file(weights, kind="weights")
    model_state = state["model"]
    if state.get("kind") != "detector":  # a training checkpoint: keep the detector's part
        model_state = {k[len("detector."):]: v for k, v in model_state.items() if k.startswith("detector.")}
    try:
        detector.load_state_dict(model_state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{weights} does not fit the detector of this config: {str(err).splitlines()[0]}") from None
    metrics = evaluate_detector(detector.to(device), val_set, device, _iou_types(cfg), cfg.train.batch_size,
                                cfg.data.num_workers)
    if is_main_process():
        write_eval(Path(weights), metrics)
    return metrics


def write_eval(weights: Path, metrics: dict) -> Path:
    """Save COCO metrics as JSON beside the weights they belong to."""
    path = weights.with_name(weights.stem + "_eval.json")
    write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")
    return path
