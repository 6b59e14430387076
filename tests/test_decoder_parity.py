"""The decoder against transformers: logits, padding, generation, KV cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hf_greedy, hf_logits, random_ids

import cepe
from cepe.testing.quant_ctypes import fp32_bf16_products

TOL = 1e-4

# name -> (model_type, save dtype, max_shard_size, config overrides)
VARIANTS = {
    "mha": ("llama", None, None, dict(num_key_value_heads=4)),
    "gqa": ("llama", None, None, dict()),
    "mqa_tied": ("llama", None, None, dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "odd_heads": (
        "llama",
        None,
        None,
        dict(hidden_size=42, num_attention_heads=3, num_key_value_heads=1, intermediate_size=70, vocab_size=89),
    ),
    "eps_theta": ("llama", None, None, dict(rms_norm_eps=1e-3, rope_theta=531.0, num_hidden_layers=3)),
    "head_dim_override": (
        "llama",
        None,
        None,
        dict(head_dim=16, hidden_size=40, num_attention_heads=5, num_key_value_heads=5),
    ),
    "bf16_file": ("llama", torch.bfloat16, None, dict()),
    "fp16_file": ("llama", torch.float16, None, dict()),
    "sharded": ("llama", None, "40KB", dict(num_hidden_layers=3)),
    "mistral_window": ("mistral", None, None, dict(sliding_window=5)),
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request, model_factory):
    mt, dtype, shard, over = VARIANTS[request.param]
    return model_factory(request.param, model_type=mt, dtype=dtype, max_shard_size=shard, **over)


def test_logits_match_transformers(variant):
    path, hf = variant
    model = cepe.load(path)
    rng = np.random.default_rng(0)
    ids = random_ids(rng, (2, 19), model.config.vocab_size)
    # transformers multiplies the bf16 file's weights in fp32: so does cepe's fp32 path (the
    # AVX512-BF16 one rounds activations to bf16, tests/test_bf16_gemm.py and test_quant_model.py)
    with fp32_bf16_products():
        ours = model.forward(ids)
    ref = hf_logits(hf, ids)
    assert ours.shape == ref.shape == (2, 19, model.config.vocab_size)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    assert np.abs(ref).max() > 1.0  # the model is not trivially near zero


def test_sharded_checkpoint_has_several_files(model_factory):
    import os

    path, _ = model_factory("sharded", max_shard_size="40KB", num_hidden_layers=3)
    shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.exists(os.path.join(path, "model.safetensors.index.json"))


def test_one_dimensional_input_and_int32(tiny):
    path, hf = tiny
    model = cepe.load(path)
    ids = np.arange(3, 20, dtype=np.int32)
    out = model.forward(ids)
    assert out.shape == (17, model.config.vocab_size)
    np.testing.assert_allclose(out, hf_logits(hf, ids.astype(np.int64))[0], atol=TOL, rtol=0)
    # logits="last" runs the last layer for one row (a matrix-vector product): float32 rounding differs
    np.testing.assert_allclose(model.forward(ids, logits="last"), out[-1], atol=1e-5, rtol=0)


def test_long_input_crosses_prefill_chunks(tiny):
    """600 tokens run as chunks of 512 + 88 that attend through the cache."""
    path, hf = tiny
    model = cepe.load(path)
    ids = random_ids(np.random.default_rng(1), (1, 600))
    np.testing.assert_allclose(model.forward(ids), hf_logits(hf, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["gqa", "mistral_window"])
def test_last_logits_path_matches_full_and_leaves_a_complete_cache(name, model_factory):
    """logits="last" runs the last layer for each row's last token only (its
    K/V still for every token): the same last logits as the full forward and
    as transformers, over several prefill chunks of a left-padded batch, and a
    cache that decoding continues from exactly as after a full forward."""
    mt, dtype, shard, over = VARIANTS[name]
    path, hf = model_factory(name, model_type=mt, dtype=dtype, max_shard_size=shard, **over)
    model = cepe.load(path)
    rng = np.random.default_rng(11)
    lengths, T = [200, 150, 37], 200  # batch 3: prefill chunks of 170 + 30 tokens
    ids = random_ids(rng, (3, T))
    mask = np.zeros((3, T), dtype=np.int64)
    for i, n in enumerate(lengths):
        mask[i, T - n :] = 1
    full = model.forward(ids, attention_mask=mask)
    last = model.forward(ids, attention_mask=mask, logits="last")
    assert last.shape == (3, model.config.vocab_size)
    np.testing.assert_allclose(last, full[:, -1], atol=1e-5, rtol=0)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    ref = hf_logits(hf, ids, attention_mask=mask, position_ids=pos)
    np.testing.assert_allclose(last, ref[:, -1], atol=TOL, rtol=0)
    # the cache the last-only prefill left: every layer holds every token
    nxt = random_ids(rng, (3, 4))
    caches = [model.create_cache(batch_size=3, capacity=T + 4) for _ in range(2)]
    model.forward(ids, attention_mask=mask, cache=caches[0], logits="last")
    model.forward(ids, attention_mask=mask, cache=caches[1])
    steps = [[model.forward(nxt[:, t : t + 1], cache=c) for t in range(4)] for c in caches]
    np.testing.assert_allclose(np.concatenate(steps[0], 1), np.concatenate(steps[1], 1), atol=1e-5, rtol=0)
    ext_mask = np.concatenate([mask, np.ones((3, 4), dtype=np.int64)], axis=1)
    ext_pos = np.clip(np.cumsum(ext_mask, axis=1) - 1, 0, None)
    ref = hf_logits(hf, np.concatenate([ids, nxt], 1), attention_mask=ext_mask, position_ids=ext_pos)
    np.testing.assert_allclose(np.concatenate(steps[0], 1), ref[:, T:], atol=TOL, rtol=0)
    # one row, two chunks (512 + 88): the last chunk alone takes the short path
    ids = random_ids(rng, (1, 600))
    np.testing.assert_allclose(model.forward(ids, logits="last"), hf_logits(hf, ids)[:, -1], atol=TOL, rtol=0)


def test_left_padded_batch_matches_rows_alone(tiny):
    path, hf = tiny
    model = cepe.load(path)
    rng = np.random.default_rng(2)
    lengths = [13, 7, 1, 10]
    T = max(lengths)
    rows = [random_ids(rng, (n,)) for n in lengths]
    ids = np.zeros((len(rows), T), dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = r
        mask[i, T - len(r) :] = 1
    batch = model.forward(ids, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = model.forward(r)
        np.testing.assert_allclose(batch[i, T - len(r) :], alone, atol=TOL, rtol=0)
    # and transformers, given the same positions, agrees on the real tokens
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    ref = hf_logits(hf, ids, attention_mask=mask, position_ids=pos)
    np.testing.assert_allclose(batch[mask == 1], ref[mask == 1], atol=TOL, rtol=0)


def test_explicit_position_ids(tiny):
    path, hf = tiny
    model = cepe.load(path)
    ids = random_ids(np.random.default_rng(3), (1, 9))
    pos = np.array([[0, 1, 2, 3, 50, 51, 52, 200, 201]])
    np.testing.assert_allclose(
        model.forward(ids, position_ids=pos), hf_logits(hf, ids, position_ids=pos), atol=TOL, rtol=0
    )


@pytest.mark.parametrize("name", ["gqa", "mqa_tied", "mistral_window"])
def test_greedy_generation_matches_transformers(name, model_factory):
    mt, dtype, shard, over = VARIANTS[name]
    path, hf = model_factory(name, model_type=mt, dtype=dtype, max_shard_size=shard, **over)
    model = cepe.load(path)
    prompt = random_ids(np.random.default_rng(4), (1, 6), model.config.vocab_size)
    ours = model.generate(prompt, 32, eos_token_id=[])
    ref = hf_greedy(hf, prompt, 32)
    assert ours.shape == (1, 32)
    np.testing.assert_array_equal(ours, ref)
    if name != "mqa_tied":  # tied random models tend to repeat one token, as transformers does too
        assert len(set(ours[0].tolist())) > 1


def test_batched_greedy_generation_with_left_padding(tiny):
    path, hf = tiny
    model = cepe.load(path)
    rng = np.random.default_rng(5)
    rows = [random_ids(rng, (n,)) for n in (8, 3)]
    ids = np.zeros((2, 8), dtype=np.int64)
    mask = np.zeros((2, 8), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, 8 - len(r) :] = r
        mask[i, 8 - len(r) :] = 1
    batch = model.generate(ids, 16, attention_mask=mask, eos_token_id=[])
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(batch[i], model.generate(r, 16, eos_token_id=[]))
    with torch.no_grad():
        ref = hf.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, 8:]
    np.testing.assert_array_equal(batch, ref.numpy())


def test_generation_stops_at_eos(tiny):
    path, _ = tiny
    model = cepe.load(path)
    prompt = random_ids(np.random.default_rng(6), (7,))
    free = model.generate(prompt, 20, eos_token_id=[])
    stop = int(free[4])  # make the 5th generated token the eos
    out = model.generate(prompt, 20, eos_token_id=stop)
    first = int(np.argmax(free == stop))
    np.testing.assert_array_equal(out, free[: first + 1])
    # in a batch, the finished row is padded while the other continues
    other = random_ids(np.random.default_rng(7), (7,))
    both = model.generate(np.stack([prompt, other]), 20, eos_token_id=stop)
    alone = model.generate(other, 20, eos_token_id=stop)
    np.testing.assert_array_equal(both[1, : len(alone)], alone)


def test_kv_cache_decoding_equals_full_recompute(tiny):
    path, _ = tiny
    model = cepe.load(path)
    ids = random_ids(np.random.default_rng(8), (2, 24))
    full = model.forward(ids)
    cache = model.create_cache(batch_size=2, capacity=24)
    parts = [model.forward(ids[:, :10], cache=cache)]
    for t in range(10, 20):
        parts.append(model.forward(ids[:, t : t + 1], cache=cache))
    parts.append(model.forward(ids[:, 20:], cache=cache))
    assert len(cache) == 24
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-5, rtol=0)
    cache.reset()
    assert len(cache) == 0
    np.testing.assert_allclose(model.forward(ids, cache=cache), full, atol=1e-6, rtol=0)


def test_sampling_is_seeded(tiny):
    path, _ = tiny
    model = cepe.load(path)
    prompt = random_ids(np.random.default_rng(9), (5,))
    a = model.generate(prompt, 24, temperature=1.5, seed=123, eos_token_id=[])
    b = model.generate(prompt, 24, temperature=1.5, seed=123, eos_token_id=[])
    c = model.generate(prompt, 24, temperature=1.5, seed=124, eos_token_id=[])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = model.generate(prompt, 24, eos_token_id=[])
    np.testing.assert_array_equal(model.generate(prompt, 24, temperature=1.0, top_k=1, seed=5, eos_token_id=[]), greedy)
    np.testing.assert_array_equal(
        model.generate(prompt, 24, temperature=1.0, top_p=1e-6, seed=5, eos_token_id=[]), greedy
    )


def test_sampling_distribution_follows_softmax(tiny):
    """First sampled token frequencies match softmax(logits / T) (chi-square)."""
    path, _ = tiny
    model = cepe.load(path)
    prompt = random_ids(np.random.default_rng(10), (4,))
    logits = model.forward(prompt, logits="last").astype(np.float64)
    p = np.exp((logits - logits.max()) / 2.0)
    p /= p.sum()
    n = 3000
    counts = np.bincount(
        [int(model.generate(prompt, 1, temperature=2.0, seed=s)[0]) for s in range(n)], minlength=len(p)
    )
    expected = p * n
    keep = expected >= 5
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum()
    dof = keep.sum() - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)
