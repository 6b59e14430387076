"""GGUF files: tiny random llamas written with the gguf package in every
supported tensor type; our logits against transformers loading the same file
(and, unquantized, against the HF model it was written from); the tokenizer
from GGUF metadata against transformers'; bad files give clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import build_hf_model, hf_logits

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import cepe  # noqa: E402
from cepe import CheckpointError  # noqa: E402
from cepe.gguf_io import GGUFFile, hf_config, is_gguf, read_config  # noqa: E402
from cepe.tokenizer import Tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS, KV_HEADS, HIDDEN, FFN, LAYERS = 4, 2, 64, 256, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello world, hello there! Numbers 12345 and 3.14. "
    "héllo wörld naïve café. def f(x):\n    return x * 2\n\n  indented   spaces\ttabs\n"
) * 20
TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld — naïve café, 你好 🙂 Ünïcödé",
    "a   b\t\tc\n\n\nd    ",
    "  leading spaces",
    "trailing spaces   ",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "x<|endoftext|>y <think>z</think>",
    "numbers 1234567 3.14159 -42",
    "",
    " ",
]


# ------------------------------------------------------------------ building


@pytest.fixture(scope="module")
def bpe_vocab():
    return make_bpe_vocab()


def make_bpe_vocab() -> dict:
    """A tiny byte-level BPE (tokens, merges, token types) trained here."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    tk = Backend(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([CORPUS], trainer)
    model = json.loads(tk.to_str())["model"]
    tokens = [""] * len(model["vocab"])
    for t, i in model["vocab"].items():
        tokens[i] = t
    merges = [" ".join(m) for m in model["merges"]]
    types = [3, 3, 3, 4] + [1] * (len(tokens) - 4)  # CONTROL x3, USER_DEFINED, NORMAL
    return {"model": "gpt2", "pre": "default", "tokens": tokens, "merges": merges, "types": types, "scores": None}


@pytest.fixture(scope="module")
def spm_vocab():
    return make_spm_vocab()


def make_spm_vocab() -> dict:
    """A tiny SentencePiece-style vocabulary (▁ words, <0xXX> byte pieces, scores, no merges)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    tk = Backend(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False)
    tk.train_from_iterator([CORPUS], trainer)
    vocab = json.loads(tk.to_str())["model"]["vocab"]
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)  # UNKNOWN, CONTROL, BYTE, NORMAL
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return {"model": "llama", "pre": None, "tokens": tokens, "merges": None, "types": types, "scores": scores}


def to_gguf_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: HF rotate-half q/k rows -> Meta's interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_tensors(hf) -> dict[str, np.ndarray]:
    out = {}
    for name, p in hf.state_dict().items():
        w = p.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            if not hf.config.tie_word_embeddings:
                out["output.weight"] = w
        else:
            parts = name.split(".")  # model.layers.{i}.{module}.{proj}.weight
            module = ".".join(parts[3:-1])
            if module == "self_attn.q_proj":
                w = to_gguf_qk(w, HEADS)
            elif module == "self_attn.k_proj":
                w = to_gguf_qk(w, KV_HEADS)
            out[f"blk.{parts[2]}.{GGUF_NAMES[module]}.weight"] = w
    return out


def random_kquant(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random K-quant blocks with sane scales (gguf cannot quantize to these)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (f16) lead the block
        raw[:, 0:2] = rng.uniform(2e-4, 1e-3, (len(raw), 1)).astype(np.float16).view(np.uint8)
        raw[:, 2:4] = rng.uniform(1e-4, 5e-4, (len(raw), 1)).astype(np.float16).view(np.uint8)
    elif qtype == Q.Q6_K:  # d (f16) ends the block
        raw[:, -2:] = rng.uniform(1e-5, 4e-5, (len(raw), 1)).astype(np.float16).view(np.uint8)
    else:  # Q5_K and others: make the f16 scales finite
        raw[:, 0:4] = np.array([1e-3, 1e-4], dtype=np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def encode_tensor(name: str, w: np.ndarray, qtype, rng) -> tuple[np.ndarray, object]:
    if w.ndim == 1 or qtype == Q.F32:
        return w.astype(np.float32), None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    if qtype in (Q.Q4_K, Q.Q6_K, Q.Q5_K):
        if name.endswith("ffn_down.weight"):  # the only weight whose rows hold 256-value blocks
            return random_kquant(*w.shape, qtype, rng), qtype
        qtype = Q.Q8_0
    return gguf.quants.quantize(w, qtype), qtype


def write_gguf(
    path: str,
    hf,
    vocab: dict,
    qtype=Q.F32,
    arch: str = "llama",
    extra_tensors: dict | None = None,
    seed: int = 0,
) -> str:
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    cfg = hf.config
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model(vocab["model"])
    if vocab["pre"]:
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab["merges"] is not None:
        w.add_token_merges(vocab["merges"])
    if vocab["scores"] is not None:
        w.add_token_scores(vocab["scores"])
    if vocab["model"] == "gpt2":
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
    else:
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)
    tensors = gguf_tensors(hf)
    tensors.update(extra_tensors or {})
    for name, arr in tensors.items():
        data, raw_dtype = encode_tensor(name, arr, qtype, rng)
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_hf_model(vocab: dict, **overrides):
    """A tiny HF llama of this file's shape over vocab's tokens (what the GGUF tests write)."""
    shape = dict(
        vocab_size=len(vocab["tokens"]),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    return build_hf_model(**{**shape, **overrides})


@pytest.fixture(scope="module")
def hf_model(bpe_vocab):
    return gguf_hf_model(bpe_vocab)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def f32_file(gguf_dir, hf_model, bpe_vocab):
    return write_gguf(str(gguf_dir / "tiny-f32.gguf"), hf_model, bpe_vocab)


def transformers_from_gguf(path: str):
    return transformers.LlamaForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


IDS = np.array([[5, 17, 200, 33, 91, 120, 7, 64, 250, 3, 44, 150, 11, 300, 42, 9]], dtype=np.int64)


# ----------------------------------------------------------------- logits


def test_f32_matches_the_hf_model_it_was_written_from(f32_file, hf_model):
    """Interleaved GGUF q/k rows + layout "interleaved" = HF's rotate-half model."""
    model = cepe.load(f32_file, n_threads=1)
    assert model.config.rope.layout == "interleaved"
    ours = model.forward(IDS)
    assert np.abs(ours - hf_logits(hf_model, IDS)).max() <= 1e-3


def test_the_layout_matters(f32_file, hf_model):
    """Run as rotate-half, the same weights give other logits: the layout is tested."""
    gf = GGUFFile(f32_file)
    cfg = read_config(gf)
    half = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, layout="half"))
    import cepe_c

    core = cepe_c.Model(half.core_kwargs(), None, n_threads=1)
    from cepe.gguf_io import hf_name

    for name in gf.tensors:
        core.bind(hf_name(name), gf.get(name))
    core.finalize()
    wrong = cepe.Model(core, half, n_threads=1, path=f32_file, device="cpu").forward(IDS)
    assert np.abs(wrong - hf_logits(hf_model, IDS)).max() > 1e-2


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_logits_match_transformers(qtype, gguf_dir, hf_model, bpe_vocab, f32_file):
    path = f32_file
    if qtype != "F32":
        path = write_gguf(str(gguf_dir / f"tiny-{qtype}.gguf"), hf_model, bpe_vocab, Q[qtype])
    gf = GGUFFile(path)
    if qtype != "F32":
        assert qtype in {t.type_name for t in gf.tensors.values()}
    ours = cepe.load(path, n_threads=1, dtype="float32").forward(IDS)
    ref = hf_logits(transformers_from_gguf(path), IDS)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-3


def test_tied_embeddings(gguf_dir, bpe_vocab):
    hf = gguf_hf_model(bpe_vocab, num_hidden_layers=1, tie_word_embeddings=True, seed=3)
    path = write_gguf(str(gguf_dir / "tied.gguf"), hf, bpe_vocab, Q.Q8_0)
    assert "output.weight" not in GGUFFile(path).tensors
    model = cepe.load(path, n_threads=1, dtype="float32")
    assert model.config.tie_word_embeddings
    ref = hf_logits(transformers_from_gguf(path), IDS)
    assert np.abs(model.forward(IDS) - ref).max() <= 1e-3


def test_llama3_rope_freqs(gguf_dir, bpe_vocab):
    """Llama 3.1 RoPE scaling is stored as a rope_freqs tensor (llama.cpp's converter)."""
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    hf = gguf_hf_model(bpe_vocab, num_hidden_layers=1, rope_scaling=scaling, rope_theta=500000.0, seed=4)
    # convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors): per-pair frequency divisors
    dim = HIDDEN // HEADS
    freqs = 1.0 / (500000.0 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wl, high_wl = 64 / 1.0, 64 / 4.0
    factors = []
    for f in freqs:
        wl = 2 * np.pi / f
        if wl < high_wl:
            factors.append(1.0)
        elif wl > low_wl:
            factors.append(8.0)
        else:
            smooth = (64 / wl - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    rope_freqs = np.array(factors, dtype=np.float32)
    assert len(set(factors)) > 2  # all three regimes present
    path = write_gguf(str(gguf_dir / "llama3.gguf"), hf, bpe_vocab, extra_tensors={"rope_freqs.weight": rope_freqs})
    model = cepe.load(path, n_threads=1)
    ids = np.arange(3, 3 + 120, dtype=np.int64)[None] % 380
    assert np.abs(model.forward(ids) - hf_logits(hf, ids)).max() <= 1e-3


def test_gguf_without_extension_and_config(f32_file, tmp_path, hf_model):
    dst = str(tmp_path / "model.bin")
    shutil.copy(f32_file, dst)
    assert is_gguf(dst)
    model = cepe.load(dst, n_threads=1)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        HIDDEN,
        LAYERS,
        HEADS,
        KV_HEADS,
    )
    assert cfg.intermediate_size == FFN and cfg.max_position_embeddings == 256
    assert cfg.vocab_size == hf_model.config.vocab_size
    assert abs(cfg.rms_norm_eps - 1e-5) < 1e-9
    assert cfg.bos_token_id == 1 and cfg.eos_token_id == (2,) and cfg.pad_token_id == 0
    assert np.abs(model.forward(IDS) - hf_logits(hf_model, IDS)).max() <= 1e-3


def test_our_parser_agrees_with_gguf_reader(f32_file):
    ours = GGUFFile(f32_file)
    reader = gguf.GGUFReader(f32_file)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        theirs = field.contents()
        mine = ours.metadata[key]
        if isinstance(theirs, float):
            assert mine == pytest.approx(theirs)
        else:
            assert mine == theirs, key
    for t in reader.tensors:
        assert np.array_equal(ours.get(t.name), gguf.quants.dequantize(t.data, t.tensor_type)), t.name
        assert ours.get(t.name).shape == tuple(t.data.shape)  # (out, in): GGUF's dims reversed


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_fast_dequantizers_are_bit_exact(qtype, tmp_path):
    from cepe.gguf_io import _BLOCK_BYTES, _FAST

    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(257, _BLOCK_BYTES[qtype]), dtype=np.uint8)
    raw[:, 0:2] = rng.uniform(-0.1, 0.1, (257, 1)).astype(np.float16).view(np.uint8)
    if qtype == "Q4_1":
        raw[:, 2:4] = rng.uniform(-0.1, 0.1, (257, 1)).astype(np.float16).view(np.uint8)
    ours = _FAST[qtype](raw)
    ref = gguf.quants.dequantize(raw.reshape(1, -1), Q[qtype]).reshape(257, 32)
    assert ours.dtype == np.float32 and np.array_equal(ours, ref)


# -------------------------------------------------------------- tokenizer


def hf_tokenizer(path: str):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def check_tokenizer(ours: Tokenizer, theirs) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id,
        theirs.eos_token_id,
        theirs.pad_token_id,
    )


def test_byte_level_bpe_tokenizer_matches_transformers(f32_file):
    model = cepe.load(f32_file, n_threads=1)
    tok = model.tokenizer
    assert isinstance(tok, Tokenizer)
    theirs = hf_tokenizer(f32_file)
    check_tokenizer(tok, theirs)
    assert json.loads(tok.backend.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    assert tok.encode("<|im_start|>")[-1] == 1 and tok.encode("<think>") == [3]  # whole, not in pieces
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.chat_template == CHAT_TEMPLATE
    for gen in (True, False):
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == theirs.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen
        )


def test_loaded_tokenizer_is_built_when_first_used_from_a_copy(f32_file, tmp_path):
    """cepe.load leaves a GGUF's tokenizer unbuilt until model.tokenizer is read; it is then the
    one Tokenizer.from_gguf builds from the file, even after the file is gone."""
    path = str(tmp_path / "copy.gguf")
    shutil.copyfile(f32_file, path)
    model = cepe.load(path, n_threads=1)
    assert model._tokenizer is None and model._make_tokenizer is not None
    os.remove(path)  # the model owns what it needs
    tok = model.tokenizer
    assert isinstance(tok, Tokenizer) and model._make_tokenizer is None and model.tokenizer is tok
    ref = Tokenizer.from_gguf(f32_file)
    assert json.loads(tok.backend.to_str()) == json.loads(ref.backend.to_str())
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.chat_template) == (
        ref.bos_token,
        ref.eos_token,
        ref.pad_token,
        ref.chat_template,
    )
    assert tok.chat_template_source == f"chat template of {path} (tokenizer.chat_template)"
    sibling = cepe.load(f32_file, n_threads=1)
    sibling.tokenizer = None  # an assignment replaces the pending one
    assert sibling.tokenizer is None


def test_loading_a_gguf_imports_no_tokenizer_library(f32_file):
    """The tokenizers library (and tqdm, and the gguf package beyond its constants) stay unimported
    by a load that never reads the tokenizer."""
    code = (
        "import sys, cepe\n"
        f"m = cepe.load({f32_file!r}, n_threads=1)\n"
        "m.forward([[1, 2, 3]])\n"
        "print(sorted(k for k in ('tokenizers', 'tqdm', 'jinja2', 'gguf') if k in sys.modules))\n"
        "m.tokenizer.encode('hi')\n"
        "print('tokenizers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout + out.stderr


def test_bad_tokenizer_metadata_fails_on_first_use(gguf_dir, hf_model, bpe_vocab):
    """A vocabulary the tokenizer library refuses: the weights load, and reading the tokenizer
    raises CheckpointError naming the file."""
    vocab = {**bpe_vocab, "merges": ["not-a-merge"]}
    path = write_gguf(str(gguf_dir / "bad-merges.gguf"), hf_model, vocab)
    model = cepe.load(path, n_threads=1)
    with pytest.raises(CheckpointError, match=r"bad-merges\.gguf.*malformed merge"):
        _ = model.tokenizer
    with pytest.raises(CheckpointError, match="malformed merge"):
        Tokenizer.from_gguf(path)


def test_sentencepiece_tokenizer_matches_transformers(gguf_dir, spm_vocab):
    hf = gguf_hf_model(spm_vocab, num_hidden_layers=1, seed=5)
    path = write_gguf(str(gguf_dir / "spm.gguf"), hf, spm_vocab, Q.F16)
    tok = Tokenizer.from_gguf(path)
    theirs = hf_tokenizer(path)
    check_tokenizer(tok, theirs)
    assert tok.encode("Hello")[0] == 1  # llama vocabularies add BOS by default
    assert json.loads(tok.backend.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    assert Tokenizer.from_gguf(gguf.GGUFReader(path)).encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_tokenizer_from_dir(f32_file, tmp_path):
    theirs = hf_tokenizer(f32_file)
    theirs.save_pretrained(str(tmp_path))
    tok = Tokenizer.from_dir(str(tmp_path))
    check_tokenizer(tok, theirs)
    assert tok.chat_template == CHAT_TEMPLATE
    assert Tokenizer.from_dir(str(tmp_path / "nothing-here")) is None


def test_hf_dir_without_tokenizer_loads_with_none(tiny):
    assert cepe.load(tiny[0], n_threads=1).tokenizer is None


def test_tokenizer_input_errors(f32_file):
    tok = Tokenizer.from_gguf(f32_file)
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([10**6])
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


# ------------------------------------------------------------- bad files


def test_truncated_files(f32_file, tmp_path):
    data = open(f32_file, "rb").read()
    for n in (0, 3, 10, 30, 200, 2000, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="truncated|not a GGUF|corrupt"):
            cepe.load(str(p), n_threads=1)


def test_corrupted_files(f32_file, tmp_path):
    data = bytearray(open(f32_file, "rb").read())
    p = tmp_path / "bad.gguf"

    bad = bytearray(data)
    bad[0:4] = b"GGUG"
    p.write_bytes(bad)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        cepe.load(str(p))

    bad = bytearray(data)  # an absurd tensor type id after blk.0.attn_q.weight's dims
    at = bad.index(b"blk.0.attn_q.weight") + len(b"blk.0.attn_q.weight")
    bad[at + 4 + 16 : at + 4 + 16 + 4] = (999).to_bytes(4, "little")
    p.write_bytes(bad)
    with pytest.raises(CheckpointError, match="unknown type id 999"):
        cepe.load(str(p))

    bad = bytearray(data)  # a string length far past the end of the file
    at = bad.index(b"general.architecture") - 8
    bad[at : at + 8] = (2**40).to_bytes(8, "little")
    p.write_bytes(bad)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        cepe.load(str(p))

    # Overwrite header bytes anywhere: a clean error, never a crash.
    header_end = data.index(b"blk.1.ffn_norm.weight") + 64
    rng = np.random.default_rng(0)
    for at in rng.integers(4, header_end, size=40):
        bad = bytearray(data)
        bad[at : at + 8] = b"\xff" * 8
        p.write_bytes(bad)
        try:
            cepe.load(str(p), n_threads=1)
        except (CheckpointError, cepe.ConfigError, NotImplementedError):
            pass


def test_unsupported_tensor_type(gguf_dir, hf_model, bpe_vocab):
    path = write_gguf(str(gguf_dir / "q5_0.gguf"), hf_model, bpe_vocab, Q.Q5_0)
    with pytest.raises(NotImplementedError, match="Q5_0"):
        cepe.load(path)


def test_unsupported_architecture(gguf_dir, hf_model, bpe_vocab):
    path = write_gguf(str(gguf_dir / "qwen.gguf"), hf_model, bpe_vocab, arch="qwen2")
    with pytest.raises(NotImplementedError, match="architecture 'qwen2'"):
        cepe.load(path)
    with pytest.raises(NotImplementedError, match="qwen2"):
        hf_config(GGUFFile(path))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        cepe.load(str(tmp_path / "absent.gguf"))
    d = tmp_path / "dir.gguf"
    d.mkdir()
    with pytest.raises((FileNotFoundError, CheckpointError)):
        cepe.load(str(d))
