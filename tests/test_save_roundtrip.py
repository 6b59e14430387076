"""Saving and reloading: Model.save (full checkpoints and CEPE heads) and Trainer.save give back
exactly the logits, tokenizer, chat template and generation settings of the model saved, from
every source format (HF fp32/fp16/bf16/sharded, GGUF of every supported tensor type with its
interleaved q/k rows, CEPE models); bad head directories give clear errors; and forward(),
generate(), encode() and perplexity() after Trainer.step() run on the trained weights, also
when forward() kept a context from before the Trainer."""

from __future__ import annotations

import importlib
import json
import os
import shutil

import numpy as np
import pytest
from conftest import TEXT, build_hf_model, hf_logits, write_tokenizer

from cepe.testing.quant_ctypes import fp32_bf16_products, load_library
from cepe.testing.reference import make_reference

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
st_numpy = pytest.importorskip("safetensors.numpy")
st_torch = pytest.importorskip("safetensors.torch")

from test_gguf import (  # noqa: E402
    CHAT_TEMPLATE,
    TEXTS,
    gguf_hf_model,
    make_bpe_vocab,
    make_spm_vocab,
    write_gguf,
)

import cepe  # noqa: E402

pull = importlib.import_module("cepe.pull")
Q = gguf.GGMLQuantizationType
N_THREADS = 1  # every model of a comparison runs with the same threads
IDS = np.array([[5, 17, 90, 33, 61, 20, 7, 64, 88, 3, 44, 50, 11, 96, 42, 9]], dtype=np.int64)  # vocab 97
CHUNKS = np.array([[4, 8, 15, 16, 23, 42, 77, 91], [30, 31, 3, 70, 12, 55, 66, 9]], dtype=np.int64)  # (n_ctx, L)
GGUF_IDS = np.array([[5, 17, 200, 33, 91, 120, 7, 64, 250, 3, 44, 150, 11, 300, 42, 9]], dtype=np.int64)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "héllo wörld, the quick brown fox?"},
    {"role": "assistant", "content": "A fox."},
    {"role": "user", "content": "  and the lazy dog\n"},
]
SAVERS = ["Model.save", "Trainer.save"]


def load(path) -> cepe.Model:
    return cepe.load(path, n_threads=N_THREADS)


def save(model: cepe.Model, path, saver: str, **kw) -> str:
    """Saves with Model.save, or with a Trainer that took no step (its checkpoint loads as a model)."""
    if saver == "Model.save":
        return model.save(path, **kw)
    return cepe.Trainer(model, kw.get("trainable", "all"), total_steps=1).save(path)


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def edit_config(head_dir, **changes) -> None:
    path = os.path.join(head_dir, "config.json")
    cfg = read_json(path)
    cfg.update(changes)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)


def assert_same_logits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.array_equal(got, want), f"max |diff| {np.abs(got - want).max()}"


def assert_same_text(saved: cepe.Model, source: cepe.Model) -> None:
    """The reloaded tokenizer, chat template and special token ids are the source's."""
    a, b = source.tokenizer, saved.tokenizer
    assert a is not None and b is not None
    for text in [*TEXTS, TEXT]:
        assert b.encode(text) == a.encode(text), text
        assert b.encode(text, add_special_tokens=False) == a.encode(text, add_special_tokens=False), text
        assert b.decode(a.encode(text)) == a.decode(a.encode(text)), text
    assert a.chat_template and b.chat_template == a.chat_template
    for gen in (True, False):
        assert b.apply_chat_template(MESSAGES, add_generation_prompt=gen) == a.apply_chat_template(
            MESSAGES, add_generation_prompt=gen
        )
    assert (b.bos_token, b.eos_token, b.pad_token, b.unk_token) == (a.bos_token, a.eos_token, a.pad_token, a.unk_token)
    c, d = saved.config, source.config
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (d.bos_token_id, d.eos_token_id, d.pad_token_id)


def attach(decoder: cepe.Model, **kw) -> cepe.Model:
    """A CEPE head on `decoder` whose cross-attention changes the logits (o_proj drawn, not zero)."""
    return cepe.attach_encoder(decoder, encoder_layers=1, num_cross_attn_layers=1, init="normal", **kw)


# ------------------------------------------------------------------ sources


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """make(qtype, vocab="bpe"|"spm") -> a tiny llama GGUF file (test_gguf's writer), cached."""
    root = tmp_path_factory.mktemp("rt_gguf")
    vocabs: dict = {}
    models: dict = {}
    files: dict = {}

    def make(qtype: str = "F32", vocab: str = "bpe") -> str:
        if (qtype, vocab) not in files:
            if vocab not in vocabs:
                vocabs[vocab] = make_bpe_vocab() if vocab == "bpe" else make_spm_vocab()
                models[vocab] = gguf_hf_model(vocabs[vocab])
            path = str(root / f"tiny-{vocab}-{qtype}.gguf")
            files[qtype, vocab] = write_gguf(path, models[vocab], vocabs[vocab], Q[qtype])
        return files[qtype, vocab]

    return make


@pytest.fixture(scope="module")
def hf_text_dir(tiny, tmp_path_factory):
    """make(template_file) -> the tiny HF model with a tokenizer, a chat template (in
    tokenizer_config.json or chat_template.jinja) and a generation_config.json of its own."""
    made: dict = {}

    def make(template_file: str) -> str:
        if template_file in made:
            return made[template_file]
        d = tmp_path_factory.mktemp(f"rt_text_{template_file.replace('.', '_')}")
        for name in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(tiny[0], name), d / name)
        write_tokenizer(d, 97)
        template = (
            "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        )
        if template_file == "chat_template.jinja":
            (d / "chat_template.jinja").write_text(template, encoding="utf-8")
        else:
            conf = read_json(d / "tokenizer_config.json")
            conf["chat_template"] = template
            (d / "tokenizer_config.json").write_text(json.dumps(conf), encoding="utf-8")
        gen = {"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0, "max_new_tokens": 7, "do_sample": False}
        (d / "generation_config.json").write_text(json.dumps(gen), encoding="utf-8")
        made[template_file] = str(d)
        return made[template_file]

    return make


HF_SOURCES = {
    "fp32": dict(),
    "fp16": dict(dtype=torch.float16),
    "bf16": dict(dtype=torch.bfloat16),
    "sharded": dict(max_shard_size="20KB"),
    "tied": dict(tie_word_embeddings=True),
}


# ------------------------------------------------------------ round trips


@pytest.mark.parametrize("saver", SAVERS)
@pytest.mark.parametrize("source", sorted(HF_SOURCES))
def test_hf_checkpoint_reloads_to_identical_logits(source, saver, model_factory, tmp_path):
    path, _ = model_factory(f"rt_{source}", **HF_SOURCES[source])
    if source == "sharded":
        assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    m = load(path)
    saved = save(m, tmp_path / "saved", saver)
    assert "model.safetensors" in os.listdir(saved)
    assert read_json(os.path.join(saved, "config.json")).get("rope_layout", "half") == "half"
    r = load(saved)
    assert r.config.rope.layout == "half"
    # Trainer.save writes a bf16 model's fp32 masters: identical logits on the fp32 path, where
    # the bf16 weights meet unrounded activations as the fp32 ones do
    with fp32_bf16_products():
        assert_same_logits(r.forward(IDS), m.forward(IDS))
        assert np.array_equal(r.generate(IDS, 5, eos_token_id=[]), m.generate(IDS, 5, eos_token_id=[]))


@pytest.mark.parametrize("saver", SAVERS)
@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_gguf_reloads_to_identical_logits(qtype, saver, gguf_file, tmp_path):
    """GGUF q/k rows are interleaved: the saved config.json says so and the loader honours it
    (read as rotate-half, the same weights give other logits)."""
    m = load(gguf_file(qtype))
    assert m.config.rope.layout == "interleaved"
    saved = save(m, tmp_path / "saved", saver)
    # after saving: a Trainer training every tensor runs the model on float32 master copies of
    # the stored-format weights, and saves those (Model.save keeps the stored formats)
    want = m.forward(GGUF_IDS)
    assert read_json(os.path.join(saved, "config.json"))["rope_layout"] == "interleaved"
    r = load(saved)
    assert r.config.rope.layout == "interleaved"
    assert_same_logits(r.forward(GGUF_IDS), want)


@pytest.mark.parametrize("saver", SAVERS)
@pytest.mark.parametrize("vocab", ["bpe", "spm"])
def test_gguf_tokenizer_chat_template_and_token_ids_survive(vocab, saver, gguf_file, tmp_path):
    m = load(gguf_file("Q8_0", vocab))
    assert m.tokenizer.chat_template == CHAT_TEMPLATE  # the file's tokenizer.chat_template
    r = load(save(m, tmp_path / "saved", saver))
    assert_same_text(r, m)
    assert_same_logits(r.forward(GGUF_IDS), m.forward(GGUF_IDS))


@pytest.mark.parametrize("saver", SAVERS)
@pytest.mark.parametrize("template_file", ["tokenizer_config.json", "chat_template.jinja"])
def test_hf_tokenizer_chat_template_and_generation_config_survive(template_file, saver, hf_text_dir, tmp_path):
    src = hf_text_dir(template_file)
    m = load(src)
    assert m.config.eos_token_id == (2, 5)  # generation_config.json's, not config.json's
    saved = save(m, tmp_path / "saved", saver)
    r = load(saved)
    assert_same_text(r, m)
    assert read_json(os.path.join(saved, "generation_config.json")) == read_json(
        os.path.join(src, "generation_config.json")
    )
    assert_same_logits(r.forward(IDS), m.forward(IDS))
    # a head saved on this decoder takes the decoder's tokenizer and generation settings
    head = load(attach(m).save(tmp_path / "head"))
    assert_same_text(head, m)


class fp32_activations:
    """Many-row products of Q4_0 / Q4_1 / Q8_0 weights through the dequantized fp32 tiles rather
    than the int8 GEMM (AVX-512), which quantizes the activations: Trainer(m, "all") saves a
    quantized decoder widened to float32, whose reload equals the source exactly only where the
    source multiplies fp32 activations too (the widening is exact)."""

    def __enter__(self) -> None:
        self.lib = load_library()
        self.prev = self.lib.cepe_qmatmul_gemm_rows(1 << 30)

    def __exit__(self, *exc: object) -> None:
        self.lib.cepe_qmatmul_gemm_rows(self.prev)


def cepe_source(kind: str, tiny, gguf_file, tmp_path) -> tuple[cepe.Model, np.ndarray, np.ndarray]:
    """(a CEPE model, decoder ids, encoder chunks (n_ctx, L)) of one kind."""
    if kind == "official":  # a checkpoint in the official layout (own encoder vocabulary and width)
        return load(make_reference(seed=11).save(str(tmp_path / "official"))), IDS % 101, CHUNKS
    if kind == "gguf_decoder":  # interleaved decoder rows, rotate-half encoder rows
        return attach(load(gguf_file("Q8_0"))), GGUF_IDS, CHUNKS * 3
    return attach(load(tiny[0]), share_embeddings=kind == "shared_embeddings"), IDS, CHUNKS


CEPE_SAVES = {  # saver, its keyword arguments, whether it writes a head directory (for attach_encoder models)
    "Model.save": ("Model.save", {}, True),
    "Model.save(head_only=False)": ("Model.save", {"head_only": False}, False),
    "Trainer(all).save": ("Trainer.save", {"trainable": "all"}, False),
    "Trainer(cross_attn+encoder).save": ("Trainer.save", {"trainable": "cross_attn+encoder"}, True),
}


@pytest.mark.parametrize("how", list(CEPE_SAVES))
@pytest.mark.parametrize("kind", ["shared_embeddings", "own_embeddings", "gguf_decoder", "official"])
def test_cepe_model_reloads_to_identical_logits(kind, how, tiny, gguf_file, tmp_path):
    with fp32_activations():
        cepe_model_reloads(kind, how, tiny, gguf_file, tmp_path)


def cepe_model_reloads(kind, how, tiny, gguf_file, tmp_path) -> None:
    m, ids, chunks = cepe_source(kind, tiny, gguf_file, tmp_path)
    with_ctx = m.forward(ids, encoder_input_ids=chunks)
    without = m.forward(ids)
    assert np.abs(with_ctx - without).max() > 1e-2, "the cross-attention changes nothing: the test proves nothing"
    states = m.encode(chunks)
    saver, kw, head = CEPE_SAVES[how]
    head = head and kind != "official"
    saved = save(m, tmp_path / "saved", saver, **kw)
    cfg = read_json(os.path.join(saved, "config.json"))
    names = set(os.listdir(saved))
    if head:
        assert {"config.json", "head.safetensors"} <= names and "model.safetensors" not in names
        assert cfg["cepe_decoder"] == os.path.abspath(m.path)
    else:
        assert "model.safetensors" in names and "head.safetensors" not in names
        assert "cepe_decoder" not in cfg  # a full checkpoint stands alone
    r = load(saved)
    assert r.config.is_cepe and (r.config.encoder is not None)
    assert_same_logits(r.forward(ids, encoder_input_ids=chunks), with_ctx)
    assert_same_logits(r.forward(ids), without)
    assert_same_logits(r.encode(chunks), states)


@pytest.mark.slow
@pytest.mark.skipif(not pull.is_pulled(pull.DEFAULT_MODEL), reason="the default model is not pulled (run `cepe pull`)")
def test_real_model_trainer_save_reloads_exactly(tmp_path):
    """The reported bug: Trainer(m, "all").save of the pulled GGUF model reloaded with
    rotate-half RoPE (max |delta logit| 24.6)."""
    m = cepe.load(pull.DEFAULT_MODEL, n_threads=2)
    ids = np.array(m.tokenizer.encode(TEXT)[:32])
    assert len(ids) == 32
    with fp32_activations():
        want = m.forward(ids)
        saved = cepe.Trainer(m, "all", total_steps=1).save(tmp_path / "ckpt")
        assert read_json(os.path.join(saved, "config.json"))["rope_layout"] == "interleaved"
        r = cepe.load(saved, n_threads=2)
        assert_same_logits(r.forward(ids), want)
        assert_same_text(r, m)


# ------------------------------------------------------------ head directories


def test_head_directory_holds_only_the_head(tiny, tmp_path):
    m = attach(load(tiny[0]))
    d = m.save(tmp_path / "head")
    assert sorted(os.listdir(d)) == ["config.json", "head.safetensors"]
    cfg = read_json(os.path.join(d, "config.json"))
    assert cfg["cepe_decoder"] == os.path.abspath(tiny[0])
    assert cfg["encoder_shares_embeddings"] is True
    names = set(st_numpy.load_file(os.path.join(d, "head.safetensors")))
    layer = [
        f"{w}.weight"
        for w in (
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    cross = [f"model.layers.1.cross_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "layernorm")]
    assert names == {"encoder.norm.weight", *(f"encoder.layers.0.{w}" for w in layer), *cross}
    assert all(n.startswith("encoder.") or ".cross_attn." in n for n in names)  # no decoder weight, no embedding
    # with its own embedding table, the head carries it
    own = attach(load(tiny[0]), share_embeddings=False).save(tmp_path / "own")
    assert set(st_numpy.load_file(os.path.join(own, "head.safetensors"))) == names | {"encoder.embed_tokens.weight"}
    assert not read_json(os.path.join(own, "config.json")).get("encoder_shares_embeddings")


def bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (round to nearest even, as torch), back in float32."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).float().numpy()


def test_bfloat16_full_checkpoint_reloads_within_bf16_rounding(tiny, tmp_path):
    path, hf = tiny
    m = load(path)
    d = m.save(tmp_path / "bf16", dtype="bfloat16")
    stored = st_torch.load_file(os.path.join(d, "model.safetensors"))
    state = hf.state_dict()
    assert set(stored) == set(state)
    for name, t in stored.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, state[name].to(torch.bfloat16)), name
    with fp32_bf16_products():  # the weights' rounding alone (torch's oracle multiplies in fp32)
        got = load(d).forward(IDS)
    assert not np.array_equal(got, m.forward(IDS))  # rounded, not exact
    rounded = build_hf_model()  # the tiny model (seed 0) with its weights rounded to bf16
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            p.copy_(state[name].to(torch.bfloat16).float())
    np.testing.assert_allclose(got, hf_logits(rounded, IDS), atol=1e-4, rtol=0)


def test_bfloat16_head_reloads_within_bf16_rounding(tiny, tmp_path):
    m = attach(load(tiny[0]))
    exact = m.save(tmp_path / "fp32")
    d = m.save(tmp_path / "bf16", dtype="bfloat16")
    weights = st_numpy.load_file(os.path.join(exact, "head.safetensors"))
    stored = st_torch.load_file(os.path.join(d, "head.safetensors"))
    assert set(stored) == set(weights)
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    # the oracle: the fp32 head with its tensors rounded to bf16 by torch
    oracle = tmp_path / "oracle"
    shutil.copytree(exact, oracle)
    st_numpy.save_file({n: bf16(w) for n, w in weights.items()}, str(oracle / "head.safetensors"))
    got, want = load(d), load(oracle)
    with fp32_bf16_products():  # the bf16 head against its fp32 twin: the weights' rounding alone
        with_ctx = got.forward(IDS, encoder_input_ids=CHUNKS)
        assert_same_logits(with_ctx, want.forward(IDS, encoder_input_ids=CHUNKS))
    assert not np.array_equal(with_ctx, m.forward(IDS, encoder_input_ids=CHUNKS))
    assert_same_logits(got.forward(IDS), m.forward(IDS))  # the decoder is not in the head: untouched


def test_save_refuses_a_directory_holding_other_files(tiny, tmp_path):
    m = load(tiny[0])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="other files"):
            m.save(mine, overwrite=overwrite)
        assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    # a saved model directory that also holds a user's file is not replaced either
    saved = m.save(tmp_path / "saved")
    (tmp_path / "saved" / "notes.txt").write_text("mine too")
    with pytest.raises(FileExistsError, match="other files"):
        m.save(saved, overwrite=True)
    assert (tmp_path / "saved" / "notes.txt").read_text() == "mine too"
    assert_same_logits(load(saved).forward(IDS), m.forward(IDS))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileExistsError):
        m.save(afile, overwrite=True)
    assert afile.read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["afile", "mine", "saved"]  # no temporary directory left


def test_overwrite_replaces_a_saved_model(tiny, tmp_path):
    plain = load(tiny[0])
    head = attach(load(tiny[0]))
    out = tmp_path / "out"
    head.save(out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        plain.save(out)
    assert_same_logits(load(out).forward(IDS, encoder_input_ids=CHUNKS), head.forward(IDS, encoder_input_ids=CHUNKS))
    plain.save(out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    r = load(out)
    assert not r.config.is_cepe
    assert_same_logits(r.forward(IDS), plain.forward(IDS))
    head.save(out, overwrite=True)  # and back
    assert sorted(os.listdir(out)) == ["config.json", "head.safetensors"]
    assert_same_logits(load(out).forward(IDS, encoder_input_ids=CHUNKS), head.forward(IDS, encoder_input_ids=CHUNKS))
    empty = tmp_path / "empty"
    empty.mkdir()
    plain.save(empty)  # an empty directory is fine
    assert sorted(os.listdir(tmp_path)) == ["empty", "out"]


# ------------------------------------------------------------ bad head directories


@pytest.mark.parametrize("key, value", [("hidden_size", 64), ("vocab_size", 101), ("num_hidden_layers", 3)])
def test_head_on_a_decoder_of_another_shape(key, value, tiny, model_factory, tmp_path):
    d = attach(load(tiny[0])).save(tmp_path / "head")
    other, _ = model_factory(f"rt_other_{key}", **{key: value})
    edit_config(d, cepe_decoder=other)
    with pytest.raises(cepe.CheckpointError, match=rf"does not match its decoder.*{key} \d+ \(head\) vs {value}"):
        load(d)


@pytest.mark.parametrize("ref", ["absolute", "relative"])
def test_head_whose_decoder_is_missing(ref, tiny, tmp_path):
    d = attach(load(tiny[0])).save(tmp_path / "head")
    edit_config(d, cepe_decoder=str(tmp_path / "gone") if ref == "absolute" else "../gone")
    with pytest.raises(FileNotFoundError, match="decoder"):
        load(d)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"])
def test_head_with_a_tensor_that_is_not_part_of_a_head(name, tiny, tmp_path):
    d = attach(load(tiny[0])).save(tmp_path / "head")
    path = os.path.join(d, "head.safetensors")
    tensors = st_numpy.load_file(path)
    tensors[name] = np.zeros((48, 48) if "proj" in name else (97, 48), dtype=np.float32)
    st_numpy.save_file(tensors, path)
    with pytest.raises(cepe.CheckpointError, match=name.replace(".", r"\.")):
        load(d)


# ------------------------------------------------------------ inference after training


def infer(m: cepe.Model, ids: np.ndarray, chunks: np.ndarray) -> dict:
    """Every inference entry point. generate() first: its kept context (room for the prompt and
    the new tokens) then serves forward(ids) too."""
    return {
        "generate": m.generate(ids, 4, eos_token_id=[]),
        "forward": m.forward(ids),
        "forward_with_context": m.forward(ids, encoder_input_ids=chunks),
        "generate_with_context": m.generate(ids, 4, eos_token_id=[], encoder_input_ids=chunks),
        "encode": m.encode(chunks),
        "perplexity": m.perplexity(ids),
        "perplexity_with_context": m.perplexity(ids, encoder_input_ids=chunks),
    }


@pytest.mark.parametrize("kept", [True, False], ids=["kept_context", "nothing_kept"])
def test_inference_after_trainer_steps_uses_the_trained_weights(kept, tiny, tmp_path):
    m = attach(load(tiny[0]))
    if not kept:
        m.forward_keep_bytes = 0
    rng = np.random.default_rng(7)
    ids = rng.integers(3, 97, size=(1, 12))
    chunks = rng.integers(3, 97, size=(2, 8))
    before = infer(m, ids, chunks)  # leaves a kept context of the core as loaded (or none)
    assert (m._kept_ctx is not None) == kept
    trainer = cepe.Trainer(m, "all", lr=0.1, total_steps=3)
    batch = {"input_ids": rng.integers(3, 97, size=(2, 12)), "encoder_input_ids": rng.integers(3, 97, size=(2, 2, 8))}
    for _ in range(3):
        trainer.step(batch)
    after = infer(m, ids, chunks)
    fresh = infer(load(trainer.save(tmp_path / "ckpt")), ids, chunks)
    for key, value in after.items():
        if key.startswith("perplexity"):
            assert np.isfinite(value) and value != pytest.approx(before[key], rel=1e-3), key
            assert value == pytest.approx(fresh[key], rel=1e-6, abs=0), key
        else:
            assert np.isfinite(value).all(), key
            assert not np.array_equal(value, before[key]), f"{key} still gives the weights from before training"
            assert np.array_equal(value, fresh[key]), f"{key} differs from the saved model's"


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    ],
)
def test_rope_scaling_override_is_saved(tiny, tmp_path, scaling):
    """A model loaded with rope_scaling= runs with it; its saved copy reloads to the same logits without it."""
    path, _ = tiny
    m = cepe.load(path, rope_scaling=scaling)
    ids = np.arange(3, 90)[None]
    want = m.forward(ids)
    assert np.abs(want - cepe.load(path).forward(ids)).max() > 1e-3  # the override matters
    back = cepe.load(m.save(str(tmp_path / "s")))
    assert back.config.rope == m.config.rope
    np.testing.assert_array_equal(back.forward(ids), want)
