/* step.c — cepe_train_forward_backward: checks a micro-batch completely
 * before anything is computed (a bad batch must leave the accumulated
 * gradients untouched), then runs forward.c and backward.c. */
#include <limits.h>
#include <math.h>
#include <string.h>

#include "../common.h"
#include "../ops/ops.h"
#include "train.h"

static cepe_status check_ids(const int32_t *ids, long n, int V, const char *what, int allow_ignore) {
    for (long i = 0; i < n; i++)
        if ((ids[i] < 0 || ids[i] >= V) && !(allow_ignore && ids[i] == CEPE_IGNORE_INDEX))
            return cepe_fail(CEPE_ERR_INVALID_ARG, "%s holds %d at flat index %ld, outside [0, %d)", what,
                             ids[i], i, V);
    return CEPE_OK;
}

static cepe_status check_batch(const cepe_train *t, const cepe_train_batch *b) {
    const cepe_model *m = t->m;
    const long V = m->cfg.vocab_size;
    if (!b->input_ids) return cepe_fail(CEPE_ERR_INVALID_ARG, "the batch has no input_ids");
    if (b->B < 1 || b->T < 1)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "input_ids must be (B, T) with B, T >= 1");
    /* every row count and rows x width product the ops index with int/long */
    const long N = (long)b->B * b->T;
    if (N > INT_MAX / 4 || N * (long)m->cfg.hidden_size > LONG_MAX / 8)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "the batch of %d x %d tokens is too large", b->B, b->T);
    cepe_status st = check_ids(b->input_ids, N, (int)V, "input_ids", 0);
    if (st || (b->labels && (st = check_ids(b->labels, N, (int)V, "labels", 1)))) return st;
    if (b->positions)
        for (long i = 0; i < N; i++)
            if (!(b->positions[i] >= 0.0 && b->positions[i] < 1e15))
                return cepe_fail(CEPE_ERR_INVALID_ARG,
                                 "positions must be finite and >= 0 (flat index %ld: %g)", i,
                                 b->positions[i]);
    if (b->n_ctx < 0) return cepe_fail(CEPE_ERR_INVALID_ARG, "n_ctx must be >= 0, got %d", b->n_ctx);
    if (b->n_ctx > 0) {
        if (!m->has_encoder || m->cfg.n_cross_layers == 0)
            return cepe_fail(CEPE_ERR_INVALID_ARG,
                             "encoder_input_ids given, but this model has no CEPE encoder");
        if (b->L < 1 || !b->encoder_input_ids)
            return cepe_fail(CEPE_ERR_INVALID_ARG, "encoder_input_ids must be (B, n_ctx, L) with L >= 1");
        const long Ne = N / b->T * (long)b->n_ctx * b->L;
        if ((long)b->n_ctx * b->L > INT_MAX / 4 || Ne > INT_MAX / 4)
            return cepe_fail(CEPE_ERR_INVALID_ARG, "the context of %d x %d tokens per row is too large",
                             b->n_ctx, b->L);
        if ((st = check_ids(b->encoder_input_ids, Ne, m->enc_cfg.vocab_size, "encoder_input_ids", 0)))
            return st;
    }
    if (b->T_kl < 0 || b->T_kl > b->T)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "the distillation tables cover %d positions, outside [0, T = %d]", b->T_kl, b->T);
    if (b->T_kl > 0) {
        if (b->K < 1 || !b->distill_prob || !b->distill_index)
            return cepe_fail(CEPE_ERR_INVALID_ARG,
                             "distill_prob (B, T, K+1) and distill_index (B, T, K) need K >= 1");
        if ((st = check_ids(b->distill_index, (long)b->B * b->T_kl * b->K, (int)V, "distill_index", 0)))
            return st;
    }
    return CEPE_OK;
}

cepe_status train_check(const cepe_train *t) { return backend_check(t->m->be); }

static void unstage_batch(cepe_train *t) {
    for (int i = 0; i < 6; i++) t->m->be->free(t->m->be, t->db_bufs[i]);
    memset(t->db_bufs, 0, sizeof t->db_bufs);
}

/* t->db: the batch as the ops read it. On the CPU the caller's arrays; on a
 * device, copies of those the ops index (the rest stays on the host). */
static cepe_status stage_batch(cepe_train *t, const cepe_train_batch *b) {
    const cepe_backend *be = t->m->be;
    t->db = *b;
    if (!be->device) return CEPE_OK;
    const size_t N = (size_t)b->B * b->T,
                 Ne = (size_t)b->B * (b->n_ctx > 0 ? b->n_ctx : 0) * (b->L > 0 ? b->L : 0);
    const size_t rows_kl = (size_t)b->B * b->T_kl;
    struct {
        const void *src;
        size_t bytes;
        const void **dst;
    } in[6] = {
        {b->input_ids, N * sizeof(int32_t), (const void **)&t->db.input_ids},
        {b->attention_mask, N, (const void **)&t->db.attention_mask},
        {Ne ? b->encoder_input_ids : NULL, Ne * sizeof(int32_t), (const void **)&t->db.encoder_input_ids},
        {Ne ? b->encoder_attention_mask : NULL, Ne, (const void **)&t->db.encoder_attention_mask},
        {rows_kl ? b->distill_prob : NULL, rows_kl * (size_t)(b->K + 1) * sizeof(uint16_t),
         (const void **)&t->db.distill_prob},
        {rows_kl ? b->distill_index : NULL, rows_kl * (size_t)b->K * sizeof(int32_t),
         (const void **)&t->db.distill_index},
    };
    for (int i = 0; i < 6; i++) {
        *in[i].dst = NULL;
        if (!in[i].src) continue;
        void *d = be->alloc(be, in[i].bytes);
        t->db_bufs[i] = d;
        if (!d) {
            unstage_batch(t);
            return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of %s memory for the batch", be->name);
        }
        be->upload(be, d, in[i].src, in[i].bytes);
        *in[i].dst = d;
    }
    return CEPE_OK;
}

cepe_status cepe_train_forward_backward(cepe_train *t, const cepe_train_batch *b, double grad_scale,
                                        cepe_train_stats *out) {
    if (!t || !b) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_train_forward_backward: NULL argument");
    if (!isfinite(grad_scale)) return cepe_fail(CEPE_ERR_INVALID_ARG, "grad_scale must be finite");
    cepe_status st = check_batch(t, b);
    if (st || (st = stage_batch(t, b))) return st;
    cepe_train_stats stats = {0};
    if (!(st = train_forward(t, b))) st = train_backward(t, b, grad_scale, &stats);
    const cepe_status bst = train_check(t); /* waits for the device before its copies go */
    unstage_batch(t);
    if (st || (st = bst)) return st;
    if (out) {
        out->loss = stats.loss, out->lm_loss = stats.lm_loss, out->kl_loss = stats.kl_loss;
        out->tokens = stats.tokens;
    }
    return CEPE_OK;
}
