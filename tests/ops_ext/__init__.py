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

import operator

import numpy as np

import cepe.ops as pub
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


# ------------------------------------------------- the ops cepe.ops covers
# Each runs through cepe.ops; init seeds the buffers the op adds into
# (accumulate=True), fused / kv_capacity lay q, k, v out as views of one
# buffer, as the engine's fused QKV projection and KV cache hold them.


def _acc(shape, init: float, sign: float = 1.0) -> np.ndarray:
    a = _zeros(shape)
    _seed(a, sign * init)
    return a


def embedding_forward(ids, wte, *, backend=None) -> np.ndarray:
    """(ids int32 (N,), wte (V, C)) -> out (N, C)"""
    return pub.embedding(_arr(ids, "ids", np.int32, 1), _arr(wte, "wte", np.float32, 2), backend=backend)


def embedding_backward(dout, ids, V, *, init=0.0, backend=None) -> np.ndarray:
    """(dout (N, C), ids (N,), V, init=0) -> dwte (V, C)"""
    dout = _arr(dout, "dout", np.float32, 2)
    out = _acc((V, dout.shape[1]), init)
    return pub.embedding_backward(dout, _arr(ids, "ids", np.int32, 1), V, out=out, accumulate=True, backend=backend)


def rmsnorm_forward(inp, weight, eps, n_threads=1, *, backend=None) -> np.ndarray:
    """(inp (N, C), weight (C,), eps, n_threads=1) -> out"""
    return pub.rmsnorm(_arr(inp, "inp", np.float32, 2), weight, eps, n_threads=n_threads, backend=backend)


def rmsnorm_backward(dout, inp, weight, eps, dweight=True, *, init=0.0, backend=None):
    """(dout, inp, weight, eps, dweight=True, init=0) -> (dinp, dweight | None)"""
    inp = _arr(inp, "inp", np.float32, 2)
    dinp, dw = _acc(inp.shape, init), _acc(inp.shape[1:], init) if dweight else None
    return pub.rmsnorm_backward(
        dout, inp, weight, eps, dx=dinp, dweight=dw, weight_grad=dweight, accumulate=True, backend=backend
    )


def matmul_forward(inp, weight, n_threads=1, *, init=0.0, backend=None) -> np.ndarray:
    """(inp (N, C), weight (OC, C), n_threads=1, init=0) -> out (N, OC); init != 0:
    out starts at init * pattern and the op runs with accumulate = 1."""
    inp, weight = _arr(inp, "inp", np.float32, 2), _arr(weight, "weight", np.float32, 2)
    out = _acc((inp.shape[0], weight.shape[0]), init)
    acc = bool(np.float32(init) != 0)
    return pub.linear(inp, weight, out=out, accumulate=acc, n_threads=n_threads, backend=backend)


def matmul_backward(dout, inp, weight, dinp=True, dweight=True, dinp_into=None, n_threads=1, *, init=0.0, backend=None):
    """(dout, inp, weight, dinp=True, dweight=True, dinp_into=None, n_threads=1, init=0) -> (dinp, dweight).
    dinp_into: an existing (N, C) array that receives dinp with accumulate = 1
    (init then also seeds dweight); otherwise a new array, NaN-filled, that
    the op overwrites (accumulate = 0)."""
    inp, weight = _arr(inp, "inp", np.float32, 2), _arr(weight, "weight", np.float32, 2)
    accumulate = dinp_into is not None
    dx = dinp_into if accumulate else np.full(inp.shape, np.nan, np.float32)
    dw = _acc(weight.shape, init) if accumulate else None
    got_dx, got_dw = pub.linear_backward(
        dout, inp, weight, dx=dx, dweight=dw, weight_grad=dweight, accumulate=accumulate, n_threads=n_threads,
        backend=backend,
    )  # fmt: skip
    if dweight and not accumulate and np.float32(init) != 0:
        got_dw += _acc(weight.shape, init)
    return got_dx if dinp else None, got_dw


def rope_table(pos, inv_freq, mscale=1.0, *, backend=None):
    """(pos float64 (N,), inv_freq (half,), mscale=1) -> (cos, sin) (N, half): the table op alone
    (cepe.ops.rope_tables takes RoPE settings)"""
    pos = _arr(pos, "pos", np.float64, 1)
    inv_freq = _arr(inv_freq, "inv_freq", np.float32, 1)
    N, half = pos.shape[0], inv_freq.shape[0]
    cos, sin = _zeros((N, half)), _zeros((N, half))
    _call("rope_table", backend, cos_t=cos, sin_t=sin, pos=pos, inv_freq=inv_freq, N=N, half=half, mscale=mscale)
    return cos, sin


def rope_forward(x, cos, sin, interleaved=False, n_threads=1, *, backend=None) -> np.ndarray:
    """(x (N, nh, hd), cos (N, half), sin, interleaved=False, n_threads=1) -> rotated copy"""
    layout = "interleaved" if interleaved else "half"
    return pub.rope_apply(x, cos, sin, layout=layout, n_threads=n_threads, backend=backend)


def rope_backward(x, cos, sin, interleaved=False, n_threads=1, *, backend=None) -> np.ndarray:
    """(dx (N, nh, hd), cos, sin, interleaved=False) -> gradient of the unrotated x"""
    return pub.rope_apply_backward(x, cos, sin, layout="interleaved" if interleaved else "half", backend=backend)


def swiglu_forward(gate, up, n_threads=1, *, backend=None) -> np.ndarray:
    """(gate, up, n_threads=1) -> silu(gate) * up"""
    return pub.swiglu(gate, up, n_threads=n_threads, backend=backend)


def swiglu_backward(dout, gate, up, *, init=0.0, backend=None):
    """(dout, gate, up, init=0) -> (dgate, dup)"""
    dgate, dup = _acc(np.shape(gate), init), _acc(np.shape(gate), init, -1.0)
    return pub.swiglu_backward(dout, gate, up, dgate=dgate, dup=dup, accumulate=True, backend=backend)


def _layout(q, k, v, key_valid, fused: bool, kv_capacity: int):
    """q, k, v (and key_valid) as views in the engine's layouts:
    - fused: one (B, T, H + 2*KVH, hd) buffer, as a fused QKV projection writes
      them: row strides wider than a row;
    - kv_capacity > Tk: k, v (and key_valid) in (B, kv_capacity, ...) buffers
      as a KV cache holds them: batch strides wider than Tk rows, the rows past
      Tk NaN (k, v) that no op may read.
    Returns (q, k, v, key_valid, make_grads) where make_grads(init) gives
    (dq, dk, dv) seeded buffers laid out the same way, plus a check that the
    op left the rows past Tk alone."""
    q = _arr(q, "q", np.float32, 4)
    k = _arr(k, "k", np.float32, 4)
    v = _arr(v, "v", np.float32, 4)
    B, Tq, H, hd = q.shape
    Tk, KVH = k.shape[1], k.shape[2]
    if fused and kv_capacity:
        raise ValueError("fused=True and kv_capacity are exclusive")
    if kv_capacity and kv_capacity < Tk:
        raise ValueError(f"kv_capacity {kv_capacity} is below Tk = {Tk}")
    if fused and Tq != Tk:
        raise ValueError("fused=True needs Tq == Tk (self-attention)")
    if key_valid is not None and key_valid.dtype == np.bool_:
        key_valid = key_valid.view(np.uint8)

    def split(buf):
        return buf[:, :, :H], buf[:, :, H : H + KVH], buf[:, :, H + KVH :]

    if fused:
        qkv = np.concatenate([q, k, v], axis=2)

        def make_grads(init):
            g = np.zeros(qkv.shape, np.float32)
            for part, sign in zip(split(g), (1.0, 1.0, -1.0), strict=True):
                part[...] = _acc(part.shape, init, sign)
            return (*split(g), lambda: None)

        return (*split(qkv), key_valid, make_grads)
    if kv_capacity:
        kcap, vcap = (np.full((B, kv_capacity, KVH, hd), np.nan, np.float32) for _ in range(2))
        kcap[:, :Tk], vcap[:, :Tk] = k, v
        if key_valid is not None:  # past Tk: a pattern the masks must not need
            validcap = (np.arange(kv_capacity, dtype=np.uint8) & 1)[None, :].repeat(B, axis=0)
            validcap[:, :Tk] = key_valid
            key_valid = validcap[:, :Tk]

        def make_grads(init):
            dk, dv = (np.full((B, kv_capacity, KVH, hd), np.nan, np.float32) for _ in range(2))
            dk[:, :Tk], dv[:, :Tk] = _acc(k.shape, init), _acc(k.shape, init, -1.0)

            def check():
                if not (np.isnan(dk[:, Tk:]).all() and np.isnan(dv[:, Tk:]).all()):
                    raise RuntimeError("attention_backward wrote into the kv rows past Tk")

            return _acc(q.shape, init), dk[:, :Tk], dv[:, :Tk], check

        return q, kcap[:, :Tk], vcap[:, :Tk], key_valid, make_grads

    def make_plain(init):
        return _acc(q.shape, init), _acc(k.shape, init), _acc(k.shape, init, -1.0), lambda: None

    return q, k, v, key_valid, make_plain


def _attention_forward(with_lse: bool, q, k, v, key_valid, causal, q_offset, window, scale, n_threads, fused,
                       kv_capacity, backend):  # fmt: skip
    q, k, v, key_valid, _ = _layout(q, k, v, key_valid, fused, kv_capacity)
    return pub.attention(
        q, k, v, causal=causal, key_mask=key_valid, q_offset=q_offset, window=window, scale=scale,
        return_lse=with_lse, n_threads=n_threads, backend=backend,
    )  # fmt: skip


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
    passed to C as NULL and returned as None. The gradients are written in
    place into buffers laid out like q, k, v (fused / kv_capacity)."""
    q, k, v, key_valid, make_grads = _layout(q, k, v, key_valid, fused, kv_capacity)
    dq, dk, dv, check = make_grads(init)
    got = pub.attention_backward(
        dout, q, k, v, out, lse, causal=causal, key_mask=key_valid, q_offset=q_offset, window=window, scale=scale,
        dq=dq, dk=dk, dv=dv, need=need, accumulate=True, n_threads=n_threads, backend=backend,
    )  # fmt: skip
    check()
    return tuple(None if g is None else np.ascontiguousarray(g) for g in got)


# -------------------------------------------------------------------------- losses


def cross_entropy(logits, targets, dloss_scale=1.0, grad=True, *, init=0.0, backend=None):
    """(logits (N,V), targets int32 (N,), dloss_scale=1, grad=True, init=0) -> (losses, dlogits)"""
    z = _arr(logits, "logits", np.float32, 2)
    t = _arr(targets, "targets", np.int32, 1)
    losses = pub.cross_entropy(z, t, backend=backend)
    if not grad:
        return losses, None
    dz = _acc(z.shape, init)
    pub.cross_entropy_backward(z, t, dloss_scale, reduction="none", out=dz, accumulate=True, backend=backend)
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
    inp = _arr(inp, "inp", np.float32, 2)
    weight = _arr(weight, "weight", np.uint16, 2)
    _dim_is(weight, "weight", 1, inp.shape[1])
    (N, C), OC = inp.shape, weight.shape[0]
    out = _acc((N, OC), init)
    acc = int(np.float32(init) != 0)
    _call("matmul_bf16", backend, out=out, inp=inp, w=weight, N=N, C=C, OC=OC, accumulate=acc, nt=1)
    return out
