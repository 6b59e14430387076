/* packed.c — frozen linear weights packed once for the backend's GEMM.
 *
 * Where the backend has a packed format (the CPU on oneMKL), each product
 * with a multi-row input reads its weight's packed copy, so prefill, CEPE
 * encoding and training's frozen decoder skip re-packing every weight for
 * every chunk (matmul_packed.c). finalize lists the weights in a table keyed
 * by their address; the copies are made on first use, not at load, so a
 * Trainer created right after loading marks its trainable weights excluded
 * before anything is packed, and the peak memory holds one set of copies.
 *
 * Thread safety: the model is shared by every context. The first product
 * packs under the lock while other threads wait; afterwards lookups read the
 * table without locking (ready is published with release/acquire). Excluding
 * or dropping copies (a trainer, cepe_model_drop_packed) takes the lock but
 * must not run while another thread multiplies. */
#include <pthread.h>
#include <stdatomic.h>

#include "../common.h"
#include "model.h"

struct pack_state {
    atomic_int ready; /* every entry not excluded has been tried */
    pthread_mutex_t lock;
};

/* The weights worth packing: every 2-D weight used as a linear layer, the
 * input embeddings only as a tied lm_head (rows are gathered, not multiplied). */
static int packs_weight(const cepe_model *m, const weight_slot *s) {
    const float *w = *s->dst;
    if (s->ndim != 2) return 0;
    if (m->has_encoder && w == m->enc.embed) return 0;
    return w != m->w.embed || m->cfg.tie_word_embeddings;
}

static int backend_packs(const cepe_backend *be) {
    /* a BLAS without a packed format reports 0 bytes (matmul_packed.c) */
    return be->matmul_pack && be->matmul_packed && be->matmul_pack_free && be->matmul_pack_bytes &&
           be->matmul_pack_bytes(be, 1, 1) > 0;
}

cepe_status model_packs_build(cepe_model *m) {
    if (m->packs || !m->prepack || m->bf16 || !backend_packs(m->be)) return CEPE_OK;
    int n = 0;
    for (int i = 0; i < m->n_slots; i++) n += packs_weight(m, &m->slots[i]);
    if (!n) return CEPE_OK;
    int cap = 16;
    while (cap < 2 * n) cap *= 2; /* load factor <= 1/2: probes stay short */
    m->packs = cepe_calloc((size_t)cap, sizeof *m->packs);
    m->pack_state = cepe_calloc(1, sizeof *m->pack_state);
    if (!m->packs || !m->pack_state || pthread_mutex_init(&m->pack_state->lock, NULL)) {
        cepe_free(m->packs);
        cepe_free(m->pack_state);
        m->packs = NULL;
        m->pack_state = NULL;
        return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory for the packed-weight table");
    }
    m->packs_cap = cap;
    for (int i = 0; i < m->n_slots; i++) {
        const weight_slot *s = &m->slots[i];
        if (!packs_weight(m, s)) continue;
        const float *w = *s->dst;
        size_t h = packed_slot(w, cap);
        while (m->packs[h].w && m->packs[h].w != w) h = (h + 1) & (size_t)(cap - 1);
        if (m->packs[h].w) continue; /* one tensor bound twice */
        m->packs[h] = (packed_weight){.w = w, .OC = (int)s->shape[0], .C = (int)s->shape[1]};
    }
    return CEPE_OK;
}

void model_packs_free(cepe_model *m) {
    for (int i = 0; m->packs && i < m->packs_cap; i++) m->be->matmul_pack_free(m->be, m->packs[i].packed);
    if (m->pack_state) pthread_mutex_destroy(&m->pack_state->lock);
    cepe_free(m->packs);
    cepe_free(m->pack_state);
    m->packs = NULL;
    m->pack_state = NULL;
}

int model_packs_ready(const cepe_model *m) {
    return atomic_load_explicit(&m->pack_state->ready, memory_order_acquire);
}

/* A weight that cannot be packed (out of memory) keeps the plain path. */
void model_pack_all(const cepe_model *m) {
    pthread_mutex_lock(&m->pack_state->lock);
    if (!atomic_load_explicit(&m->pack_state->ready, memory_order_relaxed)) {
        const cepe_backend *be = m->be;
        for (int i = 0; i < m->packs_cap; i++) {
            packed_weight *e = &m->packs[i];
            if (!e->w || e->excluded || e->packed) continue;
            e->packed = be->matmul_pack(be, e->w, e->C, e->OC, m->n_threads);
            e->bytes = e->packed ? be->matmul_pack_bytes(be, e->C, e->OC) : 0;
        }
        atomic_store_explicit(&m->pack_state->ready, 1, memory_order_release);
    }
    pthread_mutex_unlock(&m->pack_state->lock);
}

/* Excludes one entry (w == NULL: all of them) and frees its copy. */
static void exclude(const cepe_model *m, const float *w) {
    if (!m->packs) return;
    pthread_mutex_lock(&m->pack_state->lock);
    for (int i = 0; i < m->packs_cap; i++) {
        packed_weight *e = &m->packs[i];
        if (!e->w || (w && e->w != w)) continue;
        e->excluded = 1;
        m->be->matmul_pack_free(m->be, e->packed);
        e->packed = NULL;
        e->bytes = 0;
    }
    pthread_mutex_unlock(&m->pack_state->lock);
}

void model_unpack(const cepe_model *m, const float *w) {
    if (w) exclude(m, w);
}

void cepe_model_drop_packed(cepe_model *m) {
    if (m) exclude(m, NULL);
}

cepe_status cepe_model_set_prepack(cepe_model *m, int on) {
    if (!m) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_model_set_prepack: NULL model");
    if (m->finalized) return cepe_fail(CEPE_ERR_STATE, "cepe_model_set_prepack: the model is already finalized");
    m->prepack = on != 0;
    return CEPE_OK;
}

int cepe_model_prepacks(const cepe_model *m) { return m && m->packs; }

size_t cepe_model_packed_bytes(const cepe_model *m) {
    if (!m || !m->packs) return 0;
    size_t bytes = 0;
    pthread_mutex_lock(&m->pack_state->lock);
    for (int i = 0; i < m->packs_cap; i++) bytes += m->packs[i].bytes;
    pthread_mutex_unlock(&m->pack_state->lock);
    return bytes;
}
