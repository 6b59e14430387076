/* dot_c.c — the portable kernels: one stored row · one activation row.
 * The reference the SIMD paths are tested against, and the path on CPUs
 * without AVX2. Each block's dot product is exact integer arithmetic (int32
 * cannot overflow: the largest, a Q6_K block, is at most 256 * 32 * 127 * 128,
 * about 2^28), then scaled once. */
#include "quant_impl.h"

/* F32, F16 or BF16 weights (kind), inlined with a constant kind: 16 partial
 * sums, so the compiler can keep them in vector lanes (a float sum in one
 * variable must be added in order and stays scalar). */
static inline __attribute__((always_inline)) float dot_floats(int kind, int n, const void *row,
                                                              const void *act) {
    const float *x = act;
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += quant_weight_at(kind, row, i + l) * x[i + l];
    float sum = 0.0f;
    for (; i < n; i++) sum += quant_weight_at(kind, row, i) * x[i];
    for (int l = 0; l < 16; l++) sum += acc[l];
    return sum;
}

static float dot_f32(int n, const void *row, const void *act) { return dot_floats(QT_F32, n, row, act); }
static float dot_f16(int n, const void *row, const void *act) { return dot_floats(QT_F16, n, row, act); }
static float dot_bf16(int n, const void *row, const void *act) { return dot_floats(QT_BF16, n, row, act); }

/* Q4_0 (nibbles - 8) and Q4_1 (unsigned nibbles and a minimum m), inlined
 * with a constant q4_1. */
static inline __attribute__((always_inline)) float dot_q4(int q4_1, int n, const void *row, const void *act) {
    const block_q4_0 *w0 = row;
    const block_q4_1 *w1 = row;
    const act_q8_32 a = quant_act_q8_32(act, n);
    const int off = q4_1 ? 0 : 8;
    float sum = 0.0f;
    for (int b = 0; b < n / QK32; b++) {
        const uint8_t *q = q4_1 ? w1[b].qs : w0[b].qs;
        const int8_t *y = a.qs + QK32 * b;
        int isum = 0; /* two loops, one per nibble, so each vectorizes */
        for (int j = 0; j < 16; j++) isum += ((q[j] & 0xF) - off) * y[j];
        for (int j = 0; j < 16; j++) isum += ((q[j] >> 4) - off) * y[j + 16];
        const float d = quant_fp16_to_fp32(q4_1 ? w1[b].d : w0[b].d);
        sum += d * a.d[b] * (float)isum + (q4_1 ? quant_fp16_to_fp32(w1[b].m) * a.s[b] : 0.0f);
    }
    return sum;
}

static float dot_q4_0(int n, const void *row, const void *act) { return dot_q4(0, n, row, act); }
static float dot_q4_1(int n, const void *row, const void *act) { return dot_q4(1, n, row, act); }

static float dot_q8_0(int n, const void *row, const void *act) {
    const block_q8_0 *w = row;
    const act_q8_32 a = quant_act_q8_32(act, n);
    float sum = 0.0f;
    for (int b = 0; b < n / QK32; b++) {
        const int8_t *y = a.qs + QK32 * b;
        int isum = 0;
        for (int j = 0; j < QK32; j++) isum += w[b].qs[j] * y[j];
        sum += quant_fp16_to_fp32(w[b].d) * a.d[b] * (float)isum;
    }
    return sum;
}

/* Q4_K and Q5_K (q5: with the fifth bits), inlined with a constant q5. */
static inline __attribute__((always_inline)) float dot_k4(int q5, int n, const void *row, const void *act) {
    float sum = 0.0f;
    for (int b = 0; b < n / QK_K; b++) {
        const k4_view w = quant_k4_block(q5, row, b);
        const act_q8_K *a = (const act_q8_K *)act + b;
        const uint8_t *q = w.qs;
        const int8_t *y = a->qs;
        int isum = 0, imin = 0;
        for (int j = 0; j < 8; j += 2, q += 32, y += 64) {
            uint8_t sc0, m0, sc1, m1;
            quant_scale_min_k4(j, w.scales, &sc0, &m0);
            quant_scale_min_k4(j + 1, w.scales, &sc1, &m1);
            int s0 = 0, s1 = 0;
            for (int l = 0; l < 32; l++) {
                const int h0 = q5 ? ((w.qh[l] >> j) & 1) << 4 : 0,
                          h1 = q5 ? ((w.qh[l] >> (j + 1)) & 1) << 4 : 0;
                s0 += ((q[l] & 0xF) | h0) * y[l];
                s1 += ((q[l] >> 4) | h1) * y[l + 32];
            }
            isum += sc0 * s0 + sc1 * s1;
            imin += m0 * (a->bsums[2 * j] + a->bsums[2 * j + 1]) +
                    m1 * (a->bsums[2 * j + 2] + a->bsums[2 * j + 3]);
        }
        sum += quant_fp16_to_fp32(w.d) * a->d * (float)isum - quant_fp16_to_fp32(w.dmin) * a->d * (float)imin;
    }
    return sum;
}

static float dot_q4_K(int n, const void *row, const void *act) { return dot_k4(0, n, row, act); }
static float dot_q5_K(int n, const void *row, const void *act) { return dot_k4(1, n, row, act); }

static float dot_q6_K(int n, const void *row, const void *act) {
    const block_q6_K *w = row;
    const act_q8_K *a = act;
    float sum = 0.0f;
    for (int b = 0; b < n / QK_K; b++) {
        int8_t q[QK_K];
        quant_unpack_q6_K(&w[b], q);
        int isum = 0;
        for (int k = 0; k < 16; k++) { /* scale k covers values 16k..16k+15 */
            int s = 0;
            for (int l = 0; l < 16; l++) s += q[16 * k + l] * a[b].qs[16 * k + l];
            isum += w[b].scales[k] * s;
        }
        sum += quant_fp16_to_fp32(w[b].d) * a[b].d * (float)isum;
    }
    return sum;
}

void quant_kernels_c(quant_kernel t[QT_COUNT]) { QUANT_KERNEL_TABLE(t, dot_bf16, ACT_F32); }
