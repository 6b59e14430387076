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

static float dot_q4_0(int n, const void *row, const void *act) {
    const block_q4_0 *w = row;
    const act_q8_32 a = quant_act_q8_32(act, n);
    float sum = 0.0f;
    for (int b = 0; b < n / QK32; b++) {
        const int8_t *y = a.qs + QK32 * b;
        int isum = 0; /* two loops, one per nibble, so each vectorizes */
        for (int j = 0; j < 16; j++) isum += ((w[b].qs[j] & 0xF) - 8) * y[j];
        for (int j = 0; j < 16; j++) isum += ((w[b].qs[j] >> 4) - 8) * y[j + 16];
        sum += quant_fp16_to_fp32(w[b].d) * a.d[b] * (float)isum;
    }
    return sum;
}

static float dot_q4_1(int n, const void *row, const void *act) {
    const block_q4_1 *w = row;
    const act_q8_32 a = quant_act_q8_32(act, n);
    float sum = 0.0f;
    for (int b = 0; b < n / QK32; b++) {
        const int8_t *y = a.qs + QK32 * b;
        int isum = 0;
        for (int j = 0; j < 16; j++) isum += (w[b].qs[j] & 0xF) * y[j];
        for (int j = 0; j < 16; j++) isum += (w[b].qs[j] >> 4) * y[j + 16];
        sum += quant_fp16_to_fp32(w[b].d) * a.d[b] * (float)isum + quant_fp16_to_fp32(w[b].m) * a.s[b];
    }
    return sum;
}

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

/* One Q4_K / Q5_K super-block times its activations; qh NULL for Q4_K (no
 * fifth bits), inlined so each kernel compiles to its own code. */
static inline __attribute__((always_inline)) float dot_k4_block(uint16_t d, uint16_t dmin,
                                                                const uint8_t scales[12], const uint8_t *q,
                                                                const uint8_t *qh, const act_q8_K *a) {
    const int8_t *y = a->qs;
    int isum = 0, imin = 0;
    for (int j = 0; j < 8; j += 2, q += 32, y += 64) {
        uint8_t sc0, m0, sc1, m1;
        quant_scale_min_k4(j, scales, &sc0, &m0);
        quant_scale_min_k4(j + 1, scales, &sc1, &m1);
        int s0 = 0, s1 = 0;
        for (int l = 0; l < 32; l++) {
            const int h0 = qh ? ((qh[l] >> j) & 1) << 4 : 0, h1 = qh ? ((qh[l] >> (j + 1)) & 1) << 4 : 0;
            s0 += ((q[l] & 0xF) | h0) * y[l];
            s1 += ((q[l] >> 4) | h1) * y[l + 32];
        }
        isum += sc0 * s0 + sc1 * s1;
        imin +=
            m0 * (a->bsums[2 * j] + a->bsums[2 * j + 1]) + m1 * (a->bsums[2 * j + 2] + a->bsums[2 * j + 3]);
    }
    return quant_fp16_to_fp32(d) * a->d * (float)isum - quant_fp16_to_fp32(dmin) * a->d * (float)imin;
}

static float dot_q4_K(int n, const void *row, const void *act) {
    const block_q4_K *w = row;
    float sum = 0.0f;
    for (int b = 0; b < n / QK_K; b++)
        sum += dot_k4_block(w[b].d, w[b].dmin, w[b].scales, w[b].qs, NULL, (const act_q8_K *)act + b);
    return sum;
}

static float dot_q5_K(int n, const void *row, const void *act) {
    const block_q5_K *w = row;
    float sum = 0.0f;
    for (int b = 0; b < n / QK_K; b++)
        sum += dot_k4_block(w[b].d, w[b].dmin, w[b].scales, w[b].qs, w[b].qh, (const act_q8_K *)act + b);
    return sum;
}

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
