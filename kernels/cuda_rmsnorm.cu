// cuda_rmsnorm.cu — LLaMA RMSNorm and its backward (both in rmsnorm.c on
// the CPU): one block per row, the scale from elementwise.h's
// cepe_rms_inv. The weight gradient, a sum over rows, is a second kernel
// that walks columns, so it needs no atomics and adds in a fixed order.
#include "cuda_common.cuh"
#include "ops/elementwise.h"

// out (N, C) = inp / rms(inp) * w (C); in place (out == inp) is fine
__global__ void rmsnorm_kernel(float *out, const float *inp, const float *w, int C, float eps) {
    __shared__ float red[32];
    const float *x = inp + (size_t)blockIdx.x * C;
    float *y = out + (size_t)blockIdx.x * C;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) ss += x[j] * x[j];
    const float r = cepe_rms_inv(block_sum(ss, red), C, eps);
    for (int j = threadIdx.x; j < C; j += blockDim.x) y[j] = (x[j] * r) * w[j];
}

// dinp (N, C) += r w dy - (r³ / C) x Σ(dy w x), r = the forward's scale,
// kept in rstd (N) for the weight gradient (when rstd != NULL)
__global__ void rmsnorm_backward_kernel(float *dinp, float *rstd, const float *dout, const float *inp,
                                        const float *w, int C, float eps) {
    __shared__ float red[32];
    const size_t row = blockIdx.x;
    const float *x = inp + row * C, *dy = dout + row * C;
    float ss = 0.0f, dot = 0.0f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        ss += x[j] * x[j];
        dot += dy[j] * w[j] * x[j];
    }
    ss = block_sum(ss, red);
    dot = block_sum(dot, red);
    const float r = cepe_rms_inv(ss, C, eps);
    if (rstd && threadIdx.x == 0) rstd[row] = r;
    if (!dinp) return;
    float *dx = dinp + row * C;
    const float coef = r * r * r * dot / (float)C;
    for (int j = threadIdx.x; j < C; j += blockDim.x) dx[j] += r * w[j] * dy[j] - coef * x[j];
}

// dweight (C) += Σ_rows dy ∘ (x r). A block owns 32 columns; its 8 warps
// take every 8th row (lane = column: coalesced reads), then sum in order.
#define DW_COLS 32
#define DW_ROWS 8
__global__ void rmsnorm_dweight_kernel(float *dweight, const float *dout, const float *inp, const float *rstd,
                                       int N, int C) {
    __shared__ float part[DW_ROWS][DW_COLS + 1];
    const int col = blockIdx.x * DW_COLS + threadIdx.x % DW_COLS, lane_row = threadIdx.x / DW_COLS;
    float acc = 0.0f;
    if (col < C)
        for (int i = lane_row; i < N; i += DW_ROWS) {
            const size_t at = (size_t)i * C + col;
            acc += dout[at] * (inp[at] * rstd[i]);
        }
    part[lane_row][threadIdx.x % DW_COLS] = acc;
    __syncthreads();
    if (lane_row == 0 && col < C) {
        float sum = 0.0f;
        for (int k = 0; k < DW_ROWS; k++) sum += part[k][threadIdx.x];
        dweight[col] += sum;
    }
}

int cuda_rmsnorm(const cepe_backend *be, float *out, const float *inp, const float *w, int N, int C,
                 float eps, int nt) {
    (void)nt;
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (N <= 0 || C <= 0) return 0;
    rmsnorm_kernel<<<N, CUDA_THREADS, 0, st->stream>>>(out, inp, w, C, eps);
    return cuda_launched(st, "rmsnorm");
}

int cuda_rmsnorm_backward(const cepe_backend *be, float *dinp, float *dweight, const float *dout,
                          const float *inp, const float *weight, int N, int C, float eps) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (N <= 0 || C <= 0 || (!dinp && !dweight)) return 0;
    float *rstd = nullptr;
    if (dweight && !(rstd = (float *)cuda_scratch(st, sizeof(float) * (size_t)N, "rmsnorm_backward")))
        return CEPE_ERR_OUT_OF_MEMORY;
    rmsnorm_backward_kernel<<<N, CUDA_THREADS, 0, st->stream>>>(dinp, rstd, dout, inp, weight, C, eps);
    int rc = cuda_launched(st, "rmsnorm_backward");
    if (!rc && dweight) {
        rmsnorm_dweight_kernel<<<(C + DW_COLS - 1) / DW_COLS, DW_COLS * DW_ROWS, 0, st->stream>>>(
            dweight, dout, inp, rstd, N, C);
        rc = cuda_launched(st, "rmsnorm_backward (dweight)");
    }
    cuda_scratch_free(st, rstd);
    return rc;
}
