#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds both extensions in place (the CUDA one
# with warnings as errors), then runs the CUDA parity suite against the CPU
# backend, and with --memcheck the op and model suites under compute-sanitizer.
# Usage: tests/cuda/run.sh [--memcheck]
# The environment must already hold cepe's dependencies and the test oracles
# (numpy, tqdm, tokenizers, safetensors, torch, transformers, pytest).
set -euo pipefail
cd "$(dirname "$0")/../.."
CEPE_CUDA=1 CEPE_CUDA_WERROR=1 python setup.py -q build_ext --inplace
python - <<'PY'
import cepe
info = cepe.backends()["cuda"]
print("cuda backend:", info)
if not info["available"]:
    raise SystemExit(f"no usable CUDA device: {info.get('reason')}")
PY
suite=(tests/test_cuda_ops.py tests/test_device_models.py tests/test_backends.py tests/test_bad_input.py)
python -m pytest -q -p no:cacheprovider -m cuda -rs "${suite[@]}"
if [[ "${1:-}" == "--memcheck" ]]; then
    for f in tests/test_cuda_ops.py tests/test_device_models.py; do
        compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -p no:cacheprovider -m cuda "$f"
    done
fi
