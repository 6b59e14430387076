/* common.h — internal helpers shared by the C core: error reporting and
 * checked allocation, OpenMP thread numbers. Not part of the public API. */
#ifndef CEPE_COMMON_H
#define CEPE_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include "cepe.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Records a printf-style message for cepe_last_error() and returns `status`,
 * so call sites read `return cepe_fail(CEPE_ERR_INVALID_ARG, "...", ...)`. */
cepe_status cepe_fail(cepe_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Zero-filled; NULL on overflow or failure. */
void *cepe_calloc(size_t count, size_t size);
void cepe_free(void *p);

/* count * size without overflow, or SIZE_MAX. */
static inline size_t cepe_mul_size(size_t count, size_t size) {
    if (size != 0 && count > SIZE_MAX / size) return SIZE_MAX;
    return count * size;
}

/* Inside an OpenMP parallel region: this thread's number and the team's size
 * (thread 0 of 1 where the core is built without OpenMP). */
static inline void cepe_team(int *t, int *n) {
#ifdef _OPENMP
    *t = omp_get_thread_num();
    *n = omp_get_num_threads();
#else
    *t = 0;
    *n = 1;
#endif
}

/* [*lo, *hi) of n items for thread t of nt: equal shares rounded up to a
 * multiple of align (1: no rounding), the last ones short or empty. */
static inline void cepe_share(int n, int align, int t, int nt, int *lo, int *hi) {
    const int per = ((n + nt - 1) / nt + align - 1) / align * align;
    *lo = t * per < n ? t * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

#endif /* CEPE_COMMON_H */
