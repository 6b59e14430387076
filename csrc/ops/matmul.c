/* matmul.c — linear layers through the BLAS: y = x·Wᵀ with W stored [out, in].
 *
 * Threading: OpenBLAS is kept single-threaded (cepe_model_create sets it) and
 * the output columns are split over our OpenMP team instead. With a threaded
 * OpenBLAS beside OpenMP, each pool's idle workers spin on the cores the other
 * needs (measured here: 2 threads ran prefill at half the 1-thread speed).
 * oneMKL shares our pool, so multi-row products let it thread them. */
#include "../blas.h"
#include "ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Columns per thread are a multiple of this, so slices stay SIMD-aligned. */
#define MATMUL_ALIGN 16

static void matmul_slice(float *out, const float *inp, const float *weight, int N, int C, int OC, int o0,
                         int o1, float beta) {
    if (o1 <= o0) return;
    if (N == 1) /* one token: a matrix-vector product streams W once */
        CEPE_SGEMV(CblasRowMajor, CblasNoTrans, o1 - o0, C, 1.0f, weight + (long)o0 * C, C, inp, 1, beta,
                   out + o0, 1);
    else
        CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, N, o1 - o0, C, 1.0f, inp, C, weight + (long)o0 * C, C,
                   beta, out + o0, OC);
}

int matmul_forward(float *out, const float *inp, const float *weight, int N, int C, int OC, int accumulate,
                   int n_threads) {
    const float beta = accumulate ? 1.0f : 0.0f;
    int nt = n_threads;
    if (nt > OC / MATMUL_ALIGN) nt = OC / MATMUL_ALIGN;
    if ((long)N * C * OC < 65536) nt = 1; /* too small to pay for a fork */
    if (nt <= 1) {
        matmul_slice(out, inp, weight, N, C, OC, 0, OC, beta);
        return 0;
    }
#ifdef CEPE_MKL_BLAS
    /* oneMKL's GNU-threading layer runs on our libgomp pool, so it may thread
     * a product itself: as fast as the column split on wide outputs and up to
     * 1.4x faster on narrow ones (k/v: 192 columns, 96 per thread). */
    if (N > 1) {
        const int prev = mkl_set_num_threads_local(nt);
        matmul_slice(out, inp, weight, N, C, OC, 0, OC, beta);
        mkl_set_num_threads_local(prev);
        return 0;
    }
#endif
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
#else
        const int t = 0, n = 1;
#endif
        const int per = ((OC + n - 1) / n + MATMUL_ALIGN - 1) / MATMUL_ALIGN * MATMUL_ALIGN;
        const int o0 = t * per, o1 = o0 + per < OC ? o0 + per : OC;
        matmul_slice(out, inp, weight, N, C, OC, o0, o1, beta);
    }
    return 0;
}
