// cuda_rope.cu — rotary position embeddings: the cos/sin table (angles in
// double, as csrc/rope/apply.c: positions reach 10^5..10^6 where fp32 products lose
// whole radians) and the rotation and its backward in both pair layouts,
// through elementwise.h's cepe_rope_rotate / cepe_rope_rotate_backward.
#include "cuda_common.cuh"
#include "ops/elementwise.h"

// cos/sin (N, half) = mscale * cos/sin(pos (N) * inv_freq (half))
__global__ void rope_table_kernel(float *cos_t, float *sin_t, const double *pos, const float *inv_freq, int N,
                                  int half, float mscale) {
    const size_t n = (size_t)N * half;
    for (size_t i = grid_index(); i < n; i += grid_stride()) {
        const double a = pos[i / half] * (double)inv_freq[i % half];
        cos_t[i] = (float)cos(a) * mscale; // HF: cos * attention_scaling
        sin_t[i] = (float)sin(a) * mscale;
    }
}

// x (N, nh, hd) rotated in place over its first 2*half dims, one thread per
// pair: (j, j + half) when interleaved == 0 (HF), (2j, 2j + 1) when 1.
// backward: multiplies by the transpose instead (csrc/rope/apply.c).
__global__ void rope_kernel(float *x, const float *cos_t, const float *sin_t, int N, int nh, int hd, int half,
                            int interleaved, int backward) {
    const int step = interleaved ? 2 : 1, other = interleaved ? 1 : half;
    const size_t n = (size_t)N * nh * half;
    for (size_t p = grid_index(); p < n; p += grid_stride()) {
        const size_t head_row = p / half; // i * nh + h
        const int j = (int)(p % half);
        const size_t i = head_row / nh;
        float *v = x + head_row * hd;
        float a = v[j * step], b = v[j * step + other];
        const float c = cos_t[i * half + j], s = sin_t[i * half + j];
        if (backward)
            cepe_rope_rotate_backward(&a, &b, c, s);
        else
            cepe_rope_rotate(&a, &b, c, s);
        v[j * step] = a;
        v[j * step + other] = b;
    }
}

int cuda_rope_table(const cepe_backend *be, float *cos_t, float *sin_t, const double *pos,
                    const float *inv_freq, int N, int half, float mscale) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (N <= 0 || half <= 0) return 0;
    const size_t n = (size_t)N * half;
    rope_table_kernel<<<cuda_blocks(n, CUDA_THREADS), CUDA_THREADS, 0, st->stream>>>(
        cos_t, sin_t, pos, inv_freq, N, half, mscale);
    return cuda_launched(st, "rope_table");
}

static int rope_launch(const cepe_backend *be, float *x, const float *cos_t, const float *sin_t, int N,
                       int nh, int hd, int half, int interleaved, int backward) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (N <= 0 || nh <= 0 || half <= 0) return 0;
    if (2 * half > hd)
        return cuda_fail(st, CEPE_ERR_INVALID_ARG, "rope: %d pairs do not fit head_dim %d", half, hd);
    const size_t n = (size_t)N * nh * half;
    rope_kernel<<<cuda_blocks(n, CUDA_THREADS), CUDA_THREADS, 0, st->stream>>>(x, cos_t, sin_t, N, nh, hd,
                                                                               half, interleaved, backward);
    return cuda_launched(st, backward ? "rope_backward" : "rope");
}

int cuda_rope(const cepe_backend *be, float *x, const float *cos_t, const float *sin_t, int N, int nh, int hd,
              int half, int interleaved, int nt) {
    (void)nt;
    return rope_launch(be, x, cos_t, sin_t, N, nh, hd, half, interleaved, 0);
}

int cuda_rope_backward(const cepe_backend *be, float *dx, const float *cos_t, const float *sin_t, int N,
                       int nh, int hd, int half, int interleaved) {
    return rope_launch(be, dx, cos_t, sin_t, N, nh, hd, half, interleaved, 1);
}
