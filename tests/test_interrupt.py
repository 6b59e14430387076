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
@pytest.mark.parametrize("call", ["forward", "generate", "generate_stream"])
def test_ctrl_c_interrupts_a_long_call(tiny, call):
    model = cepe.load(tiny[0], n_threads=1)
    n = 12000 if call == "forward" else 5000  # prompt tokens / new tokens, grown until a call takes > 1 s
    while True:
        ids = random_ids(np.random.default_rng(0), (1, n if call == "forward" else 8))
        run = {
            "forward": lambda ids=ids: model.forward(ids, logits="last"),
            "generate": lambda ids=ids, n=n: model.generate(ids, n, eos_token_id=[]),
            "generate_stream": lambda ids=ids, n=n: list(model.generate_stream(ids, n, eos_token_id=[])),
        }[call]
        start = time.perf_counter()
        run()
        full = time.perf_counter() - start
        if full > 1.0 or n >= 48000:
            break
        n = int(n * 1.5)
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
    cache = model.create_cache(1, 16000)
    ids = random_ids(np.random.default_rng(1), (1, 16000))  # about 1.4 s here: still running at 0.2 s
    timer = _send_sigint_after(0.2)
    with pytest.raises(KeyboardInterrupt):
        model.forward(ids, cache=cache, logits="last")
    timer.join()
    assert len(cache) == 0
    short = ids[:, :10]
    np.testing.assert_allclose(model.forward(short, cache=cache), model.forward(short), atol=1e-6, rtol=0)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="the bar runs on main")
def test_long_call_shows_the_cores_progress(tiny, monkeypatch):
    """A call still running after PROGRESS_AFTER_S gets a bar fed by the core's
    layer passes, closed at the end with every pass counted."""
    import cepe.model as cm

    bars = []

    class FakeBar:
        def __init__(self, total, desc, **kw):
            self.total, self.desc, self.n, self.closed = total, desc, 0, False
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setattr(cm, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(cm, "progress_bar", FakeBar)
    model = cepe.load(tiny[0], n_threads=1)
    ids = random_ids(np.random.default_rng(2), (1, 12000))  # > 1 s (see above), 24 chunks of 512
    model.forward(ids, logits="last")
    assert len(bars) == 1 and bars[0].desc == "forward" and bars[0].closed
    layers = model.config.num_hidden_layers
    assert bars[0].total == layers * 24
    assert 0 < bars[0].n <= bars[0].total  # updated while it ran (the last polls may miss the end)
