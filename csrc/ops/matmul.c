/* matmul.c — linear layers through the BLAS: y = x·Wᵀ with W stored [out, in]. */
#include "../blas.h"
#include "ops.h"

int matmul_forward(float *out, const float *inp, const float *weight, int N, int C, int OC,
                   int accumulate) {
    const float beta = accumulate ? 1.0f : 0.0f;
    if (N == 1) /* one token: a matrix-vector product streams W once */
        CEPE_SGEMV(CblasRowMajor, CblasNoTrans, OC, C, 1.0f, weight, C, inp, 1, beta, out, 1);
    else
        CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1.0f, inp, C, weight, C,
                   beta, out, OC);
    return 0;
}
