// cuda_probe.cu — tells whether a usable CUDA device is present.
// The full backend (the op table in csrc/backend.h, on the GPU) lands with the
// CUDA issue; this file already makes the build compile and link CUDA code.
#include <cuda_runtime.h>
#include <stdio.h>

#include "cuda_probe.h"

extern "C" int cepe_cuda_probe(char *msg, int msg_len) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        snprintf(msg, (size_t)msg_len, "%s (%s)", cudaGetErrorString(err), cudaGetErrorName(err));
        return -1;
    }
    if (count == 0) {
        snprintf(msg, (size_t)msg_len, "no CUDA device found");
        return 0;
    }
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
        snprintf(msg, (size_t)msg_len, "%s (sm_%d%d, %zu MiB)", prop.name, prop.major, prop.minor,
                 prop.totalGlobalMem >> 20);
    else
        snprintf(msg, (size_t)msg_len, "%d device(s)", count);
    return count;
}

extern "C" int cepe_cuda_runtime_version(void) {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
}
