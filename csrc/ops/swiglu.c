/* swiglu.c — the gated activation of LLaMA's MLP. */
#include "elementwise.h"
#include "ops.h"

void swiglu_forward(float *out, const float *gate, const float *up, long N, int n_threads) {
#pragma omp parallel for simd num_threads(n_threads) if (N > 65536)
    for (long i = 0; i < N; i++) out[i] = cepe_swiglu(gate[i], up[i]);
}
