/* qmatmul.c — out = x · Wᵀ with W in its stored format, for one row of
 * activations (decode) or many (prefill).
 *
 * Four ways, chosen by the format and the number of activation rows
 * (cepe_qmatmul_path):
 *   - quantized kernels: each activation row is quantized once, then every
 *     weight row is dotted with every activation row. The weights are streamed
 *     once at their stored width; this is what decoding, which is bound by
 *     memory bandwidth, needs.
 *   - dequantized tiles + sgemm: each thread widens a tile of weight rows to
 *     fp32 and multiplies all activation rows by it with the BLAS. Widening a
 *     weight is paid once per `rows` products, and the BLAS's register-blocked
 *     sgemm then beats one-row-at-a-time dot products once rows are a few
 *     (and it multiplies unrounded fp32 activations).
 *   - int8 GEMM (Q4_0, Q4_1, Q8_0 on AVX-512 VNNI, gemm_blocks32_avx512.c):
 *     the activations quantized as for the kernels, the weights repacked into
 *     int8 panels that every activation row reuses; from GEMM_MIN_ROWS rows it
 *     beats both.
 *   - bf16 GEMM (BF16 on a CPU with AVX512-BF16, gemm_bf16_avx512.c): the
 *     activations rounded to bf16, fp32 sums; from BF16_GEMM_MIN_ROWS rows.
 * The crossovers are measured in benchmarks/bench_quant.py (SGEMM_MIN_ROWS,
 * GEMM_MIN_ROWS, BF16_GEMM_MIN_ROWS).
 *
 * Threading: OpenMP over output rows. The BLAS runs single-threaded inside
 * each thread, so the two thread pools never compete for the cores. */
#include <stdint.h>
#include <stdlib.h>

#include "../blas.h"
#include "../ops/ops.h"
#include "quant_impl.h"

/* Output rows each thread widens per sgemm call: 64 while the activation rows
 * are few (more, smaller calls split the work evenly), 128 from 64 rows on,
 * where each call's repacking of the activations costs more than the larger
 * tile (benchmarks/README.md: 7-15 % less time at 512 rows). A tile of 128 rows
 * of 1536 floats is 768 KB, within L2 beside the activations' panel. */
#ifndef QMATMUL_TILE
#define QMATMUL_TILE 64
#endif
static int tile_rows(int rows) { return rows >= 64 ? 2 * QMATMUL_TILE : QMATMUL_TILE; }

/* Activation rows from which dequantized tiles + sgemm beat the quantized
 * kernels, per format (bench_quant.py, benchmarks/README.md). It grows with
 * the cost of widening a format to fp32: a block copy for F16 and Q8_0, bit
 * fiddling for the K-quants. */
static const int SGEMM_MIN_ROWS[QT_COUNT] = {
    [QT_F16] = 8,  [QT_BF16] = 8,  [QT_Q4_0] = 8,  [QT_Q4_1] = 16,
    [QT_Q8_0] = 8, [QT_Q4_K] = 16, [QT_Q5_K] = 32, [QT_Q6_K] = 64,
};
static int sgemm_rows_override = 0; /* cepe_qmatmul_sgemm_rows; 0: the table */
/* Activation rows from which the int8 GEMM beats the kernels and the tiles,
 * for the formats it takes (bench_quant.py, benchmarks/README.md). */
static const int GEMM_MIN_ROWS[QT_COUNT] = {[QT_Q4_0] = 2, [QT_Q4_1] = 2, [QT_Q8_0] = 4};
static int gemm_rows_override = 0; /* cepe_qmatmul_gemm_rows; 0: the table */
/* Output rows per thread are a multiple of this, so slices keep to cache lines. */
#define ROW_ALIGN 16
#define SERIAL_PREP_ROWS 4

/* BF16 weights on a CPU with AVX512-BF16: rows from which the bf16 GEMM
 * (gemm_bf16_avx512.c) beats the bf16 dot kernels (bench_quant.py). It takes
 * the place of the tiles + sgemm, so cepe_qmatmul_sgemm_rows moves it. */
#define BF16_GEMM_MIN_ROWS 6

/* Whether this build and CPU have the int8 GEMM for w. Its panels address 16
 * rows with int32 byte offsets. */
static int has_gemm(const cepe_qtensor *w) {
    return (w->type == CEPE_QTYPE_Q4_0 || w->type == CEPE_QTYPE_Q4_1 || w->type == CEPE_QTYPE_Q8_0) &&
           cepe_quant_isa() >= CEPE_ISA_AVX512 && w->row_stride <= (size_t)INT32_MAX / 16;
}

int cepe_qmatmul_path(const cepe_qtensor *w, int rows) {
    if (w->type == CEPE_QTYPE_F32) /* one row: the F32 kernel (see cepe_qmatmul) */
        return rows > 1 ? CEPE_QMATMUL_SGEMM : CEPE_QMATMUL_KERNELS;
    const int t = quant_type_index((int)w->type);
    if (t < 0) return CEPE_QMATMUL_KERNELS;
    if (w->type == CEPE_QTYPE_BF16 && quant_bf16_gemm_ready())
        return rows >= (sgemm_rows_override > 0 ? sgemm_rows_override : BF16_GEMM_MIN_ROWS)
                   ? CEPE_QMATMUL_BF16_GEMM
                   : CEPE_QMATMUL_KERNELS;
    if (has_gemm(w) && rows >= (gemm_rows_override > 0 ? gemm_rows_override : GEMM_MIN_ROWS[t]))
        return CEPE_QMATMUL_INT8_GEMM;
    return rows >= (sgemm_rows_override > 0 ? sgemm_rows_override : SGEMM_MIN_ROWS[t]) ? CEPE_QMATMUL_SGEMM
                                                                                       : CEPE_QMATMUL_KERNELS;
}

int cepe_qmatmul_uses_sgemm(const cepe_qtensor *w, int rows) {
    return cepe_qmatmul_path(w, rows) == CEPE_QMATMUL_SGEMM;
}

int cepe_qmatmul_uses_bf16_gemm(const cepe_qtensor *w, int rows) {
    return cepe_qmatmul_path(w, rows) == CEPE_QMATMUL_BF16_GEMM;
}

int cepe_qmatmul_sgemm_rows(int rows) {
    const int prev = sgemm_rows_override;
    if (rows >= 0) sgemm_rows_override = rows;
    return prev;
}

int cepe_qmatmul_gemm_rows(int rows) {
    const int prev = gemm_rows_override;
    if (rows >= 0) gemm_rows_override = rows;
    return prev;
}

static int team_size(const cepe_qtensor *w, int rows, int n_threads) {
    int nt = n_threads < 1 ? 1 : n_threads;
    if (nt > w->n_out / ROW_ALIGN) nt = w->n_out / ROW_ALIGN;
    if ((int64_t)rows * w->n_in * w->n_out < QUANT_MIN_PARALLEL_WORK) nt = 1;
    return nt < 1 ? 1 : nt;
}

static size_t act_bytes_per_row(const cepe_qtensor *w) {
    const quant_kernel k = quant_kernel_for((int)w->type);
    return k.act == ACT_F32 ? 0 : quant_act_bytes(k.act, w->n_in);
}

static int gemm_chunk(int rows) { return rows < QUANT_GEMM_CHUNK_ROWS ? rows : QUANT_GEMM_CHUNK_ROWS; }

size_t cepe_qmatmul_work_size(const cepe_qtensor *w, int rows, int n_threads) {
    if (!w || quant_type_index((int)w->type) < 0 || rows <= 0 || w->n_in <= 0) return 0;
    const int path = cepe_qmatmul_path(w, rows);
    if (path == CEPE_QMATMUL_BF16_GEMM)
        return quant_bf16_gemm_work_size(rows, w->n_in, w->n_out, n_threads) + QUANT_ALIGN;
    if (path == CEPE_QMATMUL_INT8_GEMM) /* a chunk's activation rows, then a panel per thread */
        return quant_align_up((size_t)gemm_chunk(rows) * act_bytes_per_row(w)) +
               (size_t)team_size(w, rows, n_threads) * quant_gemm_panel_bytes((int)w->type, w->n_in) +
               QUANT_ALIGN;
    if (path == CEPE_QMATMUL_SGEMM)
        return (size_t)team_size(w, rows, n_threads) * (size_t)tile_rows(rows) * (size_t)w->n_in *
                   sizeof(float) +
               QUANT_ALIGN;
    const size_t per_row = act_bytes_per_row(w);
    return per_row ? (size_t)rows * per_row + QUANT_ALIGN : 0;
}

/* Output rows [o0, o1) of every activation row through the kernel k. */
static void kernel_rows(float *out, const float *x, const cepe_qtensor *w, quant_kernel k,
                        const unsigned char *act, size_t ab, int rows, int accumulate, int o0, int o1) {
    const int n_in = w->n_in, n_out = w->n_out;
    const unsigned char *base = w->data;
    for (int o = o0; o < o1; o++) {
        const void *row = base + (size_t)o * w->row_stride;
        for (int r = 0; r < rows; r++) {
            const void *a = ab ? (const void *)(act + (size_t)r * ab) : (const void *)(x + (size_t)r * n_in);
            const float v = k.dot(n_in, row, a);
            float *dst = out + (size_t)r * n_out + o;
            *dst = accumulate ? *dst + v : v;
        }
    }
}

static void qmatmul_kernels(float *out, const float *x, const cepe_qtensor *w, int rows, int accumulate,
                            unsigned char *act, int nt) {
    const quant_kernel k = quant_kernel_for((int)w->type);
    const size_t ab = act_bytes_per_row(w);
    const int n_in = w->n_in, n_out = w->n_out;
    /* A few rows (decoding) are quantized before the team starts: a row takes
     * about a microsecond, less than the barrier an `omp for` would add, which
     * costs far more when the cores are shared. */
    const int serial_prep = rows <= SERIAL_PREP_ROWS;
    if (ab && serial_prep)
        for (int r = 0; r < rows; r++)
            quant_prepare_act(k.act, x + (size_t)r * n_in, act + (size_t)r * ab, n_in);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t, n;
        cepe_team(&t, &n);
        if (ab && !serial_prep) {
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++)
                quant_prepare_act(k.act, x + (size_t)r * n_in, act + (size_t)r * ab, n_in);
        }
        int o0, o1;
        cepe_share(n_out, ROW_ALIGN, t, n, &o0, &o1);
        kernel_rows(out, x, w, k, act, ab, rows, accumulate, o0, o1);
    }
}

static void qmatmul_sgemm(float *out, const float *x, const cepe_qtensor *w, int rows, int accumulate,
                          float *tiles, int nt) {
    const int n_in = w->n_in, n_out = w->n_out;
    const unsigned char *base = w->data;
    const float beta = accumulate ? 1.0f : 0.0f;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t, n;
        cepe_team(&t, &n);
#ifdef CEPE_MKL_BLAS
        const int prev = mkl_set_num_threads_local(1);
#endif
        const int tr = tile_rows(rows);
        float *tile = tiles + (size_t)t * tr * n_in;
        int o0, o1;
        cepe_share(n_out, ROW_ALIGN, t, n, &o0, &o1);
        for (int a = o0; a < o1; a += tr) {
            const int nr = o1 - a < tr ? o1 - a : tr;
            for (int i = 0; i < nr; i++)
                quant_dequantize((int)w->type, base + (size_t)(a + i) * w->row_stride,
                                 tile + (size_t)i * n_in, n_in);
            CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, rows, nr, n_in, 1.0f, x, n_in, tile, n_in,
                       beta, out + a, n_out);
        }
#ifdef CEPE_MKL_BLAS
        mkl_set_num_threads_local(prev);
#endif
    }
}

static void qmatmul_gemm(float *out, const float *x, const cepe_qtensor *w, int rows, int accumulate,
                         unsigned char *work, int nt) {
    const size_t ab = act_bytes_per_row(w);
    const int n_in = w->n_in, n_out = w->n_out;
    unsigned char *act = work, *panels = work + quant_align_up((size_t)gemm_chunk(rows) * ab);
    const size_t panel_bytes = quant_gemm_panel_bytes((int)w->type, n_in);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t, n;
        cepe_team(&t, &n);
        int o0, o1;
        cepe_share(n_out, ROW_ALIGN, t, n, &o0, &o1);
        for (int r0 = 0; r0 < rows; r0 += QUANT_GEMM_CHUNK_ROWS) {
            const int nr = gemm_chunk(rows - r0);
            /* the omp for ends in a barrier (every row quantized before any thread multiplies); so
             * does each chunk but the last (every thread done with it before the next overwrites it) */
#pragma omp for schedule(static)
            for (int r = 0; r < nr; r++)
                quant_prepare_act(ACT_Q8_32, x + (size_t)(r0 + r) * n_in, act + (size_t)r * ab, n_in);
            quant_gemm_blocks32_avx512(out + (size_t)r0 * n_out, w, act, ab, nr, accumulate, o0, o1,
                                       panels + (size_t)t * panel_bytes);
            if (r0 + QUANT_GEMM_CHUNK_ROWS < rows) {
#pragma omp barrier
            }
        }
    }
}

cepe_status cepe_qmatmul(float *out, const float *x, const cepe_qtensor *w, int rows, int accumulate,
                         void *work, size_t work_size, int n_threads) {
    cepe_status st = cepe_qtensor_check(w);
    if (st != CEPE_OK) return st;
    if (rows < 0) return cepe_fail(CEPE_ERR_INVALID_ARG, "qmatmul: %d rows", rows);
    if (rows == 0) return CEPE_OK;
    if (!out || !x) return cepe_fail(CEPE_ERR_INVALID_ARG, "qmatmul: NULL pointer");
    if (w->type == CEPE_QTYPE_F32) {
        if (w->row_stride != (size_t)w->n_in * sizeof(float))
            return cepe_fail(CEPE_ERR_UNSUPPORTED,
                             "qmatmul: F32 weights with a row stride of %zu bytes (dense rows only)",
                             w->row_stride);
        /* One row streams W once and is bound by memory bandwidth: the F32
         * dot kernel, 1.7x oneMKL's sgemv here (oneMKL takes its generic code
         * path on AMD CPUs). More rows: the BLAS sgemm. */
        if (rows > 1) {
            if (matmul_forward(out, x, w->data, rows, w->n_in, w->n_out, accumulate, n_threads) != 0)
                return cepe_fail(CEPE_ERR_BACKEND, "qmatmul: BLAS matmul failed");
            return CEPE_OK;
        }
        qmatmul_kernels(out, x, w, rows, accumulate, NULL, team_size(w, rows, n_threads));
        return CEPE_OK;
    }
    const int nt = team_size(w, rows, n_threads);
    const size_t need = cepe_qmatmul_work_size(w, rows, n_threads);
    void *own = NULL;
    if (need && !work) {
        own = malloc(need);
        if (!own) return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "qmatmul: %zu bytes of scratch", need);
        work = own;
    } else if (need > work_size) {
        return cepe_fail(CEPE_ERR_INVALID_ARG, "qmatmul: %zu bytes of scratch given, %zu needed", work_size,
                         need);
    }
    unsigned char *aligned = work ? (unsigned char *)quant_align_up((uintptr_t)work) : NULL;
    switch (cepe_qmatmul_path(w, rows)) {
    case CEPE_QMATMUL_BF16_GEMM:
        quant_bf16_gemm_forward(out, x, w, rows, accumulate, aligned, n_threads);
        break;
    case CEPE_QMATMUL_INT8_GEMM:
        qmatmul_gemm(out, x, w, rows, accumulate, aligned, nt);
        break;
    case CEPE_QMATMUL_SGEMM:
        qmatmul_sgemm(out, x, w, rows, accumulate, (float *)aligned, nt);
        break;
    default:
        qmatmul_kernels(out, x, w, rows, accumulate, aligned, nt);
    }
    free(own);
    return CEPE_OK;
}
