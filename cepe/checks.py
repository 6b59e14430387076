"""Argument checks shared by several entry points, so one value is accepted or refused the same way
(and with the same words) wherever it is given."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_seed(seed: Any, name: str = "seed") -> int:
    """A random seed: a non-negative int (NumPy integers too, bools not). Every seeded entry point
    (generate, generate_stream, attach_encoder, cepe.Trainer, `cepe train` configs) checks with
    this, so a seed is accepted or refused the same way everywhere."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name} must be a non-negative int, got {seed!r}")
    return int(seed)
