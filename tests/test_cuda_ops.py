"""Every op of the backend table (csrc/backend.h) on a device backend against
the CPU table, through cepe.ops and the test helpers over it (tests/ops_ext/, backend=...): forward ops,
backward ops, losses, the optimizer ops and the bf16 ops, on random inputs
of odd sizes. The reference is always the CPU table run on the same inputs
(tests/test_ops.py checks the CPU table itself against PyTorch).

Backends:
- "sim": cepe_c._sim_backend(), the CPU ops behind device-style memory that
  only upload/download reach. Always runs: it proves the bindings' alloc /
  upload / run / download / sync plumbing and the layouts under test.
- "cuda": cepe_cuda.backend() (kernels/), marked `cuda` and skipped, with the
  reason, where cepe.backends()["cuda"]["available"] is false.

Outputs the ops add into start from a non-zero pattern (init=...), so a
kernel that overwrites instead of accumulating fails. Attention runs in the
layouts model code uses: plain, fused QKV rows (row stride wider than a row)
and KV-cache buffers (batch stride wider than Tk rows, NaN past Tk that no op
may read or write).

Tolerances (max |got - want| <= atol + rtol * max |want|, per output):
- elementwise fp32 ops (embedding, rope, swiglu, rmsnorm, scale, adamw): the
  per-element math is the shared CEPE_HD headers' on both sides; only FMA
  contraction and reduction order differ: rtol 1e-5, atol 1e-6 (scale: exact)
- rope_table: angles in double on both sides: rtol 1e-6
- GEMMs (matmul, matmul_backward) and attention (forward, lse, backward),
  whose sums run in another order: rtol 1e-4
- losses (cross-entropy, distillation KL): rtol 1e-5
- sumsq_chunks (double sums): rtol 1e-12
- to_bf16: bit-exact against cepe_float_to_bf16 on the host (ops.bf16_round),
  itself checked against torch's bfloat16 rounding
- matmul_bf16: against the CPU fp32 matmul of the bf16-rounded inputs (the
  products are exact in fp32; tensor cores may sum in another order): rtol 1e-3
"""

from __future__ import annotations

import numpy as np
import ops_ext as ops
import pytest
from op_refs import f32, left_padding, teacher_table

import cepe
import cepe_c

ELEM = dict(rtol=1e-5, atol=1e-6)
GEMM = dict(rtol=1e-4, atol=0.0)
LOSS = dict(rtol=1e-5, atol=1e-7)
NORM_CHUNK = 16384  # CEPE_NORM_CHUNK (csrc/ops/optim.h)


def close(got, want, what: str, rtol: float, atol: float = 0.0) -> None:
    """Equal infinities (an lse of -inf: a row that sees no key), and finite
    entries within atol + rtol * max |want|."""
    if want is None:
        assert got is None, f"{what}: expected None"
        return
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf], err_msg=f"{what}: infinities differ")
    assert np.isfinite(got[~inf]).all(), f"{what}: non-finite values where the CPU has finite ones"
    scale = float(np.abs(want[~inf]).max(initial=0.0))
    err = float(np.abs(got[~inf] - want[~inf]).max(initial=0.0))
    assert err <= atol + rtol * scale, f"{what}: max error {err:.3e}, max |reference| {scale:.3e}"


def close_all(got, want, what: str, **tol) -> None:
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            close(g, w, f"{what}[{i}]", **tol)
    else:
        close(got, want, what, **tol)


def cuda_backend():
    info = cepe.backends()["cuda"]
    if not info["available"]:
        pytest.skip(f"no usable CUDA device: {info.get('reason', 'unknown')}")
    import cepe_cuda

    return cepe_cuda.backend()


@pytest.fixture(scope="module", params=["sim", pytest.param("cuda", marks=pytest.mark.cuda)])
def backend(request):
    """One backend instance for the module (a CUDA backend owns a stream, a
    cuBLAS handle and a memory cache)."""
    return cepe_c._sim_backend() if request.param == "sim" else cuda_backend()


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


def both(op, *args, backend, tol: dict, what: str | None = None, **kw):
    """op on the CPU table and on the backend, compared; returns the CPU result."""
    want = op(*args, **kw)
    got = op(*args, **kw, backend=backend)
    close_all(got, want, what or op.__name__, **tol)
    return want


# ------------------------------------------------------------- plumbing / API


def test_backend_argument_is_checked():
    x, w = f32(np.ones((2, 3))), f32(np.ones(3))
    with pytest.raises(TypeError, match="cepe.backend"):
        ops.rmsnorm_forward(x, w, 1e-5, backend=object())


def test_cuda_backend_without_device_says_why():
    info = cepe.backends()["cuda"]
    if not info["built"] or info["available"]:
        pytest.skip("needs the CUDA extension built on a machine without a usable GPU")
    try:
        import cepe_cuda
    except ImportError as exc:  # built where the toolkit had cuBLAS, run where it has none (nvcc alone)
        assert "libcublas" in str(exc)
        assert "pip install nvidia-cublas" in info["reason"]
        with pytest.raises(RuntimeError, match="cuBLAS is missing"):
            cepe.load("any-model", device="cuda")
        return
    with pytest.raises(RuntimeError, match="CUDA backend: .+"):
        cepe_cuda.backend()


def test_bf16_rounding_matches_torch():
    """cepe_float_to_bf16 (elementwise.h, the CUDA kernel's rounding) is round
    to nearest even, as torch's float32 -> bfloat16."""
    torch = pytest.importorskip("torch")
    x = bf16_test_values(np.random.default_rng(7))
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = ops.bf16_round(x)
    finite = np.isfinite(x)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert (np.isnan(widen_bf16(got)) == np.isnan(x)).all()


# ------------------------------------------------------------------ embedding


@pytest.mark.parametrize("V,C,N", [(37, 45, 13), (1000, 300, 257)])
def test_embedding(backend, rng, V, C, N):
    wte = f32(rng.standard_normal((V, C)))
    ids = rng.integers(0, V, N).astype(np.int32)
    ids[: N // 3] = ids[0]  # repeated ids add up in the backward
    dout = f32(rng.standard_normal((N, C)))
    both(ops.embedding_forward, ids, wte, backend=backend, tol=ELEM)
    both(ops.embedding_backward, dout, ids, V, init=0.5, backend=backend, tol=ELEM)


# -------------------------------------------------------------------- rmsnorm


@pytest.mark.parametrize("N,C", [(1, 37), (7, 576), (130, 2049)])
def test_rmsnorm(backend, rng, N, C):
    inp = f32(rng.standard_normal((N, C)) * 3)
    weight = f32(rng.uniform(0.5, 1.5, C))
    dout = f32(rng.standard_normal((N, C)))
    both(ops.rmsnorm_forward, inp, weight, 1e-5, backend=backend, tol=ELEM)
    both(ops.rmsnorm_backward, dout, inp, weight, 1e-5, init=0.5, backend=backend, tol=ELEM)
    both(ops.rmsnorm_backward, dout, inp, weight, 1e-5, dweight=False, init=0.5, backend=backend, tol=ELEM)


# --------------------------------------------------------------------- matmul


@pytest.mark.parametrize("N,C,OC", [(1, 37, 53), (7, 37, 53), (130, 96, 257), (64, 1024, 130)])
def test_matmul(backend, rng, N, C, OC):
    inp = f32(rng.standard_normal((N, C)))
    weight = f32(rng.standard_normal((OC, C)) / np.sqrt(C))
    dout = f32(rng.standard_normal((N, OC)))
    both(ops.matmul_forward, inp, weight, backend=backend, tol=GEMM)
    both(ops.matmul_forward, inp, weight, init=0.5, backend=backend, tol=GEMM, what="matmul (accumulate)")
    both(ops.matmul_backward, dout, inp, weight, init=0.5, backend=backend, tol=GEMM)
    both(ops.matmul_backward, dout, inp, weight, dinp=False, backend=backend, tol=GEMM, what="dweight only")
    both(ops.matmul_backward, dout, inp, weight, dweight=False, backend=backend, tol=GEMM, what="dinp only")
    # accumulate = 1 adds dinp into what is there
    base = f32(rng.standard_normal((N, C)))
    want, got = base.copy(), base.copy()
    ops.matmul_backward(dout, inp, weight, dweight=False, dinp_into=want)
    ops.matmul_backward(dout, inp, weight, dweight=False, dinp_into=got, backend=backend)
    close(got, want, "dinp accumulated", **GEMM)


# ----------------------------------------------------------------------- rope


@pytest.mark.parametrize("N,half,theta", [(13, 32, 1e4), (300, 64, 5e5)])
def test_rope_table(backend, rng, N, half, theta):
    pos = rng.uniform(0, 1e6, N)  # fractional positions up to 10^6: angles must be taken in double
    pos[:3] = [0.0, 1.0, 131071.0]
    inv_freq = f32(theta ** (-np.arange(half) / half))
    both(ops.rope_table, pos, inv_freq, 1.3, backend=backend, tol=dict(rtol=1e-6, atol=1e-7))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("N,nh,hd,half", [(13, 5, 64, 32), (7, 3, 64, 16), (9, 4, 48, 24), (1, 2, 128, 64)])
def test_rope(backend, rng, interleaved, N, nh, hd, half):
    cos, sin = ops.rope_table(rng.uniform(0, 5000, N), f32(1e4 ** (-np.arange(half) / half)), 1.3)
    x = f32(rng.standard_normal((N, nh, hd)))
    both(ops.rope_forward, x, cos, sin, interleaved=interleaved, backend=backend, tol=ELEM)
    both(ops.rope_backward, x, cos, sin, interleaved=interleaved, backend=backend, tol=ELEM)


# --------------------------------------------------------------------- swiglu


@pytest.mark.parametrize("n", [1, 1001, 70001])
def test_swiglu(backend, rng, n):
    gate = f32(rng.standard_normal(n) * 4)
    gate[:1] = 0.0
    up = f32(rng.standard_normal(n))
    dout = f32(rng.standard_normal(n))
    both(ops.swiglu_forward, gate, up, backend=backend, tol=ELEM)
    both(ops.swiglu_backward, dout, gate, up, init=0.5, backend=backend, tol=ELEM)


# ------------------------------------------------------------------ attention


# name: B, Tq, Tk, H, KVH, hd, causal, q_offset, window, key padding per row (or None), layout
#   layout: "plain", "fused" (QKV rows of one buffer), or an int: the KV-cache capacity (> Tk)
ATTENTION_CASES = {
    "causal_gqa_hd64": (2, 70, 70, 8, 2, 64, True, 0, 0, None, "plain"),
    "causal_hd128_two_tiles": (1, 130, 130, 4, 4, 128, True, 0, 0, None, "plain"),
    "causal_gqa4_many_row_blocks": (1, 150, 150, 8, 2, 32, True, 0, 0, None, "plain"),
    "fused_qkv_causal": (2, 70, 70, 6, 2, 64, True, 0, 0, None, "fused"),
    "fused_left_padded": (3, 45, 45, 4, 2, 48, True, 0, 0, [0, 9, 45], "fused"),  # row 2: no key at all
    "decode_step_kv_cache": (2, 1, 300, 8, 2, 128, True, 299, 0, [0, 17], 512),
    "prefill_chunk_kv_cache": (1, 20, 150, 6, 2, 64, True, 130, 0, None, 200),
    "decode_long_context": (1, 1, 5000, 8, 2, 128, True, 4999, 0, None, 6000),  # keys split over blocks
    "cross_decode_long_padded": (2, 1, 3000, 4, 4, 64, False, 0, 0, [100, 2999], "plain"),  # row 1: one key
    "sliding_window_offset": (1, 33, 130, 4, 1, 64, True, 97, 40, None, "plain"),
    "sliding_window_cache": (2, 64, 200, 4, 2, 64, True, 136, 50, [0, 30], 256),
    "left_padded_causal": (3, 70, 70, 6, 2, 12, True, 0, 0, [0, 9, 70], "plain"),
    "encoder_bidirectional_padded": (3, 70, 70, 6, 2, 64, False, 0, 0, [0, 5, 64], "plain"),
    "cross_attention_hd48": (2, 37, 130, 6, 2, 48, False, 0, 0, [3, 129], "plain"),
    "cross_attention_all_masked": (2, 9, 40, 4, 2, 64, False, 0, 0, [40, 0], "plain"),
    "single_key": (1, 5, 1, 4, 4, 12, False, 0, 0, None, "plain"),
    "head_dim_256": (1, 40, 70, 2, 1, 256, True, 30, 0, None, "plain"),
    "head_dim_200": (1, 33, 33, 2, 2, 200, True, 0, 0, None, "plain"),
}


def attention_inputs(rng, case: str):
    B, Tq, Tk, H, KVH, hd, causal, q_offset, window, pads, layout = ATTENTION_CASES[case]
    q = f32(rng.standard_normal((B, Tq, H, hd)) * 1.5)
    k = f32(rng.standard_normal((B, Tk, KVH, hd)) * 1.5)
    v = f32(rng.standard_normal((B, Tk, KVH, hd)))
    dout = f32(rng.standard_normal((B, Tq, H, hd)))
    opts = dict(key_valid=left_padding(B, Tk, pads) if pads else None, causal=causal, q_offset=q_offset, window=window)
    if layout == "fused":
        opts["fused"] = True
    elif layout != "plain":
        opts["kv_capacity"] = layout
    return q, k, v, dout, opts


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention(backend, rng, case):
    q, k, v, dout, opts = attention_inputs(rng, case)
    out, lse = both(ops.attention_forward_lse, q, k, v, **opts, backend=backend, tol=GEMM)
    both(ops.attention_forward, q, k, v, **opts, backend=backend, tol=GEMM)
    for lse_arg in (lse, None):  # saved by the forward, or rebuilt by the backward
        how = f"attention_backward (lse {'given' if lse_arg is not None else 'rebuilt'})"
        args = (dout, out, lse_arg, q, k, v)
        both(ops.attention_backward, *args, **opts, init=0.5, backend=backend, tol=GEMM, what=how)


def test_attention_partial_gradients(backend, rng):
    q, k, v, dout, opts = attention_inputs(rng, "causal_gqa_hd64")
    out, lse = ops.attention_forward_lse(q, k, v, **opts)
    args = (dout, out, lse, q, k, v)
    for need in ("q", "k", "v", "kv", "qv"):
        how = f"attention_backward need={need}"
        both(ops.attention_backward, *args, **opts, need=need, init=0.5, backend=backend, tol=GEMM, what=how)


# --------------------------------------------------------------------- losses


@pytest.mark.parametrize("N,V", [(9, 37), (5, 50000)])
def test_cross_entropy(backend, rng, N, V):
    logits = f32(rng.standard_normal((N, V)) * 5)
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[[1, N - 1]] = -100
    both(ops.cross_entropy, logits, targets, 0.7, init=0.5, backend=backend, tol=LOSS)
    both(ops.cross_entropy, logits, targets, 0.7, grad=False, backend=backend, tol=LOSS, what="losses only")
    with pytest.raises(ValueError, match="targets"):
        ops.cross_entropy(logits, np.full(N, V, np.int32), backend=backend)


@pytest.mark.parametrize("mode,delta", [(0, 1e-6), (0, 0.01), (0, 0.0), (1, 0.0)])
@pytest.mark.parametrize("N,V,K,sharp", [(7, 300, 50, 3.0), (4, 5000, 20, 8.0)])
def test_kl_topk(backend, rng, mode, delta, N, V, K, sharp):
    probs, index = teacher_table(rng, N, V, K, sharp)
    index[0, -3:] = index[0, 0]  # repeated teacher ids add up, in order
    logits = f32(rng.standard_normal((N, V)) * sharp)
    args = (logits, probs, index, mode, delta)
    both(ops.kl_topk, *args, 2.0 / N, init=0.5, backend=backend, tol=LOSS)
    both(ops.kl_topk, *args, grad=False, backend=backend, tol=LOSS, what="kl losses only")


def test_kl_topk_rejects_bad_arguments_on_every_backend(backend, rng):
    probs, index = teacher_table(rng, 3, 20, 4, 1.0)
    logits = f32(rng.standard_normal((3, 20)))
    with pytest.raises(ValueError, match="mode"):
        ops.kl_topk(logits, probs, index, 2, backend=backend)
    bad = index.copy()
    bad[1, 2] = 20
    with pytest.raises(ValueError, match="teacher_index"):
        ops.kl_topk(logits, probs, bad, 1, backend=backend)


# ------------------------------------------------------------------ optimizer


@pytest.mark.parametrize("n", [5, NORM_CHUNK, 3 * NORM_CHUNK + 17])
def test_sumsq_chunks(backend, rng, n):
    g = f32(rng.standard_normal(n) * 3)
    partial = both(ops.sumsq_chunks, g, backend=backend, tol=dict(rtol=1e-12, atol=0.0))
    assert partial.shape == (-(-n // NORM_CHUNK),)


def test_scale(backend, rng):
    x = f32(rng.standard_normal(100003))
    np.testing.assert_array_equal(ops.scale(x, 0.37, backend=backend), ops.scale(x, 0.37))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw(backend, rng, weight_decay):
    n, lr, beta1, beta2, eps, t = 100003, 1e-3, 0.9, 0.999, 1e-8, 3
    p, g = f32(rng.standard_normal(n)), f32(rng.standard_normal(n) * 1e-2)
    m, v = f32(rng.standard_normal(n) * 1e-2), f32(rng.uniform(0, 1e-4, n))
    # the scalars as cepe_adamw_scalars computes them (csrc/train/adamw.c)
    scalars = (
        np.float32(1 - lr * weight_decay) if weight_decay else np.float32(1.0),
        np.float32(1 - beta1),
        np.float32(beta2),
        np.float32(1 - beta2),
        np.float32(np.sqrt(1 - beta2**t)),
        np.float32(-lr / (1 - beta1**t)),
        np.float32(eps),
    )
    both(ops.adamw, p, g, m, v, *map(float, scalars), backend=backend, tol=dict(rtol=1e-6, atol=1e-9))


# ----------------------------------------------------------------------- bf16


def bf16_test_values(rng) -> np.ndarray:
    """Random floats of every magnitude plus the rounding corner cases: exact
    ties with even and odd kept halves, just above/below a tie, the overflow
    to inf, subnormals, signed zeros, inf and NaN."""
    x = (rng.standard_normal(4096) * np.exp2(rng.integers(-130, 120, 4096))).astype(np.float32)
    bits = rng.integers(0, 2**16, 64, dtype=np.uint32) << 16
    corners = np.concatenate(
        [bits | 0x8000, (bits | 0x8000) + 1, (bits | 0x8000) - 1, (bits | 0x18000) & 0xFFFFFFFF, bits | 0x7FFF]
    ).astype(np.uint32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, np.finfo(np.float32).max, 1e-40, -3e-39], np.float32)
    return np.concatenate([x, corners.view(np.float32), special]).astype(np.float32)


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_to_bf16(backend, rng):
    x = bf16_test_values(rng)
    try:
        got = ops.to_bf16(x, backend=backend)
    except NotImplementedError:
        pytest.skip("this backend has no bf16 ops")
    np.testing.assert_array_equal(got, ops.bf16_round(x))


@pytest.mark.parametrize("N,C,OC", [(1, 64, 96), (37, 200, 130), (130, 1024, 257)])
def test_matmul_bf16(backend, rng, N, C, OC):
    inp = f32(rng.standard_normal((N, C)))
    w_bits = ops.bf16_round(f32(rng.standard_normal((OC, C)) / np.sqrt(C)))
    try:
        got = ops.matmul_bf16(inp, w_bits, backend=backend)
    except NotImplementedError:
        pytest.skip("this backend has no bf16 ops")
    ref_inp, ref_w = widen_bf16(ops.bf16_round(inp)), widen_bf16(w_bits)
    close(got, ops.matmul_forward(ref_inp, ref_w), "matmul_bf16", rtol=1e-3)
    got = ops.matmul_bf16(inp, w_bits, init=0.5, backend=backend)
    close(got, ops.matmul_forward(ref_inp, ref_w, init=0.5), "matmul_bf16 (accumulate)", rtol=1e-3)
