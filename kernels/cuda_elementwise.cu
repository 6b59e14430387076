// cuda_elementwise.cu — the per-element ops: embedding lookup and its
// scatter-add backward, SwiGLU and its backward, and the bf16 rounding. The
// arithmetic is elementwise.h's / elementwise.h's, as on the CPU.
#include "cuda_common.cuh"
#include "ops/elementwise.h"

// out (N, C) = wte[ids]; ids (N) already range-checked by the caller
__global__ void embedding_kernel(float *out, const int32_t *ids, const float *wte, int N, int C) {
    const size_t n = (size_t)N * C;
    for (size_t i = grid_index(); i < n; i += grid_stride()) {
        const size_t row = i / C, c = i % C;
        out[i] = wte[(size_t)ids[row] * C + c];
    }
}

// dwte (V, C) += dout (N, C) scattered to rows ids (N): atomics, since a
// token that appears twice adds twice into one row
__global__ void embedding_backward_kernel(float *dwte, const float *dout, const int32_t *ids, int N, int C) {
    const size_t n = (size_t)N * C;
    for (size_t i = grid_index(); i < n; i += grid_stride()) {
        const size_t row = i / C, c = i % C;
        atomicAdd(&dwte[(size_t)ids[row] * C + c], dout[i]);
    }
}

// out (n) = silu(gate) * up
__global__ void swiglu_kernel(float *out, const float *gate, const float *up, size_t n) {
    for (size_t i = grid_index(); i < n; i += grid_stride()) out[i] = cepe_swiglu(gate[i], up[i]);
}

// dgate, dup (n) += the gradients of silu(gate) * up
__global__ void swiglu_backward_kernel(float *dgate, float *dup, const float *dout, const float *gate,
                                       const float *up, size_t n) {
    for (size_t i = grid_index(); i < n; i += grid_stride()) {
        float dg = dgate[i], du = dup[i];
        cepe_swiglu_backward(gate[i], up[i], dout[i], &dg, &du);
        dgate[i] = dg;
        dup[i] = du;
    }
}

// dst (n) = bf16(src), nearest even
__global__ void to_bf16_kernel(uint16_t *dst, const float *src, size_t n) {
    for (size_t i = grid_index(); i < n; i += grid_stride()) dst[i] = cepe_float_to_bf16(src[i]);
}

int cuda_embedding(const cepe_backend *be, float *out, const int32_t *ids, const float *wte, int N, int C) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (N <= 0 || C <= 0) return 0;
    const size_t n = (size_t)N * C;
    embedding_kernel<<<cuda_blocks(n, CUDA_THREADS), CUDA_THREADS, 0, st->stream>>>(out, ids, wte, N, C);
    return cuda_launched(st, "embedding");
}

int cuda_embedding_backward(const cepe_backend *be, float *dwte, const float *dout, const int32_t *ids, int N,
                            int C) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (N <= 0 || C <= 0) return 0;
    const size_t n = (size_t)N * C;
    embedding_backward_kernel<<<cuda_blocks(n, CUDA_THREADS), CUDA_THREADS, 0, st->stream>>>(dwte, dout, ids,
                                                                                             N, C);
    return cuda_launched(st, "embedding_backward");
}

int cuda_swiglu(const cepe_backend *be, float *out, const float *gate, const float *up, long N, int nt) {
    (void)nt;
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (N <= 0) return 0;
    swiglu_kernel<<<cuda_blocks((size_t)N, CUDA_THREADS), CUDA_THREADS, 0, st->stream>>>(out, gate, up,
                                                                                         (size_t)N);
    return cuda_launched(st, "swiglu");
}

int cuda_swiglu_backward(const cepe_backend *be, float *dgate, float *dup, const float *dout,
                         const float *gate, const float *up, long N) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (N <= 0) return 0;
    swiglu_backward_kernel<<<cuda_blocks((size_t)N, CUDA_THREADS), CUDA_THREADS, 0, st->stream>>>(
        dgate, dup, dout, gate, up, (size_t)N);
    return cuda_launched(st, "swiglu_backward");
}

int cuda_to_bf16(const cepe_backend *be, uint16_t *dst, const float *src, size_t n) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (n == 0) return 0;
    to_bf16_kernel<<<cuda_blocks(n, CUDA_THREADS), CUDA_THREADS, 0, st->stream>>>(dst, src, n);
    return cuda_launched(st, "to_bf16");
}
