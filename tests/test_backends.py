"""What the build reports, and the CUDA path on a machine without a GPU."""

from __future__ import annotations

import pytest

import cepe


def test_backends_report_cpu():
    info = cepe.backends()
    assert info["cpu"]["available"] is True
    assert any(name in info["cpu"]["blas"] for name in ("oneMKL", "OpenBLAS", "CBLAS")), info["cpu"]["blas"]
    assert info["cpu"]["max_threads"] >= 1


def test_cuda_reports_why_it_is_unavailable():
    cuda = cepe.backends()["cuda"]
    assert set(cuda) >= {"built", "available", "devices"}
    if not cuda["available"]:
        assert cuda["reason"], "an unavailable CUDA backend must say why"


def test_cuda_device_raises_clearly_without_gpu(tiny):
    cuda = cepe.backends()["cuda"]
    if cuda["available"]:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="device='cuda': (the CUDA extension is not built|no usable CUDA device)"):
        cepe.load(tiny[0], device="cuda")


def test_cuda_extension_is_built_when_nvcc_exists():
    import os
    import shutil

    if shutil.which("nvcc") is None or os.environ.get("CEPE_CUDA") == "0":
        pytest.skip("no nvcc on this machine, or CUDA disabled")
    assert cepe.backends()["cuda"]["built"], cepe.backends()["cuda"].get("reason")
