"""Reading safetensors checkpoints as NumPy arrays, zero-copy where possible.

The format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw data. We parse the header
ourselves (strictly: every offset and size is checked against the file) so
float32 tensors can be views into one read-only np.memmap per file: a 7B
checkpoint then costs page cache, not a second copy in RAM. fp16/bf16 tensors
are widened to float32 at load (the C core computes in fp32).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np

from .errors import CheckpointError

_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened by hand: NumPy has no bfloat16
    "F64": np.dtype("<f8"),
}
_ALL_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F8_E4M3", "F8_E5M2", *_DTYPES}
MAX_HEADER = 100 * 1024 * 1024  # as the reference implementation


class SafetensorsFile:
    """One .safetensors file: its tensor table and a lazily mapped body."""

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.isdir(path):
            raise CheckpointError(f"{path} is a directory, expected a .safetensors file")
        size = os.path.getsize(path)
        if size < 8:
            raise CheckpointError(f"{path}: truncated file ({size} bytes), not a safetensors checkpoint")
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header claims {n} bytes but the file has {size - 8}; truncated or not safetensors"
                )
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.data_size = size - self.data_start
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.tensors[name] = self._check_entry(name, info)
        self._map: np.memmap | None = None

    def _check_entry(self, name: str, info: object) -> tuple[str, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: corrupt header entry")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ALL_DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: bad shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) for o in offs)
            or not 0 <= offs[0] <= offs[1] <= self.data_size
        ):
            raise CheckpointError(
                f"{where}: data_offsets {offs!r} fall outside the file's {self.data_size} data bytes (truncated file?)"
            )
        if dtype in _DTYPES:
            want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
            if offs[1] - offs[0] != want:
                raise CheckpointError(
                    f"{where}: {offs[1] - offs[0]} bytes stored, shape {tuple(shape)} of {dtype} needs {want}"
                )
        return dtype, tuple(shape), offs[0], offs[1]

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32: a read-only view of the file when stored as
        aligned F32, else a converted copy."""
        dtype, shape, begin, end = self.tensors[name]
        if dtype not in _DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name} has dtype {dtype}; only F32, F16, BF16 and F64 weights are supported"
            )
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self.data_start + begin : self.data_start + end]
        if (self.data_start + begin) % _DTYPES[dtype].itemsize:
            raw = raw.copy()  # unaligned in the file: a view would be unaligned too
        arr = raw.view(_DTYPES[dtype]).reshape(shape)
        if dtype == "F32":
            return arr
        if dtype == "BF16":  # bf16 is the top half of an fp32
            return (arr.astype(np.uint32) << 16).view(np.float32)
        with np.errstate(over="ignore"):
            out = arr.astype(np.float32)
        if dtype == "F64":  # finite values beyond float32's range would silently become inf
            overflow = int(np.count_nonzero(np.isinf(out) & np.isfinite(arr)))
            if overflow:
                raise CheckpointError(
                    f"{self.path}: tensor {name} holds {overflow} float64 value(s) beyond float32's range "
                    "(|x| > 3.4e38), which cepe computes in"
                )
        return out


class Checkpoint:
    """All tensors of a model directory: model.safetensors, or the shards named
    by model.safetensors.index.json."""

    def __init__(self, model_dir: str) -> None:
        single = os.path.join(model_dir, "model.safetensors")
        index = os.path.join(model_dir, "model.safetensors.index.json")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.isfile(single):
            self._add(single)
        elif os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: corrupt shard index ({exc})") from None
            for shard in sorted(set(weight_map.values())):
                path = os.path.join(model_dir, str(shard))
                if os.path.basename(path) != str(shard) or not os.path.exists(path):
                    raise CheckpointError(f"{index} names shard {shard!r}, which is not in {model_dir}")
                self._add(path)
            for name, shard in weight_map.items():
                if name not in self.where:
                    raise CheckpointError(f"{index} lists tensor {name} in {shard}, but the shard lacks it")
        else:
            found = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth"))]
            hint = " (PyTorch .bin files found: convert them to safetensors first)" if found else ""
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}{hint}")

    def _add(self, path: str) -> None:
        f = SafetensorsFile(path)
        self.files[path] = f
        for name in f.keys():
            if name in self.where:
                raise CheckpointError(f"tensor {name} appears in both {self.where[name]} and {path}")
            self.where[name] = path

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].get(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.where:
            yield name, self.get(name)


# ------------------------------------------------------------------ writing

WRITE_DTYPES = ("float32", "float16", "bfloat16")
_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _encode(a: np.ndarray, dtype: str) -> np.ndarray:
    """a (float32) as the little-endian array of `dtype` whose bytes are written."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "float32":
        return a.astype("<f4", copy=False)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            h = a.astype("<f2")
        if np.isinf(h).any() and not np.isinf(a[np.isinf(h)]).all():
            raise ValueError("a value is beyond float16's range (|x| > 65504): save as float32 or bfloat16")
        return h
    # bfloat16: round to nearest even on the upper 16 bits (NaN stays NaN)
    u = a.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def write_safetensors(path: str, tensors: dict[str, np.ndarray], dtype: str = "float32") -> None:
    """Float tensors in the safetensors format, each stored as `dtype` ("float32", "float16" or
    "bfloat16"): an 8-byte little-endian header length, the JSON header (space-padded so the
    data starts 64-byte aligned), then every tensor's bytes back to back (the format allows no
    gaps between them). Flushed and fsynced."""
    if dtype not in WRITE_DTYPES:
        raise ValueError(f"dtype must be one of {WRITE_DTYPES}, got {dtype!r}")
    header: dict[str, object] = {}
    off = 0
    names = sorted(tensors)
    size = np.dtype(np.float32).itemsize if dtype == "float32" else 2
    for name in names:
        a = tensors[name]
        if a.dtype != np.float32:
            raise TypeError(f"{name}: only float32 tensors are written, got {a.dtype}")
        header[name] = {"dtype": _TAGS[dtype], "shape": list(a.shape), "data_offsets": [off, off + a.size * size]}
        off += a.size * size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 64)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            f.write(_encode(tensors[name], dtype).tobytes())
        f.flush()
        os.fsync(f.fileno())
