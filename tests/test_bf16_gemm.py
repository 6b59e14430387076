"""The bf16 GEMM (csrc/quant/gemm_bf16_avx512.c): BF16 weights by many activation rows on CPUs
with AVX512-BF16, forward (cepe_qmatmul, out = x · Wᵀ) and input gradient
(cepe_qmatmul_backward_input, dx = dout · W), through ctypes.

Oracles: float64 products of the bf16 weights and the activations rounded to bf16 by torch
(round to nearest even), and torch's own bf16 matmul.

Error bound (u = 2^-24). Both operands are bf16 (8-bit significands), so each product is exact
in fp32; vdpbf16ps adds them into an fp32 lane one at a time, each addition rounded. A sum of
n exact terms in any order is within (n - 1) u / (1 - n u) Σ|t| of the exact sum, and writing
(or adding to `init` with accumulate) rounds once more, so
    |out - Σ w x^| <= (n + 16) u Σ |w x^|  (+ u |init| with accumulate),
n the reduction length (n_in forward, n_out backward), x^ the bf16-rounded activations.
vdpbf16ps also treats subnormal inputs and results as zero: at most 2^-126 per step and
2^-126 |w| per flushed activation, which 2^-125 Σ|w| + (n + 16) 2^-126 covers (the test's
activations and weights are normal numbers, so these terms are only there for honesty).
Against torch's bf16 matmul: torch rounds its fp32 sum to bf16 (2^-8 relative), so
    |out - torch| <= 2^-8 |Σ w x^| + 2 ((n + 16) u Σ|w x^|) + the subnormal terms."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cepe.testing.quant_ctypes import QTensor, load_library  # noqa: E402

U = 2.0**-24
OK = 0
BF16 = 30
AVX2 = 1
LIB = load_library()
MR = 8  # the kernel's rows (BF16_MR in gemm_bf16_avx512.c): blocks of rows and their tails


def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def last_error() -> str:
    return LIB.cepe_last_error().decode()


def probe(n_out: int = 16, n_in: int = 16) -> QTensor:
    raw = np.zeros((n_out, 2 * n_in), np.uint8)
    probe.keep = raw  # type: ignore[attr-defined]
    return QTensor(BF16, n_out, n_in, ptr(raw), raw.strides[0])


HAS_GEMM = bool(LIB.cepe_qmatmul_backward_uses_bf16_gemm(ctypes.byref(probe())))
needs_gemm = pytest.mark.skipif(not HAS_GEMM, reason="the CPU has no AVX512-BF16 (the fp32 path runs)")


@pytest.fixture(autouse=True)
def _best_isa() -> Iterator[None]:
    yield
    assert LIB.cepe_quant_set_isa(LIB.cepe_quant_isa_best()) == OK


def bf16_weights(n_out: int, n_in: int, rng: np.random.Generator, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(stored bf16 rows [n_out, n_in + pad] as uint16, the values as float64 [n_out, n_in]);
    `pad` extra values per row make the row stride larger than the row."""
    w = torch.from_numpy(rng.normal(0, 0.5, (n_out, n_in + pad)).astype(np.float32)).to(torch.bfloat16)
    raw = w.view(torch.int16).numpy().view(np.uint16).copy()
    return raw, w[:, :n_in].double().numpy()


def qtensor(raw: np.ndarray, n_in: int) -> QTensor:
    return QTensor(BF16, raw.shape[0], n_in, ptr(raw), raw.strides[0])


def rounded(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16 by torch (nearest even), as float64."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).double().numpy()


def forward(w: QTensor, x: np.ndarray, init: np.ndarray | None, threads: int) -> np.ndarray:
    rows = x.shape[0]
    out = np.zeros((rows, w.n_out), np.float32) if init is None else init.copy()
    size = LIB.cepe_qmatmul_work_size(ctypes.byref(w), rows, threads)
    work = np.zeros(max(size, 1), np.uint8)
    st = LIB.cepe_qmatmul(ptr(out), ptr(x), ctypes.byref(w), rows, int(init is not None), ptr(work), size, threads)
    assert st == OK, last_error()
    return out


def backward(w: QTensor, dout: np.ndarray, init: np.ndarray | None, threads: int) -> np.ndarray:
    rows = dout.shape[0]
    dx = np.zeros((rows, w.n_in), np.float32) if init is None else init.copy()
    st = LIB.cepe_qmatmul_backward_input(ptr(dx), ptr(dout), ctypes.byref(w), rows, int(init is not None), threads)
    assert st == OK, last_error()
    return dx


def check(got: np.ndarray, a: np.ndarray, b64: np.ndarray, init: np.ndarray | None, what: str) -> None:
    """got (=|+=) a · b64 with a rounded to bf16 (the docstring's bounds); b64 [k, n] float64."""
    ah = rounded(a)
    k = a.shape[1]
    want = ah @ b64
    mag = np.abs(ah) @ np.abs(b64)
    tiny = 2.0**-125 * np.abs(b64).sum(axis=0) + (k + 16) * 2.0**-126
    bound = (k + 16) * U * mag + tiny
    base = np.zeros_like(want) if init is None else init.astype(np.float64)
    slack = 0 if init is None else U * (np.abs(base) + np.abs(want)) + U * np.abs(base)
    err = np.abs(got - base - want)
    assert np.all(err <= bound + slack), f"{what}: {err.max()} beyond the fp32 accumulation bound"
    if init is None:  # torch's bf16 matmul, its output rounded to bf16
        ref = (torch.from_numpy(a).to(torch.bfloat16) @ torch.from_numpy(b64).to(torch.bfloat16)).double().numpy()
        assert np.all(np.abs(got - ref) <= 2.0**-8 * np.abs(want) + 2 * bound), f"{what}: against torch"


@needs_gemm
@pytest.mark.parametrize("pad", [0, 3], ids=["dense", "strided"])
@pytest.mark.parametrize("n_in", [2, 33, 576, 1536])
def test_forward_and_backward_within_bound(n_in: int, pad: int) -> None:
    """Every shape the kernel's tails meet: output panels of 32 columns (1, 15, 16, 17, 40,
    576 columns), odd and even reductions, row blocks of MR and their remainders; one thread
    or two, overwriting or accumulating, dense rows or a row stride past the row."""
    rng = np.random.default_rng(n_in + pad)
    for n_out in (1, 15, 16, 17, 40, 576):
        raw, w64 = bf16_weights(n_out, n_in, rng, pad)
        w = qtensor(raw, n_in)
        assert LIB.cepe_qmatmul_backward_uses_bf16_gemm(ctypes.byref(w))
        for rows in (MR - 1, MR, MR + 1, 64, 100):
            assert LIB.cepe_qmatmul_uses_bf16_gemm(ctypes.byref(w), rows)
            assert not LIB.cepe_qmatmul_uses_sgemm(ctypes.byref(w), rows)
            x = rng.normal(size=(rows, n_in)).astype(np.float32)
            dout = rng.normal(size=(rows, n_out)).astype(np.float32)
            for threads in (1, 2):
                for acc in (False, True):
                    what = f"{rows}x{n_in} by {n_out}, {threads} threads, accumulate {acc}"
                    init = rng.normal(size=(rows, n_out)).astype(np.float32) if acc else None
                    check(forward(w, x, init, threads), x, w64.T, init, "forward " + what)
                    init = rng.normal(size=(rows, n_in)).astype(np.float32) if acc else None
                    check(backward(w, dout, init, threads), dout, w64, init, "backward " + what)


@needs_gemm
def test_rows_past_a_chunk() -> None:
    """Rows go CHUNK_ROWS (512) at a time through a scratch that stops growing there (the model
    sizes it once for any row count): 1100 rows, overwriting and accumulating, both products."""
    rng = np.random.default_rng(4)
    raw, w64 = bf16_weights(40, 33, rng)
    w = qtensor(raw, 33)
    assert LIB.cepe_qmatmul_work_size(ctypes.byref(w), 1 << 20, 2) == LIB.cepe_qmatmul_work_size(
        ctypes.byref(w), 512, 2
    )
    x = rng.normal(size=(1100, 33)).astype(np.float32)
    dout = rng.normal(size=(1100, 40)).astype(np.float32)
    for threads in (1, 2):
        check(forward(w, x, None, threads), x, w64.T, None, f"forward, {threads} threads")
        init = rng.normal(size=(1100, 40)).astype(np.float32)
        check(forward(w, x, init, threads), x, w64.T, init, f"forward accumulate, {threads} threads")
        check(backward(w, dout, None, threads), dout, w64, None, f"backward, {threads} threads")
        init = rng.normal(size=(1100, 33)).astype(np.float32)
        check(backward(w, dout, init, threads), dout, w64, init, f"backward accumulate, {threads} threads")


@needs_gemm
def test_threads_give_the_same_result() -> None:
    """Each output is one lane's sum over the whole reduction, whichever thread computes it."""
    rng = np.random.default_rng(1)
    raw, _ = bf16_weights(200, 300, rng)
    w = qtensor(raw, 300)
    x = rng.normal(size=(37, 300)).astype(np.float32)
    assert np.array_equal(forward(w, x, None, 1), forward(w, x, None, 2))
    d = rng.normal(size=(37, 200)).astype(np.float32)
    assert np.array_equal(backward(w, d, None, 1), backward(w, d, None, 2))


@needs_gemm
def test_crossover_and_override() -> None:
    """From BF16_GEMM_MIN_ROWS rows the GEMM; below it the bf16 dot kernels; the sgemm_rows
    override moves the crossover of this path too (and restores it)."""
    w = probe()
    assert not LIB.cepe_qmatmul_uses_bf16_gemm(ctypes.byref(w), 1)
    assert LIB.cepe_qmatmul_uses_bf16_gemm(ctypes.byref(w), 6)
    assert not LIB.cepe_qmatmul_uses_bf16_gemm(ctypes.byref(w), 5)
    prev = LIB.cepe_qmatmul_sgemm_rows(1 << 30)
    try:
        assert not LIB.cepe_qmatmul_uses_bf16_gemm(ctypes.byref(w), 512)
        LIB.cepe_qmatmul_sgemm_rows(2)
        assert LIB.cepe_qmatmul_uses_bf16_gemm(ctypes.byref(w), 2)
    finally:
        LIB.cepe_qmatmul_sgemm_rows(prev)
    f16 = QTensor(1, 16, 16, w.data, w.row_stride)  # other formats never take it
    assert not LIB.cepe_qmatmul_uses_bf16_gemm(ctypes.byref(f16), 512)
    assert not LIB.cepe_qmatmul_backward_uses_bf16_gemm(ctypes.byref(f16))


@needs_gemm
def test_nonfinite_activations_give_nonfinite_outputs() -> None:
    """An inf or NaN activation makes every output of its row non-finite, and only its row's."""
    rng = np.random.default_rng(2)
    raw, _ = bf16_weights(40, 33, rng)
    w = qtensor(raw, 33)
    for bad in (np.inf, -np.inf, np.nan):
        x = rng.normal(size=(MR + 1, 33)).astype(np.float32)
        x[3, 7] = bad
        out = forward(w, x, None, 2)
        assert not np.isfinite(out[3]).any() and np.isfinite(np.delete(out, 3, axis=0)).all(), bad
        d = rng.normal(size=(MR + 1, 40)).astype(np.float32)
        d[MR, 39] = bad
        dx = backward(w, d, None, 2)
        assert not np.isfinite(dx[MR]).any() and np.isfinite(dx[:MR]).all(), bad


def test_avx2_keeps_the_fp32_path() -> None:
    """The AVX2 path (CEPE_ISA=avx2, or a CPU without AVX512-BF16) widens the weights and
    multiplies unrounded fp32 activations: the fp32 bound, (n + 16) u Σ|w x|, which rounding
    the activations to bf16 would exceed."""
    if LIB.cepe_quant_isa_best() < AVX2:
        pytest.skip("no AVX2 path on this CPU")
    assert LIB.cepe_quant_set_isa(AVX2) == OK
    rng = np.random.default_rng(3)
    raw, w64 = bf16_weights(48, 576, rng)
    w = qtensor(raw, 576)
    assert not LIB.cepe_qmatmul_uses_bf16_gemm(ctypes.byref(w), 64)
    assert not LIB.cepe_qmatmul_backward_uses_bf16_gemm(ctypes.byref(w))
    assert LIB.cepe_qmatmul_uses_sgemm(ctypes.byref(w), 64)
    x = rng.normal(size=(64, 576)).astype(np.float32)
    x64 = x.astype(np.float64)
    err = np.abs(forward(w, x, None, 2) - x64 @ w64.T)
    assert np.all(err <= (576 + 16) * U * (np.abs(x64) @ np.abs(w64).T))
    d = rng.normal(size=(64, 48)).astype(np.float32)
    err = np.abs(backward(w, d, None, 2) - d.astype(np.float64) @ w64)
    assert np.all(err <= (48 + 16) * U * (np.abs(d.astype(np.float64)) @ np.abs(w64)))


@needs_gemm
def test_isa_environment_variable_turns_it_off() -> None:
    code = (
        "import ctypes; from cepe.testing.quant_ctypes import QTensor, load_library;"
        "import numpy as np; raw = np.zeros((16, 32), np.uint8); L = load_library();"
        "w = QTensor(30, 16, 16, raw.ctypes.data, 32);"
        "print(L.cepe_qmatmul_uses_bf16_gemm(ctypes.byref(w), 512),"
        " L.cepe_qmatmul_backward_uses_bf16_gemm(ctypes.byref(w)))"
    )
    for isa, want in (("avx2", "0 0"), ("avx512", "1 1")):
        env = {**os.environ, "CEPE_ISA": isa}
        got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert got.stdout.split() == want.split(), isa
