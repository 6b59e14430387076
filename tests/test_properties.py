"""Property tests of the public API (hypothesis): random shapes, dtypes and values into forward,
perplexity, generate, generate_text, encode, create_cache and the tokenizer, on a tiny decoder and
a tiny CEPE model. Every call either returns finite results of the documented shape and dtype, or
raises one of the documented exceptions (ValueError and its cepe.CheckpointError / cepe.ConfigError,
TypeError, NotImplementedError) with a message; never another exception type, never NaN or inf.

The examples are derandomized (the same ones on every run, so CI is reproducible); raise
CEPE_PROPERTY_EXAMPLES to search further."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tokenizer

import cepe
from cepe.testing.reference import make_reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

DOCUMENTED = (ValueError, TypeError, NotImplementedError)
EXAMPLES = int(os.environ.get("CEPE_PROPERTY_EXAMPLES", "200"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """{"decoder": the conftest tiny LLaMA, "cepe": a tiny CEPE model with a tokenizer}."""
    d = make_reference(seed=7).save(str(tmp_path_factory.mktemp("prop_cepe")))
    write_tokenizer(Path(d), 101)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {"decoder": cepe.load(tiny[0], n_threads=1), "cepe": cepe.load(d, n_threads=1)}
    assert out["cepe"].tokenizer is not None
    return out


def documented(call):
    """call(), or None when it raised a documented exception (with a message). The outcome is
    recorded (pytest --hypothesis-show-statistics lists how many calls returned or raised what)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LongInputWarning and NumPy's casting warnings are not at issue
            out = call()
    except DOCUMENTED as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        event(f"raised {type(exc).__name__}")
        return None
    except MemoryError as exc:  # documented for a KV cache too large to allocate: it says which
        assert "tokens" in str(exc), str(exc)
        event("raised MemoryError")
        return None
    event("returned")
    return out


# ------------------------------------------------------------------ strategies

INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", ">i4", "<i2"]
FLOAT_DTYPES = ["float16", "float32", "float64", ">f8"]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
ODD = st.sampled_from([None, "text", b"bytes", 3, 2.5, True, [], [[1, 2], [3]], [1.5, 2], {"a": 1}, object()])


def int_arrays(hi: int, shapes=SHAPES) -> st.SearchStrategy:
    """Integer arrays, mostly ids in [0, hi) with some out of range (negative, >= hi, huge)."""

    def build(dtype):
        info = np.iinfo(np.dtype(dtype))
        common = st.integers(max(info.min, -3), min(info.max, hi + 3))
        extreme = st.sampled_from([info.min, info.max])
        elements = st.one_of(common, common, common, extreme)
        return hnp.arrays(np.dtype(dtype), shapes, elements=elements)

    return st.sampled_from(INT_DTYPES).flatmap(build)


def float_arrays(shapes=SHAPES, lo: float = -4.0, hi: float = 4.0) -> st.SearchStrategy:
    """Float arrays of moderate values, with some NaN, inf and huge ones."""

    def build(dtype):
        width = np.dtype(dtype).itemsize * 8
        common = st.floats(lo, hi, width=width)
        odd = st.sampled_from([np.nan, np.inf, -np.inf, 1e4, -1e4] + ([1e30, 3e38] if width >= 32 else []))
        return hnp.arrays(np.dtype(dtype), shapes, elements=st.one_of(common, common, common, odd))

    return st.sampled_from(FLOAT_DTYPES).flatmap(build)


def ids_like(hi: int, shapes=SHAPES) -> st.SearchStrategy:
    """What a caller might pass as token ids: arrays of any dtype and shape, lists, odd objects."""
    return st.one_of(
        int_arrays(hi, shapes),
        int_arrays(hi, shapes),
        int_arrays(hi, shapes),
        float_arrays(shapes),
        hnp.arrays(np.bool_, shapes),
        st.lists(st.integers(-(2**70), 2**70) | st.integers(0, hi - 1), max_size=6),
        ODD,
    )


def masks(shapes=SHAPES) -> st.SearchStrategy:
    return st.one_of(
        st.none(),
        hnp.arrays(np.bool_, shapes),
        hnp.arrays(np.int64, shapes, elements=st.sampled_from([0, 1, 1, 1, 2, -1])),
        float_arrays(shapes, 0.0, 1.0),
        ODD,
    )


EXTREMES = [
    -1,
    0,
    2**31 - 1,
    2**31,
    2**63,
    2**64,
    10**400,
    -(10**400),
    np.int64(3),
    np.uint64(2**63),
    np.float32(0.5),
    -0.0,
    5e-324,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    "1",
    None,
]


def numbers() -> st.SearchStrategy:
    """A scalar argument: half the time an extreme (past int32, int64 or float, NaN, inf, a bool, a
    NumPy scalar, a str), else any int, float or odd object."""
    anything = st.one_of(
        st.integers(-3, 8), st.integers(-(2**70), 2**70), st.floats(), st.floats(0.0, 2.0), st.booleans(), ODD
    )
    return st.integers(0, 1).flatmap(lambda k: st.sampled_from(EXTREMES) if k == 0 else anything)


def mostly(valid: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """valid three times in four, odd otherwise."""
    return st.integers(0, 3).flatmap(lambda k: odd if k == 0 else valid)


def counts() -> st.SearchStrategy:
    """A bad count argument (max_new_tokens, batch_size, capacity): negative, zero, past int32, not an
    int, or valid but too large to allocate; never a valid count that would merely take long."""
    return st.one_of(
        st.sampled_from([-1, 0, 2**31 - 1, 2**31, 2**63, 10**400, 2**31 - 16, np.int64(-2), np.uint64(2**63)]),
        st.integers(max_value=-1),
        st.integers(min_value=2**31),
        st.floats(),
        st.booleans(),
        ODD,
    )


@st.composite
def well_formed_ids(draw, hi: int, min_t: int = 1) -> np.ndarray:
    """Valid ids (B, T) or (T,), B in [1, 3], T in [min_t, 5], of an integer dtype that holds them,
    sometimes a strided view."""
    t = draw(st.integers(min_t, 5))
    shape = draw(st.sampled_from([(t,), (draw(st.integers(1, 3)), t)]))
    dtype = np.dtype(draw(st.sampled_from(["int32", "int64", "int64", "uint8", "int16", ">i8"])))
    ids = draw(hnp.arrays(dtype, shape, elements=st.integers(0, hi - 1)))
    if draw(st.integers(0, 4)) == 0:
        ids = np.repeat(ids, 2, axis=-1)[..., ::2]  # the same ids, not contiguous
    return ids


def valid_masks(shape: tuple[int, ...]) -> st.SearchStrategy:
    """None, or a 0/1 mask of `shape` (bool, int or float) whose rows end in a real token (left padding)."""

    def build(dtype):
        def left_padded(a):
            a = np.sort(a, axis=-1)  # zeros first
            a[..., -1] = 1
            return a.astype(dtype)

        return hnp.arrays(np.int64, shape, elements=st.integers(0, 1)).map(left_padded)

    if len(shape) not in (1, 2) or 0 in shape:  # ids no call accepts: no mask either
        return st.none()
    return st.one_of(st.none(), st.sampled_from([np.bool_, np.int64, np.float32, np.uint8]).flatmap(build))


def valid_positions(shape: tuple[int, ...]) -> st.SearchStrategy:
    return st.one_of(
        st.none(),
        hnp.arrays(np.float64, shape, elements=st.floats(0.0, 40.0)),
        hnp.arrays(np.int64, shape, elements=st.integers(0, 40)),
    )


def valid_contexts(model, B: int, squeeze: bool) -> st.SearchStrategy:
    """No context, or a valid one for a CEPE model: chunk ids (with a mask) or hidden states."""
    if not model.config.is_cepe:
        return st.just({})
    enc = model.config.encoder
    d_enc = model.config.encoder_hidden_size
    lead = st.just(()) if squeeze else st.just((B,))
    chunks = st.tuples(lead, st.integers(1, 3), st.integers(1, 4)).map(lambda t: (*t[0], t[1], t[2]))
    states = st.tuples(lead, st.integers(1, 6)).map(lambda t: (*t[0], t[1], d_enc))

    def with_mask(shape):
        ids = hnp.arrays(np.int64, shape, elements=st.integers(0, enc.vocab_size - 1))
        return st.fixed_dictionaries({"encoder_input_ids": ids, "encoder_attention_mask": valid_masks(shape)})

    return st.one_of(
        st.just({}),
        chunks.flatmap(with_mask),
        states.flatmap(
            lambda shape: st.fixed_dictionaries(
                {"encoder_hidden_states": hnp.arrays(np.float32, shape, elements=st.floats(-3.0, 3.0, width=32))}
            )
        ),
    )


def odd_contexts(model, B: int) -> st.SearchStrategy:
    """CEPE context arguments of any shape and value (NaN, inf, huge), on any model."""
    enc = model.config.encoder
    d_enc = model.config.encoder_hidden_size or 4
    vocab = enc.vocab_size if enc is not None else 10
    chunk_shapes = st.one_of(st.tuples(st.just(B), st.integers(0, 2), st.integers(0, 4)), SHAPES)
    state_shapes = st.one_of(st.tuples(st.just(B), st.integers(0, 4), st.just(d_enc)), SHAPES)
    return st.one_of(
        st.fixed_dictionaries(
            {"encoder_input_ids": chunk_shapes.flatmap(lambda s: int_arrays(vocab, st.just(s)))},
            optional={"encoder_attention_mask": masks()},
        ),
        st.fixed_dictionaries(
            {"encoder_hidden_states": state_shapes.flatmap(lambda s: float_arrays(st.just(s)))},
            optional={"encoder_attention_mask": masks()},
        ),
        st.fixed_dictionaries({"encoder_attention_mask": masks()}),
        st.fixed_dictionaries({"encoder_input_ids": ids_like(vocab), "encoder_hidden_states": float_arrays()}),
    )


def perturb(data, valid: dict, odd: dict) -> dict:
    """Arguments drawn valid, then none, one or two of them (chosen at random) drawn from `odd` instead:
    most calls get past most checks, and each check meets bad values."""
    n_bad = data.draw(st.sampled_from([0, 0, 1, 1, 1, 2]), label="n_bad")
    bad = data.draw(st.sets(st.sampled_from(sorted(odd)), min_size=n_bad, max_size=n_bad), label="bad")
    return {name: data.draw(odd[name] if name in bad else strategy, label=name) for name, strategy in valid.items()}


def rows(ids) -> int:
    """The batch size ids would have (1 where they are not even an array)."""
    try:
        a = np.asarray(ids)
    except ValueError:
        return 1
    return a.shape[0] if a.ndim == 2 else 1


def check_logits(out, ids, logits: str, vocab: int) -> None:
    a = np.asarray(ids)
    lead = a.shape[:-1] if logits == "last" else a.shape
    assert isinstance(out, np.ndarray) and out.dtype == np.float32, type(out)
    assert out.shape == (*lead, vocab), (out.shape, a.shape, logits)
    assert np.isfinite(out).all(), "non-finite logits"


# ------------------------------------------------------------------ forward


@SETTINGS
@given(data=st.data(), name=st.sampled_from(["decoder", "cepe"]))
def test_forward(models, data, name):
    """forward() with any ids, mask, positions, logits= and CEPE context: logits of the documented shape
    (finite float32), or a documented error."""
    m = models[name]
    V = m.config.vocab_size
    ids = data.draw(mostly(well_formed_ids(V), ids_like(V + 20)), label="ids")
    shape = np.shape(ids) if isinstance(ids, np.ndarray) else (1,)
    kw = perturb(
        data,
        valid={
            "attention_mask": valid_masks(shape),
            "position_ids": valid_positions(shape),
            "logits": st.sampled_from(["all", "last"]),
            "context": valid_contexts(m, rows(ids), len(shape) == 1),
        },
        odd={
            "attention_mask": masks(),
            "position_ids": st.one_of(float_arrays(lo=-2.0, hi=50.0), int_arrays(60), ODD),
            "logits": st.sampled_from(["none", None, 1, "ALL"]),
            "context": odd_contexts(m, rows(ids)),
        },
    )
    ctx = kw.pop("context")
    out = documented(lambda: m.forward(ids, **kw, **ctx))
    if out is not None:
        check_logits(out, ids, kw["logits"], V)


@SETTINGS
@given(data=st.data(), name=st.sampled_from(["decoder", "cepe"]))
def test_forward_with_cache(models, data, name):
    """create_cache(any batch_size, capacity), then forward() into it until it is full: logits of the
    documented shape, and a refused call leaves the cache as it was."""
    m = models[name]
    batch_size = data.draw(mostly(st.integers(1, 3), counts()))
    capacity = data.draw(mostly(st.integers(1, 12), counts()))
    cache = documented(lambda: m.create_cache(batch_size, capacity))
    if cache is None:
        return
    want = m.config.max_position_embeddings if capacity is None else capacity
    assert cache.batch_size == batch_size and cache.capacity == want and len(cache) == 0
    for _ in range(data.draw(st.integers(1, 4))):
        ids = data.draw(well_formed_ids(m.config.vocab_size))
        if ids.ndim == 2 and data.draw(st.integers(0, 3)):  # mostly the cache's batch size
            ids = np.resize(ids, (cache.batch_size, ids.shape[1]))
        before = len(cache)
        logits = data.draw(st.sampled_from(["all", "last"]))
        out = documented(lambda ids=ids, logits=logits: m.forward(ids, cache=cache, logits=logits))
        if out is None:
            assert len(cache) == before, "a refused call changed the cache"
            continue
        check_logits(out, ids, logits, m.config.vocab_size)
        assert len(cache) == before + ids.shape[-1] <= cache.capacity


@SETTINGS
@given(data=st.data(), logits=st.sampled_from(["all", "last"]))
def test_forward_context_values(models, data, logits):
    """encoder_hidden_states of the right shape holding any values (NaN, inf, values whose squares
    overflow float32): finite logits, or a documented error; never NaN or inf logits."""
    m = models["cepe"]
    ids = data.draw(well_formed_ids(m.config.vocab_size))
    B = ids.shape[0] if ids.ndim == 2 else 1
    n = data.draw(st.integers(1, 5))
    width = data.draw(st.sampled_from([32, 64]))
    values = st.one_of(
        st.floats(-3.0, 3.0, width=width),
        st.floats(width=width),
        st.sampled_from([1e19, -1e19, 1e30, 3e38, -3e38, np.nan, np.inf] + ([1e300] if width == 64 else [])),
    )
    states = data.draw(hnp.arrays(np.dtype(f"float{width}"), (B, n, m.config.encoder_hidden_size), elements=values))
    out = documented(lambda: m.forward(ids, logits=logits, encoder_hidden_states=states))
    if out is not None:
        check_logits(out, ids, logits, m.config.vocab_size)


# ------------------------------------------------------------------ perplexity


@SETTINGS
@given(data=st.data(), name=st.sampled_from(["decoder", "cepe"]))
def test_perplexity(models, data, name):
    """perplexity(): a finite float >= 1, or a documented error."""
    m = models[name]
    V = m.config.vocab_size
    ids = data.draw(mostly(well_formed_ids(V, 2), st.one_of(well_formed_ids(V), ids_like(V + 20))))
    shape = np.shape(ids) if isinstance(ids, np.ndarray) else (1,)
    T = shape[-1] if shape else 1
    kw = perturb(
        data,
        valid={
            "attention_mask": st.none(),
            "eval_window": st.one_of(st.none(), st.integers(1, max(T - 1, 1))),
            "context": valid_contexts(m, rows(ids), len(shape) == 1),
        },
        odd={"attention_mask": masks(), "eval_window": numbers(), "context": odd_contexts(m, rows(ids))},
    )
    ctx = kw.pop("context")
    out = documented(lambda: m.perplexity(ids, kw["attention_mask"], eval_window=kw["eval_window"], **ctx))
    if out is not None:
        assert isinstance(out, float) and math.isfinite(out) and out >= 0.999, out


# ------------------------------------------------------------------ generate


@SETTINGS
@given(data=st.data(), name=st.sampled_from(["decoder", "cepe"]))
def test_generate(models, data, name):
    """generate(): int32 ids in the vocabulary, (B, n) or (n,) with n <= max_new_tokens, or a documented error."""
    m = models[name]
    V = m.config.vocab_size
    ids = data.draw(mostly(well_formed_ids(V), ids_like(V + 20)))
    shape = np.shape(ids) if isinstance(ids, np.ndarray) else (1,)
    kw = perturb(
        data,
        valid={
            "max_new_tokens": st.integers(0, 5),
            "attention_mask": valid_masks(shape),
            "temperature": st.one_of(st.just(0.0), st.floats(0.0, 3.0)),
            "top_k": st.integers(0, 5),
            "top_p": st.floats(1e-6, 1.0),
            "seed": st.one_of(st.none(), st.integers(0, 2**64 - 1)),
            "eos_token_id": st.one_of(st.none(), st.integers(0, V - 1), st.lists(st.integers(0, V - 1), max_size=3)),
            "context": valid_contexts(m, rows(ids), len(shape) == 1),
        },
        odd={
            "max_new_tokens": counts(),
            "attention_mask": masks(),
            "temperature": numbers(),
            "top_k": numbers(),
            "top_p": numbers(),
            "seed": numbers(),
            "eos_token_id": st.one_of(numbers(), st.lists(numbers(), max_size=3)),
            "context": odd_contexts(m, rows(ids)),
        },
    )
    ctx = kw.pop("context")
    n = kw.pop("max_new_tokens")
    out = documented(lambda: m.generate(ids, n, **kw, **ctx))
    if out is None:
        return
    a = np.asarray(ids)
    assert isinstance(out, np.ndarray) and out.dtype == np.int32, type(out)
    assert out.ndim == a.ndim and out.shape[:-1] == a.shape[:-1] and out.shape[-1] <= n, (out.shape, a.shape)
    assert ((out >= 0) & (out < V)).all(), out


@SETTINGS
@given(data=st.data())
def test_generate_text(models, data):
    """generate_text() (tokenizer, chunked CEPE context, sampling, stop strings): a str without the stop
    strings, or a documented error."""
    m = models["cepe"]
    words = st.lists(st.sampled_from(["the", "quick", "fox", "a", "stitch", "bird", "é", "\n"]), max_size=8)
    kw = perturb(
        data,
        valid={
            "prompt": st.one_of(words.map(" ".join), st.text(max_size=30)),
            "context": st.one_of(st.none(), words.map(" ".join), st.text(max_size=300)),
            "max_new_tokens": st.integers(0, 4),
            "temperature": st.one_of(st.just(0.0), st.floats(0.0, 3.0)),
            "top_k": st.integers(0, 5),
            "top_p": st.floats(1e-6, 1.0),
            "seed": st.one_of(st.none(), st.integers(0, 2**64 - 1)),
            "stop": st.one_of(st.none(), st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3))),
        },
        odd={
            "prompt": ODD,
            "context": ODD,
            "max_new_tokens": counts(),
            "temperature": numbers(),
            "top_k": numbers(),
            "top_p": numbers(),
            "seed": numbers(),
            "stop": st.one_of(ODD, st.just(""), st.lists(st.one_of(st.text(max_size=2), ODD), max_size=3)),
        },
    )
    prompt = kw.pop("prompt")
    out = documented(lambda: m.generate_text(prompt, **kw))
    if out is None:
        return
    assert isinstance(out, str)
    stop = kw["stop"]
    for s in [stop] if isinstance(stop, str) else stop or []:
        assert s not in out, (s, out)


# ------------------------------------------------------------------ encode


@SETTINGS
@given(data=st.data())
def test_encode(models, data):
    """encode(): (B, n_ctx * L, d_enc) or (n_ctx * L, d_enc) finite float32, or a documented error."""
    m = models["cepe"]
    enc = m.config.encoder
    shape = data.draw(
        st.one_of(st.tuples(st.integers(1, 3), st.integers(1, 5)), hnp.array_shapes(min_dims=3, max_dims=3, max_side=3))
    )
    valid_chunks = hnp.arrays(
        np.dtype(data.draw(st.sampled_from(["int32", "int64", "uint8"]))),
        shape,
        elements=st.integers(0, enc.vocab_size - 1),
    )
    kw = perturb(
        data,
        valid={"chunks": valid_chunks, "mask": valid_masks(shape)},
        odd={"chunks": ids_like(enc.vocab_size + 10), "mask": masks()},
    )
    out = documented(lambda: m.encode(kw["chunks"], kw["mask"]))
    if out is None:
        return
    a = np.asarray(kw["chunks"])
    want = (
        (a.shape[0] * a.shape[1], enc.hidden_size)
        if a.ndim == 2
        else (a.shape[0], a.shape[1] * a.shape[2], enc.hidden_size)
    )
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == want, (out.shape, a.shape)
    assert np.isfinite(out).all()


def test_encode_on_a_decoder_says_so(models):
    with pytest.raises(ValueError, match="no CEPE encoder"):
        models["decoder"].encode(np.array([[1, 2]]))


# ------------------------------------------------------------------ tokenizer


@SETTINGS
@given(text=st.one_of(st.text(), st.text(st.characters(codec="utf-8"), max_size=200), ODD), special=st.booleans())
def test_tokenizer_encode(models, text, special):
    """encode(): ids in the vocabulary that decode to a str; non-str input is a TypeError."""
    tok = models["cepe"].tokenizer
    ids = documented(lambda: tok.encode(text, add_special_tokens=special))
    if ids is None:
        return
    assert isinstance(ids, list) and all(type(i) is int and 0 <= i < tok.vocab_size for i in ids), ids
    assert isinstance(tok.decode(ids), str) and isinstance(tok.decode(ids, skip_special_tokens=False), str)


@SETTINGS
@given(
    ids=st.one_of(
        st.lists(st.integers(0, 100), max_size=8),
        st.lists(st.integers(-5, 120) | st.integers(-(2**70), 2**70), max_size=8),
        ids_like(120),
    )
)
def test_tokenizer_decode(models, ids):
    """decode(): a str for ids in the vocabulary, a documented error for anything else."""
    tok = models["cepe"].tokenizer
    out = documented(lambda: tok.decode(ids))
    if out is not None:
        assert isinstance(out, str)
