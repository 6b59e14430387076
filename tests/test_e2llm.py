"""E2-LLM training positions (csrc/rope/e2llm.c via cepe.rope.e2llm_positions):
the shape of each window, the ranges and uniformity of the scale g and the
offset t, reproducibility, and argument errors."""

from __future__ import annotations

import numpy as np
import pytest

import cepe_c
from cepe.rope import E2LLMPositions, e2llm_positions

# chi-square critical values at p = 0.001 (the tests use fixed seeds, so a
# pass is deterministic; the bound only says the generator is not biased).
CHI2_CRIT_999 = {6: 22.458, 9: 27.877, 19: 43.820}


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def expected_positions(R: int, g: int, t: int) -> np.ndarray:
    m = np.arange(R, dtype=np.int64)
    return np.where(m < 4, m, m + t).astype(np.float64) / g


def test_shapes_and_dtypes():
    out = e2llm_positions(R=32, L=16, g_max=4, n=5, seed=1)
    assert isinstance(out, E2LLMPositions)
    assert out.positions.shape == (5, 32) and out.positions.dtype == np.float64
    assert out.scales.shape == (5,) and out.scales.dtype == np.int32
    assert out.offsets.shape == (5,) and out.offsets.dtype == np.int32
    single = e2llm_positions(8, 4, 2)  # n defaults to 1
    assert single.positions.shape == (1, 8)


def test_every_row_is_the_formula():
    """[0, 1, 2, 3, 4+t, ..., R-1+t] / g, bit for bit."""
    R, L, g_max = 64, 16, 8
    pos, g, t = e2llm_positions(R, L, g_max, n=2000, seed=7)
    for i in range(len(g)):
        np.testing.assert_array_equal(pos[i], expected_positions(R, int(g[i]), int(t[i])))


def test_bounds():
    # R > L: small g have no room to shift (g*L < R gives t = 0).
    R, L, g_max = 64, 16, 8
    pos, g, t = e2llm_positions(R, L, g_max, n=20000, seed=3)
    assert g.min() == 1 and g.max() == g_max
    t_max = np.maximum(0, g.astype(np.int64) * L - R)
    assert np.all(t >= 0) and np.all(t <= t_max)
    assert np.all(t[g * L <= R] == 0)
    assert np.any(t == t_max)  # the top of the range is reachable
    # the last position never passes the interpolated window g*L (when it fits)
    fits = g.astype(np.int64) * L >= R
    assert np.all(np.rint(pos[fits, -1] * g[fits]) <= g[fits].astype(np.int64) * L - 1)


def test_sinks_never_shift():
    pos, g, t = e2llm_positions(R=50, L=10, g_max=6, n=3000, seed=11)
    assert t.max() > 0
    np.testing.assert_array_equal(pos[:, :4], np.arange(4)[None, :] / g[:, None].astype(np.float64))
    # the rest is shifted by t: relative distances among non-sink tokens are unchanged
    np.testing.assert_allclose(np.diff(pos[:, 4:], axis=1) * g[:, None], 1.0, rtol=1e-12)


@pytest.mark.parametrize("g_max", [7, 10, 20])
def test_scale_is_uniform(g_max):
    _, g, _ = e2llm_positions(R=8, L=4, g_max=g_max, n=20000, seed=2024)
    counts = np.bincount(g, minlength=g_max + 1)[1:]
    assert counts.sum() == 20000 and np.all(counts > 0)
    assert chi_square(counts) < CHI2_CRIT_999[g_max - 1]


def test_offset_is_uniform_for_fixed_scale():
    # g_max = 1: g = 1 and t ~ U{0..L-R} = U{0..999}
    R, L = 10, 1009
    _, g, t = e2llm_positions(R, L, g_max=1, n=20000, seed=5)
    assert np.all(g == 1)
    assert t.min() == 0 and t.max() == L - R  # 20000 draws hit both ends
    counts = np.bincount(t // 100, minlength=10)
    assert len(counts) == 10 and chi_square(counts) < CHI2_CRIT_999[9]


def test_offset_is_uniform_within_each_scale():
    R, L, g_max = 100, 500, 4
    _, g, t = e2llm_positions(R, L, g_max, n=40000, seed=9)
    for s in range(1, g_max + 1):
        ts = t[g == s].astype(np.int64)
        t_max = s * L - R
        assert ts.max() <= t_max
        counts = np.bincount(ts * 10 // (t_max + 1), minlength=10)
        assert chi_square(counts) < CHI2_CRIT_999[9], (s, counts)


def test_paper_setting():
    """LLaMA-2 (L = 4096), R = 4096, g_max = 20: windows up to 80k positions."""
    pos, g, t = e2llm_positions(R=4096, L=4096, g_max=20, n=64, seed=0)
    assert np.all(t <= (g.astype(np.int64) - 1) * 4096)
    assert np.all(np.rint(pos[:, -1] * g) <= g.astype(np.int64) * 4096 - 1)


def test_reproducible_per_seed():
    a = e2llm_positions(40, 8, 6, n=100, seed=123)
    b = e2llm_positions(40, 8, 6, n=100, seed=123)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = e2llm_positions(40, 8, 6, n=100, seed=124)
    assert not np.array_equal(a.scales, c.scales) or not np.array_equal(a.offsets, c.offsets)
    # a longer run starts with the shorter one (one (g, t) pair per row, in order)
    d = e2llm_positions(40, 8, 6, n=150, seed=123)
    np.testing.assert_array_equal(d.positions[:100], a.positions)
    big = e2llm_positions(40, 8, 6, n=10, seed=2**64 - 1)  # the whole uint64 range is valid
    assert big.positions.shape == (10, 40)


def test_binding_matches_wrapper():
    pos, g, t = cepe_c.e2llm_positions(16, 8, 3, 20, 42)
    ref = e2llm_positions(16, 8, 3, n=20, seed=42)
    np.testing.assert_array_equal(pos, ref.positions)
    np.testing.assert_array_equal(g, ref.scales)
    np.testing.assert_array_equal(t, ref.offsets)


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        (dict(R=0, L=4, g_max=2), ValueError, r"R \(training window\) must be >= 1, got 0"),
        (dict(R=8, L=0, g_max=2), ValueError, r"L \(base context window\) must be >= 1, got 0"),
        (dict(R=8, L=4, g_max=0), ValueError, r"g_max \(largest scale\) must be >= 1, got 0"),
        (dict(R=8, L=4, g_max=2, n=0), ValueError, "n_samples must be >= 1, got 0"),
        (dict(R=8, L=4, g_max=2, seed=-1), ValueError, r"seed must be an integer in \[0, 2\*\*64\)"),
        (dict(R=8, L=4, g_max=2, seed=2**64), ValueError, r"seed must be an integer in \[0, 2\*\*64\)"),
        (dict(R=8, L=2**20, g_max=2**12), ValueError, "g_max \\* L = 4294967296 does not fit in int32"),
        (dict(R=2**31, L=4, g_max=2), ValueError, "R must fit in int32"),
        (dict(R=8.0, L=4, g_max=2), TypeError, "R must be an integer"),
        (dict(R=8, L=4, g_max=True), TypeError, "g_max must be an integer"),
    ],
)
def test_bad_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        e2llm_positions(**kwargs)
