"""Weights in their stored GGUF formats multiplied natively (csrc/quant/), through
ctypes on the entry points cepe_c exports, on every instruction-set path this CPU has
(portable C, AVX2, AVX-512 VNNI / BF16).

Oracles
  - Dequantization: bit-identical to what the GGUF reader (cepe.gguf_io.GGUFFile.get)
    makes of the same bytes (Q5_K, which the reader does not take yet: gguf's NumPy
    dequantizer, the one it uses for the K-quants).
  - Products: float64 sums over those dequantized weights, within the bounds below.

Error bounds. u = 2^-24 (float32 unit roundoff). Write each stored weight as
w_i = a_i - b_i: a_i = (block scale) * (integer code), b_i the block's minimum term
(Q4_1: -m; Q4_K/Q5_K: dmin * m_j; b_i = 0 for the other formats). The GGUF reader's
w~_i rounds d*sc, the product and the difference separately, so
|w~_i - w_i| <= 3u (|a_i| + |b_i|).

1. Activation quantization. Q4_0/Q4_1/Q8_0 weights multiply activations quantized
   per block of 32 (Q8_32): d = max|x|/127 in fp32, q_i = round(x_i * fl(1/d)) in
   [-127, 127]. fl(x_i * fl(1/d)) is within 2u|x_i/d| (1 + u) <= 2.01 * 127u of x_i/d,
   so x^_i = d q_i satisfies |x_i - x^_i| <= d (1/2 + 2.01 * 127u) <= d (1/2 + 2^-14).
   K-quants take Q8_K (ggml's: 256 values, iscale = -127/max, d = fl(1/iscale)):
   x_i - d q_i = d (x_i/d - q_i) and x_i/d is within 2.01 * 127u of x_i * iscale,
   so again |x_i - x^_i| <= |d| (1/2 + 2^-14). (Where the scale is subnormal its
   reciprocal overflows and q_i = round(x_i / d) with the d kept: the same bound. A block
   whose largest |x_i| is below 2^-126, the smallest normal float, becomes zeros:
   |x_i - x^_i| = |x_i| < 2^-126.) BF16 activations (AVX512-BF16):
   round to nearest with 8 significant bits, |x_i - x^_i| <= 2^-8 |x_i| + 2^-134 (half
   of bf16's subnormal spacing). F16 and BF16
   weights on the other paths multiply the fp32 activations themselves (x^ = x).
   Checked directly on the activation rows the kernels see.

2. The kernel's arithmetic (the tight check, against sum_i w~_i x^_i). Within a block
   the products are exact integers (int32 cannot overflow: a Q6_K block reaches at most
   256 * 32 * 127 * 128 < 2^31; maddubs's int16 pairs stay below 32767), so the float
   error comes only from the T_B = fl(fl(d_w d_x) * fl(I_B)) terms (relative error <= 3u, fl(I_B)
   exact below 2^24) and from adding m of them (m = 2 * number of blocks, counting
   the minimum terms; each term passes through at most m + 5 additions in any
   lane-and-tree order), so |y - sum_B T_B*| <= (m + 8) u sum_B |T_B*|, and
   |T_B*| <= sum_{i in B} |a_i x^_i| (or |b_i x^_i| for a minimum term). With the
   reader's rounding of w~, |y - sum_i w~_i x^_i| <= (m + 16) u S,
   S = sum_i (|w~_i| + 2|b_i|) |x^_i|  (>= sum_i (|a_i| + |b_i|) |x^_i|).
   F16/BF16 kernels add n exact-or-rounded products: m = n. Below 2^-126 float rounding
   is absolute (subnormal spacing 2^-149), and a subnormal d_w d_x is then multiplied by
   the block's integer sum (< 2^28), so each bound also takes (m + 16) 2^-121; and
   vdpbf16ps (AVX512-BF16) treats subnormal inputs and results as zero, which its bound
   covers with 2^-125 sum_i |w~_i| + (m + 16) 2^-126. (Real activations never come near:
   these terms only matter in the "tiny" cases below.)

3. End to end (against sum_i w~_i x_i): the tight bound plus the activation error,
   sum_B e_B sum_{i in B} |w~_i| with e_B = |d_B| (1/2 + 2^-14) (int8 activations) or
   sum_i 2^-8 |w~_i x_i| (bf16 activations).

The dequantized-tile path (sgemm, many rows) multiplies unrounded fp32 activations:
|out - sum_i w~_i x_i| <= (n + 16) u sum_i |w~_i x_i| (any summation order). BF16 on the
AVX-512 path with AVX512-BF16 takes the bf16 GEMM for many rows instead (tests/test_bf16_gemm.py);
its tiles + sgemm are tested here on the AVX2 path."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from cepe.gguf_io import GGUFFile  # noqa: E402
from cepe.testing import quant_ctypes  # noqa: E402
from cepe.testing.quant_ctypes import ISA_NAMES, SCALES, TYPES, QTensor, load_library  # noqa: E402

U = 2.0**-24
ACT_SLACK = 0.5 + 2.0**-14

OK, INVALID_ARG, UNSUPPORTED = 0, 1, 4
LIB = load_library()
ISAS = list(range(LIB.cepe_quant_isa_best() + 1))


def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def last_error() -> str:
    return LIB.cepe_last_error().decode()


@pytest.fixture(autouse=True)
def _best_isa():
    yield
    assert LIB.cepe_quant_set_isa(ISAS[-1]) == OK


def use_isa(isa: int) -> None:
    assert LIB.cepe_quant_set_isa(isa) == OK, last_error()


# ------------------------------------------------------------------ weights


def random_rows(name: str, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """n_out stored rows of n_in values (uint8 [n_out, row bytes]): random codes and
    6-bit scales, fp16 scales of either sign and varied magnitude."""

    def scales(shape: tuple[int, int]) -> np.ndarray:
        return 10.0 ** rng.uniform(-4, -1, shape) * rng.choice([-1.0, 1.0], shape)

    return quant_ctypes.random_rows(name, n_out, n_in, rng, 0.5, scales)


def reference_dequantize(name: str, raw: np.ndarray, tmp_path) -> np.ndarray:
    """The GGUF reader's float32 weights for these stored rows (a file written with gguf)."""
    if name == "Q5_K":  # not in the reader's list yet: its K-quant dequantizer directly
        return gguf.quants.dequantize(raw, Q.Q5_K).astype(np.float32)
    path = os.path.join(tmp_path, f"{name}.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("w", np.ascontiguousarray(raw), raw_dtype=Q[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gf = GGUFFile(path)
    try:
        return gf.get("w")
    finally:
        gf.close()


def minimum_terms(name: str, raw: np.ndarray, n_in: int) -> np.ndarray:
    """|b_i| for every weight (the docstring's minimum term), float64 [n_out, n_in]."""
    n_out = raw.shape[0]
    if name not in ("Q4_1", "Q4_K", "Q5_K"):
        return np.zeros((n_out, n_in))
    _, block, nbytes = TYPES[name]
    blocks = raw.reshape(n_out, -1, nbytes)
    dmin = np.abs(blocks[:, :, 2:4].copy().view(np.float16).astype(np.float64))  # [n_out, nb, 1]
    if name == "Q4_1":
        return np.repeat(dmin[:, :, 0], 32, axis=1)
    _, m = gguf.quants.Q4_K.get_scale_min(blocks[:, :, 4:16].reshape(-1, 12))
    m = m.reshape(n_out, -1, 8).astype(np.float64)
    return np.repeat((dmin * m).reshape(n_out, -1), 32, axis=1)


def dequantize(name: str, raw: np.ndarray, n_in: int) -> np.ndarray:
    n_out = raw.shape[0]
    out = np.empty((n_out, n_in), np.float32)
    for r in range(n_out):
        row = np.ascontiguousarray(raw[r])
        assert LIB.cepe_dequantize_row(TYPES[name][0], ptr(row), ptr(out[r]), n_in) == OK, last_error()
    return out


# ------------------------------------------------------------------ activations

ACT_Q8_K = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])


def quantize(name: str, x: np.ndarray):
    """(activation bytes the kernel takes, x^ float64, kind, per-value bound on |x - x^|)."""
    tid, n = TYPES[name][0], x.size
    size = LIB.cepe_act_row_bytes(tid, n)
    act = np.zeros(max(size, 1), np.uint8)
    x = np.ascontiguousarray(x, np.float32)
    assert LIB.cepe_quantize_activations(tid, ptr(x), ptr(act), n) == OK, last_error()
    if size == 4 * n:
        got = act.view(np.float32)
        assert np.array_equal(got.view(np.uint32), x.view(np.uint32))
        return act, x.astype(np.float64), "f32", np.zeros(n)
    if size == 2 * n:
        xh = (act.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return act, xh, "bf16", 2.0**-8 * np.abs(x.astype(np.float64)) + 2.0**-134
    if size == n // 32 * 44:  # int8 qs[n], then float d[n/32], float s[n/32] (= d * sum), int32 sum[n/32]
        nb, bs = n // 32, 32
        blocks = {
            "qs": act[:n].view(np.int8).reshape(nb, 32),
            "d": act[n : n + 4 * nb].view(np.float32),
            "s": act[n + 4 * nb : n + 8 * nb].view(np.float32),
            "sum": act[n + 8 * nb :].view(np.int32),
        }
        assert np.array_equal(blocks["sum"], blocks["qs"].astype(np.int64).sum(axis=1))
        assert np.array_equal(blocks["s"], blocks["d"] * blocks["sum"].astype(np.float32), equal_nan=True)
    else:
        assert size == n // 256 * ACT_Q8_K.itemsize
        blocks, bs = act.view(ACT_Q8_K), 256
        assert np.array_equal(blocks["bsums"], blocks["qs"].reshape(-1, 16, 16).astype(np.int64).sum(axis=2))
    assert np.abs(blocks["qs"].astype(np.int64)).max(initial=0) <= 127
    d = blocks["d"].astype(np.float64)
    xh = (blocks["qs"].astype(np.float64) * d[:, None]).reshape(-1)
    x_err = np.repeat(np.abs(d) * ACT_SLACK, bs)
    zero = np.repeat(d == 0, bs)  # blocks below the smallest normal float are zeros
    assert np.all(np.abs(x[zero]) < 2.0**-126)
    x_err[zero] = np.abs(x[zero])
    return act, xh, f"q8_{bs}", x_err


def vec_dot(name: str, row: np.ndarray, act: np.ndarray, n: int) -> float:
    out = np.zeros(1, np.float32)
    row = np.ascontiguousarray(row)
    assert LIB.cepe_vec_dot(TYPES[name][0], n, ptr(row), ptr(act), ptr(out)) == OK, last_error()
    return float(out[0])


def float_terms(kind: str, name: str, n: int) -> int:
    """m of the docstring: floating terms a kernel adds."""
    return n if kind in ("f32", "bf16") else 2 * (n // TYPES[name][1])


def check_products(name: str, raw: np.ndarray, x: np.ndarray, tmp_path, what: str) -> np.ndarray:
    """vec_dot of every stored row with x on the current ISA against both bounds;
    returns the kernel's outputs."""
    n_in = x.size
    w = reference_dequantize(name, raw, tmp_path).astype(np.float64)
    b = minimum_terms(name, raw, n_in)
    act, xh, kind, x_err = quantize(name, x)
    x64 = x.astype(np.float64)
    assert np.all(np.abs(x64 - xh) <= x_err), f"{what}: activation quantization error beyond its bound"
    ys = np.array([vec_dot(name, raw[r], act, n_in) for r in range(raw.shape[0])])
    m = float_terms(kind, name, n_in)
    tight = (m + 16) * (U * ((np.abs(w) + 2 * b) @ np.abs(xh)) + 2.0**-121)
    if kind == "bf16":  # vdpbf16ps: subnormal inputs and results are zeros
        tight += 2.0**-125 * np.abs(w).sum(axis=1) + (m + 16) * 2.0**-126
    err_tight = np.abs(ys - w @ xh)
    assert np.all(err_tight <= tight), f"{what}: {err_tight.max()} > tight bound {tight[np.argmax(err_tight - tight)]}"
    loose = tight + np.abs(w) @ x_err
    err = np.abs(ys - w @ x64)
    assert np.all(err <= loose), f"{what}: {err.max()} > end-to-end bound"
    return ys


# ------------------------------------------------------------------ formats


def test_block_layouts_match_gguf():
    for name, (tid, block, nbytes) in TYPES.items():
        assert (block, nbytes) == gguf.GGML_QUANT_SIZES[Q[name]], name
        assert int(Q[name]) == tid
        assert LIB.cepe_qtype_block_size(tid) == block
        assert LIB.cepe_qtype_row_bytes(tid, 3 * block) == 3 * nbytes
        if block > 1:
            assert LIB.cepe_qtype_row_bytes(tid, block + 1) == 0
    assert LIB.cepe_qtype_row_bytes(0, 7) == 28 and LIB.cepe_qtype_block_size(6) == 0  # F32; Q5_0 unknown


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_bit_exact(name, tmp_path):
    """Random rows, then extremes: the largest fp16 scales, subnormal and zero scales,
    inf/NaN scales; F16 and BF16 take every one of the 65536 bit patterns."""
    rng = np.random.default_rng(0)
    tid, block, nbytes = TYPES[name]
    if block == 1:
        raw = np.arange(65536, dtype=np.uint16).view(np.uint8).reshape(64, 2048)
    else:
        n_in = 2 * block
        raw = random_rows(name, 48, n_in, rng).reshape(48, 2, nbytes)
        specials = np.array([65504, -65504, 6e-8, -6e-8, 0.0, np.inf, np.nan, 1.0], np.float16)
        for i, off in enumerate(SCALES[name] * 24):
            raw[24 + i % 24, :, off : off + 2] = specials[i % 8 : i % 8 + 1].view(np.uint8)
        raw = raw.reshape(48, 2 * nbytes)
    n_in = raw.shape[1] // nbytes * block
    ref = reference_dequantize(name, raw, tmp_path)
    ours = dequantize(name, raw, n_in)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32)), name


def test_dequantize_f32_is_a_copy():
    x = np.random.default_rng(0).normal(size=37).astype(np.float32)
    y = np.empty_like(x)
    assert LIB.cepe_dequantize_row(0, ptr(x), ptr(y), 37) == OK
    assert np.array_equal(x.view(np.uint32), y.view(np.uint32))


# ------------------------------------------------------------------ products

SHAPES = {1: (1, 15, 48, 577), 32: (32, 96, 576), 256: (256, 768)}


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_NAMES[i])
@pytest.mark.parametrize("name", TYPES)
def test_vec_dot_within_bounds(name, isa, tmp_path):
    """Random weights and activations (normal, heavy-tailed, one outlier per block) on odd
    and even block counts, so every kernel's main loop and its tail run."""
    use_isa(isa)
    rng = np.random.default_rng(isa)
    for n_in in SHAPES[TYPES[name][1]]:
        raw = random_rows(name, 12, n_in, rng)
        for kind, x in (
            ("normal", rng.normal(0, 1, n_in)),
            ("heavy", rng.standard_t(2, n_in) * 30),
            ("outlier", np.where(np.arange(n_in) % 32 == 7, 1e4, rng.normal(0, 1e-3, n_in))),
            # subnormal scales (max |x| near 2^-126) and blocks below it entirely
            ("tiny", rng.normal(0, 1, n_in) * np.where(np.arange(n_in) // 32 % 2, 2.0**-124, 2.0**-130)),
        ):
            check_products(name, raw, x.astype(np.float32), tmp_path, f"{name}/{ISA_NAMES[isa]}/{n_in}/{kind}")


def extreme_rows(name: str, n_out: int, n_in: int) -> np.ndarray:
    """Every code at its largest magnitude and every scale at fp16's largest, so the
    integer sums reach their extremes (overflow or int16 saturation would show)."""
    tid, block, nbytes = TYPES[name]
    if block == 1:
        v = np.where(np.arange(n_in) % 2, 65504.0, -65504.0).astype(np.float32)
        if name == "F16":
            return np.tile(v.astype(np.float16).view(np.uint8), (n_out, 1))
        return np.tile((v.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8), (n_out, 1))
    nb = n_in // block
    blk = np.zeros(nbytes, np.uint8)
    big = np.frombuffer(np.float16(65504).tobytes(), np.uint8)
    if name == "Q4_0":
        blk[:] = 0x00  # code 0 - 8 = -8
    elif name == "Q4_1":
        blk[:] = 0xFF  # code 15, minimum 65504 below
    elif name == "Q8_0":
        blk[:] = 0x80  # -128
    elif name in ("Q4_K", "Q5_K"):
        blk[:] = 0xFF  # scales and minimums 63, codes 15 / 31
    elif name == "Q6_K":
        blk[:192] = 0x00  # codes 0 - 32 = -32
        blk[192:208] = 0x80  # scales -128
    for off in SCALES[name]:
        blk[off : off + 2] = big
    return np.tile(blk, (n_out, nb))


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_NAMES[i])
@pytest.mark.parametrize("name", TYPES)
def test_vec_dot_extremes_and_zeros(name, isa, tmp_path):
    use_isa(isa)
    block = TYPES[name][1]
    n_in = 2 * max(block, 32) + (block == 1) * 7
    raw = extreme_rows(name, 2, n_in)
    ones = np.ones(n_in, np.float32)
    signs = np.where(np.arange(n_in) % 3, 1.0, -1.0).astype(np.float32)
    for x in (100 * ones, -100 * ones, 100 * signs):  # every activation code at +-127
        check_products(name, raw, x, tmp_path, f"{name}/{ISA_NAMES[isa]}/extreme")
    # zeros: weights or activations, the product is exactly 0
    rng = np.random.default_rng(0)
    act, *_ = quantize(name, np.zeros(n_in, np.float32))
    assert vec_dot(name, random_rows(name, 1, n_in, rng)[0], act, n_in) == 0.0
    zero_w = np.zeros(TYPES[name][2] * (n_in // block), np.uint8)
    act, *_ = quantize(name, rng.normal(size=n_in).astype(np.float32))
    assert vec_dot(name, zero_w, act, n_in) == 0.0


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_NAMES[i])
@pytest.mark.parametrize("name", TYPES)
def test_nonfinite_activations_give_nonfinite_products(name, isa):
    use_isa(isa)
    n_in = 2 * max(TYPES[name][1], 32)
    raw = random_rows(name, 3, n_in, np.random.default_rng(1))
    for bad in (np.inf, -np.inf, np.nan):
        x = np.ones(n_in, np.float32)
        x[5] = bad
        act, *_ = quantize(name, x)
        assert not any(np.isfinite(vec_dot(name, r, act, n_in)) for r in raw), (name, bad)


# ------------------------------------------------------------------ qmatmul


def qtensor(name: str, raw: np.ndarray, n_in: int, stride: int | None = None) -> QTensor:
    return QTensor(TYPES[name][0] if name in TYPES else 0, raw.shape[0], n_in, ptr(raw), stride or raw.strides[0])


def qmatmul(w: QTensor, x: np.ndarray, out: np.ndarray | None = None, accumulate=0, threads=1, work=True) -> int:
    rows = x.shape[0]
    if out is None:
        out = np.zeros((rows, w.n_out), np.float32)
    size = LIB.cepe_qmatmul_work_size(ctypes.byref(w), rows, threads)
    buf = np.zeros(max(size, 1), np.uint8)
    return LIB.cepe_qmatmul(
        ptr(out), ptr(x), ctypes.byref(w), rows, accumulate, ptr(buf) if work else None, size, threads
    ), out


KERNELS, SGEMM, INT8_GEMM, BF16_GEMM = 0, 1, 2, 3  # cepe_qmatmul_path
OFF = 1 << 30  # a row count no call reaches


class gemm_off:
    """The int8 GEMM turned off (cepe_qmatmul_gemm_rows), so that the other ways run."""

    def __enter__(self) -> None:
        self.prev = LIB.cepe_qmatmul_gemm_rows(OFF)

    def __exit__(self, *exc: object) -> None:
        LIB.cepe_qmatmul_gemm_rows(self.prev)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_NAMES[i])
@pytest.mark.parametrize("name", TYPES)
def test_qmatmul_kernel_path_equals_vec_dot(name, isa):
    """Few rows (decode): the quantized kernels, identical to vec_dot row by row, on one
    thread or two (each output is one thread's), with and without accumulate."""
    use_isa(isa)
    rng = np.random.default_rng(2)
    n_in = 576 if TYPES[name][1] <= 32 else 768
    raw = random_rows(name, 264, n_in, rng)  # 264: a thread share that is not a multiple of 16 rows
    w = qtensor(name, raw, n_in)
    for rows in (1, 3):
        if rows > 1:
            LIB.cepe_qmatmul_gemm_rows(OFF)  # Q4_0 on AVX-512 takes the int8 GEMM from 2 rows (tested below)
        assert LIB.cepe_qmatmul_path(ctypes.byref(w), rows) == KERNELS
        x = rng.normal(size=(rows, n_in)).astype(np.float32)
        want = np.empty((rows, 264), np.float32)
        for r in range(rows):
            act, *_ = quantize(name, x[r])
            want[r] = [vec_dot(name, raw[o], act, n_in) for o in range(264)]
        for threads in (1, 2):
            st, got = qmatmul(w, x, threads=threads)
            assert st == OK, last_error()
            assert np.array_equal(got, want), (rows, threads)
            init = rng.normal(size=(rows, 264)).astype(np.float32)
            st, got = qmatmul(w, x, out=init.copy(), accumulate=1, threads=threads)
            assert st == OK and np.array_equal(got, init + want)
        st, got = qmatmul(w, x, work=False)  # scratch of its own
        assert st == OK and np.array_equal(got, want)
    LIB.cepe_qmatmul_gemm_rows(0)


@pytest.mark.parametrize("name", [*TYPES, "F32"])
def test_qmatmul_sgemm_path(name, tmp_path):
    """Many rows (prefill): dequantized tiles through the BLAS, fp32 accuracy."""
    rng = np.random.default_rng(3)
    n_in = 768
    if name == "F32":
        wf = rng.normal(size=(200, n_in)).astype(np.float32)
        raw, w64 = wf.view(np.uint8), wf.astype(np.float64)
    else:
        raw = random_rows(name, 200, n_in, rng)
        w64 = reference_dequantize(name, raw, tmp_path).astype(np.float64)
    w = qtensor(name, raw, n_in)
    rows = 70  # past every format's crossover
    if LIB.cepe_qmatmul_uses_bf16_gemm(ctypes.byref(w), rows):
        use_isa(1)  # BF16's tiles + sgemm (the AVX-512 path takes the bf16 GEMM)
    with gemm_off():  # Q4_0 on AVX-512 takes the int8 GEMM (tested below)
        assert LIB.cepe_qmatmul_uses_sgemm(ctypes.byref(w), rows)
        x = rng.normal(size=(rows, n_in)).astype(np.float32)
        bound = (n_in + 16) * U * (np.abs(x.astype(np.float64)) @ np.abs(w64).T)
        for threads in (1, 2):
            st, got = qmatmul(w, x, threads=threads)
            assert st == OK, last_error()
            assert np.all(np.abs(got - x.astype(np.float64) @ w64.T) <= bound)
            init = rng.normal(size=got.shape).astype(np.float32)
            st, acc = qmatmul(w, x, out=init.copy(), accumulate=1, threads=threads)
            assert st == OK and np.all(
                np.abs(acc - init - x.astype(np.float64) @ w64.T) <= bound + 4 * U * np.abs(init)
            )


def f32_rows(w: np.ndarray, x: np.ndarray, out: np.ndarray | None = None, accumulate=0, threads=1) -> np.ndarray:
    """One activation row by F32 weights w [n_out, n_in] through cepe_qmatmul."""
    st, got = qmatmul(
        qtensor("F32", w.view(np.uint8), w.shape[1]), x[None, :], out=out, accumulate=accumulate, threads=threads
    )
    assert st == OK, last_error()
    return got[0]


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_NAMES[i])
def test_f32_one_row_within_bound(isa):
    """F32 weights by one activation row (decode: the F32 dot kernel, not the BLAS) on each
    instruction set: against the float64 product, |y - w·x| <= (n + 16) u Σ|w_i x_i| (n
    products, any summation order), at lengths that leave every tail of the 8-, 16- and
    64-wide loops, on one thread or two (each output is one kernel's dot, so equal either
    way), and with accumulate."""
    use_isa(isa)
    rng = np.random.default_rng(11)
    for n_in in (1, 5, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 576, 1537):
        n_out = 300 if n_in < 600 else 37  # 300: thread shares of 160 and 140 rows
        w = rng.normal(size=(n_out, n_in)).astype(np.float32)
        x = rng.normal(size=n_in).astype(np.float32)
        w64, x64 = w.astype(np.float64), x.astype(np.float64)
        want, bound = w64 @ x64, (n_in + 16) * U * (np.abs(w64) @ np.abs(x64))
        assert not LIB.cepe_qmatmul_uses_sgemm(ctypes.byref(qtensor("F32", w.view(np.uint8), n_in)), 1)
        got = f32_rows(w, x)
        assert np.all(np.abs(got - want) <= bound), n_in
        assert np.array_equal(f32_rows(w, x, threads=2), got), n_in
        init = rng.normal(size=(1, n_out)).astype(np.float32)
        for threads in (1, 2):
            acc = f32_rows(w, x, out=init.copy(), accumulate=1, threads=threads)
            assert np.array_equal(acc, init[0] + got), (n_in, threads)  # the same dot, then one addition
    # a non-finite activation reaches every product; zero rows give exact zeros
    w = rng.normal(size=(4, 100)).astype(np.float32)
    x = np.ones(100, np.float32)
    x[97] = np.inf
    assert not np.isfinite(f32_rows(w, x)).any()
    assert np.array_equal(
        f32_rows(np.zeros((3, 100), np.float32), rng.normal(size=100).astype(np.float32)), np.zeros(3)
    )


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_NAMES[i])
@pytest.mark.parametrize("name", ["F16", "Q4_0", "Q8_0"])
def test_qmatmul_kernel_wide_output_equals_vec_dot(name, isa):
    """A wide output with a short last slice (as the LM head's): every output on one thread
    or two equals vec_dot of its row."""
    use_isa(isa)
    rng = np.random.default_rng(13)
    n_out, n_in = 64 * 9 + 21, 576
    raw = random_rows(name, n_out, n_in, rng)
    w = qtensor(name, raw, n_in)
    x = rng.normal(size=(1, n_in)).astype(np.float32)
    act, *_ = quantize(name, x[0])
    want = np.array([vec_dot(name, raw[o], act, n_in) for o in range(n_out)], np.float32)
    for threads in (1, 2):
        st, got = qmatmul(w, x, threads=threads)
        assert st == OK and np.array_equal(got[0], want), threads


@pytest.mark.parametrize("name", ["Q4_1", "Q6_K", "BF16"])
def test_qmatmul_either_way_at_any_row_count(name, tmp_path):
    """The crossover moved both ways: many rows through the kernels (equal to vec_dot
    row by row), two rows through the tiles + sgemm (fp32 bound)."""
    rng = np.random.default_rng(7)
    n_in = 768
    raw = random_rows(name, 96, n_in, rng)
    w = qtensor(name, raw, n_in)
    w64 = reference_dequantize(name, raw, tmp_path).astype(np.float64)
    prev = LIB.cepe_qmatmul_sgemm_rows(1000)
    prev_gemm = LIB.cepe_qmatmul_gemm_rows(OFF)  # Q4_1 on AVX-512 takes the int8 GEMM (tested below)
    try:
        x = rng.normal(size=(40, n_in)).astype(np.float32)
        assert not LIB.cepe_qmatmul_uses_sgemm(ctypes.byref(w), 40)
        st, got = qmatmul(w, x, threads=2)
        assert st == OK
        for r in (0, 17, 39):
            act, *_ = quantize(name, x[r])
            assert np.array_equal(got[r], np.float32([vec_dot(name, raw[o], act, n_in) for o in range(96)]))
        assert LIB.cepe_qmatmul_sgemm_rows(1) == 1000
        if LIB.cepe_qmatmul_uses_bf16_gemm(ctypes.byref(w), 2):
            use_isa(1)  # BF16's tiles + sgemm (the AVX-512 path takes the bf16 GEMM)
        assert LIB.cepe_qmatmul_uses_sgemm(ctypes.byref(w), 2)
        st, got = qmatmul(w, x[:2], threads=2)
        bound = (n_in + 16) * U * (np.abs(x[:2].astype(np.float64)) @ np.abs(w64).T)
        assert st == OK and np.all(np.abs(got - x[:2].astype(np.float64) @ w64.T) <= bound)
    finally:
        LIB.cepe_qmatmul_sgemm_rows(prev)
        LIB.cepe_qmatmul_gemm_rows(prev_gemm)
    assert LIB.cepe_qmatmul_sgemm_rows(-1) == prev  # < 0 only reads it


def test_qmatmul_crossover_per_format():
    """Each format's measured crossover (csrc/quant/qmatmul.c): the cheaper a format is to
    widen to fp32, the fewer rows it takes for dequantized tiles + sgemm to win."""
    assert LIB.cepe_qmatmul_sgemm_rows(-1) == 0
    raw = np.zeros((16, 4 * 210), np.uint8)
    with gemm_off():  # where the int8 GEMM is not: the AVX2 and C paths
        for name, rows in (("Q8_0", 8), ("F16", 8), ("Q4_1", 16), ("Q5_K", 32), ("Q6_K", 64)):
            w = qtensor(name, raw, 1024)
            assert not LIB.cepe_qmatmul_uses_sgemm(ctypes.byref(w), rows - 1), name
            assert LIB.cepe_qmatmul_uses_sgemm(ctypes.byref(w), rows), name
    f32 = qtensor("F32", raw, 16)  # one row: the F32 dot kernel; two or more: the BLAS sgemm
    assert not LIB.cepe_qmatmul_uses_sgemm(ctypes.byref(f32), 1)
    assert LIB.cepe_qmatmul_uses_sgemm(ctypes.byref(f32), 2)


# ------------------------------------------------------------------ int8 GEMM (AVX-512 VNNI)

needs_avx512 = pytest.mark.skipif(ISAS[-1] < 2, reason="the int8 GEMM needs AVX-512 VNNI")
GEMM_MR = 8  # activation rows per pass of its microkernel (csrc/quant/gemm_blocks32_avx512.c)
GEMM_FORMATS = ("Q4_0", "Q4_1", "Q8_0")
GEMM_MIN_ROWS = {"Q4_0": 2, "Q4_1": 2, "Q8_0": 4}  # its measured crossovers (csrc/quant/qmatmul.c)


def gemm_case(name: str, raw: np.ndarray, x: np.ndarray, tmp_path, what: str) -> None:
    """Stored rows by activation rows x through the int8 GEMM, against
      - the quantized kernels (the same int8 activations and per-block terms, added in another
        order): each is within the docstring's tight bound (m + 16) u S of the exact
        sum_i w~_i x^_i, so they differ by at most twice that;
      - that exact sum itself, within the tight bound, and sum_i w~_i x_i within the end-to-end
        bound;
    on one thread and two (each output is one lane's sum, so identical) and with accumulate (the
    same sum, then one addition)."""
    n_out, n_in = raw.shape[0], x.shape[1]
    what = f"{name} {what}"
    w = qtensor(name, raw, n_in)
    w64 = reference_dequantize(name, raw, tmp_path).astype(np.float64)
    b = minimum_terms(name, raw, n_in)
    rows = x.shape[0]
    assert LIB.cepe_qmatmul_path(ctypes.byref(w), rows) == INT8_GEMM, what
    st, got = qmatmul(w, x, threads=1)
    assert st == OK, last_error()
    with gemm_off():
        prev = LIB.cepe_qmatmul_sgemm_rows(OFF)
        try:
            assert LIB.cepe_qmatmul_path(ctypes.byref(w), rows) == KERNELS
            st, kern = qmatmul(w, x, threads=2)
            assert st == OK, last_error()
        finally:
            LIB.cepe_qmatmul_sgemm_rows(prev)
    m = float_terms("q8_32", name, n_in)
    for r in range(rows):
        _, xh, _, x_err = quantize(name, x[r])
        tight = (m + 16) * (U * ((np.abs(w64) + 2 * b) @ np.abs(xh)) + 2.0**-121)
        err = np.abs(got[r] - w64 @ xh)
        assert np.all(err <= tight), f"{what} row {r}: {err.max()} beyond the tight bound"
        assert np.all(np.abs(got[r] - kern[r]) <= 2 * tight), f"{what} row {r}: GEMM and kernels apart"
        loose = tight + np.abs(w64) @ x_err
        assert np.all(np.abs(got[r] - w64 @ x[r].astype(np.float64)) <= loose), f"{what} row {r}: end to end"
    st, got2 = qmatmul(w, x, threads=2)
    assert st == OK and np.array_equal(got2, got), f"{what}: 1 and 2 threads differ"
    init = np.random.default_rng(n_out).normal(size=got.shape).astype(np.float32)
    for threads in (1, 2):
        st, acc = qmatmul(w, x, out=init.copy(), accumulate=1, threads=threads)
        assert st == OK and np.array_equal(acc, init + got), f"{what}: accumulate, {threads} threads"
    st, own = qmatmul(w, x, threads=2, work=False)  # scratch of its own
    assert st == OK and np.array_equal(own, got)


@needs_avx512
@pytest.mark.parametrize("name", GEMM_FORMATS)
@pytest.mark.parametrize("n_in", [32, 576, 1536])
def test_int8_gemm_within_bounds(name, n_in, tmp_path):
    """Odd shapes: fewer output rows than a panel (5), a panel of 16, one row more (a masked
    panel), 40 (two and a half panels; with 2 threads a share of 32 and one of 8), 576;
    activation rows one short of the microkernel's pass, a pass, one more, 64 and 100 (every
    tail count)."""
    rng = np.random.default_rng(n_in)
    for n_out in (5, 16, 17, 40, 576):
        raw = random_rows(name, n_out, n_in, rng)
        for rows in (GEMM_MR - 1, GEMM_MR, GEMM_MR + 1, 64, 100):
            if n_out == 576 and rows not in (GEMM_MR + 1, 100):
                continue  # the largest weights at two row counts keep the test short
            x = rng.normal(size=(rows, n_in)) * np.where(rng.random((rows, 1)) < 0.3, 30.0, 1.0)
            gemm_case(name, raw, x.astype(np.float32), tmp_path, f"{n_out}x{n_in}, {rows} rows")


@needs_avx512
@pytest.mark.parametrize("name", GEMM_FORMATS)
def test_int8_gemm_extremes_tiny_and_nonfinite(name, tmp_path):
    """Codes and scales at their extremes (int32 sums at their largest), subnormal activation
    scales and blocks below them, and a non-finite activation reaching every output of its row
    and no other."""
    n_in = 96
    raw = extreme_rows(name, 20, n_in)
    signs = np.where(np.arange(n_in) % 3, 1.0, -1.0)
    x = np.stack([100 * np.ones(n_in), -100 * np.ones(n_in), 100 * signs] * 3).astype(np.float32)
    gemm_case(name, raw, x, tmp_path, "extremes")
    rng = np.random.default_rng(9)
    raw = random_rows(name, 33, n_in, rng)
    tiny = rng.normal(0, 1, (10, n_in)) * np.where(np.arange(n_in) // 32 % 2, 2.0**-124, 2.0**-130)
    gemm_case(name, raw, tiny.astype(np.float32), tmp_path, "tiny")
    x = rng.normal(size=(10, n_in)).astype(np.float32)
    x[3, 50] = np.inf
    x[7, 2] = np.nan
    st, got = qmatmul(qtensor(name, raw, n_in), x, threads=2)
    assert st == OK
    bad = np.zeros(10, bool)
    bad[[3, 7]] = True
    assert not np.isfinite(got[bad]).any() and np.isfinite(got[~bad]).all()


@needs_avx512
def test_int8_gemm_in_chunks_of_rows(tmp_path):
    """More activation rows than the GEMM quantizes at once (512): its scratch stops growing
    there, and the rows of every chunk (two full ones and a short one) come out alike."""
    rng = np.random.default_rng(12)
    raw = random_rows("Q4_0", 40, 64, rng)
    w = ctypes.byref(qtensor("Q4_0", raw, 64))
    size = [LIB.cepe_qmatmul_work_size(w, rows, 2) for rows in (511, 512, 1100, 1 << 20)]
    assert size[0] < size[1] == size[2] == size[3]
    gemm_case("Q4_0", raw, rng.normal(size=(1100, 64)).astype(np.float32), tmp_path, "1100 rows")


def test_int8_gemm_where_it_runs():
    """Q4_0, Q4_1 and Q8_0 from their crossovers on AVX-512 (one row stays with the decode
    kernel); never for the other formats (BF16 takes the bf16 GEMM where the CPU has
    AVX512-BF16), nor on the AVX2 and C paths (CEPE_ISA=avx2 / c),
    which keep their ways; cepe_qmatmul_gemm_rows moves the crossover and reads it back."""
    raw = np.zeros((32, 34 * 8), np.uint8)
    for isa in ISAS:
        use_isa(isa)
        for name in (*GEMM_FORMATS, "F16", "BF16", "Q4_K", "Q6_K"):
            w = ctypes.byref(qtensor(name, raw, 256))
            gemm = isa == 2 and name in GEMM_FORMATS
            assert LIB.cepe_qmatmul_path(w, 1) == KERNELS, name
            if gemm:
                assert LIB.cepe_qmatmul_path(w, GEMM_MIN_ROWS[name] - 1) == KERNELS, name
                assert LIB.cepe_qmatmul_path(w, GEMM_MIN_ROWS[name]) == INT8_GEMM, name
            bf16_gemm = name == "BF16" and bool(LIB.cepe_qmatmul_backward_uses_bf16_gemm(w))
            assert not bf16_gemm or isa == 2  # the bf16 GEMM: AVX-512 with AVX512-BF16 only
            want = INT8_GEMM if gemm else BF16_GEMM if bf16_gemm else SGEMM
            assert LIB.cepe_qmatmul_path(w, 512) == want, name
            assert LIB.cepe_qmatmul_uses_sgemm(w, 512) == (want == SGEMM), name
            assert LIB.cepe_qmatmul_uses_bf16_gemm(w, 512) == bf16_gemm, name
    use_isa(ISAS[-1])
    q4 = ctypes.byref(qtensor("Q4_0", raw, 256))
    assert LIB.cepe_qmatmul_gemm_rows(-1) == 0
    assert LIB.cepe_qmatmul_gemm_rows(50) == 0
    try:
        if ISAS[-1] == 2:
            assert LIB.cepe_qmatmul_path(q4, 49) == SGEMM
            assert LIB.cepe_qmatmul_path(q4, 50) == INT8_GEMM
    finally:
        assert LIB.cepe_qmatmul_gemm_rows(0) == 50
    code = (
        "import ctypes, cepe_c\n"
        "from cepe.testing.quant_ctypes import load_library, QTensor\n"
        "import numpy as np\n"
        "raw = np.zeros((32, 72), np.uint8)\n"
        "w = QTensor(2, 32, 128, raw.ctypes.data, 72)\n"
        "print(load_library().cepe_qmatmul_path(ctypes.byref(w), 512))"
    )
    for value, want in (("avx2", SGEMM), ("c", SGEMM), ("avx512", INT8_GEMM if ISAS[-1] == 2 else SGEMM)):
        env = {**os.environ, "CEPE_ISA": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert int(out.stdout) == want, value


def test_qmatmul_row_stride_and_views(tmp_path):
    """Rows further apart than their bytes (a view into a wider buffer) and zero rows."""
    rng = np.random.default_rng(4)
    raw = random_rows("Q4_1", 64, 96, rng)
    wide = np.zeros((64, raw.shape[1] + 6), np.uint8)
    wide[:, : raw.shape[1]] = raw
    x = rng.normal(size=(2, 96)).astype(np.float32)
    st, want = qmatmul(qtensor("Q4_1", raw, 96), x)
    st2, got = qmatmul(qtensor("Q4_1", wide, 96, stride=wide.strides[0]), x)
    assert st == st2 == OK and np.array_equal(got, want)
    st, out = qmatmul(qtensor("Q4_1", raw, 96), np.zeros((0, 96), np.float32))
    assert st == OK


# ------------------------------------------------------------------ refusals


def test_refusals_name_the_fault():
    rng = np.random.default_rng(5)
    raw = random_rows("Q8_0", 4, 64, rng)
    x = np.ones((1, 64), np.float32)
    out = np.zeros(4, np.float32)
    act = np.zeros(4096, np.uint8)

    def refused(status, code, *words):
        assert status == code, (status, last_error())
        msg = last_error()
        assert all(w in msg for w in words), msg

    # n_in not a multiple of the block, everywhere
    bad = QTensor(8, 4, 48, ptr(raw), raw.strides[0])
    refused(qmatmul(bad, np.ones((1, 48), np.float32))[0], INVALID_ARG, "48", "Q8_0", "multiple", "32")
    refused(LIB.cepe_vec_dot(8, 33, ptr(raw), ptr(act), ptr(out)), INVALID_ARG, "33", "multiple")
    refused(LIB.cepe_quantize_activations(12, ptr(x), ptr(act), 100), INVALID_ARG, "100", "Q4_K")
    refused(LIB.cepe_dequantize_row(14, ptr(raw), ptr(act), 100), INVALID_ARG, "100", "Q6_K")
    assert LIB.cepe_act_row_bytes(8, 33) == 0
    # unknown type, shape, stride, alignment, pointers
    refused(qmatmul(QTensor(6, 4, 64, ptr(raw), 64), x)[0], INVALID_ARG, "type")
    refused(qmatmul(QTensor(8, 0, 64, ptr(raw), 68), x)[0], INVALID_ARG, "shape")
    refused(qmatmul(QTensor(8, 4, 64, ptr(raw), 60), x)[0], INVALID_ARG, "stride")
    refused(qmatmul(QTensor(8, 4, 64, ptr(raw) + 1, 68), x)[0], INVALID_ARG, "aligned")
    refused(qmatmul(QTensor(8, 4, 64, None, 68), x)[0], INVALID_ARG, "NULL")
    refused(
        LIB.cepe_qmatmul(ptr(out), ptr(x), ctypes.byref(QTensor(8, 4, 64, ptr(raw), 68)), -1, 0, None, 0, 1),
        INVALID_ARG,
        "rows",
    )
    wf = np.zeros((4, 66), np.float32)
    refused(qmatmul(QTensor(0, 4, 64, ptr(wf), wf.strides[0]), x)[0], UNSUPPORTED, "F32", "stride")
    # scratch too small
    w = QTensor(8, 4, 64, ptr(raw), 68)
    refused(LIB.cepe_qmatmul(ptr(out), ptr(x), ctypes.byref(w), 1, 0, ptr(act), 8, 1), INVALID_ARG, "scratch")
    # instruction sets
    refused(LIB.cepe_quant_set_isa(7), INVALID_ARG, "7")
    if ISAS[-1] < 2:
        refused(LIB.cepe_quant_set_isa(2), UNSUPPORTED, "avx512")


@pytest.mark.parametrize("value", ["c", "avx2", "avx512", "nonsense", ""])
def test_isa_environment_variable(value):
    code = "import ctypes, cepe_c; print(ctypes.CDLL(cepe_c.__file__).cepe_quant_isa())"
    env = {**os.environ, "CEPE_ISA": value}
    got = int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    want = {"c": 0, "avx2": 1, "avx512": 2}.get(value, ISAS[-1])
    assert got == min(want, ISAS[-1])


# ------------------------------------------------------------------ a real model file

SMOLLM2 = os.path.expanduser("~/.cache/cepe/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.skipif(not os.path.exists(SMOLLM2), reason="the pulled SmolLM2-135M GGUF (cepe pull smollm2-135m)")
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_NAMES[i])
def test_smollm2_weights(isa, tmp_path):
    """The shipped model's own Q4_1 and Q8_0 tensors: dequantized bit-exactly, and their
    products within the bounds for activations of a real model's scale."""
    use_isa(isa)
    gf = GGUFFile(SMOLLM2)
    try:
        rng = np.random.default_rng(6)
        tensors = (("blk.0.attn_q.weight", "Q4_1"), ("blk.3.ffn_down.weight", "Q4_1"), ("token_embd.weight", "Q8_0"))
        for tensor, name in tensors:
            info = gf.tensors[tensor]
            assert info.type_name == name
            raw = np.ascontiguousarray(gf.raw(tensor)[:256])
            n_in = info.shape[-1]
            ref = gf.get(tensor)[:256]
            assert np.array_equal(dequantize(name, raw, n_in).view(np.uint32), ref.view(np.uint32)), tensor
            x = (rng.normal(size=n_in) * rng.uniform(0.1, 3, n_in)).astype(np.float32)
            check_products(name, raw[:32], x, tmp_path, f"{tensor}/{ISA_NAMES[isa]}")
            st, out = qmatmul(qtensor(name, raw, n_in), x[None, :], threads=2)
            act, xh, *_ = quantize(name, x)
            want = [vec_dot(name, raw[o], act, n_in) for o in range(256)]
            assert st == OK and np.array_equal(out[0], np.float32(want))
    finally:
        gf.close()
