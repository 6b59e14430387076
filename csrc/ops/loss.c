/* loss.c — the training losses, forward and backward in one pass per row:
 * the LM cross-entropy with an ignore index, and CEPED's top-K KL
 * distillation term (spec CEPE.md §6.4).
 *
 * Each row's softmax is built from e_v = exp(z_v - max) in float (the
 * vectorized exp of elementwise.h) summed in double, so log-probabilities
 * stay exact to float rounding even for huge vocabularies, and the student's
 * remainder bucket is computed as (Σ_all e - Σ_top e) / Σ_all e from the very
 * same terms: no catastrophic cancellation in 1 - Σ q when the top-K holds
 * almost all the mass. */
#include <math.h>

#include "elementwise.h"
#include "ops.h"

/* Row max and Σ exp(z - max) (double accumulator). */
static double row_exp_sum(const float *z, int V, float *max_out) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int v = 0; v < V; v++) m = z[v] > m ? z[v] : m;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int v = 0; v < V; v++) sum += (double)cepe_exp_neg(z[v] - m);
    *max_out = m;
    return sum;
}

/* d[v] += coef * exp(z_v - m): the softmax part of a gradient. */
static void add_scaled_softmax(float *d, const float *z, int V, float m, float coef) {
#pragma omp simd
    for (int v = 0; v < V; v++) d[v] += coef * cepe_exp_neg(z[v] - m);
}

/* ------------------------------------------------------------- cross-entropy */

int cross_entropy_forward_backward(float *losses, float *dlogits, const float *logits, const int32_t *targets,
                                   int N, int V, float dloss_scale) {
    for (int i = 0; i < N; i++) /* validate first: an error leaves every output untouched */
        if (targets[i] != CEPE_IGNORE_INDEX && (targets[i] < 0 || targets[i] >= V)) return -1;
    for (int i = 0; i < N; i++) {
        const int t = targets[i];
        if (t == CEPE_IGNORE_INDEX) {
            losses[i] = 0.0f;
            continue;
        }
        const float *z = logits + (long)i * V;
        float m;
        const double sum = row_exp_sum(z, V, &m);
        losses[i] = (float)(log(sum) + (double)m - (double)z[t]); /* lse - z_t */
        if (dlogits) {
            float *d = dlogits + (long)i * V;
            add_scaled_softmax(d, z, V, m, (float)(dloss_scale / sum));
            d[t] -= dloss_scale;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ CEPED KL */

/* The reference (modeling_llama_flash.py, LlamaForCausalContextLM.forward):
 *   q = softmax(z)[index] (K), q_rem = 1 - Σ q;  p = teacher (K+1, fp16)
 *   smooth_δ: p, q <- (x + δ) / (1 + (K+1)δ) over all K+1 buckets
 *   drop:     the remainder dropped from both (unnormalized K-vectors)
 *   row loss = Σ_j p_j (log p_j - log q_j)   (KLDivLoss: 0 log 0 = 0)
 * Gradient: with g_j = ∂loss/∂q_j taken with q_rem as a free bucket, the
 * remainder's dependence 1 - Σ q turns it into w_j = (g_j - g_rem) q_j and
 *   ∂loss/∂z_v = Σ_{j: index_j = v} w_j - softmax_v Σ_j w_j,
 * exactly what autograd gives through gather (repeated ids add up). */
int kl_topk_forward_backward(float *losses, float *dlogits, const float *logits,
                             const uint16_t *teacher_probs_fp16, const int32_t *teacher_index, int N, int V,
                             int K, int mode, float delta, float dloss_scale) {
    if (K < 1 || (mode != CEPE_KL_SMOOTH && mode != CEPE_KL_DROP)) return -1;
    if (mode == CEPE_KL_SMOOTH && !(delta >= 0.0f)) return -1; /* also rejects NaN */
    for (long i = 0; i < (long)N * K; i++)
        if (teacher_index[i] < 0 || teacher_index[i] >= V) return -1;
    const double dd = delta, norm = 1.0 + (double)(K + 1) * dd; /* smoothing: (x + δ) / norm */
    for (int i = 0; i < N; i++) {
        const float *z = logits + (long)i * V;
        const int32_t *idx = teacher_index + (long)i * K;
        const uint16_t *tp = teacher_probs_fp16 + (long)i * (K + 1);
        float m;
        const double sum = row_exp_sum(z, V, &m), log_sum = log(sum);
        double loss = 0.0, top = 0.0, wsum = 0.0;
        for (int j = 0; j < K; j++) top += (double)cepe_exp_neg(z[idx[j]] - m);
        const double q_rem = top < sum ? (sum - top) / sum : 0.0; /* only repeated ids make it < 0 */
        double g_rem = 0.0; /* the remainder's ∂loss/∂q (smooth mode only) */
        if (mode == CEPE_KL_SMOOTH) {
            const double p = ((double)cepe_half_to_float(tp[K]) + dd) / norm, qs = (q_rem + dd) / norm;
            if (p > 0.0) { /* a zero teacher bucket adds nothing, not 0 * log 0 */
                loss += p * (log(p) - log(qs));
                g_rem = -p / (q_rem + dd); /* ∂(-p log((q+δ)/norm))/∂q */
            }
        }
        for (int j = 0; j < K; j++) {
            const double pt = (double)cepe_half_to_float(tp[j]);
            const double log_q = (double)z[idx[j]] - (double)m - log_sum; /* exact log-softmax */
            const double q = exp(log_q);
            double w; /* (g_j - g_rem) q_j */
            if (mode == CEPE_KL_DROP) {
                if (pt > 0.0) loss += pt * (log(pt) - log_q);
                w = -pt; /* g_j q_j = -p_j / q_j * q_j, finite even where q_j underflows */
            } else {
                const double p = (pt + dd) / norm;
                if (p > 0.0) loss += p * (log(p) - log((q + dd) / norm));
                const double ratio = dd > 0.0 ? q / (q + dd) : 1.0; /* q / (q + δ) */
                w = -p * ratio - g_rem * q;
            }
            wsum += w;
            if (dlogits) dlogits[(long)i * V + idx[j]] += (float)(dloss_scale * w);
        }
        losses[i] = (float)loss;
        if (dlogits) add_scaled_softmax(dlogits + (long)i * V, z, V, m, (float)(-dloss_scale * wsum / sum));
    }
    return 0;
}
