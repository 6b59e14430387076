"""Reading LLaMA-architecture GGUF files (llama.cpp's format): metadata, config and tensors.

    model = cepe.load("SmolLM2-135M-Instruct.Q4_1.gguf")   # reads with this module, builds with cepe.build

The container is parsed here, strictly: every count, length and offset is
checked against the file, so a truncated or corrupted file raises
CheckpointError instead of crashing or allocating without bound. The gguf
package's GGUFReader would do the same job but builds a NumPy view per array
item, which takes ~4 s for the 100k strings of a 49k-token vocabulary; this
parser takes a fraction of a second. The gguf package still supplies the
format's constants and the dequantization (gguf.quants.dequantize).

Weight matrices are read in their stored format (GGUFFile.stored: the core
multiplies the blocks as they are, see cepe.qtensor), norms and F32 tensors as
float32; GGUFFile.get widens any tensor to float32. Either way the bytes are
copied out of the mapping, so a loaded model owns its memory: rewriting or
truncating the file later changes nothing (the file is unmapped when loading
ends, and each tensor's pages are released as soon as it is copied). The
metadata is bounded: at most _MAX_METADATA bytes from the file's start, arrays
nested at most _MAX_NESTING deep and _MAX_ITEMS array items in all. Two
conventions differ from HF safetensors:

- GGUF lists dimensions innermost first (ne0 = the row length), so a weight
  stored as [in, out] is the NumPy/PyTorch array (out, in) -- exactly the
  shape the core binds.
- llama.cpp's converter undoes HF's rotate-half permutation of the q/k rows,
  so GGUF llama weights use Meta's interleaved RoPE pairs (x[2j], x[2j+1]).
  The weights are bound as stored and the model runs with rope layout
  "interleaved" (spec ROPE_E2LLM.md 1.2).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import mmap
import os
import re
import struct
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .config import ROPE_LAYOUT_KEY, DecoderConfig, parse_config
from .errors import CheckpointError, ConfigError
from .files import open_regular
from .qtensor import QTYPES, QTensor

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)
# GGML type ids (ggml.h) this loader dequantizes; names as gguf.GGMLQuantizationType.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4
# Bounds on the metadata and tensor table, far above any real file's (a 262k-token
# vocabulary with merges and scores takes ~10 MB and ~1.3M array items; no real file
# nests arrays), so a corrupt or hostile file cannot make the parser allocate without bound.
_MAX_METADATA = 256 * 1024 * 1024  # bytes from the file's start to the end of the tensor table
_MAX_ITEMS = 1 << 24  # array items in all the metadata
_MAX_NESTING = 8  # arrays of arrays

# GGUF metadata value types (gguf.GGUFValueType): id -> (struct format, size)
_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NP_SCALARS = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """True for a path ending in .gguf, or a file that starts with b"GGUF"."""
    p = os.fspath(path)
    if p.lower().endswith(".gguf"):
        return True
    if not os.path.isfile(p):
        return False
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str  # gguf.GGMLQuantizationType name, e.g. "Q4_1", or "type<id>" for an unknown id
    type_id: int
    shape: tuple[int, ...]  # NumPy order (outermost first): (out, in) for a weight
    offset: int  # absolute offset in the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads from the mapped header."""

    def __init__(self, buf: mmap.mmap | bytes, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path
        self.items = 0  # array items read so far

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(
                f"{self.path}: truncated or corrupt GGUF file: {what} needs {n} bytes at offset {self.pos}, "
                f"but the file has {self.size} bytes"
            )
        if self.pos + n > _MAX_METADATA:
            raise CheckpointError(
                f"{self.path}: corrupt GGUF file: {what} ends past byte {_MAX_METADATA} of the file, "
                "more than a GGUF header (metadata and tensor table) may take"
            )

    def count_items(self, count: int, what: str) -> None:
        self.items += count
        if self.items > _MAX_ITEMS:
            raise CheckpointError(
                f"{self.path}: corrupt GGUF file: {what} brings the metadata's array items past {_MAX_ITEMS}"
            )

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, n = _SCALARS[vtype]
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return int(self.scalar(4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(10, what))

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: corrupt GGUF file: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= _MAX_NESTING:
                raise CheckpointError(
                    f"{self.path}: corrupt GGUF file: {what} nests arrays more than {_MAX_NESTING} deep"
                )
            itype = self.u32(what)
            count = self.u64(what)
            self.count_items(count, what)
            if itype in _SCALARS:
                n = count * _SCALARS[itype][1]
                self.need(n, what)
                arr = np.frombuffer(self.buf, dtype=_NP_SCALARS[itype], count=count, offset=self.pos)
                self.pos += n
                return arr.astype(bool).tolist() if itype == 7 else arr.tolist()
            if itype == _STRING:
                self.need(count * 8, what)  # each string has at least its 8-byte length
                return [self.string(what) for _ in range(count)]
            if itype == _ARRAY:
                self.need(count * 12, what)
                return [self.value(_ARRAY, what, depth + 1) for _ in range(count)]
            raise CheckpointError(f"{self.path}: corrupt GGUF file: {what} has unknown array item type {itype}")
        raise CheckpointError(f"{self.path}: corrupt GGUF file: {what} has unknown value type {vtype}")


def _read_metadata(cur: _Cursor) -> tuple[int, int, dict[str, Any]]:
    """(version, tensor count, metadata) from the start of a file, checked as it is read."""
    path = cur.path
    if cur.buf[:4] != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic {bytes(cur.buf[:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.u32("version")
    if version in (0x02000000, 0x03000000):
        raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    if n_kv > cur.size // 12:  # each entry takes at least that many bytes
        raise CheckpointError(f"{path}: corrupt GGUF header ({n_kv} metadata entries)")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.u32(f"metadata {key!r}")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")
    return version, n_tensors, metadata


def read_header(header: bytes, path: str) -> dict[str, Any]:
    """The metadata of a GGUFFile.header() copy; path: the file it came from (errors name it)."""
    return _read_metadata(_Cursor(header, path))[2]


def _too_big(ne: list[int], size: int, block: int, tsize: int) -> bool:
    """True when dims ne of this type would need more bytes than the file has."""
    return math.prod(ne) // block * tsize > size


@functools.cache
def _gguf_constants() -> ModuleType:
    """The gguf package's constants module (the format's type ids and block sizes). Unless the
    package is imported already, its constants.py runs alone (it imports only enum and typing):
    `import gguf` also loads its reader, writer, vocabulary and metadata modules, with yaml and
    sentencepiece, ~6 MB resident that reading a tensor table does not need."""
    if "gguf" in sys.modules:
        return sys.modules["gguf"].constants
    spec = importlib.util.find_spec("gguf")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - gguf is a dependency
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "constants.py")
    const_spec = importlib.util.spec_from_file_location("cepe._gguf_constants", path)
    if const_spec is None or const_spec.loader is None:  # pragma: no cover - an unusual install
        return importlib.import_module("gguf.constants")
    module = importlib.util.module_from_spec(const_spec)
    const_spec.loader.exec_module(module)
    return module


def _type_table() -> dict[int, tuple[str, int, int]]:
    """GGML type id -> (name, block size, bytes per block), from the gguf package."""
    c = _gguf_constants()
    sizes = c.GGML_QUANT_SIZES
    return {int(t): (t.name, *sizes[t]) for t in c.GGMLQuantizationType if t in sizes}


class GGUFFile:
    """One GGUF file: its metadata (dict), tensor table, and dequantized tensors."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if not os.path.lexists(self.path):
            raise FileNotFoundError(f"no such GGUF file: {self.path}")
        with open_regular(self.path, "GGUF file", error=CheckpointError) as f:  # no directory, FIFO or device
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise CheckpointError(f"{self.path}: truncated file ({size} bytes), not a GGUF model")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except CheckpointError:
            self._map.close()
            raise

    def _parse(self) -> None:
        path = self.path
        cur = _Cursor(self._map, path)
        self.version, n_tensors, self.metadata = _read_metadata(cur)
        if n_tensors > cur.size // 24:  # each entry takes at least that many bytes
            raise CheckpointError(f"{path}: corrupt GGUF header ({n_tensors} tensors)")
        self._metadata_end = cur.pos
        types = _type_table()
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.u32(f"tensor {name}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise CheckpointError(f"{path}: corrupt GGUF file: tensor {name} has {n_dims} dimensions")
            ne = [cur.u64(f"tensor {name}") for _ in range(n_dims)]
            type_id = cur.u32(f"tensor {name}")
            offset = cur.u64(f"tensor {name}")
            infos.append((name, ne, type_id, offset))
        alignment = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise CheckpointError(f"{path}: corrupt GGUF file: general.alignment = {alignment!r}")
        self.alignment = alignment
        self.data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, type_id, offset in infos:
            if type_id not in types:
                raise CheckpointError(f"{path}: corrupt GGUF file: tensor {name} has unknown type id {type_id}")
            tname, block, tsize = types[type_id]
            if ne[0] % block or _too_big(ne, cur.size, block, tsize):
                raise CheckpointError(f"{path}: corrupt GGUF file: tensor {name} has dims {ne} for type {tname}")
            count = math.prod(ne)
            nbytes = count // block * tsize
            start = self.data_start + offset
            if offset % alignment or start + nbytes > cur.size:
                raise CheckpointError(
                    f"{path}: truncated or corrupt GGUF file: tensor {name} ({nbytes} bytes at offset {start}) "
                    f"does not fit in the file's {cur.size} bytes"
                )
            if name in self.tensors:
                raise CheckpointError(f"{path}: corrupt GGUF file: tensor {name} appears twice")
            self.tensors[name] = TensorInfo(name, tname, type_id, tuple(reversed(ne)), start, nbytes)

    def header(self) -> bytes:
        """A copy of the file's bytes up to the end of its metadata (no tensor table, no data):
        read_header gives the metadata back from it once the file is closed or changed."""
        return bytes(self._map[: self._metadata_end])

    # ----------------------------------------------------------------- access

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor as uint8, shaped (..., bytes per row)."""
        t = self.tensors[name]
        arr = np.frombuffer(self._map, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return arr.reshape(*t.shape[:-1], -1) if t.shape else arr

    def get(self, name: str) -> np.ndarray:
        """The tensor as a float32 array of its own, in NumPy order (F32 copied out of
        the mapping, other types dequantized), so it outlives the mapping and the file."""
        t = self.tensors[name]
        if t.type_name not in SUPPORTED_TYPES:
            raise NotImplementedError(
                f"{self.path}: tensor {name} is stored as {t.type_name}, which this version does not dequantize "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
        raw = self.raw(name)
        if t.type_name == "F32":
            return raw.copy().view(np.float32).reshape(t.shape)  # aligned, and not a view of the file
        if t.type_name == "F16":
            return raw.view(np.float16).astype(np.float32).reshape(t.shape)
        if t.type_name == "BF16":  # the top half of an fp32
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(t.shape)
        if t.type_name in _FAST:
            return _FAST[t.type_name](raw.reshape(-1, _BLOCK_BYTES[t.type_name])).reshape(t.shape)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        out = dequantize(raw, GGMLQuantizationType(t.type_id))
        if np.shares_memory(out, raw):  # never a view of the mapping
            out = out.copy()
        return np.ascontiguousarray(out, dtype=np.float32).reshape(t.shape)

    def stored(self, name: str) -> np.ndarray | QTensor:
        """A matrix in its stored format (a QTensor holding a copy of its bytes; F32 as a float32
        array), anything else as get() gives it. The copied pages of the mapping are released."""
        t = self.tensors[name]
        out: np.ndarray | QTensor
        if len(t.shape) != 2 or t.type_name == "F32" or t.type_name not in QTYPES:
            out = self.get(name)
        else:
            out = QTensor(self.raw(name).copy(), t.type_name, (int(t.shape[0]), int(t.shape[1])))
        self._release(t)
        return out

    def _release(self, t: TensorInfo) -> None:
        """Drops the mapping's pages of a tensor already copied (they would otherwise count
        towards this process's memory until the file is closed)."""
        page = mmap.PAGESIZE
        start = t.offset // page * page
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)
        except (AttributeError, OSError, ValueError):  # not on this platform: only memory is lost
            pass

    def close(self) -> None:
        """Unmaps the file (only once no view from raw() is alive)."""
        try:
            self._map.close()
        except BufferError:
            pass

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}: v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


# ------------------------------------------------------------ dequantize
# The 32-value block formats, in NumPy with fewer temporaries than
# gguf.quants (2-3x faster) and the same float32 operations, so the results are
# bit-identical to gguf.quants.dequantize (tested). Q4_K and Q6_K use gguf's.
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as a float32 column."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    out = blocks[:, 2:].view(np.int8).astype(np.float32)
    out *= _f16(blocks, 0)
    return out


def _nibbles(qs: np.ndarray) -> np.ndarray:
    out = np.empty((qs.shape[0], 32), dtype=np.float32)
    out[:, :16] = qs & 0x0F  # low nibbles are values 0..15, high nibbles 16..31
    out[:, 16:] = qs >> 4
    return out


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    out = _nibbles(blocks[:, 2:])
    out -= 8.0
    out *= _f16(blocks, 0)
    return out


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    out = _nibbles(blocks[:, 4:])
    out *= _f16(blocks, 0)
    out += _f16(blocks, 2)
    return out


_FAST = {"Q8_0": _dequant_q8_0, "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1}


# ------------------------------------------------------------------ config


_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors that hold settings, not weights the core binds.
_SETTING_TENSORS = ("rope_freqs.weight",)


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF llama tensor, None if it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def gguf_name(hf: str) -> str | None:
    """The GGUF llama tensor name of an HF parameter name (hf_name's inverse), None if it has none."""
    for g, h in _GLOBAL_NAMES.items():
        if h == hf:
            return g
    m = re.match(r"^model\.layers\.(\d+)\.([\w.]+)\.weight$", hf)
    if m:
        for g, h in _LAYER_NAMES.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}.weight"
    return None


def _key(gf: GGUFFile, key: str, kinds: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
    if key not in gf.metadata:
        if required:
            raise CheckpointError(f"{gf.path}: GGUF metadata lacks the required key {key!r}")
        return default
    v = gf.metadata[key]
    if isinstance(v, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise CheckpointError(f"{gf.path}: GGUF metadata {key!r} has a bad value {v!r}")
    if not isinstance(v, kinds):
        raise CheckpointError(f"{gf.path}: GGUF metadata {key!r} has a bad value {v!r}")
    return v


def architecture(gf: GGUFFile) -> str:
    arch = _key(gf, "general.architecture", str, required=True)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(
            f"{gf.path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def _rope_block(gf: GGUFFile, arch: str, head_dim: int, rotary_dim: int, ctx: int) -> dict[str, Any] | None:
    """The HF rope_scaling dict the file's RoPE metadata and tensors describe."""
    stype = _key(gf, f"{arch}.rope.scaling.type", str, "none")
    factor = _key(gf, f"{arch}.rope.scaling.factor", (int, float))
    if factor is None and f"{arch}.rope.scale_linear" in gf.metadata:  # older files
        stype, factor = "linear", _key(gf, f"{arch}.rope.scale_linear", (int, float))
    orig = _key(gf, f"{arch}.rope.scaling.original_context_length", int)
    if "rope_freqs.weight" in gf.tensors:
        # Llama 3.1-style scaling baked into per-pair frequency divisors: pair j
        # turns at inv_freq[j] / rope_freqs[j] (ggml's freq_factors). LongRoPE
        # with equal short and long factors and no attention factor is exactly that.
        if stype not in ("none", "linear") or (stype == "linear" and factor not in (None, 1.0)):
            raise NotImplementedError(f"{gf.path}: rope_freqs combined with rope scaling type {stype!r}")
        t = gf.tensors["rope_freqs.weight"]
        if t.type_name != "F32" or t.shape != (rotary_dim // 2,):
            raise CheckpointError(
                f"{gf.path}: rope_freqs.weight must be F32 with {rotary_dim // 2} entries, got {t.type_name} {t.shape}"
            )
        f = gf.get("rope_freqs.weight").astype(np.float64)
        if not (np.isfinite(f).all() and (f > 0).all()):
            raise CheckpointError(f"{gf.path}: rope_freqs.weight holds non-positive or non-finite values")
        if np.all(f == 1.0):
            return None
        return {
            "rope_type": "longrope",
            "short_factor": f.tolist(),
            "long_factor": f.tolist(),
            "factor": 1.0,
            "attention_factor": 1.0,
            "original_max_position_embeddings": ctx,
        }
    if stype == "none" or (stype == "linear" and factor in (None, 1.0)):
        return None
    if stype == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if stype == "yarn":
        attn = _key(gf, f"{arch}.rope.scaling.attn_factor", (int, float), 1.0)
        if attn != 1.0 or f"{arch}.rope.scaling.yarn_log_multiplier" in gf.metadata:
            raise NotImplementedError(f"{gf.path}: YaRN with a custom attn_factor or log multiplier is not supported")
        block: dict[str, Any] = {"rope_type": "yarn", "factor": None if factor is None else float(factor)}
        if orig is not None:
            block["original_max_position_embeddings"] = orig
        return block
    raise NotImplementedError(f"{gf.path}: GGUF rope scaling type {stype!r} is not supported (none, linear, yarn)")


def hf_config(gf: GGUFFile) -> dict[str, Any]:
    """The file's hyper-parameters as an HF LLaMA config dict (for cepe.config.parse_config)."""
    arch = architecture(gf)
    p = f"{arch}."
    hidden = _key(gf, p + "embedding_length", int, required=True)
    heads = _key(gf, p + "attention.head_count", int, required=True)
    kv = _key(gf, p + "attention.head_count_kv", int, heads)
    head_dim = _key(gf, p + "attention.key_length", int, hidden // heads if heads else 0)
    vdim = _key(gf, p + "attention.value_length", int, head_dim)
    if vdim != head_dim:
        raise NotImplementedError(f"{gf.path}: key_length {head_dim} != value_length {vdim} is not supported")
    rotary = _key(gf, p + "rope.dimension_count", int, head_dim)
    ctx = _key(gf, p + "context_length", int, 2048)
    if "token_embd.weight" not in gf.tensors:
        raise CheckpointError(f"{gf.path}: GGUF file has no token_embd.weight tensor")
    vocab = gf.tensors["token_embd.weight"].shape[0]
    meta_vocab = _key(gf, p + "vocab_size", int)
    if meta_vocab is not None and meta_vocab != vocab:
        raise CheckpointError(f"{gf.path}: {p}vocab_size = {meta_vocab} but token_embd.weight has {vocab} rows")
    cfg: dict[str, Any] = {
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _key(gf, p + "feed_forward_length", int, required=True),
        "num_hidden_layers": _key(gf, p + "block_count", int, required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "rms_norm_eps": float(_key(gf, p + "attention.layer_norm_rms_epsilon", (int, float), 1e-5)),
        "rope_theta": float(_key(gf, p + "rope.freq_base", (int, float), 10000.0)),
        "max_position_embeddings": ctx,
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        ROPE_LAYOUT_KEY: "interleaved",  # llama.cpp's converter stores q/k rows in Meta's pair order
    }
    if head_dim and rotary != head_dim:
        cfg["partial_rotary_factor"] = rotary / head_dim
    scaling = _rope_block(gf, arch, head_dim, rotary, ctx)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        v = _key(gf, "tokenizer.ggml." + gguf_key, int)
        if v is not None and 0 <= v < vocab:
            cfg[hf_key] = v
    eos = [
        v
        for v in (_key(gf, "tokenizer.ggml.eos_token_id", int), _key(gf, "tokenizer.ggml.eot_token_id", int))
        if v is not None and 0 <= v < vocab
    ]
    if eos:
        cfg["eos_token_id"] = list(dict.fromkeys(eos))
    return cfg


# The GGUF metadata (after "<arch>.") each HF config key of hf_config comes from.
_HF_TO_GGUF = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "partial_rotary_factor": "rope.dimension_count",
    "rope_scaling": "rope.scaling.*",
}


def _metadata_error(gf: GGUFFile, msg: str) -> str:
    """A config error about hf_config's dict, restated against the GGUF file and its keys."""
    if "config.json" not in msg:  # about the caller's rope_scaling argument, not the file
        return msg
    arch = gf.metadata.get("general.architecture", "llama")
    keys = [f"{arch}.{g}" for h, g in _HF_TO_GGUF.items() if re.search(rf"\b{h}\b", msg)]
    if re.search(r"\bvocab_size\b", msg):
        keys.append("token_embd.weight's rows")
    origin = f" (from {', '.join(keys)})" if keys else ""
    what = msg.replace("config.json: ", "").replace("config.json", "the config")
    return f"{gf.path}: bad GGUF metadata: {what}{origin}"


def read_config(gf: GGUFFile, rope_scaling: dict[str, Any] | None = None) -> DecoderConfig:
    """The DecoderConfig of a GGUF file (hf_config records the interleaved RoPE layout of GGUF
    weights, so a model saved from it reloads with the same layout). A bad value raises an
    error naming the file and the GGUF key it comes from."""
    try:
        return parse_config(hf_config(gf), rope_scaling)
    except ConfigError as exc:
        raise ConfigError(_metadata_error(gf, str(exc))) from None
    except NotImplementedError as exc:
        raise NotImplementedError(_metadata_error(gf, str(exc))) from None


# ------------------------------------------------------------------ weights


def weight_names(gf: GGUFFile, cfg: DecoderConfig) -> dict[str, str]:
    """{tensor name in the file: the HF name it binds as} for every weight of a llama GGUF file
    (in the file's order; setting tensors such as rope_freqs.weight left out), after checking
    that each has an HF name and a type this version dequantizes, and that the file holds
    tensors for exactly cfg.num_hidden_layers blocks."""
    path = gf.path
    names: dict[str, str] = {}
    for name, info in gf.tensors.items():
        if name in _SETTING_TENSORS:
            continue
        target = hf_name(name)
        if target is None:
            raise CheckpointError(f"{path}: unexpected tensor {name} for a llama GGUF file")
        if info.type_name not in SUPPORTED_TYPES:
            raise NotImplementedError(
                f"{path}: tensor {name} is stored as {info.type_name}, which this version does not dequantize "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
        names[name] = target
    blocks = {int(n.split(".")[1]) for n in gf.tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if len(blocks) != cfg.num_hidden_layers or (blocks and max(blocks) != cfg.num_hidden_layers - 1):
        raise CheckpointError(
            f"{path}: block_count is {cfg.num_hidden_layers} but the file holds tensors for {len(blocks)} blocks"
        )
    return names
