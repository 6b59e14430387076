/* encoder.c — the CEPE context encoder: a bidirectional LLaMA run over
 * independent chunks (spec §2). Each chunk's tokens sit at RoPE positions
 * 0..L-1 (slot indices, so left padding shifts real tokens, as in the
 * reference); padded keys are never attended; no chunk sees another. */

#include "../common.h"
#include "model.h"

/* Rows per batch of chunks: large enough for efficient GEMMs, small enough
 * that scratch stays a few MB whatever the context length. */
#define ENCODE_ROWS 1024

cepe_status encoder_rope_table(const cepe_model *m, int rows, int L, double *pos_h, double *pos,
                               float *inv_freq, float *cos_t, float *sin_t) {
    const cepe_backend *be = m->be;
    const int half = m->enc_rope.half;
    for (int i = 0; i < rows; i++) pos_h[i] = (double)(i % L); /* slot index in its chunk */
    float freq[CEPE_MAX_HEAD_DIM / 2], mscale;
    int cached = cepe_rope_original_len(&m->enc_rope.rc);
    cepe_status st = cepe_rope_for_call(&m->enc_rope, L, &cached, freq, &mscale);
    if (st) return st;
    int bad = be->upload(be, pos, pos_h, (size_t)rows * sizeof(double));
    bad |= be->upload(be, inv_freq, freq, (size_t)half * sizeof(float));
    bad |= be->rope_table(be, cos_t, sin_t, pos, inv_freq, rows, half, mscale);
    return bad ? backend_fail(be) : CEPE_OK;
}

void encoder_layers(const cepe_model *m, float *x, const uint8_t *mask, int nb, int L, const block_scratch *s,
                    block_record *rec) {
    const cepe_config *c = &m->enc_cfg;
    const attention_shape shape = block_shape(c, nb, L, L, 0);
    for (int l = 0; l < c->n_layers; l++) {
        const block_scratch ls = rec ? block_scratch_recording(s, &rec[l], s->h) : *s;
        block_layer(m, &m->enc.layers[l], c, x, &ls, nb * L, &m->enc_rope, mask, &shape, NULL, m->n_threads);
    }
}

cepe_status cepe_model_encode(const cepe_model *m, const int32_t *ids, const uint8_t *mask, int n_chunks,
                              int L, float *out) {
    return model_encode_into(m, ids, mask, n_chunks, L, out, 0, NULL);
}

cepe_status model_encode_into(const cepe_model *m, const int32_t *ids, const uint8_t *mask, int n_chunks,
                              int L, float *out, int out_on_backend, cepe_ctx *progress) {
    if (!m || !ids || !out) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_model_encode: NULL argument");
    if (!m->finalized) return cepe_fail(CEPE_ERR_STATE, "the model has unbound weights (call finalize)");
    if (!m->has_encoder) return cepe_fail(CEPE_ERR_STATE, "this model has no CEPE encoder");
    if (n_chunks < 1 || L < 1)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "encoder input must hold at least one chunk of one token, got %d x %d", n_chunks, L);
    const cepe_config *c = &m->enc_cfg;
    const cepe_backend *be = m->be;
    const long total = (long)n_chunks * L;
    for (long i = 0; i < total; i++)
        if (ids[i] < 0 || ids[i] >= c->vocab_size)
            return cepe_fail(CEPE_ERR_INVALID_ARG,
                             "encoder token id %d at (chunk %ld, position %ld) is out of range [0, %d)",
                             ids[i], i / L, i % L, c->vocab_size);

    const int cb = L >= ENCODE_ROWS ? 1 : (ENCODE_ROWS / L < n_chunks ? ENCODE_ROWS / L : n_chunks);
    const size_t rows = (size_t)cb * (size_t)L;
    const size_t d = (size_t)c->hidden_size, ff = (size_t)c->intermediate_size;
    const size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    const int half = m->enc_rope.half, nt = m->n_threads, dev = be->device;
    cepe_status st = CEPE_OK;
    int bad = 0;
#define DEV(n, type) ((type *)be->alloc(be, cepe_mul_size((n), sizeof(type))))
    float *x = DEV(rows * d, float), *xn = DEV(rows * d, float);
    float *q = DEV(rows * qd, float), *att = DEV(rows * qd, float);
    float *k = DEV(rows * kvd, float), *v = DEV(rows * kvd, float);
    float *gate = DEV(rows * ff, float), *up = DEV(rows * ff, float);
    float *cos_t = DEV(rows * (size_t)half, float), *sin_t = DEV(rows * (size_t)half, float);
    double *pos = DEV(rows, double);
    float *inv_freq_d = DEV((size_t)half, float);
    /* device backends: the batch's ids, mask and output cross the boundary */
    int32_t *ids_d = dev ? DEV(rows, int32_t) : NULL;
    uint8_t *mask_d = dev && mask ? DEV(rows, uint8_t) : NULL;
    float *out_d = dev && !out_on_backend ? DEV(rows * d, float) : NULL;
#undef DEV
    double *pos_h = cepe_calloc(rows, sizeof(double));
    void *qwork = m->qwork_size ? cepe_calloc(m->qwork_size, 1) : NULL;
    if ((m->qwork_size && !qwork) || !x || !xn || !q || !att || !k || !v || !gate || !up || !cos_t ||
        !sin_t || !pos || !inv_freq_d || !pos_h ||
        (dev && (!ids_d || (mask && !mask_d) || (!out_on_backend && !out_d)))) {
        st = cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of %s memory for encoder scratch (%zu rows)", be->name,
                       rows);
        goto done;
    }
    if ((st = encoder_rope_table(m, (int)rows, L, pos_h, pos, inv_freq_d, cos_t, sin_t))) goto done;
    if (progress) {
        atomic_store(&progress->progress_done, 0);
        atomic_store(&progress->progress_total, (long)((n_chunks + cb - 1) / cb));
    }
    const block_scratch s = {.xn = xn,
                             .q = q,
                             .k = k,
                             .v = v,
                             .att = att,
                             .gate = gate,
                             .up = up,
                             .cos_t = cos_t,
                             .sin_t = sin_t,
                             .qwork = qwork};

    for (int c0 = 0; c0 < n_chunks && !bad; c0 += cb) {
        const int nb = n_chunks - c0 < cb ? n_chunks - c0 : cb;
        const int N = nb * L;
        const long off = (long)c0 * L;
        const int32_t *ids_b = ids + off;
        const uint8_t *mask_b = mask ? mask + off : NULL;
        float *out_b = out_d ? out_d : out + off * (long)d;
        if (dev) {
            bad |= be->upload(be, ids_d, ids_b, (size_t)N * sizeof(int32_t));
            if (mask) bad |= be->upload(be, mask_d, mask_b, (size_t)N);
            ids_b = ids_d, mask_b = mask_d;
        }
        model_embedding(m, x, ids_b, &m->enc.embed, N);
        encoder_layers(m, x, mask_b, nb, L, &s, NULL);
        be->rmsnorm(be, out_b, x, m->enc.final_norm, N, (int)d, c->rms_norm_eps, nt);
        if (out_d) bad |= be->download(be, out + off * (long)d, out_d, (size_t)N * d * sizeof(float));
        if (progress) {
            atomic_fetch_add_explicit(&progress->progress_done, 1, memory_order_relaxed);
            if (atomic_load_explicit(&progress->interrupt, memory_order_relaxed)) {
                (void)backend_check(be); /* queued device work ends before its buffers are freed */
                st = cepe_fail(CEPE_ERR_INTERRUPTED, "interrupted");
                goto done;
            }
        }
    }
    st = backend_check(be);
    if (!st && bad) st = cepe_fail(CEPE_ERR_BACKEND, "%s backend: the encoder failed", be->name);
done:
    be->free(be, x), be->free(be, xn), be->free(be, q), be->free(be, att), be->free(be, k), be->free(be, v);
    be->free(be, gate), be->free(be, up), be->free(be, cos_t), be->free(be, sin_t), be->free(be, pos);
    be->free(be, inv_freq_d), be->free(be, ids_d), be->free(be, mask_d), be->free(be, out_d);
    cepe_free(pos_h);
    cepe_free(qwork);
    return st;
}
