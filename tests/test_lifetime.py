"""Leaks, lifetimes and concurrent use: the protections that keep the C core
from taking the interpreter down."""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest

import cepe
import cepe_c


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
@pytest.mark.skipif("ASAN_OPTIONS" in os.environ, reason="ASan's quarantine keeps freed memory resident by design")
def test_rss_stays_flat_over_many_calls(tiny):
    """10,000 forward/encode-free/generate calls: memory does not grow (a leaked
    context per call would be ~100 KB each, ~1 GB in total)."""
    model = cepe.load(tiny[0], n_threads=1)
    ids = np.array([[3, 4, 5, 6, 7, 8]])
    for _ in range(200):  # warm up allocator pools
        model.forward(ids)
    gc.collect()
    before = rss_bytes()
    for i in range(10_000):
        if i % 3 == 0:
            model.generate(ids[0], 2, eos_token_id=[])
        else:
            model.forward(ids, logits="last")
    gc.collect()
    grown = rss_bytes() - before
    assert grown < 32 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 10,000 calls"


def test_outputs_outlive_the_model(tiny):
    model = cepe.load(tiny[0])
    out = model.forward(np.array([3, 4, 5]))
    cache = model.create_cache(1, 8)
    first = model.forward(np.array([[3, 4]]), cache=cache)
    del model
    gc.collect()
    assert np.isfinite(out).all() and np.isfinite(first).all()
    # the cache keeps the model (and its memory-mapped weights) alive
    more = cache.model.forward(np.array([[5]]), cache=cache)
    assert np.isfinite(more).all() and len(cache) == 3


def test_weights_outlive_their_arrays(tiny):
    """The core borrows weight buffers; the Model object holds them, so
    dropping every other reference is safe."""
    from cepe.safetensors_io import Checkpoint

    model = cepe.load(tiny[0])
    kwargs = model.config.core_kwargs()
    core = cepe_c.Model(kwargs, None, n_threads=1)
    ckpt = Checkpoint(tiny[0])
    for name in ckpt.names():
        core.bind(name, np.array(ckpt.get(name)))  # temporary copies, referenced only by the core
    core.finalize()
    del ckpt
    gc.collect()
    ctx = cepe_c.Context(core, 1, 4)
    del core
    gc.collect()
    out = ctx.forward(np.array([[3, 4]], dtype=np.int32), None, None, 2)
    np.testing.assert_allclose(out, model.forward(np.array([[3, 4]])), atol=1e-6, rtol=0)


def test_two_threads_one_cache_is_rejected(tiny):
    model = cepe.load(tiny[0], n_threads=1)
    cache = model.create_cache(1, 13000)
    # about 0.8 s here (3000 tokens had become short enough to end before the second call)
    ids = np.random.default_rng(0).integers(3, 97, (1, 12000))
    errors: list[BaseException] = []

    def long_call() -> None:
        try:
            model.forward(ids, cache=cache, logits="last")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=long_call)
    t.start()
    time.sleep(0.05)
    with pytest.raises(RuntimeError, match="in use by another thread"):
        model.forward(np.array([[3]]), cache=cache)
    t.join()
    assert not errors
    assert len(cache) == 12000


def test_two_models_in_two_threads_and_the_gil_is_released(tiny):
    """Two threads on two models give the single-thread results, and while the
    core computes, Python code in another thread keeps running (GIL released)."""
    a, b = cepe.load(tiny[0], n_threads=1), cepe.load(tiny[0], n_threads=1)
    ids = np.random.default_rng(1).integers(3, 97, (1, 6000))
    want = a.forward(ids, logits="last")
    results: dict[str, np.ndarray] = {}
    threads = [
        threading.Thread(target=lambda m=m, k=k: results.__setitem__(k, m.forward(ids, logits="last")))
        for k, m in (("a", a), ("b", b))
    ]
    for t in threads:
        t.start()
    spins = 0
    while any(t.is_alive() for t in threads):
        spins += 1  # only possible while both workers are inside the core without the GIL
    for t in threads:
        t.join()
    np.testing.assert_array_equal(results["a"], want)
    np.testing.assert_array_equal(results["b"], want)
    assert spins > 10_000, spins
