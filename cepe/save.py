"""Writing a cepe.Model to a directory that cepe.load reads back to the same logits.

Two forms:
- a full checkpoint: config.json + model.safetensors, the tokenizer (tokenizer.json or
  tokenizer.model, tokenizer_config.json with the special tokens and the chat template) and
  generation_config.json. GGUF-loaded models keep their interleaved q/k rows and say so in
  config.json (``rope_layout``), so the reloaded model computes exactly what the loaded one did.
- a head (cepe.head): config.json naming the decoder + head.safetensors with the encoder and
  cross-attention only; the tokenizer and generation defaults come from the decoder.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any

from .errors import ConfigError
from .files import CONFIG_LIMIT, read_json
from .head import DECODER_KEY, HEAD_FILE, SHARE_KEY, is_head_tensor
from .qtensor import Weight, core_weights
from .safetensors_io import WRITE_DTYPES, write_safetensors

MODEL_FILE = "model.safetensors"
# What a saved model directory may hold: Model.save replaces a directory only when it holds nothing else.
MODEL_FILES = (
    "config.json",
    MODEL_FILE,
    HEAD_FILE,
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def _generation_config(model: Any) -> dict[str, Any]:
    """The model's generation_config.json: the file it came with, else its config's token ids."""
    src = os.path.join(model.path, "generation_config.json") if os.path.isdir(model.path) else ""
    if src and os.path.lexists(src):
        gen = read_json(src, what="generation_config.json", limit=CONFIG_LIMIT, error=ConfigError)
        if isinstance(gen, dict):
            return gen
    c = model.config
    gen = {"eos_token_id": list(c.eos_token_id) if len(c.eos_token_id) != 1 else c.eos_token_id[0]}
    if c.bos_token_id is not None:
        gen["bos_token_id"] = c.bos_token_id
    if c.pad_token_id is not None:
        gen["pad_token_id"] = c.pad_token_id
    return gen


def write_model(
    model: Any, directory: str, *, head_only: bool, dtype: str = "float32", weights: dict[str, Weight] | None = None
) -> list[str]:
    """Writes the model's files into `directory` (which exists); returns the file names written.
    weights: the tensors to write (default: every weight the model's core binds)."""
    if dtype not in WRITE_DTYPES:
        raise ValueError(f"dtype must be one of {WRITE_DTYPES}, got {dtype!r}")
    raw = copy.deepcopy(model.config.raw)
    if not raw:
        raise ValueError("this model has no config to save")
    weights = core_weights(model._core) if weights is None else weights
    if raw.get(SHARE_KEY):  # the decoder's table, bound twice, is written once
        weights = {n: w for n, w in weights.items() if n != "encoder.embed_tokens.weight"}
    written = ["config.json"]
    if head_only:
        if not raw.get(DECODER_KEY):
            raise ValueError("head_only=True needs a CEPE model made by attach_encoder or loaded from a head")
        write_safetensors(
            os.path.join(directory, HEAD_FILE), {n: w for n, w in weights.items() if is_head_tensor(n)}, dtype
        )
        written.append(HEAD_FILE)
    else:
        raw.pop(DECODER_KEY, None)  # a full checkpoint stands alone
        write_safetensors(os.path.join(directory, MODEL_FILE), weights, dtype)
        written.append(MODEL_FILE)
        if model.tokenizer is not None:
            written += [os.path.basename(p) for p in model.tokenizer.save(directory)]
        write_json(os.path.join(directory, "generation_config.json"), _generation_config(model))
        written.append("generation_config.json")
    write_json(os.path.join(directory, "config.json"), raw)
    for name in written:
        fsync_path(os.path.join(directory, name))
    return written


def is_model_dir(path: str) -> bool:
    """True for a directory that holds a saved model's files and nothing else."""
    names = os.listdir(path)
    return "config.json" in names and all(n in MODEL_FILES for n in names)


def save_model(
    model: Any,
    path: str | os.PathLike[str],
    *,
    head_only: bool | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> str:
    """Model.save: writes a sibling temporary directory, then renames it to `path`. An existing
    `path` is replaced only with overwrite=True and only when it is a saved model directory
    (its files and nothing else); anything else is refused, so no unrelated file is lost."""
    path = os.path.abspath(os.fspath(path))
    if head_only is None:
        head_only = bool(model.config.raw.get(DECODER_KEY))
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise FileExistsError(f"{path} exists and is not a directory: choose another path")
        if os.listdir(path) and not (overwrite and is_model_dir(path)):
            why = "pass overwrite=True to replace it" if is_model_dir(path) else "it holds other files"
            raise FileExistsError(f"{path} is not empty ({why})")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    import tempfile

    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        write_model(model, tmp, head_only=head_only, dtype=dtype)
        fsync_path(tmp)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_path(parent)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
