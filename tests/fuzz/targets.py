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
import shutil
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


_ST_DTYPES: list[Any] = ["F32", "F16", "BF16", "F64", "I32", "I64", "BOOL", "U8", "F8_E4M3", "XX", "f32", "", 5, None]
_ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I32": 4, "I64": 8, "BOOL": 1, "U8": 1, "F8_E4M3": 1}
_ST_DIMS: list[Any] = [0, 1, 2, 3, 5, 2**31, 2**32 + 1, 2**62, 2**63, 2**64, 10**30, -1, 2.0, True, "2", None, [2]]
_ST_METADATA: list[Any] = [{"format": "pt"}, {}, None, [], "x", {"a": 1}, 0]


def _st_header(b: Bytes) -> tuple[bytes, int]:
    """A safetensors header as JSON text (names may repeat: the text is written pair by pair)
    and the size of the data its offsets describe. Each entry is valid or broken in one of
    the ways a damaged or hostile header is: a repeated name, an unknown dtype, a huge,
    negative, non-integer or 65-dimensional shape, data_offsets that overlap, leave a gap,
    run backwards or past the end, or are not a pair of ints."""
    pairs: list[str] = []
    end = 0
    for i in range(b.int(0, 5)):
        name = f"t{b.int(0, 3) if b.int(0, 3) == 0 else i}"  # sometimes a name given twice
        dtype = _ST_DTYPES[b.int(0, len(_ST_DTYPES) - 1)] if b.int(0, 3) == 0 else ["F32", "F16", "BF16"][b.int(0, 2)]
        shape_kind = b.int(0, 7)
        if shape_kind == 0:
            shape: Any = [_ST_DIMS[b.int(0, len(_ST_DIMS) - 1)] for _ in range(b.int(1, 3))]
        elif shape_kind == 1:
            shape = [0] * b.int(63, 70) + ([2**63] if b.int(0, 1) else [])  # too many dimensions
        elif shape_kind == 2:
            shape = [0, 2**62, 2**62][: b.int(1, 3)]  # no bytes, but no array either
        elif shape_kind == 3:
            shape = ["x", {}, None, 1.5][b.int(0, 3)]
        else:
            shape = [b.int(0, 4) for _ in range(b.int(0, 3))]
        size = _ST_ITEMSIZE.get(dtype, 4) if isinstance(dtype, str) else 4
        if isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
            n = 1
            for d in shape:
                n *= d
            size *= n
        else:
            size *= 4
        size = min(size, 1 << 20)
        lo, hi = end, end + size
        edit = b.int(0, 9)
        if edit == 0:
            lo -= b.int(1, 8)  # overlaps the previous tensor (or starts before the data)
        elif edit == 1:
            lo += b.int(1, 8)  # leaves a gap
        elif edit == 2:
            lo, hi = hi, lo  # backwards
        elif edit == 3:
            hi += [1, 2**31, 2**64][b.int(0, 2)]
        end = max(end, hi) if edit != 2 else max(end, lo)
        offs: Any = [lo, hi]
        if b.int(0, 15) == 0:
            offs = [[lo], [lo, hi, hi], "0", [float(lo), hi], None, [True, hi]][b.int(0, 5)]
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offs}
        if b.int(0, 15) == 0:
            entry = [None, [], "x", {"dtype": "F32"}, {}][b.int(0, 4)]
        pairs.append(f"{json.dumps(name)}: {json.dumps(entry)}")
    if b.int(0, 3) == 0:
        pairs.insert(0, f'"__metadata__": {json.dumps(_ST_METADATA[b.int(0, len(_ST_METADATA) - 1)])}')
    text = "{" + ", ".join(pairs) + "}"
    if b.int(0, 7) == 0:
        text = ["[" + text + "]", text + " x", text[:-1], '"' + text + '"', "\ufeff" + text][b.int(0, 4)]
    raw = text.encode()
    return raw + b" " * b.int(0, 8), min(max(end, 0), 1 << 22)  # offsets past that: the data is short


def fuzz_safetensors(data: bytes) -> None:
    """A safetensors file whose header comes from the input: raw bytes, or a header JSON built
    from the input with repeated names, overlapping or gapped data_offsets, huge or malformed
    shapes and unknown dtypes; the data is as long as the offsets need, or a little off.
    SafetensorsFile either refuses it with a CheckpointError naming the file, or every tensor
    reads back as float32 of its declared shape (or is refused, naming it)."""
    from cepe.errors import CheckpointError
    from cepe.safetensors_io import SafetensorsFile

    b = Bytes(data)
    mode = b.int(0, 3)
    if mode == 0:
        raw = b.rest()
    else:
        header, need = _st_header(b)
        declared = len(header) + ({0: 0, 1: -1, 2: 1, 3: 2**40}[b.int(0, 3)] if mode == 3 else 0)
        resize = b.int(0, 2) if mode == 3 else 0  # 1: one byte short, 2: one byte too many
        body = b.rest()
        body = (body * (need // max(len(body), 1) + 1))[:need] if body else bytes(need)
        body = {0: body, 1: body[:-1], 2: body + b"\0"}[resize]
        raw = struct.pack("<Q", max(declared, 0)) + header + body
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        try:
            st = SafetensorsFile(path)
        except CheckpointError as exc:
            assert path in str(exc), exc
            return
        for name in st.keys():
            try:
                arr = st.get(name)
            except CheckpointError as exc:
                assert path in str(exc) and name in str(exc), exc
                continue
            assert arr.dtype == np.float32 and arr.shape == st.tensors[name][1], (arr.dtype, arr.shape)
            float(np.nan_to_num(arr).sum())  # touch every value
    finally:
        os.unlink(path)


# ------------------------------------------------------------- API arguments

_MODEL: Any = None

# The tiny CEPE model of the API, shard-index and trainer targets: a 1-layer decoder (d=8) with
# one cross-attention layer over a 1-layer encoder (d=6).
_TINY_CONFIG = dict(
    _BASE_CONFIG,
    do_cross_attention=True,
    num_cross_attn_layers=1,
    encoder_hidden_size=6,
    encoder_config=dict(_BASE_CONFIG, hidden_size=6, num_attention_heads=3, num_key_value_heads=3),
)


def _tiny_weights() -> dict[str, np.ndarray]:
    """The tiny model's weights (random, seeded), by checkpoint name."""
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
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _build_tiny() -> Any:
    """A fresh tiny CEPE model built in memory (no files)."""
    import cepe_c
    from cepe.config import parse_config
    from cepe.model import Model

    cfg = parse_config(_TINY_CONFIG)
    core = cepe_c.Model(cfg.core_kwargs(), cfg.encoder.core_kwargs(), n_threads=1)
    for name, w in _tiny_weights().items():
        core.bind(name, w)
    core.finalize()
    return Model(core, cfg, n_threads=1, path="<fuzz>", device="cpu")


def _tiny_model() -> Any:
    """The tiny CEPE model, built once per process."""
    global _MODEL
    if _MODEL is None:
        _MODEL = _build_tiny()
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


# --------------------------------------------------------------- shard index

_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
_SHARD_DIR: str | None = None
_SHARD_NAMES: list[Any] = [
    _SHARDS[0],
    _SHARDS[1],
    "model-00003-of-00002.safetensors",  # not there
    "../" + _SHARDS[0],
    "/etc/passwd",
    "sub/" + _SHARDS[0],
    "",
    ".",
    "..",
    "config.json",  # there, but not safetensors
    "model.safetensors.index.json",
    _SHARDS[0] + "\0",
    "x" * 300,
    None,
    5,
    [_SHARDS[0]],
]


def _shard_dir() -> str:
    """The tiny model's directory with its weights in two real shards and no index (made once)."""
    global _SHARD_DIR
    if _SHARD_DIR is None:
        from cepe.safetensors_io import write_safetensors

        d = tempfile.mkdtemp(prefix="cepe-fuzz-shards-")
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(_TINY_CONFIG, f)
        names = sorted(_tiny_weights())
        weights = _tiny_weights()
        half = len(names) // 2
        for shard, part in zip(_SHARDS, (names[:half], names[half:]), strict=True):
            write_safetensors(os.path.join(d, shard), {n: weights[n] for n in part})
        _SHARD_DIR = d
    return _SHARD_DIR


def _valid_weight_map() -> list[tuple[str, Any]]:
    names = sorted(_tiny_weights())
    half = len(names) // 2
    return [(n, _SHARDS[0] if i < half else _SHARDS[1]) for i, n in enumerate(names)]


def fuzz_shard_index(data: bytes) -> None:
    """A model directory whose model.safetensors.index.json comes from the input (raw bytes, or
    the valid index with entries dropped, added, repeated or pointed at missing, foreign or
    escaping shard names), beside two real shards: cepe.load raises CheckpointError or
    ConfigError naming the index or shard, or loads a model whose forward is finite."""
    import cepe
    from cepe.errors import CheckpointError, ConfigError

    base = _shard_dir()
    b = Bytes(data)
    if b.int(0, 3) == 0:
        raw = b.rest()
    else:
        pairs = _valid_weight_map()
        for _ in range(b.int(0, 4)):
            op = b.int(0, 4)
            i = b.int(0, max(len(pairs) - 1, 0))
            if op == 0 and pairs:
                del pairs[i]
            elif op == 1 and pairs:
                pairs[i] = (pairs[i][0], _SHARD_NAMES[b.int(0, len(_SHARD_NAMES) - 1)])
            elif op == 2:
                pairs.append((["extra.weight", "lm_head.weight", "", "model.norm.weight"][b.int(0, 3)], _SHARDS[0]))
            elif op == 3 and pairs:
                pairs.append(pairs[i])  # the same name twice in the text
            else:
                pairs = pairs[: b.int(0, len(pairs))]
        weight_map = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"
        shape = b.int(0, 7)
        if shape == 0:
            weight_map = ["[]", "null", '"x"', "5", "{}"][b.int(0, 4)]
        meta = ['{"total_size": 1}', '"x"', "null", "[]"][b.int(0, 3)]
        text = f'{{"metadata": {meta}, "weight_map": {weight_map}}}'
        if shape == 1:
            text = ["[" + text + "]", text[:-1], '{"weight_map": ' + text + "}", text + "x"][b.int(0, 3)]
        raw = text.encode()
    d = tempfile.mkdtemp(prefix="cepe-fuzz-index-")
    try:
        for name in ("config.json", *_SHARDS):
            os.link(os.path.join(base, name), os.path.join(d, name))
        with open(os.path.join(d, "model.safetensors.index.json"), "wb") as f:
            f.write(raw)
        try:
            m = cepe.load(d, n_threads=1)
        except (CheckpointError, ConfigError) as exc:
            assert d in str(exc) or "tensor" in str(exc), exc
            return
        out = m.forward(np.array([1, 3, 4]))
        assert out.shape == (3, m.config.vocab_size) and np.isfinite(out).all()
    finally:
        shutil.rmtree(d)


# ------------------------------------------------------------- trainer state

_TRAIN_DIR: str | None = None
_TRAIN_STATE: dict[str, Any] = {}
_STATE_VALUES: list[Any] = [
    None,
    True,
    0,
    1,
    -1,
    2,
    3,
    2**63 - 1,
    2**63,
    10**400,
    0.5,
    1.0,
    1e308,
    1e-300,
    -0.0,
    float("nan"),
    float("inf"),
    "",
    "x",
    "all",
    "cross_attn",
    "cross_attn+encoder",
    "copy",
    "zero",
    "drop",
    "smooth_-1",
    "smooth_nan",
    "smooth_1e400",
    [],
    [0.9],
    [0.9, 0.999],
    [0.9, 1.0],
    [1, 10**400],
    ["a", "b"],
    {},
    {"g_max": 2},
    {"g_max": 2**40, "L": 2**40},
    {"g_max": 0},
    {"x": 1},
]
# trainer_state.json's optional keys and one it never holds (the required ones: cepe.train.STATE_KEYS)
_STATE_EXTRA_KEYS = ["logit_floats", "n_params", "world_size", "unknown"]
_BATCH = {
    "input_ids": np.array([[1, 3, 4, 5], [2, 6, 7, 8]]),
    "encoder_input_ids": np.array([[[1, 2, 3]], [[4, 5, 6]]]),
}


def _train_dir() -> str:
    """A Trainer checkpoint of the tiny model after one step (made once); its state in _TRAIN_STATE."""
    global _TRAIN_DIR
    if _TRAIN_DIR is None:
        import cepe

        t = cepe.Trainer(_build_tiny(), "cross_attn+encoder", total_steps=8, lr=1e-2, warmup_ratio=0.25)
        t.step(_BATCH)
        path = t.save(os.path.join(tempfile.mkdtemp(prefix="cepe-fuzz-train-"), "ckpt"))
        with open(os.path.join(path, "trainer_state.json")) as f:
            _TRAIN_STATE.update(json.load(f))
        _TRAIN_DIR = path
    return _TRAIN_DIR


def _layout_edit(b: Bytes, layout: list[Any]) -> Any:
    layout = [list(e) for e in layout]
    i = b.int(0, len(layout) - 1)
    op = b.int(0, 5)
    if op == 0:
        del layout[i]
    elif op == 1:
        layout[i][1] = [b.int(0, 20)]
    elif op == 2:
        layout[i][2] += b.int(-3, 3)
    elif op == 3:
        layout[i] = [None, "x", {}, [layout[i][0]]][b.int(0, 3)]
    elif op == 4:
        layout = layout[::-1]
    else:
        layout.append(layout[i])
    return layout


def _opt_file(b: Bytes, path: str, moments: dict[str, np.ndarray]) -> None:
    """optimizer.safetensors: the saved moments, or moments with NaN, inf, negative adam_v,
    the wrong size, dtype or names, or the saved file with bytes overwritten, or missing."""
    from cepe.safetensors_io import write_safetensors

    kind = b.int(0, 7)
    if kind == 0:
        return  # as saved
    if kind == 1:
        os.unlink(path)
        return
    if kind == 2:
        with open(path, "r+b") as f:
            buf = bytearray(f.read())
            for _ in range(b.int(1, 4)):
                pos = b.int(0, len(buf) - 1)
                buf[pos : pos + 4] = b.take(4).ljust(4, b"\xff")[: len(buf) - pos]
            f.seek(0)
            f.truncate()
            f.write(buf)
        return
    m, v = moments["adam_m"].copy(), moments["adam_v"].copy()
    tensors = {"adam_m": m, "adam_v": v}
    edit = b.int(0, 6)
    if edit == 0:
        m[b.int(0, m.size - 1)] = [np.nan, np.inf, -np.inf, 3e38][b.int(0, 3)]
    elif edit == 1:
        v[b.int(0, v.size - 1)] = [np.nan, np.inf, -1.0, -0.0, 3e38][b.int(0, 4)]
    elif edit == 2:
        tensors["adam_v"] = v[: b.int(0, v.size - 1)]
    elif edit == 3:
        tensors["adam_m"] = m.reshape(1, -1)
    elif edit == 4:
        del tensors[["adam_m", "adam_v"][b.int(0, 1)]]
    elif edit == 5:
        tensors["extra"] = m
    write_safetensors(path, tensors, dtype=["float32", "float16", "bfloat16"][b.int(0, 2)] if edit == 6 else "float32")


def fuzz_trainer_state(data: bytes) -> None:
    """A Trainer checkpoint whose trainer_state.json (raw bytes, or the saved state with keys
    removed or set to odd values: huge, negative, NaN, wrong types, a mangled layout) and
    optimizer.safetensors (as saved, missing, overwritten, or moments that are non-finite,
    negative or mis-shaped) come from the input: cepe.Trainer.resume raises CheckpointError
    naming the file, or resumes a trainer whose next step gives finite numbers."""
    import cepe
    from cepe.errors import CheckpointError
    from cepe.safetensors_io import SafetensorsFile
    from cepe.train import STATE_KEYS

    state_keys = [*STATE_KEYS, *_STATE_EXTRA_KEYS]

    base = _train_dir()
    b = Bytes(data)
    d = tempfile.mkdtemp(prefix="cepe-fuzz-resume-")
    ckpt = os.path.join(d, "ckpt")
    try:
        shutil.copytree(base, ckpt)
        if b.int(0, 3) == 0:
            raw = b.rest()
        else:
            state = json.loads(json.dumps(_TRAIN_STATE))
            for _ in range(b.int(0, 3)):
                key = state_keys[b.int(0, len(state_keys) - 1)]
                op = b.int(0, 5)
                if op == 0:
                    state.pop(key, None)
                elif key == "layout" and op < 4:
                    state[key] = _layout_edit(b, _TRAIN_STATE["layout"])
                else:
                    state[key] = _STATE_VALUES[b.int(0, len(_STATE_VALUES) - 1)]
            if b.int(0, 15) == 0:
                state = [state, None, "x", 1][b.int(0, 3)]
            opt = os.path.join(ckpt, "optimizer.safetensors")
            saved = SafetensorsFile(opt)
            _opt_file(b, opt, {name: saved.get(name) for name in saved.keys()})
            raw = json.dumps(state).encode()
        with open(os.path.join(ckpt, "trainer_state.json"), "wb") as f:
            f.write(raw)
        try:
            t = cepe.Trainer.resume(ckpt, n_threads=1)
        except CheckpointError as exc:
            assert ckpt in str(exc), exc
            return
        try:
            st = t.step(_BATCH)
        except ValueError as exc:  # a batch this trainer's settings refuse (grad_accum, e2llm), named
            assert str(exc), exc
            return
        assert all(np.isfinite(v) for v in st.values()), st
        t._check_finite("a step after resume()")  # the library's check of weights and moments
    finally:
        shutil.rmtree(d)


# -------------------------------------------------------------- chat template

_CHAT_TOKENIZER: Any = None
_CHAT_SOURCE = "chat template of <fuzz>"
# Pieces a template is assembled from: the statements and expressions real chat templates use,
# and ones that build large values (repeats, big integers, nested lists, wide formats).
_CHAT_PIECES = [
    "{% for message in messages %}",
    "{% endfor %}",
    "{% if loop.first %}",
    "{% if add_generation_prompt %}",
    "{% if message['role'] == 'user' %}",
    "{% elif message['role'] == 'system' %}",
    "{% else %}",
    "{% endif %}",
    "{{ bos_token }}",
    "{{ eos_token }}",
    "{{ message['role'] }}",
    "{{ message['content'] }}",
    "{{ message.content | trim }}",
    "{{ message['content'] | tojson }}",
    "{{ messages | tojson }}",
    "{{ messages | length }}",
    "{{ '<|im_start|>' + message['role'] + '\\n' }}",
    "{{ raise_exception('Conversation roles must alternate') }}",
    "{% set ns = namespace(x=[1], n=7, s='ab') %}",
    "{% set ns.x = [ns.x, ns.x] %}",
    "{% set ns.x = ns.x + ns.x %}",
    "{% set ns.n = ns.n * ns.n %}",
    "{% set ns.n = ns.n ** 64 %}",
    "{% set ns.n = [ns.n, ns.n] | sum %}",
    "{% set ns.s = ns.s ~ ns.s %}",
    "{% set ns.s = ns.s * 1000 %}",
    "{% set ns.s = (ns.s + '\\n') * 100 %}",
    "{% set ns.s = ns.s | indent(100000) %}",
    "{% set ns.s = ns.s | wordwrap(1, wrapstring=ns.s) %}",
    "{% set ns.s = ns.s.expandtabs(100000) %}",
    "{% set ns.s = ns.s.replace('a', ns.s) %}",
    "{% set ns.s = ns.s | center(100000) %}",
    "{% set ns.s = '%-*s' | format(100000, ns.s) %}",
    "{% set ns.s = lipsum(1000) %}",
    "{% set ns.s = ns.s.join(messages | map(attribute='content')) %}",
    "{% set ns.x = ns.x | batch(1000, ns.x) | list %}",
    "{% set ns.x = [ns] %}{% set ns.y = ns.x %}",
    "{% for i in range(10000) %}",
    "{% for i in range(100) %}",
    "{% for a in ns.x %}",
    "{{ ns.x }}",
    "{{ ns.x | tojson }}",
    "{{ ns.x | string | length }}",
    "{{ ns.n }}",
    "{{ ns.s }}",
    "{{ ns }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ ''.__class__ }}",
    "{{ cycler(1, 2).next() }}",
    "{{ strftime_now('%Y') }}",
    "{{ (messages * 1000) | length }}",
    "{{ 10 ** 1000 }}",
    "{{ 9 ** 9 ** 9 }}",
    "{{ 'x' | format(1) }}",
    "{{ ",
    " }}",
    "{% ",
    " %}",
    "x",
    "\n",
]


def _chat_tokenizer() -> Any:
    global _CHAT_TOKENIZER
    if _CHAT_TOKENIZER is None:
        from cepe.tokenizer import Tokenizer

        _CHAT_TOKENIZER = Tokenizer.from_gguf(seed_gguf())
    return _CHAT_TOKENIZER


def fuzz_chat_template(data: bytes) -> None:
    """A chat template from the input (raw text, or assembled from the pieces real templates
    and hostile ones are made of) rendered for a short conversation: it returns text within
    the output limit, or raises ValueError naming the template, in bounded time and memory."""
    from cepe.tokenizer import TEMPLATE_MAX_CHARS

    b = Bytes(data)
    if b.int(0, 2) == 0:
        template = b.rest().decode("utf-8", "replace")
    else:
        template = "".join(_CHAT_PIECES[b.int(0, len(_CHAT_PIECES) - 1)] for _ in range(b.int(1, 12)))
    tok = _chat_tokenizer()
    tok.chat_template, tok.chat_template_source = template, _CHAT_SOURCE
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\tb\nc"},
        {"role": "assistant", "content": "ok"},
    ]
    try:
        out = tok.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as exc:
        assert _CHAT_SOURCE in str(exc) or (not template and "no chat template" in str(exc)), exc
        return
    assert isinstance(out, str) and len(out) <= TEMPLATE_MAX_CHARS + 4 * 100


TARGETS = {
    "config": fuzz_config,
    "safetensors": fuzz_safetensors,
    "api": fuzz_api,
    "gguf": fuzz_gguf,
    "tokenizer": fuzz_tokenizer,
    "shard_index": fuzz_shard_index,
    "trainer_state": fuzz_trainer_state,
    "chat_template": fuzz_chat_template,
}
