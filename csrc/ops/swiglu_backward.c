/* swiglu_backward.c — backward of swiglu_forward (swiglu.c); the per-element
 * derivative lives in elementwise_backward.h for the CUDA kernels too. */
#include "elementwise_backward.h"
#include "ops_backward.h"

void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, long N) {
#pragma omp simd
    for (long i = 0; i < N; i++) cepe_swiglu_backward(gate[i], up[i], dout[i], &dgate[i], &dup[i]);
}
