"""Test helpers over the op table (csrc/backend.h): every forward and
backward op, the losses, the optimizer ops and the bf16 ops, so
tests/test_ops.py can check the CPU ops against PyTorch and
tests/test_cuda_ops.py a device backend against the CPU.

They run the ops through cepe_c._op, the binding cepe.ops is built on, and
add what only tests want:

- each takes backend=None (the static CPU table) or a "cepe.backend" capsule
  (cepe_c._sim_backend(), cepe_cuda.backend()) and runs the op through that
  table; on a device backend the arrays are copied to the device and back;
- arguments are NumPy arrays of the exact dtype, C-contiguous, aligned and in
  native byte order (no silent conversion: a test passing the wrong thing
  should fail loudly); shapes are checked against each other;
- outputs are new arrays. Outputs the ops add into (the += gradients,
  matmul's accumulate) start at zero, or at init times a fixed pattern in
  [-1, 1] when init != 0, so a test can tell += from =.
"""

from __future__ import annotations

import math
import operator

import numpy as np

import cepe_c

_INT_MAX = 2**31 - 1
NORM_CHUNK = cepe_c.NORM_CHUNK


# ------------------------------------------------------------------ argument checks


def _arr(obj, what: str, dtype, ndim: int = -1, alt=None) -> np.ndarray:
    if not isinstance(obj, np.ndarray):
        raise TypeError(f"{what} must be a numpy.ndarray, got {type(obj).__name__}")
    kinds = {np.dtype(dtype).type} | ({np.dtype(alt).type} if alt is not None else set())
    if obj.dtype.type not in kinds:
        raise TypeError(f"{what} must have dtype {np.dtype(dtype)}, got {obj.dtype}")
    if ndim >= 0 and obj.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got {obj.ndim}")
    if not (obj.dtype.isnative and obj.flags.c_contiguous and obj.flags.aligned):
        raise ValueError(f"{what} must be C-contiguous, aligned and native-endian")
    if any(d > _INT_MAX // 4 for d in obj.shape):
        raise ValueError(f"{what} is too large")
    return obj


def _dim_is(a: np.ndarray, what: str, axis: int, n: int) -> None:
    if a.shape[axis] != n:
        raise ValueError(f"{what}: axis {axis} has {a.shape[axis]} entries, expected {n}")


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what} must have the same shape as the forward's input")


def _threads(n_threads) -> int:
    n = operator.index(n_threads)
    if n < 1:
        raise ValueError(f"n_threads must be >= 1, got {n}")
    return n


def _ids_ok(ids: np.ndarray, V: int) -> None:
    bad = np.flatnonzero((ids < 0) | (ids >= V))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"ids[{i}] = {ids[i]} is outside [0, {V})")


def _zeros(shape) -> np.ndarray:
    return np.zeros(shape, np.float32)


def _seed(a: np.ndarray | None, init: float) -> None:
    """init * a fixed pattern in [-1, 1] into a +=-output (nothing when init == 0)."""
    init = np.float32(init)
    if a is None or init == 0:
        return
    h = (np.arange(a.size, dtype=np.uint64) * 2654435761) & 0xFFFFFFFF  # Knuth's multiplicative hash
    pattern = ((h >> 16) % 2001).astype(np.float32) / np.float32(1000) - np.float32(1)
    a.reshape(-1)[:] = init * pattern


def _call(op: str, backend, **args) -> None:
    """cepe_c._op with (array, offset in items) pointers turned into byte offsets."""
    for k, v in args.items():
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], np.ndarray):
            args[k] = (v[0], v[1] * v[0].itemsize)
    cepe_c._op(op, backend, **args)


# ----------------------------------------------------------------------- embedding


def embedding_forward(ids, wte, *, backend=None) -> np.ndarray:
    """(ids int32 (N,), wte (V, C)) -> out (N, C)"""
    ids = _arr(ids, "ids", np.int32, 1)
    wte = _arr(wte, "wte", np.float32, 2)
    _ids_ok(ids, wte.shape[0])
    N, C = ids.shape[0], wte.shape[1]
    out = _zeros((N, C))
    _call("embedding", backend, out=out, ids=ids, wte=wte, N=N, C=C)
    return out


def embedding_backward(dout, ids, V, *, init=0.0, backend=None) -> np.ndarray:
    """(dout (N, C), ids (N,), V, init=0) -> dwte (V, C)"""
    dout = _arr(dout, "dout", np.float32, 2)
    ids = _arr(ids, "ids", np.int32, 1)
    _dim_is(ids, "ids", 0, dout.shape[0])
    _ids_ok(ids, V)
    N, C = dout.shape
    dwte = _zeros((V, C))
    _seed(dwte, init)
    _call("embedding_backward", backend, dwte=dwte, dout=dout, ids=ids, N=N, C=C)
    return dwte


# ------------------------------------------------------------------------- rmsnorm


def rmsnorm_forward(inp, weight, eps, n_threads=1, *, backend=None) -> np.ndarray:
    """(inp (N, C), weight (C,), eps, n_threads=1) -> out"""
    nt = _threads(n_threads)
    inp = _arr(inp, "inp", np.float32, 2)
    weight = _arr(weight, "weight", np.float32, 1)
    _dim_is(weight, "weight", 0, inp.shape[1])
    out = _zeros(inp.shape)
    N, C = inp.shape
    _call("rmsnorm", backend, out=out, inp=inp, w=weight, N=N, C=C, eps=eps, nt=nt)
    return out


def rmsnorm_backward(dout, inp, weight, eps, dweight=True, *, init=0.0, backend=None):
    """(dout, inp, weight, eps, dweight=True, init=0) -> (dinp, dweight | None)"""
    dout = _arr(dout, "dout", np.float32, 2)
    inp = _arr(inp, "inp", np.float32, 2)
    weight = _arr(weight, "weight", np.float32, 1)
    _same_shape(dout, inp, "dout")
    _dim_is(weight, "weight", 0, inp.shape[1])
    dinp, dw = _zeros(inp.shape), _zeros(weight.shape) if dweight else None
    _seed(dinp, init)
    _seed(dw, init)
    N, C = inp.shape
    _call("rmsnorm_backward", backend, dinp=dinp, dweight=dw, dout=dout, inp=inp, weight=weight, N=N, C=C, eps=eps)
    return dinp, dw


# -------------------------------------------------------------------------- matmul


def _matmul(op: str, inp, weight, weight_dtype, n_threads, init, backend) -> np.ndarray:
    nt = _threads(n_threads)
    inp = _arr(inp, "inp", np.float32, 2)
    weight = _arr(weight, "weight", weight_dtype, 2)
    _dim_is(weight, "weight", 1, inp.shape[1])
    (N, C), OC = inp.shape, weight.shape[0]
    out = _zeros((N, OC))
    _seed(out, init)
    acc = int(np.float32(init) != 0)
    _call(op, backend, out=out, inp=inp, w=weight, N=N, C=C, OC=OC, accumulate=acc, nt=nt)
    return out


def matmul_forward(inp, weight, n_threads=1, *, init=0.0, backend=None) -> np.ndarray:
    """(inp (N, C), weight (OC, C), n_threads=1, init=0) -> out (N, OC); init != 0:
    out starts at init * pattern and the op runs with accumulate = 1."""
    return _matmul("matmul", inp, weight, np.float32, n_threads, init, backend)


def matmul_backward(dout, inp, weight, dinp=True, dweight=True, dinp_into=None, n_threads=1, *, init=0.0, backend=None):
    """(dout, inp, weight, dinp=True, dweight=True, dinp_into=None, n_threads=1, init=0) -> (dinp, dweight).
    dinp_into: an existing (N, C) array that receives dinp with accumulate = 1
    (tests the flag); otherwise a new array with accumulate = 0. init seeds
    dweight (+=)."""
    nt = _threads(n_threads)
    dout = _arr(dout, "dout", np.float32, 2)
    inp = _arr(inp, "inp", np.float32, 2)
    weight = _arr(weight, "weight", np.float32, 2)
    _dim_is(weight, "weight", 1, inp.shape[1])
    _dim_is(dout, "dout", 0, inp.shape[0])
    _dim_is(dout, "dout", 1, weight.shape[0])
    (N, C), OC = inp.shape, weight.shape[0]
    accumulate = 0
    if dinp_into is not None:
        dinp_out = _arr(dinp_into, "dinp_into", np.float32, 2)
        _same_shape(dinp_out, inp, "dinp_into")
        if not dinp_out.flags.writeable:
            raise ValueError("dinp_into must be writeable")
        accumulate = 1
    else:
        dinp_out = _zeros(inp.shape) if dinp else None
    dw = _zeros(weight.shape) if dweight else None
    _seed(dw, init)
    _call(
        "matmul_backward", backend, dinp=dinp_out, dweight=dw, dout=dout, inp=inp, weight=weight,
        N=N, C=C, OC=OC, accumulate=accumulate, nt=nt,
    )  # fmt: skip
    return dinp_out, dw


# ---------------------------------------------------------------------------- rope


def rope_table(pos, inv_freq, mscale=1.0, *, backend=None):
    """(pos float64 (N,), inv_freq (half,), mscale=1) -> (cos, sin) (N, half)"""
    pos = _arr(pos, "pos", np.float64, 1)
    inv_freq = _arr(inv_freq, "inv_freq", np.float32, 1)
    N, half = pos.shape[0], inv_freq.shape[0]
    cos, sin = _zeros((N, half)), _zeros((N, half))
    _call("rope_table", backend, cos_t=cos, sin_t=sin, pos=pos, inv_freq=inv_freq, N=N, half=half, mscale=mscale)
    return cos, sin


def _rope(x, cos, sin, interleaved, n_threads, backend, backward: bool) -> np.ndarray:
    """x (N, nh, hd) copied and rotated (backward: back-rotated)."""
    nt = _threads(n_threads)
    x = _arr(x, "x", np.float32, 3)
    cos = _arr(cos, "cos", np.float32, 2)
    sin = _arr(sin, "sin", np.float32, 2)
    _dim_is(cos, "cos", 0, x.shape[0])
    _same_shape(sin, cos, "sin")
    (N, nh, hd), half = x.shape, cos.shape[1]
    if 2 * half > hd:
        raise ValueError(f"cos has {half} pairs but head_dim is {hd}")
    y = x.copy(order="C")
    dims = dict(cos_t=cos, sin_t=sin, N=N, nh=nh, hd=hd, half=half, interleaved=int(bool(interleaved)))
    if backward:
        _call("rope_backward", backend, dx=y, **dims)
    else:
        _call("rope", backend, x=y, nt=nt, **dims)
    return y


def rope_forward(x, cos, sin, interleaved=False, n_threads=1, *, backend=None) -> np.ndarray:
    """(x (N, nh, hd), cos (N, half), sin, interleaved=False, n_threads=1) -> rotated copy"""
    return _rope(x, cos, sin, interleaved, n_threads, backend, backward=False)


def rope_backward(x, cos, sin, interleaved=False, n_threads=1, *, backend=None) -> np.ndarray:
    """(dx (N, nh, hd), cos, sin, interleaved=False) -> gradient of the unrotated x"""
    return _rope(x, cos, sin, interleaved, n_threads, backend, backward=True)


# -------------------------------------------------------------------------- swiglu


def swiglu_forward(gate, up, n_threads=1, *, backend=None) -> np.ndarray:
    """(gate, up, n_threads=1) -> silu(gate) * up"""
    nt = _threads(n_threads)
    gate = _arr(gate, "gate", np.float32)
    up = _arr(up, "up", np.float32)
    _same_shape(up, gate, "up")
    out = _zeros(gate.shape)
    _call("swiglu", backend, out=out, gate=gate, up=up, N=gate.size, nt=nt)
    return out


def swiglu_backward(dout, gate, up, *, init=0.0, backend=None):
    """(dout, gate, up, init=0) -> (dgate, dup)"""
    dout = _arr(dout, "dout", np.float32)
    gate = _arr(gate, "gate", np.float32)
    up = _arr(up, "up", np.float32)
    _same_shape(gate, dout, "gate")
    _same_shape(up, dout, "up")
    dgate, dup = _zeros(gate.shape), _zeros(gate.shape)
    _seed(dgate, init)
    _seed(dup, -init)
    _call("swiglu_backward", backend, dgate=dgate, dup=dup, dout=dout, gate=gate, up=up, N=gate.size)
    return dgate, dup


# ----------------------------------------------------------------------- attention


# attention_shape's fields, in the struct's order (csrc/ops/ops.h)
_SHAPE_FIELDS = "B Tq Tk H KVH hd q_rstride q_bstride kv_rstride kv_bstride valid_bstride causal q_offset window scale"


class _Attention:
    """Checked attention arguments, and the layout the ops see:
    - plain: q, k, v as given, contiguous;
    - fused: q, k, v packed into one (B, T, H + 2*KVH, hd) buffer, as a fused
      QKV projection writes them: row strides wider than a row;
    - kv_capacity > Tk: k, v (and key_valid) in (B, kv_capacity, ...) buffers
      as a KV cache holds them: batch strides wider than Tk rows, the rows
      past Tk filled with NaN (k, v) that no op may read.
    Gradients of k, v come back laid out like them (and are unpacked)."""

    def __init__(self, q, k, v, key_valid, causal, q_offset, window, scale, n_threads, fused, kv_capacity):
        self.q = q = _arr(q, "q", np.float32, 4)
        self.k = k = _arr(k, "k", np.float32, 4)
        self.v = v = _arr(v, "v", np.float32, 4)
        _same_shape(v, k, "v")
        self.nt = _threads(n_threads)
        B, Tq, H, hd = q.shape
        Tk, KVH = k.shape[1], k.shape[2]
        _dim_is(k, "k", 0, B)
        _dim_is(k, "k", 3, hd)
        if KVH < 1 or H % KVH != 0 or hd < 1 or hd > 256 or q_offset < 0 or window < 0:
            raise ValueError(
                f"bad attention shape: H={H} KVH={KVH} hd={hd} (<= 256) q_offset={q_offset} window={window}"
            )
        valid = None
        if key_valid is not None:
            valid = _arr(key_valid, "key_valid", np.uint8, 2, alt=np.bool_)
            _dim_is(valid, "key_valid", 0, B)
            _dim_is(valid, "key_valid", 1, Tk)
        scale = 1.0 / math.sqrt(hd) if scale is None else float(scale)
        if fused and kv_capacity:
            raise ValueError("fused=True and kv_capacity are exclusive")
        if kv_capacity and kv_capacity < Tk:
            raise ValueError(f"kv_capacity {kv_capacity} is below Tk = {Tk}")
        if fused and Tq != Tk:
            raise ValueError("fused=True needs Tq == Tk (self-attention)")
        self.fused, self.cap = bool(fused), int(kv_capacity)
        self.hq, self.hkv = H * hd, KVH * hd
        self.s = dict(
            B=B, Tq=Tq, Tk=Tk, H=H, KVH=KVH, hd=hd, causal=int(bool(causal)), q_offset=q_offset, window=window,
            scale=scale, q_rstride=H * hd, q_bstride=Tq * H * hd, kv_rstride=KVH * hd, kv_bstride=Tk * KVH * hd,
            valid_bstride=Tk,
        )  # fmt: skip
        self.inputs = dict(q=q, k=k, v=v, key_valid=valid)
        if self.fused:
            W = self.hq + 2 * self.hkv
            qkv = np.concatenate([a.reshape(B, Tq, -1) for a in (q, k, v)], axis=2)
            self.s.update(q_rstride=W, kv_rstride=W, q_bstride=Tq * W, kv_bstride=Tq * W)
            self.inputs.update(q=(qkv, 0), k=(qkv, self.hq), v=(qkv, self.hq + self.hkv))
        elif self.cap:
            cap, W = self.cap, self.hkv
            kcap, vcap = (np.full((B, cap, W), np.nan, np.float32) for _ in range(2))  # rows past Tk: never read
            kcap[:, :Tk] = k.reshape(B, Tk, W)
            vcap[:, :Tk] = v.reshape(B, Tk, W)
            self.s.update(kv_bstride=cap * W, valid_bstride=cap)
            self.inputs.update(k=kcap, v=vcap)
            if valid is not None:  # past Tk: a pattern the masks must not need
                validcap = (np.arange(cap, dtype=np.uint8) & 1)[None, :].repeat(B, axis=0)
                validcap[:, :Tk] = valid.view(np.uint8)
                self.inputs.update(key_valid=validcap)

    def shape(self) -> tuple:
        return tuple(self.s[f] for f in _SHAPE_FIELDS.split())


def _attention_forward(with_lse: bool, q, k, v, key_valid, causal, q_offset, window, scale, n_threads, fused,
                       kv_capacity, backend):  # fmt: skip
    a = _Attention(q, k, v, key_valid, causal, q_offset, window, scale, n_threads, fused, kv_capacity)
    out = _zeros(a.q.shape)
    if not with_lse:
        _call("attention", backend, out=out, s=a.shape(), nt=a.nt, **a.inputs)
        return out
    lse = _zeros(a.q.shape[:3])
    _call("attention_lse", backend, out=out, lse=lse, s=a.shape(), nt=a.nt, **a.inputs)
    return out, lse


def attention_forward(q, k, v, key_valid=None, causal=False, q_offset=0, window=0, scale=None, n_threads=1,
                      fused=False, *, kv_capacity=0, backend=None) -> np.ndarray:  # fmt: skip
    """(q (B,Tq,H,hd), k, v (B,Tk,KVH,hd), key_valid=None, causal=False, q_offset=0, window=0, scale=None,
    n_threads=1, fused=False, kv_capacity=0) -> out (B,Tq,H,hd)"""
    return _attention_forward(False, q, k, v, key_valid, causal, q_offset, window, scale, n_threads, fused,
                              kv_capacity, backend)  # fmt: skip


def attention_forward_lse(q, k, v, key_valid=None, causal=False, q_offset=0, window=0, scale=None, n_threads=1,
                          fused=False, *, kv_capacity=0, backend=None):  # fmt: skip
    """(same as attention_forward) -> (out, lse (B,Tq,H))"""
    return _attention_forward(True, q, k, v, key_valid, causal, q_offset, window, scale, n_threads, fused,
                              kv_capacity, backend)  # fmt: skip


def attention_backward(dout, out, lse, q, k, v, key_valid=None, causal=False, q_offset=0, window=0, scale=None,
                       n_threads=1, fused=False, need="qkv", *, kv_capacity=0, init=0.0, backend=None):  # fmt: skip
    """(dout, out, lse | None, q, k, v, <attention options>, need='qkv', init=0) -> (dq, dk, dv); `need`
    names the gradients to compute ("qkv", "kv", "q", ...), the others are
    passed to C as NULL and returned as None."""
    a = _Attention(q, k, v, key_valid, causal, q_offset, window, scale, n_threads, fused, kv_capacity)
    dout = _arr(dout, "dout", np.float32, 4)
    out = _arr(out, "out", np.float32, 4)
    _same_shape(dout, a.q, "dout")
    _same_shape(out, a.q, "out")
    if lse is not None:
        lse = _arr(lse, "lse", np.float32, 3)
        for d in range(3):
            _dim_is(lse, "lse", d, a.q.shape[d])
    dq = _zeros(a.q.shape) if "q" in need else None
    dk = _zeros(a.k.shape) if "k" in need else None
    dv = _zeros(a.v.shape) if "v" in need else None
    _seed(dq, init)
    _seed(dk, init)
    _seed(dv, -init)
    B, Tq, Tk = a.s["B"], a.s["Tq"], a.s["Tk"]
    hq, hkv = a.hq, a.hkv
    grads = dict(dq=dq, dk=dk, dv=dv)
    if a.fused:  # one buffer laid out like qkv
        g = np.zeros((B, Tq, hq + 2 * hkv), np.float32)
        for name, arr, lo, width in (("dq", dq, 0, hq), ("dk", dk, hq, hkv), ("dv", dv, hq + hkv, hkv)):
            if arr is not None:
                g[:, :, lo : lo + width] = arr.reshape(B, Tq, width)
                grads[name] = (g, lo)
    elif a.cap:  # (B, capacity, KVH*hd), NaN past Tk: the op must leave that alone
        for name, arr in (("dk", dk), ("dv", dv)):
            if arr is not None:
                g = np.full((B, a.cap, hkv), np.nan, np.float32)
                g[:, :Tk] = arr.reshape(B, Tk, hkv)
                grads[name] = g
    _call("attention_backward", backend, dout=dout, out=out, lse=lse, s=a.shape(), nt=a.nt, **grads, **a.inputs)
    if a.fused:
        for arr, lo, width in ((dq, 0, hq), (dk, hq, hkv), (dv, hq + hkv, hkv)):
            if arr is not None:
                arr[...] = g[:, :, lo : lo + width].reshape(arr.shape)
    elif a.cap:
        for name, arr in (("dk", dk), ("dv", dv)):
            if arr is not None:
                if not np.isnan(grads[name][:, Tk:]).all():
                    raise RuntimeError("attention_backward wrote into the kv rows past Tk")
                arr[...] = grads[name][:, :Tk].reshape(arr.shape)
    return dq, dk, dv


# -------------------------------------------------------------------------- losses


def cross_entropy(logits, targets, dloss_scale=1.0, grad=True, *, init=0.0, backend=None):
    """(logits (N,V), targets int32 (N,), dloss_scale=1, grad=True, init=0) -> (losses, dlogits)"""
    z = _arr(logits, "logits", np.float32, 2)
    t = _arr(targets, "targets", np.int32, 1)
    _dim_is(t, "targets", 0, z.shape[0])
    N, V = z.shape
    ignore = cepe_c.IGNORE_INDEX
    if ((t != ignore) & ((t < 0) | (t >= V))).any():  # the table's contract: the caller range-checks targets
        raise ValueError(f"targets must be in [0, {V}) or {ignore}")
    losses, dz = _zeros(N), _zeros(z.shape) if grad else None
    _seed(dz, init)
    _call("cross_entropy", backend, losses=losses, dlogits=dz, logits=z, targets=t, N=N, V=V, dloss_scale=dloss_scale)
    return losses, dz


def kl_topk(logits, teacher_probs, teacher_index, mode, delta=0.0, dloss_scale=1.0, grad=True, *, init=0.0,
            backend=None):  # fmt: skip
    """(logits (N,V), teacher_probs f16 (N,K+1), teacher_index int32 (N,K), mode, delta=0, dloss_scale=1,
    grad=True, init=0) -> (losses, dlogits)"""
    z = _arr(logits, "logits", np.float32, 2)
    p = _arr(teacher_probs, "teacher_probs", np.float16, 2, alt=np.uint16)
    ix = _arr(teacher_index, "teacher_index", np.int32, 2)
    (N, V), K = z.shape, ix.shape[1]
    _dim_is(ix, "teacher_index", 0, N)
    _dim_is(p, "teacher_probs", 0, N)
    _dim_is(p, "teacher_probs", 1, K + 1)
    smooth, drop = cepe_c.KL_SMOOTH, cepe_c.KL_DROP
    # what the CPU op refuses, refused here for every backend (a device backend sees the indices only on the device)
    bad = K < 1 or mode not in (smooth, drop) or (mode == smooth and not np.float32(delta) >= 0)
    if bad or ((ix < 0) | (ix >= V)).any():
        raise ValueError(
            f"kl_topk: mode must be {smooth} (smooth, delta >= 0) or {drop} (drop), K >= 1, teacher_index in [0, {V})"
        )
    losses, dz = _zeros(N), _zeros(z.shape) if grad else None
    _seed(dz, init)
    _call(
        "kl_topk", backend, losses=losses, dlogits=dz, logits=z, teacher_probs=p, teacher_index=ix,
        N=N, V=V, K=K, mode=mode, delta=delta, dloss_scale=dloss_scale,
    )  # fmt: skip
    return losses, dz


def half_to_float(bits) -> np.ndarray:
    """(uint16 or float16 array) -> float32, via cepe_half_to_float"""
    h = _arr(bits, "bits", np.uint16, alt=np.float16)
    out = _zeros(h.shape)
    cepe_c._half_to_float(h, out)
    return out


# ----------------------------------------------------------------------- optimizer


def sumsq_chunks(g, n_threads=1, *, backend=None) -> np.ndarray:
    """(g (n,), n_threads=1) -> float64 sums of squares per CEPE_NORM_CHUNK chunk"""
    nt = _threads(n_threads)
    g = _arr(g, "g", np.float32, 1)
    partial = np.zeros((g.size + NORM_CHUNK - 1) // NORM_CHUNK, np.float64)
    _call("sumsq_chunks", backend, partial=partial, g=g, n=g.size, nt=nt)
    return partial


def scale(x, s, n_threads=1, *, backend=None) -> np.ndarray:
    """(x, s, n_threads=1) -> x * s"""
    nt = _threads(n_threads)
    y = _arr(x, "x", np.float32).copy(order="C")
    _call("scale", backend, x=y, s=s, n=y.size, nt=nt)
    return y


def adamw(p, g, m, v, decay, w1, b2, w2, bc2_sqrt, neg_step, eps, n_threads=1, *, backend=None):
    """(p, g, m, v (n,), decay, w1, b2, w2, bc2_sqrt, neg_step, eps, n_threads=1) -> (p, m, v) after one step
    on copies; the scalars as cepe_adamw_scalars computes them (train/adamw.c)."""
    nt = _threads(n_threads)
    p = _arr(p, "p", np.float32, 1)
    g = _arr(g, "g", np.float32, 1)
    m = _arr(m, "m", np.float32, 1)
    v = _arr(v, "v", np.float32, 1)
    _same_shape(g, p, "g")
    _same_shape(m, p, "m")
    _same_shape(v, p, "v")
    po, mo, vo = p.copy(), m.copy(), v.copy()
    scalars = dict(decay=decay, w1=w1, b2=b2, w2=w2, bc2_sqrt=bc2_sqrt, neg_step=neg_step, eps=eps)
    _call("adamw", backend, p=po, g=g, m=mo, v=vo, n=p.size, nt=nt, **scalars)
    return po, mo, vo


# ---------------------------------------------------------------------------- bf16


def to_bf16(x, *, backend=None) -> np.ndarray:
    """(x float32) -> bf16 bits uint16 (NotImplementedError where the table has no bf16)"""
    x = _arr(x, "x", np.float32)
    y = np.zeros(x.shape, np.uint16)
    _call("to_bf16", backend, dst=y, src=x, n=x.size)
    return y


def bf16_round(x) -> np.ndarray:
    """(float32 array) -> bf16 bits uint16, via cepe_float_to_bf16 (the host reference of to_bf16: the
    function the CUDA kernel runs; the CPU table has no bf16 ops)"""
    x = _arr(x, "x", np.float32)
    y = np.zeros(x.shape, np.uint16)
    cepe_c._float_to_bf16(x, y)
    return y


def matmul_bf16(inp, weight, *, init=0.0, backend=None) -> np.ndarray:
    """(inp (N, C) float32, weight bf16 bits uint16 (OC, C), init=0) -> out (N, OC); init as matmul_forward"""
    return _matmul("matmul_bf16", inp, weight, np.uint16, 1, init, backend)
