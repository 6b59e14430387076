/* rmsnorm.c — LLaMA RMSNorm: y = x / sqrt(mean(x²) + eps) * w, in fp32
 * (HF upcasts to fp32 for the variance too). */

#include "elementwise.h"
#include "ops.h"

void rmsnorm_forward(float *out, const float *inp, const float *weight, int N, int C, float eps,
                     int n_threads) {
#pragma omp parallel for num_threads(n_threads) if (N > 64)
    for (int i = 0; i < N; i++) {
        const float *x = inp + (long)i * C;
        float *y = out + (long)i * C;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int j = 0; j < C; j++) ss += x[j] * x[j];
        float r = cepe_rms_inv(ss, C, eps);
#pragma omp simd
        for (int j = 0; j < C; j++) y[j] = (x[j] * r) * weight[j];
    }
}

/* ------------------------------------------------------------ backward */

/* The backward of rmsnorm_forward:
 * y = x r w with r = 1 / sqrt(mean(x²) + eps), so
 *   dx = r (w ∘ dy) - (r³ / C) x Σ_k (dy_k w_k x_k),   dw = Σ_rows dy ∘ x r. */
void rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                      int N, int C, float eps) {
    for (int i = 0; i < N; i++) {
        const float *x = inp + (long)i * C, *dy = dout + (long)i * C;
        float ss = 0.0f, dot = 0.0f;
#pragma omp simd reduction(+ : ss, dot)
        for (int j = 0; j < C; j++) {
            ss += x[j] * x[j];
            dot += dy[j] * weight[j] * x[j];
        }
        const float r = cepe_rms_inv(ss, C, eps); /* the forward's exact scale */
        if (dinp) {
            float *dx = dinp + (long)i * C;
            const float coef = r * r * r * dot / (float)C;
#pragma omp simd
            for (int j = 0; j < C; j++) dx[j] += r * weight[j] * dy[j] - coef * x[j];
        }
        if (dweight) {
#pragma omp simd
            for (int j = 0; j < C; j++) dweight[j] += dy[j] * (x[j] * r);
        }
    }
}
