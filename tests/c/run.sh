#!/usr/bin/env bash
# Builds the C core's own test binaries (no Python) and runs them under valgrind
# memcheck: any memory error or definite leak fails. Usage: tests/c/run.sh [BUILD_DIR]
# (valgrind's CPU has no AVX-512, so test_quant covers the C and AVX2 kernels here;
# tests/test_quant.py covers every path the host has.)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-build/c-tests}
mkdir -p "$out"
read -r inc lib < <(python -c "import scipy_openblas32 as s; print(s.get_include_dir(), s.get_lib_dir())")
for t in test_core test_quant; do
    gcc -std=c11 -O1 -g -fopenmp -Wall -Wextra -Werror -Wno-missing-field-initializers -Icsrc -I"$inc" \
        "tests/c/$t.c" $(find csrc -name '*.c' | sort) -L"$lib" -lscipy_openblas -lm -Wl,-rpath,"$lib" \
        -o "$out/$t"
    OMP_NUM_THREADS=2 valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
        --show-leak-kinds=definite "$out/$t"
done
