"""Seed statistics for comparisons: mean ± std, and the paired difference per seed with its 95% t-interval.

Two runs of the same seed share data order and initialisation, so "method − reference" is judged on the per-seed
differences (a paired t-interval), which removes the part of the seed noise both runs share.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from statistics import NormalDist

# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom (any statistics table).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical_95(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (the half-width factor of a 95% interval).

    Tabulated up to 30; above, the Cornish-Fisher expansion around the normal quantile (error below 1e-4 there).
    """
    if df < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = NormalDist().inv_cdf(0.975)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std(values: list[float | None]) -> tuple[float, float] | tuple[None, None]:
    """Mean and sample std over seeds; (None, None) when a value is missing (a run evaluated nothing)."""
    if not values or any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class PairedDifference:
    """``method − reference`` per seed, its mean, and the 95% t-interval of the mean (None with one seed)."""

    method: str
    reference: str
    differences: list[float]
    mean: float
    low: float | None
    high: float | None

    @property
    def verdict(self) -> str:
        """In words: whether the interval excludes zero."""
        if self.low is None or self.high is None:
            return "one seed: no interval, the gap cannot be told from seed noise"
        if self.low > 0:
            return f"{self.method} is better: the interval excludes zero"
        if self.high < 0:
            return f"{self.method} is worse: the interval excludes zero"
        return "the interval includes zero: the gap is within seed noise"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def paired_difference(
    method: str, method_values: list[float], reference: str, reference_values: list[float]
) -> PairedDifference:
    """The paired difference of two lists of per-seed values (same seeds, same order)."""
    if len(method_values) != len(reference_values) or not method_values:
        raise ValueError(f"paired values need the same non-zero number of seeds: {len(method_values)} for {method}, "
                         f"{len(reference_values)} for {reference}")
    differences = [m - r for m, r in zip(method_values, reference_values)]
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return PairedDifference(method, reference, differences, mean, None, None)
    half = t_critical_95(len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return PairedDifference(method, reference, differences, mean, mean - half, mean + half)
