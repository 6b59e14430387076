"""The C core's quantized-row entry points (csrc/quant/, exported by cepe_c) through ctypes,
for tests and benchmarks that call them one by one: the formats' block layouts as GGUF defines
them, the core's weight descriptor and the library with its signatures."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

import cepe_c

# name -> (GGML type id, values per block, bytes per block)
TYPES: dict[str, tuple[int, int, int]] = {
    "F16": (1, 1, 2),
    "BF16": (30, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
}
# byte offsets of each format's fp16 scale fields (d, then m / dmin)
SCALES: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q8_0": (0,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
# cepe_quant_set_isa's numbering
ISA_NAMES = ("c", "avx2", "avx512")


class QTensor(ctypes.Structure):
    """cepe_qtensor (csrc/quant/quant.h): stored rows the core multiplies as they are."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("n_out", ctypes.c_int),
        ("n_in", ctypes.c_int),
        ("data", ctypes.c_void_p),
        ("row_stride", ctypes.c_size_t),
    ]


def load_library() -> ctypes.CDLL:
    """cepe_c's shared object with the quantized entry points (and the fp32 matmul_forward they
    are measured against) typed."""
    lib = ctypes.CDLL(cepe_c.__file__)
    P, Int, I64, Z = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t
    Q = ctypes.POINTER(QTensor)
    sigs = {
        "cepe_qtype_block_size": (Int, [Int]),
        "cepe_qtype_row_bytes": (Z, [Int, I64]),
        "cepe_dequantize_row": (Int, [Int, P, P, I64]),
        "cepe_quant_isa": (Int, []),
        "cepe_quant_isa_best": (Int, []),
        "cepe_quant_set_isa": (Int, [Int]),
        "cepe_act_row_bytes": (Z, [Int, I64]),
        "cepe_quantize_activations": (Int, [Int, P, P, I64]),
        "cepe_vec_dot": (Int, [Int, I64, P, P, P]),
        "cepe_qmatmul_work_size": (Z, [Q, Int, Int]),
        "cepe_qmatmul_uses_sgemm": (Int, [Q, Int]),
        "cepe_qmatmul_sgemm_rows": (Int, [Int]),
        "cepe_qmatmul_uses_bf16_gemm": (Int, [Q, Int]),
        "cepe_qmatmul_backward_uses_bf16_gemm": (Int, [Q]),
        "cepe_qmatmul_backward_input": (Int, [P, P, Q, Int, Int, Int]),
        "cepe_qmatmul_path": (Int, [Q, Int]),
        "cepe_qmatmul_gemm_rows": (Int, [Int]),
        "cepe_qmatmul": (Int, [P, P, Q, Int, Int, P, Z, Int]),
        "matmul_forward": (Int, [P, P, P, Int, Int, Int, Int, Int]),
        "cepe_last_error": (ctypes.c_char_p, []),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


@contextmanager
def fp32_bf16_products() -> Iterator[None]:
    """BF16 weights multiplied as fp32 inside the block (widened, fp32 activations): the AVX2
    path, as CEPE_ISA=avx2 chooses it. The AVX-512 path of a CPU with AVX512-BF16 rounds the
    activations to bf16 (bf16 dot kernels, bf16 GEMM); a test about checkpoints compares a bf16
    model with its exact fp32 twin on this one."""
    lib = load_library()
    prev = lib.cepe_quant_isa()
    if prev > 1 and lib.cepe_quant_set_isa(1) != 0:
        raise RuntimeError(lib.cepe_last_error().decode())
    try:
        yield
    finally:
        lib.cepe_quant_set_isa(prev)


def random_rows(
    name: str,
    n_out: int,
    n_in: int,
    rng: np.random.Generator,
    std: float,
    scales: Callable[[tuple[int, int]], np.ndarray],
) -> np.ndarray:
    """n_out stored rows of n_in values in format name (uint8 [n_out, row bytes]): F16/BF16
    values N(0, std^2); block formats random codes with each fp16 scale field set from
    scales((n_out, blocks)), drawn after the codes, one call per field."""
    _, block, nbytes = TYPES[name]
    if name == "F16":
        return rng.normal(0, std, (n_out, n_in)).astype(np.float16).view(np.uint8)
    if name == "BF16":
        bits = rng.normal(0, std, (n_out, n_in)).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    nb = n_in // block
    raw = rng.integers(0, 256, (n_out, nb, nbytes), dtype=np.uint8)
    for off in SCALES[name]:
        raw[:, :, off : off + 2] = scales((n_out, nb)).astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
    return raw.reshape(n_out, nb * nbytes)
