"""The training loop's hooks, in the order :func:`labelenc.runner.default_hooks` installs them: loss-weight schedules,
LR schedule, weight average, periodic checkpoints, metrics writer, progress bar (after detectron2's
``engine/hooks.py``)."""

from __future__ import annotations

import json
import math
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from labelenc.engine.checkpoint import Checkpointer
from labelenc.engine.distributed import barrier, is_main_process, unwrap
from labelenc.engine.trainer import STEP_STATS, BatchError, Hook, Trainer
from labelenc.fileio import write_text_atomic


class LRScheduler(Hook):
    """Steps the LR scheduler after every iteration, skipped ones included: the schedule counts iterations."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.scheduler = scheduler

    def after_step(self, trainer: Trainer) -> None:
        with warnings.catch_warnings():  # torch warns when the first iterations were skipped (fp16 overflow): intended
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()


class LossWeights(Hook):
    """Sets ``model.loss_weights[name] = schedule(iteration)`` before every step (warm-up, cut-off)."""

    def __init__(self, schedules: dict[str, Callable[[int], float]]) -> None:
        self.schedules = schedules

    def before_step(self, trainer: Trainer) -> None:
        weights = unwrap(trainer.model).loss_weights
        for name, schedule in self.schedules.items():
            weights[name] = schedule(trainer.iter)


class WeightAverage(Hook):
    """Updates ``average`` (torch's ``AveragedModel`` of ``model``) after every iteration, before it is checkpointed."""

    def __init__(self, average: AveragedModel, model: nn.Module) -> None:
        self.average, self.model = average, model

    def after_step(self, trainer: Trainer) -> None:
        self.average.update_parameters(self.model)


class PeriodicCheckpoint(Hook):
    """A checkpoint every ``period`` iterations, at the end of training, and when a batch cannot be read (the state
    before that iteration, so that ``--resume`` after fixing the data loses no work)."""

    def __init__(self, checkpointer: Checkpointer, period: int, keep: int | None = None) -> None:
        self.checkpointer, self.period, self.keep = checkpointer, period, keep

    def after_step(self, trainer: Trainer) -> None:
        done = trainer.iter + 1
        if done % self.period == 0 or done == trainer.max_iter:
            saved = self.checkpointer.save(f"checkpoint_{done:07d}", done)
            if self.keep is not None and is_main_process():
                self._delete_old(saved)

    def _delete_old(self, saved: Path) -> None:
        """Delete all but the newest ``keep`` checkpoints (the one just written always stays)."""
        older = sorted(p for p in saved.parent.glob("checkpoint_*.pth") if p.name < saved.name)
        for path in older[: max(len(older) - (self.keep - 1), 0)]:
            path.unlink(missing_ok=True)

    def after_train(self, trainer: Trainer) -> None:
        error = trainer.error
        if isinstance(error, BatchError) and error.iteration > 0:  # every process stopped before that iteration
            path = self.checkpointer.save(f"checkpoint_{error.iteration:07d}", error.iteration)
            barrier()  # no process exits (and has torchrun stop the others) before the main one has written it
            error.args = (f"{error}; its state is saved in {path}: fix or remove the file, then rerun the same "
                          "command with --resume",)


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
            kept = [r for r in read_metrics(self.path) if r["iteration"] <= trainer.iter]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
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


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, without torn or foreign lines (a run killed while writing one)."""
    records = []
    for line in Path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int):
            records.append(record)
    return records


class ProgressBar(Hook):
    """tqdm bar with ETA and running means of the loss terms (main process only)."""

    position = 0  # terminal line of the bar; each worker of ``--jobs`` sets its own

    def __init__(self, description: str, window: int = 20) -> None:
        self.description, self.window = description, window
        self.bar: tqdm | None = None
        self.recent: dict[str, deque] = {}

    def before_train(self, trainer: Trainer) -> None:
        if is_main_process():
            self.bar = tqdm(
                total=trainer.max_iter, initial=trainer.iter, desc=self.description, dynamic_ncols=True, mininterval=1,
                position=self.position,
            )

    def after_step(self, trainer: Trainer) -> None:
        if self.bar is None:
            return
        for k, v in trainer.metrics.items():
            if k not in STEP_STATS:
                self.recent.setdefault(k, deque(maxlen=self.window)).append(v)
        shown = {k: f"{sum(v) / len(v):.3f}" for k, v in self.recent.items() if not math.isnan(v[-1])}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def after_train(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
