"""cepe.backends(): what this build has and what this machine can use."""

from __future__ import annotations

from typing import Any

import cepe_c


def _cuda() -> dict[str, Any]:
    try:
        import cepe_cuda
    except ImportError as exc:
        if "libcublas" in str(exc):  # built, but its cuBLAS is not installed beside it
            return {
                "built": True,
                "available": False,
                "devices": 0,
                "reason": f"cuBLAS is missing ({exc}): pip install nvidia-cublas (the cepe[cuda] extra)",
            }
        return {
            "built": False,
            "available": False,
            "devices": 0,
            "reason": f"the cepe_cuda extension was not built ({exc}); rebuild with nvcc on PATH",
        }
    count, desc = cepe_cuda.probe()
    info: dict[str, Any] = {
        "built": True,
        "runtime_version": cepe_cuda.runtime_version(),
        "devices": max(count, 0),
        "available": count > 0,
    }
    info["reason" if count <= 0 else "device"] = desc
    return info


def backends() -> dict[str, dict[str, Any]]:
    """{'cpu': {...}, 'cuda': {'built', 'available', 'reason' | 'device', ...}}."""
    return {
        "cpu": {
            "built": True,
            "available": True,
            "blas": cepe_c.blas_info().strip(),
            "max_threads": cepe_c.max_threads(),
        },
        "cuda": _cuda(),
    }
