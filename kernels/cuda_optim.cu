// cuda_optim.cu — the optimizer over flat fp32 buffers (csrc/ops/optim.c):
// the per-chunk sums of squares of the gradient norm, the clipping scale,
// and the AdamW step through adamw_math.h's cepe_adamw_elem.
#include "cuda_common.cuh"
#include "ops/adamw_math.h"

// partial[c] = Σ g² over chunk c of CEPE_NORM_CHUNK elements, in double. One
// block per chunk, a fixed split and reduction order: the same bits on every
// run (resume is bit-exact), though not the CPU's sequential bits.
__global__ void sumsq_chunks_kernel(double *partial, const float *g, size_t n) {
    __shared__ double red[32];
    const size_t lo = (size_t)blockIdx.x * CEPE_NORM_CHUNK;
    const size_t hi = lo + CEPE_NORM_CHUNK < n ? lo + CEPE_NORM_CHUNK : n;
    double s = 0.0;
    for (size_t i = lo + threadIdx.x; i < hi; i += blockDim.x) s += (double)g[i] * (double)g[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void scale_kernel(float *x, float s, size_t n) {
    for (size_t i = grid_index(); i < n; i += grid_stride()) x[i] *= s;
}

// p, m, v (n) updated in place from g (n); the scalars as adamw.c computes them
__global__ void adamw_kernel(float *p, const float *g, float *m, float *v, size_t n, float decay, float w1,
                             float b2, float w2, float bc2_sqrt, float neg_step, float eps) {
    for (size_t i = grid_index(); i < n; i += grid_stride()) {
        float pi = p[i], mi = m[i], vi = v[i];
        cepe_adamw_elem(&pi, g[i], &mi, &vi, decay, w1, b2, w2, bc2_sqrt, neg_step, eps);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

int cuda_sumsq_chunks(const cepe_backend *be, double *partial, const float *g, size_t n, int nt) {
    (void)nt;
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (n == 0) return 0;
    const size_t n_chunks = (n + CEPE_NORM_CHUNK - 1) / CEPE_NORM_CHUNK;
    if (n_chunks > 0x7fffffffu)
        return cuda_fail(st, CEPE_ERR_UNSUPPORTED, "sumsq_chunks: %zu chunks exceed one launch", n_chunks);
    sumsq_chunks_kernel<<<(unsigned)n_chunks, CUDA_THREADS, 0, st->stream>>>(partial, g, n);
    return cuda_launched(st, "sumsq_chunks");
}

int cuda_scale(const cepe_backend *be, float *x, float s, size_t n, int nt) {
    (void)nt;
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (n == 0) return 0;
    scale_kernel<<<cuda_blocks(n, CUDA_THREADS), CUDA_THREADS, 0, st->stream>>>(x, s, n);
    return cuda_launched(st, "scale");
}

int cuda_adamw(const cepe_backend *be, float *p, const float *g, float *m, float *v, size_t n, float decay,
               float w1, float b2, float w2, float bc2_sqrt, float neg_step, float eps, int nt) {
    (void)nt;
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (n == 0) return 0;
    adamw_kernel<<<cuda_blocks(n, CUDA_THREADS), CUDA_THREADS, 0, st->stream>>>(p, g, m, v, n, decay, w1, b2,
                                                                                w2, bc2_sqrt, neg_step, eps);
    return cuda_launched(st, "adamw");
}
