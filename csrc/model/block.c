/* block.c — the pieces of a pre-norm LLaMA block shared by the decoder and
 * the CEPE encoder (they differ only in where K/V live and in the mask). */
#include "model.h"

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
    be->rmsnorm(be, s->xn, x, w->ffn_norm, N, d, c->rms_norm_eps, nt);
    model_matmul(m, s->qwork, s->gate, s->xn, &w->w_gate, N, 0);
    model_matmul(m, s->qwork, s->up, s->xn, &w->w_up, N, 0);
    be->swiglu(be, s->gate, s->gate, s->up, (long)N * ff, nt);
    model_matmul(m, s->qwork, x, s->gate, &w->w_down, N, 1); /* x += down(silu(gate) * up) */
}
