/* test_quant.c — the stored-format kernels (csrc/quant/) without Python, for
 * valgrind / ASan: every format on every instruction set this CPU (or
 * valgrind's emulated CPU) has, against double-precision sums over the
 * dequantized weights and the activations the kernels see; qmatmul's two ways
 * against those; and the refusals. tests/test_quant.py holds the full oracle
 * (bit-exactness against the GGUF reader, derived error bounds); this file
 * keeps the memory checkers on the same code. Prints "N passed, 0 failed". */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant/quant.h"
#include "quant/quant_impl.h"

#include "check.h"

static uint64_t rng_state = 7;
static uint32_t next_u32(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng_state >> 32);
}
static float frand(void) { return (float)next_u32() / 4294967296.0f * 2.0f - 1.0f; } /* [-1, 1) */

static uint16_t to_fp16(float f) { /* positive normal values only, truncating: enough for test scales */
    uint32_t u;
    memcpy(&u, &f, 4);
    const int e = (int)((u >> 23) & 0xFF) - 127 + 15;
    return (uint16_t)(((u >> 16) & 0x8000) | (uint32_t)(e << 10) | ((u >> 13) & 0x3FF));
}

static const int TYPES[] = {CEPE_QTYPE_F16,  CEPE_QTYPE_BF16, CEPE_QTYPE_Q4_0, CEPE_QTYPE_Q4_1,
                            CEPE_QTYPE_Q8_0, CEPE_QTYPE_Q4_K, CEPE_QTYPE_Q5_K, CEPE_QTYPE_Q6_K};

/* n_out random rows of n_in values: random codes, fp16 scales in [2^-10, 2^-6). */
static unsigned char *random_rows(int type, int n_out, int n_in) {
    const size_t rb = cepe_qtype_row_bytes(type, n_in);
    unsigned char *w = malloc(rb * (size_t)n_out);
    for (size_t i = 0; i < rb * (size_t)n_out; i++) w[i] = (unsigned char)next_u32();
    const int bs = cepe_qtype_block_size(type);
    const size_t bb = rb / (size_t)(n_in / bs);
    for (int o = 0; o < n_out; o++)
        for (int b = 0; b < n_in / bs; b++) {
            unsigned char *p = w + (size_t)o * rb + (size_t)b * bb;
            for (int k = 0; k < bs && bs == 1; k++) { /* F16 / BF16: every value a sane half */
                const float v = frand();
                uint16_t h = type == CEPE_QTYPE_F16 ? (v < 0 ? 0x8000 : 0) | to_fp16(fabsf(v) + 1e-3f)
                                                    : (uint16_t)(quant_f32_bits(v) >> 16);
                memcpy(p, &h, 2);
            }
            if (bs == 1) continue;
            const uint16_t d = to_fp16(ldexpf(1.0f + frand() * 0.5f, -8)), m = to_fp16(ldexpf(1.0f, -9));
            const int d_at = type == CEPE_QTYPE_Q6_K ? 208 : 0;
            memcpy(p + d_at, &d, 2);
            if (type == CEPE_QTYPE_Q4_1 || type == CEPE_QTYPE_Q4_K || type == CEPE_QTYPE_Q5_K)
                memcpy(p + 2, &m, 2);
        }
    return w;
}

/* The activations the kernel sees, back as floats, from cepe_quantize_activations's bytes. */
static void activations_seen(int type, const void *act, const float *x, int n, double *xh) {
    const size_t bytes = cepe_act_row_bytes(type, n);
    if (bytes == (size_t)n * 4) {
        for (int i = 0; i < n; i++) xh[i] = x[i];
    } else if (bytes == (size_t)n * 2) {
        for (int i = 0; i < n; i++) xh[i] = quant_bf16_to_fp32(((const uint16_t *)act)[i]);
    } else if (cepe_qtype_block_size(type) == 32) {
        const act_q8_32 a = quant_act_q8_32(act, n);
        for (int i = 0; i < n; i++) xh[i] = (double)a.d[i / 32] * a.qs[i];
    } else {
        const act_q8_K *a = act;
        for (int i = 0; i < n; i++) xh[i] = (double)a[i / 256].d * a[i / 256].qs[i % 256];
    }
}

/* |y - Σ w x^| against (terms + 16) u Σ |w x^| scaled by the minimum terms' weight:
 * tests/test_quant.py derives the bound; 4x slack here stands in for its 2|b| term. */
static void check_dot(int type, int n, const float *w, const double *xh, float y) {
    double ref = 0.0, mag = 0.0;
    for (int i = 0; i < n; i++) {
        ref += (double)w[i] * xh[i];
        mag += fabs((double)w[i] * xh[i]);
    }
    const int bs = cepe_qtype_block_size(type);
    const double terms = bs == 1 ? n : 2.0 * n / bs;
    const double bound = 4.0 * (terms + 16) * 0x1p-24 * mag + 1e-30;
    if (!(fabs(y - ref) <= bound))
        fprintf(stderr, "type %d n %d: %g vs %g (bound %g)\n", type, n, y, ref, bound);
    CHECK(fabs(y - ref) <= bound);
}

static void test_format(int type, int isa) {
    const int bs = cepe_qtype_block_size(type);
    const int n_in = bs == 256 ? 512 : bs == 32 ? 96 : 77, n_out = 48;
    unsigned char *w = random_rows(type, n_out, n_in);
    const size_t rb = cepe_qtype_row_bytes(type, n_in);
    float *wf = malloc(sizeof(float) * (size_t)n_out * n_in);
    for (int o = 0; o < n_out; o++)
        CHECK(cepe_dequantize_row(type, w + (size_t)o * rb, wf + (size_t)o * n_in, n_in) == CEPE_OK);

    const int rows = 3;
    float *x = malloc(sizeof(float) * rows * n_in);
    for (int i = 0; i < rows * n_in; i++) x[i] = frand() * (i % 7 == 3 ? 20.0f : 1.0f);
    void *act = malloc(cepe_act_row_bytes(type, n_in));
    double *xh = malloc(sizeof(double) * n_in);
    float *want = malloc(sizeof(float) * rows * n_out);
    for (int r = 0; r < rows; r++) {
        CHECK(cepe_quantize_activations(type, x + r * n_in, act, n_in) == CEPE_OK);
        activations_seen(type, act, x + r * n_in, n_in, xh);
        for (int o = 0; o < n_out; o++) {
            float y;
            CHECK(cepe_vec_dot(type, n_in, w + (size_t)o * rb, act, &y) == CEPE_OK);
            check_dot(type, n_in, wf + (size_t)o * n_in, xh, y);
            want[r * n_out + o] = y;
        }
    }

    /* qmatmul, few rows: the same kernels, identical results, one thread or two, own scratch or given
     * (the int8 GEMM, which Q4_0 takes from 2 rows on AVX-512, is tested in tests/test_quant.py) */
    const int prev_gemm = cepe_qmatmul_gemm_rows(1 << 30);
    cepe_qtensor t = {(cepe_qtype)type, n_out, n_in, w, rb};
    float *out = malloc(sizeof(float) * rows * n_out);
    for (int threads = 1; threads <= 2; threads++) {
        CHECK(cepe_qmatmul(out, x, &t, rows, 0, NULL, 0, threads) == CEPE_OK);
        CHECK(memcmp(out, want, sizeof(float) * rows * n_out) == 0);
    }
    const size_t ws = cepe_qmatmul_work_size(&t, rows, 2);
    void *work = malloc(ws ? ws : 1);
    for (int i = 0; i < rows * n_out; i++) out[i] = 1.0f;
    CHECK(cepe_qmatmul(out, x, &t, rows, 1, work, ws, 2) == CEPE_OK);
    for (int i = 0; i < rows * n_out; i++) CHECK(out[i] == 1.0f + want[i]);
    free(work);

    /* many rows: dequantized tiles + sgemm, fp32 accuracy; BF16 on AVX512-BF16 the bf16 GEMM,
     * whose activations rounded to bf16 add at most 2^-8 of each |w x| */
    const int prev = cepe_qmatmul_sgemm_rows(2);
    const int bf16_gemm = cepe_qmatmul_uses_bf16_gemm(&t, rows);
    CHECK(cepe_qmatmul_uses_sgemm(&t, rows) != bf16_gemm);
    CHECK(cepe_qmatmul(out, x, &t, rows, 0, NULL, 0, 2) == CEPE_OK);
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < n_out; o++) {
            double ref = 0.0, mag = 0.0;
            for (int i = 0; i < n_in; i++) {
                ref += (double)wf[(size_t)o * n_in + i] * x[r * n_in + i];
                mag += fabs((double)wf[(size_t)o * n_in + i] * x[r * n_in + i]);
            }
            CHECK(fabs(out[r * n_out + o] - ref) <=
                  ((n_in + 16) * 0x1p-24 + (bf16_gemm ? 0x1p-8 : 0.0)) * mag);
        }
    cepe_qmatmul_sgemm_rows(prev);
    cepe_qmatmul_gemm_rows(prev_gemm);
    (void)isa;
    free(w), free(wf), free(x), free(act), free(xh), free(want), free(out);
}

static void test_refusals(void) {
    unsigned char w[4 * 68] = {0};
    float x[64] = {0}, out[4];
    cepe_qtensor t = {CEPE_QTYPE_Q8_0, 4, 48, w, 68}; /* 48: not a multiple of Q8_0's 32 */
    CHECK(cepe_qmatmul(out, x, &t, 1, 0, NULL, 0, 1) == CEPE_ERR_INVALID_ARG);
    CHECK(strstr(cepe_last_error(), "multiple") != NULL);
    t.n_in = 64;
    t.data = w + 1; /* misaligned */
    CHECK(cepe_qmatmul(out, x, &t, 1, 0, NULL, 0, 1) == CEPE_ERR_INVALID_ARG);
    t.data = w;
    t.row_stride = 60; /* shorter than a row */
    CHECK(cepe_qmatmul(out, x, &t, 1, 0, NULL, 0, 1) == CEPE_ERR_INVALID_ARG);
    t.row_stride = 68;
    t.type = (cepe_qtype)6; /* Q5_0: not handled */
    CHECK(cepe_qmatmul(out, x, &t, 1, 0, NULL, 0, 1) == CEPE_ERR_INVALID_ARG);
    t.type = CEPE_QTYPE_Q8_0;
    unsigned char small[8];
    CHECK(cepe_qmatmul(out, x, &t, 1, 0, small, sizeof small, 1) ==
          CEPE_ERR_INVALID_ARG); /* scratch too small */
    CHECK(cepe_qmatmul(out, x, &t, 1, 0, NULL, 0, 1) == CEPE_OK);
    float y;
    CHECK(cepe_vec_dot(CEPE_QTYPE_Q4_K, 300, w, small, &y) == CEPE_ERR_INVALID_ARG);
    CHECK(cepe_dequantize_row(CEPE_QTYPE_Q6_K, w, x, 100) == CEPE_ERR_INVALID_ARG);
    CHECK(cepe_quant_set_isa(9) == CEPE_ERR_INVALID_ARG);
    if (cepe_quant_isa_best() < CEPE_ISA_AVX512)
        CHECK(cepe_quant_set_isa(CEPE_ISA_AVX512) == CEPE_ERR_UNSUPPORTED);
}

int main(void) {
    const cepe_isa best = cepe_quant_isa_best();
    for (int isa = CEPE_ISA_C; isa <= (int)best; isa++) {
        CHECK(cepe_quant_set_isa(isa) == CEPE_OK);
        for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++) test_format(TYPES[i], isa);
    }
    CHECK(cepe_quant_set_isa(best) == CEPE_OK);
    test_refusals();
    printf("test_quant: %d passed, 0 failed (instruction sets up to %s)\n", passed, cepe_isa_name(best));
    return 0;
}
