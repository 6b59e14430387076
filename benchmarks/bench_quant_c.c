/* bench_quant_c.c — bench_quant.py's measurements as a standalone C program,
 * for machines without cepe's Python environment (the quiet 16-core Xeon of
 * benchmarks/README.md): decode (one activation row) per format, instruction
 * set and SmolLM2-135M shape against the BLAS sgemv on the same weights
 * dequantized; then prefill through the quantized kernels, dequantized tiles
 * + sgemm and the fp32 sgemm. Prints JSON in bench_quant.py's layout.
 *
 *   read -r inc lib < <(python -c "import scipy_openblas32 as s; print(s.get_include_dir(),
 * s.get_lib_dir())")
 *   gcc -std=c11 -O3 -march=native -mprefer-vector-width=512 -ffp-contract=fast -fopenmp -Icsrc -I"$inc" \
 *       benchmarks/bench_quant_c.c $(find csrc/quant -name '*.c') csrc/ops/matmul.c csrc/error.c \
 *       -L"$lib" -lscipy_openblas -lm -Wl,-rpath,"$lib" -o bench_quant_c
 *   OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 ./bench_quant_c 1 7 1 > out.json
 *
 * Arguments: threads (1), repeats (7), 1 = decode and prefill, 0 = decode
 * only, 2 = prefill only; FORMATS=Q4_1,Q8_0 limits the prefill's formats.
 * Any CBLAS will do (-DCEPE_SYSTEM_BLAS=1 and its library); the Xeon figures
 * used NumPy's bundled OpenBLAS through a cblas.h naming its scipy_cblas_*64_
 * symbols. Each figure is the median of `repeats` rounds of timed batches
 * (>= 25 ms and 3 calls each), the configurations alternating within a round. */
#include "ops/ops.h"
#include "quant/quant.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
static uint64_t s = 1;
static uint32_t rnd(void) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(s >> 32);
}
static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static const int TY[] = {1, 30, 2, 3, 8, 12, 13, 14};
static const char *TN[] = {"F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"};

static unsigned char *weights(int type, int n_out, int n_in) {
    size_t rb = cepe_qtype_row_bytes(type, n_in);
    unsigned char *w = aligned_alloc(64, (rb * n_out + 63) / 64 * 64);
    for (size_t i = 0; i < rb * n_out; i++) w[i] = rnd();
    int bs = cepe_qtype_block_size(type);
    size_t bb = rb / (n_in / bs);
    uint16_t h = 0x1a25; /* ~0.003 */
    for (int o = 0; o < n_out; o++)
        for (int b = 0; b < n_in / bs; b++) {
            unsigned char *p = w + o * rb + b * bb;
            if (bs == 1) {
                uint16_t v = (rnd() & 0x83ff) | 0x2000;
                if (type == 30) v = (rnd() & 0x807f) | 0x3c00;
                memcpy(p, &v, 2);
                continue;
            }
            memcpy(p + (type == 14 ? 208 : 0), &h, 2);
            if (type == 3 || type == 12 || type == 13) memcpy(p + 2, &h, 2);
        }
    return w;
}

typedef struct {
    double t[64];
    int n;
} samples;
static double med(samples *x) {
    qsort(x->t, x->n, sizeof(double), cmp);
    return x->t[x->n / 2];
}
static double mn(samples *x) {
    double m = 1e9;
    for (int i = 0; i < x->n; i++) m = x->t[i] < m ? x->t[i] : m;
    return m;
}

static int threads = 1, repeats = 7;
static double batch = 0.025;
static double time_q(float *out, const float *x, cepe_qtensor *t, int rows, void *work, size_t ws, int isa,
                     int sg) {
    cepe_quant_set_isa(isa);
    cepe_qmatmul_sgemm_rows(sg);
    cepe_qmatmul_gemm_rows(
        1 << 30); /* the kernels and the tiles, not the int8 GEMM (bench_quant.py has it) */
    cepe_qmatmul(out, x, t, rows, 0, work, ws, threads);
    int n = 0;
    double t0 = now(), dt;
    do {
        cepe_qmatmul(out, x, t, rows, 0, work, ws, threads);
        n++;
        dt = now() - t0;
    } while (dt < batch || n < 3);
    return dt / n;
}
static double time_f(float *out, const float *x, const float *wf, int rows, int n_in, int n_out) {
    matmul_forward(out, x, wf, rows, n_in, n_out, 0, threads);
    int n = 0;
    double t0 = now(), dt;
    do {
        matmul_forward(out, x, wf, rows, n_in, n_out, 0, threads);
        n++;
        dt = now() - t0;
    } while (dt < batch || n < 3);
    return dt / n;
}

int main(int argc, char **argv) {
    if (argc > 1) threads = atoi(argv[1]);
    if (argc > 2) repeats = atoi(argv[2]);
    const int do_prefill = argc > 3 ? atoi(argv[3]) : 1;
    const int best = cepe_quant_isa_best();
    static const char *IN[] = {"c", "avx2", "avx512"};
    printf("{\"threads\": %d, \"repeats\": %d, \"isa_best\": \"%s\", \"decode\": [\n", threads, repeats,
           IN[best]);
    int shapes[4][2] = {{576, 576}, {1536, 576}, {49152, 576}, {576, 1536}};
    int first = 1;
    for (int si = 0; si < 4 && do_prefill != 2; si++) {
        int n_out = shapes[si][0], n_in = shapes[si][1];
        unsigned char *w[8] = {0};
        cepe_qtensor t[8];
        int ok[8];
        float *wf = NULL;
        for (int f = 0; f < 8; f++) {
            ok[f] = n_in % cepe_qtype_block_size(TY[f]) == 0;
            if (!ok[f]) continue;
            w[f] = weights(TY[f], n_out, n_in);
            t[f] = (cepe_qtensor){TY[f], n_out, n_in, w[f], cepe_qtype_row_bytes(TY[f], n_in)};
            if (!wf) {
                wf = aligned_alloc(64, sizeof(float) * n_out * n_in);
                for (int o = 0; o < n_out; o++)
                    cepe_dequantize_row(TY[f], w[f] + o * t[f].row_stride, wf + (size_t)o * n_in, n_in);
            }
        }
        float *x = malloc(4 * n_in), *out = aligned_alloc(64, 4 * ((n_out + 15) / 16 * 16));
        for (int i = 0; i < n_in; i++) x[i] = (rnd() % 2001 - 1000) / 500.0f;
        void *work = malloc(1 << 20);
        samples q[8][3];
        samples fb;
        memset(q, 0, sizeof q);
        memset(&fb, 0, sizeof fb);
        for (int r = 0; r < repeats; r++) {
            for (int f = 0; f < 8; f++)
                if (ok[f])
                    for (int isa = 0; isa <= best; isa++) {
                        samples *sp = &q[f][isa];
                        sp->t[sp->n++] = time_q(out, x, &t[f], 1, work, 1 << 20, isa, 1 << 30);
                    }
            fb.t[fb.n++] = time_f(out, x, wf, 1, n_in, n_out);
        }
        double base = med(&fb);
        for (int f = 0; f < 8; f++)
            if (ok[f])
                for (int isa = 0; isa <= best; isa++) {
                    double m = med(&q[f][isa]);
                    printf("%s {\"shape\": [%d, %d], \"format\": \"%s\", \"isa\": \"%s\", \"us\": %.2f, "
                           "\"us_min\": %.2f, \"gflops\": %.2f, \"gbs\": %.2f, \"speedup_vs_fp32_sgemv\": "
                           "%.2f}\n",
                           first ? "" : ",", n_out, n_in, TN[f], IN[isa], m * 1e6, mn(&q[f][isa]) * 1e6,
                           2.0 * n_out * n_in / m / 1e9, (double)t[f].row_stride * n_out / m / 1e9, base / m);
                    first = 0;
                }
        printf(", {\"shape\": [%d, %d], \"format\": \"F32 sgemv\", \"isa\": \"blas\", \"us\": %.2f, "
               "\"us_min\": %.2f, \"gflops\": %.2f, \"gbs\": %.2f, \"speedup_vs_fp32_sgemv\": 1.0}\n",
               n_out, n_in, base * 1e6, mn(&fb) * 1e6, 2.0 * n_out * n_in / base / 1e9,
               4.0 * n_out * n_in / base / 1e9);
        fflush(stdout);
        for (int f = 0; f < 8; f++) free(w[f]);
        free(wf);
        free(x);
        free(out);
        free(work);
    }
    printf("], \"prefill\": [\n");
    first = 1;
    int rowsv[] = {1, 2, 4, 8, 16, 32, 64, 128, 512};
    const char *only = getenv("FORMATS");
    for (int f = 0; f < 8 && do_prefill; f++) {
        if (only && !strstr(only, TN[f])) continue;
        int n_out = cepe_qtype_block_size(TY[f]) == 256 ? 576 : 1536, n_in = n_out == 576 ? 1536 : 576;
        unsigned char *w = weights(TY[f], n_out, n_in);
        cepe_qtensor t = {TY[f], n_out, n_in, w, cepe_qtype_row_bytes(TY[f], n_in)};
        float *wf = aligned_alloc(64, sizeof(float) * n_out * n_in);
        for (int o = 0; o < n_out; o++)
            cepe_dequantize_row(TY[f], w + o * t.row_stride, wf + (size_t)o * n_in, n_in);
        float *x = malloc(4 * 512 * n_in), *out = malloc(4 * 512 * n_out);
        for (int i = 0; i < 512 * n_in; i++) x[i] = (rnd() % 2001 - 1000) / 500.0f;
        size_t ws = 64u << 20;
        void *work = malloc(ws);
        samples a[9], b[9], c[9];
        memset(a, 0, sizeof a);
        memset(b, 0, sizeof b);
        memset(c, 0, sizeof c);
        int rep = repeats < 5 ? repeats : 5;
        for (int r = 0; r < rep; r++)
            for (int k = 0; k < 9; k++) {
                a[k].t[a[k].n++] = time_q(out, x, &t, rowsv[k], work, ws, best, 1 << 30);
                b[k].t[b[k].n++] = time_q(out, x, &t, rowsv[k], work, ws, best, 1);
                c[k].t[c[k].n++] = time_f(out, x, wf, rowsv[k], n_in, n_out);
            }
        for (int k = 0; k < 9; k++) {
            printf("%s {\"format\": \"%s\", \"shape\": [%d, %d], \"rows\": %d, \"kernels us\": %.1f, "
                   "\"tiles+sgemm us\": %.1f, \"fp32 sgemm us\": %.1f}\n",
                   first ? "" : ",", TN[f], n_out, n_in, rowsv[k], med(&a[k]) * 1e6, med(&b[k]) * 1e6,
                   med(&c[k]) * 1e6);
            first = 0;
        }
        fflush(stdout);
        free(w);
        free(wf);
        free(x);
        free(out);
        free(work);
    }
    printf("]}\n");
    return 0;
}
