"""A small iteration-based training loop with hooks, after detectron2's ``TrainerBase``.

``run_step`` = next batch → loss dict → sum → backward → (clip) → step. Everything else (LR schedule, loss-weight
schedules, checkpoints, metrics, progress) is a :class:`Hook` (see :mod:`labelenc.engine.hooks`). The model is any
module whose training forward ``model(images, targets)`` returns a dict of already-weighted losses; the loop never
needs to know which.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from labelenc.engine.distributed import all_gather_objects, any_process, mean_over_processes
from labelenc.errors import UserError, error_text

logger = logging.getLogger(__name__)

# what run_step records beside the loss terms (and the summed "loss")
STEP_STATS = frozenset({"lr", "time", "data_time", "skipped", "grad_norm"})


def move_to_device(batch: tuple[list, list], device: torch.device) -> tuple[list, list]:
    """Images and target dicts onto ``device`` (the one place where data changes device)."""
    images, targets = batch
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16 needs a loss scaler; for off and bf16 the scaler is disabled and every call is a no-op."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged: too many consecutive non-finite losses."""


class BatchError(UserError):
    """The next batch could not be read (an unreadable image, say); ``iteration`` is the one that did not run."""

    def __init__(self, message: str, iteration: int) -> None:
        super().__init__(message)
        self.iteration = iteration


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
        amp: str = "off",
        max_bad_steps: int = 5,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model, self.optimizer, self.data = model, optimizer, data
        self.max_iter, self.device = max_iter, device
        self.hooks = list(hooks)
        self.grad_clip = grad_clip
        self.amp_dtype = AMP_DTYPES[amp]
        self.scaler = scaler if scaler is not None else build_grad_scaler(amp, device)
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0  # consecutive iterations skipped for a non-finite loss or gradient
        self.iter = 0
        self.metrics: dict[str, float] = {}
        self.error: BaseException | None = None  # what stopped training early, for the hooks' after_train

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
        except BaseException as err:
            self.error = err
            raise
        finally:  # progress bar and writers are closed on failure too; a checkpoint may be written
            for hook in self.hooks:
                hook.after_train(self)

    def run_step(self, data_iter: Iterator) -> None:
        self.model.train()
        start = time.perf_counter()
        images, targets = move_to_device(self._next_batch(data_iter), self.device)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss_dict = self.model(images, targets)
        loss = sum(loss_dict.values())
        self.optimizer.zero_grad(set_to_none=True)
        bad = [k for k, v in loss_dict.items() if not torch.isfinite(v)]
        if any_process(bool(bad), loss.device) and not bad:  # all processes skip together, or DDP would hang
            bad = ["loss on another process"]
        overflow, grad_norm = False, float("nan")
        if not bad:
            self.scaler.scale(loss).backward()
            grad_norm = self._clip_gradients()  # gradients are all-reduced: every process sees the same
            checked = self.grad_clip is not None or self.scaler.is_enabled()
            overflow = checked and not math.isfinite(grad_norm)
            bad = ["gradient norm"] if overflow and not self.scaler.is_enabled() else []
        if bad:
            self._skip_step(bad, loss_dict)
        elif overflow:  # fp16: the scale was too large; the scaler lowers it and skips the step, as it should
            logger.info("iteration %d skipped: fp16 gradient overflow, loss scale now %g", self.iter,
                        self.scaler.get_scale() / 2)
            self.scaler.update()
        else:
            self.bad_steps = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
        values = mean_over_processes([*loss_dict.values(), loss])  # what is logged: the mean over processes
        self.metrics = {k: v.item() for k, v in zip([*loss_dict, "loss"], values)}
        self.metrics.update(
            lr=self.optimizer.param_groups[0]["lr"],
            time=time.perf_counter() - start,
            data_time=data_time,
            skipped=float(bool(bad) or overflow),
            grad_norm=grad_norm,
        )

    def _next_batch(self, data_iter: Iterator) -> tuple[list, list]:
        """The next batch. If any process cannot read its share, every process stops before this iteration with
        that reader's message: all are then in the state after the previous iteration, which the checkpoint hook
        saves (one process stopping alone would leave the others waiting in DDP's all-reduce)."""
        try:
            batch, failure = next(data_iter), None
        except UserError as err:
            batch, failure = None, error_text(err)
        if any_process(failure is not None, self.device):
            failure = next(f for f in all_gather_objects(failure) if f is not None)
            raise BatchError(f"{failure}; training stopped before iteration {self.iter}", self.iter)
        return batch

    def _clip_gradients(self) -> float:
        """Unscale (fp16), clip to ``grad_clip``; return the global gradient norm before clipping (logged: a loss
        spike shows there first, and it tells what ``grad_clip`` to set). With clipping or fp16 scaling a norm that
        is not finite skips the step; without either it is only logged."""
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.grad_clip is not None:
            return torch.nn.utils.clip_grad_norm_(params, self.grad_clip).item()
        return torch.nn.utils.get_total_norm([p.grad for p in params]).item()

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
