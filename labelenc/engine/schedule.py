"""Iteration-based schedules: learning rate (linear warm-up, step decay) and piecewise loss weights."""

from __future__ import annotations

import bisect


class WarmupMultiStep:
    """LR factor at an iteration: linear warm-up from ``warmup_factor`` to 1, then x``gamma`` at each milestone.

    A callable object rather than a lambda so that ``LambdaLR.state_dict`` stores it as plain data.
    """

    def __init__(self, milestones: list[int], warmup_iters: int, warmup_factor: float, gamma: float = 0.1) -> None:
        self.milestones = sorted(milestones)
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.gamma = gamma

    def __call__(self, iteration: int) -> float:
        factor = self.gamma ** bisect.bisect_right(self.milestones, iteration)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def weight_on_between(start: int, stop: int, weight: float):
    """A loss-weight schedule: ``weight`` for iterations in ``[start, stop)``, 0 elsewhere."""

    def schedule(iteration: int) -> float:
        return weight if start <= iteration < stop else 0.0

    return schedule


def scaled_lr(base_lr: float, reference_batch: int, batch_size: int) -> float:
    """Linear scaling rule: the base LR is given for ``reference_batch`` images per iteration."""
    return base_lr * batch_size / reference_batch
