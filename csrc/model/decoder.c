/* decoder.c — the LLaMA decoder forward, one token's path read top to bottom:
 * embedding → per layer [RMSNorm → q,k,v → RoPE → causal GQA attention over
 * the KV cache → o_proj + residual → RMSNorm → SwiGLU MLP + residual] →
 * final RMSNorm → lm_head. Long inputs run in chunks of ctx->chunk tokens
 * per row, each attending to the cache the earlier chunks filled. */
#include <math.h>
#include <string.h>

#include "../common.h"
#include "model.h"

/* The backend's error, or a generic one when it reported none. */
static cepe_status backend_fail(const cepe_backend *be) {
    const cepe_status st = backend_check(be);
    return st ? st : cepe_fail(CEPE_ERR_BACKEND, "%s backend: an op failed", be->name);
}

static int interrupted(cepe_ctx *x) { return atomic_load_explicit(&x->interrupt, memory_order_relaxed); }

/* CEPE cross-attention for the N = B*c rows in x (spec §3):
 * x += o_proj(attn(q_proj(RMSNorm_cross(x)), k_proj(E), v_proj(E))),
 * no RoPE, no causal mask, padded context tokens masked. */
static void cross_attention(cepe_ctx *x, int l, int c, const block_scratch *s) {
    const cepe_model *m = x->m;
    const cepe_config *cfg = &m->cfg;
    const cepe_backend *be = m->be;
    const layer_weights *w = &m->w.layers[l];
    const int B = x->B, N = B * c, d = cfg->hidden_size, hd = cfg->head_dim;
    const int qd = cfg->n_heads * hd, kvd = cfg->n_kv_heads * hd, nt = m->n_threads;
    const long ctx_rows = (long)B * x->ctx_N;
    const float *kc, *vc;
    if (x->cross_kept) {
        kc = x->cross_k + (long)(l - m->first_cross) * ctx_rows * kvd;
        vc = x->cross_v + (long)(l - m->first_cross) * ctx_rows * kvd;
    } else { /* memory-lean: project this layer's K/V now */
        model_matmul(m, x->cross_k, x->ctx_states, w->cross_wk, (int)ctx_rows, cfg->encoder_hidden_size, kvd, 0);
        model_matmul(m, x->cross_v, x->ctx_states, w->cross_wv, (int)ctx_rows, cfg->encoder_hidden_size, kvd, 0);
        kc = x->cross_k;
        vc = x->cross_v;
    }
    const attention_shape shape = {
        .B = B, .Tq = c, .Tk = x->ctx_N, .H = cfg->n_heads, .KVH = cfg->n_kv_heads, .hd = hd,
        .q_rstride = qd, .q_bstride = (long)c * qd,
        .kv_rstride = kvd, .kv_bstride = (long)x->ctx_N * kvd, .valid_bstride = x->ctx_N,
        .causal = 0, .q_offset = 0, .window = 0, .scale = 1.0f / sqrtf((float)hd),
    };
    be->rmsnorm(be, s->xn, x->x, w->cross_norm, N, d, cfg->rms_norm_eps, nt);
    model_matmul(m, s->q, s->xn, w->cross_wq, N, d, qd, 0);
    be->attention(be, s->att, s->q, kc, vc, x->ctx_mask, &shape, nt);
    model_matmul(m, x->x, s->att, w->cross_wo, N, qd, d, 1);
}

/* Runs layers over the c tokens per row already gathered into x->ids / x->pos
 * (the cache holds x->len tokens before them). Leaves the final-normed hidden
 * states in x->xn. */
static cepe_status run_layers(cepe_ctx *x, int c) {
    const cepe_model *m = x->m;
    const cepe_config *cfg = &m->cfg;
    const cepe_backend *be = m->be;
    const int B = x->B, N = B * c, d = cfg->hidden_size;
    const int H = cfg->n_heads, KVH = cfg->n_kv_heads, hd = cfg->head_dim;
    const int qd = H * hd, kvd = KVH * hd, nt = m->n_threads;
    const long layer_stride = (long)B * x->cap * kvd;
    const block_scratch s = {.xn = x->xn, .q = x->q, .k = x->k, .v = x->v, .att = x->att,
                             .gate = x->gate, .up = x->up, .cos_t = x->cos_t, .sin_t = x->sin_t};

    be->embedding(be, x->x, x->ids, m->w.embed, N, d);
    be->rope_table(be, x->cos_t, x->sin_t, x->pos, x->inv_freq, N, m->rope.half, x->rope_mscale);
    const attention_shape shape = {
        .B = B, .Tq = c, .Tk = x->len + c, .H = H, .KVH = KVH, .hd = hd,
        .q_rstride = qd, .q_bstride = (long)c * qd,
        .kv_rstride = kvd, .kv_bstride = (long)x->cap * kvd, .valid_bstride = x->cap,
        .causal = 1, .q_offset = x->len, .window = cfg->sliding_window,
        .scale = 1.0f / sqrtf((float)hd),
    };

    for (int l = 0; l < cfg->n_layers; l++) {
        const layer_weights *w = &m->w.layers[l];
        float *kc = x->k_cache + l * layer_stride, *vc = x->v_cache + l * layer_stride;

        /* causal self-attention over the cache */
        block_qkv(m, w, cfg, x->x, &s, N, &m->rope, nt);
        for (int b = 0; b < B; b++) { /* append this chunk's keys/values */
            const size_t bytes = sizeof(float) * (size_t)c * kvd;
            be->copy(be, kc + ((long)b * x->cap + x->len) * kvd, x->k + (long)b * c * kvd, bytes);
            be->copy(be, vc + ((long)b * x->cap + x->len) * kvd, x->v + (long)b * c * kvd, bytes);
        }
        be->attention(be, x->att, x->q, kc, vc, x->valid, &shape, nt);
        model_matmul(m, x->x, x->att, w->wo, N, qd, d, 1); /* x += o_proj(att) */

        /* CEPE: between self-attention and the MLP; skipped without context */
        if (l >= m->first_cross && x->ctx_N > 0) cross_attention(x, l, c, &s);

        block_mlp(m, w, cfg, x->x, &s, N, nt);
        if (interrupted(x)) return cepe_fail(CEPE_ERR_INTERRUPTED, "interrupted");
    }
    be->rmsnorm(be, x->xn, x->x, m->w.final_norm, N, d, cfg->rms_norm_eps, nt);
    return CEPE_OK;
}

/* Copies chunk [t0, t0+c) of the caller's (B, T) inputs into the run state
 * (host mirrors, then uploaded), marks the cache slots real or padding, and
 * fills default positions. Returns nonzero if an upload failed. */
static int gather_chunk(cepe_ctx *x, const int32_t *ids, const double *positions, const uint8_t *mask, int T,
                        int t0, int c) {
    const cepe_backend *be = x->m->be;
    int bad = 0;
    for (int b = 0; b < x->B; b++) {
        uint8_t *valid = x->valid_h + (long)b * x->cap + x->len;
        for (int t = 0; t < c; t++) {
            const long src = (long)b * T + t0 + t, dst = (long)b * c + t;
            const int real = mask ? mask[src] != 0 : 1;
            x->ids_h[dst] = ids[src];
            valid[t] = (uint8_t)real;
            if (positions) {
                x->pos_h[dst] = positions[src];
                if (real) x->next_pos[b] = positions[src] + 1.0;
            } else {
                x->pos_h[dst] = x->next_pos[b];
                if (real) x->next_pos[b] += 1.0;
            }
        }
        bad |= be->upload(be, x->valid + (valid - x->valid_h), valid, (size_t)c);
    }
    const size_t rows = (size_t)x->B * (size_t)c;
    bad |= be->upload(be, x->ids, x->ids_h, rows * sizeof(int32_t));
    bad |= be->upload(be, x->pos, x->pos_h, rows * sizeof(double));
    return bad;
}

/* max position + 1 over this call, as transformers measures seq_len. */
static int call_seq_len(const cepe_ctx *x, const double *positions, const uint8_t *mask, int T) {
    double mx = 0.0;
    for (int b = 0; b < x->B; b++) {
        if (positions) {
            for (int t = 0; t < T; t++) mx = positions[(long)b * T + t] > mx ? positions[(long)b * T + t] : mx;
            continue;
        }
        int real = 0;
        for (int t = 0; t < T; t++) real += mask ? mask[(long)b * T + t] != 0 : 1;
        const double last = x->next_pos[b] + (real > 0 ? real - 1 : 0);
        mx = last > mx ? last : mx;
    }
    return mx + 1.0 < 2147483647.0 ? (int)mx + 1 : 2147483647;
}

cepe_status cepe_ctx_forward(cepe_ctx *x, const int32_t *ids, const double *positions,
                             const uint8_t *mask, int T, float *logits, cepe_logits_mode mode) {
    if (x) atomic_store(&x->interrupt, 0); /* a new request: forget an old Ctrl-C */
    return cepe_ctx_forward_continue(x, ids, positions, mask, T, logits, mode);
}

cepe_status cepe_ctx_forward_continue(cepe_ctx *x, const int32_t *ids, const double *positions,
                                      const uint8_t *mask, int T, float *logits, cepe_logits_mode mode) {
    if (!x || !ids) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_forward: NULL argument");
    if (T < 1) return cepe_fail(CEPE_ERR_INVALID_ARG, "input must hold at least one token, got %d", T);
    if (mode != CEPE_LOGITS_NONE && !logits)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_forward: NULL logits buffer");
    const cepe_model *m = x->m;
    const int V = m->cfg.vocab_size, d = m->cfg.hidden_size, B = x->B;
    if (T > x->cap - x->len)
        return cepe_fail(CEPE_ERR_STATE,
                         "context capacity exceeded: %d cached + %d new tokens > capacity %d", x->len,
                         T, x->cap);
    for (long i = 0; i < (long)B * T; i++)
        if (ids[i] < 0 || ids[i] >= V)
            return cepe_fail(CEPE_ERR_INVALID_ARG,
                             "token id %d at (row %ld, position %ld) is out of range [0, %d)", ids[i],
                             i / T, i % T, V);
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
        cepe_status st = cepe_rope_for_call(&m->rope, seq_len, &x->rope_cached_len, x->inv_freq_h, &x->rope_mscale);
        if (st) return st;
        if (m->be->upload(m->be, x->inv_freq, x->inv_freq_h, sizeof(float) * (size_t)m->rope.half))
            return backend_fail(m->be);
    }

    const cepe_backend *be = m->be;
    if (mode == CEPE_LOGITS_ALL && be->device && !x->logits_d) { /* every position's logits: device scratch */
        x->logits_d = be->alloc(be, cepe_mul_size((size_t)B * (size_t)x->chunk, (size_t)V * sizeof(float)));
        if (!x->logits_d)
            return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of %s memory for %d x %d logits", be->name, B * x->chunk, V);
    }
    for (int t0 = 0; t0 < T; t0 += x->chunk) {
        const int c = T - t0 < x->chunk ? T - t0 : x->chunk;
        int bad = gather_chunk(x, ids, positions, mask, T, t0, c);
        cepe_status st = bad ? backend_fail(be) : run_layers(x, c);
        if (!st && mode == CEPE_LOGITS_ALL) {
            if (be->device) { /* one GEMM over the chunk's rows, then each row's slice comes back */
                bad |= model_matmul(m, x->logits_d, x->xn, m->w.lm_head, B * c, d, V, 0);
                for (int b = 0; b < B; b++)
                    bad |= be->download(be, logits + ((long)b * T + t0) * V, x->logits_d + (long)b * c * V,
                                        sizeof(float) * (size_t)c * V);
            } else { /* straight into the caller's array */
                for (int b = 0; b < B; b++)
                    bad |= model_matmul(m, logits + ((long)b * T + t0) * V, x->xn + (long)b * c * d, m->w.lm_head, c,
                                      d, V, 0);
            }
        }
        if (!st && t0 + c == T) { /* last chunk: keep each row's final hidden state and logits */
            for (int b = 0; b < B; b++)
                bad |= be->copy(be, x->last_hidden + (long)b * d, x->xn + ((long)b * c + c - 1) * d, sizeof(float) * d);
            if (mode == CEPE_LOGITS_ALL && be->device)
                for (int b = 0; b < B; b++)
                    bad |= be->copy(be, x->last_logits + (long)b * V, x->logits_d + ((long)b * c + c - 1) * V,
                                    sizeof(float) * V);
            else if (mode == CEPE_LOGITS_ALL)
                for (int b = 0; b < B; b++)
                    bad |= be->upload(be, x->last_logits + (long)b * V, logits + ((long)b * T + T - 1) * V,
                                      sizeof(float) * V);
            else
                bad |= model_matmul(m, x->last_logits, x->last_hidden, m->w.lm_head, B, d, V, 0);
            bad |= be->download(be, x->last_logits_h, x->last_logits, sizeof(float) * (size_t)B * V);
        }
        if (!st) st = backend_check(be);
        if (!st && bad) st = backend_fail(be);
        if (st) { /* roll back: the earlier chunks of this call leave the cache */
            x->len = len0;
            x->rope_cached_len = cached0;
            memcpy(x->next_pos, x->saved_pos, sizeof(double) * (size_t)B);
            x->has_logits = 0;
            return st;
        }
        x->len += c;
        if (t0 + c == T) {
            if (mode == CEPE_LOGITS_LAST) memcpy(logits, x->last_logits_h, sizeof(float) * (size_t)B * V);
            x->has_logits = 1;
        }
    }
    return CEPE_OK;
}
