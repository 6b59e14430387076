/* gemm_blocks32_avx512.c — many activation rows by Q4_0, Q4_1 or Q8_0
 * weights in int8 (AVX-512 VNNI): the prefill product, where the weights are
 * reused by every row.
 *
 * The activations are the decode kernels' (act_q8_32, quantized once per
 * call), so prefill and decode compute the same integers; only the order in
 * which the per-block float terms are added differs.
 *
 * The weights are repacked a panel of 16 rows at a time into the caller's
 * scratch: per block of 32 values, eight registers, register j holding in
 * lane r the four values 4j..4j+3 of weight row r as unsigned bytes, then the
 * 16 rows' scales (and Q4_1's minimums) as floats. One vpdpbusd of register j
 * with the activation's bytes 4j..4j+3 broadcast (signed) then adds four
 * products to each of the 16 lanes: 64 multiply-adds per instruction, eight
 * per block and activation row. Each lane starts at the offset that makes the
 * block's integer dot product exact in int32, as in dot_avx512.c: Q4_0's
 * values are u - 8, so -8 Σa (Σa the activation block's exact sum); Q8_0's
 * signed bytes are made unsigned by adding 128, so -128 Σa; Q4_1's are
 * unsigned as stored (its minimum m adds m · d_a Σa in float). The sum is
 * widened to float and added times (weight scale x activation scale) to
 * float accumulators that live across the whole row.
 *
 * A panel of n_in = 1536 is 48 blocks x 576 B = 27 KB, kept in L1 while
 * GEMM_MR activation rows at a time stream past it. Repacking gathers each
 * register's 16 dwords straight from the 16 stored rows (vpgatherdd), so it
 * costs a few instructions per block, paid once per call. */
#include "quant_impl.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>

#include "simd_x86.h"

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

/* Activation rows per pass over a panel: 8 int32 sums, 8 float accumulators
 * and the 8 weight registers of a block fit the 32 registers; 6 and 10 ran
 * as fast, 4 slower (benchmarks/README.md). */
#ifndef GEMM_MR
#define GEMM_MR 8
#endif

#define PANEL 16

/* Bytes of a block's slot in a panel: eight weight registers, 16 scales, and
 * for Q4_1 16 minimums. */
static size_t slot_bytes(int kind) { return 8 * 64 + PANEL * 4 * (kind == B32_Q4_1 ? 2 : 1); }

static int kind_of(int type) {
    return type == CEPE_QTYPE_Q4_1 ? B32_Q4_1 : type == CEPE_QTYPE_Q8_0 ? B32_Q8_0 : B32_Q4_0;
}

size_t quant_gemm_panel_bytes(int type, int n_in) {
    return (size_t)(n_in / QK32) * slot_bytes(kind_of(type));
}

/* Weight rows [o, o + nr) (nr <= 16) of w repacked into panel; rows past nr
 * are zeros (weights and scales), so their lanes compute zeros. Inlined with a
 * constant kind. */
AVX512 static inline __attribute__((always_inline)) void repack_panel(int kind, const cepe_qtensor *w, int o,
                                                                      int nr, unsigned char *panel) {
    const size_t block = kind == B32_Q4_0   ? sizeof(block_q4_0)
                         : kind == B32_Q4_1 ? sizeof(block_q4_1)
                                            : sizeof(block_q8_0);
    const int qs_at = kind == B32_Q4_1 ? 4 : 2, nb = w->n_in / QK32;
    const size_t slot = slot_bytes(kind);
    const __mmask16 rows = (__mmask16)((1u << nr) - 1);
    const __m512i offs =
        _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                           _mm512_set1_epi32((int)w->row_stride));
    const __m512i low = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    const unsigned char *base = (const unsigned char *)w->data + (size_t)o * w->row_stride;
    for (int b = 0; b < nb; b++) {
        const unsigned char *blk = base + (size_t)b * block;
        unsigned char *dst = panel + (size_t)b * slot;
        if (kind == B32_Q8_0) {
            for (int j = 0; j < 8; j++) {
                const __m512i q =
                    _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, offs, blk + qs_at + 4 * j, 1);
                _mm512_store_si512(dst + 64 * j, _mm512_mask_xor_epi32(q, rows, q, flip));
            }
        } else { /* stored bytes 4j..4j+3: values 4j.. (low nibbles), 16 + 4j.. (high) */
            for (int j = 0; j < 4; j++) {
                const __m512i q =
                    _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, offs, blk + qs_at + 4 * j, 1);
                _mm512_store_si512(dst + 64 * j, _mm512_and_si512(q, low));
                _mm512_store_si512(dst + 64 * (j + 4), _mm512_and_si512(_mm512_srli_epi32(q, 4), low));
            }
        }
        /* the dword at the block's start: its fp16 scale, then Q4_1's minimum */
        const __m512i dm = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, offs, blk, 1);
        _mm512_store_ps(dst + 8 * 64, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm)));
        if (kind == B32_Q4_1)
            _mm512_store_ps(dst + 8 * 64 + 64,
                            _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16))));
    }
}

static inline int32_t bytes4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* mr activation rows (act, ab bytes apart) by one repacked panel: out rows
 * ldo floats apart, the panel's lanes outside `keep` not stored. Inlined with
 * a constant kind and mr, so the arrays below live in registers. */
AVX512 static inline __attribute__((always_inline)) void panel_rows(int kind, int mr, float *out, size_t ldo,
                                                                    const unsigned char *act, size_t ab,
                                                                    int n_in, const unsigned char *panel,
                                                                    int accumulate, __mmask16 keep) {
    const int nb = n_in / QK32;
    const size_t slot = slot_bytes(kind);
    const int offset = kind == B32_Q4_0 ? -8 : kind == B32_Q8_0 ? -128 : 0;
    act_q8_32 a[GEMM_MR];
    __m512 acc[GEMM_MR];
#pragma GCC unroll 16
    for (int i = 0; i < mr; i++) {
        a[i] = quant_act_q8_32(act + (size_t)i * ab, n_in);
        acc[i] = _mm512_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const unsigned char *pw = panel + (size_t)b * slot;
        __m512i p[GEMM_MR];
#pragma GCC unroll 16
        for (int i = 0; i < mr; i++) p[i] = _mm512_set1_epi32(offset * a[i].sum[b]);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m512i wj = _mm512_load_si512(pw + 64 * j);
#pragma GCC unroll 16
            for (int i = 0; i < mr; i++)
                p[i] = _mm512_dpbusd_epi32(p[i], wj, _mm512_set1_epi32(bytes4(a[i].qs + QK32 * b + 4 * j)));
        }
        const __m512 sw = _mm512_load_ps(pw + 8 * 64);
#pragma GCC unroll 16
        for (int i = 0; i < mr; i++)
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p[i]), _mm512_mul_ps(sw, _mm512_set1_ps(a[i].d[b])),
                                     acc[i]);
        if (kind == B32_Q4_1) {
            const __m512 sm = _mm512_load_ps(pw + 8 * 64 + 64);
#pragma GCC unroll 16
            for (int i = 0; i < mr; i++) acc[i] = _mm512_fmadd_ps(sm, _mm512_set1_ps(a[i].s[b]), acc[i]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < mr; i++) {
        float *o = out + (size_t)i * ldo;
        const __m512 v = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(keep, o), acc[i]) : acc[i];
        _mm512_mask_storeu_ps(o, keep, v);
    }
}

_Static_assert(GEMM_MR >= 1 && GEMM_MR <= 12, "GEMM_MR: the tail's cases cover up to 12");

/* One format's loops, inlined with a constant kind: per panel of 16 output
 * rows, every GEMM_MR activation rows, then the last rows % GEMM_MR with one
 * specialization per count (the counts from GEMM_MR on never come, and
 * compile to nothing). */
AVX512 static inline __attribute__((always_inline)) void gemm(int kind, float *out, const cepe_qtensor *w,
                                                              const unsigned char *act, size_t ab, int rows,
                                                              int accumulate, int o0, int o1,
                                                              unsigned char *panel) {
    const int n_in = w->n_in, n_out = w->n_out;
    for (int o = o0; o < o1; o += PANEL) {
        const int nr = o1 - o < PANEL ? o1 - o : PANEL;
        const __mmask16 keep = (__mmask16)((1u << nr) - 1);
        repack_panel(kind, w, o, nr, panel);
        int r = 0;
        for (; r + GEMM_MR <= rows; r += GEMM_MR)
            panel_rows(kind, GEMM_MR, out + (size_t)r * n_out + o, (size_t)n_out, act + (size_t)r * ab, ab,
                       n_in, panel, accumulate, keep);
        float *tail_out = out + (size_t)r * n_out + o;
        const unsigned char *tail_act = act + (size_t)r * ab;
        /* clang-format off */
        switch (rows - r) {
#define TAIL(k)                                                                                           \
        case k:                                                                                           \
            if (k < GEMM_MR)                                                                              \
                panel_rows(kind, k < GEMM_MR ? k : 1, tail_out, (size_t)n_out, tail_act, ab, n_in, panel, \
                           accumulate, keep);                                                             \
            break;
        TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7) TAIL(8) TAIL(9) TAIL(10) TAIL(11)
#undef TAIL
        default:
            break;
        }
        /* clang-format on */
    }
}

AVX512 void quant_gemm_blocks32_avx512(float *out, const cepe_qtensor *w, const unsigned char *act, size_t ab,
                                       int rows, int accumulate, int o0, int o1, unsigned char *panel) {
    switch (kind_of((int)w->type)) {
    case B32_Q4_1:
        gemm(B32_Q4_1, out, w, act, ab, rows, accumulate, o0, o1, panel);
        break;
    case B32_Q8_0:
        gemm(B32_Q8_0, out, w, act, ab, rows, accumulate, o0, o1, panel);
        break;
    default:
        gemm(B32_Q4_0, out, w, act, ab, rows, accumulate, o0, o1, panel);
    }
}

#else /* no x86: cepe_quant_isa() is the C path, so these are never called */

size_t quant_gemm_panel_bytes(int type, int n_in) {
    (void)type, (void)n_in;
    return 0;
}

void quant_gemm_blocks32_avx512(float *out, const cepe_qtensor *w, const unsigned char *act, size_t ab,
                                int rows, int accumulate, int o0, int o1, unsigned char *panel) {
    (void)out, (void)w, (void)act, (void)ab, (void)rows, (void)accumulate, (void)o0, (void)o1, (void)panel;
}

#endif
