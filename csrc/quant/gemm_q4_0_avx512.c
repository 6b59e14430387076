/* gemm_q4_0_avx512.c — many activation rows by Q4_0 weights in int8 (AVX-512
 * VNNI): the prefill product, where the weights are reused by every row.
 *
 * The activations are the decode kernels' (act_q8_32, quantized once per
 * call), so prefill and decode compute the same integers; only the order in
 * which the per-block float terms are added differs.
 *
 * The weights are repacked a panel of 16 rows at a time into the caller's
 * scratch: per block of 32 values, eight registers, register j holding in
 * lane r the four values 4j..4j+3 of weight row r as unsigned bytes 0..15,
 * then the 16 rows' scales as floats. One vpdpbusd of register j with the
 * activation's bytes 4j..4j+3 broadcast (signed) then adds four products to
 * each of the 16 lanes: 64 multiply-adds per instruction, eight per block and
 * activation row. Q4_0's value is q - 8, so each lane starts at -8 Σa (the
 * activation block's exact sum): the block's integer dot product is exact in
 * int32 (|Σ| <= 32 * 15 * 127 + 8 * 32 * 127 < 2^17). It is widened to float
 * and added times (weight scales x activation scale) to float accumulators
 * that live across the whole row.
 *
 * A panel of n_in = 1536 is 48 blocks x 576 B = 27 KB, kept in L1 while
 * GEMM_MR activation rows at a time stream past it. Repacking gathers each
 * register's 16 dwords straight from the 16 stored rows (vpgatherdd), so it
 * costs a few instructions per block, paid once per call. */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#include <limits.h>

#include "quant_impl.h"

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

/* Activation rows per pass over a panel: 8 int32 sums, 8 float accumulators
 * and the 8 weight registers of a block fit the 32 registers (benchmarks/README.md). */
#ifndef GEMM_MR
#define GEMM_MR 8
#endif

#define PANEL 16
#define PANEL_BLOCK_BYTES (8 * 64 + PANEL * 4) /* eight weight registers, 16 scales */

size_t quant_gemm_q4_0_panel_bytes(int n_in) { return (size_t)(n_in / QK32) * PANEL_BLOCK_BYTES; }

/* Weight rows [o, o + nr) (nr <= 16) of w repacked into panel; rows past nr
 * are zeros (weights and scales), so their lanes compute zeros. */
AVX512 static void repack_panel(const cepe_qtensor *w, int o, int nr, int nb, unsigned char *panel) {
    const __mmask16 rows = (__mmask16)((1u << nr) - 1);
    const __m512i offs =
        _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                           _mm512_set1_epi32((int)w->row_stride));
    const __m512i low = _mm512_set1_epi8(0x0F);
    const unsigned char *base = (const unsigned char *)w->data + (size_t)o * w->row_stride;
    for (int b = 0; b < nb; b++) {
        const unsigned char *blk = base + (size_t)b * sizeof(block_q4_0);
        unsigned char *dst = panel + (size_t)b * PANEL_BLOCK_BYTES;
        for (int j = 0; j < 4; j++) { /* stored bytes 4j..4j+3: values 4j.. (low nibbles), 16 + 4j.. (high) */
            const __m512i q =
                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, offs, blk + 2 + 4 * j, 1);
            _mm512_store_si512(dst + 64 * j, _mm512_and_si512(q, low));
            _mm512_store_si512(dst + 64 * (j + 4), _mm512_and_si512(_mm512_srli_epi32(q, 4), low));
        }
        /* the dword at the block's start: its fp16 scale in the low half */
        const __m512i d = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, offs, blk, 1);
        _mm512_store_ps(dst + 8 * 64, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(d)));
    }
}

static inline int32_t bytes4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* mr activation rows (act, ab bytes apart) by one repacked panel: out rows
 * ldo floats apart, the panel's lanes outside `keep` not stored. Inlined with
 * a constant mr, so the arrays below live in registers. */
AVX512 static inline __attribute__((always_inline)) void panel_rows(int mr, float *out, size_t ldo,
                                                                    const unsigned char *act, size_t ab,
                                                                    int n_in, const unsigned char *panel,
                                                                    int accumulate, __mmask16 keep) {
    const int nb = n_in / QK32;
    act_q8_32 a[GEMM_MR];
    __m512 acc[GEMM_MR];
#pragma GCC unroll 16
    for (int i = 0; i < mr; i++) {
        a[i] = quant_act_q8_32(act + (size_t)i * ab, n_in);
        acc[i] = _mm512_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const unsigned char *pw = panel + (size_t)b * PANEL_BLOCK_BYTES;
        __m512i p[GEMM_MR];
#pragma GCC unroll 16
        for (int i = 0; i < mr; i++) p[i] = _mm512_set1_epi32(-8 * a[i].sum[b]);
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
    }
#pragma GCC unroll 16
    for (int i = 0; i < mr; i++) {
        float *o = out + (size_t)i * ldo;
        const __m512 v = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(keep, o), acc[i]) : acc[i];
        _mm512_mask_storeu_ps(o, keep, v);
    }
}

/* The last rows % GEMM_MR rows, one specialization per count (the counts
 * from GEMM_MR on never come, and compile to nothing). */
AVX512 static void panel_tail(int mr, float *out, size_t ldo, const unsigned char *act, size_t ab, int n_in,
                              const unsigned char *panel, int accumulate, __mmask16 keep) {
    switch (mr) {
#define TAIL(k)                                                                                              \
    case k:                                                                                                  \
        if (k < GEMM_MR) panel_rows(k < GEMM_MR ? k : 1, out, ldo, act, ab, n_in, panel, accumulate, keep);  \
        break;
        TAIL(1)
        TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7) TAIL(8) TAIL(9) TAIL(10) TAIL(11)
#undef TAIL
            default : break;
    }
}

_Static_assert(GEMM_MR >= 1 && GEMM_MR <= 12, "GEMM_MR: the tail's cases cover up to 12");

AVX512 void quant_gemm_q4_0_avx512(float *out, const cepe_qtensor *w, const unsigned char *act, size_t ab,
                                   int rows, int accumulate, int o0, int o1, unsigned char *panel) {
    const int n_in = w->n_in, n_out = w->n_out, nb = n_in / QK32;
    for (int o = o0; o < o1; o += PANEL) {
        const int nr = o1 - o < PANEL ? o1 - o : PANEL;
        const __mmask16 keep = (__mmask16)((1u << nr) - 1);
        repack_panel(w, o, nr, nb, panel);
        int r = 0;
        for (; r + GEMM_MR <= rows; r += GEMM_MR)
            panel_rows(GEMM_MR, out + (size_t)r * n_out + o, (size_t)n_out, act + (size_t)r * ab, ab, n_in,
                       panel, accumulate, keep);
        if (r < rows)
            panel_tail(rows - r, out + (size_t)r * n_out + o, (size_t)n_out, act + (size_t)r * ab, ab, n_in,
                       panel, accumulate, keep);
    }
}

#endif
