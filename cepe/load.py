"""cepe.load: a model on disk (HF directory, GGUF file, CEPE head directory, pulled name) → a cepe.Model.

Each kind is read by its reader (cepe.safetensors_io, cepe.gguf_io, cepe.config, cepe.tokenizer)
and assembled by the one builder, cepe.build.
"""

from __future__ import annotations

import functools
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .backends import backends
from .build import SIM_DEVICE, build, check_weight
from .config import DecoderConfig, parse_config, read_config
from .errors import CheckpointError
from .gguf_io import GGUFFile, is_gguf, read_header, weight_names
from .gguf_io import read_config as read_gguf_config
from .head import (
    DECODER_KEY,
    FINGERPRINT_KEY,
    HEAD_FILE,
    SHAPE_KEYS,
    SHARE_KEY,
    decoder_reference,
    fingerprint,
    is_head_tensor,
    with_decoder_settings,
)
from .model import Model
from .pickling import remember_load
from .qtensor import core_weights
from .resolve import resolve
from .safetensors_io import Checkpoint, SafetensorsFile
from .tokenizer import Tokenizer, check_gguf_model

MAX_THREADS = 1024  # as the core's CEPE_MAX_THREADS
# Buffers some checkpoints carry that the math recomputes.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


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
    info = backends()["cuda"]
    if not info["built"]:
        raise RuntimeError(f"device={device!r}: the CUDA extension is not built ({info['reason']})")
    if not info["available"]:
        raise RuntimeError(f"device={device!r}: no usable CUDA device ({info['reason']})")
    index = int(device[5:]) if ":" in device else 0
    if index >= info["devices"]:
        raise ValueError(f"device={device!r}: this machine has {info['devices']} CUDA device(s)")
    return device


DTYPES = (None, "float32", "bfloat16", "q8_0")
# What a device multiplies: float32, or bf16 where its backend has bf16 GEMMs (the CUDA one).
DEVICE_DTYPES = (None, "float32", "bfloat16")


def check_dtype(dtype: object, device: str) -> str | None:
    if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPES):
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if device != "cpu" and dtype not in DEVICE_DTYPES:
        raise NotImplementedError(
            f"dtype={dtype!r} runs on the CPU only: on device={device!r} the weights are multiplied as "
            "float32 or bfloat16 (dtype=None or 'float32' widens them at upload, 'bfloat16' rounds them)"
        )
    return dtype


@remember_load
def load(
    path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    n_threads: int | None = None,
    rope_scaling: dict[str, Any] | None = None,
    check_weights: bool = False,
    dtype: str | None = None,
) -> Model:
    """Loads an HF LLaMA-family checkpoint directory (config.json + safetensors),
    a LLaMA GGUF file (path ending in .gguf or starting with b"GGUF"), or a model fetched with `cepe pull`
    by its name (e.g. "smollm2-135m"), or a CEPE head directory (config.json
    naming its decoder + head.safetensors; see cepe.head). The model's
    tokenizer, if the checkpoint has one, is model.tokenizer (else None; a GGUF
    file's is built from its metadata when first read).

    The model owns its weights (read into memory): rewriting, truncating or removing
    its files later does not change it. rope_scaling overrides the checkpoint's RoPE settings
    without editing config.json, e.g. {"rope_type": "linear", "factor": 4} for
    an E2-LLM model run at 4x its training length (see
    cepe.rope.e2llm_scale_for_length). check_weights scans every tensor for
    NaN/Inf and for weights that are entirely zero (a damaged file), naming the
    tensor (one more pass over the weights: off by default). n_threads (default:
    the CPUs this process may use) sizes the OpenMP team of this model; the BLAS
    runs single-threaded inside it.

    device: "cpu", "cuda" / "cuda:N" (the weights are copied to the GPU), or
    "cpu-device-sim" (tests).

    dtype: the format the weight matrices are held and multiplied in. None (default) keeps
    each as the file stores it: on the CPU, GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K and F16/BF16
    matrices (GGUF or safetensors) are multiplied natively (csrc/quant/), norms are float32; on
    a device they are widened to float32 at upload. "float32" widens every weight at load;
    "bfloat16" and "q8_0" convert the matrices at load (round to nearest even; llama.cpp's
    Q8_0). On a GPU, "bfloat16" keeps the linear weights in bf16 there (inference only); "q8_0"
    is CPU-only. Training (cepe.Trainer) keeps its trainable tensors in float32 and runs the
    frozen ones in their format, on the CPU.
    """
    device = check_device(device)
    opts = _Options(device, check_dtype(dtype, device), check_threads(n_threads), rope_scaling, check_weights)
    model_dir = resolve(os.fspath(path))
    if is_gguf(model_dir) and not os.path.isdir(model_dir):
        if not os.path.exists(model_dir):
            raise FileNotFoundError(f"no such GGUF file: {model_dir}")
        return _load_gguf(model_dir, opts)
    if not os.path.exists(model_dir):
        raise FileNotFoundError(f"no such model directory: {model_dir}")
    if not os.path.isdir(model_dir):
        raise NotADirectoryError(f"{model_dir} is not a directory (expected an HF model directory)")
    cfg = read_config(model_dir, rope_scaling)
    if cfg.raw.get(DECODER_KEY):  # a CEPE head: the decoder it names, plus head.safetensors
        return _load_head(model_dir, cfg.raw, opts)
    return _load_hf(model_dir, cfg, opts)


@dataclass(frozen=True)
class _Options:
    """load()'s arguments, checked."""

    device: str
    dtype: str | None
    n_threads: int
    rope_scaling: dict[str, Any] | None
    check_weights: bool


def _load_hf(model_dir: str, cfg: DecoderConfig, opts: _Options) -> Model:
    """An HF model directory: model.safetensors or its shards, and its tokenizer files."""
    ckpt = Checkpoint(model_dir)
    names = [nm for nm in ckpt.names() if not nm.endswith(_IGNORED_SUFFIXES)]
    if cfg.tie_word_embeddings:  # some tied checkpoints still store the copy
        names = [nm for nm in names if nm != "lm_head.weight"]
    if cfg.raw.get(SHARE_KEY):  # bound from the decoder's table
        names = [nm for nm in names if nm != "encoder.embed_tokens.weight"]
    check = opts.check_weights
    read = ckpt.get if opts.dtype == "float32" else ckpt.stored
    tensors = ((nm, check_weight(nm, read(nm), model_dir) if check else read(nm)) for nm in names)
    model = build(
        cfg, tensors, n_threads=opts.n_threads, device=opts.device, dtype=opts.dtype, path=model_dir, count=len(names)
    )
    model.tokenizer = Tokenizer.from_dir(model_dir)
    return model


def _load_gguf(path: str, opts: _Options) -> Model:
    """A GGUF file: its weights (as stored, or widened for dtype="float32"), and the tokenizer its
    metadata describes."""
    gf = GGUFFile(path)
    cfg = read_gguf_config(gf, opts.rope_scaling)
    names = weight_names(gf, cfg)  # file name -> HF name
    # NumPy releases the GIL in the dequantizing loops: a few tensors at a time.
    with ThreadPoolExecutor(max_workers=max(1, min(opts.n_threads, 4))) as pool:
        arrays = pool.map(gf.get if opts.dtype == "float32" else gf.stored, list(names))
        tensors = (
            (target, check_weight(name, array, path) if opts.check_weights else array)
            for (name, target), array in zip(names.items(), arrays, strict=True)
        )
        model = build(
            cfg,
            tensors,
            n_threads=opts.n_threads,
            device=opts.device,
            dtype=opts.dtype,
            path=path,
            file_names={target: name for name, target in names.items()},
            count=len(names),
        )
    if "tokenizer.ggml.model" in gf.metadata:
        try:
            check_gguf_model(gf.metadata)
        except NotImplementedError as exc:  # the weights are fine: run without text in/out
            warnings.warn(f"{path}: no tokenizer: {exc}", stacklevel=3)
        else:  # built when first used, from a copy of the metadata (the file may change meanwhile),
            # compressed: 1.8 MB of a 49k-token vocabulary take 0.6 MB, for ~10 ms at each end
            model._defer_tokenizer(functools.partial(_gguf_tokenizer, zlib.compress(gf.header(), 1), path))
    gf.close()  # the model holds copies: nothing of the file stays mapped
    return model


def _gguf_tokenizer(packed: bytes, path: str) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_header(zlib.decompress(packed), path), path)


def _load_head(head_dir: str, raw: dict[str, Any], opts: _Options) -> Model:
    """A head directory: its decoder (loaded as cepe.load would) plus head.safetensors."""
    head_path = os.path.join(head_dir, HEAD_FILE)
    if not os.path.lexists(head_path):  # anything else there: SafetensorsFile says what is wrong with it
        raise CheckpointError(f"{head_dir}: config.json names a decoder ({DECODER_KEY}) but there is no {HEAD_FILE}")
    ref = decoder_reference(raw, head_dir)
    raw = {**raw, DECODER_KEY: ref}  # resolved: a copy saved elsewhere still finds the decoder
    if os.path.abspath(ref) == os.path.abspath(head_dir):
        raise CheckpointError(f"{head_dir}/config.json: {DECODER_KEY!r} names the head directory itself")
    try:
        dec = load(ref, **vars(opts))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{head_dir}: the head's decoder is missing: {exc}") from None
    if dec.config.is_cepe:
        raise CheckpointError(f"{head_dir}: the head's decoder {ref} is itself a CEPE model")
    cfg = with_decoder_settings(parse_config(raw, opts.rope_scaling), dec.config)
    mismatch = [
        f"{key} {getattr(cfg, key)} (head) vs {getattr(dec.config, key)} (decoder)"
        for key in SHAPE_KEYS
        if getattr(cfg, key) != getattr(dec.config, key)
    ]
    if mismatch:
        raise CheckpointError(f"{head_dir}: the head does not match its decoder {ref}: " + "; ".join(mismatch))
    dec_w = core_weights(dec._core)
    if raw.get(FINGERPRINT_KEY) not in (None, fingerprint(dec_w)):
        warnings.warn(
            f"{head_dir}: the head was made for another decoder of this shape than {ref} "
            f"({FINGERPRINT_KEY} differs); its outputs may be poor",
            stacklevel=3,
        )
    head = SafetensorsFile(head_path)
    weights = dict(dec_w)
    for name in head.keys():
        if not is_head_tensor(name):
            raise CheckpointError(f"{head_path}: tensor {name} is not part of a head (encoder.* or *.cross_attn.*)")
        w = head.get(name) if opts.dtype == "float32" else head.stored(name)
        weights[name] = check_weight(name, w, head_path) if opts.check_weights else w
    return build(
        cfg,
        weights.items(),
        n_threads=dec.n_threads,
        device=dec.device,
        dtype=dec.dtype,
        path=head_dir,
        tokenizer=dec.tokenizer,
        where=head_path,
    )
