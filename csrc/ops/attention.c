/* attention.c — scaled dot-product attention with an online softmax.
 *
 * One kernel serves the decoder (causal, optional sliding window), and later
 * the encoder (bidirectional, padded keys masked) and cross-attention (no
 * causality, padded context masked). Keys are visited in blocks of
 * ATT_KBLOCK; a query keeps only its running max, denominator and output
 * accumulator, so memory is O(block) per thread whatever Tk is (CEPE feeds
 * 10^5-token contexts through here). GQA: query head h reads kv head
 * h / (H / KVH), as HF's repeat_kv does. */
#include <math.h>
#include <string.h>

#include "elementwise.h"
#include "ops.h"

#define ATT_KBLOCK 64
#define ATT_QBLOCK 8

/* Visible key range [lo, hi) for the query in slot `qs`. */
static void key_range(const attention_shape *s, int qs, int *lo, int *hi) {
    *lo = 0;
    *hi = s->Tk;
    if (s->causal && qs + 1 < *hi) *hi = qs + 1;
    if (s->window > 0 && qs - s->window + 1 > *lo) *lo = qs - s->window + 1;
}

void attention_forward(float *out, const float *q, const float *k, const float *v,
                       const uint8_t *key_valid, const attention_shape *s, int n_threads) {
    const int H = s->H, hd = s->hd, group = s->H / s->KVH;
    const int n_qblocks = (s->Tq + ATT_QBLOCK - 1) / ATT_QBLOCK;
    const long n_tasks = (long)s->B * H * n_qblocks;

#pragma omp parallel num_threads(n_threads) if (n_tasks > 1 && (long)s->Tq * s->Tk > 4096)
    {
        /* Per-thread scratch: scores of one query block against one key block,
         * plus the running softmax state and accumulators. */
        float scores[ATT_QBLOCK][ATT_KBLOCK];
        float m[ATT_QBLOCK], l[ATT_QBLOCK];
        float acc[ATT_QBLOCK][256];

#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < n_tasks; task++) {
            const int qb = (int)(task % n_qblocks);
            const int h = (int)((task / n_qblocks) % H);
            const int b = (int)(task / ((long)n_qblocks * H));
            const int kvh = h / group;
            const int t0 = qb * ATT_QBLOCK;
            const int nq = s->Tq - t0 < ATT_QBLOCK ? s->Tq - t0 : ATT_QBLOCK;
            const float *kb = k + b * s->kv_bstride + (long)kvh * hd;
            const float *vb = v + b * s->kv_bstride + (long)kvh * hd;
            const uint8_t *valid = key_valid ? key_valid + b * s->valid_bstride : NULL;

            /* The union of the block's key ranges; per-query limits apply below. */
            int lo_all = s->Tk, hi_all = 0;
            for (int i = 0; i < nq; i++) {
                int lo, hi;
                key_range(s, s->q_offset + t0 + i, &lo, &hi);
                if (lo < lo_all) lo_all = lo;
                if (hi > hi_all) hi_all = hi;
                m[i] = -INFINITY;
                l[i] = 0.0f;
                memset(acc[i], 0, sizeof(float) * (size_t)hd);
            }

            for (int j0 = lo_all; j0 < hi_all; j0 += ATT_KBLOCK) {
                const int nk = hi_all - j0 < ATT_KBLOCK ? hi_all - j0 : ATT_KBLOCK;
                for (int i = 0; i < nq; i++) {
                    const float *qi = q + b * s->q_bstride + (long)(t0 + i) * s->q_rstride + (long)h * hd;
                    int lo, hi;
                    key_range(s, s->q_offset + t0 + i, &lo, &hi);
                    float bmax = -INFINITY;
                    for (int jj = 0; jj < nk; jj++) {
                        const int j = j0 + jj;
                        float sc = -INFINITY;
                        if (j >= lo && j < hi && (!valid || valid[j])) {
                            const float *kj = kb + (long)j * s->kv_rstride;
                            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                            for (int d = 0; d < hd; d++) dot += qi[d] * kj[d];
                            sc = dot * s->scale;
                        }
                        scores[i][jj] = sc;
                        if (sc > bmax) bmax = sc;
                    }
                    if (bmax == -INFINITY) continue; /* nothing visible in this block */
                    float corr = cepe_online_softmax_rescale(&m[i], &l[i], bmax);
                    float *a = acc[i];
                    if (corr != 1.0f)
                        for (int d = 0; d < hd; d++) a[d] *= corr;
                    float psum = 0.0f;
                    for (int jj = 0; jj < nk; jj++) {
                        if (scores[i][jj] == -INFINITY) continue;
                        const float p = expf(scores[i][jj] - m[i]);
                        psum += p;
                        const float *vj = vb + (long)(j0 + jj) * s->kv_rstride;
#pragma omp simd
                        for (int d = 0; d < hd; d++) a[d] += p * vj[d];
                    }
                    l[i] += psum;
                }
            }

            for (int i = 0; i < nq; i++) {
                float *o = out + ((long)b * s->Tq + t0 + i) * (long)H * hd + (long)h * hd;
                const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
                for (int d = 0; d < hd; d++) o[d] = acc[i][d] * inv;
            }
        }
    }
}
