"""labelenc.stats: t critical values and the paired difference with its 95% interval."""

from __future__ import annotations

import math

import pytest

from labelenc.stats import mean_std, paired_difference, t_critical_95


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042),
                                          (31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799), (1000, 1.9623)])
def test_t_critical_matches_the_tables(df: int, expected: float) -> None:
    """Tabulated values exactly; the expansion above 30 degrees of freedom to 1e-3 of published quantiles."""
    assert t_critical_95(df) == pytest.approx(expected, abs=1e-3 if df > 30 else 1e-9)


def test_t_critical_decreases_towards_the_normal_quantile() -> None:
    values = [t_critical_95(df) for df in range(1, 200)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] > 1.959964 and t_critical_95(10**6) == pytest.approx(1.959964, abs=1e-5)
    with pytest.raises(ValueError):
        t_critical_95(0)


def test_paired_difference_by_hand() -> None:
    """d = (1, 2, 0): mean 1, sd 1, half-width 4.303 / sqrt(3); the interval includes zero."""
    result = paired_difference("LabelEnc", [10.0, 12.0, 11.0], "baseline 2x", [9.0, 10.0, 11.0])
    half = 4.303 / math.sqrt(3)
    assert result.differences == [1.0, 2.0, 0.0] and result.mean == 1.0
    assert (result.low, result.high) == (pytest.approx(1 - half), pytest.approx(1 + half))
    assert "within seed noise" in result.verdict
    assert result.to_dict()["verdict"] == result.verdict


def test_a_consistent_gap_excludes_zero_either_way() -> None:
    better = paired_difference("a", [5.0, 6.0, 7.0, 8.0], "b", [4.0, 5.1, 5.9, 7.0])
    assert better.low > 0 and "better" in better.verdict
    worse = paired_difference("b", [4.0, 5.1, 5.9, 7.0], "a", [5.0, 6.0, 7.0, 8.0])
    assert worse.high < 0 and "worse" in worse.verdict
    assert worse.mean == pytest.approx(-better.mean)


def test_one_seed_gives_no_interval_and_mismatched_seeds_are_refused() -> None:
    single = paired_difference("a", [3.0], "b", [2.0])
    assert single.mean == 1.0 and single.low is None and "cannot be told from seed noise" in single.verdict
    with pytest.raises(ValueError, match="same non-zero number of seeds"):
        paired_difference("a", [1.0, 2.0], "b", [1.0])


def test_mean_std_over_seeds() -> None:
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([4.0]) == (4.0, 0.0)
    assert mean_std([1.0, None]) == (None, None)
