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


TARGETS = {"config": fuzz_config, "safetensors": fuzz_safetensors, "api": fuzz_api}
