"""Reading safetensors checkpoints as NumPy arrays the caller owns.

The format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw data. We parse the header
ourselves, as strictly as the safetensors library: no duplicate names, every
size checked against its shape, and the tensors' byte ranges tile the data
buffer exactly (no overlaps, gaps or trailing bytes). Each tensor is read into
memory of its own (fp16/bf16 widened to float32: the C core computes in fp32),
never left as a view of a mapping, so a loaded model is unaffected when its
file is later rewritten, truncated or removed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .errors import CheckpointError
from .files import CONFIG_LIMIT, open_regular, read_text
from .qtensor import QTYPES, QTensor, Weight, encode_bf16

_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened by hand: NumPy has no bfloat16
    "F64": np.dtype("<f8"),
}
_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "I32": 4,
    "U32": 4,
    "I64": 8,
    "U64": 8,
    **{k: v.itemsize for k, v in _DTYPES.items()},
}
MAX_HEADER = 100 * 1024 * 1024  # as the reference implementation
MAX_DIMS = 64  # NumPy's limit on dimensions
MAX_BYTES = 2**63 - 1  # the size of any one array (NumPy's, with a 0 in the shape too)
INDEX_FILE = "model.safetensors.index.json"
# __metadata__ key of a cepe-written file holding matrices in a GGUF block format: a JSON object
# {tensor name: [format, values a row]}; each such tensor is stored as U8 (rows, bytes a row).
FORMATS_KEY = "cepe.formats"


def _no_duplicates(path: str) -> Any:
    """A json object_pairs_hook that refuses a name given twice (json keeps the last)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{path}: corrupt safetensors header: tensor {key} appears twice")
            out[key] = value
        return out

    return hook


class SafetensorsFile:
    """One .safetensors file: its checked tensor table; get() reads one tensor."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open_regular(path, "safetensors file", error=CheckpointError) as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{path}: truncated file ({size} bytes), not a safetensors checkpoint")
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER:
                raise CheckpointError(
                    f"{path}: header claims {n} bytes, more than the {MAX_HEADER} a safetensors header may have; "
                    "corrupt or not safetensors"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: header claims {n} bytes but the file has {size - 8}; truncated or not safetensors"
                )
            raw = f.read(n)
        if len(raw) != n:
            raise CheckpointError(f"{path}: the file shrank while its header was read")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(path))
        except RecursionError:
            raise CheckpointError(f"{path}: corrupt safetensors header (nested too deeply)") from None
        except CheckpointError:
            raise
        except ValueError as exc:  # not UTF-8, not JSON, or an integer past Python's digit limit
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
        self.metadata: dict[str, Any] = metadata
        self.formats = self._formats(metadata.get(FORMATS_KEY))
        self.data_start = 8 + n
        self.data_size = size - self.data_start
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.tensors[name] = self._check_entry(name, info)
        self._check_layout()
        for name, (fmt, n_in) in self.formats.items():
            info = self.tensors.get(name)
            if info is None or info[0] != "U8" or len(info[1]) != 2:
                raise CheckpointError(f"{path}: {FORMATS_KEY} names {name}, which is not a 2-D U8 tensor here")
            if _row_bytes(fmt, n_in) != info[1][1]:
                raise CheckpointError(
                    f"{path}: tensor {name}: {info[1][1]} bytes a row do not hold {n_in} values of {fmt}"
                )

    def _formats(self, value: object) -> dict[str, tuple[str, int]]:
        if value is None:
            return {}
        try:
            table = json.loads(value) if isinstance(value, str) else None
        except ValueError:
            table = None
        if not isinstance(table, dict) or not all(
            isinstance(v, list) and len(v) == 2 and v[0] in QTYPES and v[0] != "F32" and type(v[1]) is int and v[1] > 0
            for v in table.values()
        ):
            raise CheckpointError(f"{self.path}: corrupt __metadata__[{FORMATS_KEY!r}]: {str(value)[:200]}")
        return {str(k): (v[0], v[1]) for k, v in table.items()}

    def _check_entry(self, name: str, info: object) -> tuple[str, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: corrupt header entry")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ITEMSIZE:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: bad shape {shape!r}")
        if len(shape) > MAX_DIMS:
            raise CheckpointError(f"{where}: shape has {len(shape)} dimensions, more than an array's {MAX_DIMS}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1] <= self.data_size
        ):
            raise CheckpointError(
                f"{where}: data_offsets {offs!r} fall outside the file's {self.data_size} data bytes (truncated file?)"
            )
        want = math.prod(shape) * _ITEMSIZE[dtype]  # exact: Python ints do not wrap
        if offs[1] - offs[0] != want:
            raise CheckpointError(
                f"{where}: {offs[1] - offs[0]} bytes stored, shape {tuple(shape)} of {dtype} needs {want}"
            )
        if math.prod(d for d in shape if d) * _ITEMSIZE[dtype] > MAX_BYTES:  # a 0 in the shape: no bytes, no array
            raise CheckpointError(f"{where}: shape {tuple(shape)} is too large for an array (2**63 bytes)")
        return dtype, tuple(shape), offs[0], offs[1]

    def _check_layout(self) -> None:
        """The tensors' byte ranges must tile the data buffer: sorted by offset, each starts
        where the previous ends and the last ends with the file (as the safetensors library
        requires), so no two tensors share bytes."""
        end, prev = 0, None
        for name, (_, _, begin, stop) in sorted(self.tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if begin != end:
                where = f"{self.path}: corrupt safetensors header: tensor {name} (data_offsets [{begin}, {stop}])"
                if begin < end:
                    raise CheckpointError(f"{where} overlaps tensor {prev}")
                raise CheckpointError(f"{where} leaves {begin - end} bytes before it that no tensor uses")
            end, prev = stop, name
        if end != self.data_size:
            raise CheckpointError(
                f"{self.path}: corrupt safetensors file: the tensors cover {end} of its {self.data_size} data bytes"
            )

    def keys(self) -> list[str]:
        return list(self.tensors)

    def _read(self, name: str, begin: int, end: int, dtype: np.dtype) -> np.ndarray:
        """The bytes [begin, end) of the data buffer, read into a new array of `dtype`."""
        out = np.empty((end - begin) // dtype.itemsize, dtype=dtype)
        view = out.data.cast("B")
        with open_regular(self.path, "safetensors file", error=CheckpointError) as f:
            if os.fstat(f.fileno()).st_size != self.data_start + self.data_size:
                raise CheckpointError(f"{self.path}: the file changed size since its header was read")
            f.seek(self.data_start + begin)
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise CheckpointError(
                        f"{self.path}: tensor {name}: the file ends before its data (truncated since it was opened?)"
                    )
                got += k
        return out

    def stored(self, name: str) -> Weight:
        """A matrix in its stored format (F16, BF16, or a block format cepe wrote) as a QTensor
        of its own bytes; anything else as get() gives it."""
        dtype, shape, begin, end = self.tensors[name]
        if name in self.formats:
            fmt, n_in = self.formats[name]
            return QTensor(self._read(name, begin, end, np.dtype(np.uint8)).reshape(shape), fmt, (shape[0], n_in))
        if dtype in ("F16", "BF16") and len(shape) == 2:
            rows = self._read(name, begin, end, np.dtype(np.uint8)).reshape(shape[0], -1)
            return QTensor(rows, dtype, (shape[0], shape[1]))
        return self.get(name)

    def get(self, name: str) -> np.ndarray:
        """The tensor as a float32 array of its own (read from the file, not mapped)."""
        dtype, shape, begin, end = self.tensors[name]
        if name in self.formats:
            w = self.stored(name)
            assert isinstance(w, QTensor)
            return w.dequantize()
        if dtype not in _DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name} has dtype {dtype}; only F32, F16, BF16 and F64 weights are supported"
            )
        arr = self._read(name, begin, end, _DTYPES[dtype]).reshape(shape)
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


def _shard_list(index: str, model_dir: str) -> dict[str, str]:
    """The weight_map of a shard index, checked: tensor name -> shard file name in model_dir."""
    text = read_text(index, what="shard index", limit=CONFIG_LIMIT, error=CheckpointError)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also an integer past Python's digit limit
        raise CheckpointError(f"{index}: corrupt shard index (not valid JSON: {exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: corrupt shard index ('weight_map' is missing or not an object)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(
                f"{index}: corrupt shard index: weight_map[{name!r}] must be a shard file name, got {shard!r}"
            )
        if os.path.basename(shard) != shard or shard in (".", ".."):
            raise CheckpointError(f"{index} names shard {shard!r}, which is not in {model_dir}")
    return weight_map


class Checkpoint:
    """All tensors of a model directory: model.safetensors, or the shards named
    by model.safetensors.index.json."""

    def __init__(self, model_dir: str) -> None:
        single = os.path.join(model_dir, "model.safetensors")
        index = os.path.join(model_dir, INDEX_FILE)
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.lexists(single):  # whatever it is: SafetensorsFile says what is wrong with it
            self._add(single)
        elif os.path.lexists(index):
            weight_map = _shard_list(index, model_dir)
            for shard in sorted(set(weight_map.values())):
                path = os.path.join(model_dir, shard)
                if not os.path.lexists(path):
                    raise CheckpointError(f"{index} names shard {shard!r}, which is not in {model_dir}")
                self._add(path)
            for name, shard in weight_map.items():
                if name not in self.where:
                    raise CheckpointError(f"{index} lists tensor {name} in {shard}, but the shard lacks it")
        else:
            found = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth"))]
            hint = " (PyTorch .bin files found: convert them to safetensors first)" if found else ""
            raise CheckpointError(f"no model.safetensors or {INDEX_FILE} in {model_dir}{hint}")

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

    def stored(self, name: str) -> Weight:
        return self.files[self.where[name]].stored(name)

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
    return encode_bf16(a)


def _row_bytes(fmt: str, n_in: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[fmt]]
    return n_in // block * size if n_in % block == 0 else -1


def _stored_bytes(w: Weight, dtype: str) -> np.ndarray:
    return w.rows if isinstance(w, QTensor) else _encode(w, dtype)


def write_safetensors(path: str, tensors: Mapping[str, Weight], dtype: str = "float32") -> None:
    """Float tensors in the safetensors format, each stored as `dtype` ("float32", "float16" or
    "bfloat16"): an 8-byte little-endian header length, the JSON header (space-padded so the
    data starts 64-byte aligned), then every tensor's bytes back to back (the format allows no
    gaps between them). Flushed and fsynced. A QTensor keeps its format, whatever `dtype`: F16
    and BF16 as those dtypes, block formats as U8 rows named in __metadata__[FORMATS_KEY]. Each
    tensor is looked up twice (its shape, then its bytes) and not kept: a Mapping that reads on
    lookup writes a file larger than memory."""
    if dtype not in WRITE_DTYPES:
        raise ValueError(f"dtype must be one of {WRITE_DTYPES}, got {dtype!r}")
    header: dict[str, object] = {}
    formats: dict[str, list[object]] = {}
    off = 0
    names = sorted(tensors)
    size = np.dtype(np.float32).itemsize if dtype == "float32" else 2
    for name in names:
        a = tensors[name]
        if isinstance(a, QTensor):
            plain = a.type_name in ("F16", "BF16")
            if not plain:
                formats[name] = [a.type_name, a.n_in]
            shape = list(a.shape) if plain else list(a.rows.shape)
            header[name] = {
                "dtype": a.type_name if plain else "U8",
                "shape": shape,
                "data_offsets": [off, off + a.nbytes],
            }
            off += a.nbytes
            continue
        if a.dtype != np.float32:
            raise TypeError(f"{name}: only float32 tensors are written, got {a.dtype}")
        header[name] = {"dtype": _TAGS[dtype], "shape": list(a.shape), "data_offsets": [off, off + a.size * size]}
        off += a.size * size
    if formats:
        header = {"__metadata__": {FORMATS_KEY: json.dumps(formats)}, **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 64)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            f.write(_stored_bytes(tensors[name], dtype).tobytes())
        f.flush()
        os.fsync(f.fileno())
