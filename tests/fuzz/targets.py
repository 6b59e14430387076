"""Fuzz targets for everything that consumes outside data. Each target takes
bytes and must either succeed or raise one of the clear exception types the
API documents; anything else (another exception type, a crash) is a bug.

Run one with atheris (coverage-guided, bounded):
    python tests/fuzz/run.py config -max_total_time=60 tests/fuzz/corpus/config
The corpus and any crash reproducers are replayed as regression tests by
tests/test_fuzz_regressions.py (no atheris needed)."""

from __future__ import annotations

import json
import os
import struct
import tempfile
import warnings
from typing import Any

import numpy as np

EXPECTED = (ValueError, TypeError, KeyError, NotImplementedError, MemoryError, OSError, RuntimeError)


class Bytes:
    """A tiny stand-in for atheris.FuzzedDataProvider (same idea: consume the
    input piece by piece), so targets replay without atheris."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def int(self, lo: int, hi: int) -> int:
        raw = int.from_bytes(self.take(4).ljust(4, b"\0"), "little")
        return lo + raw % (hi - lo + 1)

    def rest(self) -> bytes:
        return self.take(len(self.data))


# ---------------------------------------------------------------- config.json

_BASE_CONFIG = {
    "model_type": "llama",
    "vocab_size": 11,
    "hidden_size": 8,
    "intermediate_size": 12,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 64,
}
_KEYS = list(_BASE_CONFIG) + [
    "head_dim",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "tie_word_embeddings",
    "sliding_window",
    "eos_token_id",
    "bos_token_id",
    "pad_token_id",
    "hidden_act",
    "do_cross_attention",
    "num_cross_attn_layers",
    "encoder_config",
    "encoder_hidden_size",
    "num_cross_attn_hidden_states",
    "original_max_position_embeddings",
]
_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    3,
    7,
    8,
    64,
    2**31,
    2**63,
    1e-5,
    -1.0,
    float("nan"),
    float("inf"),
    0.5,
    "",
    "llama",
    "silu",
    "yarn",
    "linear",
    "dynamic",
    "llama3",
    "longrope",
    [],
    [1, 2],
    {},
    {"rope_type": "linear"},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16},
    {"factor": "x"},
]


def fuzz_config(data: bytes) -> None:
    """Random edits of a valid config (keys, odd values, nested rope and encoder
    blocks), or raw JSON text; parse it and build the core model."""
    import cepe_c
    from cepe.config import parse_config

    b = Bytes(data)
    if b.int(0, 3) == 0:
        try:
            cfg = json.loads(b.rest().decode("utf-8", "replace"))
        except ValueError:
            return
    else:
        cfg = dict(_BASE_CONFIG)
        for _ in range(b.int(0, 6)):
            key = _KEYS[b.int(0, len(_KEYS) - 1)]
            value = _VALUES[b.int(0, len(_VALUES) - 1)]
            if key == "encoder_config" and b.int(0, 1):
                value = dict(_BASE_CONFIG, hidden_size=b.int(1, 16))
            cfg[key] = value
    try:
        parsed = parse_config(cfg)
        enc = parsed.encoder.core_kwargs() if parsed.encoder else None
        cepe_c.Model(parsed.core_kwargs(), enc, n_threads=1)
    except EXPECTED:
        pass


# ---------------------------------------------------------------- safetensors


def fuzz_safetensors(data: bytes) -> None:
    """A file whose header and body come from the input (often a mutated valid
    one): reading every tensor raises CheckpointError or works."""
    from cepe.errors import CheckpointError
    from cepe.safetensors_io import SafetensorsFile

    b = Bytes(data)
    mode = b.int(0, 2)
    if mode == 0:
        raw = b.rest()
    else:  # a valid-looking header with fuzzed fields
        n = b.int(0, 4)
        header: dict[str, Any] = {}
        for i in range(n):
            dtype = ["F32", "F16", "BF16", "F64", "I32", "XX", 5][b.int(0, 6)]
            shape = [b.int(0, 5) for _ in range(b.int(0, 3))]
            lo, hi = b.int(0, 64), b.int(0, 64)
            header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [lo, hi] if b.int(0, 5) else "x"}
        text = json.dumps(header).encode()
        declared = len(text) + (b.int(-4, 4) if mode == 2 else 0)
        raw = struct.pack("<Q", max(declared, 0)) + text + b.rest()
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        try:
            st = SafetensorsFile(path)
            for name in st.keys():
                arr = st.get(name)
                assert arr.dtype == np.float32
                float(np.nan_to_num(arr).sum())  # touch every byte of the mapping
        except CheckpointError:
            pass
    finally:
        os.unlink(path)


# ------------------------------------------------------------- API arguments

_MODEL: Any = None


def _tiny_model() -> Any:
    """A 1-layer random CEPE model built in memory (no files)."""
    global _MODEL
    if _MODEL is None:
        import cepe_c
        from cepe.config import parse_config
        from cepe.model import Model

        cfg = parse_config(
            dict(
                _BASE_CONFIG,
                do_cross_attention=True,
                num_cross_attn_layers=1,
                encoder_hidden_size=6,
                encoder_config=dict(_BASE_CONFIG, hidden_size=6, num_attention_heads=3, num_key_value_heads=3),
            )
        )
        core = cepe_c.Model(cfg.core_kwargs(), cfg.encoder.core_kwargs(), n_threads=1)
        rng = np.random.default_rng(0)
        shapes = {
            "model.embed_tokens.weight": (11, 8),
            "model.norm.weight": (8,),
            "lm_head.weight": (11, 8),
            "encoder.embed_tokens.weight": (11, 6),
            "encoder.norm.weight": (6,),
        }
        for prefix, d, qd, kvd in (("model.layers.0.", 8, 8, 4), ("encoder.layers.0.", 6, 6, 6)):
            shapes.update(
                {
                    prefix + "input_layernorm.weight": (d,),
                    prefix + "post_attention_layernorm.weight": (d,),
                    prefix + "self_attn.q_proj.weight": (qd, d),
                    prefix + "self_attn.k_proj.weight": (kvd, d),
                    prefix + "self_attn.v_proj.weight": (kvd, d),
                    prefix + "self_attn.o_proj.weight": (d, qd),
                    prefix + "mlp.gate_proj.weight": (12, d),
                    prefix + "mlp.up_proj.weight": (12, d),
                    prefix + "mlp.down_proj.weight": (d, 12),
                }
            )
        shapes.update(
            {
                "model.layers.0.cross_attn.layernorm.weight": (8,),
                "model.layers.0.cross_attn.q_proj.weight": (8, 8),
                "model.layers.0.cross_attn.k_proj.weight": (4, 6),
                "model.layers.0.cross_attn.v_proj.weight": (4, 6),
                "model.layers.0.cross_attn.o_proj.weight": (8, 8),
            }
        )
        for name, shape in shapes.items():
            core.bind(name, rng.standard_normal(shape).astype(np.float32))
        core.finalize()
        _MODEL = Model(core, cfg, n_threads=1, path="<fuzz>", device="cpu")
    return _MODEL


_DTYPES = [np.int64, np.int32, np.int8, np.uint8, np.float32, np.float64, np.bool_, ">i4", "<i2", np.uint64]


def _array(b: Bytes) -> Any:
    kind = b.int(0, 9)
    if kind == 0:
        return None
    if kind == 1:
        return [b.int(-3, 14) for _ in range(b.int(0, 5))]
    if kind == 2:
        return "text"
    ndim = b.int(0, 4)
    shape = tuple(b.int(0, 4) for _ in range(ndim))
    dtype = np.dtype(_DTYPES[b.int(0, len(_DTYPES) - 1)])
    n = int(np.prod(shape)) if shape else 1
    vals = np.array([b.int(-3, 14) for _ in range(n)]).reshape(shape)
    if dtype.kind == "f" and b.int(0, 4) == 0 and n:
        vals = vals.astype(np.float64)
        vals.flat[0] = [np.nan, np.inf, -np.inf, 1e30][b.int(0, 3)]
    arr = vals.astype(dtype)
    if ndim >= 1 and shape[-1] > 1 and b.int(0, 3) == 0:
        arr = arr[..., ::2]  # non-contiguous
    return arr


def fuzz_api(data: bytes) -> None:
    """Random shapes, dtypes, strides and values into the public Model API."""
    model = _tiny_model()
    b = Bytes(data)
    call = b.int(0, 3)
    args = [_array(b) for _ in range(3)]
    try:
        if call == 0:
            model.forward(args[0], args[1], position_ids=args[2] if b.int(0, 1) else None)
        elif call == 1:
            model.generate(
                args[0],
                b.int(-1, 4),
                attention_mask=args[1],
                temperature=[0.0, 0.7, 1e-40][b.int(0, 2)],
                top_k=b.int(0, 3),
                top_p=[1.0, 0.5, 1e-9][b.int(0, 2)],
                seed=b.int(0, 9),
            )
        elif call == 2:
            model.encode(args[0], args[1])
        else:
            model.forward(
                args[0],
                encoder_input_ids=args[1] if b.int(0, 1) else None,
                encoder_hidden_states=None if b.int(0, 1) else args[2],
                encoder_attention_mask=args[2] if b.int(0, 1) else None,
            )
    except EXPECTED:
        pass


# ---------------------------------------------------------------------- GGUF

_SEED_GGUF: str | None = None


def seed_gguf() -> str:
    """A valid tiny llama GGUF (F32 + Q8_0 tensors, a GPT-2 style vocabulary)."""
    global _SEED_GGUF
    if _SEED_GGUF is None:
        import gguf

        d, hidden, ff, heads, kv, vocab = 32, 32, 32, 2, 1, 16
        tokens = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(vocab - 4)] + ["ab"]
        fd, path = tempfile.mkstemp(suffix=".gguf")
        os.close(fd)
        w = gguf.GGUFWriter(path, "llama")
        w.add_context_length(64)
        w.add_embedding_length(hidden)
        w.add_block_count(1)
        w.add_feed_forward_length(ff)
        w.add_head_count(heads)
        w.add_head_count_kv(kv)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
        w.add_vocab_size(vocab)
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
        w.add_token_merges(["a b"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        rng = np.random.default_rng(0)
        hd = hidden // heads
        shapes = {
            "token_embd.weight": (vocab, d),
            "output_norm.weight": (d,),
            "blk.0.attn_norm.weight": (d,),
            "blk.0.ffn_norm.weight": (d,),
            "blk.0.attn_q.weight": (hidden, d),
            "blk.0.attn_k.weight": (kv * hd, d),
            "blk.0.attn_v.weight": (kv * hd, d),
            "blk.0.attn_output.weight": (d, hidden),
            "blk.0.ffn_gate.weight": (ff, d),
            "blk.0.ffn_up.weight": (ff, d),
            "blk.0.ffn_down.weight": (d, ff),
        }
        for name, shape in shapes.items():
            arr = rng.standard_normal(shape).astype(np.float32)
            if name == "blk.0.ffn_up.weight":  # one quantized tensor: its blocks get fuzzed too
                q8 = gguf.GGMLQuantizationType.Q8_0
                w.add_tensor(name, gguf.quants.quantize(arr, q8), raw_dtype=q8)
                continue
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        _SEED_GGUF = path
    return _SEED_GGUF


def fuzz_gguf(data: bytes) -> None:
    """A GGUF file: raw fuzz bytes, or the valid seed with bytes overwritten
    (mostly in the header and metadata); cepe.load raises cleanly or works."""
    import cepe

    b = Bytes(data)
    if b.int(0, 3) == 0:
        raw = b"GGUF" + b.rest()
    else:
        with open(seed_gguf(), "rb") as f:
            buf = bytearray(f.read())
        for _ in range(b.int(1, 6)):
            pos = b.int(0, len(buf) - 1) if b.int(0, 3) == 0 else b.int(0, min(len(buf), 1200) - 1)
            buf[pos : pos + 4] = b.take(4).ljust(4, b"\xff")[: max(0, len(buf) - pos)]
        if b.int(0, 5) == 0:
            buf = buf[: b.int(0, len(buf))]  # truncated
        raw = bytes(buf)
    fd, path = tempfile.mkstemp(suffix=".gguf")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        try:
            with warnings.catch_warnings():  # "no tokenizer: ..." for a fuzzed tokenizer type is expected
                warnings.simplefilter("ignore", UserWarning)
                m = cepe.load(path, n_threads=1)
            out = m.forward(np.array([1, 3, 4]))
            assert out.shape == (3, m.config.vocab_size)
        except EXPECTED:
            pass
    finally:
        os.unlink(path)


# ----------------------------------------------------------------- tokenizer

_TOKENIZER: Any = None


def fuzz_tokenizer(data: bytes) -> None:
    """Arbitrary text through a GGUF-built tokenizer: ids stay in the
    vocabulary and decoding never fails."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from cepe.tokenizer import Tokenizer

        _TOKENIZER = Tokenizer.from_gguf(seed_gguf())
    text = data.decode("utf-8", "replace")
    for special in (True, False):
        ids = _TOKENIZER.encode(text, add_special_tokens=special)
        assert all(0 <= i < _TOKENIZER.vocab_size for i in ids)
        _TOKENIZER.decode(ids)
        _TOKENIZER.decode(ids, skip_special_tokens=False)


TARGETS = {
    "config": fuzz_config,
    "safetensors": fuzz_safetensors,
    "api": fuzz_api,
    "gguf": fuzz_gguf,
    "tokenizer": fuzz_tokenizer,
}
