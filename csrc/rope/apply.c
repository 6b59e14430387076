/* apply.c — the RoPE op (declared with the other ops in ops/ops.h): applying
 * rotary position embeddings and their backward, in either pair layout
 * (rotate-half for HF checkpoints, interleaved for Meta/GGUF weights). The
 * per-pair frequencies and magnitude come from frequencies.c. */
#include <math.h>

#include "../ops/elementwise.h"
#include "../ops/ops.h"

void rope_table(float *cos_out, float *sin_out, const double *pos, const float *inv_freq, int N, int half,
                float mscale) {
    /* Angles in double: positions reach 10^5..10^6 where fp32 products lose
     * whole radians of phase. */
    for (int i = 0; i < N; i++)
        for (int j = 0; j < half; j++) {
            double a = pos[i] * (double)inv_freq[j];
            cos_out[(long)i * half + j] = (float)cos(a) * mscale; /* HF: cos * attention_scaling */
            sin_out[(long)i * half + j] = (float)sin(a) * mscale;
        }
}

void rope_forward(float *x, const float *cos_t, const float *sin_t, int N, int nh, int hd, int half,
                  int interleaved, int n_threads) {
    const int step = interleaved ? 2 : 1, other = interleaved ? 1 : half;
#pragma omp parallel for num_threads(n_threads) if (N * nh > 256)
    for (int i = 0; i < N; i++) {
        const float *c = cos_t + (long)i * half, *s = sin_t + (long)i * half;
        for (int h = 0; h < nh; h++) {
            float *v = x + ((long)i * nh + h) * hd;
            for (int j = 0; j < half; j++) cepe_rope_rotate(&v[j * step], &v[j * step + other], c[j], s[j]);
        }
    }
}

/* ------------------------------------------------------------ backward */

/* The backward of rope_forward, in place. Each pair
 * was multiplied by [[c, -s], [s, c]]; its gradient is multiplied by the
 * transpose. Same pair layouts as the forward. */
void rope_backward(float *dx, const float *cos_t, const float *sin_t, int N, int nh, int hd, int half,
                   int interleaved) {
    const int step = interleaved ? 2 : 1, other = interleaved ? 1 : half;
    for (int i = 0; i < N; i++) {
        const float *c = cos_t + (long)i * half, *s = sin_t + (long)i * half;
        for (int h = 0; h < nh; h++) {
            float *v = dx + ((long)i * nh + h) * hd;
            for (int j = 0; j < half; j++)
                cepe_rope_rotate_backward(&v[j * step], &v[j * step + other], c[j], s[j]);
        }
    }
}
