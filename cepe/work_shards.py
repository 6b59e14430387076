"""Splitting corpus preparation into independent pieces (`--shard i/n`), so that any batch system
(Slurm array jobs, Ray tasks, plain shell loops) can run them on many machines at once.

Shard i of n takes the contiguous items [count * i // n, count * (i + 1) // n) of an ordered list
(documents, training windows) and writes its own files, named with shard_path; read in shard
order they hold exactly what one unsharded run writes.
"""

from __future__ import annotations

import os
import re


def parse_shard(spec: str, name: str = "--shard") -> tuple[int, int]:
    """'i/n' -> (i, n), with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec) if isinstance(spec, str) else None
    if not m:
        raise ValueError(f"{name} must be 'i/n' (shard i of n, counted from 0), got {spec!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise ValueError(f"{name} {spec!r}: need n >= 1 and 0 <= i < n")
    return i, n


def shard_range(count: int, i: int, n: int) -> tuple[int, int]:
    """The items [lo, hi) of shard i of n over `count` items (sizes differ by at most one)."""
    return count * i // n, count * (i + 1) // n


def shard_path(path: str, i: int, n: int) -> str:
    """dir/name.npy -> dir/name-00002-of-00008.npy (shard 2 of 8)."""
    root, ext = os.path.splitext(path)
    return f"{root}-{i:05d}-of-{n:05d}{ext}"
