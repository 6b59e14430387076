"""GPU memory figures shared by the benchmark scripts (imported from the
scripts' own directory, which Python puts first on sys.path)."""

from __future__ import annotations

import os


def gpu_process_bytes() -> int | None:
    """GPU memory this process holds, from NVML (None where NVML cannot say)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if p.pid == os.getpid() and p.usedGpuMemory is not None:
                        return int(p.usedGpuMemory)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    return None
