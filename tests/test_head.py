"""cepe.attach_encoder and CEPE head directories, against a PyTorch oracle written from the spec
(cepe.testing.reference): the encoder is the decoder's first layers run bidirectionally, and
cross-attention is initialised as the reference's train.py init_mode (spec CEPE.md §3)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import build_hf_model, save_model
from transformers import LlamaConfig

import cepe
import cepe_c
from cepe.build import param_shapes
from cepe.testing import TINY_LLAMA
from cepe.testing.reference import CepeReference, make_reference

DEC = {**TINY_LLAMA, "max_position_embeddings": 512}
TOL = 2e-4


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    hf = build_hf_model(**DEC)
    return save_model(hf, str(tmp_path_factory.mktemp("dec"))), hf


def oracle(hf, n_enc: int, n_cross: int, init: str) -> CepeReference:
    """The CEPE model attach_encoder should build, from the spec: the encoder = the decoder's
    first n_enc blocks + its embedding table + its final norm; cross-attention q <- self_attn.q,
    k/v <- the first d_enc input columns of self_attn.k/v, o <- self_attn.o (0 for "zero"),
    layernorm <- post_attention_layernorm."""
    dcfg = LlamaConfig(**{**hf.config.to_dict(), "num_hidden_layers": DEC["num_hidden_layers"]})
    ecfg = LlamaConfig(**{**hf.config.to_dict(), "num_hidden_layers": n_enc, "tie_word_embeddings": False})
    ref = CepeReference(dcfg, ecfg, n_cross).eval()
    sd = hf.state_dict()
    with torch.no_grad():
        ref.lm.load_state_dict(sd)
        enc = {"embed_tokens.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
        for j in range(n_enc):
            enc.update({k[len("model.") :]: v for k, v in sd.items() if k.startswith(f"model.layers.{j}.")})
        ref.encoder.load_state_dict(enc, strict=False)
        L = DEC["num_hidden_layers"]
        for i in range(L - n_cross, L):
            c = ref.cross[str(i)]
            c.q_proj.weight.copy_(sd[f"model.layers.{i}.self_attn.q_proj.weight"])
            c.k_proj.weight.copy_(sd[f"model.layers.{i}.self_attn.k_proj.weight"])
            c.v_proj.weight.copy_(sd[f"model.layers.{i}.self_attn.v_proj.weight"])
            c.o_proj.weight.copy_(sd[f"model.layers.{i}.self_attn.o_proj.weight"] * (init == "copy"))
            c.layernorm.weight.copy_(sd[f"model.layers.{i}.post_attention_layernorm.weight"])
    return ref


def context(rng, n_ctx=3, L=8):
    return rng.integers(3, DEC["vocab_size"], size=(1, n_ctx, L))


@pytest.mark.parametrize("n_cross", [1, 3])
def test_param_shapes_are_the_checkpoints(decoder, n_cross, tmp_path):
    """cepe.build.param_shapes (the C core's parameter table) names and shapes every tensor
    of the oracles' checkpoints: transformers' decoder, and the CEPE reference (encoder and
    cross-attention too)."""
    path, hf = decoder
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    assert param_shapes(cepe.load(path).config) == want
    ref = make_reference(seed=2, n_cross=n_cross)
    ckpt = ref.save(str(tmp_path / "cepe"))
    want = {k: tuple(v.shape) for k, v in ref.official_state_dict().items()}
    assert param_shapes(cepe.load(ckpt).config) == want


def test_copy_encoder_and_copy_init_match_the_oracle(decoder):
    path, hf = decoder
    model = cepe.attach_encoder(cepe.load(path), encoder_layers=2, num_cross_attn_layers=2, init="copy")
    ref = oracle(hf, 2, 2, "copy")
    rng = np.random.default_rng(0)
    ctx, ids = context(rng), rng.integers(3, 101, size=(1, 10))
    E = ref.encode(ctx)
    np.testing.assert_allclose(model.encode(ctx), E.numpy(), atol=TOL, rtol=0)
    got = model.forward(ids, encoder_input_ids=ctx)
    np.testing.assert_allclose(got, ref.forward(ids, E).numpy(), atol=TOL, rtol=0)
    assert np.abs(got - model.forward(ids)).max() > 1e-2  # the context matters


def test_zero_init_starts_as_the_decoder(decoder):
    path, _ = decoder
    dec = cepe.load(path)
    model = cepe.attach_encoder(dec, encoder_layers=1, init="zero")
    assert model.config.num_cross_attn_layers == 1  # the upper third of 3 layers
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 101, size=(1, 10))
    np.testing.assert_array_equal(model.forward(ids, encoder_input_ids=context(rng)), dec.forward(ids))


def test_shared_embedding_table_is_one_tensor_and_stays_frozen(decoder, tmp_path):
    path, _ = decoder
    model = cepe.attach_encoder(cepe.load(path), encoder_layers=1, num_cross_attn_layers=1, init="normal")
    w = cepe_c.train_weights(model._core)
    assert np.shares_memory(w["encoder.embed_tokens.weight"], w["model.embed_tokens.weight"])
    assert model.config.raw["encoder_shares_embeddings"] is True
    before = np.array(w["model.embed_tokens.weight"])
    tr = cepe.Trainer(model, "cross_attn+encoder", lr=0.05, total_steps=3)
    assert "encoder.embed_tokens.weight" not in tr.trainable_names
    assert "encoder.layers.0.self_attn.q_proj.weight" in tr.trainable_names
    rng = np.random.default_rng(2)
    batch = {"input_ids": rng.integers(3, 101, size=(2, 8)), "encoder_input_ids": rng.integers(3, 101, size=(2, 2, 8))}
    for _ in range(3):
        tr.step(batch)
    after = cepe_c.train_weights(model._core)
    np.testing.assert_array_equal(after["model.embed_tokens.weight"], before)
    assert np.shares_memory(after["encoder.embed_tokens.weight"], after["model.embed_tokens.weight"])
    # "all": the table trains once, as the decoder's, and the encoder reads the trained table
    model2 = cepe.attach_encoder(cepe.load(path), encoder_layers=1, num_cross_attn_layers=1, init="normal")
    tr2 = cepe.Trainer(model2, "all", lr=0.05, total_steps=2)
    tr2.step(batch)
    w2 = cepe_c.train_weights(model2._core)
    assert np.shares_memory(w2["encoder.embed_tokens.weight"], tr2.params)
    assert not np.array_equal(w2["model.embed_tokens.weight"], before)
    tr2.save(str(tmp_path / "ck"))
    back = cepe.load(str(tmp_path / "ck"))
    np.testing.assert_array_equal(
        back.forward(batch["input_ids"], encoder_input_ids=batch["encoder_input_ids"]),
        model2.forward(batch["input_ids"], encoder_input_ids=batch["encoder_input_ids"]),
    )


def test_own_embedding_copy_when_not_shared(decoder):
    path, _ = decoder
    model = cepe.attach_encoder(cepe.load(path), encoder_layers=1, share_embeddings=False)
    w = cepe_c.train_weights(model._core)
    assert not np.shares_memory(w["encoder.embed_tokens.weight"], w["model.embed_tokens.weight"])
    np.testing.assert_array_equal(w["encoder.embed_tokens.weight"], w["model.embed_tokens.weight"])
    assert "encoder_shares_embeddings" not in model.config.raw
    tr = cepe.Trainer(model, "cross_attn+encoder", total_steps=1)
    assert "encoder.embed_tokens.weight" in tr.trainable_names


def test_random_encoder_of_another_width(decoder):
    path, _ = decoder
    model = cepe.attach_encoder(
        cepe.load(path),
        encoder="random",
        encoder_layers=1,
        encoder_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4},
    )
    assert model.config.encoder_hidden_size == 32 and "encoder_shares_embeddings" not in model.config.raw
    rng = np.random.default_rng(3)
    assert model.encode(context(rng)).shape == (1, 24, 32)
    with pytest.raises(cepe.CheckpointError, match="shares the decoder's embedding"):
        cepe.attach_encoder(
            cepe.load(path), encoder="random", encoder_config={"hidden_size": 32}, share_embeddings=True
        )


def test_encoder_from_another_checkpoint(decoder, tmp_path):
    path, hf = decoder
    other = build_hf_model(**{**DEC, "num_hidden_layers": 2}, seed=5)
    other_path = save_model(other, str(tmp_path / "other"))
    model = cepe.attach_encoder(cepe.load(path), encoder=other_path, encoder_layers=2, num_cross_attn_layers=1)
    w = cepe_c.train_weights(model._core)
    np.testing.assert_array_equal(
        w["encoder.layers.1.mlp.up_proj.weight"], other.state_dict()["model.layers.1.mlp.up_proj.weight"].numpy()
    )
    assert not np.shares_memory(w["encoder.embed_tokens.weight"], w["model.embed_tokens.weight"])
    # a CEPE model's encoder is taken whole
    again = cepe.attach_encoder(cepe.load(path), encoder=model, num_cross_attn_layers=2)
    np.testing.assert_array_equal(
        cepe_c.train_weights(again._core)["encoder.layers.1.mlp.up_proj.weight"],
        w["encoder.layers.1.mlp.up_proj.weight"],
    )


def test_gguf_decoder_gives_an_encoder_in_hf_layout(tmp_path):
    """A GGUF decoder stores q/k rows interleaved; the copied encoder runs in HF's layout and
    equals the oracle built from the HF weights the GGUF was written from."""
    from test_gguf import HEADS, HIDDEN, KV_HEADS, LAYERS, write_gguf

    vocab = {"model": "llama", "pre": None, "merges": None, "scores": None}
    n_vocab = 120
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    n_vocab = len(tokens) + 20
    tokens += [f"t{i}" for i in range(20)]
    vocab.update(
        tokens=tokens, types=[2, 3, 3] + [6] * 256 + [1] * 20, scores=[0.0] * 259 + [-float(i) for i in range(20)]
    )
    hf = build_hf_model(
        vocab_size=n_vocab,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    gguf_path = write_gguf(str(tmp_path / "d.gguf"), hf, vocab)
    model = cepe.attach_encoder(cepe.load(gguf_path), encoder_layers=1, num_cross_attn_layers=1)
    assert model.config.rope.layout == "interleaved"
    assert model.config.encoder.rope.layout == "half"
    ecfg = LlamaConfig(**{**hf.config.to_dict(), "num_hidden_layers": 1})
    ref = CepeReference(LlamaConfig(**hf.config.to_dict()), ecfg, 1).eval()
    sd = hf.state_dict()
    enc = {"embed_tokens.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    enc.update({k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.layers.0.")})
    ref.encoder.load_state_dict(enc, strict=False)
    ctx = np.random.default_rng(4).integers(3, n_vocab, size=(1, 2, 8))
    np.testing.assert_allclose(model.encode(ctx), ref.encode(ctx).numpy(), atol=TOL, rtol=0)


def test_head_directory_names_its_decoder_relative_or_absolute(decoder, tmp_path):
    path, _ = decoder
    model = cepe.attach_encoder(cepe.load(path), encoder_layers=1, init="normal")
    assert model.config.raw["cepe_decoder"] == os.path.abspath(path)
    head = model.save(str(tmp_path / "head"))
    assert sorted(os.listdir(head)) == ["config.json", "head.safetensors"]
    rng = np.random.default_rng(5)
    ids, ctx = rng.integers(3, 101, size=(1, 6)), context(rng)
    want = model.forward(ids, encoder_input_ids=ctx)
    np.testing.assert_array_equal(cepe.load(head).forward(ids, encoder_input_ids=ctx), want)
    # a relative reference is relative to the head directory
    cfg_path = os.path.join(head, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["cepe_decoder"] = os.path.relpath(path, head)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    moved = cepe.load(head)
    np.testing.assert_array_equal(moved.forward(ids, encoder_input_ids=ctx), want)
    # saved again elsewhere, the reference still finds the decoder
    again = moved.save(str(tmp_path / "elsewhere" / "head2"))
    np.testing.assert_array_equal(cepe.load(again).forward(ids, encoder_input_ids=ctx), want)


def test_attach_errors(decoder, tmp_path):
    path, _ = decoder
    dec = cepe.load(path)
    with pytest.raises(ValueError, match="encoder_layers"):
        cepe.attach_encoder(dec, encoder_layers=0)
    with pytest.raises(ValueError, match="only 3 layers"):
        cepe.attach_encoder(dec, encoder_layers=4)
    with pytest.raises(ValueError, match="num_cross_attn_layers"):
        cepe.attach_encoder(dec, num_cross_attn_layers=4)
    with pytest.raises(ValueError, match="init"):
        cepe.attach_encoder(dec, init="kaiming")
    with pytest.raises(ValueError, match="already has a CEPE encoder"):
        cepe.attach_encoder(cepe.attach_encoder(dec))
    other = save_model(build_hf_model(**{**DEC, "vocab_size": 90}), str(tmp_path / "v90"))
    with pytest.raises(ValueError, match="vocabulary"):
        cepe.attach_encoder(dec, encoder=other)
    with pytest.raises(ValueError, match="head_only"):
        dec.save(str(tmp_path / "x"), head_only=True)
