/* cuda_probe.h — C view of the CUDA probe (kernels/cuda_probe.cu). */
#ifndef CEPE_CUDA_PROBE_H
#define CEPE_CUDA_PROBE_H
#ifdef __cplusplus
extern "C" {
#endif
/* Number of devices (>= 0), or -1 when the runtime/driver cannot be used;
 * msg receives a description either way. */
int cepe_cuda_probe(char *msg, int msg_len);
int cepe_cuda_runtime_version(void);
#ifdef __cplusplus
}
#endif
#endif
