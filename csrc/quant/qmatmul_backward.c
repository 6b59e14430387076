/* qmatmul_backward.c — the input gradient of out = x · Wᵀ for a frozen W in
 * its stored format: dx = dout · W, with W widened to fp32 a tile of rows at
 * a time (training keeps no fp32 copy of a frozen weight), or for BF16 on
 * CPUs with AVX512-BF16 the bf16 GEMM of gemm_bf16_avx512.c. */
#include <stdlib.h>
#include <string.h>

#include "../blas.h"
#include "quant_impl.h"

/* Weight rows widened per step: 256 rows of 1536 floats is 1.5 MB, shared
 * read-only by every thread. */
#define BWD_TILE 256

int cepe_qmatmul_backward_uses_bf16_gemm(const cepe_qtensor *w) {
    return w && w->type == CEPE_QTYPE_BF16 && quant_bf16_gemm_ready();
}

cepe_status cepe_qmatmul_backward_input(float *dinp, const float *dout, const cepe_qtensor *w, int rows,
                                        int accumulate, int n_threads) {
    cepe_status st = cepe_qtensor_check(w);
    if (st != CEPE_OK) return st;
    if (rows < 0) return cepe_fail(CEPE_ERR_INVALID_ARG, "qmatmul backward: %d rows", rows);
    if (rows == 0) return CEPE_OK;
    if (!dinp || !dout) return cepe_fail(CEPE_ERR_INVALID_ARG, "qmatmul backward: NULL pointer");
    if (cepe_qmatmul_backward_uses_bf16_gemm(w))
        return quant_bf16_gemm_backward(dinp, dout, w, rows, accumulate, n_threads);
    const int n_in = w->n_in, n_out = w->n_out;
    const int f32 = w->type == CEPE_QTYPE_F32;
    if (f32 && w->row_stride != (size_t)n_in * sizeof(float))
        return cepe_fail(CEPE_ERR_UNSUPPORTED,
                         "qmatmul backward: F32 weights with a row stride (dense rows only)");
    float *tile = f32 ? NULL : malloc((size_t)BWD_TILE * (size_t)n_in * sizeof(float));
    if (!f32 && !tile)
        return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "qmatmul backward: %d x %d floats of scratch", BWD_TILE,
                         n_in);
    if (!accumulate) memset(dinp, 0, (size_t)rows * (size_t)n_in * sizeof(float));
    int nt = n_threads < 1 ? 1 : n_threads;
    if (nt > rows) nt = rows;
    const unsigned char *base = w->data;
    for (int a = 0; a < n_out; a += BWD_TILE) {
        const int nr = n_out - a < BWD_TILE ? n_out - a : BWD_TILE;
        const float *t = f32 ? (const float *)(const void *)(base + (size_t)a * w->row_stride) : tile;
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
            int id, n;
            cepe_team(&id, &n);
#ifdef CEPE_MKL_BLAS
            const int prev = mkl_set_num_threads_local(1);
#endif
            if (!f32) {
#pragma omp for schedule(static)
                for (int i = 0; i < nr; i++)
                    quant_dequantize((int)w->type, base + (size_t)(a + i) * w->row_stride,
                                     tile + (size_t)i * n_in, n_in);
            }
            /* this thread's activation rows: dx[r0:r1] += dout[r0:r1, a:a+nr] · tile */
            int r0, r1;
            cepe_share(rows, 1, id, n, &r0, &r1);
            if (r1 > r0)
                CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1 - r0, n_in, nr, 1.0f,
                           dout + (size_t)r0 * n_out + a, n_out, t, n_in, 1.0f, dinp + (size_t)r0 * n_in,
                           n_in);
#ifdef CEPE_MKL_BLAS
            mkl_set_num_threads_local(prev);
#endif
        }
    }
    free(tile);
    return CEPE_OK;
}
