"""The engine's ops on NumPy arrays: the forward and backward of every layer
the models are built from, as the C core runs them (csrc/ops/).

    import cepe.ops as ops
    out, lse = ops.attention(q, k, v, causal=True, return_lse=True)
    dq, dk, dv = ops.attention_backward(dout, q, k, v, out, lse, causal=True)

Conventions, shared by every function:

- Arrays are float32 (ids and targets any integer dtype, masks bool or
  uint8); anything else raises TypeError naming the argument, and a shape
  that does not fit raises ValueError naming it. Nothing is converted
  silently except byte order and alignment.
- Inputs are read in place when their layout allows: any C-contiguous
  array, and for attention any q, k, v whose heads are contiguous within a
  row (a slice of a fused QKV buffer, a KV cache with spare rows, a batch
  axis broadcast with stride 0). Other layouts are copied first.
- `out=` (and dx=, dweight=, ... for the backward) takes a float32 array of
  the result's shape; the result is written there and returned. With
  accumulate=True the gradients are added into those buffers (the engine's
  own convention for parameters used twice) instead of overwriting them.
- Gradients of a broadcast input are summed back to the input's shape, as
  torch does.
- The GIL is released while an op runs. n_threads (default: OpenMP's limit)
  bounds the CPU's thread team; backend takes a "cepe.backend" capsule
  (cepe_cuda.backend()) to run the op on that device, the arrays being
  copied there and back for the call.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from numpy.lib.array_utils import byte_bounds

import cepe_c

from .rope import LAYOUTS, RopeSettings, rope_frequencies

__all__ = [
    "IGNORE_INDEX",
    "MAX_HEAD_DIM",
    "attention",
    "attention_backward",
    "cross_attention",
    "cross_attention_backward",
    "cross_entropy",
    "cross_entropy_backward",
    "embedding",
    "embedding_backward",
    "linear",
    "linear_backward",
    "rmsnorm",
    "rmsnorm_backward",
    "rope",
    "rope_apply",
    "rope_apply_backward",
    "rope_backward",
    "rope_tables",
    "swiglu",
    "swiglu_backward",
]

F32 = npt.NDArray[np.float32]
Backend = Any  # None (the CPU) or a "cepe.backend" capsule

IGNORE_INDEX: int = cepe_c.IGNORE_INDEX  # a target that is not scored (PyTorch's -100)
MAX_HEAD_DIM = 256  # the attention kernels' limit
_INT_MAX = 2**31 - 1


# ----------------------------------------------------------------- arguments


def _array(a: object, name: str, ndim: int | None = None, min_ndim: int = 0) -> F32:
    """a as a float32 ndarray of ndim (or >= min_ndim) dims: aligned and native, else copied."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if a.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {a.shape}")
    if any(d > _INT_MAX for d in a.shape):
        raise ValueError(f"{name} is too large: shape {a.shape}")
    if not (a.dtype.isnative and a.flags.aligned):
        a = np.ascontiguousarray(a, dtype=np.float32)
    return a


def _ints(a: object, name: str, upper: int, ignore: int | None = None) -> npt.NDArray[np.int32]:
    """Integer ids as int32, each in [0, upper) (or == ignore)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, got {a.dtype}")
    bad = (a < 0) | (a >= upper)
    if ignore is not None:
        bad &= a != ignore
    if bad.any():
        i = tuple(int(x) for x in np.argwhere(bad)[0])
        allowed = f"[0, {upper})" + ("" if ignore is None else f" or {ignore}")
        raise ValueError(f"{name}[{', '.join(map(str, i))}] = {a[i]} is outside {allowed}")
    return np.ascontiguousarray(a, dtype=np.int32)


def _threads(n_threads: int | None) -> int:
    if n_threads is None:
        return int(cepe_c.max_threads())
    n = operator.index(n_threads)
    if n < 1:
        raise ValueError(f"n_threads must be >= 1, got {n}")
    return n


def _contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _shaped(a: object, name: str, shape: tuple[int, ...], which: str = "shape") -> F32:
    """a as a contiguous float32 array of this shape (a backward's dout: its forward's output shape)."""
    arr = _contiguous(_array(a, name))
    if arr.shape != shape:
        raise ValueError(f"{name} must have {which} {shape}, got {arr.shape}")
    return arr


def _place(a: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(the C-contiguous array owning a's memory, a's byte offset into it): what cepe_c._op
    reads a through, so that views of one buffer are one buffer on a device; None when a's
    memory has no such owner (then a must be copied)."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not root.flags.c_contiguous and root.flags.f_contiguous:
        root = root.T
    if a.size and root.flags.c_contiguous and min(a.strides, default=0) >= 0:
        lo, hi = byte_bounds(a)
        rlo, rhi = byte_bounds(root)
        if rlo <= lo and hi <= rhi:
            return root, lo - rlo
    return (a, 0) if a.flags.c_contiguous else None


def _arg(a: np.ndarray | None) -> tuple[np.ndarray, int] | None:
    if a is None:
        return None
    placed = _place(a)
    if placed is None:
        raise AssertionError("an array without a C-contiguous owner reached cepe_c._op")
    return placed


def _run(op: str, backend: Backend, **args: Any) -> None:
    cepe_c._op(op, backend, **{k: _arg(v) if isinstance(v, np.ndarray) or v is None else v for k, v in args.items()})


class _Out:
    """A result buffer: the caller's out= array when C can write it in place, else a
    scratch array copied (or added) into it by finish()."""

    def __init__(self, out: object, shape: tuple[int, ...], name: str, accumulate: bool, inputs: Sequence[Any]) -> None:
        self.user: np.ndarray | None = None
        if out is None:
            self.buf: np.ndarray = np.zeros(shape, np.float32)
            return
        if not isinstance(out, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray or None, got {type(out).__name__}")
        if out.dtype != np.float32:
            raise TypeError(f"{name} must have dtype float32, got {out.dtype}")
        if out.shape != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
        if not out.flags.writeable:
            raise ValueError(f"{name} must be writeable")
        self.user = out
        direct = out.flags.c_contiguous and out.flags.aligned and out.dtype.isnative
        if direct and not any(isinstance(x, np.ndarray) and np.may_share_memory(out, x) for x in inputs):
            self.buf = out
            if not accumulate:
                out[...] = 0
        else:
            self.buf = np.ascontiguousarray(out) if accumulate else np.zeros(shape, np.float32)

    def finish(self) -> F32:
        if self.user is None:
            return self.buf
        if self.buf is not self.user:
            self.user[...] = self.buf
        return self.user


def _unbroadcast(g: F32, shape: tuple[int, ...]) -> F32:
    """The gradient of a broadcast view summed back to the input's shape."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return np.ascontiguousarray(g.sum(axis=axes, dtype=np.float32).reshape(shape))


def _grad_out(g: F32, shape: tuple[int, ...], out: object, name: str, accumulate: bool) -> F32:
    """A gradient computed at the broadcast shape, reduced to `shape` and delivered into out=."""
    g = _unbroadcast(g, shape)
    if out is None:
        return g
    o = _Out(out, shape, name, True, ())
    if accumulate:
        o.buf += g
    else:
        o.buf[...] = g
    return o.finish()


# ----------------------------------------------------------------- embedding


def embedding(ids: npt.NDArray[np.integer], weight: F32, *, out: F32 | None = None, backend: Backend = None) -> F32:
    """weight[ids]: ids any integer array in [0, V), weight (V, C) -> (*ids.shape, C)."""
    weight = _contiguous(_array(weight, "weight", 2))
    V, C = weight.shape
    ids32 = _ints(ids, "ids", V)
    o = _Out(out, (*ids32.shape, C), "out", False, (weight,))
    if ids32.size and C:
        _run("embedding", backend, out=o.buf, ids=ids32, wte=weight, N=ids32.size, C=C)
    return o.finish()


def embedding_backward(
    dout: F32,
    ids: npt.NDArray[np.integer],
    num_embeddings: int,
    *,
    out: F32 | None = None,
    accumulate: bool = False,
    backend: Backend = None,
) -> F32:
    """d weight (V, C) of embedding: the rows of dout (*ids.shape, C) summed by id."""
    V = operator.index(num_embeddings)
    if V < 1:
        raise ValueError(f"num_embeddings must be >= 1, got {V}")
    dout = _array(dout, "dout", min_ndim=1)
    ids32 = _ints(ids, "ids", V)
    if dout.shape[:-1] != ids32.shape:
        raise ValueError(f"dout must have shape (*ids.shape, C) = {(*ids32.shape, 'C')}, got {dout.shape}")
    C = dout.shape[-1]
    dout = _contiguous(dout)
    o = _Out(out, (V, C), "out", accumulate, (dout,))
    if ids32.size and C:
        _run("embedding_backward", backend, dwte=o.buf, dout=dout, ids=ids32, N=ids32.size, C=C)
    return o.finish()


# ------------------------------------------------------------------- rmsnorm


def _norm_args(x: object, weight: object) -> tuple[F32, F32, int, int]:
    x = _contiguous(_array(x, "x", min_ndim=1))
    weight = _contiguous(_array(weight, "weight", 1))
    C = x.shape[-1]
    if weight.shape[0] != C:
        raise ValueError(f"weight must have shape ({C},) (x's last axis), got {weight.shape}")
    return x, weight, x.size // C if C else 0, C


def rmsnorm(
    x: F32,
    weight: F32,
    eps: float = 1e-6,
    *,
    out: F32 | None = None,
    n_threads: int | None = None,
    backend: Backend = None,
) -> F32:
    """x / sqrt(mean(x², axis=-1) + eps) * weight, for x (..., C), weight (C,)."""
    x, weight, N, C = _norm_args(x, weight)
    o = _Out(out, x.shape, "out", False, (x, weight))
    if N and C:
        _run("rmsnorm", backend, out=o.buf, inp=x, w=weight, N=N, C=C, eps=float(eps), nt=_threads(n_threads))
    return o.finish()


def rmsnorm_backward(
    dout: F32,
    x: F32,
    weight: F32,
    eps: float = 1e-6,
    *,
    dx: F32 | None = None,
    dweight: F32 | None = None,
    weight_grad: bool = True,
    accumulate: bool = False,
    backend: Backend = None,
) -> tuple[F32, F32 | None]:
    """(d x, d weight) of rmsnorm; weight_grad=False skips d weight (a frozen weight) and returns None."""
    x, weight, N, C = _norm_args(x, weight)
    dout = _shaped(dout, "dout", x.shape, "x's shape")
    ox = _Out(dx, x.shape, "dx", accumulate, (x, weight, dout))
    ow = _Out(dweight, (C,), "dweight", accumulate, (x, weight, dout)) if weight_grad else None
    if N and C:
        _run(
            "rmsnorm_backward", backend, dinp=ox.buf, dweight=None if ow is None else ow.buf,
            dout=dout, inp=x, weight=weight, N=N, C=C, eps=float(eps),
        )  # fmt: skip
    return ox.finish(), None if ow is None else ow.finish()


# -------------------------------------------------------------------- linear


def _linear_args(x: object, weight: object) -> tuple[F32, F32, int, int, int]:
    x = _contiguous(_array(x, "x", min_ndim=1))
    weight = _contiguous(_array(weight, "weight", 2))
    OC, C = weight.shape
    if x.shape[-1] != C:
        raise ValueError(f"x's last axis has {x.shape[-1]} entries, weight (OC, C) wants C = {C}")
    return x, weight, x.size // C if C else 0, C, OC


def linear(
    x: F32,
    weight: F32,
    *,
    out: F32 | None = None,
    accumulate: bool = False,
    n_threads: int | None = None,
    backend: Backend = None,
) -> F32:
    """x @ weight.T, for x (..., C) and weight (OC, C) as a checkpoint stores it -> (..., OC);
    accumulate=True adds it into out."""
    x, weight, N, C, OC = _linear_args(x, weight)
    o = _Out(out, (*x.shape[:-1], OC), "out", accumulate, (x, weight))
    if N and C and OC:
        _run(
            "matmul", backend, out=o.buf, inp=x, w=weight, N=N, C=C, OC=OC, accumulate=int(accumulate),
            nt=_threads(n_threads),
        )  # fmt: skip
    return o.finish()


def linear_backward(
    dout: F32,
    x: F32,
    weight: F32,
    *,
    dx: F32 | None = None,
    dweight: F32 | None = None,
    weight_grad: bool = True,
    accumulate: bool = False,
    n_threads: int | None = None,
    backend: Backend = None,
) -> tuple[F32, F32 | None]:
    """(d x, d weight) of linear; weight_grad=False returns None for d weight."""
    x, weight, N, C, OC = _linear_args(x, weight)
    dout = _shaped(dout, "dout", (*x.shape[:-1], OC))
    # d x is written (the op's accumulate=0) unless accumulating: no zeroing pass needed
    ox = _Out(dx, x.shape, "dx", True, (x, weight, dout))
    ow = _Out(dweight, weight.shape, "dweight", accumulate, (x, weight, dout)) if weight_grad else None
    if N and C and OC:
        _run(
            "matmul_backward", backend, dinp=ox.buf, dweight=None if ow is None else ow.buf, dout=dout,
            inp=x, weight=weight, N=N, C=C, OC=OC, accumulate=int(accumulate), nt=_threads(n_threads),
        )  # fmt: skip
    elif not accumulate:
        ox.buf[...] = 0
    return ox.finish(), None if ow is None else ow.finish()


# -------------------------------------------------------------------- swiglu


def _broadcast_pair(a: object, b: object, na: str, nb: str) -> tuple[F32, F32, tuple[int, ...]]:
    a, b = _array(a, na), _array(b, nb)
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{na} {a.shape} and {nb} {b.shape} do not broadcast together") from None
    return _contiguous(np.broadcast_to(a, shape)), _contiguous(np.broadcast_to(b, shape)), shape


def swiglu(gate: F32, up: F32, *, out: F32 | None = None, n_threads: int | None = None, backend: Backend = None) -> F32:
    """silu(gate) * up, elementwise over the broadcast shape."""
    g, u, shape = _broadcast_pair(gate, up, "gate", "up")
    o = _Out(out, shape, "out", False, (g, u))
    if g.size:
        _run("swiglu", backend, out=o.buf, gate=g, up=u, N=g.size, nt=_threads(n_threads))
    return o.finish()


def swiglu_backward(
    dout: F32,
    gate: F32,
    up: F32,
    *,
    dgate: F32 | None = None,
    dup: F32 | None = None,
    accumulate: bool = False,
    backend: Backend = None,
) -> tuple[F32, F32]:
    """(d gate, d up) of swiglu, each of its input's shape."""
    gshape, ushape = np.shape(gate), np.shape(up)
    g, u, shape = _broadcast_pair(gate, up, "gate", "up")
    dout = _shaped(dout, "dout", shape, "the broadcast shape")
    if gshape == shape and ushape == shape:
        og = _Out(dgate, shape, "dgate", accumulate, (g, u, dout))
        ou = _Out(dup, shape, "dup", accumulate, (g, u, dout))
        if g.size:
            _run("swiglu_backward", backend, dgate=og.buf, dup=ou.buf, dout=dout, gate=g, up=u, N=g.size)
        return og.finish(), ou.finish()
    dg, du = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    if g.size:
        _run("swiglu_backward", backend, dgate=dg, dup=du, dout=dout, gate=g, up=u, N=g.size)
    return _grad_out(dg, gshape, dgate, "dgate", accumulate), _grad_out(du, ushape, dup, "dup", accumulate)


# ---------------------------------------------------------------------- RoPE


def rope_tables(
    positions: npt.ArrayLike,
    settings: RopeSettings,
    *,
    seq_len: int | None = None,
    backend: Backend = None,
) -> tuple[F32, F32]:
    """(cos, sin), each (*positions.shape, rotary_dim / 2): the magnitude times cos / sin of
    position * inv_freq, for any positions (fractional ones too, as E2-LLM's) and any of
    cepe.rope's scaling types. seq_len: the length dynamic NTK and LongRoPE pick their table
    for (default: the largest position + 1, as transformers does at run time)."""
    if not isinstance(settings, RopeSettings):
        raise TypeError(f"settings must be a cepe.rope.RopeSettings, got {type(settings).__name__}")
    pos = np.asarray(positions)
    if pos.dtype.kind not in "iuf":
        raise TypeError(f"positions must be numbers, got dtype {pos.dtype}")
    pos = np.ascontiguousarray(pos, dtype=np.float64)
    if not np.isfinite(pos).all() or (pos < 0).any():
        raise ValueError("positions must be finite and >= 0")
    if seq_len is None:
        seq_len = int(math.floor(pos.max())) + 1 if pos.size else 0
    inv_freq, magnitude = rope_frequencies(settings, seq_len)
    half = inv_freq.shape[0]
    cos = np.zeros((*pos.shape, half), np.float32)
    sin = np.zeros((*pos.shape, half), np.float32)
    if pos.size and half:
        _run("rope_table", backend, cos_t=cos, sin_t=sin, pos=pos, inv_freq=inv_freq, N=pos.size, half=half,
             mscale=magnitude)  # fmt: skip
    return cos, sin


def _rope_run(
    backward: bool, x: object, cos: object, sin: object, layout: str, out: object, n_threads: int | None,
    backend: Backend,
) -> F32:  # fmt: skip
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    x = _array(x, "x", min_ndim=2)
    cos, sin = _array(cos, "cos", min_ndim=1), _array(sin, "sin", min_ndim=1)
    if cos.shape != sin.shape:
        raise ValueError(f"sin must have cos's shape {cos.shape}, got {sin.shape}")
    *lead, nh, hd = x.shape
    half = cos.shape[-1]
    if 2 * half > hd:
        raise ValueError(f"cos has {half} pairs per position but x's head_dim is {hd}")
    try:
        cos = np.broadcast_to(cos, (*lead, half))
        sin = np.broadcast_to(sin, (*lead, half))
    except ValueError:
        raise ValueError(f"cos {cos.shape} does not broadcast to x's positions {(*lead, half)}") from None
    cos, sin = _contiguous(cos), _contiguous(sin)
    o = _Out(out, x.shape, "out", True, (cos, sin))
    if o.buf is not x:
        o.buf[...] = x
    N = int(np.prod(lead))
    dims: dict[str, Any] = dict(cos_t=cos, sin_t=sin, N=N, nh=nh, hd=hd, half=half, interleaved=int(layout != "half"))
    if N and nh and half:
        if backward:
            _run("rope_backward", backend, dx=o.buf, **dims)
        else:
            _run("rope", backend, x=o.buf, nt=_threads(n_threads), **dims)
    return o.finish()


def rope_apply(
    x: F32,
    cos: F32,
    sin: F32,
    *,
    layout: Literal["half", "interleaved"] = "half",
    out: F32 | None = None,
    n_threads: int | None = None,
    backend: Backend = None,
) -> F32:
    """x (..., heads, head_dim) rotated by tables (cos, sin) (..., half) broadcast over x's
    positions: pairs (j, j + half) for layout "half" (HF checkpoints), (2j, 2j + 1) for
    "interleaved" (Meta, GGUF); dims past 2 * half are left alone. out=x rotates in place."""
    return _rope_run(False, x, cos, sin, layout, out, n_threads, backend)


def rope_apply_backward(
    dout: F32,
    cos: F32,
    sin: F32,
    *,
    layout: Literal["half", "interleaved"] = "half",
    out: F32 | None = None,
    backend: Backend = None,
) -> F32:
    """d x of rope_apply: dout rotated back (the transpose of the rotation)."""
    return _rope_run(True, dout, cos, sin, layout, out, None, backend)


def rope(
    x: F32,
    positions: npt.ArrayLike,
    settings: RopeSettings,
    *,
    seq_len: int | None = None,
    out: F32 | None = None,
    n_threads: int | None = None,
    backend: Backend = None,
) -> F32:
    """x (..., heads, head_dim) rotated as a model with these RoPE settings rotates a token at
    `positions` (broadcast to x's leading axes, fractional allowed), in settings.layout."""
    cos, sin = rope_tables(positions, settings, seq_len=seq_len, backend=backend)
    return rope_apply(x, cos, sin, layout=settings.layout, out=out, n_threads=n_threads, backend=backend)  # type: ignore[arg-type]


def rope_backward(
    dout: F32,
    positions: npt.ArrayLike,
    settings: RopeSettings,
    *,
    seq_len: int | None = None,
    out: F32 | None = None,
    backend: Backend = None,
) -> F32:
    """d x of rope."""
    cos, sin = rope_tables(positions, settings, seq_len=seq_len, backend=backend)
    return rope_apply_backward(dout, cos, sin, layout=settings.layout, out=out, backend=backend)  # type: ignore[arg-type]


# ----------------------------------------------------------------- attention

# attention_shape's fields in the struct's order (csrc/ops/ops.h)
_SHAPE_FIELDS = (
    "B", "Tq", "Tk", "H", "KVH", "hd", "q_rstride", "q_bstride", "kv_rstride", "kv_bstride", "valid_bstride",
    "causal", "q_offset", "window", "scale",
)  # fmt: skip


def _bcast(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return a if a.shape == shape else np.broadcast_to(a, shape)


def _rows_ok(a: np.ndarray) -> bool:
    """Heads contiguous within a row; row and batch strides whole floats, >= 0."""
    _, _, H, hd = a.shape
    s = a.strides
    heads_ok = (s[3] == 4 or hd == 1) and (s[2] == 4 * hd or H == 1)
    rows_apart = a.shape[1] == 1 or s[1] >= 4 * H * hd  # BLAS reads each row's H*hd floats
    return (
        heads_ok
        and rows_apart
        and s[1] >= 0
        and s[0] >= 0
        and s[1] % 4 == 0
        and s[0] % 4 == 0
        and _place(a) is not None
    )


class _Attn:
    """Checked attention arguments and the layout the kernel reads them in."""

    def __init__(
        self, q: object, k: object, v: object, key_mask: object, causal: bool, q_offset: int | None, window: int,
        scale: float | None, n_threads: int | None, writable_layout: bool,
    ) -> None:  # fmt: skip
        q, k, v = _array(q, "q", 4), _array(k, "k", 4), _array(v, "v", 4)
        if k.shape != v.shape:
            raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}")
        _, Tq, H, hd = q.shape
        _, Tk, KVH, khd = k.shape
        try:
            B = np.broadcast_shapes(q.shape[:1], k.shape[:1])[0]
        except ValueError:
            raise ValueError(f"q's batch {q.shape[0]} and k's {k.shape[0]} do not broadcast") from None
        if khd != hd:
            raise ValueError(f"k's head_dim {khd} differs from q's {hd}")
        if not 1 <= hd <= MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {hd}")
        if KVH < 1 or H % KVH:
            raise ValueError(f"q's {H} heads must be a multiple of k's {KVH} (grouped-query attention)")
        q_off = max(Tk - Tq, 0) if q_offset is None else operator.index(q_offset)
        win = operator.index(window)
        if q_off < 0 or win < 0:
            raise ValueError(f"q_offset and window must be >= 0, got {q_off} and {win}")
        self.q_shape, self.kv_shape = q.shape, k.shape
        q, k, v = _bcast(q, (B, Tq, H, hd)), _bcast(k, (B, Tk, KVH, hd)), _bcast(v, (B, Tk, KVH, hd))

        # the backward writes gradients laid out like q, k, v: no two elements may share memory
        def ok(a: np.ndarray) -> bool:
            shared = any(st == 0 and n > 1 for st, n in zip(a.strides, a.shape, strict=True))
            return _rows_ok(a) and not (writable_layout and shared)

        if not ok(q):
            q = _contiguous(q)
        if not (ok(k) and ok(v) and k.strides[:2] == v.strides[:2]):
            k, v = _contiguous(k), _contiguous(v)
        mask = None
        if key_mask is not None:
            if not isinstance(key_mask, np.ndarray):
                raise TypeError(f"key_mask must be a numpy.ndarray or None, got {type(key_mask).__name__}")
            if key_mask.dtype not in (np.bool_, np.uint8):
                raise TypeError(f"key_mask must have dtype bool or uint8, got {key_mask.dtype}")
            if key_mask.ndim != 2 or key_mask.shape[1] != Tk or key_mask.shape[0] not in (1, B):
                raise ValueError(f"key_mask must have shape ({B}, {Tk}) or (1, {Tk}), got {key_mask.shape}")
            mask = _bcast(key_mask.view(np.uint8), (B, Tk))
            if mask.strides[1] != 1 or _place(mask) is None:
                mask = _contiguous(mask)
        self.q, self.k, self.v, self.mask = q, k, v, mask
        self.nt = _threads(n_threads)
        self.s = dict(
            B=B, Tq=Tq, Tk=Tk, H=H, KVH=KVH, hd=hd,
            # the stride of a length-1 axis is never stepped (numpy may give it any value)
            q_rstride=q.strides[1] // 4 if Tq > 1 else H * hd, q_bstride=q.strides[0] // 4 if B > 1 else 0,
            kv_rstride=k.strides[1] // 4 if Tk > 1 else KVH * hd, kv_bstride=k.strides[0] // 4 if B > 1 else 0,
            valid_bstride=0 if mask is None or B == 1 else mask.strides[0], causal=int(bool(causal)), q_offset=q_off,
            window=win, scale=1.0 / math.sqrt(hd) if scale is None else float(scale),
        )  # fmt: skip
        self.empty = B * Tq * H == 0

    def shape(self) -> tuple[Any, ...]:
        return tuple(self.s[f] for f in _SHAPE_FIELDS)

    def inputs(self) -> dict[str, Any]:
        return dict(q=self.q, k=self.k, v=self.v, key_valid=self.mask, s=self.shape(), nt=self.nt)


def attention(
    q: F32,
    k: F32,
    v: F32,
    *,
    causal: bool = False,
    key_mask: npt.NDArray[np.bool_] | npt.NDArray[np.uint8] | None = None,
    q_offset: int | None = None,
    window: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
    out: F32 | None = None,
    lse_out: F32 | None = None,
    n_threads: int | None = None,
    backend: Backend = None,
) -> F32 | tuple[F32, F32]:
    """Scaled dot-product attention, softmax(q kᵀ · scale) v, as the engine runs it (an
    online softmax over key blocks, never the full score matrix).

    q (B, Tq, H, hd); k, v (B, Tk, KVH, hd), H a multiple of KVH (grouped-query
    attention; KVH = H is multi-head). A batch axis of 1 broadcasts. Self-attention
    (causal=True), bidirectional attention (causal=False, Tq = Tk) and cross-attention
    (Tq != Tk) are this one function:
      causal    query t (at slot q_offset + t among the keys) sees keys j <= q_offset + t;
                q_offset defaults to Tk - Tq (the queries are the last Tq keys' tokens)
      window    > 0: also j > q_offset + t - window (sliding-window attention)
      key_mask  (B, Tk) or (1, Tk) bool / uint8: False keys are never attended (padding)
      scale     default 1 / sqrt(hd)
    A query that sees no key gets a zero output (and lse -inf). Returns out
    (B, Tq, H, hd), and with return_lse=True also lse (B, Tq, H), the log-sum-exp of each
    query's scaled, masked scores, which attention_backward takes."""
    a = _Attn(q, k, v, key_mask, causal, q_offset, window, scale, n_threads, False)
    B, Tq, H, hd = a.s["B"], a.s["Tq"], a.s["H"], a.s["hd"]
    o = _Out(out, (B, Tq, H, hd), "out", False, (a.q, a.k, a.v))
    if not return_lse:
        if not a.empty:
            _run("attention", backend, out=o.buf, **a.inputs())
        return o.finish()
    ol = _Out(lse_out, (B, Tq, H), "lse_out", False, (a.q, a.k, a.v))
    if not a.empty:
        _run("attention_lse", backend, out=o.buf, lse=ol.buf, **a.inputs())
    return o.finish(), ol.finish()


def attention_backward(
    dout: F32,
    q: F32,
    k: F32,
    v: F32,
    out: F32,
    lse: F32 | None = None,
    *,
    causal: bool = False,
    key_mask: npt.NDArray[np.bool_] | npt.NDArray[np.uint8] | None = None,
    q_offset: int | None = None,
    window: int = 0,
    scale: float | None = None,
    dq: F32 | None = None,
    dk: F32 | None = None,
    dv: F32 | None = None,
    need: str = "qkv",
    accumulate: bool = False,
    n_threads: int | None = None,
    backend: Backend = None,
) -> tuple[F32 | None, F32 | None, F32 | None]:
    """(d q, d k, d v) of attention with the same options, from its out and lse (None:
    recomputed). need names the gradients wanted ("qkv", "kv", "q", ...); the others are
    not computed and come back None. Memory stays O(block) per thread (FlashAttention-2's
    recomputation), never O(Tq · Tk)."""
    if not set(need) <= set("qkv"):
        raise ValueError(f"need must name some of q, k, v, got {need!r}")
    a = _Attn(q, k, v, key_mask, causal, q_offset, window, scale, n_threads, True)
    for name, user in (("dq", dq), ("dk", dk), ("dv", dv)):
        if user is not None and not isinstance(user, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray or None, got {type(user).__name__}")
    B, Tq, H, hd = a.s["B"], a.s["Tq"], a.s["H"], a.s["hd"]
    dout = _shaped(dout, "dout", (B, Tq, H, hd))
    out = _shaped(out, "out", (B, Tq, H, hd))
    if lse is not None:
        lse = _shaped(lse, "lse", (B, Tq, H))
    users = dict(q=dq, k=dk, v=dv)
    grads: dict[str, F32 | None] = {}
    direct: dict[str, bool] = {}
    for name, x in (("q", a.q), ("k", a.k), ("v", a.v)):
        user = users[name]
        direct[name] = (
            name in need
            and isinstance(user, np.ndarray)
            and user.dtype == np.float32
            and user.shape == x.shape
            and user.strides == x.strides
            and user.flags.writeable
            and _place(user) is not None
            and not any(np.may_share_memory(user, i) for i in (a.q, a.k, a.v, dout, out))
        )
        if direct[name]:
            assert user is not None
            if not accumulate:
                user[...] = 0
            grads["d" + name] = user
        else:
            grads["d" + name] = _zeros_laid_out_like(x) if name in need else None
    if not a.empty:
        _run("attention_backward", backend, dout=dout, out=out, lse=lse, **grads, **a.inputs())
    result: list[F32 | None] = []
    for name, orig in (("q", a.q_shape), ("k", a.kv_shape), ("v", a.kv_shape)):
        g = grads["d" + name]
        if g is None or direct[name]:
            result.append(g)
        else:
            result.append(_grad_out(np.ascontiguousarray(g), orig, users[name], "d" + name, accumulate))
    return result[0], result[1], result[2]


def _zeros_laid_out_like(a: np.ndarray) -> F32:
    """Zeros of a's shape and strides (the backward writes each gradient laid out like its input)."""
    if a.flags.c_contiguous:
        return np.zeros(a.shape, np.float32)
    lo, hi = byte_bounds(a)
    buf = np.zeros((hi - lo + 3) // 4, np.float32)
    return np.ndarray(a.shape, np.float32, buffer=buf, strides=a.strides)


# ------------------------------------------------------------ cross-attention


class _CrossWeights:
    def __init__(self, weights: dict[str, F32], C: int, D: int) -> None:
        need = ("norm", "q_proj", "k_proj", "v_proj", "o_proj")
        missing = [n for n in need if n not in weights]
        if missing:
            raise KeyError(f"weights: missing {', '.join(missing)} (needs {', '.join(need)})")
        self.norm = _array(weights["norm"], "weights['norm']", 1)
        self.wq = _array(weights["q_proj"], "weights['q_proj']", 2)
        self.wk = _array(weights["k_proj"], "weights['k_proj']", 2)
        self.wv = _array(weights["v_proj"], "weights['v_proj']", 2)
        self.wo = _array(weights["o_proj"], "weights['o_proj']", 2)
        if self.norm.shape != (C,) or self.wq.shape[1] != C or self.wo.shape != (C, self.wq.shape[0]):
            raise ValueError(
                f"weights: norm (C,), q_proj (H*hd, C), o_proj (C, H*hd) with C = {C} (hidden's last axis), got "
                f"{self.norm.shape}, {self.wq.shape}, {self.wo.shape}"
            )
        if self.wk.shape[1] != D or self.wv.shape != self.wk.shape:
            raise ValueError(
                f"weights: k_proj, v_proj (KVH*hd, D) with D = {D} (states' last axis), got {self.wk.shape}, "
                f"{self.wv.shape}"
            )


def _cross_forward(
    hidden: F32, states: F32, w: _CrossWeights, n_heads: int, key_mask: Any, eps: float, nt: int | None,
    backend: Backend,
) -> dict[str, Any]:  # fmt: skip
    B, T, _ = hidden.shape
    N = states.shape[1]
    H = operator.index(n_heads)
    if H < 1 or w.wq.shape[0] % H:
        raise ValueError(f"n_heads must divide q_proj's {w.wq.shape[0]} rows, got {n_heads}")
    hd = w.wq.shape[0] // H
    if w.wk.shape[0] % hd:
        raise ValueError(f"k_proj's {w.wk.shape[0]} rows are not a whole number of {hd}-dim heads")
    KVH = w.wk.shape[0] // hd
    kw = dict(n_threads=nt, backend=backend)
    hn = rmsnorm(hidden, w.norm, eps, **kw)
    q = linear(hn, w.wq, **kw).reshape(B, T, H, hd)
    k = linear(states, w.wk, **kw).reshape(-1, N, KVH, hd)
    v = linear(states, w.wv, **kw).reshape(-1, N, KVH, hd)
    o, lse = attention(q, k, v, key_mask=key_mask, return_lse=True, **kw)
    y = linear(o.reshape(B, T, H * hd), w.wo, **kw)
    return dict(hn=hn, q=q, k=k, v=v, o=o, lse=lse, y=y)


def _cross_inputs(hidden: object, states: object) -> tuple[F32, F32]:
    hidden, states = _array(hidden, "hidden", 3), _array(states, "states", 3)
    if states.shape[0] not in (1, hidden.shape[0]):
        raise ValueError(f"states' batch {states.shape[0]} must be 1 or hidden's {hidden.shape[0]}")
    return hidden, states


def cross_attention(
    hidden: F32,
    states: F32,
    weights: dict[str, F32],
    *,
    n_heads: int,
    key_mask: npt.NDArray[np.bool_] | npt.NDArray[np.uint8] | None = None,
    eps: float = 1e-6,
    n_threads: int | None = None,
    backend: Backend = None,
) -> F32:
    """A CEPE cross-attention block (spec CEPE.md §3), without its residual:
    o_proj(attention(q_proj(rmsnorm(hidden)), k_proj(states), v_proj(states))), no RoPE, no
    causal mask. hidden (B, T, C) decoder states, states (B or 1, N, D) encoder states,
    key_mask (B, N) the valid context tokens (a row with none adds zero). weights: 'norm'
    (C,), 'q_proj' (H*hd, C), 'k_proj', 'v_proj' (KVH*hd, D), 'o_proj' (C, H*hd), as a
    checkpoint's layers.<i>.cross_attn* tensors hold them."""
    hidden, states = _cross_inputs(hidden, states)
    w = _CrossWeights(weights, hidden.shape[2], states.shape[2])
    return _cross_forward(hidden, states, w, n_heads, key_mask, eps, n_threads, backend)["y"]


def cross_attention_backward(
    dout: F32,
    hidden: F32,
    states: F32,
    weights: dict[str, F32],
    *,
    n_heads: int,
    key_mask: npt.NDArray[np.bool_] | npt.NDArray[np.uint8] | None = None,
    eps: float = 1e-6,
    n_threads: int | None = None,
    backend: Backend = None,
) -> dict[str, F32]:
    """The gradients of cross_attention (recomputing its forward): {'hidden', 'states',
    'norm', 'q_proj', 'k_proj', 'v_proj', 'o_proj'}."""
    hidden, states = _cross_inputs(hidden, states)
    w = _CrossWeights(weights, hidden.shape[2], states.shape[2])
    f = _cross_forward(hidden, states, w, n_heads, key_mask, eps, n_threads, backend)
    dout = _array(dout, "dout", 3)
    if dout.shape != f["y"].shape:
        raise ValueError(f"dout must have shape {f['y'].shape}, got {dout.shape}")
    kw: dict[str, Any] = dict(n_threads=n_threads, backend=backend)
    B, T, H, hd = f["q"].shape
    do, dwo = linear_backward(dout, f["o"].reshape(B, T, H * hd), w.wo, **kw)
    dq, dk, dv = attention_backward(
        do.reshape(B, T, H, hd), f["q"], f["k"], f["v"], f["o"], f["lse"], key_mask=key_mask, **kw
    )
    assert dq is not None and dk is not None and dv is not None
    dhn, dwq = linear_backward(dq.reshape(B, T, -1), f["hn"], w.wq, **kw)
    sk = dk.reshape(*dk.shape[:2], -1)
    sv = dv.reshape(*dv.shape[:2], -1)
    ds, dwk = linear_backward(sk, states, w.wk, **kw)
    linear_backward(sv, states, w.wv, dx=ds, accumulate=True, weight_grad=False, **kw)
    _, dwv = linear_backward(sv, states, w.wv, **kw)
    dh, dnorm = rmsnorm_backward(dhn, hidden, w.norm, eps, backend=backend)
    assert dwo is not None and dwq is not None and dwk is not None and dwv is not None and dnorm is not None
    return dict(hidden=dh, states=ds, norm=dnorm, q_proj=dwq, k_proj=dwk, v_proj=dwv, o_proj=dwo)


# --------------------------------------------------------------------- losses


def _ce_args(logits: object, targets: object) -> tuple[F32, npt.NDArray[np.int32], int, int]:
    logits = _contiguous(_array(logits, "logits", min_ndim=1))
    V = logits.shape[-1]
    t = _ints(targets, "targets", V, IGNORE_INDEX)
    if t.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {logits.shape[:-1]} (logits' leading axes), got {t.shape}")
    return logits, t, t.size, V


def cross_entropy(
    logits: F32,
    targets: npt.NDArray[np.integer],
    *,
    reduction: Literal["none", "mean", "sum"] = "none",
    backend: Backend = None,
) -> F32 | float:
    """-log softmax(logits)[target] per row: logits (..., V), targets (...) in [0, V) or
    IGNORE_INDEX (scores 0, and is left out of the mean). reduction as torch's."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    z, t, N, V = _ce_args(logits, targets)
    losses = np.zeros(t.shape, np.float32)
    if N and V:
        _run("cross_entropy", backend, losses=losses, dlogits=None, logits=z, targets=t, N=N, V=V, dloss_scale=1.0)
    if reduction == "none":
        return losses
    total = float(losses.sum(dtype=np.float64))
    if reduction == "sum":
        return total
    n = int((t != IGNORE_INDEX).sum())
    return total / n if n else math.nan


def cross_entropy_backward(
    logits: F32,
    targets: npt.NDArray[np.integer],
    dloss: float = 1.0,
    *,
    reduction: Literal["none", "mean", "sum"] = "sum",
    out: F32 | None = None,
    accumulate: bool = False,
    backend: Backend = None,
) -> F32:
    """d logits of dloss * cross_entropy(logits, targets, reduction=...) ('none' gives the
    gradient of the sum of the rows, each row's loss weighted by dloss)."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    z, t, N, V = _ce_args(logits, targets)
    scale = float(dloss)
    if reduction == "mean":
        n = int((t != IGNORE_INDEX).sum())
        scale = scale / n if n else 0.0
    losses = np.zeros(t.shape, np.float32)
    o = _Out(out, z.shape, "out", accumulate, (z,))
    if N and V:
        _run("cross_entropy", backend, losses=losses, dlogits=o.buf, logits=z, targets=t, N=N, V=V, dloss_scale=scale)
    return o.finish()
