/* info.c — what this build links and how many threads it may use. */
#include <stdio.h>

#include "blas.h"
#include "cepe.h"

#ifdef _OPENMP
#include <omp.h>
#endif

const char *cepe_blas_info(void) {
#if defined(CEPE_MKL_BLAS)
    static _Thread_local char info[96];
    MKLVersion v;
    mkl_get_version(&v);
    snprintf(info, sizeof info, "oneMKL %d.%d", v.MajorVersion, v.UpdateVersion);
    return info;
#elif defined(CEPE_BLAS_CONFIG)
    return CEPE_BLAS_CONFIG();
#else
    return CEPE_BLAS_NAME;
#endif
}

int cepe_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void cepe_set_blas_threads(int n) {
#ifdef CEPE_BLAS_SET_THREADS
    if (n >= 1) CEPE_BLAS_SET_THREADS(n);
#else
    (void)n;
#endif
}
