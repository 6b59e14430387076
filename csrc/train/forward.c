/* forward.c — the training forward of a CEPE model: the encoder over the
 * context chunks, then the decoder with cross-attention (spec §2-§3), both
 * through the inference model's own blocks (block.c, encoder.c) with a
 * block_record per layer for what backward.c needs. Activations live in
 * one arena carved for the batch shape (llm.c's fill_in_activation_sizes +
 * malloc_and_point_activations), reused while the shape stays the same.
 *
 * What is kept: only layers the backward visits. With a frozen decoder that
 * is the cross-attention layers and above (nothing below the first one has a
 * trainable weight); with a frozen encoder nothing of it (its output is
 * detached, so cepe_model_encode runs it). */
#include <string.h>

#include "../common.h"
#include "../ops/ops.h"
#include "train.h"

/* ------------------------------------------------------------------- arena */

typedef struct {
    char *base; /* NULL: measuring */
    size_t used;
    int overflow;
} carver;

static void *take(carver *cv, size_t count, size_t size) {
    const size_t bytes = cepe_mul_size(count, size);
    if (bytes == SIZE_MAX || cv->used > SIZE_MAX - bytes - 64) {
        cv->overflow = 1;
        return NULL;
    }
    void *p = cv->base ? cv->base + cv->used : NULL;
    cv->used += (bytes + 63) & ~(size_t)63; /* every buffer on its own cache line */
    return p;
}
#define F(n) ((float *)take(cv, (n), sizeof(float)))

static void carve_scratch(carver *cv, stack_scratch *s, const cepe_config *c, size_t N) {
    const size_t d = (size_t)c->hidden_size, ff = (size_t)c->intermediate_size;
    const size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    s->dx = F(N * d), s->dxn = F(N * d), s->xn = F(N * d);
    s->dq = F(N * qd), s->datt = F(N * qd), s->dk = F(N * kvd), s->dv = F(N * kvd);
    s->h = F(N * ff), s->dh = F(N * ff), s->dgate = F(N * ff), s->dup = F(N * ff);
}

static void carve_block(carver *cv, block_record *a, const cepe_config *c, size_t N) {
    const size_t d = (size_t)c->hidden_size, ff = (size_t)c->intermediate_size;
    const size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    a->x_in = F(N * d), a->x_post = F(N * d);
    a->q = F(N * qd), a->k = F(N * kvd), a->v = F(N * kvd), a->att = F(N * qd),
    a->lse = F(N * (size_t)c->n_heads);
    a->gate = F(N * ff), a->up = F(N * ff);
}

/* Assigns every activation pointer (or, with cv->base NULL, measures). */
static void carve(cepe_train *t, carver *cv, int B, int T, int n_ctx, int L) {
    const cepe_model *m = t->m;
    const cepe_config *c = &m->cfg;
    const size_t N = (size_t)B * T, d = (size_t)c->hidden_size, V = (size_t)c->vocab_size;
    const size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    const size_t Nc = (size_t)n_ctx * L, Ne = (size_t)B * Nc;
    const size_t R = (size_t)train_logit_rows(t->cfg.logit_floats, T, (int)V);
    t->inv_freq = F((size_t)m->rope.half);
    t->einv_freq = m->has_encoder ? F((size_t)m->enc_rope.half) : NULL;
    t->x = F(N * d), t->x_final = F(N * d), t->xnf = F(N * d), t->dxnf = F(N * d);
    t->logits = F(R * V), t->dlogits = F(R * V), t->losses = F(N), t->kl_losses = F(N);
    t->targets = take(cv, N, sizeof(int32_t));
    t->cos_t = F(N * m->rope.half), t->sin_t = F(N * m->rope.half);
    t->pos = take(cv, N, sizeof(double));
    carve_scratch(cv, &t->ds, c, N);
    for (int l = 0; l < c->n_layers; l++) {
        block_record *a = &t->dec[l];
        memset(a, 0, sizeof *a); /* host struct */
        if (l < t->dec_lo) continue;
        carve_block(cv, a, c, N);
        if (l >= m->first_cross && Nc > 0) {
            a->x_mid = F(N * d), a->qc = F(N * qd), a->attc = F(N * qd), a->lsec = F(N * (size_t)c->n_heads);
            a->kc = F(Ne * kvd), a->vc = F(Ne * kvd);
        }
    }
    t->E = t->dE = t->ex = t->ex_final = t->dkc = t->dvc = t->ecos_t = t->esin_t = NULL;
    t->ctx_mask = NULL;
    t->epos = NULL;
    if (Nc == 0) return;
    const cepe_config *e = &m->enc_cfg;
    const size_t de = (size_t)e->hidden_size;
    t->E = F(Ne * de);
    t->ctx_mask = take(cv, Ne, 1);
    t->dkc = F(Ne * kvd), t->dvc = F(Ne * kvd);
    if (!t->train_encoder) return;
    t->ex = F(Ne * de), t->ex_final = F(Ne * de), t->dE = F(Ne * de);
    t->ecos_t = F(Ne * m->enc_rope.half), t->esin_t = F(Ne * m->enc_rope.half);
    t->epos = take(cv, Ne, sizeof(double));
    carve_scratch(cv, &t->es, e, Ne);
    for (int l = 0; l < e->n_layers; l++) carve_block(cv, &t->enc[l], e, Ne);
}

/* The host mirrors (train.h), carved like the arena. */
static void carve_host(cepe_train *t, carver *cv, int B, int T, int n_ctx, int L) {
    const size_t N = (size_t)B * T, Ne = (size_t)B * n_ctx * L;
    t->pos_h = take(cv, N, sizeof(double)), t->epos_h = take(cv, Ne ? Ne : 1, sizeof(double));
    t->targets_h = take(cv, N, sizeof(int32_t)), t->ctx_mask_h = take(cv, Ne ? Ne : 1, 1);
    t->losses_h = F(N), t->kl_losses_h = F(N);
}

#undef F

/* (Re)carves the arena when the batch shape changes. */
static cepe_status ensure_arena(cepe_train *t, const cepe_train_batch *b) {
    const cepe_backend *be = t->m->be;
    const int n_ctx = b->n_ctx > 0 ? b->n_ctx : 0, L = n_ctx > 0 ? b->L : 0;
    const int lo = t->train_decoder ? 0 : (n_ctx > 0 ? t->m->first_cross : t->m->cfg.n_layers);
    if (t->arena && t->B == b->B && t->T == b->T && t->n_ctx == n_ctx && t->L == L && t->dec_lo == lo)
        return CEPE_OK;
    be->free(be, t->arena);
    cepe_free(t->host_arena);
    t->arena = t->host_arena = NULL;
    t->B = 0;
    t->dec_lo = lo;
    carver cv = {0}, hv = {0};
    carve(t, &cv, b->B, b->T, n_ctx, L);
    carve_host(t, &hv, b->B, b->T, n_ctx, L);
    if (cv.overflow || hv.overflow || !(t->arena = be->alloc(be, cv.used)) ||
        !(t->host_arena = cepe_calloc(hv.used, 1))) {
        be->free(be, t->arena);
        t->arena = NULL;
        return cepe_fail(CEPE_ERR_OUT_OF_MEMORY,
                         "out of %s memory for the training activations (%zu MB for %d x %d tokens)",
                         be->name, cv.used >> 20, b->B, b->T);
    }
    cv = (carver){.base = t->arena};
    carve(t, &cv, b->B, b->T, n_ctx, L);
    hv = (carver){.base = t->host_arena};
    carve_host(t, &hv, b->B, b->T, n_ctx, L);
    t->B = b->B, t->T = b->T, t->n_ctx = n_ctx, t->L = L;
    return CEPE_OK;
}

/* ----------------------------------------------------------------- forward */

static cepe_status encoder_forward(cepe_train *t, const cepe_train_batch *b) {
    const cepe_model *m = t->m;
    const cepe_backend *be = m->be;
    const int n_chunks = b->B * b->n_ctx, L = b->L, Ne = n_chunks * L;
    for (long i = 0; i < (long)Ne; i++)
        t->ctx_mask_h[i] = b->encoder_attention_mask ? b->encoder_attention_mask[i] != 0 : 1;
    be->upload(be, t->ctx_mask, t->ctx_mask_h, (size_t)Ne);
    if (!t->train_encoder) /* detached: the inference encoder, nothing kept */
        return model_encode_into(m, b->encoder_input_ids, b->encoder_attention_mask, n_chunks, L, t->E,
                                 be->device, NULL);

    cepe_status st = encoder_rope_table(m, Ne, L, t->epos_h, t->epos, t->einv_freq, t->ecos_t, t->esin_t);
    if (st) return st;
    const block_scratch s = {
        .xn = t->es.xn, .cos_t = t->ecos_t, .sin_t = t->esin_t, .qwork = t->qwork, .h = t->es.h};
    float *x = t->ex;
    model_embedding(m, x, t->db.encoder_input_ids, &m->enc.embed, Ne);
    encoder_layers(m, x, t->ctx_mask, n_chunks, L, &s, t->enc);
    const cepe_config *e = &m->enc_cfg;
    be->copy(be, t->ex_final, x, sizeof(float) * (size_t)Ne * e->hidden_size);
    be->rmsnorm(be, t->E, x, m->enc.final_norm, Ne, e->hidden_size, e->rms_norm_eps, t->n_threads);
    return CEPE_OK;
}

cepe_status train_forward(cepe_train *t, const cepe_train_batch *b) {
    cepe_status st = ensure_arena(t, b);
    if (st) return st;
    const cepe_model *m = t->m;
    const cepe_config *c = &m->cfg;
    const cepe_backend *be = m->be;
    const int B = b->B, T = b->T, N = B * T, nt = t->n_threads;
    const int d = c->hidden_size;
    const int Nc = t->n_ctx * t->L, Ne = B * Nc;
    if (Nc > 0 && (st = encoder_forward(t, b))) return st;

    double max_pos = 0.0;
    for (int r = 0; r < B; r++) {
        double next = 0.0;
        for (int i = r * T; i < (r + 1) * T; i++) {
            const int real = !b->attention_mask || b->attention_mask[i];
            t->pos_h[i] = model_position(b->positions, i, real, &next);
            max_pos = t->pos_h[i] > max_pos ? t->pos_h[i] : max_pos;
        }
    }
    float inv_freq[CEPE_MAX_HEAD_DIM / 2], mscale;
    int cached = cepe_rope_original_len(&m->rope.rc);
    const int seq_len = max_pos + 1.0 < 2147483647.0 ? (int)max_pos + 1 : 2147483647;
    if ((st = cepe_rope_for_call(&m->rope, seq_len, &cached, inv_freq, &mscale))) return st;
    be->upload(be, t->pos, t->pos_h, sizeof(double) * (size_t)N);
    be->upload(be, t->inv_freq, inv_freq, sizeof(float) * (size_t)m->rope.half);
    be->rope_table(be, t->cos_t, t->sin_t, t->pos, t->inv_freq, N, m->rope.half, mscale);

    const attention_shape self = block_shape(c, B, T, T, 1);
    const stack_scratch *ss = &t->ds;
    /* layers below dec_lo run in the gradient scratch, nothing kept */
    const block_scratch scratch = {.xn = ss->xn,
                                   .q = ss->dq,
                                   .k = ss->dk,
                                   .v = ss->dv,
                                   .att = ss->datt,
                                   .gate = ss->dgate,
                                   .up = ss->dup,
                                   .cos_t = t->cos_t,
                                   .sin_t = t->sin_t,
                                   .qwork = t->qwork};
    float *x = t->x;
    model_embedding(m, x, t->db.input_ids, &m->w.embed, N);
    for (int l = 0; l < c->n_layers; l++) {
        const layer_weights *w = &m->w.layers[l];
        block_record *a = &t->dec[l];
        const block_scratch s = l >= t->dec_lo ? block_scratch_recording(&scratch, a, ss->h) : scratch;
        block_kv_src cross = {.valid = t->ctx_mask, .shape = block_shape(c, B, T, Nc, 0)};
        const int has_cross = l >= m->first_cross && Nc > 0;
        if (has_cross) { /* CEPE: between self-attention and the MLP (spec §3) */
            block_cross_kv(m, w, t->qwork, a->kc, a->vc, t->E, Ne);
            cross.k = a->kc, cross.v = a->vc;
        }
        block_layer(m, w, c, x, &s, N, &m->rope, t->db.attention_mask, &self, has_cross ? &cross : NULL, nt);
    }
    be->copy(be, t->x_final, x, sizeof(float) * (size_t)N * d);
    be->rmsnorm(be, t->xnf, x, m->w.final_norm, N, d, c->rms_norm_eps, nt);
    return CEPE_OK;
}
