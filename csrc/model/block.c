/* block.c — one pre-norm LLaMA block with its CEPE cross-attention, the one
 * forward the decoder, the CEPE encoder and training share (they differ only
 * in where K/V live, in the mask, and in whether the block records what the
 * backward needs: s->rec). */
#include <math.h>

#include "model.h"

attention_shape block_shape(const cepe_config *c, int B, int Tq, int Tk, int causal) {
    const int qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    return (attention_shape){
        .B = B,
        .Tq = Tq,
        .Tk = Tk,
        .H = c->n_heads,
        .KVH = c->n_kv_heads,
        .hd = c->head_dim,
        .q_rstride = qd,
        .q_bstride = (long)Tq * qd,
        .kv_rstride = kvd,
        .kv_bstride = (long)Tk * kvd,
        .valid_bstride = Tk,
        .causal = causal,
        .q_offset = 0,
        .window = causal ? c->sliding_window : 0,
        .scale = 1.0f / sqrtf((float)c->head_dim),
    };
}

void block_kv(const cepe_model *m, const layer_weights *w, const cepe_config *c, const float *x,
              const block_scratch *s, int N, const rope_state *rope, int nt) {
    const cepe_backend *be = m->be;
    const int d = c->hidden_size;
    be->rmsnorm(be, s->xn, x, w->attn_norm, N, d, c->rms_norm_eps, nt);
    model_matmul(m, s->qwork, s->k, s->xn, &w->wk, N, 0);
    model_matmul(m, s->qwork, s->v, s->xn, &w->wv, N, 0);
    be->rope(be, s->k, s->cos_t, s->sin_t, N, c->n_kv_heads, c->head_dim, rope->half,
             rope->rc.layout == CEPE_ROPE_INTERLEAVED, nt);
}

void block_q(const cepe_model *m, const layer_weights *w, const cepe_config *c, const block_scratch *s, int N,
             const rope_state *rope, int nt) {
    const cepe_backend *be = m->be;
    model_matmul(m, s->qwork, s->q, s->xn, &w->wq, N, 0);
    be->rope(be, s->q, s->cos_t, s->sin_t, N, c->n_heads, c->head_dim, rope->half,
             rope->rc.layout == CEPE_ROPE_INTERLEAVED, nt);
}

void block_qkv(const cepe_model *m, const layer_weights *w, const cepe_config *c, const float *x,
               const block_scratch *s, int N, const rope_state *rope, int nt) {
    block_kv(m, w, c, x, s, N, rope, nt);
    block_q(m, w, c, s, N, rope, nt);
}

void block_mlp(const cepe_model *m, const layer_weights *w, const cepe_config *c, float *x,
               const block_scratch *s, int N, int nt) {
    const cepe_backend *be = m->be;
    const int d = c->hidden_size, ff = c->intermediate_size;
    float *h = s->h ? s->h : s->gate; /* recording keeps the pre-activation gate for the backward */
    be->rmsnorm(be, s->xn, x, w->ffn_norm, N, d, c->rms_norm_eps, nt);
    model_matmul(m, s->qwork, s->gate, s->xn, &w->w_gate, N, 0);
    model_matmul(m, s->qwork, s->up, s->xn, &w->w_up, N, 0);
    be->swiglu(be, h, s->gate, s->up, (long)N * ff, nt);
    model_matmul(m, s->qwork, x, h, &w->w_down, N, 1); /* x += down(silu(gate) * up) */
}

void block_cross_kv(const cepe_model *m, const layer_weights *w, void *qwork, float *kc, float *vc,
                    const float *E, int rows) {
    model_matmul(m, qwork, kc, E, &w->cross_wk, rows, 0);
    model_matmul(m, qwork, vc, E, &w->cross_wv, rows, 0);
}

/* Attention of q over src into out, with its log-sum-exp when recording. */
static void attend(const cepe_backend *be, float *out, float *lse, const float *q, const block_kv_src *src,
                   int nt) {
    if (lse)
        be->attention_lse(be, out, lse, q, src->k, src->v, src->valid, &src->shape, nt);
    else
        be->attention(be, out, q, src->k, src->v, src->valid, &src->shape, nt);
}

void block_attend(const cepe_model *m, const layer_weights *w, const cepe_config *c, float *x,
                  const block_scratch *s, int N, const rope_state *rope, const block_kv_src *self_kv,
                  const block_kv_src *cross, int nt) {
    const cepe_backend *be = m->be;
    const block_record *r = s->rec;
    const size_t row_bytes = sizeof(float) * (size_t)N * c->hidden_size;
    block_q(m, w, c, s, N, rope, nt);
    attend(be, s->att, r ? r->lse : NULL, s->q, self_kv, nt);
    model_matmul(m, s->qwork, x, s->att, &w->wo, N, 1); /* x += o_proj(att) */
    if (cross) { /* x += o_proj(attn(q_proj(RMSNorm_cross(x)), K, V)): no RoPE, no causal mask */
        float *q = r ? r->qc : s->q, *att = r ? r->attc : s->att;
        if (r) be->copy(be, r->x_mid, x, row_bytes);
        be->rmsnorm(be, s->xn, x, w->cross_norm, N, c->hidden_size, c->rms_norm_eps, nt);
        model_matmul(m, s->qwork, q, s->xn, &w->cross_wq, N, 0);
        attend(be, att, r ? r->lsec : NULL, q, cross, nt);
        model_matmul(m, s->qwork, x, att, &w->cross_wo, N, 1);
    }
    if (r) be->copy(be, r->x_post, x, row_bytes);
    block_mlp(m, w, c, x, s, N, nt);
}

void block_layer(const cepe_model *m, const layer_weights *w, const cepe_config *c, float *x,
                 const block_scratch *s, int N, const rope_state *rope, const uint8_t *valid,
                 const attention_shape *shape, const block_kv_src *cross, int nt) {
    if (s->rec) m->be->copy(m->be, s->rec->x_in, x, sizeof(float) * (size_t)N * c->hidden_size);
    block_kv(m, w, c, x, s, N, rope, nt);
    const block_kv_src self_kv = {.k = s->k, .v = s->v, .valid = valid, .shape = *shape};
    block_attend(m, w, c, x, s, N, rope, &self_kv, cross, nt);
}
