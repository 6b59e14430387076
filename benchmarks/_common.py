"""Helpers shared by the benchmark scripts: machine facts, the checkout's
state, CPU accounting for contention checks, and GPU memory per process.
The scripts import it from their own directory, which Python puts first on
sys.path (also in the child processes they start)."""

from __future__ import annotations

import os
import platform
import resource
import subprocess

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def git_state() -> dict:
    """The checkout's commit, and whether tracked files outside benchmarks/ differ from it."""

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", "-C", REPO_ROOT, *cmd], capture_output=True, text=True, check=True)
        return out.stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": bool(status.strip())}


def machine_busy_s() -> float | None:
    """CPU seconds used so far by everything this kernel runs (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


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
