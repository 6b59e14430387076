"""An experiment written as a pytest file: what does CEPE's cross-attention do?

Run it as any test file:

    python -m pytest -q examples/test_experiment.py

cepe's pytest plugin (registered when cepe is installed; from a source
checkout add `-p cepe.testing.plugin`) supplies the fixtures:

- tiny_cepe: a random CEPE model (decoder, encoder, cross-attention) written
  to a temporary directory; @pytest.mark.cepe_config(...) changes its config;
- reference: the PyTorch reference (cepe.testing.reference), skipped when
  torch is not installed;
- default_model: the pulled smollm2-135m, skipped when it is not pulled.

Swap tiny_cepe for your own checkpoint (cepe.load(path)) and the same
questions run on a real model.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

import cepe.ops as ops
from cepe.safetensors_io import SafetensorsFile
from cepe.testing import TinyModel, assert_generations_equal, assert_logits_close

RNG = np.random.default_rng(0)
CHUNKS = RNG.integers(3, 101, size=(1, 4, 8))  # one row, 4 context chunks of 8 tokens
PROMPT = RNG.integers(3, 101, size=(1, 10))


def test_context_changes_predictions_and_a_masked_context_changes_nothing(tiny_cepe: TinyModel) -> None:
    """Question 1: the context moves the decoder's logits; an all-masked context is no context."""
    model = tiny_cepe.load()
    without = model.forward(PROMPT)
    with_ctx = model.forward(PROMPT, encoder_input_ids=CHUNKS)
    assert np.abs(with_ctx - without).max() > 1e-2
    masked = model.forward(PROMPT, encoder_input_ids=CHUNKS, encoder_attention_mask=np.zeros_like(CHUNKS))
    assert_logits_close(masked, without, atol=1e-5)
    # greedy decoding follows: no context and a masked one generate the same tokens
    assert_generations_equal(
        model.generate(PROMPT, 8, encoder_input_ids=CHUNKS, encoder_attention_mask=np.zeros_like(CHUNKS)),
        model.generate(PROMPT, 8),
    )


def head_entropy(q: np.ndarray, k: np.ndarray, key_mask: np.ndarray) -> np.ndarray:
    """The entropy (nats) of each query's attention over the keys, per head, from cepe.ops alone:
    H = lse - E_p[score], and E_p[score] = scale * q · attention(q, k, k) (the output with v = k
    is Σ_j p_j k_j)."""
    scale = q.shape[-1] ** -0.5
    mean_k, lse = ops.attention(q, k, k, key_mask=key_mask, return_lse=True)
    H = q.shape[2]
    expected_score = scale * np.einsum("bthd,bthd->bth", q, mean_k.reshape(q.shape[0], q.shape[1], H, -1))
    return lse - expected_score


@pytest.mark.cepe_config(num_cross_attn_layers=1)
def test_how_sharply_each_head_reads_the_context(tiny_cepe: TinyModel) -> None:
    """Question 2: each cross-attention head's attention entropy over the encoder states, computed
    with cepe.ops on the checkpoint's own weights. The token embeddings stand in for the
    decoder's hidden states (the decoder does not expose them)."""
    model = tiny_cepe.load()
    cfg = tiny_cepe.config
    H, KVH, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    layer = cfg["num_hidden_layers"] - 1  # the one cross-attention layer is the last
    f = SafetensorsFile(f"{tiny_cepe.path}/model.safetensors")
    p = f"model.layers.{layer}.cross_attn."
    h = f.get("model.embed_tokens.weight")[PROMPT]  # (1, T, C)
    states = model.encode(CHUNKS)[None]  # (1, 32, d_enc)
    q = ops.linear(ops.rmsnorm(h, f.get(p + "layernorm.weight"), cfg["rms_norm_eps"]), f.get(p + "q_proj.weight"))
    k = ops.linear(states, f.get(p + "k_proj.weight"))
    q, k = q.reshape(1, -1, H, hd), k.reshape(1, -1, KVH, hd)

    full = np.ones((1, k.shape[1]), bool)
    half = full.copy()
    half[:, 16:] = False  # only the first two chunks visible
    ent_full, ent_half = head_entropy(q, k, full), head_entropy(q, k, half)
    assert ent_full.shape == (1, PROMPT.shape[1], H)
    # an entropy lies in [0, log(number of visible keys)]
    assert (ent_full > -1e-4).all() and (ent_full <= np.log(32) + 1e-4).all()
    assert (ent_half <= np.log(16) + 1e-4).all()
    # the same numbers from a plain softmax over the scores: the experiment checks itself
    kk = np.repeat(k, H // KVH, axis=2)
    s = np.einsum("bthd,bjhd->bhtj", q, kk) * hd**-0.5
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    want = -(pr * np.log(pr)).sum(-1).transpose(0, 2, 1)
    np.testing.assert_allclose(ent_full, want, atol=1e-4)
    print("per-head mean entropy (nats):", np.round(ent_full.mean(axis=(0, 1)), 3), "max", np.round(np.log(32), 3))


def test_the_engine_agrees_with_the_reference(tiny_cepe: TinyModel, reference: ModuleType) -> None:
    """Question 3, the sanity check every experiment starts from: the engine computes what the
    PyTorch reference of the paper's model computes, on the same weights."""
    ref = reference.load_reference(tiny_cepe.path)
    model = tiny_cepe.load()
    assert_logits_close(
        model.forward(PROMPT, encoder_input_ids=CHUNKS), ref.forward(PROMPT, ref.encode(CHUNKS)), atol=1e-4
    )
