"""Argument checks shared by several entry points, so one value is accepted or refused the same way
(and with the same words) wherever it is given."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

MAX_I32 = 2**31 - 1
"""The largest count the C core takes (its sizes and token counts are int32)."""


def check_int(name: str, value: Any, lo: int, hi: int = MAX_I32) -> int:
    """value as an int in [lo, hi] (NumPy integers too, bools not); TypeError / ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value}")
    return int(value)


def check_seed(seed: Any, name: str = "seed") -> int:
    """A random seed: a non-negative int (NumPy integers too, bools not). Every seeded entry point
    (generate, generate_stream, attach_encoder, cepe.Trainer, `cepe train` configs) checks with
    this, so a seed is accepted or refused the same way everywhere."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name} must be a non-negative int, got {seed!r}")
    return int(seed)


def check_keywords(where: str, given: Mapping[str, Any], allowed: Collection[str]) -> None:
    """TypeError for a keyword argument of `where` that is not one of `allowed` (as Python's own,
    with the close names: a misspelt option of a **kwargs API would otherwise pass unseen)."""
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise TypeError(f"{where}() got an unexpected keyword argument {key!r}{hint}")
