"""cepe.ops, the public op API, against PyTorch autograd in float64 on random
shapes: contiguous, non-contiguous (strided views, a fused QKV buffer) and
broadcast inputs, out= buffers and accumulation, the GIL released during an
op, and a clear error for every bad argument."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from op_refs import close, f32, grads, leaf

import cepe.ops as ops
from cepe.rope import RopeSettings

torch = pytest.importorskip("torch")
F = torch.nn.functional


def strided(a: np.ndarray, rng) -> np.ndarray:
    """The values of a in a non-contiguous view (every other element of a bigger buffer)."""
    big = f32(rng.standard_normal((*a.shape[:-1], 2 * a.shape[-1])))
    view = big[..., ::2]
    view[...] = a
    assert not view.flags.c_contiguous
    return view


@pytest.fixture
def rng():
    return np.random.default_rng(7)


# ---------------------------------------------------------------- embedding


@pytest.mark.parametrize("seed", range(3))
def test_embedding(seed):
    rng = np.random.default_rng(seed)
    V, C = rng.integers(2, 40), rng.integers(1, 50)
    shape = tuple(rng.integers(1, 5, size=rng.integers(1, 3)))
    ids = rng.integers(0, V, size=shape)  # int64: any integer dtype is taken
    wte = f32(rng.standard_normal((V, C)))
    np.testing.assert_array_equal(ops.embedding(ids, wte), wte[ids])
    dout = f32(rng.standard_normal((*shape, C)))
    w = leaf(wte)
    (dw,) = grads(F.embedding(torch.from_numpy(ids), w), dout, w)
    close(ops.embedding_backward(strided(dout, rng), ids, V), dw, "dwte")
    acc = f32(rng.standard_normal((V, C)))
    start = acc.copy()
    got = ops.embedding_backward(dout, ids, V, out=acc, accumulate=True)
    assert got is acc
    close(acc, dw.detach().numpy() + start, "accumulated dwte")


# ------------------------------------------------------------------ rmsnorm


def torch_rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("seed", range(3))
def test_rmsnorm(seed):
    rng = np.random.default_rng(seed)
    C = int(rng.integers(1, 300))
    shape = (*rng.integers(1, 5, size=2), C)
    x = strided(f32(rng.standard_normal(shape) * 3), rng)
    w = f32(rng.random(C) + 0.5)
    eps = 1e-5
    tx, tw = leaf(x), leaf(w)
    y = torch_rmsnorm(tx, tw, eps)
    close(ops.rmsnorm(x, w, eps, n_threads=2), y, "rmsnorm")
    dout = f32(rng.standard_normal(shape))
    dx, dw = ops.rmsnorm_backward(dout, x, w, eps)
    rx, rw = grads(y, dout, tx, tw)
    close(dx, rx, "dx")
    close(dw, rw, "dweight")
    dx_only, none = ops.rmsnorm_backward(dout, x, w, eps, weight_grad=False)
    assert none is None
    close(dx_only, rx, "dx without dweight")


def test_rmsnorm_broadcast_input_and_strided_out(rng):
    row = f32(rng.standard_normal(33))
    x = np.broadcast_to(row, (4, 33))  # stride 0 rows
    w = f32(rng.random(33) + 0.5)
    out = np.zeros((33, 4), np.float32).T  # Fortran-ordered out=
    got = ops.rmsnorm(x, w, 1e-6, out=out)
    assert got is out
    close(out, torch_rmsnorm(leaf(np.array(x)), leaf(w), 1e-6), "rmsnorm")


# ------------------------------------------------------------------- linear


def test_linear(rng):
    x = strided(f32(rng.standard_normal((2, 5, 17))), rng)
    w = f32(rng.standard_normal((9, 17)))
    tx, tw = leaf(x), leaf(w)
    y = tx @ tw.T
    close(ops.linear(x, w), y, "linear")
    dout = f32(rng.standard_normal((2, 5, 9)))
    dx, dw = ops.linear_backward(dout, x, w)
    rx, rw = grads(y, dout, tx, tw)
    close(dx, rx, "dx")
    close(dw, rw, "dweight")


# ------------------------------------------------------------------- swiglu


def test_swiglu_with_broadcast_up(rng):
    gate = f32(rng.standard_normal((3, 4, 21)) * 3)
    up = f32(rng.standard_normal((1, 21)))  # broadcast over the leading axes
    tg, tu = leaf(gate), leaf(up)
    y = F.silu(tg) * tu
    close(ops.swiglu(gate, up), y, "swiglu")
    dout = f32(rng.standard_normal((3, 4, 21)))
    dg, du = ops.swiglu_backward(dout, gate, up)
    rg, ru = grads(y, dout, tg, tu)
    assert du.shape == up.shape
    close(dg, rg, "dgate")
    close(du, ru, "dup (summed over the broadcast axes)")
    # out= gate: in place, the result is right though the op reads gate
    g2 = gate.copy()
    ops.swiglu(g2, up, out=g2)
    close(g2, y, "swiglu in place")


# --------------------------------------------------------------------- RoPE

ROPE_VARIANTS = {
    "default": {},
    "linear": dict(factor=4.0),
    "dynamic": dict(factor=2.0, max_position_embeddings=64, original_max_position_embeddings=64),
    "yarn": dict(factor=4.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=64),
    "llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
    "longrope": dict(
        short_factor=tuple(np.linspace(1, 2, 6)),
        long_factor=tuple(np.linspace(1, 8, 6)),
        original_max_position_embeddings=64,
        max_position_embeddings=512,
    ),
}


def torch_rope(x: torch.Tensor, pos: np.ndarray, inv_freq: np.ndarray, mag: float, layout: str) -> torch.Tensor:
    """x (..., T, H, hd) rotated over the first 2*half dims, from the formula."""
    half = len(inv_freq)
    ang = torch.tensor(pos, dtype=torch.float64)[..., None] * torch.tensor(inv_freq, dtype=torch.float64)
    c, s = (torch.cos(ang) * mag)[..., None, :], (torch.sin(ang) * mag)[..., None, :]
    if layout == "half":
        a, b = x[..., :half], x[..., half : 2 * half]
    else:
        a, b = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
    ra, rb = a * c - b * s, a * s + b * c
    rot = torch.stack([ra, rb], -1).flatten(-2) if layout != "half" else torch.cat([ra, rb], -1)
    return torch.cat([rot, x[..., 2 * half :]], -1)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rope_type", sorted(ROPE_VARIANTS))
def test_rope_every_scaling_type_and_layout_fractional_positions(rng, rope_type, layout):
    hd, rot = 16, 12  # partial rotary: the last 4 dims pass through
    settings = RopeSettings(
        rope_type=rope_type, rope_theta=5000.0, head_dim=hd, rotary_dim=rot, layout=layout,
        **{"max_position_embeddings": 128, **ROPE_VARIANTS[rope_type]},
    )  # fmt: skip
    B, T, H = 2, 7, 3
    pos = rng.random((B, T)) * 150  # fractional, past the original window (scaled regimes)
    x = f32(rng.standard_normal((B, T, H, hd)))
    from cepe.rope import rope_frequencies

    seq_len = int(np.floor(pos.max())) + 1
    inv_freq, mag = rope_frequencies(settings, seq_len)
    tx = leaf(x)
    y = torch_rope(tx, pos, inv_freq.astype(np.float64), mag, layout)
    close(ops.rope(x, pos, settings), y, f"rope {rope_type} {layout}")
    dout = f32(rng.standard_normal(x.shape))
    (rx,) = grads(y, dout, tx)
    close(ops.rope_backward(dout, pos, settings), rx, "rope backward")
    # in place, and tables broadcast over the batch
    cos, sin = ops.rope_tables(pos[0], settings, seq_len=seq_len)
    x2 = x[:1].copy()
    assert ops.rope_apply(x2, cos, sin, layout=layout, out=x2) is x2
    close(x2, y[:1], "rope in place from (T, half) tables")


# ---------------------------------------------------------------- attention


def torch_attention(q, k, v, causal, mask, q_offset, window, scale):
    """q (B,Tq,H,hd), k,v (B,Tk,KVH,hd) float64 tensors -> (out, lse)."""
    B, Tq, H, hd = q.shape
    Tk, KVH = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // KVH, dim=2)
    v = v.repeat_interleave(H // KVH, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    allowed = torch.ones(B, 1, Tq, Tk, dtype=torch.bool)
    t = torch.arange(Tq)[:, None] + q_offset
    j = torch.arange(Tk)[None, :]
    if causal:
        allowed &= j <= t
        if window:
            allowed &= t - j < window
    if mask is not None:
        allowed &= torch.as_tensor(np.broadcast_to(mask, (B, Tk)).astype(bool))[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(allowed, torch.exp(s - lse[..., None].clamp(min=-1e300)), torch.zeros(()))
    p = torch.nan_to_num(p)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse.transpose(1, 2)


def attention_case(seed: int):
    rng = np.random.default_rng(100 + seed)
    B = int(rng.integers(1, 3))
    KVH = int(rng.integers(1, 3))
    H = KVH * int(rng.integers(1, 3))
    hd = int(rng.choice([1, 8, 20, 64]))
    Tq = int(rng.integers(1, 70))
    kind = ["causal", "bidirectional", "cross"][seed % 3]
    Tk = Tq if kind != "cross" else int(rng.integers(1, 90))
    if kind == "causal" and seed % 2:
        Tk = Tq + int(rng.integers(0, 20))  # queries after a cache
    mask = None
    if seed % 4 == 1:
        mask = rng.random((B, Tk)) > 0.3
        mask[:, -1] = True
    window = int(rng.integers(1, 10)) if kind == "causal" and seed % 5 == 0 else 0
    return rng, B, Tq, Tk, H, KVH, hd, kind == "causal", mask, window


@pytest.mark.parametrize("seed", range(12))
def test_attention_random_shapes(seed):
    rng, B, Tq, Tk, H, KVH, hd, causal, mask, window = attention_case(seed)
    q = f32(rng.standard_normal((B, Tq, H, hd)))
    k = f32(rng.standard_normal((B, Tk, KVH, hd)))
    v = f32(rng.standard_normal((B, Tk, KVH, hd)))
    if seed % 2:  # k, v as a KV cache with spare rows: batch stride wider than Tk rows, read in place
        cache = f32(rng.standard_normal((2, B, Tk + 5, KVH, hd)))
        cache[0, :, :Tk], cache[1, :, :Tk] = k, v
        k, v = cache[0, :, :Tk], cache[1, :, :Tk]
    q_offset = max(Tk - Tq, 0)
    tq, tk, tv = leaf(q), leaf(k), leaf(v)
    ref, ref_lse = torch_attention(tq, tk, tv, causal, mask, q_offset, window, hd**-0.5)
    out, lse = ops.attention(q, k, v, causal=causal, key_mask=mask, window=window, return_lse=True, n_threads=2)
    close(out, ref, "out")
    finite = np.isfinite(ref_lse.detach().numpy())
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    close(lse[finite], ref_lse.detach().numpy()[finite], "lse")
    dout = f32(rng.standard_normal(q.shape))
    rq, rk, rv = grads(ref, dout, tq, tk, tv)
    for use_lse in (lse, None):
        dq, dk, dv = ops.attention_backward(dout, q, k, v, out, use_lse, causal=causal, key_mask=mask, window=window)
        close(dq, rq, "dq")
        close(dk, rk, "dk")
        close(dv, rv, "dv")


def test_attention_fused_qkv_views_and_broadcast_kv(rng):
    B, T, H, KVH, hd = 2, 13, 4, 2, 8
    qkv = f32(rng.standard_normal((B, T, H + 2 * KVH, hd)))  # one buffer, as a fused projection writes it
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + KVH], qkv[:, :, H + KVH :]
    tq, tk, tv = leaf(q), leaf(k), leaf(v)
    ref, _ = torch_attention(tq, tk, tv, True, None, 0, 0, hd**-0.5)
    close(ops.attention(q, k, v, causal=True), ref, "fused layout")
    # k, v of batch 1 broadcast to every query row: stride 0, and gradients summed back
    kb, vb = f32(rng.standard_normal((1, 9, KVH, hd))), f32(rng.standard_normal((1, 9, KVH, hd)))
    mask = np.ones((1, 9), np.uint8)
    mask[0, 2] = 0
    tkb, tvb, tq2 = leaf(kb), leaf(vb), leaf(q)
    ref, _ = torch_attention(tq2, tkb.expand(B, -1, -1, -1), tvb.expand(B, -1, -1, -1), False, mask, 0, 0, 0.3)
    out = ops.attention(q, kb, vb, key_mask=mask, scale=0.3)
    close(out, ref, "broadcast kv")
    dout = f32(rng.standard_normal(out.shape))
    dq, dk, dv = ops.attention_backward(dout, q, kb, vb, out, key_mask=mask, scale=0.3)
    rq, rk, rv = grads(ref, dout, tq2, tkb, tvb)
    assert dk.shape == kb.shape
    close(dq, rq, "dq")
    close(dk, rk, "dk (summed over the batch)")
    close(dv, rv, "dv")
    _, dk_only, none = ops.attention_backward(dout, q, kb, vb, out, key_mask=mask, scale=0.3, need="k")
    assert none is None
    close(dk_only, rk, "dk alone")


def test_attention_out_buffers(rng):
    q = f32(rng.standard_normal((1, 5, 2, 4)))
    k = f32(rng.standard_normal((1, 6, 1, 4)))
    out, lse_out = np.full((1, 5, 2, 4), np.nan, np.float32), np.zeros((1, 5, 2), np.float32)
    got, lse = ops.attention(q, k, k, out=out, lse_out=lse_out, return_lse=True)
    assert got is out and lse is lse_out
    close(out, ops.attention(q, k, k), "out=")
    dq = np.ones_like(q)
    ops.attention_backward(np.ones_like(q), q, k, k, out, dq=dq, accumulate=True)
    close(dq - 1, ops.attention_backward(np.ones_like(q), q, k, k, out)[0], "accumulated dq")


def test_attention_releases_the_gil(rng):
    q = f32(rng.standard_normal((1, 3072, 8, 64)))
    ticks: list[float] = []
    span: list[float] = []

    def work() -> None:
        t0 = time.perf_counter()
        ops.attention(q, q, q, n_threads=1)
        span.extend([t0, time.perf_counter()])

    t = threading.Thread(target=work)
    t.start()
    while t.is_alive():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    t.join()
    t0, t1 = span
    assert t1 - t0 > 0.05, "the op was too quick to tell"
    inside = [x for x in ticks if t0 + 0.2 * (t1 - t0) < x < t0 + 0.8 * (t1 - t0)]
    assert inside, "the main thread never ran while the op did: the GIL was held"


# ----------------------------------------------------------- cross-attention


def test_cross_attention_matches_the_reference_block(rng):
    from transformers import LlamaConfig

    from cepe.testing.reference import CrossAttention

    cfg = LlamaConfig(hidden_size=24, num_attention_heads=4, num_key_value_heads=2, head_dim=6, rms_norm_eps=1e-5)
    block = CrossAttention(cfg, d_enc=10).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.tensor(f32(rng.standard_normal(p.shape) * 0.3), dtype=torch.float64))
    B, T, N = 2, 5, 7
    h = f32(rng.standard_normal((B, T, 24)))
    E = f32(rng.standard_normal((B, N, 10)))
    emask = np.ones((B, N), np.uint8)
    emask[0, 4:] = 0
    emask[1, :] = 0  # a row with no context adds zero
    th, tE = leaf(h), leaf(E)
    ref = block(th, tE, torch.as_tensor(emask))
    w = {
        "norm": f32(block.layernorm.weight.detach()),
        "q_proj": f32(block.q_proj.weight.detach()),
        "k_proj": f32(block.k_proj.weight.detach()),
        "v_proj": f32(block.v_proj.weight.detach()),
        "o_proj": f32(block.o_proj.weight.detach()),
    }
    got = ops.cross_attention(h, E, w, n_heads=4, key_mask=emask, eps=1e-5)
    close(got, ref, "cross_attention")
    assert not got[1].any()
    dout = f32(rng.standard_normal(got.shape))
    g = ops.cross_attention_backward(dout, h, E, w, n_heads=4, key_mask=emask, eps=1e-5)
    params = [block.layernorm.weight, block.q_proj.weight, block.k_proj.weight, block.v_proj.weight,
              block.o_proj.weight]  # fmt: skip
    want = grads(ref, dout, th, tE, *params)
    for name, r in zip(["hidden", "states", "norm", "q_proj", "k_proj", "v_proj", "o_proj"], want, strict=True):
        close(g[name], r, f"d {name}")


# ------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy(rng, reduction):
    logits = strided(f32(rng.standard_normal((3, 4, 29)) * 4), rng)
    targets = rng.integers(0, 29, size=(3, 4))
    targets[0, 1] = ops.IGNORE_INDEX
    tz = leaf(logits)
    ref = F.cross_entropy(tz.reshape(-1, 29), torch.from_numpy(targets).reshape(-1), reduction=reduction)
    if reduction == "none":
        ref = ref.reshape(3, 4)
    close(ops.cross_entropy(logits, targets, reduction=reduction), ref, "loss")
    dout = 0.7 if reduction != "none" else np.full((3, 4), 0.7)
    (rz,) = grads(ref, dout, tz)
    close(ops.cross_entropy_backward(logits, targets, 0.7, reduction=reduction), rz, "dlogits")


# --------------------------------------------------------------- bad input


def test_bad_arguments_raise_clear_errors(rng):
    x = f32(rng.standard_normal((2, 8)))
    w = f32(np.ones(8))
    q = f32(rng.standard_normal((1, 3, 4, 8)))
    cases = [
        (lambda: ops.rmsnorm(x.astype(np.float64), w), TypeError, "x must have dtype float32"),
        (lambda: ops.rmsnorm(x.tolist(), w), TypeError, "x must be a numpy.ndarray"),
        (lambda: ops.rmsnorm(x, w[:5]), ValueError, "weight must have shape"),
        (lambda: ops.rmsnorm(x, w, out=np.zeros((3, 8), np.float32)), ValueError, "out must have shape"),
        (lambda: ops.rmsnorm(x, w, out=np.zeros((2, 8))), TypeError, "out must have dtype float32"),
        (lambda: ops.rmsnorm(x, w, n_threads=0), ValueError, "n_threads"),
        (lambda: ops.embedding(np.array([0, 9]), x.T.copy()), ValueError, r"ids\[1\] = 9 is outside \[0, 8\)"),
        (lambda: ops.embedding(np.array([0.5]), x), TypeError, "ids must have an integer dtype"),
        (lambda: ops.swiglu(x, w[:3]), ValueError, "do not broadcast"),
        (lambda: ops.attention(q, q[:, :, :3], q[:, :, :3]), ValueError, "multiple of k's 3"),
        (lambda: ops.attention(q, q, q[:, :2]), ValueError, "v must have k's shape"),
        (lambda: ops.attention(q[0], q[0], q[0]), ValueError, "q must have 4 dimensions"),
        (lambda: ops.attention(q, q, q, key_mask=np.ones((1, 4), bool)), ValueError, "key_mask must have shape"),
        (lambda: ops.attention(q, q, q, key_mask=np.ones((1, 3))), TypeError, "key_mask must have dtype"),
        (lambda: ops.attention(q, q, q, window=-1), ValueError, "window"),
        (lambda: ops.cross_entropy(x, np.array([0, 8])), ValueError, r"targets\[1\] = 8 is outside"),
        (lambda: ops.cross_entropy(x, np.array([0, 1, 2])), ValueError, "targets must have shape"),
        (lambda: ops.rope_apply(q, np.ones((3, 5), np.float32), np.ones((3, 5), np.float32)), ValueError, "pairs"),
        (lambda: ops.rope(q, [0, 1, 2], {"rope_type": "default"}), TypeError, "RopeSettings"),
    ]
    for call, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call()
    ro = np.zeros((2, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        ops.rmsnorm(x, w, out=ro)


def test_device_style_backend_reads_views_of_one_buffer(rng):
    """On a backend with its own memory (cepe_c._sim_backend(), as CUDA) the views of a fused QKV
    buffer travel as one buffer, and the gradients come back into views of one buffer too."""
    import cepe_c

    sim = cepe_c._sim_backend()
    B, T, H, KVH, hd = 2, 9, 4, 2, 8
    qkv = f32(rng.standard_normal((B, T, H + 2 * KVH, hd)))
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + KVH], qkv[:, :, H + KVH :]
    want, want_lse = ops.attention(q, k, v, causal=True, return_lse=True)
    got, lse = ops.attention(q, k, v, causal=True, return_lse=True, backend=sim)
    close(got, want, "out on the device-style backend")
    close(lse, want_lse, "lse on the device-style backend")
    dout = f32(rng.standard_normal(want.shape))
    g = np.zeros_like(qkv)
    dq, dk, dv = g[:, :, :H], g[:, :, H : H + KVH], g[:, :, H + KVH :]
    ops.attention_backward(dout, q, k, v, want, want_lse, causal=True, dq=dq, dk=dk, dv=dv, backend=sim)
    for name, a, b in zip("qkv", (dq, dk, dv), ops.attention_backward(dout, q, k, v, want, causal=True), strict=True):
        close(a, b, f"d{name} on the device-style backend")
    x = f32(rng.standard_normal((3, 16)))
    close(
        ops.rmsnorm(x[:, ::2], np.ones(8, np.float32), backend=sim),
        ops.rmsnorm(x[:, ::2], np.ones(8, np.float32)),
        "rmsnorm",
    )
