// cuda_loss.cu — the training losses (loss.c), forward and backward in one
// pass per row, one block per row: the LM cross-entropy with an ignore index
// and CEPED's top-K KL. As on the CPU, each row's softmax is built from
// e_v = exp(z_v - max) in float (elementwise.h's cepe_exp_neg) summed in
// double; the K teacher buckets are walked by one thread in the CPU's order,
// so repeated teacher ids add up exactly as there.
#include "cuda_common.cuh"
#include "ops/elementwise.h"
#include "ops/ops.h"

// Row max and Σ exp(z - max) in double over the block; every thread gets both.
static __device__ void row_exp_sum(const float *z, int V, float *max_out, double *sum_out) {
    __shared__ float redf[32];
    __shared__ double redd[32];
    float m = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) m = z[v] > m ? z[v] : m;
    m = block_max(m, redf);
    double sum = 0.0;
    for (int v = threadIdx.x; v < V; v += blockDim.x) sum += (double)cepe_exp_neg(z[v] - m);
    *max_out = m;
    *sum_out = block_sum(sum, redd);
}

// losses (N): -log softmax(logits)[target] (0 for ignored rows);
// dlogits (N, V) += dloss_scale (softmax - onehot(target)), or NULL.
// A target outside [0, V) (the caller checks them) flags the row and skips it.
__global__ void cross_entropy_kernel(float *losses, float *dlogits, const float *logits,
                                     const int32_t *targets, int V, float dloss_scale, unsigned *flags) {
    const size_t i = blockIdx.x;
    const int t = targets[i];
    if (t == CEPE_IGNORE_INDEX || t < 0 || t >= V) { // block-uniform exit
        if (threadIdx.x == 0) {
            losses[i] = t == CEPE_IGNORE_INDEX ? 0.0f : NAN;
            if (t != CEPE_IGNORE_INDEX) atomicOr(flags, CUDA_FLAG_TARGET);
        }
        return;
    }
    const float *z = logits + i * V;
    float m;
    double sum;
    row_exp_sum(z, V, &m, &sum);
    if (threadIdx.x == 0) losses[i] = (float)(log(sum) + (double)m - (double)z[t]); // lse - z_t
    if (!dlogits) return;
    float *d = dlogits + i * V;
    const float coef = (float)(dloss_scale / sum);
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float x = d[v] + coef * cepe_exp_neg(z[v] - m);
        if (v == t) x -= dloss_scale; // after the softmax part, as loss.c
        d[v] = x;
    }
}

// The CEPED KL of one row (loss.c's kl_topk_forward_backward, whose comment
// derives it): losses (N), dlogits (N, V) +=, logits (N, V), teacher_probs
// (N, K+1) fp16 bits, teacher_index (N, K).
__global__ void kl_topk_kernel(float *losses, float *dlogits, const float *logits,
                               const uint16_t *teacher_probs, const int32_t *teacher_index, int V, int K,
                               int mode, float delta, float dloss_scale, unsigned *flags) {
    __shared__ double row_wsum;
    const size_t i = blockIdx.x;
    const float *z = logits + i * V;
    const int32_t *idx = teacher_index + i * K;
    const uint16_t *tp = teacher_probs + i * (size_t)(K + 1);
    int bad = 0;
    for (int j = threadIdx.x; j < K; j += blockDim.x) bad |= idx[j] < 0 || idx[j] >= V;
    if (__syncthreads_or(bad)) { // block-uniform exit
        if (threadIdx.x == 0) {
            losses[i] = NAN;
            atomicOr(flags, CUDA_FLAG_TEACHER);
        }
        return;
    }
    float m;
    double sum;
    row_exp_sum(z, V, &m, &sum);
    if (threadIdx.x == 0) { // loss.c's loop, verbatim but for the thread
        const double dd = delta, norm = 1.0 + (double)(K + 1) * dd; // smoothing: (x + δ) / norm
        const double log_sum = log(sum);
        double loss = 0.0, top = 0.0, wsum = 0.0;
        for (int j = 0; j < K; j++) top += (double)cepe_exp_neg(z[idx[j]] - m);
        const double q_rem = top < sum ? (sum - top) / sum : 0.0; // only repeated ids make it < 0
        double g_rem = 0.0; // the remainder's ∂loss/∂q (smooth mode only)
        if (mode == CEPE_KL_SMOOTH) {
            const double p = ((double)cepe_half_to_float(tp[K]) + dd) / norm, qs = (q_rem + dd) / norm;
            if (p > 0.0) {
                loss += p * (log(p) - log(qs));
                g_rem = -p / (q_rem + dd);
            }
        }
        for (int j = 0; j < K; j++) {
            const double pt = (double)cepe_half_to_float(tp[j]);
            const double log_q = (double)z[idx[j]] - (double)m - log_sum; // exact log-softmax
            const double q = exp(log_q);
            double w; // (g_j - g_rem) q_j
            if (mode == CEPE_KL_DROP) {
                if (pt > 0.0) loss += pt * (log(pt) - log_q);
                w = -pt;
            } else {
                const double p = (pt + dd) / norm;
                if (p > 0.0) loss += p * (log(p) - log((q + dd) / norm));
                const double ratio = dd > 0.0 ? q / (q + dd) : 1.0;
                w = -p * ratio - g_rem * q;
            }
            wsum += w;
            if (dlogits) dlogits[i * V + idx[j]] += (float)(dloss_scale * w);
        }
        losses[i] = (float)loss;
        row_wsum = wsum;
    }
    __syncthreads(); // the scatter above lands before the softmax part, as in loss.c
    if (!dlogits) return;
    float *d = dlogits + i * V;
    const float coef = (float)(-dloss_scale * row_wsum / sum);
    for (int v = threadIdx.x; v < V; v += blockDim.x) d[v] += coef * cepe_exp_neg(z[v] - m);
}

int cuda_cross_entropy(const cepe_backend *be, float *losses, float *dlogits, const float *logits,
                       const int32_t *targets, int N, int V, float dloss_scale) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (N <= 0) return 0;
    if (V <= 0) return cuda_fail(st, CEPE_ERR_INVALID_ARG, "cross-entropy: V = %d", V);
    cross_entropy_kernel<<<N, CUDA_THREADS, 0, st->stream>>>(losses, dlogits, logits, targets, V, dloss_scale,
                                                             st->dev_flags);
    return cuda_launched(st, "cross_entropy");
}

int cuda_kl_topk(const cepe_backend *be, float *losses, float *dlogits, const float *logits,
                 const uint16_t *probs, const int32_t *index, int N, int V, int K, int mode, float delta,
                 float dloss_scale) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    // as loss.c: a bad mode, K or delta writes nothing (the indices are checked on the device)
    if (K < 1 || (mode != CEPE_KL_SMOOTH && mode != CEPE_KL_DROP) ||
        (mode == CEPE_KL_SMOOTH && !(delta >= 0.0f)))
        return cuda_fail(st, CEPE_ERR_INVALID_ARG, "distillation KL: bad mode %d, K %d or delta %g", mode, K,
                         (double)delta);
    if (N <= 0) return 0;
    kl_topk_kernel<<<N, CUDA_THREADS, 0, st->stream>>>(losses, dlogits, logits, probs, index, V, K, mode,
                                                       delta, dloss_scale, st->dev_flags);
    return cuda_launched(st, "kl_topk");
}
