"""Weights packed once for the BLAS's GEMM (oneMKL builds): the packed path
against transformers and against the plain one, the prepack switch, and a
Trainer never reading a stale packed copy of a weight it trains."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import hf_logits, random_ids

import cepe

torch = pytest.importorskip("torch")
from cepe_reference import make_reference  # noqa: E402 (needs torch)

PACKS = cepe.backends()["cpu"]["blas"].startswith("oneMKL")  # the BLAS with a packed GEMM


def test_prepack_reports_its_memory(tiny):
    path, _ = tiny
    packed = cepe.load(path, n_threads=2, prepack=True)
    plain = cepe.load(path, n_threads=2, prepack=False)
    assert packed.packed_bytes == 0  # made on first use
    ids = random_ids(np.random.default_rng(0), (1, 5))
    packed.forward(ids[:, :1])  # one row: a GEMV on the plain weights, nothing packed yet
    assert packed.packed_bytes == 0
    packed.forward(ids)
    plain.forward(ids)
    assert plain.packed_bytes == 0
    if PACKS:
        c = packed.config
        n_linear = (
            c.num_hidden_layers
            * (
                2 * c.hidden_size * c.num_attention_heads * c.head_dim
                + 2 * c.hidden_size * c.num_key_value_heads * c.head_dim
                + 3 * c.hidden_size * c.intermediate_size
            )
            + c.vocab_size * c.hidden_size
        )  # the untied lm_head
        assert packed.packed_bytes >= 4 * n_linear  # a whole fp32 copy, padded by the BLAS
    else:
        assert packed.packed_bytes == 0
    auto = cepe.load(path, n_threads=2)  # None: on where it fits (a tiny model always does)
    auto.forward(ids)
    assert auto.packed_bytes == packed.packed_bytes


@pytest.mark.parametrize("T", [2, 3, 17, 64, 300])
def test_packed_forward_matches_transformers_and_the_plain_path(tiny, T):
    """Every row count goes through the packed product (one row is a GEMV on
    the plain weight); 300 rows span two 256-row chunks."""
    path, hf = tiny
    ids = random_ids(np.random.default_rng(T), (2, T))
    mask = np.ones((2, T), np.int64)
    mask[1, : T // 2] = 0  # left padding
    packed = cepe.load(path, n_threads=2, prepack=True).forward(ids, attention_mask=mask)
    plain = cepe.load(path, n_threads=2, prepack=False).forward(ids, attention_mask=mask)
    want = hf_logits(hf, ids, attention_mask=mask)
    real = mask.astype(bool)
    assert np.abs(packed - want)[real].max() <= 1e-4
    assert np.abs(packed - plain)[real].max() <= 1e-4


def test_packed_generate_equals_transformers_greedy(tiny):
    path, hf = tiny
    prompt = random_ids(np.random.default_rng(3), (1, 9))
    got = cepe.load(path, n_threads=2, prepack=True).generate(prompt, 16, eos_token_id=[])
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(prompt), max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0
        )
    assert np.array_equal(got, out[:, 9:].numpy())


def test_prepack_argument_is_checked(tiny):
    path, _ = tiny
    with pytest.raises(TypeError, match="prepack must be a bool or None"):
        cepe.load(path, prepack="yes")


def test_trainer_reads_the_weights_it_trains_not_a_packed_copy(tmp_path):
    """After steps with a large learning rate, the trainer's model (its frozen
    weights packed, its trainable ones not) runs as the saved checkpoint loaded
    without packing; a stale packed copy would give the pre-training outputs."""
    ref = make_reference(7, n_cross=2)
    path = ref.save(str(tmp_path / "model"))
    rng = np.random.default_rng(0)
    V, Ve = ref.dec_cfg.vocab_size, ref.enc_cfg.vocab_size
    batch = {"input_ids": rng.integers(3, V, size=(2, 9)), "encoder_input_ids": rng.integers(3, Ve, size=(2, 3, 5))}
    probe_ids = rng.integers(3, V, size=(1, 12))
    probe_ctx = {"encoder_input_ids": rng.integers(3, Ve, size=(1, 2, 5))}

    model = cepe.load(path, n_threads=2)
    before = model.forward(probe_ids, **probe_ctx)  # packs every weight of this core
    trainer = cepe.Trainer(model, "cross_attn+encoder", lr=0.1, total_steps=3)
    assert trainer.model.packed_bytes == 0  # the loaded core's copies are freed, the trainer's not made yet
    for _ in range(3):
        trainer.step(batch)
    after = trainer.model.forward(probe_ids, **probe_ctx)
    if PACKS:
        assert trainer.model.packed_bytes > 0  # the frozen decoder is still packed
    ckpt = trainer.save(tmp_path / "ckpt")
    want = cepe.load(ckpt, n_threads=2, prepack=False).forward(probe_ids, **probe_ctx)
    assert np.abs(after - before).max() > 1e-2  # training moved the outputs
    assert np.abs(after - want).max() <= 1e-4


def test_first_use_from_many_threads_packs_once(tiny):
    """Threads racing to the first product: one packs, the others wait, and
    every result equals the plain path's."""
    from concurrent.futures import ThreadPoolExecutor

    path, _ = tiny
    ids = [random_ids(np.random.default_rng(i), (1, 40)) for i in range(6)]
    want = [cepe.load(path, n_threads=1, prepack=False).forward(x) for x in ids]
    model = cepe.load(path, n_threads=1, prepack=True)
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(model.forward, ids))
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() <= 1e-4
    if PACKS:
        bytes_after = model.packed_bytes
        model.forward(ids[0])
        assert bytes_after > 0 and model.packed_bytes == bytes_after  # packed once
