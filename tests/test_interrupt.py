"""Ctrl-C during a long call into the C core stops it within a second and
leaves the model usable."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import random_ids

import cepe


def _send_sigint_after(seconds: float) -> threading.Timer:
    t = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT))
    t.start()
    return t


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals go to main")
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_ctrl_c_interrupts_a_long_call(tiny, call):
    model = cepe.load(tiny[0], n_threads=1)
    ids = random_ids(np.random.default_rng(0), (1, 12000 if call == "forward" else 8))
    run = {
        "forward": lambda: model.forward(ids, logits="last"),
        "generate": lambda: model.generate(ids, 5000, eos_token_id=[]),
    }[call]
    start = time.perf_counter()
    run()
    full = time.perf_counter() - start
    assert full > 1.0, "the call must be long enough to interrupt"
    timer = _send_sigint_after(0.3)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run()
    stopped = time.perf_counter() - start
    timer.join()
    assert stopped < 0.3 + 1.0, f"took {stopped:.2f}s to stop (the whole call takes {full:.2f}s)"
    out = model.forward(ids[:, :16])  # the model still works
    assert np.isfinite(out).all()


def test_interrupted_cache_is_reset(tiny):
    model = cepe.load(tiny[0], n_threads=1)
    cache = model.create_cache(1, 7000)
    ids = random_ids(np.random.default_rng(1), (1, 6000))
    timer = _send_sigint_after(0.2)
    with pytest.raises(KeyboardInterrupt):
        model.forward(ids, cache=cache, logits="last")
    timer.join()
    assert len(cache) == 0
    short = ids[:, :10]
    np.testing.assert_allclose(model.forward(short, cache=cache), model.forward(short), atol=1e-6, rtol=0)
