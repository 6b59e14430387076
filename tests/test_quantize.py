"""cepe.quantize / `cepe quantize`: the GGUF file written from an HF directory, a GGUF file, a
CEPE head directory or an official CEPE checkpoint is read back by gguf's own reader (its
tensors within each format's bound of the source weights, derived below from the block
scales; its hyper-parameters, tokenizer and chat template those of the source), loads with
cepe and with transformers (the oracle) to the same logits, and stays close to the source
model's logits; bad arguments give clear errors and never touch an existing file."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import TEXT, hf_logits

from cepe.testing.quant_ctypes import load_library
from cepe.testing.reference import make_reference

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
st_numpy = pytest.importorskip("safetensors.numpy")

from test_gguf import (  # noqa: E402
    FFN,
    HIDDEN,
    TEXTS,
    gguf_hf_model,
    make_bpe_vocab,
    make_spm_vocab,
    to_gguf_qk,
    transformers_from_gguf,
    write_gguf,
)

import cepe  # noqa: E402
from cepe import CheckpointError  # noqa: E402
from cepe.cli import main as cli_main  # noqa: E402
from cepe.quantize import DECODER_FILE, quantize  # noqa: E402

Q = gguf.GGMLQuantizationType
TYPES = ["q8_0", "q4_0", "q4_1", "bf16", "f16", "f32"]
IDS = np.array([[5, 17, 200, 33, 91, 120, 7, 64, 250, 3, 44, 150, 11, 300, 42, 9]], dtype=np.int64)
CHUNKS = np.array([[4, 8, 15, 16, 23, 42, 77, 91], [30, 31, 3, 70, 12, 55, 66, 9]], dtype=np.int64)
MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "héllo, the quick fox?"}]
# mean |logit difference| to the source model, relative to the logits' spread (std), about twice
# what was measured (f32 4e-7, f16 9e-4, bf16 7e-3, q8_0 2e-2, q4_0 0.33, q4_1 0.29): the random
# decoder's weights (0.15) make each layer amplify its input's error, far more than a trained
# model's do, so the 4-bit formats move these logits a lot; the ordering of the formats and the
# transformers oracle on the same file are the sharper checks
LOGIT_TOL = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2, "q8_0": 5e-2, "q4_0": 0.7, "q4_1": 0.6}


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).mean() / want.std())


def load(path) -> cepe.Model:
    return cepe.load(path, n_threads=1)


# ------------------------------------------------------------------ sources


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{kind: path}: a GGUF file (interleaved q/k rows, byte-level BPE and SentencePiece
    vocabularies) and HF directories (rotate-half rows, tokenizer.json, chat template) of one
    random llama whose rows split into 32-value blocks."""
    root = tmp_path_factory.mktemp("qz_src")
    out = {}
    for vocab_kind, vocab in (("bpe", make_bpe_vocab()), ("spm", make_spm_vocab())):
        hf = gguf_hf_model(vocab)
        g = write_gguf(str(root / f"src-{vocab_kind}.gguf"), hf, vocab)
        out[f"gguf-{vocab_kind}"] = g
        # the same model as an HF directory, with the tokenizer files cepe writes for it
        d = root / f"hf-{vocab_kind}"
        hf.save_pretrained(str(d))
        tok_dir = load(g).save(root / f"tok-{vocab_kind}")
        for name in os.listdir(tok_dir):
            if name.startswith("tokenizer"):
                shutil.copy(os.path.join(tok_dir, name), d / name)
        out[f"hf-{vocab_kind}"] = str(d)
        out[f"hf-{vocab_kind}-model"] = hf
    return out


def source_weights(path: str) -> dict[str, np.ndarray]:
    """The source's weights by GGUF name, in GGUF's interleaved q/k order, read without cepe."""
    if path.endswith(".gguf"):
        r = gguf.GGUFReader(path)
        return {
            t.name: np.array(t.data, np.float32).reshape(tuple(reversed([int(n) for n in t.shape]))) for t in r.tensors
        }
    from test_gguf import GGUF_NAMES

    cfg = json.load(open(os.path.join(path, "config.json")))
    out = {}
    for name, w in st_numpy.load_file(os.path.join(path, "model.safetensors")).items():
        w = w.astype(np.float32)
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            out["output.weight"] = w
        else:
            parts = name.split(".")
            module = ".".join(parts[3:-1])
            if module == "self_attn.q_proj":
                w = to_gguf_qk(w, cfg["num_attention_heads"])
            elif module == "self_attn.k_proj":
                w = to_gguf_qk(w, cfg["num_key_value_heads"])
            out[f"blk.{parts[2]}.{GGUF_NAMES[module]}.weight"] = w
    return out


def block_bound(w: np.ndarray, qtype: str) -> np.ndarray:
    """The largest |dequantized - source| each value may have, from its format (gguf.quants'
    rounding) and its 32-value block's scale, stored as float16 (relative error <= 2^-11)."""
    f16 = 2.0**-11
    if qtype == "f32":
        return np.zeros_like(w)
    if qtype == "f16":
        return np.abs(w) * f16 + 2.0**-24
    if qtype == "bf16":
        return np.abs(w) * 2.0**-8
    b = w.reshape(-1, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    if qtype == "q8_0":  # d = amax / 127, |x - q d| <= d / 2, plus |q| <= 127 times d's rounding
        d = amax / 127
        bound = d * (0.5 + 127 * f16)
    elif qtype == "q4_0":  # d = -(signed max) / 8: values on the other side clamp at 7|d| (error <= |d|)
        d = amax / 8
        bound = d * (1.0 + 8 * f16)
    else:  # q4_1: d = (max - min) / 15, m = min, both float16
        lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
        d = (hi - lo) / 15
        bound = d * (0.5 + 15 * f16) + np.abs(lo) * f16
    return np.broadcast_to(bound * (1 + 1e-5) + 1e-7, b.shape).reshape(w.shape)


@pytest.fixture(scope="module")
def written(sources, tmp_path_factory):
    """make(kind, qtype) -> the GGUF file quantize() wrote from sources[kind], cached."""
    root = tmp_path_factory.mktemp("qz_out")
    cache: dict = {}

    def make(kind: str, qtype: str) -> str:
        if (kind, qtype) not in cache:
            r = quantize(sources[kind], root / f"{kind}-{qtype}.gguf", qtype)
            assert r.head is None and r.fallback == () and r.type == qtype
            cache[kind, qtype] = r.decoder
        return cache[kind, qtype]

    return make


# ------------------------------------------------------------------ the file


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("kind", ["gguf-bpe", "hf-bpe"])
def test_gguf_reader_dequantizes_within_the_format_bound(kind, qtype, sources, written):
    path = written(kind, qtype)
    reader = gguf.GGUFReader(path)
    want = source_weights(sources[kind])
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    for name, t in got.items():
        w = want[name]
        if w.ndim == 1:
            assert t.tensor_type == Q.F32
        else:
            assert t.tensor_type == Q[qtype.upper()], name
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        err = np.abs(deq.astype(np.float64) - w)
        bound = block_bound(w, qtype if w.ndim == 2 else "f32")
        assert (err <= bound).all(), f"{name}: {int((err > bound).sum())} values past the bound"
        if qtype not in ("f32",) and w.ndim == 2:
            assert err.max() > 0  # the file holds the format, not the source's floats


@pytest.mark.parametrize("kind", ["gguf-bpe", "hf-bpe", "gguf-spm", "hf-spm"])
def test_metadata_round_trips(kind, sources, written):
    """Hyper-parameters, the vocabulary and the chat template: through gguf's reader and through cepe."""
    path = written(kind, "q8_0")
    src, got = load(sources[kind]), load(path)
    r = gguf.GGUFReader(path)
    field = {k: f.contents() for k, f in r.fields.items()}
    c = src.config
    assert field["general.architecture"] == "llama"
    assert field["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert field["llama.embedding_length"] == c.hidden_size
    assert field["llama.block_count"] == c.num_hidden_layers
    assert field["llama.feed_forward_length"] == c.intermediate_size
    assert field["llama.attention.head_count"] == c.num_attention_heads
    assert field["llama.attention.head_count_kv"] == c.num_key_value_heads
    assert field["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert field["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert field["llama.context_length"] == c.max_position_embeddings
    assert got.config.rope.layout == "interleaved"
    assert (got.config.bos_token_id, got.config.eos_token_id) == (c.bos_token_id, c.eos_token_id)
    if kind.startswith("gguf"):  # copied as the source holds them
        s = {k: f.contents() for k, f in gguf.GGUFReader(sources[kind]).fields.items()}
        for key in [k for k in s if k.startswith("tokenizer.")]:
            assert field[key] == s[key], key
    a, b = src.tokenizer, got.tokenizer
    assert b is not None
    for text in [*TEXTS, TEXT]:
        assert b.encode(text) == a.encode(text), text
        assert b.decode(a.encode(text)) == a.decode(a.encode(text)), text
    assert a.chat_template and b.chat_template == a.chat_template
    assert b.apply_chat_template(MESSAGES, add_generation_prompt=True) == a.apply_chat_template(
        MESSAGES, add_generation_prompt=True
    )
    assert (b.bos_token, b.eos_token, b.pad_token, b.unk_token) == (a.bos_token, a.eos_token, a.pad_token, a.unk_token)


def test_rotate_half_rows_are_interleaved(sources, written):
    """An HF source's q/k rows are permuted as llama.cpp's converter does: f32 gives the HF model's logits."""
    hf = sources["hf-bpe-model"]
    got = load(written("hf-bpe", "f32")).forward(IDS)
    assert np.abs(got - hf_logits(hf, IDS)).max() <= 1e-3
    assert np.abs(got - load(sources["hf-bpe"]).forward(IDS)).max() <= 1e-4


def test_formats_order_by_precision(sources, written):
    want = load(sources["hf-bpe"]).forward(IDS)
    err = {q: rel_err(load(written("hf-bpe", q)).forward(IDS), want) for q in TYPES}
    assert err["f32"] < err["f16"] < err["bf16"] < err["q8_0"] < min(err["q4_0"], err["q4_1"])


@pytest.mark.parametrize("qtype", TYPES)
def test_logits_close_to_the_source_and_equal_to_transformers(qtype, sources, written):
    path = written("hf-bpe", qtype)
    want = load(sources["hf-bpe"]).forward(IDS)
    got = load(path).forward(IDS)
    assert rel_err(got, want) <= LOGIT_TOL[qtype]
    if qtype != "f32":  # and the format did change something
        assert np.abs(got - want).max() > 0
    if qtype in ("q8_0", "f16", "q4_0"):  # the oracle reads the same file (gguf's dequantization, torch's math)
        # with fp32 activations: Q4_0's int8 GEMM (AVX-512) quantizes them, as decoding does
        lib = load_library()
        prev = lib.cepe_qmatmul_gemm_rows(1 << 30)
        try:
            exact = load(path).forward(IDS)
        finally:
            lib.cepe_qmatmul_gemm_rows(prev)
        assert np.abs(exact - hf_logits(transformers_from_gguf(path), IDS)).max() <= 1e-3


def test_written_file_has_the_usual_permissions(written):
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(written("gguf-bpe", "q8_0")).st_mode & 0o777 == 0o666 & ~umask


def test_requantizing_a_quantized_file(sources, written, tmp_path):
    """A quantized GGUF is a source too: q8_0 -> q4_0 stays close to the original."""
    q8 = written("gguf-bpe", "q8_0")
    r = quantize(q8, tmp_path / "q4.gguf", "q4_0")
    want = load(sources["gguf-bpe"]).forward(IDS)
    got = load(r.decoder).forward(IDS)
    assert rel_err(got, want) <= LOGIT_TOL["q4_0"] + LOGIT_TOL["q8_0"]


# ------------------------------------------------------------------ CEPE


@pytest.fixture(scope="module")
def cepe_sources(sources, tmp_path_factory):
    """{kind: (path, model)}: an official CEPE checkpoint (one directory, rotate-half rows) and a
    head directory on a GGUF decoder."""
    root = tmp_path_factory.mktemp("qz_cepe")
    official = make_reference(seed=11, hidden_size=HIDDEN, intermediate_size=FFN, vocab_size=97)
    official_dir = official.save(str(root / "official"))
    head_dir = cepe.attach_encoder(
        load(sources["gguf-bpe"]), encoder_layers=1, num_cross_attn_layers=1, init="normal"
    ).save(root / "head")
    return {"official": official_dir, "head": str(head_dir)}


@pytest.mark.parametrize("kind", ["official", "head"])
def test_cepe_model_becomes_decoder_plus_head(kind, cepe_sources, tmp_path):
    src_path = cepe_sources[kind]
    src = load(src_path)
    r = quantize(src_path, tmp_path / "out", "q8_0")
    assert r.head == str(tmp_path / "out") and r.decoder == os.path.join(r.head, DECODER_FILE)
    assert sorted(os.listdir(r.head)) == sorted(["config.json", "head.safetensors", DECODER_FILE])
    from safetensors.torch import load_file

    from cepe.head import is_head_tensor

    head = load_file(os.path.join(r.head, "head.safetensors"))
    src_head = {n: w for n, w in load_file(_head_file(src_path)).items() if is_head_tensor(n)}
    assert set(head) == set(src_head) and head
    for n, w in head.items():  # bf16: the source's float32 rounded to nearest (torch's cast, the oracle)
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, src_head[n].float().to(torch.bfloat16)), n
    got = load(r.head)
    assert got.config.is_cepe
    ids, chunks = IDS % 97, CHUNKS
    want_ctx = src.forward(ids, encoder_input_ids=chunks)
    got_ctx = got.forward(ids, encoder_input_ids=chunks)
    assert rel_err(got_ctx, want_ctx) <= LOGIT_TOL["q8_0"]
    assert np.abs(got_ctx - got.forward(ids)).max() > 1e-3  # the head is in use


def _head_file(path: str) -> str:
    head = os.path.join(path, "head.safetensors")
    return head if os.path.exists(head) else os.path.join(path, "model.safetensors")


# ------------------------------------------------------------------ bad input


def test_unknown_type(sources, tmp_path):
    with pytest.raises(ValueError, match="--type must be one of"):
        quantize(sources["gguf-bpe"], tmp_path / "x.gguf", "q5_k")
    assert not os.listdir(tmp_path)


def test_existing_dst_is_never_overwritten_without_force(sources, written, tmp_path):
    dst = tmp_path / "mine.gguf"
    shutil.copy(written("gguf-bpe", "q4_0"), dst)
    before = dst.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        quantize(sources["gguf-bpe"], dst, "q8_0")
    assert dst.read_bytes() == before
    quantize(sources["gguf-bpe"], dst, "q8_0", force=True)  # a GGUF file is replaced with force
    assert Q.Q8_0 in {t.tensor_type for t in gguf.GGUFReader(dst).tensors}


@pytest.mark.parametrize("what", ["text file", "text file named .gguf", "directory", "symlink"])
def test_force_never_replaces_a_non_gguf(what, sources, tmp_path):
    dst = tmp_path / ("precious.gguf" if what.endswith(".gguf") else "precious")
    if what.startswith("text file"):
        dst.write_text("my notes")
    elif what == "directory":
        dst.mkdir()
        (dst / "notes.txt").write_text("my notes")
    else:
        (tmp_path / "target.gguf").write_text("GGUF? no")
        dst.symlink_to(tmp_path / "target.gguf")
    with pytest.raises(FileExistsError, match="DST"):
        quantize(sources["gguf-bpe"], dst, "q8_0", force=True)
    assert (dst.read_text() if what != "directory" else (dst / "notes.txt").read_text()) in ("my notes", "GGUF? no")


def test_cepe_dst_directory_with_other_files_is_refused(cepe_sources, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a quantized CEPE directory"):
        quantize(cepe_sources["head"], dst, "q8_0", force=True)
    assert os.listdir(dst) == ["notes.txt"]


def test_unreadable_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="SRC"):
        quantize(tmp_path / "missing", tmp_path / "x.gguf", "q8_0")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(CheckpointError, match="bad.gguf"):
        quantize(bad, tmp_path / "x.gguf", "q8_0")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        quantize(empty, tmp_path / "x.gguf", "q8_0")
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf", "empty"]  # nothing written, no temporary left


def test_dst_is_the_source(sources, written, tmp_path):
    src = tmp_path / "s.gguf"
    shutil.copy(written("gguf-bpe", "f32"), src)
    before = src.read_bytes()
    with pytest.raises(ValueError, match="the source itself"):
        quantize(src, src, "q8_0", force=True)
    assert src.read_bytes() == before


def test_a_failure_mid_write_leaves_nothing(sources, tmp_path):
    """RoPE scaling with no GGUF form: refused before DST exists, no temporary file left."""
    d = tmp_path / "scaled"
    shutil.copytree(sources["hf-bpe"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="dynamic"):
        quantize(d, tmp_path / "out.gguf", "q8_0")
    assert sorted(os.listdir(tmp_path)) == ["scaled"]


def test_cli(sources, tmp_path, capsys):
    dst = tmp_path / "c.gguf"
    assert cli_main(["quantize", sources["gguf-bpe"], str(dst), "--type", "q4_1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decoder"] == str(dst) and out["type"] == "q4_1" and out["bytes"] == os.path.getsize(dst)
    assert cli_main(["quantize", sources["gguf-bpe"], str(dst), "--type", "q8_0"]) == 2
    assert "exists: pass --force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["quantize", sources["gguf-bpe"], str(dst), "--type", "q3_k"])
    assert "invalid choice" in capsys.readouterr().err
