"""cepe.qtensor: a weight matrix kept in its stored format (GGUF/ggml blocks, F16, BF16).

    w = QTensor(rows, "Q4_1", (n_out, n_in))   # rows: uint8 (n_out, bytes a row), as the file stores them
    core.bind(name, w.rows, w.qtype, w.n_in)     # the C core multiplies the blocks as they are

The readers (cepe.gguf_io, cepe.safetensors_io) hand these to cepe.build instead of widening
to float32; `cepe.load(..., dtype=...)` converts with `convert`. The block layouts and the
arithmetic are csrc/quant/'s (quant.h); this module only carries the bytes, names the
formats, and widens or makes them with the gguf package (the format's reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# GGML type ids (ggml.h, as csrc/quant/quant.h's cepe_qtype) of the formats the core multiplies.
QTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}
# load(dtype=...): the format a dtype names (None: as stored).
DTYPE_FORMATS = {"float32": "F32", "bfloat16": "BF16", "q8_0": "Q8_0"}


def encode_bf16(a: np.ndarray) -> np.ndarray:
    """a (float32, contiguous) as bf16 bits: round to nearest even on the upper 16 bits (NaN stays NaN)."""
    u = a.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def _gguf_type(type_name: str) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[type_name]


@dataclass(frozen=True)
class QTensor:
    """A matrix (n_out, n_in) in format type_name; rows holds its stored bytes, one row per line."""

    rows: np.ndarray  # uint8 (n_out, row bytes), C-contiguous
    type_name: str
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if self.type_name not in QTYPES or self.type_name == "F32":
            raise ValueError(f"QTensor: unsupported format {self.type_name!r} (supported: {', '.join(QTYPES)[5:]})")
        if self.rows.dtype != np.uint8 or self.rows.ndim != 2 or self.rows.shape[0] != self.shape[0]:
            raise ValueError(f"QTensor: rows must be uint8 (n_out, row bytes) for shape {self.shape}")

    @property
    def qtype(self) -> int:
        return QTYPES[self.type_name]

    @property
    def n_in(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)

    def dequantize(self) -> np.ndarray:
        """The float32 values (n_out, n_in), bit-identical to the core's widening."""
        if self.type_name == "BF16":
            return (self.rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(self.shape)
        if self.type_name == "F16":
            return self.rows.view(np.float16).astype(np.float32).reshape(self.shape)
        from gguf.quants import dequantize

        out = dequantize(self.rows, _gguf_type(self.type_name))
        return np.array(out, dtype=np.float32, copy=True).reshape(self.shape)


Weight = np.ndarray | QTensor


def as_float32(w: Weight) -> np.ndarray:
    return w.dequantize() if isinstance(w, QTensor) else w


def convert(w: Weight, type_name: str) -> Weight:
    """w in format type_name: "F32" widens; "BF16" rounds to nearest even; "Q8_0" quantizes as
    llama.cpp does (gguf.quants). 1-D tensors (norms) stay float32 whatever the format."""
    if type_name == "F32" or (isinstance(w, np.ndarray) and w.ndim != 2):
        return as_float32(w)
    if isinstance(w, QTensor) and w.type_name == type_name:
        return w
    a = np.ascontiguousarray(as_float32(w), dtype=np.float32)
    block = 256 if type_name.endswith("_K") else 32 if type_name.startswith("Q") else 1
    if a.shape[1] % block:
        raise ValueError(
            f"dtype={type_name.lower()!r}: rows of {a.shape[1]} values do not fill {type_name}'s {block}-value blocks"
        )
    if type_name == "BF16":
        rows = encode_bf16(a).view(np.uint8)
    else:
        from gguf.quants import quantize

        rows = quantize(a, _gguf_type(type_name))
    return QTensor(np.ascontiguousarray(rows).reshape(a.shape[0], -1), type_name, (a.shape[0], a.shape[1]))


def core_weights(core: Any) -> dict[str, Weight]:
    """{HF name: weight} of every tensor a core binds: read-only float32 views, or QTensors
    viewing the stored bytes of matrices held in another format. Each keeps the core alive."""
    import cepe_c

    names = {v: k for k, v in QTYPES.items()}
    out: dict[str, Weight] = {}
    for name, w in cepe_c.train_weights(core).items():
        if isinstance(w, tuple):
            rows, qtype, n_in = w
            out[name] = QTensor(rows, names[qtype], (int(rows.shape[0]), int(n_in)))
        else:
            out[name] = w
    return out


def stored_bytes(weights: dict[str, Weight]) -> int:
    """Bytes the weights take as they are held."""
    return sum(w.nbytes for w in weights.values())
