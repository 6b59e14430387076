/* decoder.c — the LLaMA decoder forward, one token's path read top to bottom:
 * embedding → per layer [RMSNorm → q,k,v → RoPE → causal GQA attention over
 * the KV cache → o_proj + residual → RMSNorm → SwiGLU MLP + residual] →
 * final RMSNorm → lm_head. Long inputs run in chunks of ctx->chunk tokens
 * per row, each attending to the cache the earlier chunks filled. */
#include <string.h>

#include "../common.h"
#include "../ops/ops.h" /* CEPE_IGNORE_INDEX */
#include "model.h"

static int interrupted(cepe_ctx *x) { return atomic_load_explicit(&x->interrupt, memory_order_relaxed); }

static int nt_of(const cepe_ctx *x) { return x->m->n_threads; }

/* One chunk of the call while it runs through a layer: B rows of c tokens,
 * laid out (B, c, ·), with `len` tokens already in the cache before them. */
typedef struct {
    float *x;             /* (B*c, d) residual stream */
    float *cos_t, *sin_t; /* (B*c, rope half) */
    int c, len;
} chunk_view;

/* Layer l's cross-attention K/V: the kept ones, or projected now from the
 * encoder states into the one-layer scratch (memory-lean mode). */
static void cross_kv(cepe_ctx *x, int l, const float **kc, const float **vc) {
    const cepe_model *m = x->m;
    const cepe_config *cfg = &m->cfg;
    const layer_weights *w = &m->w.layers[l];
    const int kvd = cfg->n_kv_heads * cfg->head_dim;
    const long ctx_rows = (long)x->B * x->ctx_N;
    if (x->cross_kept) {
        *kc = x->cross_k + (long)(l - m->first_cross) * ctx_rows * kvd;
        *vc = x->cross_v + (long)(l - m->first_cross) * ctx_rows * kvd;
        return;
    }
    block_cross_kv(m, w, x->qwork, x->cross_k, x->cross_v, x->ctx_states, (int)ctx_rows);
    *kc = x->cross_k;
    *vc = x->cross_v;
}

/* Each row's last token moved to rows 0..B-1 of a (B*c, width) buffer, in
 * place: row b goes to row b from row b*c + c - 1 >= b, and a later row's
 * source lies past every earlier destination. */
static void keep_last_rows(const cepe_backend *be, float *buf, int B, int c, int width) {
    for (int b = 0; b < B; b++)
        be->copy(be, buf + (long)b * width, buf + ((long)b * c + c - 1) * width,
                 sizeof(float) * (size_t)width);
}

/* Decoder layer l over one chunk: causal self-attention over the cache (the
 * chunk's K/V appended at slot cv->len), then CEPE cross-attention when a
 * context is set (ck/cv_: its K/V; skipped without context, so the model is
 * exactly its base decoder), then the MLP.
 * last_only: nothing after this layer reads any row but each row's last
 * token (the last layer when only the final logits are wanted). Every row's
 * K/V still go to the cache, but the queries, attention, o_proj and MLP run
 * for the B last tokens alone, left in rows 0..B-1 of cv->x (with their RoPE
 * rows moved along): almost a whole layer less work for a long prefill. */
static void layer_forward(cepe_ctx *x, int l, const chunk_view *cv, const float *ck, const float *cv_,
                          int last_only) {
    const cepe_model *m = x->m;
    const cepe_config *cfg = &m->cfg;
    const cepe_backend *be = m->be;
    const layer_weights *w = &m->w.layers[l];
    const int B = x->B, c = cv->c, d = cfg->hidden_size;
    const int half = m->rope.half, kvd = cfg->n_kv_heads * cfg->head_dim, nt = m->n_threads;
    const long layer_stride = (long)B * x->cap * kvd;
    const long slot = x->cache_layers == cfg->n_layers ? l : 0; /* single-pass: one layer's K/V */
    float *kc = x->k_cache + slot * layer_stride, *vc = x->v_cache + slot * layer_stride;
    const block_scratch s = {.xn = x->xn,
                             .q = x->q,
                             .k = x->k,
                             .v = x->v,
                             .att = x->att,
                             .gate = x->gate,
                             .up = x->up,
                             .cos_t = cv->cos_t,
                             .sin_t = cv->sin_t,
                             .qwork = x->qwork};
    block_kv(m, w, cfg, cv->x, &s, B * c, &m->rope, nt);
    for (int b = 0; b < B; b++) { /* append this chunk's keys/values */
        const size_t bytes = sizeof(float) * (size_t)c * kvd;
        be->copy(be, kc + ((long)b * x->cap + cv->len) * kvd, x->k + (long)b * c * kvd, bytes);
        be->copy(be, vc + ((long)b * x->cap + cv->len) * kvd, x->v + (long)b * c * kvd, bytes);
    }
    last_only = last_only && c > 1;
    if (last_only) {
        keep_last_rows(be, x->xn, B, c, d);
        keep_last_rows(be, cv->x, B, c, d);
        keep_last_rows(be, cv->cos_t, B, c, half);
        keep_last_rows(be, cv->sin_t, B, c, half);
    }
    const int nq = last_only ? 1 : c, N = B * nq; /* query rows per batch row, in all */
    block_kv_src self_kv = {
        .k = kc, .v = vc, .valid = x->valid, .shape = block_shape(cfg, B, nq, cv->len + c, 1)};
    self_kv.shape.kv_bstride = (long)x->cap * kvd;
    self_kv.shape.valid_bstride = x->cap;
    self_kv.shape.q_offset = cv->len + c - nq;
    const block_kv_src cross = {
        .k = ck, .v = cv_, .valid = x->ctx_mask, .shape = block_shape(cfg, B, nq, x->ctx_N, 0)};
    block_attend(m, w, cfg, cv->x, &s, N, &m->rope, &self_kv, ck ? &cross : NULL, nt);
}

/* Chunk-major: every layer over the c tokens per row already gathered into
 * x->ids / x->pos (the cache holds x->len tokens before them). Leaves the
 * final-normed hidden states in x->xn: row b*c + t for token t of row b, or
 * with last_only (see layer_forward) only each row's last token, at row b. */
static cepe_status run_layers(cepe_ctx *x, int c, int last_only) {
    const cepe_model *m = x->m;
    const cepe_config *cfg = &m->cfg;
    const cepe_backend *be = m->be;
    const int N = x->B * c, d = cfg->hidden_size;
    model_embedding(m, x->x, x->ids, &m->w.embed, N);
    be->rope_table(be, x->cos_t, x->sin_t, x->pos, x->inv_freq, N, m->rope.half, x->rope_mscale);
    const chunk_view cv = {.x = x->x, .cos_t = x->cos_t, .sin_t = x->sin_t, .c = c, .len = x->len};
    for (int l = 0; l < cfg->n_layers; l++) {
        const float *ck = NULL, *cvv = NULL;
        if (l >= m->first_cross && x->ctx_N > 0) cross_kv(x, l, &ck, &cvv);
        layer_forward(x, l, &cv, ck, cvv, last_only && l == cfg->n_layers - 1);
        atomic_fetch_add_explicit(&x->progress_done, 1, memory_order_relaxed);
        if (interrupted(x)) return cepe_fail(CEPE_ERR_INTERRUPTED, "interrupted");
    }
    be->rmsnorm(be, x->xn, x->x, m->w.final_norm, last_only ? x->B : N, d, cfg->rms_norm_eps, nt_of(x));
    return CEPE_OK;
}

/* Copies chunk [t0, t0+c) of the caller's (B, T) inputs into the run state
 * (host mirrors, then uploaded), marks cache slots len.. real or padding, and
 * fills default positions. Returns nonzero if an upload failed. */
static int gather_chunk(cepe_ctx *x, const int32_t *ids, const double *positions, const uint8_t *mask, int T,
                        int t0, int c, int len) {
    const cepe_backend *be = x->m->be;
    int bad = 0;
    for (int b = 0; b < x->B; b++) {
        uint8_t *valid = x->valid_h + (long)b * x->cap + len;
        for (int t = 0; t < c; t++) {
            const long src = (long)b * T + t0 + t, dst = (long)b * c + t;
            const int real = mask ? mask[src] != 0 : 1;
            x->ids_h[dst] = ids[src];
            valid[t] = (uint8_t)real;
            x->pos_h[dst] = model_position(positions, src, real, &x->next_pos[b]);
        }
        bad |= be->upload(be, x->valid + (valid - x->valid_h), valid, (size_t)c);
    }
    const size_t rows = (size_t)x->B * (size_t)c;
    bad |= be->upload(be, x->ids, x->ids_h, rows * sizeof(int32_t));
    bad |= be->upload(be, x->pos, x->pos_h, rows * sizeof(double));
    return bad;
}

/* Layer-major: the whole call goes through layer 0 chunk by chunk, then layer
 * 1, ... Only the residual stream of all T tokens (B·T·d floats) and their
 * RoPE tables are held, and a layer's recomputed cross-attention K/V are
 * projected once per call instead of once per chunk: with a long context in
 * memory-lean mode that projection costs more than the decoder itself.
 * resid (B·T, d) and cos/sin (B·T, half) hold chunk k at row B·k·chunk, each
 * chunk laid out (B, c, ·) as chunk-major's buffers are. */
static cepe_status run_layer_major(cepe_ctx *x, const int32_t *ids, const double *positions,
                                   const uint8_t *mask, int T, float *resid, float *cos_t, float *sin_t) {
    const cepe_model *m = x->m;
    const cepe_config *cfg = &m->cfg;
    const cepe_backend *be = m->be;
    const int B = x->B, d = cfg->hidden_size, half = m->rope.half;
    for (int t0 = 0; t0 < T; t0 += x->chunk) {
        const int c = T - t0 < x->chunk ? T - t0 : x->chunk;
        const long row0 = (long)B * t0;
        if (gather_chunk(x, ids, positions, mask, T, t0, c, x->len + t0)) return CEPE_ERR_BACKEND;
        model_embedding(m, resid + row0 * d, x->ids, &m->w.embed, B * c);
        be->rope_table(be, cos_t + row0 * half, sin_t + row0 * half, x->pos, x->inv_freq, B * c, half,
                       x->rope_mscale);
    }
    for (int l = 0; l < cfg->n_layers; l++) {
        const float *ck = NULL, *cvv = NULL;
        if (l >= m->first_cross && x->ctx_N > 0) cross_kv(x, l, &ck, &cvv);
        for (int t0 = 0; t0 < T; t0 += x->chunk) {
            const long row0 = (long)B * t0;
            const chunk_view cv = {.x = resid + row0 * d,
                                   .cos_t = cos_t + row0 * half,
                                   .sin_t = sin_t + row0 * half,
                                   .c = T - t0 < x->chunk ? T - t0 : x->chunk,
                                   .len = x->len + t0};
            layer_forward(x, l, &cv, ck, cvv, 0);
            atomic_fetch_add_explicit(&x->progress_done, 1, memory_order_relaxed);
        }
        if (interrupted(x)) return cepe_fail(CEPE_ERR_INTERRUPTED, "interrupted");
    }
    return CEPE_OK;
}

/* What a call hands back besides the cache: logits (cepe_logits_mode) or,
 * with targets, each position's -log p(target). */
typedef struct {
    float *logits;
    cepe_logits_mode mode;
    const int32_t *targets; /* (B, T); CEPE_IGNORE_INDEX: not scored */
    float *nll;             /* (B, T) */
} call_outputs;

#define NLL_ROWS 64 /* logits formed at a time when scoring: NLL_ROWS x V floats */

/* Scores the n rows gathered in x->nll_x (targets in x->nll_targets_h) and
 * writes them to the caller's rows x->nll_rows_h. */
static int flush_nll(cepe_ctx *x, const call_outputs *o, int n) {
    const cepe_model *m = x->m;
    const cepe_backend *be = m->be;
    const int V = m->cfg.vocab_size;
    int bad = be->upload(be, x->nll_targets, x->nll_targets_h, sizeof(int32_t) * (size_t)n);
    bad |= model_matmul(m, x->qwork, x->nll_logits, x->nll_x, &m->w.lm_head, n, 0);
    bad |= be->cross_entropy(be, x->nll_loss, NULL, x->nll_logits, x->nll_targets, n, V, 1.0f);
    bad |= be->download(be, x->nll_loss_h, x->nll_loss, sizeof(float) * (size_t)n);
    if (!bad) bad |= backend_check(be) != CEPE_OK; /* a device download may still be queued */
    for (int i = 0; i < n && !bad; i++) o->nll[x->nll_rows_h[i]] = x->nll_loss_h[i];
    return bad;
}

/* -log p(target) for the chunk's B*c rows (final-normed states in x->xn).
 * Only scored rows get logits, NLL_ROWS of them at a time. */
static int chunk_nll(cepe_ctx *x, const call_outputs *o, int T, int t0, int c) {
    const cepe_backend *be = x->m->be;
    const int d = x->m->cfg.hidden_size, N = x->B * c;
    int bad = 0, n = 0;
    for (int r = 0; r < N && !bad; r++) { /* row r = b*c + t of the chunk is (b, t0 + t) of the call */
        const long dst = (long)(r / c) * T + t0 + r % c;
        const int32_t tgt = o->targets[dst];
        o->nll[dst] = 0.0f;
        if (tgt == CEPE_IGNORE_INDEX) continue;
        bad |= be->copy(be, x->nll_x + (long)n * d, x->xn + (long)r * d, sizeof(float) * (size_t)d);
        x->nll_targets_h[n] = tgt;
        x->nll_rows_h[n++] = dst;
        if (n == NLL_ROWS) {
            bad |= flush_nll(x, o, n);
            n = 0;
        }
    }
    if (n > 0 && !bad) bad |= flush_nll(x, o, n);
    return bad;
}

/* The chunk's outputs from its final-normed states in x->xn: its logits (mode
 * ALL) or scores, and after the last chunk each row's last hidden state and
 * logits (what generation continues from). */
static int chunk_outputs(cepe_ctx *x, const call_outputs *o, int T, int t0, int c, int last_only) {
    const cepe_model *m = x->m;
    const cepe_backend *be = m->be;
    const int V = m->cfg.vocab_size, d = m->cfg.hidden_size, B = x->B;
    const int all = o->mode == CEPE_LOGITS_ALL;
    int bad = 0;
    if (o->nll) bad |= chunk_nll(x, o, T, t0, c);
    if (all) {
        if (be->device) { /* one GEMM over the chunk's rows, then each row's slice comes back */
            bad |= model_matmul(m, x->qwork, x->logits_d, x->xn, &m->w.lm_head, B * c, 0);
            for (int b = 0; b < B; b++)
                bad |= be->download(be, o->logits + ((long)b * T + t0) * V, x->logits_d + (long)b * c * V,
                                    sizeof(float) * (size_t)c * V);
        } else { /* straight into the caller's array */
            for (int b = 0; b < B; b++)
                bad |= model_matmul(m, x->qwork, o->logits + ((long)b * T + t0) * V, x->xn + (long)b * c * d,
                                    &m->w.lm_head, c, 0);
        }
    }
    if (t0 + c == T) { /* last chunk: keep each row's final hidden state and logits */
        for (int b = 0; b < B; b++)
            bad |= be->copy(be, x->last_hidden + (long)b * d,
                            x->xn + (last_only ? b : (long)b * c + c - 1) * d, sizeof(float) * d);
        if (all && be->device)
            for (int b = 0; b < B; b++)
                bad |= be->copy(be, x->last_logits + (long)b * V, x->logits_d + ((long)b * c + c - 1) * V,
                                sizeof(float) * V);
        else if (all)
            for (int b = 0; b < B; b++)
                bad |= be->upload(be, x->last_logits + (long)b * V, o->logits + ((long)b * T + T - 1) * V,
                                  sizeof(float) * V);
        else
            bad |= model_matmul(m, x->qwork, x->last_logits, x->last_hidden, &m->w.lm_head, B, 0);
        bad |= be->download(be, x->last_logits_h, x->last_logits, sizeof(float) * (size_t)B * V);
    }
    return bad;
}

/* max position + 1 over this call, as transformers measures seq_len. */
static int call_seq_len(const cepe_ctx *x, const double *positions, const uint8_t *mask, int T) {
    double mx = 0.0;
    for (int b = 0; b < x->B; b++) {
        if (positions) {
            for (int t = 0; t < T; t++)
                mx = positions[(long)b * T + t] > mx ? positions[(long)b * T + t] : mx;
            continue;
        }
        int real = 0;
        for (int t = 0; t < T; t++) real += mask ? mask[(long)b * T + t] != 0 : 1;
        const double last = x->next_pos[b] + (real > 0 ? real - 1 : 0);
        mx = last > mx ? last : mx;
    }
    return mx + 1.0 < 2147483647.0 ? (int)mx + 1 : 2147483647;
}

/* Device scratch a call's outputs need, made on first use and kept. */
static cepe_status ensure_output_scratch(cepe_ctx *x, const call_outputs *o) {
    const cepe_backend *be = x->m->be;
    const size_t V = (size_t)x->m->cfg.vocab_size;
    if (o->mode == CEPE_LOGITS_ALL && be->device && !x->logits_d) { /* every position's logits */
        x->logits_d = be->alloc(be, cepe_mul_size((size_t)x->B * (size_t)x->chunk, V * sizeof(float)));
        if (!x->logits_d)
            return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of %s memory for %d x %zu logits", be->name,
                             x->B * x->chunk, V);
    }
    if (o->nll && !x->nll_logits) {
        x->nll_x = be->alloc(be, cepe_mul_size(NLL_ROWS, (size_t)x->m->cfg.hidden_size * sizeof(float)));
        x->nll_rows_h = cepe_calloc(NLL_ROWS, sizeof(long));
        x->nll_logits = be->alloc(be, cepe_mul_size(NLL_ROWS, V * sizeof(float)));
        x->nll_targets = be->alloc(be, NLL_ROWS * sizeof(int32_t));
        x->nll_loss = be->alloc(be, NLL_ROWS * sizeof(float));
        x->nll_targets_h = cepe_calloc(NLL_ROWS, sizeof(int32_t));
        x->nll_loss_h = cepe_calloc(NLL_ROWS, sizeof(float));
        if (!x->nll_x || !x->nll_rows_h || !x->nll_logits || !x->nll_targets || !x->nll_loss ||
            !x->nll_targets_h || !x->nll_loss_h)
            return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory for %d x %zu scoring logits", NLL_ROWS,
                             V);
    }
    return CEPE_OK;
}

static cepe_status forward_call(cepe_ctx *x, const int32_t *ids, const double *positions, const uint8_t *mask,
                                int T, const call_outputs *o) {
    if (!x || !ids) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_forward: NULL argument");
    if (T < 1) return cepe_fail(CEPE_ERR_INVALID_ARG, "input must hold at least one token, got %d", T);
    if (o->mode != CEPE_LOGITS_NONE && !o->logits)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_forward: NULL logits buffer");
    const cepe_model *m = x->m;
    const int V = m->cfg.vocab_size, d = m->cfg.hidden_size, B = x->B;
    const int single_pass = x->cache_layers != m->cfg.n_layers;
    if (single_pass && x->len > 0)
        return cepe_fail(CEPE_ERR_STATE,
                         "a single-pass context keeps only its last layer's K/V: it cannot be "
                         "continued (use a context with a full cache)");
    if (T > x->cap - x->len)
        return cepe_fail(CEPE_ERR_STATE, "context capacity exceeded: %d cached + %d new tokens > capacity %d",
                         x->len, T, x->cap);
    for (long i = 0; i < (long)B * T; i++)
        if (ids[i] < 0 || ids[i] >= V)
            return cepe_fail(CEPE_ERR_INVALID_ARG,
                             "token id %d at (row %ld, position %ld) is out of range [0, %d)", ids[i], i / T,
                             i % T, V);
    if (o->nll)
        for (long i = 0; i < (long)B * T; i++)
            if (o->targets[i] != CEPE_IGNORE_INDEX && (o->targets[i] < 0 || o->targets[i] >= V))
                return cepe_fail(
                    CEPE_ERR_INVALID_ARG,
                    "target id %d at (row %ld, position %ld) is out of range [0, %d) (%d: not scored)",
                    o->targets[i], i / T, i % T, V, CEPE_IGNORE_INDEX);
    if (positions)
        for (long i = 0; i < (long)B * T; i++)
            if (!(positions[i] >= 0.0 && positions[i] < 1e15))
                return cepe_fail(CEPE_ERR_INVALID_ARG,
                                 "position %g at (row %ld, position %ld) must be finite and >= 0",
                                 positions[i], i / T, i % T);
    /* state to restore if the call is stopped halfway (Ctrl-C) */
    const int len0 = x->len, cached0 = x->rope_cached_len;
    memcpy(x->saved_pos, x->next_pos, sizeof(double) * (size_t)B);
    if (m->rope.length_dependent) { /* dynamic NTK / LongRoPE: the table follows the call's length */
        int seq_len = call_seq_len(x, positions, mask, T);
        seq_len = seq_len > x->rope_len_hint ? seq_len : x->rope_len_hint;
        cepe_status st =
            cepe_rope_for_call(&m->rope, seq_len, &x->rope_cached_len, x->inv_freq_h, &x->rope_mscale);
        if (st) return st;
        if (m->be->upload(m->be, x->inv_freq, x->inv_freq_h, sizeof(float) * (size_t)m->rope.half))
            return backend_fail(m->be);
    }
    const cepe_backend *be = m->be;
    atomic_store(&x->progress_done, 0);
    atomic_store(&x->progress_total, (long)m->cfg.n_layers * ((T + x->chunk - 1) / x->chunk));
    cepe_status st = ensure_output_scratch(x, o);
    if (st) return st;

    /* Layer-major when a recomputed context's K/V would otherwise be projected
     * once per chunk, or when the cache holds one layer (a later chunk reads
     * the earlier chunks' K/V of every layer); its buffers are per call. */
    const int layer_major = (single_pass || (x->ctx_N > 0 && !x->cross_kept)) && T > x->chunk;
    float *resid = NULL, *cos_t = NULL, *sin_t = NULL;
    if (layer_major) {
        const size_t rows = (size_t)B * (size_t)T, half = (size_t)m->rope.half;
        resid = be->alloc(be, cepe_mul_size(rows, (size_t)d * sizeof(float)));
        cos_t = be->alloc(be, cepe_mul_size(rows, half * sizeof(float)));
        sin_t = be->alloc(be, cepe_mul_size(rows, half * sizeof(float)));
        if (!resid || !cos_t || !sin_t)
            st = cepe_fail(CEPE_ERR_OUT_OF_MEMORY,
                           "out of %s memory for the residual stream of %d x %d tokens", be->name, B, T);
        if (!st) st = run_layer_major(x, ids, positions, mask, T, resid, cos_t, sin_t);
        if (st == CEPE_ERR_BACKEND) st = backend_fail(be);
    }
    /* Only each row's last state is read after the last chunk: its last layer may skip the other rows. */
    const int last_only = o->mode != CEPE_LOGITS_ALL && !o->nll;
    for (int t0 = 0; t0 < T && !st; t0 += x->chunk) {
        const int c = T - t0 < x->chunk ? T - t0 : x->chunk;
        int bad = 0;
        if (layer_major) {
            be->rmsnorm(be, x->xn, resid + (long)B * t0 * d, m->w.final_norm, B * c, d, m->cfg.rms_norm_eps,
                        nt_of(x));
        } else {
            bad = gather_chunk(x, ids, positions, mask, T, t0, c, x->len);
            if (!bad) st = run_layers(x, c, last_only && t0 + c == T);
        }
        if (!st && !bad) bad |= chunk_outputs(x, o, T, t0, c, !layer_major && last_only && t0 + c == T);
        if (!st) st = backend_check(be);
        if (!st && bad) st = backend_fail(be);
        if (!st && !layer_major) x->len += c;
    }
    if (layer_major) {
        be->free(be, resid), be->free(be, cos_t), be->free(be, sin_t);
        if (!st) x->len += T;
    }
    if (st) { /* roll back: every chunk of this call leaves the cache */
        x->len = len0;
        x->rope_cached_len = cached0;
        memcpy(x->next_pos, x->saved_pos, sizeof(double) * (size_t)B);
        x->has_logits = 0;
        return st;
    }
    if (o->mode == CEPE_LOGITS_LAST) memcpy(o->logits, x->last_logits_h, sizeof(float) * (size_t)B * V);
    x->has_logits = 1;
    return CEPE_OK;
}

cepe_status cepe_ctx_forward(cepe_ctx *x, const int32_t *ids, const double *positions, const uint8_t *mask,
                             int T, float *logits, cepe_logits_mode mode) {
    if (x) atomic_store(&x->interrupt, 0); /* a new request: forget an old Ctrl-C */
    return cepe_ctx_forward_continue(x, ids, positions, mask, T, logits, mode);
}

cepe_status cepe_ctx_forward_continue(cepe_ctx *x, const int32_t *ids, const double *positions,
                                      const uint8_t *mask, int T, float *logits, cepe_logits_mode mode) {
    const call_outputs o = {.logits = logits, .mode = mode};
    return forward_call(x, ids, positions, mask, T, &o);
}

cepe_status cepe_ctx_forward_nll(cepe_ctx *x, const int32_t *ids, const double *positions,
                                 const uint8_t *mask, int T, const int32_t *targets, float *nll) {
    if (!targets || !nll) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_forward_nll: NULL argument");
    if (x) atomic_store(&x->interrupt, 0);
    const call_outputs o = {.mode = CEPE_LOGITS_NONE, .targets = targets, .nll = nll};
    return forward_call(x, ids, positions, mask, T, &o);
}
