"""Replays the fuzz corpus and every saved crash reproducer through the fuzz
targets (tests/fuzz/targets.py): each must succeed or raise a documented
exception type, never crash."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent / "fuzz"
sys.path.insert(0, str(FUZZ))
from targets import TARGETS  # noqa: E402


def cases() -> list:
    out = []
    for target in sorted(TARGETS):
        for d in (FUZZ / "corpus" / target, FUZZ / "crashes" / target):
            if d.is_dir():
                out += [pytest.param(target, p, id=f"{target}/{d.name}/{p.name[:12]}") for p in sorted(d.iterdir())]
    return out


@pytest.mark.parametrize("target, path", cases())
def test_replay(target, path):
    TARGETS[target](path.read_bytes())


def test_corpus_is_not_empty():
    for target in TARGETS:
        assert any((FUZZ / "corpus" / target).iterdir()), target


def test_targets_reject_garbage_cleanly():
    for fn in TARGETS.values():
        for data in (b"", b"\xff" * 64, os.urandom(256), b'{"hidden_size": -1}'):
            fn(data)
