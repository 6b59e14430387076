"""The main thread's core calls run on one persistent worker thread (Ctrl-C handling, without a
new thread and OpenMP team per call); a forked child gets its own."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np

import cepe
from cepe.model import _interruptible

IDS = np.array([[3, 14, 15, 9]])


def test_one_worker_for_the_main_threads_calls(tiny):
    model = cepe.load(tiny[0])
    ctx = model.create_cache(1, 8)._ctx
    idents = {_interruptible(ctx, threading.get_ident) for _ in range(5)}
    assert len(idents) == 1 and threading.get_ident() not in idents
    (worker,) = [t for t in threading.enumerate() if t.ident in idents]
    assert worker.name == "cepe-core" and worker.daemon
    cache = model.create_cache(1, 16)
    steps = [model.forward(IDS[:, i : i + 1], cache=cache) for i in range(IDS.shape[1])]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), model.forward(IDS), rtol=1e-5, atol=1e-5)


def _forward_in_child(path):
    return cepe.load(path, n_threads=1).forward(IDS, logits="last")


def test_a_forked_child_starts_its_own_worker(tiny):
    model = cepe.load(tiny[0], n_threads=1)
    want = model.forward(IDS, logits="last")  # the parent's worker exists now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_forward_in_child, (tiny[0],)).get(timeout=120)
    np.testing.assert_array_equal(got, want)
