"""Tests for the iteration-based schedules (labelenc/engine/schedule.py, TrainConfig lengths, linear LR scaling)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from labelenc.config import TrainConfig
from labelenc.engine.checkpoint import load_file, save_file
from labelenc.engine.schedule import WarmupMultiStep, weight_on_between
from labelenc.engine.schedule import scaled_lr


@pytest.mark.parametrize(
    "iteration, expected",
    [
        (0, 0.001),  # warm-up starts at warmup_factor
        (1, 0.001 * 0.75 + 0.25),
        (2, 0.001 * 0.5 + 0.5),
        (3, 0.001 * 0.25 + 0.75),
        (4, 1.0),  # warm-up over
        (5, 1.0),
        (6, 0.1),  # first milestone
        (7, 0.1),
        (8, 0.01),  # second milestone
        (100, 0.01),
    ],
)
def test_warmup_multistep_factor(iteration: int, expected: float) -> None:
    """The LR factor ramps linearly from warmup_factor to 1 and is multiplied by gamma at each milestone."""
    schedule = WarmupMultiStep([8, 6], warmup_iters=4, warmup_factor=0.001, gamma=0.1)
    assert schedule(iteration) == pytest.approx(expected, rel=1e-12)


def test_warmup_overlapping_a_milestone_multiplies_both() -> None:
    """A milestone inside the warm-up decays the ramped factor (both effects apply); no warm-up means factor 1 at 0."""
    schedule = WarmupMultiStep([2], warmup_iters=4, warmup_factor=0.5, gamma=0.1)
    assert schedule(1) == pytest.approx(0.5 * 0.75 + 0.25)
    assert schedule(2) == pytest.approx(0.1 * (0.5 * 0.5 + 0.5))
    assert schedule(4) == pytest.approx(0.1)
    assert WarmupMultiStep([3], warmup_iters=0, warmup_factor=0.001)(0) == 1.0


def test_lambda_lr_follows_the_factors() -> None:
    """Driving torch's LambdaLR with WarmupMultiStep gives base_lr * factor(i) at optimisation step i."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.02, momentum=0.9)
    factors = WarmupMultiStep([5, 7], warmup_iters=3, warmup_factor=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    seen = []
    for _ in range(9):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.02 * factors(i) for i in range(9)], rel=1e-12)
    assert seen[0] == pytest.approx(0.0002) and seen[3] == pytest.approx(0.02)
    assert seen[5] == pytest.approx(0.002) and seen[8] == pytest.approx(0.0002)


def test_scheduler_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    """The scheduler's state (with the WarmupMultiStep parameters) saves as plain data and resumes the same LRs."""

    def make(milestones: list[int]) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=0.1)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupMultiStep(milestones, 2, 0.1))

    optimizer, scheduler = make([4, 6])
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    save_file({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp_path / "s.pth")
    expected = []
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        expected.append(optimizer.param_groups[0]["lr"])

    state = load_file(tmp_path / "s.pth")  # weights_only=True inside
    restored_opt, restored = make([1, 2])  # other milestones: the state must carry the real ones
    restored_opt.load_state_dict(state["optimizer"])
    restored.load_state_dict(state["scheduler"])
    assert restored.last_epoch == 3
    got = []
    for _ in range(5):
        restored_opt.step()
        restored.step()
        got.append(restored_opt.param_groups[0]["lr"])
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "base_iters, schedule, max_iters, milestones",
    [
        (90000, "1x", 90000, [60000, 80000]),
        (90000, "2x", 180000, [120000, 160000]),
        (9, "1x", 9, [6, 8]),
        (9, "2x", 18, [12, 16]),
        (6, "1x", 6, [4, 5]),
    ],
)
def test_schedule_lengths_and_decays_keep_the_paper_proportions(
    base_iters: int, schedule: str, max_iters: int, milestones: list[int]
) -> None:
    """1x/2x lengths are relative to base_iters, and the LR decays at 2/3 and 8/9 of the schedule."""
    cfg = TrainConfig(base_iters=base_iters, schedule=schedule)
    assert cfg.max_iters == max_iters
    assert cfg.decay_milestones(cfg.max_iters) == milestones


def test_decay_milestones_shift_by_an_offset() -> None:
    """Step 1's warm-up moves the decay steps back: 30k warm-up + 1x decays at 90k and 110k."""
    cfg = TrainConfig(base_iters=90000)
    assert cfg.decay_milestones(cfg.max_iters, offset=30000) == [90000, 110000]


@pytest.mark.parametrize("points", [(0.9, 0.5), (0.0, 0.5), (0.5, 1.0)])
def test_invalid_decay_points_are_rejected(points: tuple[float, float]) -> None:
    """Decay fractions must be increasing and strictly inside the schedule."""
    with pytest.raises(ValueError, match="lr_decay_points"):
        TrainConfig(lr_decay_points=points)


@pytest.mark.parametrize(
    "base_lr, reference, batch, expected",
    [(0.01, 16, 16, 0.01), (0.01, 16, 32, 0.02), (0.01, 16, 2, 0.00125), (0.02, 8, 1, 0.0025)],
)
def test_scaled_lr_is_linear_in_the_global_batch(base_lr: float, reference: int, batch: int, expected: float) -> None:
    """The base LR is given for the reference batch and scales linearly with the actual global batch."""
    assert scaled_lr(base_lr, reference, batch) == pytest.approx(expected, rel=1e-12)


def test_weight_on_between() -> None:
    """A loss-weight schedule is the weight on [start, stop) and 0 elsewhere."""
    schedule = weight_on_between(2, 5, 0.7)
    assert [schedule(i) for i in range(7)] == [0.0, 0.0, 0.7, 0.7, 0.7, 0.0, 0.0]
