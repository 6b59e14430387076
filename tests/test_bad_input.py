"""Bad input never crashes: each case raises a clear exception naming the problem."""

from __future__ import annotations

import os
import re
import threading
import time

import numpy as np
import pytest
from conftest import overcommit_always

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
        (dict(max_new_tokens=-1), ValueError, r"max_new_tokens must be an int in \[0, 2147483647\], got -1"),
        (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
        (dict(max_new_tokens=2**31), ValueError, r"max_new_tokens must be an int in \[0, 2147483647\]"),
        (dict(max_new_tokens=2**31 - 2), ValueError, r"max_new_tokens \(2147483646\) plus the prompt's 4 tokens"),
        (dict(temperature=-0.1), ValueError, "temperature must be"),
        (dict(temperature=float("nan")), ValueError, "temperature must be"),
        (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), ValueError, r"top_k must be an int in \[0, 2147483647\], got -2"),
        (dict(top_k=2**31), ValueError, r"top_k must be an int in \[0, 2147483647\], got 2147483648"),
        (dict(top_k=2**63), ValueError, "top_k must be an int in"),
        (dict(seed=-3), ValueError, "seed must be a non-negative int"),
        (dict(eos_token_id=500), ValueError, "eos_token_id 500 is outside the vocabulary"),
        (dict(eos_token_id="x"), TypeError, "eos_token_id must be"),
        (dict(attention_mask=np.ones((1, 2))), ValueError, "attention_mask has shape"),
    ],
)
def test_generate_bad_input(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        model.generate(GOOD, **{"max_new_tokens": 4, **kwargs})


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(max_new_tokens=2**31), ValueError, r"max_new_tokens must be an int in \[0, 2147483647\]"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an int in"),
        (dict(max_new_tokens=2**31 - 2), ValueError, "max_new_tokens .* plus the prompt's 4 tokens"),
        (dict(top_k=2**31), ValueError, r"top_k must be an int in \[0, 2147483647\]"),
        (dict(top_k=-1), ValueError, "top_k must be an int in"),
        (dict(temperature=float("inf")), ValueError, "temperature must be"),
        (dict(top_p=0.0), ValueError, "top_p must be in"),
    ],
)
def test_generate_stream_bad_input(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        list(model.generate_stream(GOOD, **{"max_new_tokens": 4, **kwargs}))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(batch_size=0), ValueError, r"batch_size must be an int in \[1, 2147483647\], got 0"),
        (dict(batch_size=2**40), ValueError, r"batch_size must be an int in \[1, 2147483647\], got 1099511627776"),
        (dict(capacity=2**40), ValueError, r"capacity must be an int in \[1, 2147483647\], got 1099511627776"),
        (dict(capacity=0), ValueError, "capacity must be an int in"),
        (dict(capacity=3.0), TypeError, "capacity must be an int"),
        (dict(batch_size=True), TypeError, "batch_size must be an int"),
    ],
)
def test_create_cache_bad_input(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        model.create_cache(**kwargs)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda m: cepe_c.Context(m._core, 2**40, 8), ValueError, "batch must be <= 2147483647, got 1099511627776"),
        (lambda m: cepe_c.Context(m._core, 1, 2**40), ValueError, "capacity must be <= 2147483647"),
        (lambda m: cepe_c.Context(m._core, 1, -(2**40)), ValueError, "capacity must be >= "),
        (lambda m: cepe_c.Context(m._core, 1, "8"), TypeError, "capacity must be an int, got str"),
        (lambda m: cepe_c.Context(m._core, 1, 8).generate(_sampler(m), 2**31), ValueError, "max_new_tokens must be <="),
        (lambda m: cepe_c.Sampler(1, 8, top_k=2**31), ValueError, "top_k must be <= 2147483647"),
        (lambda m: cepe_c.Sampler(1, 8, pad_token_id=2**31), ValueError, "pad_token_id must be <= 2147483647"),
        (lambda m: cepe_c.Sampler(1, 8, repeat_last_n=-(2**31) - 1), ValueError, "repeat_last_n must be >= "),
    ],
)
def test_core_module_names_int_arguments(model, call, exc, match):
    """The C module names an int argument it cannot take (not an OverflowError naming nothing)."""
    with pytest.raises(exc, match=match):
        call(model)


def _sampler(model, batch=1):
    """A greedy core sampler for the model's vocabulary."""
    return cepe_c.Sampler(batch, model.config.vocab_size)


@pytest.mark.skipif(overcommit_always(), reason="the kernel grants any allocation (vm.overcommit_memory = 1)")
@pytest.mark.filterwarnings("ignore::cepe.LongInputWarning")
def test_generate_out_of_memory_names_max_new_tokens(model):
    for gen in (lambda: model.generate(GOOD, 2**31 - 10), lambda: list(model.generate_stream(GOOD, 2**31 - 10))):
        with pytest.raises(MemoryError, match=r"plus max_new_tokens \(2147483638\) .*lower max_new_tokens"):
            gen()


def test_long_input_warns(model):
    """Past the model's window (max_position_embeddings = 1024) a call warns,
    naming the length, the window and the ways to handle long inputs."""
    ids = np.random.default_rng(0).integers(3, 97, size=(1, 1100))
    with pytest.warns(cepe.LongInputWarning, match=r"1100 tokens, 1\.1x the model's window of 1024 .*CEPE"):
        model.forward(ids, logits="last")
    with pytest.warns(cepe.LongInputWarning, match="the prompt plus max_new_tokens hold 1030 tokens"):
        model.generate(ids[:, :1000], 30, eos_token_id=[])
    with pytest.warns(cepe.LongInputWarning, match="1100 tokens"):
        model.perplexity(ids, eval_window=4)
    cache = model.create_cache(capacity=1100)
    model.forward(ids[:, :1000], cache=cache, logits="last")
    with pytest.warns(cepe.LongInputWarning, match="1050 tokens"):
        model.forward(ids[:, 1000:1050], cache=cache, logits="last")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.forward(ids[:, :1024], logits="last")  # up to the window: no warning


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
    with pytest.raises(ValueError, match=r"3 tokens per row, but the cache has room for 2 more \(4 of its capacity 6"):
        model.forward(np.array([[3, 4, 5]]), cache=cache)
    assert len(cache) == 4
    other = cepe.load(tiny[0])
    with pytest.raises(TypeError, match="cache must be a KVCache made by this model"):
        other.forward(GOOD, cache=cache)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        model.forward(GOOD, cache="not a cache")
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, "):
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
        ctx.generate(_sampler(model), 3)
    with pytest.raises(TypeError, match="sampler must be a cepe_c.Sampler"):
        ctx.generate(3, 3)
    with pytest.raises(ValueError, match="the sampler is for 2 rows"):
        ctx.forward(np.array([[3, 4]], dtype=np.int32), None, None, 0)
        ctx.generate(cepe_c.Sampler(2, model.config.vocab_size), 3)
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
        ctx.generate(_sampler(model), 2)


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
        ctx.generate(_sampler(model), 2**31 - 1)


def test_generate_leaves_no_stale_logits(model):
    ctx = cepe_c.Context(model._core, 1, 16)
    ctx.forward(np.array([[3, 4, 5]], dtype=np.int32), None, None, 0)
    sampler = _sampler(model)
    ctx.generate(sampler, 3)
    assert ctx.length == 5  # the last sampled token is not in the cache ...
    with pytest.raises(RuntimeError, match="generate needs a prompt"):
        ctx.generate(sampler, 3)  # ... so continuing needs it fed back first


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


# ------------------------------------------------- float32 overflow, text, chat templates


@pytest.fixture(scope="module")
def cepe_model(tmp_path_factory):
    from cepe.testing.reference import make_reference

    return cepe.load(make_reference(seed=3).save(str(tmp_path_factory.mktemp("bad_cepe"))))


def _scaled_copy(src, dst, name: str, factor: float) -> str:
    """A copy of a model directory with one tensor multiplied by factor."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    tensors[name] = tensors[name] * np.float32(factor)
    save_file(tensors, path)
    return str(dst)


@pytest.mark.parametrize(
    "value, match",
    [
        (1e30, r"encoder_hidden_states holds a value of magnitude 1e\+30, beyond 1.84e\+19"),
        (-3e38, "encoder_hidden_states holds a value of magnitude 3e\\+38"),
        (np.float64(1e39), "encoder_hidden_states holds NaN or Inf"),
        (1e19, "the forward overflowed float32: its logits are not finite .*encoder_hidden_states"),
    ],
)
def test_huge_context_states_raise(cepe_model, value, match):
    """States whose arithmetic overflows float32 raise instead of giving
    all-zero (or silently context-free) logits."""
    E = np.full((1, 5, cepe_model.config.encoder_hidden_size), value)
    E[..., ::2] *= -1
    with pytest.raises(ValueError, match=match):
        cepe_model.forward(GOOD, encoder_hidden_states=E)


def test_overflow_in_the_forward_raises(cepe_model):
    E = np.full((1, 5, cepe_model.config.encoder_hidden_size), 1e19, dtype=np.float32)
    with pytest.raises(ValueError, match="log-probabilities are not finite"):
        cepe_model.perplexity(GOOD, encoder_hidden_states=E)
    with pytest.raises(ValueError, match="logits of row 0 are not finite at new token 0: the forward overflowed"):
        cepe_model.generate(GOOD, 3, encoder_hidden_states=E)
    with pytest.raises(ValueError, match="logits of row 0 are not finite"):
        list(cepe_model.generate_stream(GOOD, 3, encoder_hidden_states=E))


def test_overflowing_weights_raise(tiny, tmp_path):
    """An RMSNorm whose sum of squares overflows gives NaN (not a row of zeros),
    so the forward reports it instead of returning all-zero logits."""
    m = cepe.load(_scaled_copy(tiny[0], tmp_path / "m", "model.embed_tokens.weight", 1e20))
    with pytest.raises(ValueError, match="the forward overflowed float32: its logits are not finite .*the weights"):
        m.forward(GOOD)
    with pytest.raises(ValueError, match="logits of row 0 are not finite"):
        m.generate(GOOD, 2)


def test_overflowing_encoder_raises(tmp_path):
    from cepe.testing.reference import make_reference

    ref = make_reference(seed=4)
    path = _scaled_copy(ref.save(str(tmp_path / "src")), tmp_path / "m", "encoder.embed_tokens.weight", 1e20)
    m = cepe.load(path)
    with pytest.raises(ValueError, match="the encoder overflowed float32: its states of encoder_input_ids"):
        m.encode(np.array([[3, 4, 5, 6]]))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda m: m.generate_text("bad \udcff bytes"), ValueError, "prompt is not valid UTF-8 text: .*'\\\\udcff'"),
        (lambda m: m.generate_text(b"bytes"), TypeError, r"prompt must be a str, got bytes \(decode it first\)"),
        (lambda m: m.generate_text("the bird", chat=False, stop="\ud800"), None, None),
        (lambda m: m.perplexity_text("two \ud800 words"), ValueError, "text is not valid UTF-8 text"),
        (lambda m: m.tokenizer.encode("\udcff"), ValueError, "text is not valid UTF-8 text"),
        (lambda m: m.tokenizer.encode(b"x"), TypeError, "text must be a str, got bytes"),
    ],
)
def test_text_must_be_utf8(text_model, call, exc, match):
    if exc is None:  # a lone surrogate in a stop string only never matches
        assert isinstance(call(text_model), str)
        return
    with pytest.raises(exc, match=match):
        call(text_model)


def test_context_text_must_be_utf8(cepe_model):
    from cepe.text import text_context

    with pytest.raises(ValueError, match="context is not valid UTF-8"):
        text_context(_with_tokenizer(cepe_model), "a \udcff", None)
    with pytest.raises(ValueError, match=r"contexts\[1\] is not valid UTF-8"):
        text_context(_with_tokenizer(cepe_model), None, ["fine", "a \udcff"])


def _with_tokenizer(model):
    import tempfile
    from pathlib import Path

    from conftest import write_tokenizer

    if model.tokenizer is None:
        d = Path(tempfile.mkdtemp())
        write_tokenizer(d, 101)
        model.tokenizer = cepe.Tokenizer.from_dir(str(d))
    return model


TEMPLATES = [
    ("{% for i in range(100000) %}{{ i }}{% endfor %}", "range\\(\\) of 100000 items, more than the limit of 10000"),
    (
        "{% for i in range(3000) %}{% for j in range(3000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
        "its output exceeds the limit of 4194328 characters",
    ),
    ("{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}", "more than 1000000 steps"),
    (
        "{% set ns = namespace(s='ab') %}{% for i in range(26) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "builds a string \\(~\\) of length 8388608",
    ),
    (
        "{% set ns = namespace(s='ab') %}{% for i in range(26) %}{% set x %}{{ ns.s }}{{ ns.s }}{% endset %}"
        "{% set ns.s = x %}{% endfor %}{{ ns.s }}",
        "builds a text block of 8388608 characters",
    ),
    ("{{ 'ab' * 50000000 }}", "builds a repeated value of 100000000 characters"),
    ("{{ (['abcdefgh' * 500000] * 100)|join }}", "builds a repeated value of 400000200 characters"),
    ("{{ ['x', 'y', 'z']|join('ab' * 2000000) }}", "builds a joined string"),
    ("{% set ns = namespace(x=[1]) %}{% for i in range(40) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}", "of size"),
    ("{{ ((10 ** 1000) ** 1000) ** 1000 }}", "computes an integer of about"),
    ("{{ ('a\n' * 1000)|indent(1000000) }}", "builds an indented string"),
    ("{{ ('\t' * 1000).expandtabs(1000000) }}", "builds a string with tabs expanded"),
    ("{{ ('{0}' * 10000).format('x' * 100000) }}", "builds a formatted string"),
    ("{{ lipsum(1000000) }}", "builds lorem ipsum"),
    ("{% for i in range(10000) %}{% set x = 'a' * 4000000 %}{% endfor %}", "builds values of more than"),
    ("{% set ns = namespace(x=1) %}{% set l = [ns] %}", r"puts a namespace\(\) in a list"),
    ("{{ 'a'|center(50000000) }}", "passes 50000000 to a call"),
    ("{{ '{:>50000000}'.format(1) }}", "formats with a width of 10\\*\\*7 or more"),
    ("{% for m in messages %}", r"\(line 1\): TemplateSyntaxError"),
    ("{{ raise_exception('no system role here') }}", "TemplateError: no system role here"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recurses too deeply"),
]


@pytest.mark.parametrize("template, match", TEMPLATES)
def test_chat_template_limits(text_model, tmp_path, template, match):
    """A chat template is untrusted (it comes with the model file): it renders
    in jinja2's sandbox within limits, and every failure names its file."""
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(text_model.path, d)
    conf = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": template}))
    m = cepe.load(str(d))
    where = f"chat template of {d / 'tokenizer_config.json'}"
    with pytest.raises(ValueError, match=re.escape(where) + ".*" + match):
        m.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=re.escape(where)):
        m.generate_text("hi", chat=True, max_new_tokens=2)


def test_chat_template_output_limit_grows_with_the_messages(text_model):
    tok = text_model.tokenizer
    saved = tok.chat_template
    try:
        tok.chat_template = "{% for m in messages %}{{ m.content }}{{ m.content }}{% endfor %}"
        big = "x" * (3 << 20)  # 6 MiB out: over the fixed limit, within 4x the input
        assert len(tok.apply_chat_template([{"role": "user", "content": big}])) == 6 << 20
    finally:
        tok.chat_template = saved
