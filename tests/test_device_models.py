"""Whole-model paths on a device backend against the CPU backend.

Two devices run this module:
- "cpu-device-sim" (always): the CPU ops behind a simulated device boundary.
  Its buffers sit at non-canonical addresses, so host code that touches
  device memory faults at once, and a missing upload or download gives wrong
  numbers. Results must match the CPU bit for bit up to BLAS blocking
  (logits of every position go through one GEMM over the whole chunk there,
  one per row on the CPU): tolerance 1e-5.
- "cuda" (marked `cuda`, skipped without a GPU): the same paths on the GPU.
  fp32 throughout (cuBLAS without TF32, the online softmax in fp32), so
  logits agree with the CPU to 2e-3 absolute on these tiny random models
  (error grows with depth: the documented bound for 2-4 layer models);
  greedy tokens must be equal (the models' top-2 logit gaps are far above
  that bound).
"""

from __future__ import annotations

import numpy as np
import pytest

import cepe
from cepe.testing.reference import make_reference

SIM = "cpu-device-sim"


def cuda_available() -> bool:
    return bool(cepe.backends()["cuda"]["available"])


DEVICES = [
    pytest.param(SIM, id="sim"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not cuda_available(), reason="no usable CUDA device")],
    ),
]
TOL = {SIM: 1e-5, "cuda": 2e-3}


@pytest.fixture(scope="module")
def cepe_dir(tmp_path_factory):
    ref = make_reference(seed=5)
    return ref.save(str(tmp_path_factory.mktemp("cepe_dev")))


@pytest.fixture(scope="module")
def decoder_dir(model_factory):
    return model_factory("dev_llama", num_hidden_layers=3)[0]


@pytest.fixture(scope="module")
def dynamic_dir(model_factory):
    rope = {"rope_type": "dynamic", "factor": 2.0}
    return model_factory("dev_dynamic", max_position_embeddings=16, rope_scaling=rope)[0]


def pair(path: str, device: str) -> tuple[cepe.Model, cepe.Model]:
    return cepe.load(path, n_threads=2), cepe.load(path, device=device, n_threads=2)


@pytest.mark.parametrize("device", DEVICES)
def test_logits_batch_with_left_padding(decoder_dir, device):
    cpu, dev = pair(decoder_dir, device)
    assert dev.device == device
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 97, size=(3, 21))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :20] = 0  # one real token
    np.testing.assert_allclose(
        dev.forward(ids, attention_mask=mask), cpu.forward(ids, attention_mask=mask), atol=TOL[device], rtol=0
    )


@pytest.mark.parametrize("device", DEVICES)
def test_long_prompt_runs_in_chunks(decoder_dir, device):
    """600 tokens > the 512-row prefill chunk: the second chunk attends to the
    cache the first one filled on the device."""
    cpu, dev = pair(decoder_dir, device)
    ids = np.random.default_rng(1).integers(3, 97, size=(1, 600))
    np.testing.assert_allclose(dev.forward(ids), cpu.forward(ids), atol=TOL[device], rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_steps_equal_one_pass(decoder_dir, device):
    _, dev = pair(decoder_dir, device)
    ids = np.random.default_rng(2).integers(3, 97, size=(2, 10))
    full = dev.forward(ids)
    cache = dev.create_cache(2, 10)
    parts = [dev.forward(ids[:, :6], cache=cache)] + [dev.forward(ids[:, t : t + 1], cache=cache) for t in range(6, 10)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=TOL[device], rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_generation_greedy_and_sampled(decoder_dir, device):
    cpu, dev = pair(decoder_dir, device)
    prompt = np.random.default_rng(3).integers(3, 97, size=(2, 5))
    kw = dict(eos_token_id=[])
    np.testing.assert_array_equal(dev.generate(prompt, 24, **kw), cpu.generate(prompt, 24, **kw))
    if device == SIM:  # same floats: the same draws
        sampled = dict(kw, temperature=0.8, top_p=0.9, seed=7)
        np.testing.assert_array_equal(dev.generate(prompt, 24, **sampled), cpu.generate(prompt, 24, **sampled))


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_rope_table_follows_the_call(dynamic_dir, device):
    """Dynamic NTK recomputes the frequency table on the host per call: it
    must reach the device before the RoPE table is built."""
    cpu, dev = pair(dynamic_dir, device)
    ids = np.random.default_rng(4).integers(3, 97, size=(1, 40))  # > max_position_embeddings
    np.testing.assert_allclose(dev.forward(ids), cpu.forward(ids), atol=TOL[device], rtol=0)
    cache_c, cache_d = cpu.create_cache(1, 48), dev.create_cache(1, 48)
    for lo, hi in ((0, 10), (10, 30), (30, 40)):
        np.testing.assert_allclose(
            dev.forward(ids[:, lo:hi], cache=cache_d), cpu.forward(ids[:, lo:hi], cache=cache_c), atol=TOL[device]
        )


def context(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(3, 103, size=(2, 3, 7))
    mask = np.ones_like(ids)
    mask[0, 1, :3] = 0
    mask[1, 2, :] = 0  # a fully padded chunk
    return np.where(mask == 1, ids, 2), mask


@pytest.mark.parametrize("device", DEVICES)
def test_cepe_encode_forward_and_generate(cepe_dir, device):
    cpu, dev = pair(cepe_dir, device)
    rng = np.random.default_rng(5)
    ctx, cmask = context(rng)
    prompt = rng.integers(3, 101, size=(2, 6))
    np.testing.assert_allclose(dev.encode(ctx, cmask), cpu.encode(ctx, cmask), atol=TOL[device], rtol=0)
    kw = dict(encoder_input_ids=ctx, encoder_attention_mask=cmask)
    for keep in (True, False):
        np.testing.assert_allclose(
            dev.forward(prompt, keep_cross_kv=keep, **kw), cpu.forward(prompt, **kw), atol=TOL[device], rtol=0
        )
        np.testing.assert_array_equal(
            dev.generate(prompt, 16, eos_token_id=[], keep_cross_kv=keep, **kw),
            cpu.generate(prompt, 16, eos_token_id=[], **kw),
        )
    states = cpu.encode(ctx, cmask).reshape(2, 21, -1)
    np.testing.assert_allclose(
        dev.forward(prompt, encoder_hidden_states=states, encoder_attention_mask=cmask.reshape(2, 21)),
        cpu.forward(prompt, **kw),
        atol=TOL[device],
        rtol=0,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_cepe_perplexity(cepe_dir, device):
    cpu, dev = pair(cepe_dir, device)
    rng = np.random.default_rng(6)
    ctx, cmask = context(rng)
    ids = rng.integers(3, 101, size=(1, 50))
    kw = dict(encoder_input_ids=ctx[:1], encoder_attention_mask=cmask[:1], eval_window=20)
    assert dev.perplexity(ids, **kw) == pytest.approx(cpu.perplexity(ids, **kw), rel=10 * TOL[device])
    # longer than one 512-row chunk with recomputed cross K/V: the layer-major path
    ids = rng.integers(3, 101, size=(1, 700))
    kw = dict(encoder_input_ids=ctx[:1], encoder_attention_mask=cmask[:1], eval_window=300, keep_cross_kv=False)
    assert dev.perplexity(ids, **kw) == pytest.approx(cpu.perplexity(ids, **kw), rel=10 * TOL[device])


def test_weights_are_copied_to_the_device(decoder_dir):
    """A device model owns its weights: it does not keep the host arrays."""
    dev = cepe.load(decoder_dir, device=SIM)
    assert dev._core.backend == "cpu-device-sim"
    assert cepe.load(decoder_dir)._core.backend == "cpu"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trainable", ["cross_attn", "cross_attn+encoder"])
def test_three_training_steps(cepe_dir, device, trainable):
    """Three optimizer steps (two micro-batches each, CEPED KL on) on the
    device equal the CPU's: losses, gradient norms and the trained weights."""
    from test_train import make_batch

    ref = make_reference(seed=5)
    rng = np.random.default_rng(7)
    batches = [make_batch(rng, ref, B=2, kl_T=3) for _ in range(3)]
    kw = dict(lr=1e-2, weight_decay=0.05, total_steps=3, grad_accum=2, kl_loss_cof=1.5, kl_mode="drop", seed=3)
    cpu = cepe.Trainer(cepe.load(cepe_dir, n_threads=2), trainable, init="normal", **kw)
    dev = cepe.Trainer(cepe.load(cepe_dir, device=device, n_threads=2), trainable, init="normal", **kw)
    for batch in batches:
        want, got = cpu.step(batch), dev.step(batch)
        for key in ("loss", "lm_loss", "kl_loss", "grad_norm", "lr"):
            assert got[key] == pytest.approx(want[key], rel=TOL[device], abs=TOL[device]), key
    dev.sync_host()
    np.testing.assert_allclose(dev.params, cpu.params, atol=TOL[device] * 10, rtol=0)
    np.testing.assert_allclose(dev.adam_v, cpu.adam_v, atol=TOL[device], rtol=TOL[device] * 10)
    # the trained device model runs on its updated weights
    probe = make_batch(np.random.default_rng(1), ref, B=1, pad=False)
    enc = {"encoder_input_ids": probe["encoder_input_ids"]}
    got = dev.model.forward(probe["input_ids"], **enc)
    np.testing.assert_allclose(got, cpu.model.forward(probe["input_ids"], **enc), atol=TOL[device] * 10)


@pytest.mark.parametrize("device", DEVICES)
def test_device_save_and_resume(cepe_dir, device, tmp_path):
    """A checkpoint saved from the device holds the device's weights and
    moments; resuming it on the device continues as the CPU run does."""
    from test_train import make_batch

    ref = make_reference(seed=5)
    rng = np.random.default_rng(8)
    batches = [make_batch(rng, ref, B=2) for _ in range(4)]
    kw = dict(lr=1e-2, total_steps=4, seed=2)
    cpu = cepe.Trainer(cepe.load(cepe_dir, n_threads=2), "cross_attn+encoder", **kw)
    want = [cpu.step(b) for b in batches]
    dev = cepe.Trainer(cepe.load(cepe_dir, device=device, n_threads=2), "cross_attn+encoder", **kw)
    got = [dev.step(b) for b in batches[:2]]
    ckpt = dev.save(tmp_path / "ckpt")
    again = cepe.Trainer.resume(ckpt, n_threads=2, device=device)
    assert again.model.device == device
    got += [again.step(b) for b in batches[2:]]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=TOL[device], abs=TOL[device])
    again.sync_host()
    np.testing.assert_allclose(again.params, cpu.params, atol=TOL[device] * 10, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_weights(decoder_dir, cepe_dir, device):
    """dtype="bfloat16": linear weights rounded to bf16 on the device,
    activations rounded per GEMM, fp32 accumulation. Within bf16's error of
    the fp32 CPU model (2^-8 relative per rounding, a few layers deep: 5e-2),
    and measurably not the fp32 path."""
    ids = np.random.default_rng(9).integers(3, 97, size=(2, 12))
    for path in (decoder_dir, cepe_dir):
        cpu = cepe.load(path, n_threads=2)
        half = cepe.load(path, device=device, n_threads=2, dtype="bfloat16")
        assert half.dtype == "bfloat16"
        want, got = cpu.forward(ids), half.forward(ids)
        err = np.abs(got - want).max()
        assert 1e-5 < err < 5e-2 * max(1.0, np.abs(want).max()), err
    rng = np.random.default_rng(10)
    ctx, cmask = context(rng)
    kw = dict(encoder_input_ids=ctx, encoder_attention_mask=cmask)
    np.testing.assert_allclose(half.forward(ids, **kw), cpu.forward(ids, **kw), atol=0.25, rtol=0.05)
    with pytest.raises(NotImplementedError, match="training needs float32 weights"):
        cepe.Trainer(half, "cross_attn", total_steps=1)


def test_bf16_errors(decoder_dir):
    # the CPU multiplies bf16 weights natively (tests/test_quant_model.py); a device only through bf16 GEMMs
    assert cepe.load(decoder_dir, dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        cepe.load(decoder_dir, device=SIM, dtype="float16")
    with pytest.raises(NotImplementedError, match="dtype='q8_0' runs on the CPU only"):
        cepe.load(decoder_dir, device=SIM, dtype="q8_0")


def test_bad_device_names():
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        cepe.load("/nonexistent", device="gpu")
    with pytest.raises(TypeError, match="device must be a str"):
        cepe.load("/nonexistent", device=0)
