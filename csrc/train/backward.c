/* backward.c — the losses and the backward pass of a CEPE model, in the
 * reverse order of forward.c: logits → final norm → decoder layers (MLP,
 * cross-attention, self-attention) → encoder states → encoder layers →
 * embeddings. Every d-buffer of a weight is a gradient view from t->gm: NULL
 * for a frozen weight, so matmul_backward / rmsnorm_backward form only the
 * input gradient there (the activations still pass gradients on). */
#include <string.h>

#include "../common.h"
#include "../ops/ops.h"
#include "train.h"

/* The gradient buffer behind a view (a model's weight pointers are const;
 * the gradient model's point into t->grads, which is ours to write). */
#define G(p) ((float *)(p))

/* ------------------------------------------------------------ block pieces */

/* x_out = x_post + down(silu(gate) * up(...)): s->dx (the gradient of x_out)
 * gains the MLP's contribution to the gradient of x_post. */
static void mlp_backward(const cepe_train *t, const stack_scratch *s, const block_record *a,
                         const layer_weights *w, const layer_weights *g, const cepe_config *c, int N) {
    const cepe_backend *be = t->m->be;
    const int d = c->hidden_size, ff = c->intermediate_size, nt = t->n_threads;
    be->rmsnorm(be, s->xn, a->x_post, w->ffn_norm, N, d, c->rms_norm_eps, nt); /* recomputed, not kept */
    be->swiglu(be, s->h, a->gate, a->up, (long)N * ff, nt);
    model_matmul_backward(t->m, s->dh, G(g->w_down.data), s->dx, s->h, &w->w_down, N, 0);
    be->fill(be, s->dgate, 0, sizeof(float) * (size_t)N * ff);
    be->fill(be, s->dup, 0, sizeof(float) * (size_t)N * ff);
    be->swiglu_backward(be, s->dgate, s->dup, s->dh, a->gate, a->up, (long)N * ff);
    model_matmul_backward(t->m, s->dxn, G(g->w_gate.data), s->dgate, s->xn, &w->w_gate, N, 0);
    model_matmul_backward(t->m, s->dxn, G(g->w_up.data), s->dup, s->xn, &w->w_up, N, 1);
    be->rmsnorm_backward(be, s->dx, G(g->ffn_norm), s->dxn, a->x_post, w->ffn_norm, N, d, c->rms_norm_eps);
}

/* x_mid = x_in + o_proj(attention(RoPE(q), RoPE(k), v)) with q, k, v from
 * RMSNorm(x_in): s->dx gains the gradient of x_in. */
static void self_attn_backward(const cepe_train *t, const stack_scratch *s, const block_record *a,
                               const layer_weights *w, const layer_weights *g, const cepe_config *c,
                               const rope_state *rope, const float *cos_t, const float *sin_t,
                               const attention_shape *shape, const uint8_t *valid, int N) {
    const cepe_backend *be = t->m->be;
    const int d = c->hidden_size, hd = c->head_dim, nt = t->n_threads;
    const int qd = c->n_heads * hd, kvd = c->n_kv_heads * hd;
    const int il = rope->rc.layout == CEPE_ROPE_INTERLEAVED;
    model_matmul_backward(t->m, s->datt, G(g->wo.data), s->dx, a->att, &w->wo, N, 0);
    be->fill(be, s->dq, 0, sizeof(float) * (size_t)N * qd);
    be->fill(be, s->dk, 0, sizeof(float) * (size_t)N * kvd);
    be->fill(be, s->dv, 0, sizeof(float) * (size_t)N * kvd);
    be->attention_backward(be, s->dq, s->dk, s->dv, s->datt, a->q, a->k, a->v, a->att, a->lse, valid, shape,
                           nt);
    be->rope_backward(be, s->dq, cos_t, sin_t, N, c->n_heads, hd, rope->half, il);
    be->rope_backward(be, s->dk, cos_t, sin_t, N, c->n_kv_heads, hd, rope->half, il);
    be->rmsnorm(be, s->xn, a->x_in, w->attn_norm, N, d, c->rms_norm_eps, nt);
    model_matmul_backward(t->m, s->dxn, G(g->wq.data), s->dq, s->xn, &w->wq, N, 0);
    model_matmul_backward(t->m, s->dxn, G(g->wk.data), s->dk, s->xn, &w->wk, N, 1);
    model_matmul_backward(t->m, s->dxn, G(g->wv.data), s->dv, s->xn, &w->wv, N, 1);
    be->rmsnorm_backward(be, s->dx, G(g->attn_norm), s->dxn, a->x_in, w->attn_norm, N, d, c->rms_norm_eps);
}

/* x_post = x_mid + o_proj(attention(q_proj(RMSNorm_cross(x_mid)), k_proj(E),
 * v_proj(E))): s->dx gains the gradient of x_mid; t->dE (when the encoder
 * trains) that of the encoder states. */
static void cross_attn_backward(cepe_train *t, const block_record *a, const layer_weights *w,
                                const layer_weights *g, const attention_shape *shape, int N) {
    const cepe_model *m = t->m;
    const cepe_config *c = &m->cfg;
    const stack_scratch *s = &t->ds;
    const int d = c->hidden_size, qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    const int Ne = t->B * t->n_ctx * t->L, nt = t->n_threads;
    const cepe_backend *be = m->be;
    model_matmul_backward(t->m, s->datt, G(g->cross_wo.data), s->dx, a->attc, &w->cross_wo, N, 0);
    be->fill(be, s->dq, 0, sizeof(float) * (size_t)N * qd);
    be->fill(be, t->dkc, 0, sizeof(float) * (size_t)Ne * kvd);
    be->fill(be, t->dvc, 0, sizeof(float) * (size_t)Ne * kvd);
    be->attention_backward(be, s->dq, t->dkc, t->dvc, s->datt, a->qc, a->kc, a->vc, a->attc, a->lsec,
                           t->ctx_mask, shape, nt);
    be->rmsnorm(be, s->xn, a->x_mid, w->cross_norm, N, d, c->rms_norm_eps, nt);
    model_matmul_backward(t->m, s->dxn, G(g->cross_wq.data), s->dq, s->xn, &w->cross_wq, N, 0);
    be->rmsnorm_backward(be, s->dx, G(g->cross_norm), s->dxn, a->x_mid, w->cross_norm, N, d, c->rms_norm_eps);
    float *dE = t->train_encoder ? t->dE : NULL; /* frozen encoder: its output is detached */
    model_matmul_backward(t->m, dE, G(g->cross_wk.data), t->dkc, t->E, &w->cross_wk, Ne, 1);
    model_matmul_backward(t->m, dE, G(g->cross_wv.data), t->dvc, t->E, &w->cross_wv, Ne, 1);
}

/* ------------------------------------------------------------------ losses */

/* Shifted labels: position p predicts label p+1; the last position and
 * ignored labels get CEPE_IGNORE_INDEX. Without labels, input_ids are the
 * labels and padding (attention_mask 0) is ignored. A padded position
 * predicts nothing either (it sees no real token; HF would score the first
 * real token of a left-padded row from an all-masked softmax there).
 * Returns the count of counted targets. */
static long shift_labels(int32_t *targets, const cepe_train_batch *b) {
    long count = 0;
    for (int r = 0; r < b->B; r++)
        for (int p = 0; p < b->T; p++) {
            const long i = (long)r * b->T + p, j = i + 1;
            int32_t y = CEPE_IGNORE_INDEX;
            if (p + 1 < b->T && (!b->attention_mask || b->attention_mask[i])) {
                if (b->labels)
                    y = b->labels[j];
                else if (!b->attention_mask || b->attention_mask[j])
                    y = b->input_ids[j];
            }
            targets[i] = y;
            count += y != CEPE_IGNORE_INDEX;
        }
    return count;
}

/* The LM cross-entropy and the CEPED KL from the final normed states, chunk
 * by chunk of logits; with `grad`, their gradient w.r.t. t->xnf in t->dxnf
 * (and lm_head's, when it trains). */
static void losses_and_head_backward(cepe_train *t, const cepe_train_batch *b, double grad_scale, int grad,
                                     cepe_train_stats *out) {
    const cepe_model *m = t->m;
    const cepe_backend *be = m->be;
    const int B = b->B, T = b->T, V = m->cfg.vocab_size, d = m->cfg.hidden_size;
    const long count = shift_labels(t->targets_h, b);
    be->upload(be, t->targets, t->targets_h, sizeof(int32_t) * (size_t)B * T);
    const long kl_rows = (long)B * b->T_kl;
    const float lm_scale = count ? (float)(grad_scale * t->cfg.lm_loss_cof / (double)count) : 0.0f;
    const float kl_scale = kl_rows ? (float)(grad_scale * t->cfg.kl_loss_cof / (double)kl_rows) : 0.0f;
    const int kl_from = T - b->T_kl; /* the tables cover the last T_kl positions */
    const int R = train_logit_rows(t->cfg.logit_floats, T, V);
    for (int r = 0; r < B; r++)
        for (int p0 = 0; p0 < T; p0 += R) {
            const int nr = T - p0 < R ? T - p0 : R;
            const long row0 = (long)r * T + p0;
            const float *xnf = t->xnf + row0 * d;
            model_matmul(m, t->qwork, t->logits, xnf, &m->w.lm_head, nr, 0);
            if (grad) be->fill(be, t->dlogits, 0, sizeof(float) * (size_t)nr * V);
            float *dl = grad ? t->dlogits : NULL;
            be->cross_entropy(be, t->losses + row0, dl, t->logits, t->targets + row0, nr, V, lm_scale);
            const int k0 = p0 > kl_from ? p0 : kl_from; /* first position of this chunk with a table */
            if (b->T_kl > 0 && k0 < p0 + nr) {
                const long tr = (long)r * b->T_kl + (k0 - kl_from); /* its table row */
                const int o = k0 - p0;
                be->kl_topk(be, t->kl_losses + row0 + o, dl ? dl + (long)o * V : NULL,
                            t->logits + (long)o * V, t->db.distill_prob + tr * (b->K + 1),
                            t->db.distill_index + tr * b->K, p0 + nr - k0, V, b->K, t->cfg.kl_mode,
                            (float)t->cfg.kl_delta, kl_scale);
            }
            if (grad) /* d xnf = dlogits · lm_head; d lm_head += dlogitsᵀ · xnf */
                model_matmul_backward(t->m, t->dxnf + row0 * d, G(t->gm->w.lm_head.data), t->dlogits, xnf,
                                      &m->w.lm_head, nr, 0);
        }
    be->download(be, t->losses_h, t->losses, sizeof(float) * (size_t)B * T);
    if (b->T_kl > 0) be->download(be, t->kl_losses_h, t->kl_losses, sizeof(float) * (size_t)B * T);
    double lm = 0.0, kl = 0.0;
    for (long i = 0; i < (long)B * T; i++) lm += t->losses_h[i];
    for (int r = 0; r < B; r++)
        for (int p = kl_from; p < T && b->T_kl > 0; p++) kl += t->kl_losses_h[(long)r * T + p];
    out->tokens = count;
    out->lm_loss = count ? lm / (double)count : 0.0;
    out->kl_loss = kl_rows ? kl / (double)kl_rows : 0.0;
    out->loss = t->cfg.lm_loss_cof * out->lm_loss + (kl_rows ? t->cfg.kl_loss_cof * out->kl_loss : 0.0);
}

/* ---------------------------------------------------------------- backward */

static void encoder_backward(cepe_train *t, const cepe_train_batch *b) {
    const cepe_model *m = t->m;
    const cepe_backend *be = m->be;
    const cepe_config *e = &m->enc_cfg;
    const int n_chunks = b->B * b->n_ctx, L = b->L, Ne = n_chunks * L, de = e->hidden_size;
    const attention_shape shape = block_shape(e, n_chunks, L, L, 0);
    const stack_scratch *s = &t->es;
    be->fill(be, s->dx, 0, sizeof(float) * (size_t)Ne * de);
    be->rmsnorm_backward(be, s->dx, G(t->gm->enc.final_norm), t->dE, t->ex_final, m->enc.final_norm, Ne, de,
                         e->rms_norm_eps);
    for (int l = e->n_layers - 1; l >= 0; l--) {
        const layer_weights *w = &m->enc.layers[l], *g = &t->gm->enc.layers[l];
        mlp_backward(t, s, &t->enc[l], w, g, e, Ne);
        self_attn_backward(t, s, &t->enc[l], w, g, e, &m->enc_rope, t->ecos_t, t->esin_t, &shape, t->ctx_mask,
                           Ne);
    }
    if (t->gm->enc.embed.data)
        be->embedding_backward(be, G(t->gm->enc.embed.data), s->dx, t->db.encoder_input_ids, Ne, de);
}

cepe_status train_backward(cepe_train *t, const cepe_train_batch *b, double grad_scale,
                           cepe_train_stats *out) {
    const cepe_model *m = t->m;
    const cepe_backend *be = m->be;
    const cepe_config *c = &m->cfg;
    const int B = b->B, T = b->T, N = B * T, d = c->hidden_size;
    const int Nc = t->n_ctx * t->L;
    const int grad = t->dec_lo < c->n_layers || t->gm->w.lm_head.data || t->gm->w.final_norm;
    losses_and_head_backward(t, b, grad_scale, grad, out);
    if (!grad) return CEPE_OK; /* nothing trainable is reached by this batch (no context, frozen decoder) */

    const stack_scratch *s = &t->ds;
    be->fill(be, s->dx, 0, sizeof(float) * (size_t)N * d);
    be->rmsnorm_backward(be, s->dx, G(t->gm->w.final_norm), t->dxnf, t->x_final, m->w.final_norm, N, d,
                         c->rms_norm_eps);
    if (t->dE) be->fill(be, t->dE, 0, sizeof(float) * (size_t)B * Nc * c->encoder_hidden_size);
    const attention_shape self = block_shape(c, B, T, T, 1);
    const attention_shape cross = block_shape(c, B, T, Nc, 0);
    for (int l = c->n_layers - 1; l >= t->dec_lo; l--) {
        const layer_weights *w = &m->w.layers[l], *g = &t->gm->w.layers[l];
        const block_record *a = &t->dec[l];
        mlp_backward(t, s, a, w, g, c, N);
        if (l >= m->first_cross && Nc > 0) cross_attn_backward(t, a, w, g, &cross, N);
        /* The lowest visited layer of a frozen decoder: its self-attention
         * has no trainable weight and nothing below needs a gradient. */
        if (l == t->dec_lo && !t->train_decoder) break;
        self_attn_backward(t, s, a, w, g, c, &m->rope, t->cos_t, t->sin_t, &self, t->db.attention_mask, N);
    }
    if (t->gm->w.embed.data) be->embedding_backward(be, G(t->gm->w.embed.data), s->dx, t->db.input_ids, N, d);
    if (t->train_encoder && Nc > 0) encoder_backward(t, b);
    return CEPE_OK;
}
