/* matmul.c — linear layers through the BLAS: y = x·Wᵀ with W stored [out, in].
 *
 * Threading: OpenBLAS is kept single-threaded (cepe_model_create sets it) and
 * the output columns are split over our OpenMP team instead. With a threaded
 * OpenBLAS beside OpenMP, each pool's idle workers spin on the cores the other
 * needs (measured here: 2 threads ran prefill at half the 1-thread speed).
 * oneMKL shares our pool, so multi-row products let it thread them. */

#include "../blas.h"
#include "../common.h"
#include "../quant/quant.h"
#include "ops.h"

/* Columns per thread are a multiple of this, so slices stay SIMD-aligned. */
#define MATMUL_ALIGN 16

static void matmul_slice(float *out, const float *inp, const float *weight, int N, int C, int OC, int o0,
                         int o1, float beta) {
    if (o1 <= o0) return;
    CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, N, o1 - o0, C, 1.0f, inp, C, weight + (long)o0 * C, C,
               beta, out + o0, OC);
}

int matmul_forward(float *out, const float *inp, const float *weight, int N, int C, int OC, int accumulate,
                   int n_threads) {
    if (N == 1) { /* one token: the F32 dot kernel of the stored formats' family (quant.h) */
        const cepe_qtensor w = {.type = CEPE_QTYPE_F32,
                                .n_out = OC,
                                .n_in = C,
                                .data = weight,
                                .row_stride = (size_t)C * sizeof(float)};
        return cepe_qmatmul(out, inp, &w, 1, accumulate, NULL, 0, n_threads) != CEPE_OK;
    }
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
    const int prev = mkl_set_num_threads_local(nt);
    matmul_slice(out, inp, weight, N, C, OC, 0, OC, beta);
    mkl_set_num_threads_local(prev);
    return 0;
#else
#pragma omp parallel num_threads(nt)
    {
        int t, n;
        cepe_team(&t, &n);
        int o0, o1;
        cepe_share(OC, MATMUL_ALIGN, t, n, &o0, &o1);
        matmul_slice(out, inp, weight, N, C, OC, o0, o1, beta);
    }
    return 0;
#endif
}

/* ------------------------------------------------------------ backward */

/* The backward of matmul_forward, out = inp·Wᵀ:
 *   dinp (N, C)     = dout (N, OC) · W (OC, C)
 *   dweight (OC, C) += dout (N, OC)ᵀ · inp (N, C)
 * Same threading rule as the forward: OpenBLAS stays single-threaded and our
 * OpenMP team splits the output columns of dinp and the rows of dweight, so
 * no slice is written by two threads and no BLAS pool spins beside ours;
 * oneMKL threads each product itself on our pool. */

static void backward_slice(float *dinp, float *dweight, const float *dout, const float *inp,
                           const float *weight, int N, int C, int OC, float beta, int t, int nt) {
    int lo, hi;
    if (dinp) {
        cepe_share(C, MATMUL_ALIGN, t, nt, &lo, &hi);
        if (hi > lo)
            CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, hi - lo, OC, 1.0f, dout, OC, weight + lo,
                       C, beta, dinp + lo, C);
    }
    if (dweight) {
        cepe_share(OC, MATMUL_ALIGN, t, nt, &lo, &hi);
        if (hi > lo)
            CEPE_SGEMM(CblasRowMajor, CblasTrans, CblasNoTrans, hi - lo, C, N, 1.0f, dout + lo, OC, inp, C,
                       1.0f, dweight + (long)lo * C, C);
    }
}

int matmul_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                    int N, int C, int OC, int accumulate, int n_threads) {
    if (N <= 0 || C <= 0 || OC <= 0) return 0;
    const float beta = accumulate ? 1.0f : 0.0f;
    const int widest = C > OC ? C : OC;
    int nt = n_threads;
    if (nt > widest / MATMUL_ALIGN) nt = widest / MATMUL_ALIGN;
    if ((long)N * C * OC < 65536) nt = 1; /* too small to pay for a fork */
    if (nt <= 1) {
        backward_slice(dinp, dweight, dout, inp, weight, N, C, OC, beta, 0, 1);
        return 0;
    }
#ifdef CEPE_MKL_BLAS
    { /* oneMKL threads each product on our own libgomp pool (see matmul.c) */
        const int prev = mkl_set_num_threads_local(nt);
        backward_slice(dinp, dweight, dout, inp, weight, N, C, OC, beta, 0, 1);
        mkl_set_num_threads_local(prev);
        return 0;
    }
#endif
#pragma omp parallel num_threads(nt)
    {
        int t, n;
        cepe_team(&t, &n);
        backward_slice(dinp, dweight, dout, inp, weight, N, C, OC, beta, t, n);
    }
    return 0;
}
