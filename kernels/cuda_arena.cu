// cuda_arena.cu — the CUDA backend's caching allocator. cudaMalloc and
// cudaFree are slow and cudaFree synchronizes the whole device, so freed
// blocks are kept by size and handed out again: an op's per-call scratch and
// a context's buffers cost a map lookup after the first time.
//
// Reuse is safe in stream order: every use of a block is queued on the
// backend's one stream, so work queued after a free (the next owner's
// memset, copies, kernels) runs after the work queued before it. Cached
// blocks go back to the driver only when cudaMalloc runs out of memory, and
// at destroy.
#include <new>

#include "cuda_common.cuh"

// Block sizes are rounded up to size classes so that blocks are reusable
// across slightly different requests: 512 bytes at least, then steps of an
// eighth of the request's power of two (at most 12.5% waste).
static size_t size_class(size_t bytes) {
    if (bytes <= 512) return 512;
    size_t pow2 = 1;
    while (pow2 <= bytes / 2) pow2 <<= 1; // the largest power of two <= bytes
    const size_t step = pow2 / 8 > 512 ? pow2 / 8 : 512;
    return (bytes + step - 1) / step * step;
}

// cudaFree of every cached block (the caller holds mem_lock).
static void release_cached(cuda_state *st) {
    for (auto &entry : st->cached) cudaFree(entry.second);
    st->cached.clear();
    st->cached_bytes = 0;
}

void *cuda_arena_alloc(cuda_state *st, size_t bytes, cudaError_t *err) {
    *err = cudaSuccess;
    if (bytes > ((size_t)1 << 48)) { // more than any device holds; also keeps size_class from overflowing
        *err = cudaErrorMemoryAllocation;
        return nullptr;
    }
    const size_t size = size_class(bytes);
    std::lock_guard<std::mutex> guard(st->mem_lock);
    try {
        void *p = nullptr;
        auto it = st->cached.find(size);
        if (it != st->cached.end()) {
            p = it->second;
            st->cached.erase(it);
            st->cached_bytes -= size;
        } else {
            cudaError_t e = cudaMalloc(&p, size);
            if (e == cudaErrorMemoryAllocation && st->cached_bytes > 0) {
                cudaGetLastError(); // not sticky: clear it and retry with the cache given back
                release_cached(st);
                e = cudaMalloc(&p, size);
            }
            if (e != cudaSuccess) {
                cudaGetLastError(); // reported through *err: not left for the next launch check to find
                *err = e;
                return nullptr;
            }
        }
        st->live[p] = size;
        return p;
    } catch (const std::bad_alloc &) { // the host maps
        *err = cudaErrorMemoryAllocation;
        return nullptr;
    }
}

int cuda_arena_free(cuda_state *st, void *p) {
    std::lock_guard<std::mutex> guard(st->mem_lock);
    auto it = st->live.find(p);
    if (it == st->live.end()) return -1;
    const size_t size = it->second;
    st->live.erase(it);
    try {
        st->cached.emplace(size, p);
        st->cached_bytes += size;
    } catch (const std::bad_alloc &) {
        cudaFree(p); // no room to remember it: give it back instead
    }
    return 0;
}

void cuda_arena_destroy(cuda_state *st) {
    std::lock_guard<std::mutex> guard(st->mem_lock);
    release_cached(st);
    for (auto &entry : st->live) cudaFree(entry.first);
    st->live.clear();
}

void *cuda_scratch(cuda_state *st, size_t bytes, const char *what) {
    cudaError_t err;
    void *p = cuda_arena_alloc(st, bytes ? bytes : 1, &err);
    if (!p)
        cuda_fail(st, err == cudaErrorMemoryAllocation ? CEPE_ERR_OUT_OF_MEMORY : CEPE_ERR_BACKEND,
                  "%s: cannot allocate %zu bytes of device scratch (%s)", what, bytes,
                  cudaGetErrorString(err));
    return p;
}
