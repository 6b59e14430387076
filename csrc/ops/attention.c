/* attention.c — scaled dot-product attention with an online softmax.
 *
 * One kernel serves the decoder (causal, optional sliding window), the CEPE
 * encoder (bidirectional, padded keys masked) and cross-attention (no
 * causality, padded context masked). Keys are visited in blocks of
 * ATT_KBLOCK; a query keeps only its running max, denominator and output
 * accumulator, so memory is O(block) per thread whatever Tk is (CEPE feeds
 * 10^5-token contexts through here). GQA: query head h reads kv head
 * h / (H / KVH), as HF's repeat_kv does.
 *
 * Blocks of many queries (prefill, encoder) transpose each key block once so
 * that Q·Kᵀ runs as broadcast-FMAs across 64 keys; a lone query (decoding)
 * takes plain dot products instead, since a transpose would double its reads. */
#include <math.h>
#include <string.h>

#include "../blas.h"
#include "elementwise.h"
#include "ops.h"

/* 128 queries x 256 keys per block. 128 x 128 was measured fastest of 32..256
 * with 256-bit vectors (1.9x over 32 x 64 for cross-attention); with 512-bit
 * ones 256 keys ran cross-attention (512 x 8192) 3-5 % and 256 x 256 encoder
 * blocks 5-8 % faster, causal 512 x 512 the same. */
#define ATT_KBLOCK 256
#define ATT_QBLOCK 128
#define ATT_MAX_HD 256

/* Visible key range [lo, hi) for the query in slot `qs`. */
static void key_range(const attention_shape *s, int qs, int *lo, int *hi) {
    cepe_key_range(s->Tk, s->causal, s->window, qs, lo, hi); /* elementwise.h, shared with CUDA */
}

typedef struct {
    float S[ATT_QBLOCK][ATT_KBLOCK]; /* scores, then probabilities, of a query block */
    float kt[ATT_MAX_HD][ATT_KBLOCK]; /* key block, transposed */
    float sc[ATT_KBLOCK];
    int kvalid[ATT_KBLOCK];
    float m[ATT_QBLOCK], l[ATT_QBLOCK];
    float acc[ATT_QBLOCK][ATT_MAX_HD];
} att_scratch;

/* Scores of one query against keys j0..j0+nk-1 into sc (masked = -inf);
 * returns the block max. kvalid[jj]: key j0+jj is not padding. */
static float block_scores(const attention_shape *s, const att_scratch *w, float *sc, const float *qi,
                          const float *kb, const int *kvalid, int j0, int nk, int lo, int hi, int transposed) {
    const int hd = s->hd;
    if (transposed) {
        /* 16 keys at a time so the accumulators stay in registers over d */
        for (int g = 0; g < ATT_KBLOCK; g += 16) {
            float acc[16] = {0};
            for (int d = 0; d < hd; d++) {
                const float qd = qi[d];
                const float *kd = &w->kt[d][g];
#pragma omp simd
                for (int u = 0; u < 16; u++) acc[u] += qd * kd[u];
            }
            for (int u = 0; u < 16; u++) sc[g + u] = acc[u];
        }
    } else {
        for (int jj = 0; jj < nk; jj++) {
            const float *kj = kb + (long)(j0 + jj) * s->kv_rstride;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < hd; d++) dot += qi[d] * kj[d];
            sc[jj] = dot;
        }
    }
    const float scale = s->scale;
    float bmax = -INFINITY;
#pragma omp simd reduction(max : bmax)
    for (int jj = 0; jj < nk; jj++) {
        const int j = j0 + jj;
        const int ok = (j >= lo) & (j < hi) & kvalid[jj];
        sc[jj] = ok ? sc[jj] * scale : -INFINITY;
        bmax = sc[jj] > bmax ? sc[jj] : bmax;
    }
    return bmax;
}

/* The online softmax's three row passes, kept apart so that each stays one
 * plain vectorizable loop (inlined into the row loop, gcc gave up on them). */
CEPE_NOINLINE static float row_max(const float *row, int n) {
    float bmax = -INFINITY;
#pragma omp simd reduction(max : bmax)
    for (int jj = 0; jj < n; jj++) bmax = row[jj] > bmax ? row[jj] : bmax;
    return bmax;
}

/* Masks keys outside [l0, h0) or padding to -inf; returns the row's max. */
CEPE_NOINLINE static float row_mask_max(float *row, int n, int j0, int l0, int h0, const int *kvalid) {
    float bmax = -INFINITY;
#pragma omp simd reduction(max : bmax)
    for (int jj = 0; jj < n; jj++) {
        const int j = j0 + jj;
        const int ok = (j >= l0) & (j < h0) & kvalid[jj];
        row[jj] = ok ? row[jj] : -INFINITY;
        bmax = row[jj] > bmax ? row[jj] : bmax;
    }
    return bmax;
}

/* row = exp(row - m) (masked: exp(-inf) = 0); returns the row's sum. */
CEPE_NOINLINE static float row_exp_sum(float *row, int n, float m) {
    float psum = 0.0f;
#pragma omp simd reduction(+ : psum)
    for (int jj = 0; jj < n; jj++) {
        row[jj] = cepe_exp_neg(row[jj] - m);
        psum += row[jj];
    }
    return psum;
}

/* A block of queries as two small GEMMs per key block (S = Q·Kᵀ, then
 * O += P·V), flash-attention style, with the online softmax between them. */
static void attend_block_gemm(float *out, const float *q, const float *k, const float *v, const uint8_t *valid,
                              const attention_shape *s, int b, int h, int t0, int nq, att_scratch *w) {
    const int hd = s->hd, kvh = h / (s->H / s->KVH);
    const float *qb = q + b * s->q_bstride + (long)t0 * s->q_rstride + (long)h * hd;
    const float *kb = k + b * s->kv_bstride + (long)kvh * hd;
    const float *vb = v + b * s->kv_bstride + (long)kvh * hd;
    int lo_all = s->Tk, hi_all = 0, lo[ATT_QBLOCK], hi[ATT_QBLOCK];
    for (int i = 0; i < nq; i++) {
        key_range(s, s->q_offset + t0 + i, &lo[i], &hi[i]);
        lo_all = lo[i] < lo_all ? lo[i] : lo_all;
        hi_all = hi[i] > hi_all ? hi[i] : hi_all;
        w->m[i] = -INFINITY;
        w->l[i] = 0.0f;
        memset(w->acc[i], 0, sizeof(float) * (size_t)hd);
    }
    for (int j0 = lo_all; j0 < hi_all; j0 += ATT_KBLOCK) {
        const int nk = hi_all - j0 < ATT_KBLOCK ? hi_all - j0 : ATT_KBLOCK;
        int all_valid = 1;
        for (int jj = 0; jj < nk; jj++) {
            w->kvalid[jj] = valid ? valid[j0 + jj] != 0 : 1;
            all_valid &= w->kvalid[jj];
        }
        /* The causal diagonal: when the first half of the rows sees only
         * part of this block, its scores and P·V cover only the keys it can
         * see, rounded up to 16 (rows [0, split) use nk_lo columns, the rest
         * all nk): up to a quarter of the diagonal block's work saved. */
        int split = 0, nk_lo = nk;
        if (nq >= 16) {
            int ext = 0;
            for (int i = 0; i < nq / 2; i++) {
                const int e = (hi[i] < j0 + nk ? hi[i] : j0 + nk) - j0;
                ext = e > ext ? e : ext;
            }
            ext = (ext + 15) / 16 * 16; /* whole SIMD widths */
            if (ext < nk) split = nq / 2, nk_lo = ext;
        }
        if (split && nk_lo > 0)
            CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, split, nk_lo, hd, s->scale, qb, (int)s->q_rstride,
                       kb + (long)j0 * s->kv_rstride, (int)s->kv_rstride, 0.0f, &w->S[0][0], ATT_KBLOCK);
        CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, nq - split, nk, hd, s->scale,
                   qb + (long)split * s->q_rstride, (int)s->q_rstride, kb + (long)j0 * s->kv_rstride,
                   (int)s->kv_rstride, 0.0f, &w->S[split][0], ATT_KBLOCK);
        for (int i = 0; i < nq; i++) {
            float *row = w->S[i];
            const int l0 = lo[i], h0 = hi[i], n = i < split ? nk_lo : nk;
            if (n == 0) continue; /* sees nothing here, and takes no part in P·V below */
            const float bmax = all_valid && l0 <= j0 && h0 >= j0 + n ? row_max(row, n) /* every key visible */
                                                                      : row_mask_max(row, n, j0, l0, h0, w->kvalid);
            if (bmax == -INFINITY) { /* nothing visible: a zero row adds nothing */
                memset(row, 0, sizeof(float) * (size_t)n);
                continue;
            }
            const float corr = cepe_online_softmax_rescale(&w->m[i], &w->l[i], bmax);
            if (corr != 1.0f)
                for (int d = 0; d < hd; d++) w->acc[i][d] *= corr;
            w->l[i] += row_exp_sum(row, n, w->m[i]);
        }
        if (split && nk_lo > 0)
            CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, split, hd, nk_lo, 1.0f, &w->S[0][0], ATT_KBLOCK,
                       vb + (long)j0 * s->kv_rstride, (int)s->kv_rstride, 1.0f, &w->acc[0][0], ATT_MAX_HD);
        CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq - split, hd, nk, 1.0f, &w->S[split][0], ATT_KBLOCK,
                   vb + (long)j0 * s->kv_rstride, (int)s->kv_rstride, 1.0f, &w->acc[split][0], ATT_MAX_HD);
    }
    for (int i = 0; i < nq; i++) {
        float *o = out + ((long)b * s->Tq + t0 + i) * (long)s->H * hd + (long)h * hd;
        const float inv = w->l[i] > 0.0f ? 1.0f / w->l[i] : 0.0f; /* no visible key: zero output */
        for (int d = 0; d < hd; d++) o[d] = w->acc[i][d] * inv;
    }
}

/* One (batch row, head, block of queries) task. */
static void attend_block(float *out, const float *q, const float *k, const float *v, const uint8_t *key_valid,
                         const attention_shape *s, int b, int h, int t0, int nq, att_scratch *w) {
    const int hd = s->hd, kvh = h / (s->H / s->KVH);
    const float *kb = k + b * s->kv_bstride + (long)kvh * hd;
    const float *vb = v + b * s->kv_bstride + (long)kvh * hd;
    const uint8_t *valid = key_valid ? key_valid + b * s->valid_bstride : NULL;
    const int transposed = nq >= 4;

    int lo_all = s->Tk, hi_all = 0;
    for (int i = 0; i < nq; i++) {
        int lo, hi;
        key_range(s, s->q_offset + t0 + i, &lo, &hi);
        lo_all = lo < lo_all ? lo : lo_all;
        hi_all = hi > hi_all ? hi : hi_all;
        w->m[i] = -INFINITY;
        w->l[i] = 0.0f;
        memset(w->acc[i], 0, sizeof(float) * (size_t)hd);
    }
    for (int j0 = lo_all; j0 < hi_all; j0 += ATT_KBLOCK) {
        const int nk = hi_all - j0 < ATT_KBLOCK ? hi_all - j0 : ATT_KBLOCK;
        for (int jj = 0; jj < nk; jj++) w->kvalid[jj] = valid ? valid[j0 + jj] != 0 : 1;
        if (transposed)
            for (int jj = 0; jj < ATT_KBLOCK; jj++) {
                const float *kj = kb + (long)(j0 + jj) * s->kv_rstride;
                for (int d = 0; d < hd; d++) w->kt[d][jj] = jj < nk ? kj[d] : 0.0f;
            }
        for (int i = 0; i < nq; i++) {
            int lo, hi;
            key_range(s, s->q_offset + t0 + i, &lo, &hi);
            if (hi <= j0 || lo >= j0 + nk) continue; /* block outside this query's range */
            const float *qi = q + b * s->q_bstride + (long)(t0 + i) * s->q_rstride + (long)h * hd;
            float *sc = w->sc;
            const float bmax = block_scores(s, w, sc, qi, kb, w->kvalid, j0, nk, lo, hi, transposed);
            if (bmax == -INFINITY) continue; /* nothing visible in this block */
            const float corr = cepe_online_softmax_rescale(&w->m[i], &w->l[i], bmax);
            float *a = w->acc[i];
            if (corr != 1.0f)
                for (int d = 0; d < hd; d++) a[d] *= corr;
            w->l[i] += row_exp_sum(sc, nk, w->m[i]); /* masked: exp(-inf) = 0 */
            for (int jj = 0; jj < nk; jj++) {
                const float p = sc[jj];
                if (p == 0.0f) continue; /* masked or underflowed: skip the row of V */
                const float *vj = vb + (long)(j0 + jj) * s->kv_rstride;
#pragma omp simd
                for (int d = 0; d < hd; d++) a[d] += p * vj[d];
            }
        }
    }
    for (int i = 0; i < nq; i++) {
        float *o = out + ((long)b * s->Tq + t0 + i) * (long)s->H * hd + (long)h * hd;
        const float inv = w->l[i] > 0.0f ? 1.0f / w->l[i] : 0.0f; /* no visible key: zero output */
        for (int d = 0; d < hd; d++) o[d] = w->acc[i][d] * inv;
    }
}

/* Thread-local (not stack: ~100 KB; not malloc: no allocation per token). */
static _Thread_local att_scratch tls_scratch;
CEPE_OPAQUE static att_scratch *thread_scratch(void) { return &tls_scratch; }

void attention_forward(float *out, const float *q, const float *k, const float *v, const uint8_t *key_valid,
                       const attention_shape *s, int n_threads) {
    const int n_qblocks = (s->Tq + ATT_QBLOCK - 1) / ATT_QBLOCK;
    const long n_tasks = (long)s->B * s->H * n_qblocks;
#pragma omp parallel num_threads(n_threads) if (n_tasks > 1 && (long)s->Tq * s->Tk > 4096)
    {
        att_scratch *w = thread_scratch();
#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < n_tasks; task++) {
            /* Causal: a head's later query blocks see more keys; taking
             * them first leaves short tasks to even out the threads' finish
             * (2.5 % off a 512-token prefill's attention; all heads' long
             * blocks first gained less). */
            const int qr = (int)(task % n_qblocks), qb = s->causal ? n_qblocks - 1 - qr : qr;
            const int h = (int)((task / n_qblocks) % s->H);
            const int b = (int)(task / ((long)n_qblocks * s->H));
            const int t0 = qb * ATT_QBLOCK;
            const int nq = s->Tq - t0 < ATT_QBLOCK ? s->Tq - t0 : ATT_QBLOCK;
            if (nq >= 8)
                attend_block_gemm(out, q, k, v, key_valid ? key_valid + b * s->valid_bstride : NULL, s, b, h, t0,
                                  nq, w);
            else
                attend_block(out, q, k, v, key_valid, s, b, h, t0, nq, w);
        }
    }
}
