"""A forward without a cache and with a recomputed CEPE context runs on a single-pass context
(a KV cache of one layer): its logits equal, bit for bit, those of the same call on a full
cache, which tests/test_cepe.py checks against the PyTorch oracle; and such a context refuses
to be continued or saved."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pytest

import cepe
import cepe_c
from cepe.testing.reference import make_reference


@pytest.fixture(scope="module", params=["all_layers", "last_two_layers"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> cepe.Model:
    over: dict[str, Any] = {} if request.param == "all_layers" else {"n_cross": 2}
    ref = make_reference(seed=5, **over)
    return cepe.load(ref.save(str(tmp_path_factory.mktemp(request.param))))


def _inputs(B: int, T: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 101, size=(B, T))
    ctx = rng.integers(3, 101, size=(B, 3, 7))
    cmask = np.ones_like(ctx)
    cmask[0, 1, :3] = 0
    amask = np.ones_like(ids)
    amask[-1, :5] = 0  # a left-padded row
    return ids, dict(attention_mask=amask, encoder_input_ids=ctx, encoder_attention_mask=cmask)


def _record_contexts(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for each cepe_c.Context the model makes from now on, whether it is single-pass."""
    made: list[bool] = []
    real_context = cepe_c.Context

    def recording(*args: Any, single_pass: bool = False) -> cepe_c.Context:
        made.append(single_pass)
        return real_context(*args, single_pass=single_pass)

    monkeypatch.setattr(cepe.model.cepe_c, "Context", recording)
    return made


@pytest.mark.parametrize(("B", "T"), [(2, 600), (1, 9), (1, 1100)])  # 3 chunks of 256, 1 chunk, 3 of 512
@pytest.mark.parametrize("logits", ["all", "last"])
def test_single_pass_equals_full_cache(
    model: cepe.Model, monkeypatch: pytest.MonkeyPatch, B: int, T: int, logits: Literal["all", "last"]
) -> None:
    ids, kw = _inputs(B, T, seed=T)
    made = _record_contexts(monkeypatch)
    lean = model.forward(ids, logits=logits, keep_cross_kv=False, **kw)
    assert made == [True]  # the call ran on a one-layer cache
    full = model.forward(ids, logits=logits, keep_cross_kv=False, cache=model.create_cache(B, T), **kw)
    np.testing.assert_array_equal(lean, full)
    made.clear()
    model.forward(ids, logits=logits, keep_cross_kv=True, **kw)  # kept K/V: chunk by chunk, a full cache
    assert made == [False]
    made.clear()
    model.forward(ids, logits=logits)  # no context: the full cache as before
    assert made in ([], [False])  # [] : the model's kept context served


def test_single_pass_context_is_not_continued(model: cepe.Model) -> None:
    ids = np.arange(3, 12, dtype=np.int32)[None]
    ctx = cepe_c.Context(model._core, 1, 32, single_pass=True)
    first = ctx.forward(ids, None, None, 1)
    with pytest.raises(Exception, match="single-pass context keeps only its last layer"):
        ctx.forward(ids[:, :1], None, None, 1)
    with pytest.raises(Exception, match="single-pass context keeps one layer's K/V: it cannot be saved"):
        ctx.save_state()
    full = cepe_c.Context(model._core, 1, 32)
    full.forward(ids, None, None, 1)
    with pytest.raises(Exception, match="single-pass context keeps one layer's K/V: it cannot load"):
        ctx.load_state(*full.save_state())
    ctx.reset()  # an emptied context takes a new call
    np.testing.assert_array_equal(ctx.forward(ids, None, None, 1), first)
    np.testing.assert_array_equal(full.forward(ids[:, :1], None, None, 1).shape, first.shape)


@pytest.mark.parametrize(("B", "T"), [(2, 600), (1, 9)])
def test_perplexity_runs_single_pass_with_the_same_value(
    model: cepe.Model, monkeypatch: pytest.MonkeyPatch, B: int, T: int
) -> None:
    """perplexity() over a recomputed context keeps one layer's K/V, and scores what the logits
    of a full-cache forward give (the log-softmax written here, in float64)."""
    ids, kw = _inputs(B, T, seed=T + 1)
    made = _record_contexts(monkeypatch)
    ppl = model.perplexity(ids, keep_cross_kv=False, eval_window=T // 2, **kw)
    assert made == [True]
    monkeypatch.undo()
    logits = model.forward(ids, logits="all", keep_cross_kv=False, cache=model.create_cache(B, T), **kw)
    z = logits.astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    amask = kw["attention_mask"]
    row_nll = []
    for b in range(B):
        ts = [t for t in range(T - T // 2, T) if amask[b, t] and amask[b, t - 1]]
        row_nll.append(np.mean([-logp[b, t - 1, ids[b, t]] for t in ts]))
    np.testing.assert_allclose(ppl, np.exp(np.mean(row_nll)), rtol=2e-5)
    made = _record_contexts(monkeypatch)
    model.perplexity(ids, keep_cross_kv=True, eval_window=T // 2, **kw)  # kept K/V: a full cache
    assert made == [False]
