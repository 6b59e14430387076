"""cepe.build: the one place a model is assembled from a config and its tensors.

    model = build(cfg, tensors, n_threads=2, device="cpu", path=where_it_came_from)

Every way to a Model ends here: cepe.load for HF directories (one file or shards), GGUF files
and CEPE head directories; attach_encoder for a decoder plus a new head; the Trainer for the
core that binds its master weights. The readers (cepe.safetensors_io, cepe.gguf_io) only read:
they give a config and (name, array) pairs under the HF names the core binds, and the loaders
pass those here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

import cepe_c

from .config import DecoderConfig
from .errors import CheckpointError
from .head import SHARE_KEY, check_shares
from .model import Model
from .progress import bar
from .qtensor import DTYPE_FORMATS, QTensor, Weight, as_float32, convert

SIM_DEVICE = "cpu-device-sim"
# Weights that may hold only zeros in a sound file: a fresh CEPE head's cross-attention output
# projection (attach_encoder's init="zero" starts the model as its decoder).
_MAY_BE_ZERO = (".cross_attn.o_proj.weight",)


def check_weight(name: str, weight: Weight, where: str) -> Weight:
    """array, after checking it holds no NaN/Inf, and is not entirely zero (load(check_weights=True)).

    No trained model has a weight matrix, norm or embedding of only zeros, but a damaged file
    does (a block of it overwritten with zeros: a zeroed final norm makes every logit 0). Both
    checks are one pass over the tensor each (a stored format: over its widened values)."""
    array = as_float32(weight)
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise CheckpointError(f"{where}: tensor {name} holds {bad} NaN/Inf values")
    if np.size(array) and not name.endswith(_MAY_BE_ZERO) and not np.any(array):
        raise CheckpointError(
            f"{where}: tensor {name} is entirely zero ({np.size(array)} values), which no trained model's weight is: "
            "the file is damaged"
        )
    return weight


def bind(core: Any, name: str, w: Weight) -> None:
    if isinstance(w, QTensor):
        core.bind(name, w.rows, w.qtype, w.n_in)
    else:
        core.bind(name, w)


def make_backend(device: str) -> Any:
    """The op table a model on `device` runs on: None for the CPU, else a
    fresh backend capsule (one stream and one cuBLAS handle per model)."""
    if device == "cpu":
        return None
    if device == SIM_DEVICE:
        return cepe_c._sim_backend()
    import cepe_cuda  # built only where nvcc was found

    return cepe_cuda.backend(int(device[5:]) if ":" in device else 0)


def param_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every parameter of cfg's model (its encoder's and cross-attention's
    too), in binding order: the C core's parameter table, the one place the names are declared,
    read from an unbound model (no weight memory)."""
    enc = cfg.encoder.core_kwargs() if cfg.encoder is not None else None
    return dict(cepe_c.weight_shapes(cepe_c.Model(cfg.core_kwargs(), enc, n_threads=1)))


def build_core(
    cfg: DecoderConfig,
    tensors: Iterable[tuple[str, Weight]],
    *,
    n_threads: int,
    device: str,
    bf16: bool = False,
    fmt: str | None = None,
    where: str = "",
    file_names: Mapping[str, str] | None = None,
    count: int | None = None,
) -> Any:
    """The finalized cepe_c.Model of `cfg` over (HF name, array) pairs, bound zero-copy where the
    core allows. A config with encoder_shares_embeddings binds the decoder's table as the
    encoder's too. where: the file errors name; file_names: a tensor's name in that file where it
    differs from the HF name (GGUF), for errors; count: the number of tensors, to show a loading
    bar. fmt: the format matrices are converted to (cepe.qtensor.convert), None: as they come.
    A tensor the core refuses (shape, name) or one it lacks raises CheckpointError."""
    shares = bool(cfg.raw.get(SHARE_KEY))
    if shares:
        check_shares(cfg)
    core = cepe_c.Model(
        cfg.core_kwargs(),
        cfg.encoder.core_kwargs() if cfg.encoder is not None else None,
        n_threads=n_threads,
        backend=make_backend(device),
        bf16=bf16,
    )
    with bar(total=count, desc="loading", unit="tensor", disable=None if count else True, leave=False) as shown:
        for name, w in tensors:
            try:
                if fmt is not None:
                    w = convert(w, fmt)
                bind(core, name, w)
                if shares and name == "model.embed_tokens.weight":
                    bind(core, "encoder.embed_tokens.weight", w)
            except ValueError as exc:  # wrong shape or unexpected name, from the core
                label = f"{file_names[name]}: " if file_names and name in file_names else ""
                raise CheckpointError(f"{where}: {label}{exc}") from None
            shown.update(1)
    try:
        core.finalize()
    except KeyError as exc:
        raise CheckpointError(f"{where}: {exc.args[0]}") from None
    return core


def build(
    cfg: DecoderConfig,
    tensors: Iterable[tuple[str, Weight]],
    *,
    n_threads: int,
    device: str,
    path: str,
    dtype: str | None = None,
    tokenizer: Any = None,
    where: str = "",
    file_names: Mapping[str, str] | None = None,
    count: int | None = None,
) -> Model:
    """A Model of `cfg` over (HF name, array) pairs (build_core), with its tokenizer (or None).
    path: where the model came from (Model.path); where: the file errors name (default: path).
    device, n_threads and dtype are taken as checked (cepe.load checks them). dtype: None keeps
    each matrix in the format it comes in on the CPU (a device widens them to float32 at upload);
    "float32", "bfloat16" or "q8_0" converts them (on a device, "bfloat16" rounds them there)."""
    on_device = device != "cpu"
    core = build_core(
        cfg,
        tensors,
        n_threads=n_threads,
        device=device,
        bf16=on_device and dtype == "bfloat16",
        fmt=None if dtype is None or on_device else DTYPE_FORMATS[dtype],
        where=where or path,
        file_names=file_names,
        count=count,
    )
    model = Model(core, cfg, n_threads=n_threads, path=path, device=device)
    model.dtype = dtype
    model.tokenizer = tokenizer
    return model
