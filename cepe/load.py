"""cepe.load: a model directory on disk → a ready cepe.Model."""

from __future__ import annotations

import os
from typing import Any

import cepe_c

from .config import read_config
from .errors import CheckpointError
from .model import Model
from .safetensors_io import Checkpoint

SIM_DEVICE = "cpu-device-sim"
MAX_THREADS = 1024  # as the core's CEPE_MAX_THREADS
# Buffers some checkpoints carry that the math recomputes.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# Weights that may hold only zeros in a sound file: a fresh CEPE head's cross-attention output
# projection (attach_encoder's init="zero" starts the model as its decoder).
_MAY_BE_ZERO = (".cross_attn.o_proj.weight",)


def check_weight(name: str, array: Any, where: str) -> Any:
    """array, after checking it holds no NaN/Inf, and is not entirely zero (load(check_weights=True)).

    No trained model has a weight matrix, norm or embedding of only zeros, but a damaged file
    does (a block of it overwritten with zeros: a zeroed final norm makes every logit 0). Both
    checks are one pass over the tensor each."""
    import numpy as np

    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise CheckpointError(f"{where}: tensor {name} holds {bad} NaN/Inf values")
    if np.size(array) and not name.endswith(_MAY_BE_ZERO) and not np.any(array):
        raise CheckpointError(
            f"{where}: tensor {name} is entirely zero ({np.size(array)} values), which no trained model's weight is: "
            "the file is damaged"
        )
    return array


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_threads(n_threads: object) -> int:
    if n_threads is None:
        return default_threads()
    if isinstance(n_threads, bool) or not isinstance(n_threads, int):
        raise TypeError(f"n_threads must be an int or None, got {type(n_threads).__name__}")
    if not 1 <= n_threads <= MAX_THREADS:
        raise ValueError(f"n_threads must be in [1, {MAX_THREADS}], got {n_threads}")
    return n_threads


def check_device(device: object) -> str:
    """'cpu', 'cuda' or 'cuda:N' (checked against this build and machine), or
    'cpu-device-sim': the CPU ops behind a simulated device boundary, for
    testing the host/device plumbing on machines without a GPU."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a str ('cpu' or 'cuda'), got {type(device).__name__}")
    if device in ("cpu", SIM_DEVICE):
        return device
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    from .backends import backends

    info = backends()["cuda"]
    if not info["built"]:
        raise RuntimeError(f"device={device!r}: the CUDA extension is not built ({info['reason']})")
    if not info["available"]:
        raise RuntimeError(f"device={device!r}: no usable CUDA device ({info['reason']})")
    index = int(device[5:]) if ":" in device else 0
    if index >= info["devices"]:
        raise ValueError(f"device={device!r}: this machine has {info['devices']} CUDA device(s)")
    return device


DTYPES = ("float32", "bfloat16")


def check_dtype(dtype: object, device: str) -> str:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if dtype == "bfloat16" and device == "cpu":
        raise NotImplementedError("dtype='bfloat16' keeps the weights in bf16 on a GPU: use device='cuda'")
    return dtype


def make_backend(device: str) -> Any:
    """The op table a model on `device` runs on: None for the CPU, else a
    fresh backend capsule (one stream and one cuBLAS handle per model)."""
    if device == "cpu":
        return None
    if device == SIM_DEVICE:
        return cepe_c._sim_backend()
    import cepe_cuda

    return cepe_cuda.backend(int(device[5:]) if ":" in device else 0)


def load(
    path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    n_threads: int | None = None,
    rope_scaling: dict[str, Any] | None = None,
    check_weights: bool = False,
    dtype: str = "float32",
) -> Model:
    """Loads an HF LLaMA-family checkpoint directory (config.json + safetensors),
    a LLaMA GGUF file (path ending in .gguf or starting with b"GGUF"; quantized
    weights are dequantized to float32), or a model fetched with `cepe pull`
    by its name (e.g. "smollm2-135m"), or a CEPE head directory (config.json
    naming its decoder + head.safetensors; see cepe.head). The model's
    tokenizer, if the checkpoint has one, is model.tokenizer (else None).

    The model owns its weights (read into memory, fp16/bf16 widened to float32
    once, quantized GGUF tensors dequantized): rewriting, truncating or removing
    its files later does not change it. rope_scaling overrides the checkpoint's RoPE settings
    without editing config.json, e.g. {"rope_type": "linear", "factor": 4} for
    an E2-LLM model run at 4x its training length (see
    cepe.rope.e2llm_scale_for_length). check_weights scans every tensor for
    NaN/Inf and for weights that are entirely zero (a damaged file), naming the
    tensor (one more pass over the weights: off by default). n_threads (default:
    the CPUs this process may use) sizes the OpenMP team of this model; the BLAS
    runs single-threaded inside it.

    device: "cpu", "cuda" / "cuda:N" (the weights are copied to the GPU), or
    "cpu-device-sim" (tests). dtype="bfloat16" (GPU only, inference only)
    keeps the linear weights in bf16 there, half the memory; products still
    accumulate in fp32.
    """
    device = check_device(device)
    dtype = check_dtype(dtype, device)
    n = check_threads(n_threads)
    model_dir = os.fspath(path)
    # --- GGUF files and pulled model names (issue 8) ---
    from .gguf_io import is_gguf, load_gguf
    from .pull import resolve

    model_dir = resolve(model_dir)
    if is_gguf(model_dir) and not os.path.isdir(model_dir):
        if not os.path.exists(model_dir):
            raise FileNotFoundError(f"no such GGUF file: {model_dir}")
        return load_gguf(
            model_dir, device=device, n_threads=n, rope_scaling=rope_scaling, check_weights=check_weights, dtype=dtype
        )
    # --- end GGUF ---
    if not os.path.exists(model_dir):
        raise FileNotFoundError(f"no such model directory: {model_dir}")
    if not os.path.isdir(model_dir):
        raise NotADirectoryError(f"{model_dir} is not a directory (expected an HF model directory)")
    cfg = read_config(model_dir, rope_scaling)
    from .head import DECODER_KEY, SHARE_KEY, assemble, load_head

    if cfg.raw.get(DECODER_KEY):  # a CEPE head: the decoder it names, plus head.safetensors
        return load_head(
            model_dir,
            cfg.raw,
            device=device,
            n_threads=n,
            rope_scaling=rope_scaling,
            check_weights=check_weights,
            dtype=dtype,
        )
    ckpt = Checkpoint(model_dir)
    names = [nm for nm in ckpt.names() if not nm.endswith(_IGNORED_SUFFIXES)]
    if cfg.tie_word_embeddings:  # some tied checkpoints still store the copy
        names = [nm for nm in names if nm != "lm_head.weight"]
    if cfg.raw.get(SHARE_KEY):  # bound from the decoder's table
        names = [nm for nm in names if nm != "encoder.embed_tokens.weight"]
    arrays = ((nm, check_weight(nm, ckpt.get(nm), model_dir) if check_weights else ckpt.get(nm)) for nm in names)
    model = assemble(
        cfg, arrays, n_threads=n, device=device, dtype=dtype, path=model_dir, where=model_dir, progress=len(names)
    )
    # --- tokenizer (issue 8) ---
    from .tokenizer import Tokenizer

    model.tokenizer = Tokenizer.from_dir(model_dir)
    # --- end tokenizer ---
    return model
