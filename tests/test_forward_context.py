"""Model.forward without a cache keeps its context between calls
(Model.forward_keep_bytes). Whatever the previous call was, a call must give
transformers' logits, and exactly what a fresh context gives."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import hf_logits

import cepe
from cepe.testing.reference import make_reference

TOL = 1e-4


def fresh_logits(m: cepe.Model, ids: np.ndarray, **kw) -> np.ndarray:
    """forward() with nothing kept: a new context for the call."""
    saved = m.forward_keep_bytes
    m.forward_keep_bytes = 0
    try:
        return m.forward(ids, **kw)
    finally:
        m.forward_keep_bytes = saved


def ids_of(rng: np.random.Generator, vocab: int, *shape: int) -> np.ndarray:
    return rng.integers(0, vocab, size=shape, dtype=np.int64)


def test_calls_of_every_shape_in_a_row_match_transformers(tiny):
    path, hf = tiny
    m = cepe.load(path, n_threads=2)
    rng = np.random.default_rng(0)
    V = m.config.vocab_size
    # longer, shorter, another batch size, a (T,) input, the first again
    inputs = [ids_of(rng, V, 1, 24), ids_of(rng, V, 1, 7), ids_of(rng, V, 3, 9), ids_of(rng, V, 11)]
    inputs.append(inputs[0])
    for ids in inputs:
        got = m.forward(ids)
        assert m._kept_ctx is not None, "forward() kept no context"
        np.testing.assert_allclose(got, hf_logits(hf, ids).reshape(got.shape), atol=TOL, rtol=0)
        np.testing.assert_array_equal(got, fresh_logits(m, ids))


def test_left_padded_batch_after_a_plain_call(tiny):
    path, hf = tiny
    m = cepe.load(path, n_threads=2)
    rng = np.random.default_rng(1)
    ids = ids_of(rng, m.config.vocab_size, 2, 10)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    m.forward(ids_of(rng, m.config.vocab_size, 2, 12))  # leaves a longer context behind
    got = m.forward(ids, attention_mask=mask)
    np.testing.assert_array_equal(got, fresh_logits(m, ids, attention_mask=mask))
    want = hf_logits(hf, ids, attention_mask=mask)
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=TOL, rtol=0)


def test_dynamic_rope_table_does_not_leak_between_calls(model_factory):
    # dynamic NTK switches its frequency table with the call's length: a long
    # call must not leave its table to a short one
    path, hf = model_factory(
        "fwdctx_dynamic", max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    )
    m = cepe.load(path, n_threads=2)
    rng = np.random.default_rng(2)
    long_ids, short_ids = ids_of(rng, m.config.vocab_size, 1, 40), ids_of(rng, m.config.vocab_size, 1, 8)
    for ids in (short_ids, long_ids, short_ids):
        got = m.forward(ids)
        np.testing.assert_allclose(got, hf_logits(hf, ids), atol=TOL, rtol=0)
        np.testing.assert_array_equal(got, fresh_logits(m, ids))


def test_a_cepe_context_never_reaches_the_kept_context(tmp_path):
    ref = make_reference(seed=3)
    m = cepe.load(ref.save(str(tmp_path)), n_threads=2)
    rng = np.random.default_rng(3)
    ids = ids_of(rng, m.config.vocab_size, 1, 12)
    chunks = ids_of(rng, ref.enc_cfg.vocab_size, 1, 2, 8)
    base = m.forward(ids)
    with_ctx = m.forward(ids, encoder_input_ids=chunks)
    assert np.abs(with_ctx - base).max() > 1e-3, "the context changed nothing: the test proves nothing"
    np.testing.assert_array_equal(m.forward(ids), base)  # no context: exactly the base decoder again


def test_a_call_over_the_budget_keeps_nothing(tiny):
    path, _ = tiny
    m = cepe.load(path, n_threads=2)
    m.forward_keep_bytes = 1  # no context fits
    m.forward(np.arange(5))
    assert m._kept_ctx is None


def test_concurrent_calls_each_get_their_own_context(tiny):
    path, _ = tiny
    m = cepe.load(path, n_threads=1)
    rng = np.random.default_rng(4)
    inputs = [ids_of(rng, m.config.vocab_size, 1, n) for n in (5, 9, 13, 17, 21, 25)]
    want = [fresh_logits(m, ids) for ids in inputs]
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for _ in range(5):
                got[k] = m.forward(inputs[k])
                np.testing.assert_array_equal(got[k], want[k])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert not m._kept_lock.locked()


def test_a_failed_call_releases_the_kept_context(tiny, monkeypatch):
    path, _ = tiny
    m = cepe.load(path, n_threads=2)
    m.forward(np.arange(4))

    def failing(*args, **kw):
        raise RuntimeError("the core failed")

    with monkeypatch.context() as mp:
        mp.setattr(cepe.model, "_interruptible", failing)
        with pytest.raises(RuntimeError, match="the core failed"):
            m.forward(np.arange(6))
    assert not m._kept_lock.locked()
    np.testing.assert_array_equal(m.forward(np.arange(6)), fresh_logits(m, np.arange(6)))


def test_generate_after_other_calls_matches_transformers(tiny):
    path, hf = tiny
    m = cepe.load(path, n_threads=2)
    rng = np.random.default_rng(5)
    prompt = ids_of(rng, m.config.vocab_size, 1, 6)
    m.forward(ids_of(rng, m.config.vocab_size, 1, 30))  # a longer context kept behind
    got = m.generate(prompt, 12, eos_token_id=[])
    with torch.no_grad():
        want = hf.generate(torch.as_tensor(prompt), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    np.testing.assert_array_equal(got, want[:, prompt.shape[1] :].numpy())
    m.generate(ids_of(rng, m.config.vocab_size, 2, 4), 3, eos_token_id=[])  # another batch size
    np.testing.assert_array_equal(m.generate(prompt, 12, eos_token_id=[]), got)
    assert not m._kept_lock.locked()
