/* swiglu.c — the gated activation of LLaMA's MLP. */

#include "elementwise.h"
#include "ops.h"

void swiglu_forward(float *out, const float *gate, const float *up, long N, int n_threads) {
#pragma omp parallel for simd num_threads(n_threads) if (N > 65536)
    for (long i = 0; i < N; i++) out[i] = cepe_swiglu(gate[i], up[i]);
}

/* ------------------------------------------------------------ backward */

/* The backward of swiglu_forward; the per-element
 * derivative lives in elementwise.h for the CUDA kernels too. */
void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                     long N) {
#pragma omp simd
    for (long i = 0; i < N; i++) cepe_swiglu_backward(gate[i], up[i], dout[i], &dgate[i], &dup[i]);
}
