"""The sampler chain of the C core (cepe.sampling): each step against a NumPy
reference written here from its definition, the order of the steps, draws
against the distribution, seeds, stop strings and log-probabilities on the
token-id API, bad values, and the default model's text not looping."""

from __future__ import annotations

import inspect
import math
import os
from collections import Counter

import numpy as np
import pytest

import cepe
from cepe.sampling import TEXT_DEFAULTS, GenerateOptions, Sampler
from cepe.text import Detokenizer

V = 64


def logits_of(seed: int, scale: float = 1.5, n: int = V) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def f32(x: float) -> float:
    """A setting as the core holds it (float32)."""
    return float(np.float32(x))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z[np.isfinite(z)].max())
    e[~np.isfinite(z)] = 0.0
    return e / e.sum()


# ------------------------------------------------------- NumPy references


def ref_penalties(
    z: np.ndarray, history: list[int], repeat_penalty: float, last_n: int, frequency: float, presence: float
) -> np.ndarray:
    """llama.cpp's penalties: over the last last_n tokens (-1: all), each token
    seen c > 0 times has a positive logit divided by repeat_penalty, a negative
    one multiplied, then loses c * frequency + presence."""
    z = z.copy()
    window = history if last_n == -1 else history[len(history) - last_n :] if last_n > 0 else []
    for tok, c in Counter(window).items():
        z[tok] = z[tok] / repeat_penalty if z[tok] > 0 else z[tok] * repeat_penalty
        z[tok] -= c * frequency + presence
    return z


def ref_top_k(z: np.ndarray, k: int) -> np.ndarray:
    keep = np.zeros(len(z), bool)
    keep[np.argsort(-z, kind="stable")[:k]] = True
    return np.where(keep, z, -np.inf)


def ref_typical(z: np.ndarray, mass: float) -> np.ndarray:
    """transformers' TypicalLogitsWarper (Meister et al.): tokens by the distance
    of their information -log p from the entropy H, ascending; keep through the
    first index where the cumulative probability reaches mass."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(softmax(z))
        p = np.exp(logp)
        ent = -np.nansum(logp * p)
        shifted = np.abs(-logp - ent)
    order = np.argsort(shifted, kind="stable")
    cum = np.cumsum(softmax(z[order]))
    last = min(int((cum < mass).sum()), len(z) - 1)
    remove = shifted > shifted[order[last]]
    return np.where(remove, -np.inf, z)


def ref_top_p(z: np.ndarray, top_p: float) -> np.ndarray:
    """The shortest run of the most likely tokens whose probability reaches top_p."""
    p = softmax(z)
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    n = int(np.argmax(cum >= top_p)) + 1
    keep = np.zeros(len(z), bool)
    keep[order[:n]] = True
    return np.where(keep, z, -np.inf)


def ref_min_p(z: np.ndarray, min_p: float) -> np.ndarray:
    p = softmax(z)
    return np.where(p >= min_p * p.max(), z, -np.inf)


def ref_distribution(
    logits: np.ndarray,
    history: list[int] = (),  # type: ignore[assignment]
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    typical_p: float = 1.0,
    repeat_penalty: float = 1.0,
    repeat_last_n: int = 64,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
) -> np.ndarray:
    """The chain in llama.cpp's order: bias, penalties, top-k, typical, top-p,
    min-p, temperature (greedy at 0)."""
    z = logits.astype(np.float64)
    for tok, b in (logit_bias or {}).items():
        z[tok] += f32(b)
    z = ref_penalties(
        z, list(history), f32(repeat_penalty), repeat_last_n, f32(frequency_penalty), f32(presence_penalty)
    )
    if top_k:
        z = ref_top_k(z, top_k)
    if typical_p < 1:
        z = ref_typical(z, f32(typical_p))
    if top_p < 1:
        z = ref_top_p(z, f32(top_p))
    if min_p > 0:
        z = ref_min_p(z, f32(min_p))
    if temperature == 0:
        out = np.zeros(len(z))
        out[int(np.argmax(z))] = 1.0
        return out
    return softmax(z / f32(temperature))


def core_distribution(logits: np.ndarray, history: list[int] = (), **settings: object) -> np.ndarray:  # type: ignore[assignment]
    """Sampler.distribution, at temperature 1 unless given (as ref_distribution)."""
    s = Sampler(len(logits), **{"temperature": 1.0, **settings})  # type: ignore[arg-type]
    if len(history):
        s.accept(np.array(history))
    return s.distribution(logits).astype(np.float64)


# ------------------------------------------------------------ each step


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(temperature=0.7),
        dict(temperature=1.9),
        dict(top_k=1),
        dict(top_k=7),
        dict(top_k=V + 5),
        dict(top_p=0.5),
        dict(top_p=0.93),
        dict(min_p=0.05),
        dict(min_p=0.3),
        dict(min_p=1.0),
        dict(typical_p=0.3),
        dict(typical_p=0.9),
    ],
    ids=repr,
)
def test_each_filter_matches_its_definition(seed, settings):
    logits = logits_of(seed)
    want = ref_distribution(logits, **settings)
    got = core_distribution(logits, **settings)
    assert ((got > 0) == (want > 0)).all(), "the kept set differs"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "pen",
    [
        dict(repeat_penalty=1.3),
        dict(repeat_penalty=0.8),  # < 1 favours repeats
        dict(frequency_penalty=0.7),
        dict(frequency_penalty=-0.4),
        dict(presence_penalty=1.5),
        dict(repeat_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.3),
        dict(repeat_penalty=2.0, repeat_last_n=5),  # a window shorter than the history
        dict(presence_penalty=2.0, repeat_last_n=-1),  # the whole history
        dict(repeat_penalty=2.0, repeat_last_n=0),  # off
    ],
    ids=repr,
)
def test_penalties_match_their_definition(seed, pen):
    rng = np.random.default_rng(seed)
    logits = logits_of(seed + 10)
    history = rng.integers(0, 12, size=20).tolist()  # repeats, of positive and negative logits
    want = ref_distribution(logits, history, **pen)
    got = core_distribution(logits, history, **pen)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_logit_bias_adds_and_bans():
    logits = logits_of(1)
    bias = {3: 2.5, 7: -1.25, int(np.argmax(logits)): -math.inf}
    want = ref_distribution(logits, logit_bias=bias)
    got = core_distribution(logits, logit_bias={str(k) if k == 3 else k: v for k, v in bias.items()})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert got[int(np.argmax(logits))] == 0.0
    with pytest.raises(ValueError, match="leave no token"):
        Sampler(4, logit_bias={i: -math.inf for i in range(4)}).sample(np.zeros(4, np.float32))


@pytest.mark.parametrize("seed", range(4))
def test_the_whole_chain_in_order(seed):
    """Every step at once: the order matters (e.g. top-p over what top-k left,
    min-p and top-p at temperature 1, the temperature last)."""
    rng = np.random.default_rng(seed)
    logits = logits_of(seed + 20, scale=2.0)
    history = rng.integers(0, V, size=30).tolist()
    settings = dict(
        temperature=1.7,
        top_k=30,
        top_p=0.9,
        min_p=0.02,
        typical_p=0.95,
        repeat_penalty=1.2,
        repeat_last_n=16,
        frequency_penalty=0.1,
        presence_penalty=0.2,
        logit_bias={5: 1.0, 9: -0.5},
    )
    want = ref_distribution(logits, history, **settings)
    got = core_distribution(logits, history, **settings)
    assert ((got > 0) == (want > 0)).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # the temperature applied first would change which tokens top-p keeps
    hot_first = ref_distribution(logits / f32(1.7), history, **{**settings, "temperature": 1.0})
    assert ((hot_first > 0) != (want > 0)).any()


def test_greedy_is_the_best_token_left():
    logits = logits_of(3)
    best = int(np.argmax(logits))
    assert np.argmax(core_distribution(logits, temperature=0.0)) == best
    got = core_distribution(logits, [best], temperature=0.0, repeat_penalty=100.0)
    want = ref_distribution(logits, [best], temperature=0.0, repeat_penalty=100.0)
    np.testing.assert_array_equal(got, want)
    assert np.argmax(got) != best
    ties = np.zeros(8, np.float32)
    assert Sampler(8).sample(ties) == 0  # ties go to the lower id


def test_window_slides_with_sampled_tokens():
    """Sampled tokens join the window and the oldest leave: with equal logits,
    a presence penalty and a window of 3, greedy cycles through 4 tokens."""
    s = Sampler(6, presence_penalty=1.0, repeat_last_n=3)
    assert [s.sample(np.zeros(6, np.float32)) for _ in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_draws_follow_the_distribution():
    logits = logits_of(4, scale=1.0, n=8)
    settings = dict(temperature=1.3, top_k=6, top_p=0.97)
    p = core_distribution(logits, **settings)
    s = Sampler(8, seed=11, **settings)
    n = 20000
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=8)
    assert (counts[p == 0] == 0).all()
    sigma = np.sqrt(n * p * (1 - p))
    assert (np.abs(counts - n * p) <= 5 * sigma + 1).all(), (counts, n * p)


def test_seeds_reproduce():
    logits = logits_of(5, scale=0.5)

    def draws(seed):
        s = Sampler(V, temperature=1.0, seed=seed)
        return [s.sample(logits) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_sample_logprobs_are_the_raw_log_softmax():
    logits = logits_of(6)
    lse = np.log(np.exp(logits.astype(np.float64) - logits.max()).sum()) + logits.max()
    s = Sampler(V, temperature=0.0, logit_bias={int(np.argmax(logits)): -5.0}, repeat_penalty=3.0)
    t = s.sample_logprobs(logits, top_logprobs=4)
    assert t.id != int(np.argmax(logits))  # the bias moved the pick ...
    assert t.logprob == pytest.approx(float(logits[t.id]) - lse, abs=1e-5)  # ... not the reported logprob
    order = np.argsort(-logits, kind="stable")[:4]
    assert [i for i, _ in t.top_logprobs] == order.tolist()
    np.testing.assert_allclose([lp for _, lp in t.top_logprobs], logits[order] - lse, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(temperature=-1.0), ValueError, "temperature must be a finite number >= 0"),
        (dict(temperature=math.inf), ValueError, "temperature must be"),
        (dict(temperature="hot"), TypeError, "temperature must be a number"),
        (dict(top_k=-1), ValueError, "top_k must be an int in"),
        (dict(top_k=1.5), TypeError, "top_k must be an int"),
        (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_p=math.nan), ValueError, "top_p must be in"),
        (dict(min_p=1.5), ValueError, r"min_p must be in \[0, 1\]"),
        (dict(min_p=-0.1), ValueError, r"min_p must be in \[0, 1\]"),
        (dict(typical_p=0.0), ValueError, r"typical_p must be in \(0, 1\]"),
        (dict(repeat_penalty=0.0), ValueError, "repeat_penalty must be a finite number > 0"),
        (dict(repeat_penalty=math.inf), ValueError, "repeat_penalty must be"),
        (dict(repeat_last_n=-2), ValueError, r"repeat_last_n must be an int in \[-1,"),
        (dict(frequency_penalty=math.nan), ValueError, "frequency_penalty must be a finite number"),
        (dict(presence_penalty=math.inf), ValueError, "presence_penalty must be a finite number"),
        (dict(logit_bias=[1, 2]), TypeError, "logit_bias must be a dict"),
        (dict(logit_bias={V: 1.0}), ValueError, "logit_bias token 64 is outside the vocabulary"),
        (dict(logit_bias={"x": 1.0}), TypeError, "logit_bias keys must be token ids"),
        (dict(logit_bias={1: math.inf}), ValueError, r"logit_bias\[1\] must be a finite number or -inf"),
        (dict(logit_bias={1: math.nan}), ValueError, r"logit_bias\[1\] must be"),
        (dict(seed=-1), ValueError, "seed must be a non-negative int"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Sampler(V, **kwargs)


def test_the_core_checks_too():
    """The binding's own checks (the core's messages), for callers of cepe_c directly."""
    import cepe_c

    for kw, match in [
        (dict(top_p=2.0), "top_p must be in"),
        (dict(min_p=-1.0), "min_p must be in"),
        (dict(typical_p=0.0), "typical_p must be in"),
        (dict(repeat_penalty=-1.0), "repeat_penalty must be"),
        (dict(repeat_last_n=-5), "repeat_last_n must be >= -1"),
        (dict(bias_ids=np.array([V], np.int32), bias=np.array([1.0], np.float32)), "logit_bias token 64"),
    ]:
        with pytest.raises(ValueError, match=match):
            cepe_c.Sampler(1, V, **kw)


# ---------------------------------------------------- generate on token ids


PROMPT = np.array([1, 5, 9, 13, 17])
SAMPLED = dict(temperature=1.0, top_k=20, top_p=0.95, min_p=0.02, repeat_penalty=1.1, seed=5)


def test_generate_is_seeded_and_matches_the_stream(text_model):
    a = text_model.generate(PROMPT, 12, eos_token_id=[], **SAMPLED)
    assert a.tolist() == text_model.generate(PROMPT, 12, eos_token_id=[], **SAMPLED).tolist()
    assert list(text_model.generate_stream(PROMPT, 12, eos_token_id=[], **SAMPLED)) == a.tolist()
    other = text_model.generate(PROMPT, 12, eos_token_id=[], **{**SAMPLED, "seed": 6})
    assert other.tolist() != a.tolist()
    greedy = text_model.generate(PROMPT, 12, eos_token_id=[])
    assert text_model.generate(PROMPT, 12, eos_token_id=[], temperature=0.0, seed=1).tolist() == greedy.tolist()
    assert text_model.generate(PROMPT, max_tokens=5, eos_token_id=[]).tolist() == greedy[:5].tolist()
    with pytest.raises(ValueError, match="not both"):
        text_model.generate(PROMPT, 4, max_tokens=4)


def test_penalties_see_the_prompt(text_model):
    """The prompt joins the window: banning by presence every prompt token
    keeps all of them out of a greedy answer."""
    out = text_model.generate(PROMPT, 8, eos_token_id=[], presence_penalty=1e4, repeat_last_n=-1)
    assert not set(out.tolist()) & set(PROMPT.tolist())
    assert len(set(out.tolist())) == len(out)  # and each new token joins it


def test_generate_logprobs_against_log_softmax(text_model):
    """Reported log-probabilities are the raw log-softmax (before bias and penalties)."""
    settings = dict(eos_token_id=[], repeat_penalty=1.5, logit_bias={7: 3.0}, seed=2, temperature=0.9)
    g = text_model.generate(PROMPT, 10, logprobs=True, top_logprobs=5, **settings)
    assert isinstance(g, cepe.Generation) and g.ids.shape == (10,) and g.finish_reason == "length"
    full = np.concatenate([PROMPT, g.ids])
    logits = text_model.forward(full, logits="all").astype(np.float64)[len(PROMPT) - 1 : -1]
    logp = logits - (np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1))[:, None]
    np.testing.assert_allclose(g.logprobs, logp[np.arange(10), g.ids], atol=2e-4)
    for t in range(10):
        order = np.argsort(-logp[t], kind="stable")[:5]
        assert g.top_ids[t].tolist() == order.tolist()
        np.testing.assert_allclose(g.top_logprobs[t], logp[t, order], atol=2e-4)
    streamed = list(text_model.generate_stream(PROMPT, 10, logprobs=True, top_logprobs=5, **settings))
    assert [t.id for t in streamed] == g.ids.tolist() and streamed[-1].finish_reason == "length"
    np.testing.assert_allclose([t.logprob for t in streamed], g.logprobs, atol=1e-6)
    assert [i for i, _ in streamed[0].top_logprobs] == g.top_ids[0].tolist()


def test_batch_rows_finish_on_their_own(text_model):
    ids = np.stack([PROMPT, PROMPT[::-1]])
    first = text_model.generate(ids, 6, eos_token_id=[])
    eos = int(first[0, 2])  # row 0 emits it at step 2
    g = text_model.generate(ids, 6, eos_token_id=eos, details=True, logprobs=True)
    assert g.finish_reason[0] == "eos" and g.lengths[0] == 3
    assert g.ids[0, :3].tolist() == first[0, :3].tolist()
    assert np.isnan(g.logprobs[0, 3:]).all() if g.ids.shape[1] > 3 else True


def test_closing_a_stream_stops_its_worker(text_model):
    import threading
    import time

    it = text_model.generate_stream(PROMPT, 1000, eos_token_id=[])
    assert isinstance(next(it), int)
    it.close()
    deadline = time.monotonic() + 5
    while any(t.name == "cepe-stream" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "cepe-stream" for t in threading.enumerate())
    assert (
        list(text_model.generate_stream(PROMPT, 3, eos_token_id=[]))
        == text_model.generate(PROMPT, 3, eos_token_id=[]).tolist()
    )


def test_stop_strings_on_token_ids(text_model):
    tok = text_model.tokenizer
    free = text_model.generate(PROMPT, 16, eos_token_id=[])
    text = tok.decode(free)
    # a stop string that ends inside the 6th token's text
    upto = len(tok.decode(free[:6]))
    stop = text[upto - 3 : upto]
    assert stop and stop not in tok.decode(free[:5])
    g = text_model.generate(PROMPT, 16, eos_token_id=[], stop=[stop, "never there"], details=True)
    assert g.finish_reason == "stop" and g.lengths == 6
    assert g.ids.tolist() == free[:6].tolist()
    assert list(text_model.generate_stream(PROMPT, 16, eos_token_id=[], stop=stop)) == free[:6].tolist()
    with pytest.raises(TypeError, match="stop must be a string or a list of strings"):
        text_model.generate(PROMPT, 4, stop=[3])


def test_token_bytes_spell_the_decoded_text(text_model):
    tok = text_model.tokenizer
    data, off = tok.token_bytes(text_model.config.vocab_size)
    assert off.shape == (text_model.config.vocab_size + 1,) and off[-1] == len(data)
    ids = np.random.default_rng(0).integers(3, tok.vocab_size, 200)
    joined = b"".join(data[off[i] : off[i + 1]].tobytes() for i in ids).decode()
    assert joined.lstrip(" ") == tok.decode(ids)  # the decoder drops one leading space
    assert off[2] == off[3]  # </s>, special: no text


def test_detokenizer_matches_decode(text_model):
    tok = text_model.tokenizer
    ids = np.random.default_rng(1).integers(0, tok.vocab_size, 300).tolist()
    d = Detokenizer(tok)
    text = "".join(d.add(i) for i in ids) + d.flush()
    assert text == tok.decode(ids)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(min_p=2.0), ValueError, r"min_p must be in \[0, 1\]"),
        (dict(typical_p=-1.0), ValueError, "typical_p must be in"),
        (dict(repeat_penalty=0), ValueError, "repeat_penalty must be"),
        (dict(frequency_penalty=math.inf), ValueError, "frequency_penalty must be"),
        (dict(logit_bias={10**6: 1.0}), ValueError, "logit_bias token 1000000 is outside"),
        (dict(top_logprobs=3), ValueError, "top_logprobs needs logprobs=True"),
        (dict(logprobs=True, top_logprobs=-1), ValueError, "top_logprobs must be an int in"),
        (dict(logprobs="yes"), TypeError, "logprobs must be a bool"),
        (dict(max_tokens=-1), ValueError, "max_tokens must be an int in"),
    ],
)
def test_generate_bad_settings(text_model, kwargs, exc, match):
    for call in (
        lambda: text_model.generate(PROMPT, **kwargs),
        lambda: list(text_model.generate_stream(PROMPT, **kwargs)),
    ):
        with pytest.raises(exc, match=match):
            call()


def test_generate_stream_takes_generate_s_keywords(text_model):
    """generate_stream's typed keywords are generate's, and a misspelt one is refused by name."""
    params = inspect.signature(cepe.Model.generate).parameters
    keyword_only = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(GenerateOptions.__annotations__) == keyword_only
    with pytest.raises(TypeError, match=r"generate_stream\(\) got an unexpected keyword argument 'temprature'"):
        list(text_model.generate_stream(PROMPT, temprature=0.5))


def test_text_defaults_are_llama_cpp_s(text_model):
    """generate_text's defaults are TEXT_DEFAULTS, seeded: the same call gives the same text."""
    params = inspect.signature(cepe.Model.generate_text).parameters
    assert {k: params[k].default for k in TEXT_DEFAULTS} == TEXT_DEFAULTS
    assert TEXT_DEFAULTS["temperature"] == 0.8 and TEXT_DEFAULTS["repeat_penalty"] == 1.1
    a = text_model.generate_text("the early bird", max_new_tokens=10)
    assert a == text_model.generate_text("the early bird", max_new_tokens=10)
    greedy = text_model.generate_text("the early bird", max_new_tokens=10, temperature=0.0, repeat_penalty=1.0)
    ids = text_model.tokenizer.encode("the early bird")
    assert greedy == text_model.tokenizer.decode(text_model.generate(np.array(ids), 10))


# ---------------------------------------------- the default model, real text

PROMPTS = ("Write a haiku about the sea", "List three uses of Python.", "Explain what a black hole is.")


def repeated_ngram(ids: list[int], n: int = 8, times: int = 3) -> tuple[int, ...] | None:
    """A run of n tokens that occurs at least `times` times, or None: a loop."""
    counts = Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    gram, c = counts.most_common(1)[0] if counts else ((), 0)
    return gram if c >= times else None


def _pulled() -> str | None:
    from cepe.pull import cache_dir

    try:
        path = os.path.join(cache_dir(), "smollm2-135m")
    except Exception:  # noqa: BLE001 - no cache: nothing pulled
        return None
    return path if os.path.isdir(path) and os.listdir(path) else None


@pytest.mark.slow
@pytest.mark.skipif(_pulled() is None, reason="the default model is not pulled (cepe pull)")
def test_default_model_does_not_loop_with_the_defaults():
    model = cepe.load("smollm2-135m")
    for prompt in PROMPTS:
        usage: dict = {}
        from cepe.text import stream_text

        text = "".join(stream_text(model, prompt, max_new_tokens=128, usage=usage, **TEXT_DEFAULTS))
        ids = model.tokenizer.encode(text, add_special_tokens=False)
        assert repeated_ngram(ids) is None, (prompt, text)
        data, off = model.tokenizer.token_bytes(model.config.vocab_size)  # byte-level BPE: exact
        assert b"".join(data[off[i] : off[i + 1]].tobytes() for i in ids) == text.encode()
