"""Every CPU op of csrc/ops/ and its backward (in the forward's file; the losses in loss.c),
called through cepe.ops and the test helpers over it (tests/ops_ext/), against PyTorch autograd
in float64 on odd sizes; plus directional finite differences of our own
forwards, the masks attention must honour, and a check that the attention
backward never holds O(T^2) memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import ops_ext as ops
import pytest
from op_refs import TOL, close, f32, grads, leaf, left_padding, teacher_table

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --------------------------------------------------------------------- embedding


def test_embedding_forward_and_backward_with_repeated_ids(rng):
    V, C = 11, 37
    wte = f32(rng.standard_normal((V, C)))
    ids = np.array([3, 0, 10, 3, 3, 7, 0], dtype=np.int32)  # repeats must add up
    dout = f32(rng.standard_normal((len(ids), C)))
    np.testing.assert_array_equal(ops.embedding_forward(ids, wte), wte[ids])
    w = leaf(wte)
    (dw,) = grads(F.embedding(torch.from_numpy(ids).long(), w), dout, w)
    close(ops.embedding_backward(dout, ids, V), dw, "dwte")
    with pytest.raises(ValueError, match="outside"):
        ops.embedding_backward(dout, np.array([0, 1, 2, 3, 4, 5, 11], np.int32), V)


# ----------------------------------------------------------------------- rmsnorm


def torch_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("N,C", [(1, 37), (5, 37), (3, 576)])
def test_rmsnorm(rng, N, C):
    eps = 1e-5
    inp = f32(rng.standard_normal((N, C)) * 3)
    weight = f32(rng.uniform(0.5, 1.5, C))
    dout = f32(rng.standard_normal((N, C)))
    x, w = leaf(inp), leaf(weight)
    y = torch_rmsnorm(x, w, eps)
    close(ops.rmsnorm_forward(inp, weight, eps), y, "out")
    dx, dw = grads(y, dout, x, w)
    dinp, dweight = ops.rmsnorm_backward(dout, inp, weight, eps)
    close(dinp, dx, "dinp")
    close(dweight, dw, "dweight")
    frozen_dinp, none = ops.rmsnorm_backward(dout, inp, weight, eps, dweight=False)  # frozen norm
    assert none is None
    np.testing.assert_array_equal(frozen_dinp, dinp)


# ------------------------------------------------------------------------ matmul


@pytest.mark.parametrize("N,C,OC", [(1, 37, 53), (7, 37, 53), (130, 37, 53), (64, 96, 130)])
def test_matmul(rng, N, C, OC):
    inp = f32(rng.standard_normal((N, C)))
    weight = f32(rng.standard_normal((OC, C)) / np.sqrt(C))
    dout = f32(rng.standard_normal((N, OC)))
    x, w = leaf(inp), leaf(weight)
    y = x @ w.T
    dx, dw = grads(y, dout, x, w)
    for n_threads in (1, 2):  # (64, 96, 130) is large enough to split columns over 2 threads
        close(ops.matmul_forward(inp, weight, n_threads=n_threads), y, "out")
        dinp, dweight = ops.matmul_backward(dout, inp, weight, n_threads=n_threads)
        close(dinp, dx, "dinp")
        close(dweight, dw, "dweight")
    # Frozen layer: no weight gradient, the input gradient still flows.
    dinp_only, none = ops.matmul_backward(dout, inp, weight, dweight=False, n_threads=2)
    assert none is None
    close(dinp_only, dx, "dinp (frozen weight)")
    none, dweight_only = ops.matmul_backward(dout, inp, weight, dinp=False)
    assert none is None
    close(dweight_only, dw, "dweight (no dinp)")
    # accumulate = 1 adds into what is there.
    base = f32(rng.standard_normal((N, C)))
    acc = base.copy()
    ops.matmul_backward(dout, inp, weight, dweight=False, dinp_into=acc, n_threads=2)
    close(acc, base + dx.detach().numpy(), "dinp accumulated")


# -------------------------------------------------------------------------- rope


def rope_tables(rng, N: int, half: int, mscale: float = 1.3) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables as csrc/ops/rope.c's rope_table builds them: magnitude included."""
    pos = rng.integers(0, 5000, N).astype(np.float64)
    inv_freq = 10000.0 ** (-np.arange(half) / half)
    ang = pos[:, None] * inv_freq[None, :]
    return f32(np.cos(ang) * mscale), f32(np.sin(ang) * mscale)


def torch_rope(x: torch.Tensor, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> torch.Tensor:
    half = cos.shape[1]
    c = torch.tensor(cos, dtype=torch.float64)[:, None, :]
    s = torch.tensor(sin, dtype=torch.float64)[:, None, :]
    if interleaved:
        a, b, rest = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2], x[..., 2 * half :]
        ra, rb = a * c - b * s, b * c + a * s
        return torch.cat([torch.stack([ra, rb], -1).flatten(-2), rest], -1)
    a, b, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([a * c - b * s, b * c + a * s, rest], -1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("hd,half", [(12, 6), (64, 32), (12, 4)])  # (12, 4): partial rotary
def test_rope(rng, hd, half, interleaved):
    N, nh = 9, 3
    cos, sin = rope_tables(rng, N, half)
    xin = f32(rng.standard_normal((N, nh, hd)))
    dout = f32(rng.standard_normal((N, nh, hd)))
    x = leaf(xin)
    y = torch_rope(x, cos, sin, interleaved)
    close(ops.rope_forward(xin, cos, sin, interleaved=interleaved), y, "rotated")
    (dx,) = grads(y, dout, x)
    close(ops.rope_backward(dout, cos, sin, interleaved=interleaved), dx, "dx")


# ------------------------------------------------------------------------ swiglu


def test_swiglu(rng):
    N = 1001
    gate = f32(np.concatenate([rng.standard_normal(N - 5) * 4, [-90.0, -30.0, 0.0, 30.0, 90.0]]))
    up = f32(rng.standard_normal(N))
    dout = f32(rng.standard_normal(N))
    g, u = leaf(gate), leaf(up)
    y = F.silu(g) * u
    close(ops.swiglu_forward(gate, up), y, "out")
    dg, du = grads(y, dout, g, u)
    dgate, dup = ops.swiglu_backward(dout, gate, up)
    close(dgate, dg, "dgate")
    close(dup, du, "dup")


# --------------------------------------------------------------------- attention


def torch_attention(q, k, v, valid, causal, q_offset, window, scale):
    """float64 reference: full score matrix, HF-style repeat_kv for GQA; rows
    that see no key get a zero output (and so a zero gradient)."""
    B, Tq, H, hd = q.shape
    Tk, KVH = k.shape[1], k.shape[2]
    kr, vr = k.repeat_interleave(H // KVH, dim=2), v.repeat_interleave(H // KVH, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    slot = q_offset + torch.arange(Tq)[:, None]
    j = torch.arange(Tk)[None, :]
    vis = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        vis &= j <= slot
    if window:
        vis &= slot - j < window
    vis = vis[None, None] & torch.from_numpy(valid.astype(bool))[:, None, None, :]
    s = s.masked_fill(~vis, float("-inf"))
    seen = vis.any(-1, keepdim=True)
    lse = torch.logsumexp(s, -1)  # -inf where nothing is visible
    p = torch.softmax(s.masked_fill(~seen, 0.0), -1) * seen
    return torch.einsum("bhqk,bkhd->bqhd", p, vr), lse.permute(0, 2, 1)


# name: B, Tq, Tk, H, KVH, hd, causal, q_offset, window, key padding per row (or None)
ATTENTION_CASES = {
    "causal": (2, 70, 70, 6, 2, 12, True, 0, 0, None),
    "causal_hd64_t130": (1, 130, 130, 6, 2, 64, True, 0, 0, None),
    "single_token": (2, 1, 1, 6, 2, 12, True, 0, 0, None),
    "kv_cache_q_offset": (2, 20, 70, 6, 2, 12, True, 50, 0, None),
    "decode_step": (1, 1, 130, 6, 6, 64, True, 129, 0, None),
    "sliding_window": (1, 130, 130, 6, 2, 12, True, 0, 17, None),
    "window_with_offset": (1, 33, 130, 4, 1, 12, True, 97, 40, None),
    "left_padded_causal": (3, 70, 70, 6, 2, 12, True, 0, 0, [0, 9, 70]),  # row 2: all padding
    "bidirectional_padded": (3, 70, 70, 6, 2, 64, False, 0, 0, [0, 5, 64]),
    "cross_attention": (2, 37, 130, 6, 2, 12, False, 0, 0, [3, 129]),
    "cross_attention_mha": (1, 70, 1, 4, 4, 12, False, 0, 0, None),
    # diagonal blocks off the block grid (q_offset), split into a half seeing part of the block
    "causal_offset_diagonal": (1, 257, 300, 6, 2, 64, True, 43, 0, None),
    "causal_window_padded_diagonal": (2, 200, 200, 4, 2, 32, True, 0, 50, [0, 30]),
    # several key blocks (256 keys each on the CPU) with a partial last one: the online softmax's rescaling
    "causal_three_key_blocks": (1, 530, 530, 4, 2, 64, True, 0, 0, None),
    "cross_long_padded": (2, 140, 600, 4, 2, 32, False, 0, 0, [0, 270]),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_forward_and_backward(rng, case):
    B, Tq, Tk, H, KVH, hd, causal, q_offset, window, pads = ATTENTION_CASES[case]
    scale = 1.0 / np.sqrt(hd)
    qn = f32(rng.standard_normal((B, Tq, H, hd)) * 1.5)
    kn = f32(rng.standard_normal((B, Tk, KVH, hd)) * 1.5)
    vn = f32(rng.standard_normal((B, Tk, KVH, hd)))
    dout = f32(rng.standard_normal((B, Tq, H, hd)))
    valid = left_padding(B, Tk, pads) if pads else np.ones((B, Tk), np.uint8)
    opts = dict(key_valid=valid if pads else None, causal=causal, q_offset=q_offset, window=window)
    q, k, v = leaf(qn), leaf(kn), leaf(vn)
    ref, ref_lse = torch_attention(q, k, v, valid, causal, q_offset, window, scale)
    dq, dk, dv = grads(ref, dout, q, k, v)

    out, lse = ops.attention_forward_lse(qn, kn, vn, **opts, n_threads=2)
    close(out, ref, "out (forward_lse)")
    close(ops.attention_forward(qn, kn, vn, **opts, n_threads=2), ref, "out (attention_forward)")
    want_lse = ref_lse.detach().numpy()
    empty = np.isneginf(want_lse)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    close(lse[~empty], want_lse[~empty], "lse")

    for lse_arg in (lse, None):  # saved by the forward, or recomputed by the backward
        for n_threads in (1, 2):
            got = ops.attention_backward(dout, out, lse_arg, qn, kn, vn, **opts, n_threads=n_threads)
            for name, g, want in zip(("dq", "dk", "dv"), got, (dq, dk, dv), strict=True):
                how = f"lse {'given' if lse_arg is not None else 'recomputed'}, {n_threads} threads"
                # inputs are O(1), so are the gradients: dq of one visible key cancels to exactly 0
                close(g, want, f"{name} ({how})", floor=1.0)
    if empty.any():  # rows that see no key: zero output, zero gradient
        assert not out[empty].any()  # empty is (B, Tq, H): whole heads of out (B, Tq, H, hd)
        assert not got[0][empty].any()


@pytest.mark.parametrize("case", ["causal", "left_padded_causal", "sliding_window"])
def test_attention_fused_qkv_layout(rng, case):
    """q, k, v as column blocks of one (B, T, (H + 2 KVH) * hd) buffer (a fused
    QKV projection): row strides wider than a row, gradients laid out alike."""
    B, Tq, Tk, H, KVH, hd, causal, q_offset, window, pads = ATTENTION_CASES[case]
    qn = f32(rng.standard_normal((B, Tq, H, hd)))
    kn = f32(rng.standard_normal((B, Tk, KVH, hd)))
    vn = f32(rng.standard_normal((B, Tk, KVH, hd)))
    dout = f32(rng.standard_normal((B, Tq, H, hd)))
    opts = dict(key_valid=left_padding(B, Tk, pads) if pads else None, causal=causal, q_offset=q_offset, window=window)
    out, lse = ops.attention_forward_lse(qn, kn, vn, **opts)
    fused_out, fused_lse = ops.attention_forward_lse(qn, kn, vn, **opts, fused=True, n_threads=2)
    np.testing.assert_allclose(fused_out, out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fused_lse, lse, rtol=1e-6, atol=1e-6)
    plain = ops.attention_backward(dout, out, lse, qn, kn, vn, **opts)
    fused = ops.attention_backward(dout, out, lse, qn, kn, vn, **opts, fused=True, n_threads=2)
    for name, a, b in zip(("dq", "dk", "dv"), plain, fused, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)


def test_attention_backward_split_keys_is_reproducible(rng):
    """One row with few kv heads is split by key ranges over the threads (each
    range with its own dQ share): run to run the gradients are bit-identical,
    and they match the unsplit 1-thread run to rounding."""
    B, T, H, KVH, hd = 1, 300, 6, 2, 16
    qn, kn, vn, dout = (
        f32(rng.standard_normal(s)) for s in [(B, T, H, hd), (B, T, KVH, hd), (B, T, KVH, hd), (B, T, H, hd)]
    )
    out, lse = ops.attention_forward_lse(qn, kn, vn, causal=True)
    runs = [ops.attention_backward(dout, out, lse, qn, kn, vn, causal=True, n_threads=2) for _ in range(4)]
    for again in runs[1:]:
        for a, b in zip(runs[0], again, strict=True):
            np.testing.assert_array_equal(a, b)
    one = ops.attention_backward(dout, out, lse, qn, kn, vn, causal=True, n_threads=1)
    for a, b in zip(one, runs[0], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_attention_backward_partial_gradients(rng):
    """Any of dq, dk, dv may be NULL; the others are unchanged."""
    B, T, H, KVH, hd = 1, 70, 6, 2, 12
    qn, kn, vn, dout = (
        f32(rng.standard_normal(s)) for s in [(B, T, H, hd), (B, T, KVH, hd), (B, T, KVH, hd), (B, T, H, hd)]
    )
    out, lse = ops.attention_forward_lse(qn, kn, vn, causal=True)
    full = ops.attention_backward(dout, out, lse, qn, kn, vn, causal=True)
    for need in ("q", "k", "v", "kv", ""):
        part = ops.attention_backward(dout, out, lse, qn, kn, vn, causal=True, need=need)
        for name, a, b in zip("qkv", full, part, strict=True):
            if name in need:
                np.testing.assert_array_equal(b, a)
            else:
                assert b is None


def test_attention_backward_memory_is_linear_in_t():
    """T = 4096 keys and queries: a T x T float32 score matrix per head would
    be 64 MiB. Run in a fresh process (so its peak RSS is ours alone) and
    assert the backward's peak RSS growth stays far below that. (tracemalloc
    cannot see C allocations; the process's resident peak can.)"""
    script = textwrap.dedent(
        """
        import resource
        import numpy as np
        import ops_ext as ops
        rng = np.random.default_rng(0)
        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        B, T, H, KVH, hd = 1, 4096, 4, 2, 16
        q = rng.standard_normal((B, T, H, hd), dtype=np.float32)
        k = rng.standard_normal((B, T, KVH, hd), dtype=np.float32)
        v = rng.standard_normal((B, T, KVH, hd), dtype=np.float32)
        dout = rng.standard_normal((B, T, H, hd), dtype=np.float32)
        # warm up BLAS and the OpenMP workers on a small problem first
        o, l = ops.attention_forward_lse(q[:, :256], k[:, :256], v[:, :256], causal=True, n_threads=2)
        ops.attention_backward(dout[:, :256], o, l, q[:, :256].copy(), k[:, :256].copy(),
                               v[:, :256].copy(), causal=True, n_threads=2)
        out, lse = ops.attention_forward_lse(q, k, v, causal=True, n_threads=2)
        before = peak()
        grads = [ops.attention_backward(dout, out, lse_arg, q, k, v, causal=True, n_threads=2)
                 for lse_arg in (lse, None)]
        assert all(np.isfinite(g).all() for gs in grads for g in gs)
        print(peak() - before)
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tests = os.path.join(root, "tests")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, tests, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    growth = int(r.stdout.split()[-1])
    # outputs (3 x 0.5 MiB per call, two calls) + the recomputed lse: a few MiB, vs 64 MiB per T x T head
    assert growth < 16 * 2**20, f"attention backward grew the peak RSS by {growth / 2**20:.1f} MiB"


# ------------------------------------------------------------------------ losses


@pytest.mark.parametrize("N,V", [(9, 37), (5, 1000)])
def test_cross_entropy_with_ignore_index(rng, N, V):
    logits = f32(rng.standard_normal((N, V)) * 5)
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[[1, N - 1]] = -100
    n_valid = int((targets != -100).sum())
    z = leaf(logits)
    ref = F.cross_entropy(z, torch.from_numpy(targets).long(), ignore_index=-100, reduction="none")
    (dz,) = grads(ref, np.full(N, 0.7 / n_valid), z)  # dloss_scale = coef / non-ignored tokens
    losses, dlogits = ops.cross_entropy(logits, targets, dloss_scale=0.7 / n_valid)
    close(losses, ref, "losses")
    close(dlogits, dz, "dlogits")
    assert losses[1] == 0 and not dlogits[1].any() and not dlogits[N - 1].any()
    losses_only, none = ops.cross_entropy(logits, targets, grad=False)
    assert none is None
    np.testing.assert_array_equal(losses_only, losses)
    with pytest.raises(ValueError, match="targets"):
        ops.cross_entropy(logits, np.full(N, V, np.int32))
    with pytest.raises(ValueError, match="targets"):
        ops.cross_entropy(logits, np.full(N, -1, np.int32))


def torch_kl(z: torch.Tensor, probs: np.ndarray, index: np.ndarray, mode: int, delta: float) -> torch.Tensor:
    """Per-row KL as the reference writes it (modeling_llama_flash.py, spec §6.4)."""
    prob = torch.softmax(z, -1)
    top = torch.gather(prob, 1, torch.from_numpy(index).long())
    q = torch.cat([top, (1 - top.sum(-1))[:, None]], 1)
    p = torch.from_numpy(probs.astype(np.float64))
    if mode == 0:  # smooth_delta
        n = p.shape[1]
        p, q = (p + delta) / (1 + delta * n), (q + delta) / (1 + delta * n)
    else:  # drop: unnormalized top-K vectors
        p, q = p[:, :-1], q[:, :-1]
    return (torch.xlogy(p, p) - p * torch.log(q)).sum(-1)


KL_CASES = {
    "smooth_1e-6": (0, 1e-6),
    "smooth_0.01": (0, 0.01),
    "smooth_0": (0, 0.0),
    "drop": (1, 0.0),
}


@pytest.mark.parametrize("mode_name", list(KL_CASES))
@pytest.mark.parametrize("N,V,K,sharp", [(7, 300, 50, 3.0), (5, 10, 3, 1.0), (4, 500, 50, 8.0)])
def test_kl_topk(rng, mode_name, N, V, K, sharp):
    mode, delta = KL_CASES[mode_name]
    probs, index = teacher_table(rng, N, V, K, sharp)
    if sharp > 5:  # a peaked teacher: some fp16 top-K entries are subnormal or 0
        assert (probs[:, :K] == 0).any() or (np.abs(probs[:, :K]) < 6.1e-5).any()
    logits = f32(rng.standard_normal((N, V)) * sharp)
    kl_cof = 2.0
    z = leaf(logits)
    ref = torch_kl(z, probs, index, mode, delta)
    (dz,) = grads(ref, np.full(N, kl_cof / N), z)  # per-token mean x kl_loss_cof
    losses, dlogits = ops.kl_topk(logits, probs, index, mode, delta, kl_cof / N)
    close(losses, ref, "losses")
    close(dlogits, dz, "dlogits")
    # The reference's reduction: KLDivLoss(batchmean) on the flattened table = the mean of our rows.
    p = torch.from_numpy(probs.astype(np.float64))
    top = torch.gather(torch.softmax(z.detach(), -1), 1, torch.from_numpy(index).long())
    q = torch.cat([top, (1 - top.sum(-1))[:, None]], 1)
    if mode == 0:
        p, q = (p + delta) / (1 + delta * (K + 1)), (q + delta) / (1 + delta * (K + 1))
    else:
        p, q = p[:, :-1], q[:, :-1]
    batchmean = torch.nn.KLDivLoss(reduction="batchmean")(torch.log(q), p)
    assert abs(float(losses.astype(np.float64).mean()) - float(batchmean)) <= TOL * max(abs(float(batchmean)), 1e-3)


def test_kl_topk_rejects_bad_arguments(rng):
    probs, index = teacher_table(rng, 3, 20, 4, 1.0)
    logits = f32(rng.standard_normal((3, 20)))
    with pytest.raises(ValueError, match="mode"):
        ops.kl_topk(logits, probs, index, 2)
    with pytest.raises(ValueError, match="mode"):
        ops.kl_topk(logits, probs, index, 0, -1.0)
    bad = index.copy()
    bad[1, 2] = 20
    with pytest.raises(ValueError, match="teacher_index"):
        ops.kl_topk(logits, probs, bad, 1)
    with pytest.raises(ValueError, match="axis 1"):
        ops.kl_topk(logits, probs[:, :-1].copy(), index, 1)


def test_half_to_float_is_exact_for_every_bit_pattern():
    bits = np.arange(65536, dtype=np.uint16)
    np.testing.assert_array_equal(ops.half_to_float(bits), bits.view(np.float16).astype(np.float32))


# ------------------------------------------------ finite differences of our ops


def directional_check(forward, backward, inputs: list[np.ndarray], dout: np.ndarray, rng, eps: float = 1e-2) -> None:
    """d/dt <dout, forward(x + t u)> at t = 0 by central differences (in
    float64 over float32 forwards) against <backward(dout), u>."""
    us = [rng.standard_normal(x.shape) for x in inputs]

    def f(t: float) -> float:
        ys = forward(*[f32(x + t * u) for x, u in zip(inputs, us, strict=True)])
        return float(np.sum(np.asarray(ys, dtype=np.float64) * dout))

    fd = (f(eps) - f(-eps)) / (2 * eps)
    an = sum(float(np.sum(np.asarray(g, np.float64) * u)) for g, u in zip(backward(), us, strict=True))
    assert abs(fd - an) <= 2e-3 * max(abs(an), 1.0), f"finite difference {fd} vs backward {an}"


def fd_rmsnorm(rng):
    x, w, d = f32(rng.standard_normal((6, 37))), f32(rng.uniform(0.5, 1.5, 37)), rng.standard_normal((6, 37))
    return (
        lambda a, b: ops.rmsnorm_forward(a, b, 1e-5),
        lambda: ops.rmsnorm_backward(f32(d), x, w, 1e-5),
        [x, w],
        d,
    )


def fd_matmul(rng):
    x, w, d = f32(rng.standard_normal((6, 37))), f32(rng.standard_normal((21, 37))), rng.standard_normal((6, 21))
    return ops.matmul_forward, lambda: ops.matmul_backward(f32(d), x, w), [x, w], d


def fd_swiglu(rng):
    g, u, d = f32(rng.standard_normal(50) * 3), f32(rng.standard_normal(50)), rng.standard_normal(50)
    return ops.swiglu_forward, lambda: ops.swiglu_backward(f32(d), g, u), [g, u], d


def fd_rope(rng):
    cos, sin = rope_tables(rng, 6, 6)
    x, d = f32(rng.standard_normal((6, 2, 12))), rng.standard_normal((6, 2, 12))
    return lambda a: ops.rope_forward(a, cos, sin), lambda: [ops.rope_backward(f32(d), cos, sin)], [x], d


def fd_attention(rng):
    q, k, v = (f32(rng.standard_normal(s)) for s in [(2, 40, 4, 12), (2, 40, 2, 12), (2, 40, 2, 12)])
    d = rng.standard_normal(q.shape)
    opts = dict(key_valid=left_padding(2, 40, [0, 7]), causal=True)
    out, lse = ops.attention_forward_lse(q, k, v, **opts)
    return (
        lambda a, b, c: ops.attention_forward(a, b, c, **opts),
        lambda: ops.attention_backward(f32(d), out, lse, q, k, v, **opts),
        [q, k, v],
        d,
    )


def fd_cross_entropy(rng):
    z, t = f32(rng.standard_normal((6, 30))), np.array([1, 2, -100, 4, 5, 29], np.int32)
    return lambda a: ops.cross_entropy(a, t, grad=False)[0], lambda: [ops.cross_entropy(z, t)[1]], [z], 1


def fd_kl(mode: int, delta: float):
    def build(rng):
        z = f32(rng.standard_normal((6, 30)))
        probs, index = teacher_table(rng, 6, 30, 5, 2.0)
        return (
            lambda a: ops.kl_topk(a, probs, index, mode, delta, grad=False)[0],
            lambda: [ops.kl_topk(z, probs, index, mode, delta)[1]],
            [z],
            1,
        )

    return build


FD_CASES = {
    "rmsnorm": fd_rmsnorm,
    "matmul": fd_matmul,
    "swiglu": fd_swiglu,
    "rope": fd_rope,
    "attention": fd_attention,
    "cross_entropy": fd_cross_entropy,
    "kl_smooth": fd_kl(0, 1e-3),
    "kl_drop": fd_kl(1, 0.0),
}


@pytest.mark.parametrize("op", list(FD_CASES))
def test_finite_differences(rng, op):
    """Each backward against central differences of our own forward (no torch)."""
    directional_check(*FD_CASES[op](rng), rng)
