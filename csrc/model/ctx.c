/* ctx.c — per-request state: the KV cache and every scratch buffer, sized
 * once here so the per-token loop never allocates. */
#include <math.h>
#include <string.h>

#include "../common.h"
#include "model.h"

/* Rows of activations processed at once during prefill: bounds scratch memory
 * while keeping GEMMs large enough to run near the BLAS peak. */
#define CEPE_CHUNK_ROWS 512

static cepe_status ctx_create(const cepe_model *m, int batch, int capacity, int single_pass, cepe_ctx **out) {
    if (!m || !out) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_create: NULL argument");
    *out = NULL;
    if (!m->finalized) return cepe_fail(CEPE_ERR_STATE, "the model has unbound weights (call finalize)");
    if (batch < 1) return cepe_fail(CEPE_ERR_INVALID_ARG, "batch size must be >= 1, got %d", batch);
    if (capacity < 1) return cepe_fail(CEPE_ERR_INVALID_ARG, "capacity must be >= 1, got %d", capacity);
    const cepe_config *c = &m->cfg;
    const cepe_backend *be = m->be;
    cepe_ctx *x = cepe_calloc(1, sizeof *x);
    if (!x) return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory creating a context");
    x->m = m;
    x->B = batch;
    x->cap = capacity;
    x->cache_layers = single_pass ? 1 : c->n_layers;
    x->chunk = CEPE_CHUNK_ROWS / batch;
    if (x->chunk < 1) x->chunk = 1;
    if (x->chunk > capacity) x->chunk = capacity;
    atomic_init(&x->interrupt, 0);
    atomic_init(&x->progress_done, 0);
    atomic_init(&x->progress_total, 0);

    const size_t rows = (size_t)batch * (size_t)x->chunk;
    const size_t kvd = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    const size_t qd = (size_t)c->n_heads * (size_t)c->head_dim;
    const size_t cache = cepe_mul_size(
        cepe_mul_size((size_t)x->cache_layers * (size_t)batch, (size_t)capacity), kvd * sizeof(float));
    if (cache == SIZE_MAX) goto oom;
    /* [dev] buffers come from the backend, [host] ones from the heap */
#define DEV(field, count, type)                                                                              \
    x->field = be->alloc(be, cepe_mul_size((size_t)(count), sizeof(type)));                                  \
    if (!x->field) goto oom
#define HOST(field, count, type)                                                                             \
    x->field = cepe_calloc(cepe_mul_size((size_t)(count), 1), sizeof(type));                                 \
    if (!x->field) goto oom
    DEV(k_cache, cache / sizeof(float), float);
    DEV(v_cache, cache / sizeof(float), float);
    DEV(valid, cepe_mul_size((size_t)batch, (size_t)capacity), uint8_t);
    HOST(valid_h, cepe_mul_size((size_t)batch, (size_t)capacity), uint8_t);
    HOST(next_pos, batch, double);
    HOST(saved_pos, batch, double);
    DEV(ids, rows, int32_t);
    HOST(ids_h, rows, int32_t);
    DEV(pos, rows, double);
    HOST(pos_h, rows, double);
    DEV(cos_t, rows * (size_t)m->rope.half, float);
    DEV(sin_t, rows * (size_t)m->rope.half, float);
    DEV(inv_freq, m->rope.half, float);
    HOST(inv_freq_h, m->rope.half, float);
    DEV(x, rows * (size_t)c->hidden_size, float);
    DEV(xn, rows * (size_t)c->hidden_size, float);
    DEV(q, rows * qd, float);
    DEV(k, rows * kvd, float);
    DEV(v, rows * kvd, float);
    DEV(att, rows * qd, float);
    DEV(gate, rows * (size_t)c->intermediate_size, float);
    DEV(up, rows * (size_t)c->intermediate_size, float);
    DEV(last_hidden, (size_t)batch * (size_t)c->hidden_size, float);
    DEV(last_logits, (size_t)batch * (size_t)c->vocab_size, float);
    HOST(last_logits_h, (size_t)batch * (size_t)c->vocab_size, float);
    HOST(step_ids, batch, int32_t);
    if (m->qwork_size) {
        HOST(qwork, m->qwork_size, unsigned char);
    }
#undef DEV
#undef HOST
    if (cepe_ctx_reset_checked(x)) goto fail;
    *out = x;
    return CEPE_OK;
oom:
    cepe_ctx_free(x);
    return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory allocating a context for batch %d x %d tokens",
                     batch, capacity);
fail:
    {
        const cepe_status st = backend_check(be);
        cepe_ctx_free(x);
        return st ? st : cepe_fail(CEPE_ERR_BACKEND, "%s backend: resetting a new context failed", be->name);
    }
}

cepe_status cepe_ctx_create(const cepe_model *m, int batch, int capacity, cepe_ctx **out) {
    return ctx_create(m, batch, capacity, 0, out);
}

cepe_status cepe_ctx_create_single_pass(const cepe_model *m, int batch, int capacity, cepe_ctx **out) {
    return ctx_create(m, batch, capacity, 1, out);
}

void cepe_ctx_free(cepe_ctx *x) {
    if (!x) return;
    const cepe_backend *be = x->m->be;
    void *dev[] = {x->inv_freq,
                   x->k_cache,
                   x->v_cache,
                   x->valid,
                   x->ids,
                   x->pos,
                   x->cos_t,
                   x->sin_t,
                   x->x,
                   x->xn,
                   x->q,
                   x->k,
                   x->v,
                   x->att,
                   x->gate,
                   x->up,
                   x->last_hidden,
                   x->last_logits,
                   x->logits_d,
                   x->ctx_mask,
                   x->cross_k,
                   x->cross_v,
                   x->ctx_states_own,
                   x->nll_logits,
                   x->nll_loss,
                   x->nll_targets,
                   x->nll_x};
    void *host[] = {x->valid_h,       x->next_pos,   x->saved_pos,     x->ids_h,
                    x->pos_h,         x->inv_freq_h, x->last_logits_h, x->step_ids,
                    x->nll_targets_h, x->nll_loss_h, x->nll_rows_h,    x->qwork};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) be->free(be, dev[i]);
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) cepe_free(host[i]);
    cepe_free(x);
}

int cepe_ctx_reset_checked(cepe_ctx *x) {
    x->len = 0;
    x->has_logits = 0;
    memset(x->next_pos, 0, sizeof(double) * (size_t)x->B);
    atomic_store(&x->interrupt, 0);
    /* a fresh request starts from the short table, as a fresh HF model does */
    const size_t half = (size_t)x->m->rope.half;
    memcpy(x->inv_freq_h, x->m->rope.inv_freq, sizeof(float) * half);
    x->rope_mscale = x->m->rope.mscale;
    x->rope_cached_len = cepe_rope_original_len(&x->m->rope.rc);
    x->rope_len_hint = 0;
    return x->m->be->upload(x->m->be, x->inv_freq, x->inv_freq_h, sizeof(float) * half);
}

void cepe_ctx_reset(cepe_ctx *x) {
    if (x) (void)cepe_ctx_reset_checked(x); /* a failed upload is reported by the next call's check */
}

static void drop_context(cepe_ctx *x) {
    const cepe_backend *be = x->m->be;
    be->free(be, x->ctx_mask), be->free(be, x->cross_k), be->free(be, x->cross_v);
    be->free(be, x->ctx_states_own);
    x->ctx_mask = NULL, x->cross_k = NULL, x->cross_v = NULL, x->ctx_states_own = NULL;
    x->ctx_states = NULL;
    x->ctx_N = 0;
    x->cross_kept = 0;
}

/* Attaches N context tokens per row whose states are either on the host
 * (states) or already in a backend buffer this context now owns (owned, from
 * cepe_ctx_encode_context). Any previous context is dropped first. */
static cepe_status attach_context(cepe_ctx *x, const float *states, float *owned, const uint8_t *mask, int N,
                                  int keep_kv) {
    const cepe_model *m = x->m;
    const cepe_config *c = &m->cfg;
    const cepe_backend *be = m->be;
    drop_context(x);
    x->ctx_states_own = owned;
    const size_t kvd = (size_t)c->n_kv_heads * c->head_dim;
    const size_t rows = (size_t)x->B * (size_t)N;
    if (rows > INT32_MAX) {
        drop_context(x);
        return cepe_fail(CEPE_ERR_INVALID_ARG, "context too large: %d rows x %d tokens", x->B, N);
    }
    const size_t layers = keep_kv ? (size_t)c->n_cross_layers : 1;
    x->ctx_mask = be->alloc(be, rows);
    x->cross_k = be->alloc(be, cepe_mul_size(cepe_mul_size(layers, rows), kvd * sizeof(float)));
    x->cross_v = be->alloc(be, cepe_mul_size(cepe_mul_size(layers, rows), kvd * sizeof(float)));
    if (!x->ctx_mask || !x->cross_k || !x->cross_v) {
        drop_context(x);
        return cepe_fail(CEPE_ERR_OUT_OF_MEMORY,
                         "out of memory for cross-attention K/V of %d context tokens x %d rows%s", N, x->B,
                         keep_kv ? " (try keep_cross_kv=False)" : "");
    }
    int bad = 0;
    if (mask)
        bad |= be->upload(be, x->ctx_mask, mask, rows);
    else
        bad |= be->fill(be, x->ctx_mask, 1, rows);
    x->ctx_N = N;
    x->cross_kept = keep_kv != 0;
    const float *dev_states = owned ? owned : states; /* the states where the ops can read them */
    const size_t state_bytes = cepe_mul_size(rows, (size_t)c->encoder_hidden_size * sizeof(float));
    if (be->device && !owned) { /* kept K/V: a temporary device copy; recomputed: one for the request */
        x->ctx_states_own = state_bytes == SIZE_MAX ? NULL : be->alloc(be, state_bytes);
        if (!x->ctx_states_own) {
            drop_context(x);
            return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of %s memory for %d context states", be->name, N);
        }
        bad |= be->upload(be, x->ctx_states_own, states, state_bytes);
        dev_states = x->ctx_states_own;
    }
    x->ctx_states = dev_states;
    if (keep_kv) {
        for (int l = m->first_cross; l < c->n_layers && !bad; l++) {
            const layer_weights *w = &m->w.layers[l];
            const size_t off = (size_t)(l - m->first_cross) * rows * kvd;
            bad |= model_matmul(m, x->qwork, x->cross_k + off, dev_states, &w->cross_wk, (int)rows, 0);
            bad |= model_matmul(m, x->qwork, x->cross_v + off, dev_states, &w->cross_wv, (int)rows, 0);
        }
        x->ctx_states = NULL; /* never read again: the caller may free them */
    }
    cepe_status st = backend_check(be);
    if (!st && bad) st = cepe_fail(CEPE_ERR_BACKEND, "%s backend: setting the context failed", be->name);
    if (keep_kv && x->ctx_states_own && !st) { /* the K/V are made: the owned states can go */
        be->free(be, x->ctx_states_own);
        x->ctx_states_own = NULL;
    }
    if (st) drop_context(x);
    return st;
}

cepe_status cepe_ctx_set_context(cepe_ctx *x, const float *states, const uint8_t *mask, int N, int keep_kv) {
    if (!x) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_set_context: NULL context");
    if (N == 0) {
        drop_context(x);
        return CEPE_OK;
    }
    if (N < 0 || !states)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_set_context: bad context (N=%d)", N);
    if (x->m->cfg.n_cross_layers == 0)
        return cepe_fail(CEPE_ERR_STATE,
                         "this model has no cross-attention layers: it cannot take a context");
    return attach_context(x, states, NULL, mask, N, keep_kv);
}

cepe_status cepe_ctx_encode_context(cepe_ctx *x, const int32_t *ids, const uint8_t *mask, int n_chunks, int L,
                                    int keep_kv) {
    if (!x || !ids) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_encode_context: NULL argument");
    const cepe_model *m = x->m;
    if (m->cfg.n_cross_layers == 0)
        return cepe_fail(CEPE_ERR_STATE,
                         "this model has no cross-attention layers: it cannot take a context");
    if (n_chunks < 1 || L < 1 || (long)n_chunks * L > INT32_MAX)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_encode_context: bad context shape %d x %d", n_chunks,
                         L);
    const long rows_per_batch = (long)n_chunks * L;
    if ((long)x->B * n_chunks > INT32_MAX)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "context too large: %d rows x %d chunks", x->B, n_chunks);
    drop_context(x); /* the old context's memory goes before the new states are made */
    const cepe_backend *be = m->be;
    const size_t bytes = cepe_mul_size(cepe_mul_size((size_t)x->B, (size_t)rows_per_batch),
                                       (size_t)m->enc_cfg.hidden_size * sizeof(float));
    float *states = bytes == SIZE_MAX ? NULL : be->alloc(be, bytes);
    if (!states)
        return cepe_fail(CEPE_ERR_OUT_OF_MEMORY,
                         "out of %s memory for the encoder states of %ld context tokens x %d rows", be->name,
                         rows_per_batch, x->B);
    cepe_status st = model_encode_into(m, ids, mask, x->B * n_chunks, L, states, 1, x);
    if (!st && !be->device) { /* on the host the states are cheap to check; on a device a non-finite
                               * state surfaces in the logits the caller checks */
        const size_t n = bytes / sizeof(float);
        float sum = 0.0f;
        for (size_t i = 0; i < n; i++) sum += states[i]; /* final-normed: the sum cannot overflow by itself */
        if (!isfinite(sum))
            st = cepe_fail(CEPE_ERR_NUMERIC,
                           "the encoder overflowed float32: its states of encoder_input_ids are not "
                           "finite (NaN or inf); check the encoder's weights");
    }
    if (st) {
        be->free(be, states);
        return st;
    }
    return attach_context(x, NULL, states, mask, (int)rows_per_batch, keep_kv);
}

void cepe_ctx_set_rope_length(cepe_ctx *x, int seq_len) {
    if (x) x->rope_len_hint = seq_len > 0 ? seq_len : 0;
}

void cepe_ctx_state_sizes(const cepe_ctx *x, int *n_layers, int *kv_dim, int *rope_half) {
    const cepe_config *c = &x->m->cfg;
    *n_layers = c->n_layers;
    *kv_dim = c->n_kv_heads * c->head_dim;
    *rope_half = x->m->rope.half;
}

/* Moves the first len positions of every (layer, row) block of the KV cache
 * between the context's memory and (n_layers, B, len, kvd) host arrays. */
static int copy_kv(cepe_ctx *x, float *k, float *v, int len, int to_host) {
    const cepe_backend *be = x->m->be;
    const size_t kvd = (size_t)x->m->cfg.n_kv_heads * (size_t)x->m->cfg.head_dim;
    const size_t rows = (size_t)x->m->cfg.n_layers * (size_t)x->B, bytes = (size_t)len * kvd * sizeof(float);
    for (size_t r = 0; r < rows && bytes; r++) {
        float *kc = x->k_cache + r * (size_t)x->cap * kvd, *vc = x->v_cache + r * (size_t)x->cap * kvd;
        float *kh = k + r * (size_t)len * kvd, *vh = v + r * (size_t)len * kvd;
        if (to_host ? be->download(be, kh, kc, bytes) || be->download(be, vh, vc, bytes)
                    : be->upload(be, kc, kh, bytes) || be->upload(be, vc, vh, bytes))
            return -1;
    }
    return 0;
}

cepe_status cepe_ctx_save(const cepe_ctx *c, cepe_ctx_state *st) {
    if (!c || !st) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_save: NULL argument");
    if (c->cache_layers != c->m->cfg.n_layers)
        return cepe_fail(CEPE_ERR_STATE, "a single-pass context keeps one layer's K/V: it cannot be saved");
    cepe_ctx *x = (cepe_ctx *)c; /* copy_kv only reads through it */
    const cepe_backend *be = x->m->be;
    if (st->len != x->len)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_save: the state holds %d tokens, the cache %d",
                         st->len, x->len);
    if (copy_kv(x, st->k, st->v, x->len, 1)) return backend_fail(be);
    for (int b = 0; b < x->B; b++)
        if (x->len && be->download(be, st->valid + (size_t)b * x->len, x->valid + (size_t)b * x->cap, x->len))
            return backend_fail(be);
    memcpy(st->next_pos, x->next_pos, sizeof(double) * (size_t)x->B);
    memcpy(st->inv_freq, x->inv_freq_h, sizeof(float) * (size_t)x->m->rope.half);
    memcpy(st->last_logits, x->last_logits_h, sizeof(float) * (size_t)x->B * (size_t)x->m->cfg.vocab_size);
    st->rope_mscale = x->rope_mscale;
    st->rope_cached_len = x->rope_cached_len;
    st->rope_len_hint = x->rope_len_hint;
    st->has_logits = x->has_logits;
    return backend_check(be);
}

cepe_status cepe_ctx_load(cepe_ctx *x, const cepe_ctx_state *st) {
    if (!x || !st) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_load: NULL argument");
    if (x->cache_layers != x->m->cfg.n_layers)
        return cepe_fail(CEPE_ERR_STATE,
                         "a single-pass context keeps one layer's K/V: it cannot load a cache");
    if (st->len < 0 || st->len > x->cap)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "a cache of %d tokens does not fit the capacity %d", st->len,
                         x->cap);
    const cepe_backend *be = x->m->be;
    x->len = 0; /* empty until every copy has succeeded */
    x->has_logits = 0;
    if (copy_kv(x, st->k, st->v, st->len, 0)) return backend_fail(be);
    memset(x->valid_h, 0, (size_t)x->B * (size_t)x->cap);
    for (int b = 0; b < x->B; b++)
        memcpy(x->valid_h + (size_t)b * x->cap, st->valid + (size_t)b * st->len, (size_t)st->len);
    const size_t half = (size_t)x->m->rope.half, logits = (size_t)x->B * (size_t)x->m->cfg.vocab_size;
    memcpy(x->inv_freq_h, st->inv_freq, sizeof(float) * half);
    memcpy(x->last_logits_h, st->last_logits, sizeof(float) * logits);
    if (be->upload(be, x->valid, x->valid_h, (size_t)x->B * (size_t)x->cap) ||
        be->upload(be, x->inv_freq, x->inv_freq_h, sizeof(float) * half) ||
        be->upload(be, x->last_logits, x->last_logits_h, sizeof(float) * logits))
        return backend_fail(be);
    cepe_status s = backend_check(be);
    if (s) return s;
    memcpy(x->next_pos, st->next_pos, sizeof(double) * (size_t)x->B);
    x->rope_mscale = st->rope_mscale;
    x->rope_cached_len = st->rope_cached_len;
    x->rope_len_hint = st->rope_len_hint;
    x->has_logits = st->has_logits != 0;
    x->len = st->len;
    return CEPE_OK;
}

int cepe_ctx_context_length(const cepe_ctx *x) { return x ? x->ctx_N : 0; }

int cepe_ctx_length(const cepe_ctx *x) { return x ? x->len : 0; }
int cepe_ctx_capacity(const cepe_ctx *x) { return x ? x->cap : 0; }
int cepe_ctx_batch(const cepe_ctx *x) { return x ? x->B : 0; }
void cepe_ctx_progress(const cepe_ctx *x, long *done, long *total) {
    *done = x ? atomic_load(&x->progress_done) : 0;
    *total = x ? atomic_load(&x->progress_total) : 0;
}
void cepe_ctx_interrupt(cepe_ctx *x) {
    if (x) atomic_store(&x->interrupt, 1);
}
