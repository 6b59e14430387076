/* matmul_packed.c — linear layers over weights packed once for the BLAS.
 *
 * A frozen weight is multiplied by every chunk of every call. Plain sgemm
 * re-packs it into the kernel's panel layout each time (~6 % of prefill,
 * measured with perf), so with oneMKL the weight is packed once, when the
 * model is finalized (cblas_sgemm_pack), and each product runs
 * cblas_sgemm_compute on that copy. Only oneMKL has this API: elsewhere
 * matmul_pack returns NULL and the model keeps using matmul_forward.
 *
 * Threading: the whole product is one oneMKL call on n_threads threads.
 * oneMKL's GNU-threading layer runs on the same libgomp pool as our OpenMP
 * regions, so no second pool spins beside the team (the reason matmul.c
 * keeps OpenBLAS single-threaded). oneMKL asks for the same thread count at
 * packing and compute time, so both use the model's n_threads. */
#include "../blas.h"
#include "ops.h"

#ifdef CEPE_HAVE_PACKED_SGEMM

/* Products below this many multiply-adds are not worth a thread team. */
#define PACKED_MIN_PARALLEL 65536L

int matmul_pack_supported(void) { return 1; }

size_t matmul_pack_bytes(int C, int OC) {
    return cblas_sgemm_pack_get_size(CblasBMatrix, 1, OC, C); /* independent of the rows */
}

void *matmul_pack(const float *weight, int C, int OC, int n_threads) {
    if (C <= 0 || OC <= 0) return NULL;
    const size_t bytes = matmul_pack_bytes(C, OC);
    void *packed = mkl_malloc(bytes ? bytes : 64, 64);
    if (!packed) return NULL;
    const int prev = mkl_set_num_threads_local(n_threads);
    /* op(B) = weightᵀ: B is (C, OC), stored as weight (OC, C) row-major. */
    cblas_sgemm_pack(CblasRowMajor, CblasBMatrix, CblasTrans, 1, OC, C, 1.0f, weight, C, packed);
    mkl_set_num_threads_local(prev);
    return packed;
}

void matmul_pack_free(void *packed) {
    if (packed) mkl_free(packed);
}

int matmul_forward_packed(float *out, const float *inp, const void *packed, int N, int C, int OC, int accumulate,
                          int n_threads) {
    if (N <= 0 || C <= 0 || OC <= 0) return 0;
    const int nt = (long)N * C * OC < PACKED_MIN_PARALLEL ? 1 : n_threads;
    const int prev = mkl_set_num_threads_local(nt);
    cblas_sgemm_compute(CblasRowMajor, CblasNoTrans, CblasPacked, N, OC, C, inp, C, (const float *)packed, C,
                        accumulate ? 1.0f : 0.0f, out, OC);
    mkl_set_num_threads_local(prev);
    return 0;
}

#else /* no packed GEMM in this BLAS */

int matmul_pack_supported(void) { return 0; }
size_t matmul_pack_bytes(int C, int OC) {
    (void)C;
    (void)OC;
    return 0;
}
void *matmul_pack(const float *weight, int C, int OC, int n_threads) {
    (void)weight;
    (void)C;
    (void)OC;
    (void)n_threads;
    return NULL;
}
void matmul_pack_free(void *packed) { (void)packed; }
int matmul_forward_packed(float *out, const float *inp, const void *packed, int N, int C, int OC, int accumulate,
                          int n_threads) {
    (void)out;
    (void)inp;
    (void)packed;
    (void)N;
    (void)C;
    (void)OC;
    (void)accumulate;
    (void)n_threads;
    return -1; /* never reached: matmul_pack returned NULL, so nothing was packed */
}

#endif
