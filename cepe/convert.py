"""`cepe convert`: official PyTorch checkpoints (pytorch_model.bin or sharded
pytorch_model-0000k-of-0000n.bin with their index, as the released CEPE models
ship) into safetensors, which cepe reads at run time.

Reading .bin files means unpickling, so this is the one place cepe needs
torch; it loads with weights_only=True (no arbitrary code from the file)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from .errors import CheckpointError
from .files import CONFIG_LIMIT, read_json
from .progress import track

_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise RuntimeError(
            "cepe convert reads PyTorch .bin checkpoints and needs torch: pip install torch "
            "(the CPU build is enough); cepe itself never needs it at run time"
        ) from None
    try:
        from safetensors.torch import save_file  # noqa: F401
    except ImportError:
        raise RuntimeError("cepe convert needs the safetensors package: pip install safetensors") from None
    return torch


def _bin_shards(src: str) -> list[str]:
    index = os.path.join(src, "pytorch_model.bin.index.json")
    if os.path.lexists(index):
        data = read_json(index, what="shard index", limit=CONFIG_LIMIT, error=CheckpointError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
            raise CheckpointError(f"{index}: corrupt shard index ('weight_map' must map tensor names to file names)")
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if os.path.basename(s) != s or not os.path.exists(os.path.join(src, s)):
                raise CheckpointError(f"{index} names shard {s!r}, which is not in {src}")
        return shards
    if os.path.exists(os.path.join(src, "pytorch_model.bin")):
        return ["pytorch_model.bin"]
    raise CheckpointError(f"no pytorch_model.bin or pytorch_model.bin.index.json in {src}")


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None) -> str:
    """Writes model.safetensors (or model-0000k-of-0000n.safetensors plus
    model.safetensors.index.json) into dst (default: src itself), copying
    config and tokenizer files when dst is another directory. Returns dst."""
    torch = _torch()
    from safetensors.torch import save_file

    src = os.fspath(src)
    dst = src if dst is None else os.fspath(dst)
    if not os.path.isdir(src):
        raise NotADirectoryError(f"{src} is not a model directory")
    shards = _bin_shards(src)
    os.makedirs(dst, exist_ok=True)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(track(shards, desc="converting", unit="shard"), start=1):
        try:
            sd = torch.load(os.path.join(src, shard), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt pickle raises many kinds
            raise CheckpointError(f"{os.path.join(src, shard)}: cannot read ({exc})") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{os.path.join(src, shard)}: expected a state dict, got {type(sd).__name__}")
        # rotary inv_freq buffers are recomputed; clone() unties shared storage
        tensors = {
            name: t.detach().contiguous().clone()
            for name, t in sd.items()
            if isinstance(t, torch.Tensor) and not name.endswith("rotary_emb.inv_freq")
        }
        out = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(tensors, os.path.join(dst, out), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = out
            total += t.numel() * t.element_size()
    if n > 1:
        with open(os.path.join(dst, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if os.path.abspath(dst) != os.path.abspath(src):
        for name in _SIDE_FILES:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    return dst
