// cuda_matmul.cu — the linear layers through cuBLAS: y = x·Wᵀ with W stored
// [out, in] (matmul.c), its backward (also matmul.c), and the bf16-weight
// variant. cuBLAS is column-major: a row-major (R, K) matrix is its (K, R)
// transpose there, so out (N, OC) row-major = outᵀ (OC, N) column-major =
// W · inpᵀ, i.e. gemm(T, N) of W (C x OC, ld C) and inp (C x N, ld C).
// All in fp32 with CUBLAS_COMPUTE_32F (no TF32: CPU parity).
#include "cuda_common.cuh"

// C (m x n, ld ldc) = op(A) · op(B) + beta C, column-major, with A/B of type ab_type.
static int gemm(cuda_state *st, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                const void *A, int lda, const void *B, int ldb, cudaDataType ab_type, float beta, float *C,
                int ldc, const char *what) {
    const float alpha = 1.0f;
    return cublas_check(st,
                        cublasGemmEx(st->blas, ta, tb, m, n, k, &alpha, A, ab_type, lda, B, ab_type, ldb,
                                     &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                        what);
}

// With k == 0 the product is empty: C = beta C, which cuBLAS may leave
// untouched; zero it ourselves when beta == 0 (C is contiguous here).
static int empty_product(cuda_state *st, float *C, size_t count, int accumulate, const char *what) {
    if (accumulate || count == 0) return 0;
    return cuda_check(st, cudaMemsetAsync(C, 0, sizeof(float) * count, st->stream), what);
}

// out (N, OC) = inp (N, C) · w (OC, C)ᵀ (+ out when accumulate)
int cuda_matmul(const cepe_backend *be, float *out, const float *inp, const float *w, int N, int C, int OC,
                int accumulate, int nt) {
    (void)nt;
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (N <= 0 || OC <= 0) return 0;
    if (C <= 0) return empty_product(st, out, (size_t)N * OC, accumulate, "matmul");
    return gemm(st, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, w, C, inp, C, CUDA_R_32F, accumulate ? 1.0f : 0.0f,
                out, OC, "matmul");
}

// dinp (N, C) = dout (N, OC) · w (OC, C)   (+= when accumulate), or NULL
//   column-major: dinpᵀ (C x N) = wᵀ (C x OC, ld C) · doutᵀ (OC x N, ld OC)
// dweight (OC, C) += dout (N, OC)ᵀ · inp (N, C), or NULL
//   column-major: dweightᵀ (C x OC) = inpᵀ (C x N, ld C) · dout (N x OC: doutᵀ transposed, ld OC)
int cuda_matmul_backward(const cepe_backend *be, float *dinp, float *dweight, const float *dout,
                         const float *inp, const float *weight, int N, int C, int OC, int accumulate,
                         int nt) {
    (void)nt;
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (N <= 0 || C <= 0) return 0;
    if (dinp) {
        const int rc = OC <= 0 ? empty_product(st, dinp, (size_t)N * C, accumulate, "matmul_backward (dinp)")
                               : gemm(st, CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, weight, C, dout, OC, CUDA_R_32F,
                                      accumulate ? 1.0f : 0.0f, dinp, C, "matmul_backward (dinp)");
        if (rc) return rc;
    }
    if (dweight && OC > 0)
        return gemm(st, CUBLAS_OP_N, CUBLAS_OP_T, C, OC, N, inp, C, dout, OC, CUDA_R_32F, 1.0f, dweight, C,
                    "matmul_backward (dweight)");
    return 0;
}

// out (N, OC) = bf16(inp) (N, C) · w (OC, C, bf16)ᵀ (+ out), fp32 accumulation
// and output; the rounded activations live in scratch for the call.
int cuda_matmul_bf16(const cepe_backend *be, float *out, const float *inp, const uint16_t *w, int N, int C,
                     int OC, int accumulate, int nt) {
    (void)nt;
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (N <= 0 || OC <= 0) return 0;
    if (C <= 0) return empty_product(st, out, (size_t)N * OC, accumulate, "matmul_bf16");
    const size_t n = (size_t)N * C;
    uint16_t *act = (uint16_t *)cuda_scratch(st, sizeof(uint16_t) * n, "matmul_bf16");
    if (!act) return CEPE_ERR_OUT_OF_MEMORY;
    int rc = cuda_to_bf16(be, act, inp, n);
    if (!rc)
        rc = gemm(st, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, w, C, act, C, CUDA_R_16BF, accumulate ? 1.0f : 0.0f,
                  out, OC, "matmul_bf16");
    cuda_scratch_free(st, act);
    return rc;
}
