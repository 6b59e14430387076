/* dequant.c — stored rows to fp32, one function per format, portable C.
 *
 * The results are bit-identical to gguf's NumPy dequantization (the reader
 * cepe/gguf_io.py uses, and so every model loaded today): the same float32
 * operations in the same order. That needs every multiply rounded on its own,
 * so this file is compiled without FMA contraction (the build's
 * -ffp-contract=fast would fuse d * q - m into one rounding). */
#include "quant_impl.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#define NO_CONTRACT
#elif defined(__GNUC__)
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NO_CONTRACT
#endif

NO_CONTRACT static void dequant_f16(const uint16_t *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = quant_fp16_to_fp32(x[i]);
}

NO_CONTRACT static void dequant_bf16(const uint16_t *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = quant_bf16_to_fp32(x[i]);
}

NO_CONTRACT static void dequant_q8_0(const block_q8_0 *x, float *y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += QK32) {
        const float d = quant_fp16_to_fp32(x[b].d);
        for (int j = 0; j < QK32; j++) y[j] = (float)x[b].qs[j] * d;
    }
}

NO_CONTRACT static void dequant_q4_0(const block_q4_0 *x, float *y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += QK32) {
        const float d = quant_fp16_to_fp32(x[b].d);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((x[b].qs[j] & 0xF) - 8) * d;
            y[j + 16] = (float)((x[b].qs[j] >> 4) - 8) * d;
        }
    }
}

NO_CONTRACT static void dequant_q4_1(const block_q4_1 *x, float *y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += QK32) {
        const float d = quant_fp16_to_fp32(x[b].d), m = quant_fp16_to_fp32(x[b].m);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)(x[b].qs[j] & 0xF) * d + m;
            y[j + 16] = (float)(x[b].qs[j] >> 4) * d + m;
        }
    }
}

/* Q4_K and Q5_K (q5: with the fifth bits), inlined with a constant q5. */
NO_CONTRACT static inline __attribute__((always_inline)) void dequant_k4(int q5, const void *row, float *y,
                                                                         int64_t nb) {
    for (int64_t b = 0; b < nb; b++) {
        const k4_view x = quant_k4_block(q5, row, b);
        const float d = quant_fp16_to_fp32(x.d), dmin = quant_fp16_to_fp32(x.dmin);
        const uint8_t *q = x.qs;
        for (int j = 0; j < 8; j += 2, q += 32) {
            uint8_t sc, m;
            quant_scale_min_k4(j, x.scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            quant_scale_min_k4(j + 1, x.scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (float)((q[l] & 0xF) | (q5 ? ((x.qh[l] >> j) & 1) << 4 : 0)) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (float)((q[l] >> 4) | (q5 ? ((x.qh[l] >> (j + 1)) & 1) << 4 : 0)) - m2;
        }
    }
}

/* Unpacked to bytes first: the loops then vectorize (16 values per scale). */
NO_CONTRACT static void dequant_q6_K(const block_q6_K *x, float *y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += QK_K) {
        const float d = quant_fp16_to_fp32(x[b].d);
        int8_t q[QK_K];
        quant_unpack_q6_K(&x[b], q);
        for (int k = 0; k < 16; k++) {
            const float dk = d * (float)x[b].scales[k];
            for (int l = 0; l < 16; l++) y[16 * k + l] = dk * (float)q[16 * k + l];
        }
    }
}

void quant_dequantize(int type, const void *row, float *y, int64_t n) {
    const int64_t nb = n / cepe_qtype_block_size(type);
    switch (type) {
    case CEPE_QTYPE_F32:
        memcpy(y, row, (size_t)n * sizeof(float));
        break;
    case CEPE_QTYPE_F16:
        dequant_f16(row, y, n);
        break;
    case CEPE_QTYPE_BF16:
        dequant_bf16(row, y, n);
        break;
    case CEPE_QTYPE_Q8_0:
        dequant_q8_0(row, y, nb);
        break;
    case CEPE_QTYPE_Q4_0:
        dequant_q4_0(row, y, nb);
        break;
    case CEPE_QTYPE_Q4_1:
        dequant_q4_1(row, y, nb);
        break;
    case CEPE_QTYPE_Q4_K:
        dequant_k4(0, row, y, nb);
        break;
    case CEPE_QTYPE_Q5_K:
        dequant_k4(1, row, y, nb);
        break;
    case CEPE_QTYPE_Q6_K:
        dequant_q6_K(row, y, nb);
        break;
    }
}

cepe_status cepe_dequantize_row(int type, const void *row, float *y, int64_t n) {
    const int bs = cepe_qtype_block_size(type);
    if (bs == 0) return cepe_fail(CEPE_ERR_INVALID_ARG, "dequantize: unknown weight type %d", type);
    if (n <= 0 || n % bs)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "dequantize: %lld values of %s: not a positive multiple of its %d-value block",
                         (long long)n, cepe_qtype_name(type), bs);
    if (!row || !y) return cepe_fail(CEPE_ERR_INVALID_ARG, "dequantize: NULL pointer");
    if ((uintptr_t)row % 2 || (uintptr_t)y % 4)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "dequantize: the row must be 2-byte and the output 4-byte aligned");
    quant_dequantize(type, row, y, n);
    return CEPE_OK;
}
