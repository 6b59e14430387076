"""Helpers shared by the benchmark scripts: machine facts, the checkout's
state, CPU accounting for contention checks, memory figures, GPU memory per
process, the random CEPE checkpoint bench_context and bench_train use, and
matplotlib for their plots. The scripts import it from their own directory,
which Python puts first on sys.path (also in the child processes they start);
importing it puts the checkout first too, so that they run its cepe / cepe_c."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np


def pyplot(log: Callable[[str], None] = print) -> Any:
    """matplotlib.pyplot drawing to files (the Agg backend), or None, logged, when matplotlib
    is not installed (the plot is then skipped; the JSON result does not need it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install matplotlib): no plot written")
        return None
    return plt


def save_figure(fig: Any, path: str, title: str, fontsize: int = 9) -> str:
    """fig under its suptitle, laid out, written to path (PNG, 120 dpi) and closed; returns path."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_result(result: dict, out_dir: str, png_name: str, write_plot: Callable[[dict, str], str | None]) -> int:
    """The end of a benchmark run: its plot into out_dir (result["plot"]: the path, or None
    without matplotlib), then the result as JSON on stdout; the exit status 0."""
    os.makedirs(out_dir, exist_ok=True)
    result["plot"] = write_plot(result, os.path.join(out_dir, png_name))
    print(json.dumps(result, indent=2))
    return 0


def emit_json(result: dict, out: str | None) -> None:
    """The result as JSON on stdout, and into the file out where one is given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run from a checkout (cepe built in place with `python setup.py build_ext --inplace`): the scripts,
# importing this first, then import the repository's cepe / cepe_c rather than needing an install.
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
KB = 1024


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


def proc_status() -> dict:
    """This process's memory figures from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(val.split()[0]) * KB
    return out


def llama_shape(
    *, vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, eps: float, theta: float,
    max_pos: int, tied: bool,
) -> dict[str, Any]:  # fmt: skip
    """A LLaMA config's shape keys, in transformers' names."""
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=eps, rope_theta=theta,
        max_position_embeddings=max_pos, tie_word_embeddings=tied,
    )  # fmt: skip


# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M: tied embeddings, a 2048-token window), for
# random-weight models of the default model's size.
SMOLLM2_135M = llama_shape(
    vocab=49152, hidden=576, ffn=1536, layers=30, heads=9, kv_heads=3, eps=1e-5, theta=100000, max_pos=2048, tied=True
)
# The CEPE encoder the benchmarks pair with SmolLM2-135M (6 x 512).
CEPE_ENCODER = llama_shape(
    vocab=49152, hidden=512, ffn=1408, layers=6, heads=8, kv_heads=8, eps=1e-6, theta=10000.0, max_pos=512, tied=False
)


def plain_log_y(ax: Any) -> None:
    """A log-scale y axis labelled in plain numbers (0.5, 2, 30), minor ticks too."""
    import matplotlib.ticker

    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=6)


def official_config(dec: dict, enc: dict) -> dict:
    """config.json in the official CEPE layout (LlamaForCausalContextLM), cross-attention everywhere."""
    return {
        **dec,
        "model_type": "llama",
        "architectures": ["LlamaForCausalContextLM"],
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "do_cross_attention": True,
        "num_cross_attn_layers": dec["num_hidden_layers"],
        "num_cross_attn_hidden_states": 1,
        "encoder_config": {**enc, "model_type": "llama", "hidden_act": "silu", "is_encoder": True},
        "encoder_hidden_size": enc["hidden_size"],
        "encoder_is_model": False,
        "encode_mode": "context_only",
    }


def cepe_tensors(dec: dict, enc: dict) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor of the CEPE model official_config(dec, enc) describes, as
    the C core's parameter table declares them."""
    from cepe.build import param_shapes
    from cepe.config import parse_config

    return param_shapes(parse_config(official_config(dec, enc)))


def ensure_cepe_model(model_dir: str, dec: dict, enc: dict, seed: int, log: Callable[[str], None]) -> int:
    """Writes a random CEPE checkpoint (official layout, fp32 safetensors, N(0, 0.02^2) weights, norms
    1) to model_dir, or reuses the one there; returns the number of parameters."""
    want = official_config(dec, enc)
    shapes = cepe_tensors(dec, enc)
    n_params = sum(math.prod(s) for s in shapes.values())
    cfg_path = os.path.join(model_dir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            saved = json.load(f)
        if saved != want:
            diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
            sys.exit(f"--model-dir {model_dir} holds a different model (keys differ: {diff}); use another directory")
        log(f"reusing the model in {model_dir}")
        return n_params
    from safetensors.numpy import save_file

    os.makedirs(model_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, dtype=np.float32)
        else:
            tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    save_file(tensors, os.path.join(model_dir, "model.safetensors"))
    with open(cfg_path, "w") as f:
        json.dump(want, f, indent=1)
    log(f"wrote a random CEPE model ({n_params / 1e6:.1f}M parameters) to {model_dir}")
    return n_params


def add_model_and_out_args(p: Any) -> None:
    """The --model-dir and --out options every model benchmark takes."""
    p.add_argument("--model-dir", default=None, help="where to write or reuse the model (default: temp dir)")
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
        help="directory for the plot (default: benchmarks/out/)",
    )


def settle_counts(p: Any, args: Any, defaults: tuple[tuple[str, int, int], ...]) -> None:
    """Fills each count option left unset with its (name, full, quick) default, by --quick, and
    checks every count and --threads is >= 1 (p.error otherwise)."""
    for name, full, quick in defaults:
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
