/* gemm_bf16_avx512.c — many rows of activations by BF16 weights on CPUs with
 * AVX512-BF16: the activations are rounded to bf16 once per call and
 * vdpbf16ps multiplies 32 bf16 pairs per instruction, accumulated in fp32
 * (twice the multiply-adds of an fp32 FMA, and no widening of the weights).
 *
 * Both products are one register-blocked kernel C[MR x 16 NV] += A · B over
 * k in pairs: A is bf16 activations, a row's pairs as 32-bit words; B is a
 * panel of 16 NV columns packed so that lane j of word p holds the pair of
 * column j for k = 2p, 2p + 1 (what vdpbf16ps multiplies with a broadcast
 * pair of A). The accumulators stay in registers over the whole k.
 *   - forward, out = x · Wᵀ: k runs over n_in, a column is a weight row; the
 *     panel is 16 rows' 32-bit pairs transposed in registers.
 *   - backward, dx = dout · W: k runs over n_out, a column is an input; the
 *     panel interleaves the 16-bit values of two weight rows.
 * An odd k ends with a pair whose second half is zero; missing rows of A and
 * columns of B are zeros too, computed and not stored.
 *
 * Threads split the columns (output features forward, input features
 * backward); each packs its own panels, A is converted once and shared. Rows
 * go QUANT_GEMM_CHUNK_ROWS at a time, so the scratch stops growing there, at
 * the cost of packing the panels again per chunk (about 1 % of a chunk's
 * work). */
#include <stdlib.h>
#include <string.h>

#include "../ops/ops.h"
#include "quant_impl.h"

/* Rows x column-registers of the kernel: 8 x 2 keeps 16 accumulators and
 * reads 2 panel registers and 8 broadcast pairs per 16 vdpbf16ps
 * (benchmarks/README.md: no faster were 6 x 4, 12 x 2, 4 x 4, 8 x 3). */
#ifndef BF16_MR
#define BF16_MR 8
#endif
#ifndef BF16_NV
#define BF16_NV 2
#endif
#define PANEL_COLS (16 * BF16_NV)

int quant_bf16_gemm_ready(void) {
    /* The BF16 kernel takes bf16 activations exactly when the AVX-512 path is
     * selected and the CPU has AVX512-BF16 (quant.c, isa_init). */
    return quant_kernel_for(CEPE_QTYPE_BF16).act == ACT_BF16;
}

/* Bytes of A: `rows` rows (at most a chunk, padded to the kernel's) of k
 * values in pairs. */
static size_t a_bytes(int rows, int k) {
    if (rows > QUANT_GEMM_CHUNK_ROWS) rows = QUANT_GEMM_CHUNK_ROWS;
    const size_t blocks = ((size_t)rows + BF16_MR - 1) / BF16_MR;
    return quant_align_up(blocks * BF16_MR * (size_t)((k + 1) / 2) * 4);
}

/* Bytes of one thread's panel of B over k values. */
static size_t panel_bytes(int k) { return quant_align_up((size_t)((k + 1) / 2) * PANEL_COLS * 4); }

/* Threads for C[rows, cols] = A[rows, k] · B: no more than the panels. */
static int team(int rows, int k, int cols, int n_threads) {
    int nt = n_threads < 1 ? 1 : n_threads;
    const int panels = (cols + PANEL_COLS - 1) / PANEL_COLS;
    if (nt > panels) nt = panels;
    if ((int64_t)rows * k * cols < QUANT_MIN_PARALLEL_WORK) nt = 1;
    return nt < 1 ? 1 : nt;
}

static size_t work_bytes(int rows, int k, int cols, int n_threads) {
    return a_bytes(rows, k) + (size_t)team(rows, k, cols, n_threads) * panel_bytes(k);
}

size_t quant_bf16_gemm_work_size(int rows, int n_in, int n_out, int n_threads) {
    return work_bytes(rows, n_in, n_out, n_threads);
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>

#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

/* Row r of A (k2 words) = the k values at src rounded to bf16 (nearest even,
 * as quant_fp32_to_bf16; NaN stays NaN), an odd k's last pair ending in 0. */
AVX512BF16 static void to_bf16_pairs(uint32_t *dst, const float *src, int k) {
    int i = 0;
    for (; i + 32 <= k; i += 32) {
        const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
        _mm512_storeu_si512(dst + i / 2, (__m512i)h);
    }
    if (i < k) { /* masked loads read zeros past the end */
        const int left = k - i;
        const __mmask16 lo = (__mmask16)(left >= 16 ? 0xFFFF : (1u << left) - 1);
        const __mmask16 hi = (__mmask16)(left <= 16 ? 0 : (1u << (left - 16)) - 1);
        const __m512bh h =
            _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + i + 16), _mm512_maskz_loadu_ps(lo, src + i));
        const int words = (left + 1) / 2;
        _mm512_mask_storeu_epi32(dst + i / 2, (__mmask16)((1u << words) - 1), (__m512i)h);
    }
}

/* A for `rows` rows of src (ld floats apart), then zero rows up to the
 * kernel's multiple. Inside a parallel region: the rows are shared. */
AVX512BF16 static void convert_rows(uint32_t *a, const float *src, int rows, int k, size_t ld) {
    const size_t k2 = (size_t)(k + 1) / 2;
    const int padded = (rows + BF16_MR - 1) / BF16_MR * BF16_MR;
#pragma omp for schedule(static)
    for (int r = 0; r < padded; r++) {
        if (r < rows)
            to_bf16_pairs(a + (size_t)r * k2, src + (size_t)r * ld, k);
        else
            memset(a + (size_t)r * k2, 0, k2 * 4);
    }
}

/* C[MR rows of which mr are stored, nc <= PANEL_COLS columns] (=|+=) A · B:
 * a is the block's first row (k2 words per row), b the panel. */
AVX512BF16 static inline __attribute__((always_inline)) void
kernel(const uint32_t *a, size_t k2, const __m512i *b, float *c, size_t ldc, int mr, int nc, int accumulate) {
    __m512 acc[BF16_MR][BF16_NV];
#pragma GCC unroll 16
    for (int i = 0; i < BF16_MR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < BF16_NV; j++) acc[i][j] = _mm512_setzero_ps();
    for (size_t p = 0; p < k2; p++) {
        __m512bh bv[BF16_NV];
#pragma GCC unroll 4
        for (int j = 0; j < BF16_NV; j++) bv[j] = (__m512bh)_mm512_load_si512(b + p * BF16_NV + j);
#pragma GCC unroll 16
        for (int i = 0; i < BF16_MR; i++) {
            const __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[i * k2 + p]);
#pragma GCC unroll 4
            for (int j = 0; j < BF16_NV; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
        }
    }
    for (int i = 0; i < mr; i++) {
        float *row = c + (size_t)i * ldc;
#pragma GCC unroll 4
        for (int j = 0; j < BF16_NV; j++) {
            const int left = nc - 16 * j;
            if (left <= 0) break;
            const __mmask16 m = (__mmask16)(left >= 16 ? 0xFFFF : (1u << left) - 1);
            __m512 v = acc[i][j];
            if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, row + 16 * j));
            _mm512_mask_storeu_ps(row + 16 * j, m, v);
        }
    }
}

/* C[rows, cols c0 .. c0 + nc) (=|+=) A · panel, every block of rows. */
AVX512BF16 static void panel_product(float *c, size_t ldc, const uint32_t *a, size_t k2, const __m512i *panel,
                                     int rows, int nc, int accumulate) {
    for (int r = 0; r < rows; r += BF16_MR) {
        const int mr = rows - r < BF16_MR ? rows - r : BF16_MR;
        kernel(a + (size_t)r * k2, k2, panel, c + (size_t)r * ldc, ldc, mr, nc, accumulate);
    }
}

/* r[0..15] (16 x 16 words) transposed in place: word c of r[i] moves to
 * word i of r[c]. Pairs of rows interleave words, then pairs of those
 * interleave word pairs, which leaves s[4a + b] holding column 4L + b of rows
 * 4a .. 4a + 3 in its 128-bit lane L; the 4 x 4 lanes are then transposed. */
AVX512BF16 static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16], s[16];
#pragma GCC unroll 8
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
#pragma GCC unroll 4
    for (int a = 0; a < 4; a++) {
        s[4 * a + 0] = _mm512_unpacklo_epi64(t[4 * a], t[4 * a + 2]);
        s[4 * a + 1] = _mm512_unpackhi_epi64(t[4 * a], t[4 * a + 2]);
        s[4 * a + 2] = _mm512_unpacklo_epi64(t[4 * a + 1], t[4 * a + 3]);
        s[4 * a + 3] = _mm512_unpackhi_epi64(t[4 * a + 1], t[4 * a + 3]);
    }
#pragma GCC unroll 4
    for (int b = 0; b < 4; b++) {
        const __m512i x0 = _mm512_shuffle_i32x4(s[b], s[4 + b], 0x44),
                      x1 = _mm512_shuffle_i32x4(s[b], s[4 + b], 0xEE);
        const __m512i y0 = _mm512_shuffle_i32x4(s[8 + b], s[12 + b], 0x44),
                      y1 = _mm512_shuffle_i32x4(s[8 + b], s[12 + b], 0xEE);
        r[b] = _mm512_shuffle_i32x4(x0, y0, 0x88);
        r[4 + b] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
        r[8 + b] = _mm512_shuffle_i32x4(x1, y1, 0x88);
        r[12 + b] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
    }
}

/* Forward panel: columns are weight rows o0 .. o0 + nc; word p of lane j is
 * the pair W[o0 + j][2p], W[o0 + j][2p + 1]: blocks of 16 rows x 32 values
 * loaded (masked: missing rows and values past n_in are zeros) and
 * transposed as 32-bit words. */
AVX512BF16 static void pack_rows(__m512i *panel, const cepe_qtensor *w, int o0, int nc) {
    const int n_in = w->n_in, k2 = (n_in + 1) / 2;
    const unsigned char *base = (const unsigned char *)w->data + (size_t)o0 * w->row_stride;
    for (int g = 0; g < BF16_NV; g++) {
        const int left = nc - 16 * g, lanes = left < 0 ? 0 : left > 16 ? 16 : left;
        const unsigned char *rows = base + (size_t)16 * g * w->row_stride;
        for (int c = 0; c < n_in; c += 32) {
            const int vals = n_in - c < 32 ? n_in - c : 32;
            const __mmask32 m = (__mmask32)(vals == 32 ? 0xFFFFFFFFu : (1u << vals) - 1);
            __m512i r[16];
#pragma GCC unroll 16
            for (int j = 0; j < 16; j++)
                r[j] = j < lanes
                           ? _mm512_maskz_loadu_epi16(m, rows + (size_t)j * w->row_stride + 2 * (size_t)c)
                           : _mm512_setzero_si512();
            transpose16(r);
            const int words = k2 - c / 2 < 16 ? k2 - c / 2 : 16;
            for (int q = 0; q < words; q++) panel[(size_t)(c / 2 + q) * BF16_NV + g] = r[q];
        }
    }
}

/* Backward panel: columns are inputs i0 .. i0 + nc; word q of lane j is the
 * pair W[2q][i0 + j], W[2q + 1][i0 + j] (a missing row 2q + 1 is zeros). */
AVX512BF16 static void pack_cols(__m512i *panel, const cepe_qtensor *w, int i0, int nc) {
    const int n_out = w->n_out, k2 = (n_out + 1) / 2;
    const unsigned char *base = w->data;
    for (int g = 0; g < BF16_NV; g++) {
        const int left = nc - 16 * g, lanes = left < 0 ? 0 : left > 16 ? 16 : left;
        const __mmask16 m = (__mmask16)((1u << lanes) - 1);
        const size_t col = (size_t)(i0 + 16 * g) * 2;
        for (int q = 0; q < k2; q++) {
            const unsigned char *r0 = base + (size_t)(2 * q) * w->row_stride + col;
            const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0));
            const __m512i hi = 2 * q + 1 < n_out
                                   ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + w->row_stride))
                                   : _mm512_setzero_si512();
            panel[(size_t)q * BF16_NV + g] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
        }
    }
}

/* C[rows, cols] (=|+=) src[rows, k] (rounded to bf16) · B, B the weights as
 * the forward (columns are weight rows) or the backward (columns are inputs)
 * sees them; work: work_bytes, 64-byte aligned. */
AVX512BF16 static void gemm(float *c, const float *src, const cepe_qtensor *w, int forward, int rows,
                            int accumulate, unsigned char *work, int n_threads) {
    const int k = forward ? w->n_in : w->n_out, cols = forward ? w->n_out : w->n_in;
    const size_t k2 = (size_t)(k + 1) / 2, pb = panel_bytes(k);
    const int nt = team(rows, k, cols, n_threads);
    uint32_t *a = (uint32_t *)(void *)work;
    unsigned char *panels = work + a_bytes(rows, k);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t, n;
        cepe_team(&t, &n);
        __m512i *panel = (__m512i *)(void *)(panels + (size_t)t * pb);
        int c0, c1;
        cepe_share(cols, PANEL_COLS, t, n, &c0, &c1);
        for (int r0 = 0; r0 < rows; r0 += QUANT_GEMM_CHUNK_ROWS) {
            const int nr = rows - r0 < QUANT_GEMM_CHUNK_ROWS ? rows - r0 : QUANT_GEMM_CHUNK_ROWS;
            convert_rows(a, src + (size_t)r0 * k, nr, k, (size_t)k); /* ends in a barrier */
            for (int j = c0; j < c1; j += PANEL_COLS) {
                const int nc = c1 - j < PANEL_COLS ? c1 - j : PANEL_COLS;
                if (forward)
                    pack_rows(panel, w, j, nc);
                else
                    pack_cols(panel, w, j, nc);
                panel_product(c + (size_t)r0 * cols + j, (size_t)cols, a, k2, panel, nr, nc, accumulate);
            }
#pragma omp barrier /* every thread done with this chunk's A */
        }
    }
}

void quant_bf16_gemm_forward(float *out, const float *x, const cepe_qtensor *w, int rows, int accumulate,
                             void *work, int n_threads) {
    gemm(out, x, w, 1, rows, accumulate, work, n_threads);
}

cepe_status quant_bf16_gemm_backward(float *dinp, const float *dout, const cepe_qtensor *w, int rows,
                                     int accumulate, int n_threads) {
    const size_t bytes = work_bytes(rows, w->n_out, w->n_in, n_threads);
    unsigned char *work = aligned_alloc(QUANT_ALIGN, bytes);
    if (!work) return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "qmatmul backward: %zu bytes of scratch", bytes);
    gemm(dinp, dout, w, 0, rows, accumulate, work, n_threads);
    free(work);
    return CEPE_OK;
}

#else /* no x86: quant_bf16_gemm_ready() is 0 and these are never called */

void quant_bf16_gemm_forward(float *out, const float *x, const cepe_qtensor *w, int rows, int accumulate,
                             void *work, int n_threads) {
    (void)out, (void)x, (void)w, (void)rows, (void)accumulate, (void)work, (void)n_threads;
}

cepe_status quant_bf16_gemm_backward(float *dinp, const float *dout, const cepe_qtensor *w, int rows,
                                     int accumulate, int n_threads) {
    (void)dinp, (void)dout, (void)w, (void)rows, (void)accumulate, (void)n_threads;
    return cepe_fail(CEPE_ERR_UNSUPPORTED, "qmatmul backward: no bf16 GEMM on this CPU");
}

#endif
