"""Optimizers by name (``train.optimizer``): a new one is one entry of :data:`OPTIMIZERS`."""

from __future__ import annotations

from collections.abc import Callable

import torch

Groups = list[dict]


def _sgd(groups: Groups, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum and L2 weight decay: the detection codebases' default, and the paper's."""
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _adamw(groups: Groups, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, torch's default betas; ``momentum`` does not apply): much faster than SGD for
    a detector trained from random init for a few hundred iterations."""
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[[Groups, float, float, float], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": _adamw,
}
