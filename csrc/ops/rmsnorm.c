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
