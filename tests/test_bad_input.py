"""Bad input never crashes: each case raises a clear exception naming the problem."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import cepe
import cepe_c


@pytest.fixture(scope="module")
def model(tiny):
    return cepe.load(tiny[0])


GOOD = np.array([[3, 4, 5, 6]])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(input_ids=np.array([[1.0, 2.0]])), TypeError, "input_ids must hold integers"),
        (dict(input_ids=np.array([[True, False]])), TypeError, "input_ids must hold integers"),
        (dict(input_ids=np.array(["a", "b"])), TypeError, "input_ids must hold integers"),
        (
            dict(input_ids=np.zeros((1, 2, 3), dtype=np.int64)),
            ValueError,
            r"input_ids must be 1-D .* shape \(1, 2, 3\)",
        ),
        (dict(input_ids=np.int64(5)), ValueError, "input_ids must be 1-D"),
        (dict(input_ids=np.zeros((1, 0), dtype=np.int64)), ValueError, "input_ids must not be empty"),
        (dict(input_ids=np.zeros((0,), dtype=np.int64)), ValueError, "input_ids must not be empty"),
        (dict(input_ids=np.array([[3, 97]])), ValueError, r"token id 97, outside the vocabulary \[0, 97\)"),
        (dict(input_ids=np.array([[3, -1]])), ValueError, r"token id -1, outside the vocabulary"),
        (dict(input_ids=np.array([[3, 2**40]])), ValueError, "outside the vocabulary"),
        (
            dict(input_ids=GOOD, attention_mask=np.ones((1, 3))),
            ValueError,
            r"attention_mask has shape \(1, 3\)",
        ),
        (dict(input_ids=GOOD, attention_mask=np.ones((2, 4))), ValueError, "attention_mask has shape"),
        (dict(input_ids=GOOD, attention_mask=np.full((1, 4), 2)), ValueError, "only 0 and 1"),
        (dict(input_ids=GOOD, attention_mask=np.full((1, 4), 0.5)), ValueError, "only 0 and 1"),
        (dict(input_ids=GOOD, attention_mask=np.full((1, 4), "1")), TypeError, "attention_mask must hold"),
        (dict(input_ids=GOOD, position_ids=np.array([[0, 1, 2]])), ValueError, "position_ids has shape"),
        (dict(input_ids=GOOD, position_ids=np.array([[0, 1, np.nan, 3]])), ValueError, "finite"),
        (dict(input_ids=GOOD, position_ids=np.array([[0, -1, 2, 3]])), ValueError, ">= 0"),
        (dict(input_ids=GOOD, logits="first"), ValueError, "logits must be 'all' or 'last'"),
    ],
)
def test_forward_bad_input(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        model.forward(**kwargs)


def test_non_contiguous_input_is_copied(model):
    wide = np.array([[3, 0, 4, 0, 5, 0]])
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(model.forward(strided), model.forward(np.array([[3, 4, 5]])))
    fortran = np.asfortranarray(np.array([[3, 4], [5, 6]]))
    np.testing.assert_array_equal(model.forward(fortran), model.forward(np.array([[3, 4], [5, 6]])))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0"),
        (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
        (dict(temperature=-0.1), ValueError, "temperature must be"),
        (dict(temperature=float("nan")), ValueError, "temperature must be"),
        (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), ValueError, "top_k must be an int >= 0"),
        (dict(seed=-3), ValueError, "seed must be a non-negative int"),
        (dict(eos_token_id=500), ValueError, "eos_token_id 500 is outside the vocabulary"),
        (dict(eos_token_id="x"), TypeError, "eos_token_id must be"),
        (dict(attention_mask=np.ones((1, 2))), ValueError, "attention_mask has shape"),
    ],
)
def test_generate_bad_input(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        model.generate(GOOD, **{"max_new_tokens": 4, **kwargs})


def test_generate_zero_tokens(model):
    assert model.generate(GOOD, 0).shape == (1, 0)
    assert model.generate(GOOD[0], 0).shape == (0,)


@pytest.mark.parametrize(
    "n_threads, exc, match",
    [
        (0, ValueError, r"n_threads must be in \[1, 1024\], got 0"),
        (-4, ValueError, "n_threads must be in"),
        (100_000, ValueError, "n_threads must be in"),
        ("2", TypeError, "n_threads must be an int"),
        (1.5, TypeError, "n_threads must be an int"),
        (True, TypeError, "n_threads must be an int"),
    ],
)
def test_load_bad_threads(tiny, n_threads, exc, match):
    with pytest.raises(exc, match=match):
        cepe.load(tiny[0], n_threads=n_threads)


@pytest.mark.parametrize(
    "device, exc, match",
    [
        ("tpu", ValueError, "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        (0, TypeError, "device must be a str"),
    ],
)
def test_load_bad_device(tiny, device, exc, match):
    with pytest.raises(exc, match=match):
        cepe.load(tiny[0], device=device)


def test_cache_misuse(model, tiny):
    cache = model.create_cache(batch_size=1, capacity=6)
    with pytest.raises(ValueError, match="batch size 2, the cache was made for 1"):
        model.forward(np.array([[3, 4], [5, 6]]), cache=cache)
    model.forward(GOOD, cache=cache)
    with pytest.raises(RuntimeError, match=r"capacity exceeded: 4 cached \+ 3 new tokens > capacity 6"):
        model.forward(np.array([[3, 4, 5]]), cache=cache)
    other = cepe.load(tiny[0])
    with pytest.raises(TypeError, match="cache must be a KVCache made by this model"):
        other.forward(GOOD, cache=cache)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        model.forward(GOOD, cache="not a cache")
    with pytest.raises(ValueError, match="batch_size and capacity must be >= 1"):
        model.create_cache(batch_size=0)
    with pytest.raises(TypeError, match="capacity must be an int"):
        model.create_cache(capacity=3.0)


def test_core_module_rejects_bad_arrays(model):
    """The thin C module checks what it is handed, even past the Python layer."""
    ctx = cepe_c.Context(model._core, 1, 8)
    with pytest.raises(TypeError, match="input_ids must have dtype int32"):
        ctx.forward(np.array([[3, 4]], dtype=np.int64), None, None, 2)
    with pytest.raises(ValueError, match="input_ids must be C-contiguous"):
        ctx.forward(np.array([[3, 0, 4]], dtype=np.int32)[:, ::2], None, None, 2)
    with pytest.raises(ValueError, match="input_ids must have 2 dimensions"):
        ctx.forward(np.array([3, 4], dtype=np.int32), None, None, 2)
    with pytest.raises(ValueError, match=r"token id 99 at \(row 0, position 1\) is out of range"):
        ctx.forward(np.array([[3, 99]], dtype=np.int32), None, None, 2)
    with pytest.raises(TypeError, match="must be a numpy.ndarray"):
        ctx.forward([[3, 4]], None, None, 2)
    with pytest.raises(ValueError, match="logits_mode must be 0, 1 or 2"):
        ctx.forward(np.array([[3, 4]], dtype=np.int32), None, None, 7)
    with pytest.raises(RuntimeError, match="generate needs a prompt"):
        ctx.generate(3)
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        cepe_c.Context(model._core, 0, 8)
    with pytest.raises(MemoryError, match="out of memory"):
        cepe_c.Context(model._core, 2**30, 2**30)
    m = cepe_c.Model(model.config.core_kwargs())
    with pytest.raises(ValueError, match="unexpected tensor x: no such weight"):
        m.bind("x", np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"tensor model.norm.weight has shape \(3,\), the config implies \(48,\)"):
        m.bind("model.norm.weight", np.zeros(3, dtype=np.float32))
    with pytest.raises(TypeError, match="tensor model.norm.weight must have dtype float32"):
        m.bind("model.norm.weight", np.zeros(48, dtype=np.float64))
    with pytest.raises(KeyError, match="missing tensor model.embed_tokens.weight"):
        m.finalize()
    with pytest.raises(RuntimeError, match="unbound weights"):
        cepe_c.Context(m, 1, 4)


def test_model_is_shareable_across_threads(model):
    ids = np.array([[5, 6, 7, 8, 9, 10]])
    expected = model.forward(ids)
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(model.forward(ids))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 80
    for r in results:
        np.testing.assert_array_equal(r, expected)


# ------------------------------------------------- regressions from a review


def test_uninitialised_context_raises(model):
    ctx = cepe_c.Context.__new__(cepe_c.Context)
    with pytest.raises(RuntimeError, match="not initialised"):
        ctx.forward(np.zeros((1, 1), np.int32), None, None, 1)
    with pytest.raises(RuntimeError, match="not initialised"):
        ctx.set_context(np.zeros((1, 1, 4), np.float32), None)
    with pytest.raises(RuntimeError, match="not initialised"):
        ctx.generate(2)


def test_byte_swapped_arrays_are_rejected(model):
    ctx = cepe_c.Context(model._core, 1, 8)
    with pytest.raises((TypeError, ValueError), match="native byte order|dtype int32"):
        ctx.forward(np.array([[3, 4]], dtype=">i4"), None, None, 2)
    # the Python layer converts them instead
    np.testing.assert_array_equal(model.forward(np.array([[3, 4]], dtype=">i8")), model.forward(np.array([[3, 4]])))


def test_generate_capacity_checked_before_allocating(model):
    ctx = cepe_c.Context(model._core, 1, 8)
    ctx.forward(np.array([[3, 4]], dtype=np.int32), None, None, 0)
    with pytest.raises(RuntimeError, match="capacity exceeded"):
        ctx.generate(2**31 - 1)


def test_generate_leaves_no_stale_logits(model):
    ctx = cepe_c.Context(model._core, 1, 16)
    ctx.forward(np.array([[3, 4, 5]], dtype=np.int32), None, None, 0)
    ctx.generate(3)
    assert ctx.length == 5  # the last sampled token is not in the cache ...
    with pytest.raises(RuntimeError, match="generate needs a prompt"):
        ctx.generate(3)  # ... so continuing needs it fed back first


def test_tiny_temperature_and_nan_logits_are_greedy(model):
    ids = np.array([3, 4, 5, 6])
    greedy = model.generate(ids, 6, eos_token_id=[])
    for kw in (dict(temperature=1e-40), dict(temperature=1e-40, top_k=5)):
        np.testing.assert_array_equal(model.generate(ids, 6, eos_token_id=[], seed=1, **kw), greedy)


def test_top_k_then_top_p_renormalised(model):
    """transformers applies top-p to the top-k set renormalised: with top_k=2 and
    top_p just above the larger of the two kept probabilities' share, only the
    most likely token may come out."""
    ids = np.array([3, 4, 5, 6])
    logits = model.forward(ids, logits="last").astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top2 = np.argsort(-p)[:2]
    share = p[top2[0]] / p[top2].sum()
    outs = {int(model.generate(ids, 1, temperature=1.0, top_k=2, top_p=share * 0.999, seed=s)[0]) for s in range(40)}
    assert outs == {int(top2[0])}


def test_interrupted_forward_rolls_back(model):
    """A stopped forward leaves the context as before the call (C level)."""
    ctx = cepe_c.Context(model._core, 1, 4096)
    ctx.forward(np.array([[3, 4, 5]], dtype=np.int32), None, None, 0)
    first_total = ctx.progress()[1]
    long_ids = np.random.default_rng(0).integers(3, 97, (1, 4000)).astype(np.int32)

    def interrupt_once_running() -> None:
        # a fixed delay raced the engine (a fast BLAS finished first); the core's
        # progress says when the long call has done its first layer pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done, total = ctx.progress()
            if total != first_total and done >= 1:
                break
        ctx.interrupt()

    t = threading.Thread(target=interrupt_once_running)
    t.start()
    try:
        ctx.forward(long_ids, None, None, 0)
        pytest.skip("the forward finished before the interrupt")
    except KeyboardInterrupt:
        pass
    t.join()
    assert ctx.length == 3
    got = ctx.forward(np.array([[6, 7]], dtype=np.int32), None, None, 2)
    np.testing.assert_allclose(got[0], model.forward(np.array([3, 4, 5, 6, 7]))[3:], atol=1e-5, rtol=0)


def test_config_token_ids(tiny, tmp_path):
    import json
    import shutil

    p = tmp_path / "m"
    shutil.copytree(tiny[0], p)
    cfg = json.loads((p / "config.json").read_text())
    cfg["pad_token_id"] = -1  # "unset" in older LLaMA configs
    (p / "config.json").write_text(json.dumps(cfg))
    assert cepe.load(str(p)).config.pad_token_id is None
    cfg["eos_token_id"] = 500
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(cepe.ConfigError, match="'eos_token_id' 500 is outside the vocabulary"):
        cepe.load(str(p))
