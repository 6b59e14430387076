// cuda_attention.cu — scaled dot-product attention with an online softmax
// (attention.c), optionally returning each query's log-sum-exp for the
// backward (attention.c's attention_forward_lse).
//
// Same shapes and masks as the CPU (ops.h, attention_shape): causal with
// q_offset, sliding window, key padding (key_valid), GQA, arbitrary row and
// batch strides; a query that sees no key gets a zero output and lse = -inf.
//
// A block serves one (batch row b, kv head g) and ATT_ROWS_PER_BLOCK query
// rows, where a row is a (query t, head h of g's group) pair, t-major: the
// group's heads share every key tile the block loads (GQA), and consecutive
// t have nearly the same key range (causal). Keys are visited in tiles of
// ATT_BK = 32, one key per lane when scoring:
//   K, V tile (32 x hd) -> shared memory (padding and out-of-range keys: 0)
//   lane j: s = scale q·k_j for each of its warp's ATT_ROWS rows (masked: -inf)
//   online softmax per row (elementwise.h: the CPU's update and exp)
//   acc[d] += Σ_j p_j v_j[d], lane owning d = lane + 32 i, p_j by shuffle
// Memory is O(tile) whatever Tk is, as on the CPU.
//
// Decoding (one query per row) makes too few such blocks to fill the GPU, so
// there the keys are split too (flash-decoding): the block's key range is
// cut into n_splits chunks, one block each, which leave unnormalised partials
// (running max m, denominator l, accumulator) for attention_merge_kernel.
#include <algorithm>

#include "cuda_common.cuh"
#include "ops/elementwise.h"

#define ATT_WARPS 4
#define ATT_ROWS 4 // query rows per warp: each K element read from shared memory serves 4 dot products
#define ATT_ROWS_PER_BLOCK (ATT_WARPS * ATT_ROWS)
#define ATT_BK 32
#define ATT_MAX_HD 256 // ops.h's limit (CEPE_MAX_HEAD_DIM)
// keys per split at least: one tile (decode attention is latency-bound, so short contexts gain from
// splitting too)
#define ATT_SPLIT_MIN 32
#define ATT_LOAD_BATCH 8 // tile elements each thread has in flight at once
#define ATT_MAX_SPLITS 128

// Where the blocks of a split launch leave their partials (n == 1: none,
// the blocks write out and lse themselves). Rows are indexed like lse:
// (b * Tq + t) * H + h, R = B * Tq * H of them.
struct att_split {
    int n;      // key splits per row block
    float *ml;  // (n, R, 2): m and l of each split
    float *acc; // (n, R, hd): its unnormalised accumulator, or NULL (lse only)
};

// Dynamic shared memory: K and V tiles with an odd row stride (lane j
// reading column d of row j hits bank (j * kst + d) % 32: all different),
// then the block's query rows.
static size_t att_smem_bytes(int hd) {
    const int kst = hd | 1;
    return sizeof(float) * ((size_t)2 * ATT_BK * kst + (size_t)ATT_ROWS_PER_BLOCK * hd);
}

// ND = ceil(hd / 32): the output dims each lane owns (d = lane + 32 i).
template <int ND>
__global__ void __launch_bounds__(ATT_WARPS * 32)
    attention_kernel(float *out, float *lse, const float *q, const float *k, const float *v,
                     const uint8_t *key_valid, attention_shape s, att_split sp, int b0) {
    extern __shared__ float smem[];
    const int hd = s.hd, kst = hd | 1;
    float *Ks = smem;              // [ATT_BK][kst]
    float *Vs = Ks + ATT_BK * kst; // [ATT_BK][kst]
    float *Qs = Vs + ATT_BK * kst; // [ATT_ROWS_PER_BLOCK][hd]
    __shared__ int kvalid[ATT_BK]; // key may be attended (not padding, not past the tile's end)

    const int b = b0 + blockIdx.z, g = blockIdx.y;
    const int group = s.H / s.KVH, n_rows = group * s.Tq;
    const int row0 = (int)(blockIdx.x / sp.n) * ATT_ROWS_PER_BLOCK, split = (int)(blockIdx.x % sp.n);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float *kb = k + b * s.kv_bstride + (long)g * hd; // key j of this kv head: kb + j * kv_rstride
    const float *vb = v + b * s.kv_bstride + (long)g * hd;
    const uint8_t *valid = key_valid ? key_valid + b * s.valid_bstride : nullptr;

    // the block's query rows -> Qs (rows past the end: zeros, never attended)
    for (int idx = threadIdx.x; idx < ATT_ROWS_PER_BLOCK * hd; idx += blockDim.x) {
        const int r = idx / hd, d = idx % hd, row = row0 + r;
        float x = 0.0f;
        if (row < n_rows) {
            const int t = row / group, h = g * group + row % group;
            x = q[b * s.q_bstride + (long)t * s.q_rstride + (long)h * hd + d];
        }
        Qs[r * hd + d] = x;
    }

    // this warp's rows: key range, running max m, denominator l, accumulator
    int lo[ATT_ROWS], hi[ATT_ROWS];
    float m[ATT_ROWS], l[ATT_ROWS], acc[ATT_ROWS][ND];
#pragma unroll
    for (int r = 0; r < ATT_ROWS; r++) {
        const int row = row0 + warp * ATT_ROWS + r;
        lo[r] = hi[r] = 0; // a row past the end sees nothing
        if (row < n_rows) cepe_key_range(s.Tk, s.causal, s.window, s.q_offset + row / group, &lo[r], &hi[r]);
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < ND; i++) acc[r][i] = 0.0f;
    }

    // the union of the block's key ranges (ranges grow with t), and this
    // split's chunk of it, in whole tiles
    const int last_row = min(row0 + ATT_ROWS_PER_BLOCK, n_rows) - 1;
    int blo, bhi, unused;
    cepe_key_range(s.Tk, s.causal, s.window, s.q_offset + row0 / group, &blo, &unused);
    cepe_key_range(s.Tk, s.causal, s.window, s.q_offset + last_row / group, &unused, &bhi);
    const int chunk = (max(bhi - blo, 0) + sp.n - 1) / sp.n;
    const int klo = blo + split * ((chunk + ATT_BK - 1) / ATT_BK * ATT_BK);
    const int khi = min(bhi, klo + (chunk + ATT_BK - 1) / ATT_BK * ATT_BK);

    const float *Qw = Qs + warp * ATT_ROWS * hd;
    for (int j0 = klo; j0 < khi; j0 += ATT_BK) {
        const int nk = min(ATT_BK, khi - j0);
        __syncthreads(); // every warp is done with the previous tile (and Qs is written)
        if (threadIdx.x < ATT_BK) {
            const int jj = threadIdx.x;
            kvalid[jj] = jj < nk && (!valid || valid[j0 + jj] != 0);
        }
        // ATT_LOAD_BATCH elements per thread are loaded before any is stored,
        // so their global-memory latencies overlap instead of adding up (one
        // load at a time made a tile cost ~16 round trips)
        const int n_el = ATT_BK * hd;
        for (int base = 0; base < n_el; base += ATT_LOAD_BATCH * ATT_WARPS * 32) {
            float kx[ATT_LOAD_BATCH], vx[ATT_LOAD_BATCH];
#pragma unroll
            for (int u = 0; u < ATT_LOAD_BATCH; u++) {
                const int idx = base + u * ATT_WARPS * 32 + (int)threadIdx.x, jj = idx / hd;
                kx[u] = vx[u] = 0.0f;
                // padding never reaches the sums, even as 0 * NaN
                if (idx < n_el && jj < nk && (!valid || valid[j0 + jj] != 0)) {
                    const long at = (long)(j0 + jj) * s.kv_rstride + idx % hd;
                    kx[u] = kb[at];
                    if (out) vx[u] = vb[at];
                }
            }
#pragma unroll
            for (int u = 0; u < ATT_LOAD_BATCH; u++) {
                const int idx = base + u * ATT_WARPS * 32 + (int)threadIdx.x;
                if (idx < n_el) {
                    Ks[idx / hd * kst + idx % hd] = kx[u];
                    Vs[idx / hd * kst + idx % hd] = vx[u];
                }
            }
        }
        __syncthreads();

        // scores of key j0 + lane against the warp's rows
        float dot[ATT_ROWS];
#pragma unroll
        for (int r = 0; r < ATT_ROWS; r++) dot[r] = 0.0f;
        const float *kr = Ks + lane * kst;
        for (int d = 0; d < hd; d++) {
            const float kd = kr[d];
#pragma unroll
            for (int r = 0; r < ATT_ROWS; r++) dot[r] += Qw[r * hd + d] * kd;
        }
        const int j = j0 + lane;
        float p[ATT_ROWS];
        bool any = false;
#pragma unroll
        for (int r = 0; r < ATT_ROWS; r++) {
            const bool ok = kvalid[lane] && j >= lo[r] && j < hi[r];
            const float sc = ok ? dot[r] * s.scale : -INFINITY;
            const float bmax = warp_max(sc);
            p[r] = 0.0f;
            if (bmax == -INFINITY) continue; // nothing visible to this row here (warp-uniform)
            const float corr = cepe_online_softmax_rescale(&m[r], &l[r], bmax);
            p[r] = cepe_exp_neg(sc - m[r]); // masked: exp(-inf) = 0
            l[r] += warp_sum(p[r]);
#pragma unroll
            for (int i = 0; i < ND; i++) acc[r][i] *= corr;
            any = true;
        }
        if (!out || !any) continue; // warp-uniform
        for (int jj = 0; jj < nk; jj++) {
            float pj[ATT_ROWS];
#pragma unroll
            for (int r = 0; r < ATT_ROWS; r++) pj[r] = __shfl_sync(CUDA_FULL_MASK, p[r], jj);
#pragma unroll
            for (int i = 0; i < ND; i++) {
                const int d = lane + 32 * i;
                if (d < hd) {
                    const float vd = Vs[jj * kst + d];
#pragma unroll
                    for (int r = 0; r < ATT_ROWS; r++) acc[r][i] += pj[r] * vd;
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ATT_ROWS; r++) {
        const int row = row0 + warp * ATT_ROWS + r;
        if (row >= n_rows) continue;
        const int t = row / group, h = g * group + row % group;
        const long orow = ((long)b * s.Tq + t) * s.H + h; // out (B, Tq, H, hd), lse (B, Tq, H)
        if (sp.n > 1) {                                   // partials for the merge
            const long at = (long)split * s.B * s.Tq * s.H + orow;
            if (lane == 0) {
                sp.ml[2 * at] = m[r];
                sp.ml[2 * at + 1] = l[r];
            }
            if (!sp.acc) continue;
#pragma unroll
            for (int i = 0; i < ND; i++) {
                const int d = lane + 32 * i;
                if (d < hd) sp.acc[at * hd + d] = acc[r][i];
            }
            continue;
        }
        if (lse && lane == 0) lse[orow] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
        if (!out) continue;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f; // no visible key: zero output
#pragma unroll
        for (int i = 0; i < ND; i++) {
            const int d = lane + 32 * i;
            if (d < hd) out[orow * hd + d] = acc[r][i] * inv;
        }
    }
}

// out (rows, hd) or NULL and lse (rows) or NULL from the n partials of each
// row (att_split): the online softmax's merge, m = max m_s, l = Σ l_s e^(m_s - m),
// out = Σ acc_s e^(m_s - m) / l. One warp per row.
__global__ void attention_merge_kernel(float *out, float *lse, const float *ml, const float *acc, long rows,
                                       int n, int hd) {
    const int lane = threadIdx.x % 32;
    const long warps = (long)gridDim.x * (blockDim.x / 32);
    for (long row = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; row < rows; row += warps) {
        float m = -INFINITY, l = 0.0f;
        for (int k = 0; k < n; k++) m = fmaxf(m, ml[2 * (k * rows + row)]);
        if (m != -INFINITY)
            for (int k = 0; k < n; k++)
                l += ml[2 * (k * rows + row) + 1] * expf(ml[2 * (k * rows + row)] - m);
        if (lse && lane == 0) lse[row] = l > 0.0f ? m + logf(l) : -INFINITY;
        if (!out) continue;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f; // no visible key: zero output
        for (int d = lane; d < hd; d += 32) {
            float o = 0.0f;
            for (int k = 0; k < n && inv > 0.0f; k++) {
                const float mk = ml[2 * (k * rows + row)];
                if (mk != -INFINITY) o += acc[(k * rows + row) * hd + d] * expf(mk - m);
            }
            out[row * hd + d] = o * inv;
        }
    }
}

int cuda_attention_check(cuda_state *st, const attention_shape *s, const char *what) {
    if (s->KVH < 1 || s->H % s->KVH != 0 || s->hd < 1 || s->hd > ATT_MAX_HD || s->Tk < 0 || s->q_offset < 0 ||
        s->window < 0)
        return cuda_fail(st, CEPE_ERR_INVALID_ARG,
                         "%s: bad shape H=%d KVH=%d hd=%d (<= %d) Tk=%d q_offset=%d window=%d", what, s->H,
                         s->KVH, s->hd, ATT_MAX_HD, s->Tk, s->q_offset, s->window);
    if (s->KVH > CUDA_MAX_GRID_YZ || s->H > CUDA_MAX_GRID_YZ)
        return cuda_fail(st, CEPE_ERR_UNSUPPORTED, "%s: %d heads exceed a launch's grid", what, s->H);
    return 0;
}

// Key splits per row block: 1 when the (row block, kv head, batch row)
// blocks fill the GPU; else enough to fill it twice over, each split keeping
// at least ATT_SPLIT_MIN keys.
static int att_splits(const cuda_state *st, const attention_shape *s, long blocks) {
    if (blocks >= st->sm_count) return 1;
    long n = (2L * st->sm_count + blocks - 1) / blocks;
    n = std::min(n, (long)(s->Tk + ATT_SPLIT_MIN - 1) / ATT_SPLIT_MIN);
    return (int)std::max(std::min(n, (long)ATT_MAX_SPLITS), 1L);
}

template <int ND>
static int launch(cuda_state *st, float *out, float *lse, const float *q, const float *k, const float *v,
                  const uint8_t *key_valid, const attention_shape *s) {
    const size_t smem = att_smem_bytes(s->hd);
    if (smem > (size_t)st->smem_optin)
        return cuda_fail(st, CEPE_ERR_UNSUPPORTED,
                         "attention: head_dim %d needs %zu bytes of shared memory (%d here)", s->hd, smem,
                         st->smem_optin);
    int rc = cuda_check(
        st,
        cudaFuncSetAttribute(attention_kernel<ND>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
        "attention (shared memory)");
    if (rc) return rc;
    const long n_rows = (long)(s->H / s->KVH) * s->Tq, rows = (long)s->B * s->Tq * s->H;
    const long row_blocks = (n_rows + ATT_ROWS_PER_BLOCK - 1) / ATT_ROWS_PER_BLOCK;
    att_split sp = {att_splits(st, s, row_blocks * s->KVH * s->B), nullptr, nullptr};
    if (row_blocks * sp.n > 0x7fffffffL)
        return cuda_fail(st, CEPE_ERR_UNSUPPORTED, "attention: %ld query rows exceed a launch's grid",
                         n_rows);
    if (sp.n > 1) {
        const size_t per_split = (size_t)rows * (2 + (out ? s->hd : 0));
        if (!(sp.ml =
                  (float *)cuda_scratch(st, sizeof(float) * per_split * sp.n, "attention (split partials)")))
            return CEPE_ERR_OUT_OF_MEMORY;
        sp.acc = out ? sp.ml + (size_t)2 * rows * sp.n : nullptr;
    }
    for (int b0 = 0; b0 < s->B && !rc; b0 += CUDA_MAX_GRID_YZ) {
        const dim3 grid((unsigned)(row_blocks * sp.n), (unsigned)s->KVH,
                        (unsigned)std::min(s->B - b0, CUDA_MAX_GRID_YZ));
        attention_kernel<ND>
            <<<grid, ATT_WARPS * 32, smem, st->stream>>>(out, lse, q, k, v, key_valid, *s, sp, b0);
        rc = cuda_launched(st, "attention");
    }
    if (!rc && sp.n > 1) {
        attention_merge_kernel<<<cuda_blocks((size_t)rows * 32, CUDA_THREADS), CUDA_THREADS, 0, st->stream>>>(
            out, lse, sp.ml, sp.acc, rows, sp.n, s->hd);
        rc = cuda_launched(st, "attention (merge)");
    }
    cuda_scratch_free(st, sp.ml);
    return rc;
}

// out (B, Tq, H*hd) or NULL, lse (B, Tq, H) or NULL
static int attention_common(const cepe_backend *be, float *out, float *lse, const float *q, const float *k,
                            const float *v, const uint8_t *key_valid, const attention_shape *s,
                            const char *what) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (s->B <= 0 || s->Tq <= 0 || s->H <= 0 || (!out && !lse)) return 0;
    const int rc = cuda_attention_check(st, s, what);
    if (rc) return rc;
    switch ((s->hd + 31) / 32) {
    case 1:
        return launch<1>(st, out, lse, q, k, v, key_valid, s);
    case 2:
        return launch<2>(st, out, lse, q, k, v, key_valid, s);
    case 3:
        return launch<3>(st, out, lse, q, k, v, key_valid, s);
    case 4:
        return launch<4>(st, out, lse, q, k, v, key_valid, s);
    case 5:
        return launch<5>(st, out, lse, q, k, v, key_valid, s);
    case 6:
        return launch<6>(st, out, lse, q, k, v, key_valid, s);
    case 7:
        return launch<7>(st, out, lse, q, k, v, key_valid, s);
    default:
        return launch<8>(st, out, lse, q, k, v, key_valid, s);
    }
}

int cuda_attention(const cepe_backend *be, float *out, const float *q, const float *k, const float *v,
                   const uint8_t *key_valid, const attention_shape *s, int nt) {
    (void)nt;
    return attention_common(be, out, nullptr, q, k, v, key_valid, s, "attention");
}

int cuda_attention_lse(const cepe_backend *be, float *out, float *lse, const float *q, const float *k,
                       const float *v, const uint8_t *key_valid, const attention_shape *s, int nt) {
    (void)nt;
    return attention_common(be, out, lse, q, k, v, key_valid, s, "attention_lse");
}
