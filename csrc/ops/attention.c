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
#include <stdlib.h>
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

/* Visible key range [lo, hi) for the query in slot `qs`. Both ends are
 * non-decreasing in qs, which the block skipping relies on. */
static void key_range(const attention_shape *s, int qs, int *lo, int *hi) {
    cepe_key_range(s->Tk, s->causal, s->window, qs, lo, hi); /* elementwise.h, shared with CUDA */
}

typedef struct {
    float S[ATT_QBLOCK][ATT_KBLOCK];  /* scores, then probabilities, of a query block */
    float kt[ATT_MAX_HD][ATT_KBLOCK]; /* key block, transposed */
    float sc[ATT_KBLOCK];
    int kvalid[ATT_KBLOCK];
    float m[ATT_QBLOCK], l[ATT_QBLOCK];
    float acc[ATT_QBLOCK][ATT_MAX_HD];
} att_scratch;

/* Scores of one query against keys j0..j0+nk-1 into sc (masked = -inf);
 * returns the block max. kvalid[jj]: key j0+jj is not padding. */
static float block_scores(const attention_shape *s, const att_scratch *w, float *sc, const float *qi,
                          const float *kb, const int *kvalid, int j0, int nk, int lo, int hi,
                          int transposed) {
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
/* out may be NULL (only lse wanted: no P·V, so no bound on hd); lse (B, Tq, H)
 * may be NULL (inference). */
static void attend_block_gemm(float *out, float *lse, const float *q, const float *k, const float *v,
                              const uint8_t *valid, const attention_shape *s, int b, int h, int t0, int nq,
                              att_scratch *w) {
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
        if (out) memset(w->acc[i], 0, sizeof(float) * (size_t)hd);
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
            CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, split, nk_lo, hd, s->scale, qb,
                       (int)s->q_rstride, kb + (long)j0 * s->kv_rstride, (int)s->kv_rstride, 0.0f,
                       &w->S[0][0], ATT_KBLOCK);
        CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, nq - split, nk, hd, s->scale,
                   qb + (long)split * s->q_rstride, (int)s->q_rstride, kb + (long)j0 * s->kv_rstride,
                   (int)s->kv_rstride, 0.0f, &w->S[split][0], ATT_KBLOCK);
        for (int i = 0; i < nq; i++) {
            float *row = w->S[i];
            const int l0 = lo[i], h0 = hi[i], n = i < split ? nk_lo : nk;
            if (n == 0) continue; /* sees nothing here, and takes no part in P·V below */
            const float bmax = all_valid && l0 <= j0 && h0 >= j0 + n
                                   ? row_max(row, n) /* every key visible */
                                   : row_mask_max(row, n, j0, l0, h0, w->kvalid);
            if (bmax == -INFINITY) { /* nothing visible: a zero row adds nothing */
                memset(row, 0, sizeof(float) * (size_t)n);
                continue;
            }
            const float corr = cepe_online_softmax_rescale(&w->m[i], &w->l[i], bmax);
            if (out && corr != 1.0f)
                for (int d = 0; d < hd; d++) w->acc[i][d] *= corr;
            w->l[i] += row_exp_sum(row, n, w->m[i]);
        }
        if (!out) continue;
        if (split && nk_lo > 0)
            CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, split, hd, nk_lo, 1.0f, &w->S[0][0],
                       ATT_KBLOCK, vb + (long)j0 * s->kv_rstride, (int)s->kv_rstride, 1.0f, &w->acc[0][0],
                       ATT_MAX_HD);
        CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq - split, hd, nk, 1.0f, &w->S[split][0],
                   ATT_KBLOCK, vb + (long)j0 * s->kv_rstride, (int)s->kv_rstride, 1.0f, &w->acc[split][0],
                   ATT_MAX_HD);
    }
    for (int i = 0; i < nq; i++) {
        const long row = (long)b * s->Tq + t0 + i;
        if (lse) lse[row * s->H + h] = w->l[i] > 0.0f ? w->m[i] + logf(w->l[i]) : -INFINITY;
        if (!out) continue;
        float *o = out + row * s->H * hd + (long)h * hd;
        const float inv = w->l[i] > 0.0f ? 1.0f / w->l[i] : 0.0f; /* no visible key: zero output */
        for (int d = 0; d < hd; d++) o[d] = w->acc[i][d] * inv;
    }
}

/* One (batch row, head, block of queries) task, for few queries (decoding):
 * dot products instead of GEMMs. */
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

/* Thread-local (not stack: about 0.5 MB per thread at these block sizes and
 * ATT_MAX_HD; not malloc: no allocation per token). */
static _Thread_local att_scratch tls_scratch;
CEPE_OPAQUE static att_scratch *thread_scratch(void) { return &tls_scratch; }

/* The one attention forward: lse wanted (training) or not (inference). */
static void attention_run(float *out, float *lse, const float *q, const float *k, const float *v,
                          const uint8_t *key_valid, const attention_shape *s, int n_threads) {
    const int n_qblocks = (s->Tq + ATT_QBLOCK - 1) / ATT_QBLOCK;
    const long n_tasks = (long)s->B * s->H * n_qblocks;
#pragma omp parallel num_threads(n_threads) if (n_tasks > 1 && (long)s -> Tq * s->Tk > 4096)
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
            if (nq >= 8 || lse) /* the log-sum-exp comes from the GEMM path alone */
                attend_block_gemm(out, lse, q, k, v, key_valid ? key_valid + b * s->valid_bstride : NULL, s,
                                  b, h, t0, nq, w);
            else
                attend_block(out, q, k, v, key_valid, s, b, h, t0, nq, w);
        }
    }
}

void attention_forward(float *out, const float *q, const float *k, const float *v, const uint8_t *key_valid,
                       const attention_shape *s, int n_threads) {
    attention_run(out, NULL, q, k, v, key_valid, s, n_threads);
}

void attention_forward_lse(float *out, float *lse, const float *q, const float *k, const float *v,
                           const uint8_t *key_valid, const attention_shape *s, int n_threads) {
    attention_run(out, lse, q, k, v, key_valid, s, n_threads);
}

/* ------------------------------------------------------------ backward */

/* The backward of attention_forward: FlashAttention-2's backward on the CPU. For a query block Q_i and a key
 * block K_j (64 x 64, as small GEMMs through the single-threaded BLAS):
 *   S  = scale Q_i K_jᵀ            (masked entries: probability 0)
 *   P  = exp(S - lse_i)            (the forward's softmax, rebuilt exactly)
 *   dV_j += Pᵀ dO_i
 *   dP = dO_i V_jᵀ,  dS = P ∘ (dP - D_i)   with D_i = rowsum(dO_i ∘ O_i)
 *   dK_j += scale dSᵀ Q_i,  dQ_i += scale dS K_j
 * Only one P and one dP block live at a time per thread, so memory is
 * O(block) whatever Tq and Tk are (CEPE's encoder and cross-attention see
 * 10^5-token contexts). D is recomputed per block from dO and O (hd flops per
 * row against 5·64·hd for the GEMMs) so no O(T) buffer is needed either.
 *
 * Work is split over (batch row, kv head): one task owns the dK, dV rows of
 * its kv head and the dQ rows of every query head that reads it (GQA), so no
 * two threads ever add into the same gradient and no atomics are needed.
 * Masks are attention_forward's: causal with q_offset, sliding window, key
 * padding; a row that sees no key has lse = -inf, zero output, zero gradient. */
/* 64 queries x 128 keys: measured best of 64..256 on the training shapes
 * (cross 512 x 1024: 44 -> 29 ms backward). */
#define AB_QBLOCK 64
#define AB_KBLOCK 128

typedef struct {
    float P[AB_QBLOCK][AB_KBLOCK]; /* probabilities, then dS */
    float dP[AB_QBLOCK][AB_KBLOCK];
    float D[AB_QBLOCK];
    int kvalid[AB_KBLOCK];
} bwd_scratch;

static _Thread_local bwd_scratch tls_bwd;
CEPE_OPAQUE static bwd_scratch *thread_bwd_scratch(void) { return &tls_bwd; }

/* Rebuilds P for queries t0..t0+nq-1 of head h against keys j0..j0+nk-1
 * (S already in w->P) and fills w->D; returns 0 if every probability is 0. */
static int block_probs(const attention_shape *s, bwd_scratch *w, const float *lse_i, const float *doi,
                       const float *oi, int t0, int nq, int j0, int nk) {
    const int hd = s->hd;
    const long orow = (long)s->H * hd;
    int live = 0;
    for (int i = 0; i < nq; i++) {
        float *row = w->P[i];
        const float L = lse_i[(long)i * s->H];
        int lo, hi;
        key_range(s, s->q_offset + t0 + i, &lo, &hi);
        if (L == -INFINITY || hi <= j0 || lo >= j0 + nk) { /* row sees nothing here */
            memset(row, 0, sizeof(float) * (size_t)nk);
            w->D[i] = 0.0f;
            continue;
        }
        const float *dor = doi + i * orow, *orr = oi + i * orow;
        float dsum = 0.0f;
#pragma omp simd reduction(+ : dsum)
        for (int d = 0; d < hd; d++) dsum += dor[d] * orr[d];
        w->D[i] = dsum;
#pragma omp simd
        for (int jj = 0; jj < nk; jj++) {
            const int j = j0 + jj;
            const int ok = (j >= lo) & (j < hi) & w->kvalid[jj];
            row[jj] = ok ? cepe_exp_neg(row[jj] - L) : 0.0f;
        }
        live = 1;
    }
    return live;
}

/* The keys any query sees: ranges grow with the slot, so the union is
 * [lo of the first query, hi of the last). */
static void all_keys(const attention_shape *s, int *klo, int *khi) {
    int unused;
    key_range(s, s->q_offset, klo, &unused);
    key_range(s, s->q_offset + s->Tq - 1, &unused, khi);
}

/* The gradients of batch row b that involve kv head g and the key blocks
 * kb0..kb1-1 (counted from all_keys' lo): this task's dK, dV rows, and its
 * share of dQ added into dq. */
static void backward_task(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                          const float *v, const float *out, const float *lse, const uint8_t *valid,
                          const attention_shape *s, int b, int g, int kb0, int kb1, long dq_bstride,
                          long dq_rstride, bwd_scratch *w) {
    const int hd = s->hd, group = s->H / s->KVH;
    const long orow = (long)s->H * hd; /* row stride of out and dout */
    const long kvoff = b * s->kv_bstride + (long)g * hd;
    const int ldq = (int)s->q_rstride, ldkv = (int)s->kv_rstride, ldo = (int)orow;
    int klo, khi;
    all_keys(s, &klo, &khi);
    const int jend = klo + kb1 * AB_KBLOCK < khi ? klo + kb1 * AB_KBLOCK : khi;
    for (int j0 = klo + kb0 * AB_KBLOCK; j0 < jend; j0 += AB_KBLOCK) {
        const int nk = khi - j0 < AB_KBLOCK ? khi - j0 : AB_KBLOCK;
        int any = 0;
        for (int jj = 0; jj < nk; jj++) {
            w->kvalid[jj] = valid ? valid[j0 + jj] != 0 : 1;
            any |= w->kvalid[jj];
        }
        if (!any) continue; /* all padding: no probability reaches these keys */
        const float *kj = k + kvoff + (long)j0 * s->kv_rstride, *vj = v + kvoff + (long)j0 * s->kv_rstride;
        float *dkj = dk ? dk + kvoff + (long)j0 * s->kv_rstride : NULL;
        float *dvj = dv ? dv + kvoff + (long)j0 * s->kv_rstride : NULL;
        for (int h = g * group; h < (g + 1) * group; h++) {
            for (int t0 = 0; t0 < s->Tq; t0 += AB_QBLOCK) {
                const int nq = s->Tq - t0 < AB_QBLOCK ? s->Tq - t0 : AB_QBLOCK;
                int lo_first, hi_first, lo_last, hi_last;
                key_range(s, s->q_offset + t0, &lo_first, &hi_first);
                key_range(s, s->q_offset + t0 + nq - 1, &lo_last, &hi_last);
                if (hi_last <= j0 || lo_first >= j0 + nk) continue; /* block outside every query's range */
                const long qoff = b * s->q_bstride + (long)t0 * s->q_rstride + (long)h * hd;
                const long ooff = ((long)b * s->Tq + t0) * orow + (long)h * hd;
                const float *qi = q + qoff, *doi = dout + ooff;
                CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, hd, s->scale, qi, ldq, kj, ldkv,
                           0.0f, &w->P[0][0], AB_KBLOCK);
                if (!block_probs(s, w, lse + ((long)b * s->Tq + t0) * s->H + h, doi, out + ooff, t0, nq, j0,
                                 nk))
                    continue;
                if (dvj)
                    CEPE_SGEMM(CblasRowMajor, CblasTrans, CblasNoTrans, nk, hd, nq, 1.0f, &w->P[0][0],
                               AB_KBLOCK, doi, ldo, 1.0f, dvj, ldkv);
                if (!dq && !dk) continue;
                CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, hd, 1.0f, doi, ldo, vj, ldkv,
                           0.0f, &w->dP[0][0], AB_KBLOCK);
                for (int i = 0; i < nq; i++) {
                    float *p = w->P[i];
                    const float *dp = w->dP[i];
                    const float Di = w->D[i];
#pragma omp simd
                    for (int jj = 0; jj < nk; jj++) p[jj] *= dp[jj] - Di; /* P becomes dS */
                }
                if (dkj)
                    CEPE_SGEMM(CblasRowMajor, CblasTrans, CblasNoTrans, nk, hd, nq, s->scale, &w->P[0][0],
                               AB_KBLOCK, qi, ldq, 1.0f, dkj, ldkv);
                if (dq)
                    CEPE_SGEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, hd, nk, s->scale, &w->P[0][0],
                               AB_KBLOCK, kj, ldkv, 1.0f,
                               dq + b * dq_bstride + (long)t0 * dq_rstride + (long)h * hd, (int)dq_rstride);
            }
        }
    }
}

/* Work is split into tasks of (batch row, kv head, range of key blocks) so
 * that even one row with 3 kv heads keeps every thread busy. dK and dV rows
 * belong to exactly one task. Tasks of different key ranges share queries, so
 * each range adds its dQ share into its own zeroed buffer (tasks of one range
 * touch disjoint rows or heads), and the buffers are summed into dq in range
 * order: no atomics, and the same result whichever thread ran which task
 * (it depends only on the thread count, through the number of ranges). */
int attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                       const float *v, const float *out, const float *lse, const uint8_t *key_valid,
                       const attention_shape *s, int n_threads) {
    if (s->B <= 0 || s->Tq <= 0 || s->Tk <= 0) return 0; /* nothing visible, nothing to add */
    float *lse_buf = NULL, *dq_part = NULL;
    if (!lse) { /* O(B·Tq·H): one float per query row, not per score */
        lse_buf = malloc(sizeof(float) * (size_t)s->B * (size_t)s->Tq * (size_t)s->H);
        if (!lse_buf) return -1;
        attention_forward_lse(NULL, lse_buf, q, k, v, key_valid, s, n_threads);
        lse = lse_buf;
    }
    int klo, khi;
    all_keys(s, &klo, &khi);
    const int n_kblocks = khi > klo ? (khi - klo + AB_KBLOCK - 1) / AB_KBLOCK : 0;
    const long heads = (long)s->B * s->KVH;
    const int parallel = n_threads > 1 && (long)s->Tq * s->Tk > 4096;
    /* about 4 tasks per thread, so dynamic scheduling evens out the uneven
     * blocks of causal masking; never more ranges than key blocks */
    const long want = parallel ? (4L * n_threads + heads - 1) / heads : 1;
    const int n_split = (int)(want < n_kblocks ? want : (n_kblocks > 1 ? n_kblocks : 1));
    const size_t dq_rows = (size_t)s->B * (size_t)s->Tq, dq_row = (size_t)s->H * (size_t)s->hd;
    const size_t part = dq_rows * dq_row;
    if (n_split > 1 && dq) { /* one dense zeroed (B·Tq, H·hd) dQ per key range */
        dq_part = calloc((size_t)n_split * part, sizeof(float));
        if (!dq_part) {
            free(lse_buf);
            return -1;
        }
    }
    const long n_tasks = heads * n_split;
#pragma omp parallel num_threads(n_threads) if (parallel && n_tasks > 1)
    {
        bwd_scratch *w = thread_bwd_scratch();
#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < n_tasks; task++) {
            const int split = (int)(task % n_split), hg = (int)(task / n_split);
            const int b = hg / s->KVH, g = hg % s->KVH;
            const int kb0 = (int)((long)split * n_kblocks / n_split);
            const int kb1 = (int)((long)(split + 1) * n_kblocks / n_split);
            /* this range's dense dQ share, or dq itself (laid out as q) when there is one range */
            float *dqt = dq_part ? dq_part + (size_t)split * part : dq;
            const long dq_rs = dq_part ? (long)dq_row : s->q_rstride;
            const long dq_bs = dq_part ? (long)s->Tq * dq_rs : s->q_bstride;
            backward_task(dqt, dk, dv, dout, q, k, v, out, lse,
                          key_valid ? key_valid + b * s->valid_bstride : NULL, s, b, g, kb0, kb1, dq_bs,
                          dq_rs, w);
        }
        if (dq_part) { /* dq += the ranges' shares, in range order; rows split over the team */
#pragma omp for schedule(static)
            for (long r = 0; r < (long)dq_rows; r++) {
                float *dst = dq + (r / s->Tq) * s->q_bstride + (r % s->Tq) * s->q_rstride;
                for (int p = 0; p < n_split; p++) {
                    const float *src = dq_part + (size_t)p * part + (size_t)r * dq_row;
#pragma omp simd
                    for (size_t i = 0; i < dq_row; i++) dst[i] += src[i];
                }
            }
        }
    }
    free(dq_part);
    free(lse_buf);
    return 0;
}
