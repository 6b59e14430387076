#!/usr/bin/env python
"""Products with weights kept in their GGUF formats (csrc/quant/) against the fp32 BLAS.

    python benchmarks/bench_quant.py                        # 1 thread, every format and path
    python benchmarks/bench_quant.py --threads 2 --repeats 9 --out bench_quant.json

Decode (one row of activations): for each format, each instruction-set path this CPU has
(c, avx2, avx512) and each weight shape of SmolLM2-135M ([out, in]: 576x576 q/o_proj,
1536x576 gate/up_proj, 49152x576 the LM head; 576x1536 down_proj, the only one the 256-value
K-quants can hold), the time of cepe_qmatmul(rows=1) against matmul_forward (the BLAS sgemv
decoding runs today) on the same weights dequantized to fp32. GFLOP/s = 2 n_out n_in / t;
GB/s = bytes of weights read / t (the activations are a few KB).

Prefill (many rows): cepe_qmatmul through the quantized kernels, through dequantized
tiles + sgemm and, for the formats that have it on this CPU (Q4_0, Q4_1, Q8_0 with AVX-512
VNNI), through the int8 GEMM (each forced with cepe_qmatmul_sgemm_rows /
cepe_qmatmul_gemm_rows), against the fp32 sgemm, for 1..512 rows: where the crossovers lie
(SGEMM_MIN_ROWS, GEMM_MIN_ROWS in csrc/quant/qmatmul.c). BF16 on a CPU with AVX512-BF16: the
bf16 GEMM (BF16_GEMM_MIN_ROWS) beside the kernels and beside the tiles + sgemm it replaced
(timed on the AVX2 path, as CEPE_ISA=avx2 runs it), forward and input gradient
(cepe_qmatmul_backward_input, dx = dout · W).

Each figure is the median over --repeats rounds (the minimum is kept beside it); a round runs
every configuration once, a timed batch of at least --batch-ms, in an order reversed from one
round to the next, so a slow spell of a shared host lands on all of them alike. Threads:
OpenMP and the BLAS both get --threads. Prints one JSON object on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch-ms", type=float, default=25.0)
    p.add_argument("--formats", default="F16,BF16,Q4_0,Q4_1,Q8_0,Q4_K,Q5_K,Q6_K")
    p.add_argument("--prefill-rows", default="1,2,4,8,16,32,64,128,512")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args()


ARGS = parse_args()
# before the OpenMP and BLAS runtimes start
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(ARGS.threads)
os.environ["OPENBLAS_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
from _common import cpu_model_name, emit_json, git_state, usable_cpus  # noqa: E402

import cepe_c  # noqa: E402
from cepe.testing.quant_ctypes import ISA_NAMES, TYPES, QTensor, load_library, random_rows  # noqa: E402

DECODE_SHAPES = ((576, 576), (1536, 576), (49152, 576), (576, 1536))
LIB = load_library()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_weights(name: str, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """Stored rows [n_out, row bytes]: random codes, fp16 scales of a trained model's size."""
    return random_rows(name, n_out, n_in, rng, 0.05, lambda shape: np.full(shape, 0.003))


def dequantize(name: str, raw: np.ndarray, n_in: int) -> np.ndarray:
    out = np.empty((raw.shape[0], n_in), np.float32)
    for r in range(raw.shape[0]):
        if LIB.cepe_dequantize_row(TYPES[name][0], raw[r].ctypes.data, out[r].ctypes.data, n_in) != 0:
            raise RuntimeError(LIB.cepe_last_error().decode())
    return out


class Product:
    """One timed configuration: a callable and the work one call does."""

    def __init__(self, key: tuple, call, flops: float, nbytes: int) -> None:
        self.key, self.call, self.flops, self.nbytes = key, call, flops, nbytes
        self.times: list[float] = []

    def run_batch(self, batch_s: float) -> None:
        self.call()  # warm: caches, page faults of the output, OpenMP pool
        n, t0 = 0, time.perf_counter()
        while True:
            self.call()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= batch_s and n >= 3:
                break
        self.times.append(dt / n)


OFF = 1 << 30  # a row count no call reaches: that way never taken


def qmatmul_product(key, name, raw, n_in, x, isa, sgemm_rows, gemm_rows=OFF):
    w = QTensor(TYPES[name][0], raw.shape[0], n_in, raw.ctypes.data, raw.strides[0])
    rows = x.shape[0]
    out = np.zeros((rows, raw.shape[0]), np.float32)
    prev_isa = LIB.cepe_quant_isa()
    LIB.cepe_quant_set_isa(isa)
    prev = (
        LIB.cepe_qmatmul_sgemm_rows(sgemm_rows),
        LIB.cepe_qmatmul_gemm_rows(gemm_rows),
    )  # the scratch depends on the way
    work = np.zeros(max(int(LIB.cepe_qmatmul_work_size(ctypes.byref(w), rows, ARGS.threads)), 1), np.uint8)
    LIB.cepe_qmatmul_sgemm_rows(prev[0])
    LIB.cepe_qmatmul_gemm_rows(prev[1])
    LIB.cepe_quant_set_isa(prev_isa)
    size = work.size
    wref = ctypes.byref(w)

    def call():
        LIB.cepe_quant_set_isa(isa)
        LIB.cepe_qmatmul_sgemm_rows(sgemm_rows)
        LIB.cepe_qmatmul_gemm_rows(gemm_rows)
        st = LIB.cepe_qmatmul(out.ctypes.data, x.ctypes.data, wref, rows, 0, work.ctypes.data, size, ARGS.threads)
        if st != 0:
            raise RuntimeError(LIB.cepe_last_error().decode())

    call.keep = (w, out, work, raw, x)  # alive as long as the closure
    return Product(key, call, 2.0 * rows * raw.shape[0] * n_in, raw.nbytes)


def backward_product(key, name, raw, n_in, dout, isa):
    """cepe_qmatmul_backward_input: dx = dout · W, the input gradient training takes."""
    w = QTensor(TYPES[name][0], raw.shape[0], n_in, raw.ctypes.data, raw.strides[0])
    rows = dout.shape[0]
    dx = np.zeros((rows, n_in), np.float32)
    wref = ctypes.byref(w)

    def call():
        LIB.cepe_quant_set_isa(isa)
        if LIB.cepe_qmatmul_backward_input(dx.ctypes.data, dout.ctypes.data, wref, rows, 0, ARGS.threads) != 0:
            raise RuntimeError(LIB.cepe_last_error().decode())

    call.keep = (w, dx, raw, dout)
    return Product(key, call, 2.0 * rows * raw.shape[0] * n_in, raw.nbytes)


def fp32_product(key, wf, x):
    rows, n_in = x.shape
    out = np.zeros((rows, wf.shape[0]), np.float32)

    def call():
        LIB.matmul_forward(out.ctypes.data, x.ctypes.data, wf.ctypes.data, rows, n_in, wf.shape[0], 0, ARGS.threads)

    call.keep = (out, wf, x)
    return Product(key, call, 2.0 * rows * wf.shape[0] * n_in, wf.nbytes)


def run_rounds(products: list[Product]) -> None:
    for r in range(ARGS.repeats):
        for p in products if r % 2 == 0 else reversed(products):
            p.run_batch(ARGS.batch_ms / 1000.0)


def summary(p: Product) -> dict:
    med, best = statistics.median(p.times), min(p.times)
    return {
        "us": round(med * 1e6, 2),
        "us_min": round(best * 1e6, 2),
        "gflops": round(p.flops / med / 1e9, 2),
        "gbs": round(p.nbytes / med / 1e9, 2),
    }


def decode_section(formats: list[str], isas: list[int], rng) -> list[dict]:
    results = []
    for n_out, n_in in DECODE_SHAPES:
        names = [f for f in formats if n_in % TYPES[f][1] == 0]
        x = rng.normal(size=(1, n_in)).astype(np.float32)
        products = []
        wf = None
        for name in names:
            raw = random_weights(name, n_out, n_in, rng)
            if wf is None:  # the baseline's time does not depend on the values
                wf = dequantize(name, raw, n_in)
            products += [qmatmul_product((name, isa), name, raw, n_in, x, isa, OFF) for isa in isas]
        products.append(fp32_product(("F32 sgemv", None), wf, x))
        log(f"decode {n_out}x{n_in}: {len(products)} configurations x {ARGS.repeats} rounds")
        run_rounds(products)
        base = statistics.median(products[-1].times)
        for p in products:
            name, isa = p.key
            row = {"shape": [n_out, n_in], "format": name, "isa": ISA_NAMES[isa] if isa is not None else "blas"}
            row.update(summary(p))
            row["speedup_vs_fp32_sgemv"] = round(base / statistics.median(p.times), 2)
            results.append(row)
            log(
                f"  {name:9s} {row['isa']:6s} {row['us']:10.1f} us  {row['gflops']:7.2f} GFLOP/s"
                f"  {row['gbs']:6.2f} GB/s  x{row['speedup_vs_fp32_sgemv']}"
            )
    return results


def prefill_section(formats: list[str], isa: int, rng) -> list[dict]:
    results = []
    row_counts = [int(r) for r in ARGS.prefill_rows.split(",")]
    for name in formats:
        n_out, n_in = (1536, 576) if TYPES[name][1] <= 32 else (576, 1536)
        raw = random_weights(name, n_out, n_in, rng)
        wf = dequantize(name, raw, n_in)
        products = []
        # BF16 on a CPU with AVX512-BF16: many rows take the bf16 GEMM, timed beside the tiles +
        # sgemm it replaced (the AVX2 path, as CEPE_ISA=avx2 runs it)
        LIB.cepe_quant_set_isa(isa)
        w = QTensor(TYPES[name][0], n_out, n_in, raw.ctypes.data, raw.strides[0])
        bf16_gemm = bool(LIB.cepe_qmatmul_backward_uses_bf16_gemm(ctypes.byref(w)))
        prev = LIB.cepe_qmatmul_gemm_rows(1)
        int8_gemm = LIB.cepe_qmatmul_path(ctypes.byref(w), 1) == 2  # CEPE_QMATMUL_INT8_GEMM: this format has it here
        LIB.cepe_qmatmul_gemm_rows(prev)
        if bf16_gemm:
            ways = ["kernels", "bf16 gemm", "tiles+sgemm"]
        else:
            ways = ["kernels", "tiles+sgemm"] + (["int8 gemm"] if int8_gemm else [])
        for rows in row_counts:
            x = rng.normal(size=(rows, n_in)).astype(np.float32)
            products += [
                qmatmul_product((rows, "kernels"), name, raw, n_in, x, isa, OFF),
                qmatmul_product((rows, ways[1]), name, raw, n_in, x, isa, 1),
            ]
            if int8_gemm:
                products.append(qmatmul_product((rows, "int8 gemm"), name, raw, n_in, x, isa, OFF, 1))
            if bf16_gemm:
                dout = rng.normal(size=(rows, n_out)).astype(np.float32)
                products += [
                    qmatmul_product((rows, "tiles+sgemm"), name, raw, n_in, x, 1, 1),
                    backward_product((rows, "backward bf16 gemm"), name, raw, n_in, dout, isa),
                    backward_product((rows, "backward tiles+sgemm"), name, raw, n_in, dout, 1),
                ]
            products.append(fp32_product((rows, "fp32 sgemm"), wf, x))
        log(f"prefill {name} {n_out}x{n_in}: {len(products)} configurations x {ARGS.repeats} rounds")
        run_rounds(products)
        by_rows: dict[int, dict] = {}
        for p in products:
            rows, way = p.key
            row = by_rows.setdefault(rows, {"format": name, "shape": [n_out, n_in], "rows": rows})
            row[way + " us"] = round(statistics.median(p.times) * 1e6, 1)
            row[way + " us_min"] = round(min(p.times) * 1e6, 1)
        for rows, row in by_rows.items():
            row["faster"] = min(ways, key=lambda way: row[way + " us"])
            results.append(row)
            log(f"  {rows:4d} rows: " + "  ".join(f"{k[:-3]} {v:9.1f} us" for k, v in row.items() if k.endswith(" us")))
    return results


def main() -> None:
    rng = np.random.default_rng(0)
    formats = ARGS.formats.split(",")
    best = LIB.cepe_quant_isa_best()
    isas = list(range(best + 1))
    try:
        blas = cepe_c.blas_info()
    except AttributeError:
        blas = None
    result = {
        "machine": {"cpu": cpu_model_name(), "usable_cpus": usable_cpus(), "blas": blas},
        "git": git_state(),
        "threads": ARGS.threads,
        "repeats": ARGS.repeats,
        "isa_best": ISA_NAMES[best],
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "decode": decode_section(formats, isas, rng),
    }
    if not ARGS.no_prefill:
        result["prefill"] = prefill_section(formats, best, rng)
    LIB.cepe_quant_set_isa(best)
    LIB.cepe_qmatmul_sgemm_rows(0)
    LIB.cepe_qmatmul_gemm_rows(0)
    emit_json(result, ARGS.out)


if __name__ == "__main__":
    main()
