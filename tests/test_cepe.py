"""CEPE against a PyTorch oracle written from the spec, and its invariants."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import edit_json

import cepe
from cepe import ConfigError
from cepe.testing.reference import make_reference

TOL = 1e-4

VARIANTS = {
    "all_layers_gqa": dict(),
    "last_two_layers": dict(n_cross=2),
    "mha_one_layer": dict(n_cross=1, num_key_value_heads=4),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def make(name: str):
        if name not in cache:
            ref = make_reference(seed=len(cache) + 1, **VARIANTS[name])
            cache[name] = (ref.save(str(tmp_path_factory.mktemp(name))), ref)
        return cache[name]

    return make


def chunks_and_mask(rng, B=2, n_ctx=3, L=7, vocab=103, pad="left"):
    ids = rng.integers(3, vocab, size=(B, n_ctx, L))
    mask = np.ones((B, n_ctx, L), dtype=np.int64)
    if pad in ("left", "mixed"):
        mask[0, 1, :3] = 0  # left-padded chunk: real tokens start at slot 3
    if pad in ("right", "mixed"):
        mask[1, 0, 5:] = 0  # right-padded chunk
    if pad == "mixed":
        mask[1, 2, :] = 0  # a fully padded chunk
    if pad == "empty_row":
        mask[1] = 0  # row 1 has no context at all
    ids = np.where(mask == 1, ids, 2)  # pad = EOS, as the spec says
    return ids, mask


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("pad", ["none", "left", "right", "mixed", "empty_row"])
def test_logits_match_oracle(built, name, pad):
    path, ref = built(name)
    model = cepe.load(path)
    rng = np.random.default_rng(0)
    ctx, cmask = chunks_and_mask(rng, pad=pad)
    ids = rng.integers(3, 101, size=(2, 9))
    E = ref.encode(ctx, cmask)
    want = ref.forward(ids, E, cmask).numpy()
    got = model.forward(ids, encoder_input_ids=ctx, encoder_attention_mask=cmask)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # the context matters: without it the logits differ
    assert np.abs(got - model.forward(ids)).max() > 1e-2


@pytest.mark.parametrize("pad", ["none", "mixed"])
def test_encode_matches_oracle(built, pad):
    path, ref = built("all_layers_gqa")
    model = cepe.load(path)
    ctx, cmask = chunks_and_mask(np.random.default_rng(1), pad=pad)
    want = ref.encode(ctx, cmask).numpy()
    got = model.encode(ctx, cmask)
    assert got.shape == (2, 3 * 7, 40) and got.dtype == np.float32
    real = cmask.reshape(2, -1) == 1  # padded positions are never used
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)
    assert np.isfinite(got).all()
    one = model.encode(ctx[0], cmask[0])  # (n_ctx, L) -> (N, d_enc)
    np.testing.assert_allclose(one, got[0], atol=1e-5, rtol=0)  # another GEMM shape, other rounding


def test_single_chunk_and_one_dim_input(built):
    path, ref = built("last_two_layers")
    model = cepe.load(path)
    rng = np.random.default_rng(2)
    ctx = rng.integers(3, 103, size=(1, 11))
    ids = rng.integers(3, 101, size=(6,))
    want = ref.forward(ids[None], ref.encode(ctx[None])).numpy()[0]
    np.testing.assert_allclose(model.forward(ids, encoder_input_ids=ctx), want, atol=TOL, rtol=0)


def test_greedy_generation_matches_oracle(built):
    path, ref = built("all_layers_gqa")
    model = cepe.load(path)
    rng = np.random.default_rng(3)
    ctx, cmask = chunks_and_mask(rng, B=1, pad="left")
    prompt = rng.integers(3, 101, size=(1, 5))
    want = ref.greedy(prompt, 32, ref.encode(ctx, cmask), cmask)
    got = model.generate(prompt, 32, eos_token_id=[], encoder_input_ids=ctx, encoder_attention_mask=cmask)
    np.testing.assert_array_equal(got, want)
    assert len(set(got[0].tolist())) > 1


def test_fully_masked_context_is_no_context(built):
    """A row whose encoder_attention_mask is all 0 has no context: exactly the
    base decoder's logits, in the engine and in the oracle alike."""
    path, ref = built("all_layers_gqa")
    model = cepe.load(path)
    rng = np.random.default_rng(8)
    ctx, _ = chunks_and_mask(rng)
    none = np.zeros_like(ctx)
    ids = rng.integers(3, 101, size=(2, 8))
    base = model.forward(ids)
    np.testing.assert_array_equal(model.forward(ids, encoder_input_ids=ctx, encoder_attention_mask=none), base)
    E = model.encode(ctx)
    flat = none.reshape(2, -1)
    for keep in (True, False):
        got = model.forward(ids, encoder_hidden_states=E, encoder_attention_mask=flat, keep_cross_kv=keep)
        np.testing.assert_array_equal(got, base)
    np.testing.assert_array_equal(
        model.generate(ids, 6, eos_token_id=[], encoder_hidden_states=E, encoder_attention_mask=flat),
        model.generate(ids, 6, eos_token_id=[]),
    )
    want = ref.forward(ids, ref.encode(ctx, none), none)
    torch.testing.assert_close(want, ref.forward(ids), rtol=0, atol=0)
    np.testing.assert_allclose(base, want.numpy(), atol=TOL, rtol=0)


def test_permuting_chunks_leaves_logits_unchanged(built):
    path, _ = built("all_layers_gqa")
    model = cepe.load(path)
    ctx, cmask = chunks_and_mask(np.random.default_rng(4), pad="mixed")
    ids = np.random.default_rng(5).integers(3, 101, size=(2, 8))
    base = model.forward(ids, encoder_input_ids=ctx, encoder_attention_mask=cmask)
    perm = [2, 0, 1]
    moved = model.forward(ids, encoder_input_ids=ctx[:, perm], encoder_attention_mask=cmask[:, perm])
    np.testing.assert_allclose(moved, base, atol=1e-5, rtol=0)


def test_no_context_is_the_base_decoder(built, tmp_path):
    path, ref = built("all_layers_gqa")
    model = cepe.load(path)
    ids = np.random.default_rng(6).integers(3, 101, size=(2, 10))
    np.testing.assert_allclose(
        model.forward(ids), ref.lm(torch.as_tensor(ids)).logits.detach().numpy(), atol=TOL, rtol=0
    )
    # and the decoder saved alone, as a plain LlamaForCausalLM, gives the same logits
    ref.lm.save_pretrained(str(tmp_path / "base"))
    np.testing.assert_allclose(cepe.load(str(tmp_path / "base")).forward(ids), model.forward(ids), atol=1e-6, rtol=0)


def test_hidden_states_equal_ids(built):
    path, _ = built("last_two_layers")
    model = cepe.load(path)
    ctx, cmask = chunks_and_mask(np.random.default_rng(7), pad="mixed")
    ids = np.random.default_rng(8).integers(3, 101, size=(2, 6))
    E = model.encode(ctx, cmask)
    a = model.forward(ids, encoder_input_ids=ctx, encoder_attention_mask=cmask)
    b = model.forward(ids, encoder_hidden_states=E, encoder_attention_mask=cmask)
    c = model.forward(ids, encoder_hidden_states=E, encoder_attention_mask=cmask.reshape(2, -1))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_kept_and_recomputed_cross_kv_agree(built):
    path, _ = built("all_layers_gqa")
    model = cepe.load(path)
    rng = np.random.default_rng(9)
    ctx, cmask = chunks_and_mask(rng, pad="mixed")
    prompt = rng.integers(3, 101, size=(2, 4))
    kw = dict(eos_token_id=[], encoder_input_ids=ctx, encoder_attention_mask=cmask)
    kept = model.generate(prompt, 24, keep_cross_kv=True, **kw)
    lean = model.generate(prompt, 24, keep_cross_kv=False, **kw)
    np.testing.assert_array_equal(kept, lean)
    f_kept = model.forward(prompt, keep_cross_kv=True, encoder_input_ids=ctx, encoder_attention_mask=cmask)
    f_lean = model.forward(prompt, keep_cross_kv=False, encoder_input_ids=ctx, encoder_attention_mask=cmask)
    np.testing.assert_allclose(f_kept, f_lean, atol=1e-6, rtol=0)
    # the budget decides when not told
    model.cross_kv_budget_bytes = 0
    np.testing.assert_array_equal(model.generate(prompt, 24, **kw), kept)


def test_cache_keeps_context_between_calls(built):
    path, _ = built("all_layers_gqa")
    model = cepe.load(path)
    rng = np.random.default_rng(10)
    ctx, cmask = chunks_and_mask(rng, B=1)
    ids = rng.integers(3, 101, size=(1, 12))
    full = model.forward(ids, encoder_input_ids=ctx, encoder_attention_mask=cmask)
    cache = model.create_cache(1, 12)
    parts = [model.forward(ids[:, :5], cache=cache, encoder_input_ids=ctx, encoder_attention_mask=cmask)]
    parts += [model.forward(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["all_layers_gqa", "last_two_layers"])
def test_last_logits_with_context_match_oracle_and_continue(built, name):
    """logits="last" runs the last layer (cross-attention included) for each
    row's last token only; its logits and the cache it leaves are the full
    path's."""
    path, ref = built(name)
    model = cepe.load(path)
    rng = np.random.default_rng(12)
    ctx, cmask = chunks_and_mask(rng, pad="mixed")
    ids = rng.integers(3, 101, size=(2, 9))
    want = ref.forward(ids, ref.encode(ctx, cmask), cmask).numpy()
    kw = dict(encoder_input_ids=ctx, encoder_attention_mask=cmask)
    last = model.forward(ids, logits="last", **kw)
    np.testing.assert_allclose(last, want[:, -1], atol=TOL, rtol=0)
    cache = model.create_cache(2, 12)
    model.forward(ids[:, :6], cache=cache, logits="last", **kw)
    rest = np.concatenate([model.forward(ids[:, t : t + 1], cache=cache) for t in range(6, 9)], axis=1)
    np.testing.assert_allclose(rest, want[:, 6:], atol=TOL, rtol=0)


def test_perplexity_protocol(built):
    path, ref = built("all_layers_gqa")
    model = cepe.load(path)
    rng = np.random.default_rng(11)
    ctx, cmask = chunks_and_mask(rng, B=1)
    ids = rng.integers(3, 101, size=(1, 300))  # crosses the 256-token logits slices
    logits = ref.forward(ids, ref.encode(ctx, cmask), cmask).double()
    lp = torch.log_softmax(logits[0, :-1], -1).gather(1, torch.as_tensor(ids[0, 1:])[:, None])[:, 0]
    for window in (None, 256, 1):
        w = 299 if window is None else window
        want = float(torch.exp(-lp[-w:].mean()))
        got = model.perplexity(ids, eval_window=window, encoder_input_ids=ctx, encoder_attention_mask=cmask)
        assert got == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match="eval_window must be an int in"):
        model.perplexity(ids, eval_window=300)


def test_layer_major_prefill_matches_oracle_and_kept_kv(built):
    """A recomputed context with more tokens than one 512-row chunk runs layer by
    layer over the whole call (its cross K/V projected once per layer): the same
    logits as the oracle and as the chunk-by-chunk run with kept K/V."""
    path, ref = built("all_layers_gqa")
    model = cepe.load(path)
    rng = np.random.default_rng(21)
    ctx, cmask = chunks_and_mask(rng, pad="mixed")
    ids = rng.integers(3, 101, size=(2, 600))  # 3 chunks of 256 rows per batch row
    amask = np.ones_like(ids)
    amask[1, :37] = 0  # a left-padded row
    kw = dict(attention_mask=amask, encoder_input_ids=ctx, encoder_attention_mask=cmask)
    lean = model.forward(ids, keep_cross_kv=False, **kw)
    kept = model.forward(ids, keep_cross_kv=True, **kw)
    np.testing.assert_allclose(lean, kept, atol=1e-5, rtol=0)
    want = ref.forward(ids, ref.encode(ctx, cmask), cmask, attention_mask=amask).numpy()
    real = amask[..., None] == 1
    np.testing.assert_allclose(np.where(real, lean, 0), np.where(real, want, 0), atol=TOL, rtol=0)
    gen = dict(eos_token_id=[], **kw)
    np.testing.assert_array_equal(
        model.generate(ids, 6, keep_cross_kv=False, **gen), model.generate(ids, 6, keep_cross_kv=True, **gen)
    )


def test_long_perplexity_recomputed_kv_matches_oracle(built):
    path, ref = built("last_two_layers")
    model = cepe.load(path)
    rng = np.random.default_rng(22)
    ctx, cmask = chunks_and_mask(rng, B=1, pad="left")
    ids = rng.integers(3, 101, size=(1, 1100))  # 3 chunks of 512 rows
    logits = ref.forward(ids, ref.encode(ctx, cmask), cmask).double()
    lp = torch.log_softmax(logits[0, :-1], -1).gather(1, torch.as_tensor(ids[0, 1:])[:, None])[:, 0]
    for window in (1099, 700, 3):
        want = float(torch.exp(-lp[-window:].mean()))
        for keep in (False, True):
            got = model.perplexity(
                ids, eval_window=window, encoder_input_ids=ctx, encoder_attention_mask=cmask, keep_cross_kv=keep
            )
            assert got == pytest.approx(want, rel=1e-4), (window, keep)


def test_forward_nll_scores_only_targets(built):
    """The core's scoring call: -log p(target) where a target is given, 0 at -100,
    the same numbers as log_softmax of forward()'s logits; bad targets are refused."""
    path, _ = built("all_layers_gqa")
    model = cepe.load(path)
    rng = np.random.default_rng(23)
    ids = rng.integers(3, 101, size=(2, 150)).astype(np.int32)
    targets = np.where(rng.random(ids.shape) < 0.5, rng.integers(0, 101, size=ids.shape), -100).astype(np.int32)
    logits = model.forward(ids).astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.maximum(targets, 0)[..., None], -1)[..., 0]
    want = np.where(targets == -100, 0.0, lse - picked)
    cache = model.create_cache(2, 150)
    got = cache._ctx.forward_nll(ids, None, None, targets)
    assert got.shape == (2, 150) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    assert cache._ctx.progress() == (3, 3)  # 3 layers x 1 chunk of layer passes
    fresh = model.create_cache(2, 150)
    bad = targets.copy()
    bad[1, 4] = 101
    with pytest.raises(ValueError, match=r"target id 101 at \(row 1, position 4\) is out of range \[0, 101\)"):
        fresh._ctx.forward_nll(ids, None, None, bad)
    assert len(fresh) == 0  # nothing was appended
    with pytest.raises(ValueError, match="targets must have the shape of input_ids"):
        fresh._ctx.forward_nll(ids, None, None, np.ascontiguousarray(targets[:, :5]))
    with pytest.raises(TypeError, match="targets must have dtype int32"):
        fresh._ctx.forward_nll(ids, None, None, targets.astype(np.int64))


def test_context_argument_errors(built, tiny):
    path, _ = built("all_layers_gqa")
    model = cepe.load(path)
    ids = np.array([[3, 4, 5]])
    ctx = np.full((1, 2, 4), 5)
    with pytest.raises(ValueError, match="either encoder_input_ids or encoder_hidden_states"):
        model.forward(ids, encoder_input_ids=ctx, encoder_hidden_states=np.zeros((1, 8, 40), np.float32))
    with pytest.raises(ValueError, match="encoder_input_ids has batch size 1, input_ids has 2"):
        model.forward(np.array([[3], [4]]), encoder_input_ids=ctx)
    with pytest.raises(ValueError, match=r"outside the encoder vocabulary \[0, 103\)"):
        model.forward(ids, encoder_input_ids=np.full((1, 2, 4), 103))
    with pytest.raises(ValueError, match=r"encoder_attention_mask has shape \(1, 2, 3\)"):
        model.forward(ids, encoder_input_ids=ctx, encoder_attention_mask=np.ones((1, 2, 3)))
    with pytest.raises(ValueError, match=r"encoder_hidden_states has shape \(1, 8, 39\)"):
        model.forward(ids, encoder_hidden_states=np.zeros((1, 8, 39), np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.forward(ids, encoder_hidden_states=np.full((1, 8, 40), np.nan, np.float32))
    with pytest.raises(ValueError, match="encoder_input_ids must be"):
        model.encode(np.zeros((1, 1, 1, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="encoder_attention_mask given without"):
        model.forward(ids, encoder_attention_mask=np.ones((1, 2, 4)))
    plain = cepe.load(tiny[0])
    with pytest.raises(ValueError, match="no cross-attention layers"):
        plain.forward(ids, encoder_input_ids=ctx)
    with pytest.raises(ValueError, match="no CEPE encoder"):
        plain.encode(ctx)


def edit_config(path, fn):
    edit_json(os.path.join(path, "config.json"), fn)


@pytest.mark.parametrize(
    "edit, exc, match",
    [
        (lambda c: c.update(num_cross_attn_hidden_states=3), NotImplementedError, "num_cross_attn_hidden_states=3"),
        (lambda c: c.update(num_cross_attn_layers=9), ConfigError, r"num_cross_attn_layers \(9\) exceeds"),
        (lambda c: c.pop("encoder_config"), ConfigError, "'encoder_config' is missing"),
        (lambda c: c.update(encoder_hidden_size=64), ConfigError, r"encoder_hidden_size \(64\) differs"),
        (
            lambda c: c["encoder_config"].pop("hidden_size"),
            ConfigError,
            "encoder_config.missing required key 'hidden_size'",
        ),
        (lambda c: c.update(encoder_is_model=True), NotImplementedError, "encoder_is_model"),
        (lambda c: c.update(encode_mode="with_query-8"), NotImplementedError, "encode_mode 'with_query-8'"),
        (lambda c: c.update(num_cross_attn_layers=2), Exception, "unexpected tensor model.layers.0.cross_attn"),
    ],
)
def test_cepe_config_errors(built, tmp_path, edit, exc, match):
    import shutil

    src, _ = built("all_layers_gqa")
    p = str(tmp_path / "m")
    shutil.copytree(src, p)
    edit_config(p, edit)
    with pytest.raises(exc, match=match):
        cepe.load(p)


def test_official_layout_names(built):
    from cepe.safetensors_io import Checkpoint

    path, _ = built("last_two_layers")
    names = set(Checkpoint(path).names())
    assert "model.layers.2.cross_attn.layernorm.weight" in names
    assert "model.layers.0.cross_attn.q_proj.weight" not in names
    assert {"encoder.embed_tokens.weight", "encoder.norm.weight", "encoder.layers.1.mlp.down_proj.weight"} <= names


def test_convert_official_bin_shards(built, tmp_path):
    """pytorch_model-0000k-of-0000n.bin shards (as the released CEPE models ship)
    -> safetensors that load to the same logits."""
    path, ref = built("last_two_layers")
    src = tmp_path / "bin"
    src.mkdir()
    sd = ref.official_state_dict()
    names = sorted(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for k, part in enumerate(halves, start=1):
        fname = f"pytorch_model-{k:05d}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, src / fname)
        weight_map.update({n: fname for n in part})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps(ref.official_config(), default=str))
    from cepe.cli import main

    assert main(["convert", str(src), "--out", str(tmp_path / "st")]) == 0
    assert (tmp_path / "st" / "model.safetensors.index.json").exists()
    ids = np.random.default_rng(12).integers(3, 101, size=(1, 7))
    ctx = np.random.default_rng(13).integers(3, 103, size=(1, 2, 5))
    a = cepe.load(str(tmp_path / "st")).forward(ids, encoder_input_ids=ctx)
    b = cepe.load(path).forward(ids, encoder_input_ids=ctx)
    np.testing.assert_array_equal(a, b)
    # in place, next to the .bin files
    from cepe.convert import convert

    convert(str(src))
    np.testing.assert_array_equal(cepe.load(str(src)).forward(ids, encoder_input_ids=ctx), b)


def test_convert_errors(tmp_path, monkeypatch):
    import sys

    from cepe import CheckpointError
    from cepe.convert import convert

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no pytorch_model.bin"):
        convert(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read"):
        convert(str(bad))
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(RuntimeError, match="needs torch: pip install torch"):
        convert(str(bad))


def test_shared_context_mask_broadcasts(built):
    path, _ = built("all_layers_gqa")
    model = cepe.load(path)
    ctx, cmask = chunks_and_mask(np.random.default_rng(14), B=2, pad="none")
    cmask[:, 0, :2] = 0
    ids = np.random.default_rng(15).integers(3, 101, size=(2, 5))
    one = model.forward(ids, encoder_input_ids=ctx, encoder_attention_mask=cmask[0])  # one row's mask, all rows
    np.testing.assert_array_equal(one, model.forward(ids, encoder_input_ids=ctx, encoder_attention_mask=cmask))


def test_encoder_width_differs_from_decoder_without_cross_layers(built, tmp_path):
    """do_cross_attention with num_cross_attn_layers 0: encode() still sizes its
    output by the encoder's width (a past heap overflow)."""
    import shutil

    src, _ = built("all_layers_gqa")
    p = str(tmp_path / "m")
    shutil.copytree(src, p)
    from safetensors.numpy import load_file, save_file

    t = load_file(os.path.join(p, "model.safetensors"))
    save_file({k: v for k, v in t.items() if ".cross_attn." not in k}, os.path.join(p, "model.safetensors"))
    edit_config(p, lambda c: c.update(num_cross_attn_layers=0))
    model = cepe.load(p)
    out = model.encode(np.full((4, 16), 5))
    assert out.shape == (64, 40) and np.isfinite(out).all()


@pytest.mark.parametrize("keep", [True, False])
def test_context_encoded_in_the_core_equals_passed_states(built, keep):
    """encoder_input_ids are encoded inside the core, where the decoder reads
    them; the logits equal those of the same states passed in from encode()."""
    path, _ = built("last_two_layers")
    model = cepe.load(path)
    rng = np.random.default_rng(11)
    ctx, cmask = chunks_and_mask(rng, pad="mixed")
    ids = rng.integers(3, 101, size=(2, 6))
    states = model.encode(ctx, cmask)
    flat_mask = cmask.reshape(2, -1)
    want = model.forward(ids, keep_cross_kv=keep, encoder_hidden_states=states, encoder_attention_mask=flat_mask)
    got = model.forward(ids, keep_cross_kv=keep, encoder_input_ids=ctx, encoder_attention_mask=cmask)
    np.testing.assert_array_equal(got, want)


def test_encode_context_checks_its_arguments(built):
    import cepe_c

    path, _ = built("last_two_layers")
    model = cepe.load(path)
    ctx = cepe_c.Context(model._core, 2, 16)
    ids = np.full((2, 3, 4), 5, dtype=np.int32)
    with pytest.raises(ValueError, match="batch size 1, the request has 2"):
        ctx.encode_context(ids[:1], None)
    with pytest.raises(ValueError, match="at least one chunk"):
        ctx.encode_context(ids[:, :0], None)
    with pytest.raises(ValueError, match="shape of encoder_input_ids"):
        ctx.encode_context(ids, np.ones((2, 3, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="out of range"):
        ctx.encode_context(np.full((2, 3, 4), 10**6, dtype=np.int32), None)
    with pytest.raises(TypeError, match="encoder_input_ids"):
        ctx.encode_context(ids.astype(np.float32), None)
    ctx.encode_context(ids, None)
    assert ctx.context_length == 12
