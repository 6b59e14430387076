"""Pickling: a Model by reference (its path and cepe.load's arguments), a KVCache by value, and
both through a multiprocessing pool, the way joblib and Ray ship them."""

from __future__ import annotations

import multiprocessing
import os
import pickle

import numpy as np
import pytest

import cepe
from cepe.testing.reference import make_reference

IDS = np.array([[3, 14, 15, 9, 26, 5, 35]])


@pytest.fixture(scope="module")
def cepe_dir(tmp_path_factory):
    p = tmp_path_factory.mktemp("pickle_cepe")
    make_reference(seed=3).save(str(p))
    return str(p)


def last_logits(model, ids):
    """In a pool worker: the model arrived by pickle."""
    return os.getpid(), model.forward(ids, logits="last")


def continue_cache(cache, token):
    """In a pool worker: one more token on a pickled cache, and a greedy continuation."""
    logits = cache.model.forward(np.array([[token]]), cache=cache, logits="last")
    return logits, len(cache)


def test_model_pickles_by_reference(tiny):
    path, _ = tiny
    model = cepe.load(path, n_threads=1)
    model.chunk_len = 64
    data = pickle.dumps(model)
    assert len(data) < 2000  # the reference, not the weights
    back = pickle.loads(data)
    assert back is not model and back._core is model._core  # this process's weights, shared
    assert back.chunk_len == 64 and back.n_threads == 1 and back.path == model.path
    np.testing.assert_array_equal(back.forward(IDS), model.forward(IDS))
    del model, back
    fresh = pickle.loads(data)  # nothing alive to share, but the last unpickled model: loaded or shared
    np.testing.assert_array_equal(fresh.forward(IDS), cepe.load(path).forward(IDS))


def test_relative_path_is_recorded_absolute(tiny, monkeypatch, tmp_path):
    path, _ = tiny
    monkeypatch.chdir(os.path.dirname(path))
    data = pickle.dumps(cepe.load(os.path.basename(path)))
    monkeypatch.chdir(tmp_path)
    assert pickle.loads(data).path == path


def test_model_changed_in_memory_refuses_with_advice(tiny):
    head = cepe.attach_encoder(cepe.load(tiny[0]), encoder_layers=1)
    with pytest.raises(pickle.PicklingError, match=r"changed in memory .* \(model\.save\(dir\)\)"):
        pickle.dumps(head)
    model = cepe.load(tiny[0])
    trainer_swap = model._core  # what a Trainer does: new weights behind the same Model
    model._core = trainer_swap
    with pytest.raises(pickle.PicklingError, match="changed in memory"):
        pickle.dumps(model)


@pytest.mark.parametrize("device", ["cpu", "cpu-device-sim"])
def test_cache_pickles_by_value(tiny, device):
    model = cepe.load(tiny[0], device=device)
    cache = model.create_cache(1, 32)
    model.forward(IDS, cache=cache)
    copy = pickle.loads(pickle.dumps(cache))
    assert len(copy) == len(cache) == IDS.shape[1] and copy.capacity == 32
    for tok in (7, 11):
        a = model.forward(np.array([[tok]]), cache=cache)
        b = copy.model.forward(np.array([[tok]]), cache=copy)
        np.testing.assert_array_equal(a, b)
    # against the whole sequence at once: the copy's cache holds the prompt's keys and values
    full = model.forward(np.concatenate([IDS, [[7, 11]]], axis=1), logits="last")
    np.testing.assert_allclose(b[:, -1], full, rtol=1e-5, atol=1e-5)


def test_cache_with_padding_and_a_batch(tiny):
    model = cepe.load(tiny[0])
    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = model.create_cache(2, 16)
    model.forward(ids, attention_mask=mask, cache=cache)
    copy = pickle.loads(pickle.dumps(cache))
    nxt = np.array([[8], [9]])
    np.testing.assert_array_equal(model.forward(nxt, cache=cache), copy.model.forward(nxt, cache=copy))


@pytest.mark.parametrize("keep_cross_kv", [True, False])
def test_cache_keeps_its_cepe_context(cepe_dir, keep_cross_kv):
    model = cepe.load(cepe_dir)
    chunks = np.arange(2 * 8).reshape(1, 2, 8) % 90 + 3
    cache = model.create_cache(1, 32)
    model.forward(IDS, cache=cache, encoder_input_ids=chunks, keep_cross_kv=keep_cross_kv)
    copy = pickle.loads(pickle.dumps(cache))
    a = model.forward(np.array([[4]]), cache=cache)
    b = copy.model.forward(np.array([[4]]), cache=copy)
    np.testing.assert_array_equal(a, b)
    plain = model.create_cache(1, 32)  # the context matters: without it the logits differ
    model.forward(IDS, cache=plain)
    assert not np.allclose(model.forward(np.array([[4]]), cache=plain), a)


def test_multiprocessing_pool(tiny):
    model = cepe.load(tiny[0], n_threads=1)
    want = model.forward(IDS, logits="last")
    cache = model.create_cache(1, 32)
    model.forward(IDS, cache=cache)
    ctx = multiprocessing.get_context("spawn")  # fork after OpenMP has started is unsafe
    with ctx.Pool(2) as pool:
        results = pool.starmap(last_logits, [(model, IDS)] * 4)
        cont, n = pool.apply(continue_cache, (cache, 7))
    assert all(pid != os.getpid() for pid, _ in results)
    for _, got in results:
        np.testing.assert_array_equal(got, want)
    assert n == IDS.shape[1] + 1
    np.testing.assert_array_equal(cont, model.forward(np.array([[7]]), cache=cache, logits="last"))


def test_a_state_that_does_not_fit_is_refused(tiny):
    model = cepe.load(tiny[0])
    cache = model.create_cache(1, 16)
    model.forward(IDS, cache=cache)
    state = list(cache._ctx.save_state())
    small = model.create_cache(1, 4)
    with pytest.raises(ValueError, match="a cache of 7 tokens does not fit the capacity 4"):
        small._ctx.load_state(*state)
    state[1] = np.ascontiguousarray(state[1][:, :, :, :-1])  # k of the wrong width
    with pytest.raises(ValueError, match="k: axis 3 has"):
        model.create_cache(1, 16)._ctx.load_state(*state)
