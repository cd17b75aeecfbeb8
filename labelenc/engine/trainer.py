"""A small iteration-based training loop with hooks, after detectron2's ``TrainerBase``.

``run_step`` = next batch → loss dict → sum → backward → (clip) → step. Everything else (LR schedule, loss-weight
schedules, checkpoints, metrics, progress) is a :class:`Hook`. The model is any module whose training forward
``model(images, targets)`` returns a dict of already-weighted losses; the loop never needs to know which.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from labelenc.engine.checkpoint import latest_checkpoint, load_file, save_file, write_text_atomic
from labelenc.engine.distributed import is_main_process
from labelenc.errors import UserError

logger = logging.getLogger(__name__)


def move_to_device(batch: tuple[list, list], device: torch.device) -> tuple[list, list]:
    """Images and target dicts onto ``device`` (the one place where data changes device)."""
    images, targets = batch
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged: too many consecutive non-finite losses."""


class Hook:
    """Called around the loop; ``trainer.iter`` is the 0-based iteration being run."""

    def before_train(self, trainer: Trainer) -> None: ...
    def before_step(self, trainer: Trainer) -> None: ...
    def after_step(self, trainer: Trainer) -> None: ...
    def after_train(self, trainer: Trainer) -> None: ...


class Trainer:
    """Runs ``max_iter`` optimisation steps of ``model`` from ``start_iter`` on batches of ``data``."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Iterable,
        max_iter: int,
        device: torch.device,
        hooks: list[Hook] = (),
        grad_clip: float | None = None,
        amp: bool = False,
        max_bad_steps: int = 5,
    ) -> None:
        self.model, self.optimizer, self.data = model, optimizer, data
        self.max_iter, self.device = max_iter, device
        self.hooks = list(hooks)
        self.grad_clip = grad_clip
        self.amp = amp and device.type == "cuda"
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0  # consecutive iterations skipped for a non-finite loss or gradient
        self.iter = 0
        self.metrics: dict[str, float] = {}

    def train(self, start_iter: int = 0) -> None:
        self.iter = start_iter
        for hook in self.hooks:
            hook.before_train(self)
        try:
            data_iter = iter(self.data)
            while self.iter < self.max_iter:
                for hook in self.hooks:
                    hook.before_step(self)
                self.run_step(data_iter)
                for hook in self.hooks:
                    hook.after_step(self)
                self.iter += 1
        finally:  # progress bar and writers are closed on failure too
            for hook in self.hooks:
                hook.after_train(self)

    def run_step(self, data_iter: Iterator) -> None:
        self.model.train()
        start = time.perf_counter()
        images, targets = move_to_device(next(data_iter), self.device)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss_dict = self.model(images, targets)
        loss = sum(loss_dict.values())
        self.optimizer.zero_grad(set_to_none=True)
        bad = [k for k, v in loss_dict.items() if not torch.isfinite(v)]
        if not bad:
            loss.backward()
            if self.grad_clip is not None:
                params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
                if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, self.grad_clip)):
                    bad = ["gradient norm"]
        if bad:
            self._skip_step(bad, loss_dict)
        else:
            self.bad_steps = 0
            self.optimizer.step()
        self.metrics = {k: v.detach().item() for k, v in loss_dict.items()}
        self.metrics.update(
            loss=loss.detach().item(),
            lr=self.optimizer.param_groups[0]["lr"],
            time=time.perf_counter() - start,
            data_time=data_time,
            skipped=float(bool(bad)),
        )

    def _skip_step(self, bad: list[str], loss_dict: dict[str, torch.Tensor]) -> None:
        """Leave the weights untouched for a non-finite step; end the run after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in loss_dict.items())
        logger.warning("iteration %d skipped: non-finite %s (%s)", self.iter, ", ".join(bad), terms)
        if self.bad_steps >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_steps} consecutive iterations with a non-finite {', '.join(bad)} (last: iteration "
                f"{self.iter}: {terms}); stopping. The last checkpoint holds the last good weights: lower "
                "train.base_lr or set train.grad_clip, then --resume."
            )


class LRScheduler(Hook):
    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.scheduler = scheduler

    def after_step(self, trainer: Trainer) -> None:
        self.scheduler.step()


class LossWeights(Hook):
    """Sets ``model.loss_weights[name] = schedule(iteration)`` before every step (warm-up, cut-off)."""

    def __init__(self, schedules: dict[str, Callable[[int], float]]) -> None:
        self.schedules = schedules

    def before_step(self, trainer: Trainer) -> None:
        weights = unwrap(trainer.model).loss_weights
        for name, schedule in self.schedules.items():
            weights[name] = schedule(trainer.iter)


class Checkpointer:
    """Saves and restores model, optimizer, scheduler, iteration and RNG state of one run directory."""

    def __init__(self, model: nn.Module, optimizer, scheduler, output_dir: str | Path, extra: dict) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.output_dir = Path(output_dir)
        self.extra = extra  # config, stage: recorded in every file

    def save(self, name: str, iteration: int) -> Path:
        path = self.output_dir / f"{name}.pth"
        if is_main_process():
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            save_file(
                {
                    "model": unwrap(self.model).state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "iteration": iteration,
                    "rng": rng,
                    **self.extra,
                },
                path,
            )
            write_text_atomic(self.output_dir / "last_checkpoint", path.name)
        return path

    def resume(self) -> int:
        """Restore the latest checkpoint of the run directory; returns the iteration to continue from."""
        path = latest_checkpoint(self.output_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.output_dir}")
        state = load_file(path)
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        logger.info("resumed from %s at iteration %d", path, state["iteration"])
        return state["iteration"]


class PeriodicCheckpoint(Hook):
    """A checkpoint every ``period`` iterations and at the end of training."""

    def __init__(self, checkpointer: Checkpointer, period: int) -> None:
        self.checkpointer, self.period = checkpointer, period

    def after_step(self, trainer: Trainer) -> None:
        done = trainer.iter + 1
        if done % self.period == 0 or done == trainer.max_iter:
            self.checkpointer.save(f"checkpoint_{done:07d}", done)


class MetricsWriter(Hook):
    """JSON lines (and TensorBoard when installed) every ``period`` iterations, from the main process only.

    Losses are averaged over the period. On resume, lines past the resumed iteration are dropped so the file
    reads as one uninterrupted run.
    """

    def __init__(self, output_dir: str | Path, period: int) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.period = period
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.tensorboard = None

    def before_train(self, trainer: Trainer) -> None:
        if not is_main_process():
            return
        if self.path.exists():  # a killed run may leave records past its checkpoint, or a torn last line
            kept = [ln for ln in self.path.read_text().splitlines() if _iteration_of(ln) <= trainer.iter]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"))
        except ImportError:
            self.tensorboard = None

    def after_step(self, trainer: Trainer) -> None:
        for k, v in trainer.metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        done = trainer.iter + 1
        if (done % self.period and done != trainer.max_iter) or not is_main_process():
            return
        record = {"iteration": done, **{k: v / self.counts[k] for k, v in self.sums.items()}}
        record["lr"] = trainer.metrics["lr"]
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for k, v in record.items():
                if k != "iteration":
                    self.tensorboard.add_scalar(k, v, done)
        self.sums, self.counts = {}, {}

    def after_train(self, trainer: Trainer) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _iteration_of(line: str) -> float:
    try:
        return json.loads(line)["iteration"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class ProgressBar(Hook):
    """tqdm bar with ETA and running means of the loss terms (main process only)."""

    def __init__(self, description: str, window: int = 20) -> None:
        self.description, self.window = description, window
        self.bar: tqdm | None = None
        self.recent: dict[str, deque] = {}

    def before_train(self, trainer: Trainer) -> None:
        if is_main_process():
            self.bar = tqdm(
                total=trainer.max_iter, initial=trainer.iter, desc=self.description, dynamic_ncols=True, mininterval=1
            )

    def after_step(self, trainer: Trainer) -> None:
        if self.bar is None:
            return
        skip = {"lr", "time", "data_time", "skipped"}
        for k, v in trainer.metrics.items():
            if k not in skip:
                self.recent.setdefault(k, deque(maxlen=self.window)).append(v)
        shown = {k: f"{sum(v) / len(v):.3f}" for k, v in self.recent.items() if not math.isnan(v[-1])}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def after_train(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


def scaled_lr(base_lr: float, reference_batch: int, batch_size: int) -> float:
    """Linear scaling rule: the base LR is given for ``reference_batch`` images per iteration."""
    return base_lr * batch_size / reference_batch
