"""Percentile-bootstrap intervals over documents or questions (cepe.eval's LM and QA protocols)."""

from __future__ import annotations

import numpy as np

__all__ = ["boot_ppl", "bootstrap_indices", "interval"]


def bootstrap_indices(n_docs: int, draws: int, seed: int) -> np.ndarray:
    """(draws, n_docs) document indices resampled with replacement: the same draws serve every
    method and N, so differences between them are paired."""
    return np.random.default_rng(seed).integers(0, n_docs, size=(draws, n_docs))


def boot_ppl(nll: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Perplexity of each bootstrap draw (rows of idx index the documents)."""
    return np.exp(np.asarray(nll)[idx].mean(axis=1))


def interval(draws: np.ndarray) -> list[float] | None:
    """The 2.5 / 97.5 percentiles of the finite draws (None if there are none)."""
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return None
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return [float(lo), float(hi)]
