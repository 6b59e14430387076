/* check.h — the C tests' one assertion: CHECK(cond) counts a pass, or prints
 * where it failed (with the core's last error message) and exits non-zero.
 * Each test binary includes it once and prints `passed` at the end. */
#ifndef CEPE_TESTS_CHECK_H
#define CEPE_TESTS_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#include "cepe.h"

static int passed = 0;
#define CHECK(cond)                                                                                          \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            fprintf(stderr, "%s:%d: CHECK failed: %s (%s)\n", __FILE__, __LINE__, #cond, cepe_last_error()); \
            exit(1);                                                                                         \
        }                                                                                                    \
        passed++;                                                                                            \
    } while (0)

#endif
