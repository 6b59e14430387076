/* weights.c — the products and gathers of weights in whatever format they
 * were bound in: model code calls these and never branches on formats. */
#include <string.h>

#include "../common.h"
#include "model.h"

int model_matmul(const cepe_model *m, void *qwork, float *out, const float *inp, const cepe_qtensor *w, int N,
                 int accumulate) {
    const cepe_backend *be = m->be;
    if (w->type == CEPE_QTYPE_F32)
        return be->matmul(be, out, inp, (const float *)w->data, N, w->n_in, w->n_out, accumulate,
                          m->n_threads);
    if (be->device) /* a device holds F32, or BF16 for a bf16 model (upload_slot) */
        return be->matmul_bf16(be, out, inp, (const uint16_t *)w->data, N, w->n_in, w->n_out, accumulate,
                               m->n_threads);
    return cepe_qmatmul(out, inp, w, N, accumulate, qwork, qwork ? m->qwork_size : 0, m->n_threads) !=
           CEPE_OK;
}

int model_embedding(const cepe_model *m, float *out, const int32_t *ids, const cepe_qtensor *e, int N) {
    const cepe_backend *be = m->be;
    if (e->type == CEPE_QTYPE_F32) return be->embedding(be, out, ids, (const float *)e->data, N, e->n_in);
    const unsigned char *base = e->data;
    const int d = e->n_in;
    int bad = 0;
    for (int i = 0; i < N; i++) {
        const int32_t id = ids[i];
        if (id < 0 || id >= e->n_out) { /* callers check ids; never read outside the table */
            memset(out + (size_t)i * d, 0, (size_t)d * sizeof(float));
            bad = 1;
            continue;
        }
        bad |= cepe_dequantize_row((int)e->type, base + (size_t)id * e->row_stride, out + (size_t)i * d, d) !=
               CEPE_OK;
    }
    return bad;
}

/* The scratch of cepe_qmatmul grows with the rows up to the format's sgemm
 * crossover, then is a fixed set of tiles: the largest over 1..MAX_KERNEL_ROWS
 * rows and one large count covers every call. */
#define MAX_KERNEL_ROWS 128
#define MANY_ROWS (1 << 20)

size_t model_qwork_size(const cepe_model *m) {
    size_t need = 0;
    for (int i = 0; i < m->n_slots; i++) {
        const cepe_qtensor *w = m->slots[i].q;
        if (!w || !w->data || w->type == CEPE_QTYPE_F32 || m->be->device) continue;
        for (int r = 1; r <= MAX_KERNEL_ROWS + 1; r++) {
            const size_t b = cepe_qmatmul_work_size(w, r > MAX_KERNEL_ROWS ? MANY_ROWS : r, m->n_threads);
            if (b > need) need = b;
        }
    }
    return need;
}

int model_matmul_backward(const cepe_model *m, float *dinp, float *dweight, const float *dout,
                          const float *inp, const cepe_qtensor *w, int N, int accumulate) {
    const cepe_backend *be = m->be;
    if (w->type == CEPE_QTYPE_F32)
        return be->matmul_backward(be, dinp, dweight, dout, inp, (const float *)w->data, N, w->n_in, w->n_out,
                                   accumulate, m->n_threads);
    if (dweight || be->device) return 1; /* stored-format weights are frozen, and on the CPU */
    if (!dinp) return 0;
    return cepe_qmatmul_backward_input(dinp, dout, w, N, accumulate, m->n_threads) != CEPE_OK;
}
