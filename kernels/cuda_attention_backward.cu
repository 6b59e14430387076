// cuda_attention_backward.cu — attention's backward (attention.c),
// FlashAttention-2 style: nothing of size Tq x Tk is ever stored. For a tile
// of BR query rows and BC keys the probabilities are rebuilt from the
// forward's lse, and D = rowsum(dO ∘ O) stands in for the softmax's Jacobian:
//   S  = scale Q Kᵀ,  P = exp(S - lse)      (masked entries: 0)
//   dV += Pᵀ dO,      dS = P ∘ (dO Vᵀ - D)
//   dK += scale dSᵀ Q,  dQ += scale dS K
// Two kernels, each the only writer of what it accumulates, so no atomics
// and the same bits on every run: one per (batch row, kv head, key tile)
// sums dK, dV over every query row of the heads sharing that kv head (GQA),
// one per (batch row, head, query tile) sums dQ over the key tiles. Both
// recompute S and dO Vᵀ (FlashAttention-1's split), the price of determinism.
// Masks, strides and the no-visible-key rule are the forward's.
#include <algorithm>

#include "cuda_common.cuh"
#include "ops/elementwise.h"

#define AB_BR 32 // query rows per tile
#define AB_BC 32 // keys per tile: one per lane in tile_probs
#define AB_WARPS 8
#define AB_THREADS (AB_WARPS * 32)
#define AB_PST (AB_BC + 1) // row stride of P and dS in shared memory
#define AB_LOAD_BATCH 4    // tile elements each thread loads before storing any (their latencies overlap)
#define AB_DSPLIT 8        // threads sharing one row (dQ) or key (dK, dV) when accumulating: d = dl + 8 i

// Dynamic shared memory: Qs, dOs (BR x kst), Ks, Vs (BC x kst) with an odd
// row stride (conflict-free column walks), then P and dS (BR x PST).
static size_t ab_smem_bytes(int hd) {
    const size_t kst = (size_t)(hd | 1);
    return sizeof(float) * (2 * AB_BR * kst + 2 * AB_BC * kst + 2 * (size_t)AB_BR * AB_PST);
}

struct ab_tiles {
    float *Qs, *dOs, *Ks, *Vs, *P, *dS;
    int kst;
};

static __device__ ab_tiles carve(float *smem, int hd) {
    ab_tiles w;
    w.kst = hd | 1;
    w.Qs = smem;
    w.dOs = w.Qs + AB_BR * w.kst;
    w.Ks = w.dOs + AB_BR * w.kst;
    w.Vs = w.Ks + AB_BC * w.kst;
    w.P = w.Vs + AB_BC * w.kst;
    w.dS = w.P + AB_BR * AB_PST;
    return w;
}

// D (rows) = Σ_d dout ∘ out over each row of hd: one warp per row.
__global__ void attention_rowdot_kernel(float *D, const float *dout, const float *out, long rows, int hd) {
    const int lane = threadIdx.x % 32;
    const long warps = (long)gridDim.x * (blockDim.x / 32);
    for (long row = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; row < rows; row += warps) {
        float sum = 0.0f;
        for (int d = lane; d < hd; d += 32) sum += dout[row * hd + d] * out[row * hd + d];
        sum = warp_sum(sum);
        if (lane == 0) D[row] = sum;
    }
}

// Query rows t0..t0+BR-1 of head h, batch row b: q -> Qs, dout -> dOs, and
// per row lse, D and the visible key range (empty past Tq or where lse = -inf).
static __device__ void load_rows(const ab_tiles &w, float *Ls, float *Ds, int *rlo, int *rhi, const float *q,
                                 const float *dout, const float *lse, const float *D,
                                 const attention_shape &s, int b, int h, int t0) {
    const int hd = s.hd;
    const int n_el = AB_BR * hd;
    for (int base = 0; base < n_el; base += AB_LOAD_BATCH * AB_THREADS) { // loads in flight together
        float qx[AB_LOAD_BATCH], ox[AB_LOAD_BATCH];
#pragma unroll
        for (int u = 0; u < AB_LOAD_BATCH; u++) {
            const int idx = base + u * AB_THREADS + (int)threadIdx.x, t = t0 + idx / hd, d = idx % hd;
            qx[u] = ox[u] = 0.0f;
            if (idx < n_el && t < s.Tq) {
                qx[u] = q[b * s.q_bstride + (long)t * s.q_rstride + (long)h * hd + d];
                ox[u] = dout[(((long)b * s.Tq + t) * s.H + h) * hd + d];
            }
        }
#pragma unroll
        for (int u = 0; u < AB_LOAD_BATCH; u++) {
            const int idx = base + u * AB_THREADS + (int)threadIdx.x;
            if (idx < n_el) {
                w.Qs[idx / hd * w.kst + idx % hd] = qx[u];
                w.dOs[idx / hd * w.kst + idx % hd] = ox[u];
            }
        }
    }
    if (threadIdx.x < AB_BR) {
        const int r = threadIdx.x, t = t0 + r;
        int lo = 0, hi = 0;
        float L = -INFINITY, Dr = 0.0f;
        if (t < s.Tq) {
            const long row = ((long)b * s.Tq + t) * s.H + h;
            L = lse[row];
            Dr = D[row];
            if (L != -INFINITY) cepe_key_range(s.Tk, s.causal, s.window, s.q_offset + t, &lo, &hi);
        }
        rlo[r] = lo;
        rhi[r] = hi;
        Ls[r] = L;
        Ds[r] = Dr;
    }
}

// Keys j0..j0+nk-1 of kv head g, batch row b: k -> Ks, v -> Vs (padding and
// keys past nk: zeros) and kvalid. Returns this thread's kvalid entry (0 for
// threads past BC), for the caller's __syncthreads_or.
static __device__ int load_keys(const ab_tiles &w, int *kvalid, const float *k, const float *v,
                                const uint8_t *key_valid, const attention_shape &s, int b, int g, int j0,
                                int nk) {
    const int hd = s.hd;
    const uint8_t *valid = key_valid ? key_valid + b * s.valid_bstride : nullptr;
    const long base = b * s.kv_bstride + (long)g * hd;
    const int n_el = AB_BC * hd;
    for (int i0 = 0; i0 < n_el; i0 += AB_LOAD_BATCH * AB_THREADS) { // loads in flight together
        float kx[AB_LOAD_BATCH], vx[AB_LOAD_BATCH];
#pragma unroll
        for (int u = 0; u < AB_LOAD_BATCH; u++) {
            const int idx = i0 + u * AB_THREADS + (int)threadIdx.x, jj = idx / hd;
            kx[u] = vx[u] = 0.0f;
            if (idx < n_el && jj < nk && (!valid || valid[j0 + jj] != 0)) {
                const long at = base + (long)(j0 + jj) * s.kv_rstride + idx % hd;
                kx[u] = k[at];
                vx[u] = v[at];
            }
        }
#pragma unroll
        for (int u = 0; u < AB_LOAD_BATCH; u++) {
            const int idx = i0 + u * AB_THREADS + (int)threadIdx.x;
            if (idx < n_el) {
                w.Ks[idx / hd * w.kst + idx % hd] = kx[u];
                w.Vs[idx / hd * w.kst + idx % hd] = vx[u];
            }
        }
    }
    int mine = 0;
    if (threadIdx.x < AB_BC) {
        const int jj = threadIdx.x;
        mine = jj < nk && (!valid || valid[j0 + jj] != 0);
        kvalid[jj] = mine;
    }
    return mine;
}

// P and dS of the BR x BC tile: this thread scores key j0 + lane against the
// rows warp, warp + 8, warp + 16, warp + 24 (the row's Qs/dOs reads are
// warp-wide broadcasts, the key's a conflict-free column walk).
static __device__ void tile_probs(const ab_tiles &w, const float *Ls, const float *Ds, const int *rlo,
                                  const int *rhi, const int *kvalid, int j0, int hd, float scale) {
    constexpr int RPW = AB_BR / AB_WARPS;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, j = j0 + lane;
    const float *kr = w.Ks + lane * w.kst, *vr = w.Vs + lane * w.kst;
    float sdot[RPW], pdot[RPW];
#pragma unroll
    for (int m = 0; m < RPW; m++) sdot[m] = pdot[m] = 0.0f;
    for (int d = 0; d < hd; d++) {
        const float kd = kr[d], vd = vr[d];
#pragma unroll
        for (int m = 0; m < RPW; m++) {
            const int r = warp + AB_WARPS * m;
            sdot[m] += w.Qs[r * w.kst + d] * kd;
            pdot[m] += w.dOs[r * w.kst + d] * vd;
        }
    }
#pragma unroll
    for (int m = 0; m < RPW; m++) {
        const int r = warp + AB_WARPS * m;
        const bool ok = kvalid[lane] && j >= rlo[r] && j < rhi[r];
        const float p = ok ? cepe_exp_neg(sdot[m] * scale - Ls[r]) : 0.0f; // the forward's softmax, rebuilt
        w.P[r * AB_PST + lane] = p;
        w.dS[r * AB_PST + lane] = p * (pdot[m] - Ds[r]);
    }
}

// dK, dV of keys j0..j0+BC-1 (blockIdx.x) of kv head g (blockIdx.y), batch
// row b0 + blockIdx.z, summed over every query row that can see them. This
// thread accumulates key jl = tid / 8, dims d = tid % 8 + 8 i (i < KN).
template <int KN>
__global__ void __launch_bounds__(AB_THREADS)
    attention_dkdv_kernel(float *dk, float *dv, const float *dout, const float *q, const float *k,
                          const float *v, const float *lse, const float *D, const uint8_t *key_valid,
                          attention_shape s, int b0) {
    extern __shared__ float smem[];
    __shared__ float Ls[AB_BR], Ds[AB_BR];
    __shared__ int rlo[AB_BR], rhi[AB_BR], kvalid[AB_BC];
    const ab_tiles w = carve(smem, s.hd);
    const int hd = s.hd, group = s.H / s.KVH;
    const int b = b0 + blockIdx.z, g = blockIdx.y, j0 = blockIdx.x * AB_BC;
    const int nk = min(AB_BC, s.Tk - j0);
    if (!__syncthreads_or(load_keys(w, kvalid, k, v, key_valid, s, b, g, j0, nk))) return; // all padding

    const int jl = threadIdx.x / AB_DSPLIT, dl = threadIdx.x % AB_DSPLIT;
    float adk[KN], adv[KN];
#pragma unroll
    for (int i = 0; i < KN; i++) adk[i] = adv[i] = 0.0f;
    for (int h = g * group; h < (g + 1) * group; h++)
        for (int t0 = 0; t0 < s.Tq; t0 += AB_BR) {
            // skip query tiles that cannot see these keys (ranges grow with t)
            const int t_last = min(t0 + AB_BR, s.Tq) - 1;
            int lo_first, hi_last, unused;
            cepe_key_range(s.Tk, s.causal, s.window, s.q_offset + t0, &lo_first, &unused);
            cepe_key_range(s.Tk, s.causal, s.window, s.q_offset + t_last, &unused, &hi_last);
            if (hi_last <= j0 || lo_first >= j0 + nk) continue; // block-uniform
            __syncthreads(); // the previous tile's P, dS, Qs, dOs are consumed
            load_rows(w, Ls, Ds, rlo, rhi, q, dout, lse, D, s, b, h, t0);
            __syncthreads();
            tile_probs(w, Ls, Ds, rlo, rhi, kvalid, j0, hd, s.scale);
            __syncthreads();
            for (int r = 0; r < AB_BR; r++) {
                const float p = w.P[r * AB_PST + jl], ds = w.dS[r * AB_PST + jl];
#pragma unroll
                for (int i = 0; i < KN; i++) {
                    const int d = dl + AB_DSPLIT * i;
                    if (d < hd) {
                        adv[i] += p * w.dOs[r * w.kst + d];
                        adk[i] += ds * w.Qs[r * w.kst + d];
                    }
                }
            }
        }
    if (jl >= nk) return;
    const long at = b * s.kv_bstride + (long)(j0 + jl) * s.kv_rstride + (long)g * hd;
#pragma unroll
    for (int i = 0; i < KN; i++) {
        const int d = dl + AB_DSPLIT * i;
        if (d >= hd) continue;
        if (dk) dk[at + d] += s.scale * adk[i];
        if (dv) dv[at + d] += adv[i];
    }
}

// dQ of query rows t0..t0+BR-1 (blockIdx.x) of head h (blockIdx.y), batch
// row b0 + blockIdx.z, summed over the key tiles they can see. This thread
// accumulates row rl = tid / 8, dims d = tid % 8 + 8 i (i < KN).
template <int KN>
__global__ void __launch_bounds__(AB_THREADS)
    attention_dq_kernel(float *dq, const float *dout, const float *q, const float *k, const float *v,
                        const float *lse, const float *D, const uint8_t *key_valid, attention_shape s,
                        int b0) {
    extern __shared__ float smem[];
    __shared__ float Ls[AB_BR], Ds[AB_BR];
    __shared__ int rlo[AB_BR], rhi[AB_BR], kvalid[AB_BC];
    const ab_tiles w = carve(smem, s.hd);
    const int hd = s.hd, group = s.H / s.KVH;
    const int b = b0 + blockIdx.z, h = blockIdx.y, g = h / group, t0 = blockIdx.x * AB_BR;
    load_rows(w, Ls, Ds, rlo, rhi, q, dout, lse, D, s, b, h, t0);

    // the union of the rows' key ranges
    const int t_last = min(t0 + AB_BR, s.Tq) - 1;
    int klo, khi, unused;
    cepe_key_range(s.Tk, s.causal, s.window, s.q_offset + t0, &klo, &unused);
    cepe_key_range(s.Tk, s.causal, s.window, s.q_offset + t_last, &unused, &khi);

    const int rl = threadIdx.x / AB_DSPLIT, dl = threadIdx.x % AB_DSPLIT;
    float adq[KN];
#pragma unroll
    for (int i = 0; i < KN; i++) adq[i] = 0.0f;
    for (int j0 = klo; j0 < khi; j0 += AB_BC) {
        const int nk = min(AB_BC, khi - j0);
        __syncthreads(); // the rows are loaded / the previous key tile is consumed
        if (!__syncthreads_or(load_keys(w, kvalid, k, v, key_valid, s, b, g, j0, nk)))
            continue; // all padding
        tile_probs(w, Ls, Ds, rlo, rhi, kvalid, j0, hd, s.scale);
        __syncthreads();
        for (int jj = 0; jj < AB_BC; jj++) {
            const float ds = w.dS[rl * AB_PST + jj];
#pragma unroll
            for (int i = 0; i < KN; i++) {
                const int d = dl + AB_DSPLIT * i;
                if (d < hd) adq[i] += ds * w.Ks[jj * w.kst + d];
            }
        }
    }
    if (t0 + rl >= s.Tq) return;
    const long at = b * s.q_bstride + (long)(t0 + rl) * s.q_rstride + (long)h * hd;
#pragma unroll
    for (int i = 0; i < KN; i++) {
        const int d = dl + AB_DSPLIT * i;
        if (d < hd) dq[at + d] += s.scale * adq[i];
    }
}

template <int KN>
static int launch(cuda_state *st, float *dq, float *dk, float *dv, const float *dout, const float *q,
                  const float *k, const float *v, const float *lse, const float *D, const uint8_t *key_valid,
                  const attention_shape *s) {
    const size_t smem = ab_smem_bytes(s->hd);
    if (smem > (size_t)st->smem_optin)
        return cuda_fail(st, CEPE_ERR_UNSUPPORTED,
                         "attention_backward: head_dim %d needs %zu bytes of shared memory (%d here)", s->hd,
                         smem, st->smem_optin);
    int rc = 0;
    if (dk || dv) {
        rc = cuda_check(st,
                        cudaFuncSetAttribute(attention_dkdv_kernel<KN>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                        "attention_backward (shared memory)");
        for (int b0 = 0; b0 < s->B && !rc; b0 += CUDA_MAX_GRID_YZ) {
            const dim3 grid((unsigned)((s->Tk + AB_BC - 1) / AB_BC), (unsigned)s->KVH,
                            (unsigned)std::min(s->B - b0, CUDA_MAX_GRID_YZ));
            attention_dkdv_kernel<KN>
                <<<grid, AB_THREADS, smem, st->stream>>>(dk, dv, dout, q, k, v, lse, D, key_valid, *s, b0);
            rc = cuda_launched(st, "attention_backward (dk, dv)");
        }
    }
    if (dq && !rc) {
        rc = cuda_check(st,
                        cudaFuncSetAttribute(attention_dq_kernel<KN>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                        "attention_backward (shared memory)");
        for (int b0 = 0; b0 < s->B && !rc; b0 += CUDA_MAX_GRID_YZ) {
            const dim3 grid((unsigned)((s->Tq + AB_BR - 1) / AB_BR), (unsigned)s->H,
                            (unsigned)std::min(s->B - b0, CUDA_MAX_GRID_YZ));
            attention_dq_kernel<KN>
                <<<grid, AB_THREADS, smem, st->stream>>>(dq, dout, q, k, v, lse, D, key_valid, *s, b0);
            rc = cuda_launched(st, "attention_backward (dq)");
        }
    }
    return rc;
}

int cuda_attention_backward(const cepe_backend *be, float *dq, float *dk, float *dv, const float *dout,
                            const float *q, const float *k, const float *v, const float *out,
                            const float *lse, const uint8_t *key_valid, const attention_shape *s, int nt) {
    (void)nt;
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (s->B <= 0 || s->Tq <= 0 || s->Tk <= 0 || s->H <= 0 || (!dq && !dk && !dv)) return 0; // nothing to add
    int rc = cuda_attention_check(st, s, "attention_backward");
    if (rc) return rc;
    const long rows = (long)s->B * s->Tq * s->H;
    float *D = (float *)cuda_scratch(st, sizeof(float) * (size_t)rows, "attention_backward");
    float *lse_buf = nullptr;
    if (!D) return CEPE_ERR_OUT_OF_MEMORY;
    if (!lse) { // O(B Tq H), one float per query row: rebuilt by the forward kernel
        lse_buf = (float *)cuda_scratch(st, sizeof(float) * (size_t)rows, "attention_backward");
        rc = lse_buf ? cuda_attention_lse(be, nullptr, lse_buf, q, k, v, key_valid, s, nt)
                     : CEPE_ERR_OUT_OF_MEMORY;
        lse = lse_buf;
    }
    if (!rc) {
        attention_rowdot_kernel<<<cuda_blocks((size_t)rows * 32, CUDA_THREADS), CUDA_THREADS, 0,
                                  st->stream>>>(D, dout, out, rows, s->hd);
        rc = cuda_launched(st, "attention_backward (rowsum)");
    }
    if (!rc) switch ((s->hd + 31) / 32) { // KN = 4 ND: dims d = dl + 8 i cover hd <= 32 ND
        case 1:
            rc = launch<4>(st, dq, dk, dv, dout, q, k, v, lse, D, key_valid, s);
            break;
        case 2:
            rc = launch<8>(st, dq, dk, dv, dout, q, k, v, lse, D, key_valid, s);
            break;
        case 3:
            rc = launch<12>(st, dq, dk, dv, dout, q, k, v, lse, D, key_valid, s);
            break;
        case 4:
            rc = launch<16>(st, dq, dk, dv, dout, q, k, v, lse, D, key_valid, s);
            break;
        case 5:
            rc = launch<20>(st, dq, dk, dv, dout, q, k, v, lse, D, key_valid, s);
            break;
        case 6:
            rc = launch<24>(st, dq, dk, dv, dout, q, k, v, lse, D, key_valid, s);
            break;
        case 7:
            rc = launch<28>(st, dq, dk, dv, dout, q, k, v, lse, D, key_valid, s);
            break;
        default:
            rc = launch<32>(st, dq, dk, dv, dout, q, k, v, lse, D, key_valid, s);
            break;
        }
    cuda_scratch_free(st, lse_buf);
    cuda_scratch_free(st, D);
    return rc;
}
