"""CEPE heads: an encoder and cross-attention attached to any LLaMA-family decoder.

    model = cepe.attach_encoder(cepe.load("smollm2-135m"), encoder_layers=2, num_cross_attn_layers=10)
    model.save("my-head", head_only=True)       # config.json + head.safetensors, no decoder weights
    model = cepe.load("my-head")                 # the decoder it names, plus the head

A *head* is what CEPE adds to a frozen decoder (spec CEPE.md §1-3): the encoder
(``encoder.*``) and the cross-attention of the last k decoder layers
(``model.layers.{i}.cross_attn.*``). A head directory holds config.json (the
official CEPE keys, plus cepe's DECODER_KEY naming the decoder: a pulled model's
name, or a path, relative to the head directory or absolute) and head.safetensors
(the head's tensors only), so a 98 MB GGUF decoder and a 30 MB head load as one
model without the decoder's weights written twice.

cepe's config.json keys beside the official ones:
- ``cepe_decoder``: the decoder a head attaches to (head directories only);
- ``cepe_decoder_fingerprint``: the SHA-256 of that decoder's final-norm weight, so a head
  loaded onto another decoder of the same shape warns;
- ``encoder_shares_embeddings``: the encoder reads the decoder's token-embedding table (no
  second copy in memory, on disk or in the optimizer; the encoder's width and vocabulary must
  equal the decoder's). A shared table trains only as the decoder's own (trainable="all").

This module is the head's format and initialisation, over plain configs and arrays; a model is
built with one by cepe.attach (a new head on a decoder) and cepe.load (a head directory).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import ROPE_LAYOUT_KEY, DecoderConfig
from .errors import CheckpointError
from .pull import MODELS, model_path
from .qtensor import Weight, as_float32

HEAD_FILE = "head.safetensors"
DECODER_KEY = "cepe_decoder"
FINGERPRINT_KEY = "cepe_decoder_fingerprint"
SHARE_KEY = "encoder_shares_embeddings"
INIT_MODES = ("copy", "zero", "normal")
# The hyper-parameters a head and its decoder must share.
SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
ENCODER_SOURCES = ("copy", "random")
# Config keys of a decoder that do not describe an encoder built from its layers.
_DECODER_ONLY_KEYS = (
    "architectures",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    ROPE_LAYOUT_KEY,
    "do_cross_attention",
    "num_cross_attn_layers",
    "encoder_config",
    "encoder_hidden_size",
    SHARE_KEY,
    DECODER_KEY,
    FINGERPRINT_KEY,
)


def is_head_tensor(name: str) -> bool:
    """True for the tensors a head holds (the encoder's and the cross-attention's)."""
    return name.startswith("encoder.") or ".cross_attn." in name


def fingerprint(weights: Mapping[str, Weight]) -> str:
    return hashlib.sha256(
        np.ascontiguousarray(as_float32(weights["model.norm.weight"]), dtype="<f4").tobytes()
    ).hexdigest()


def half_layout(w: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows from Meta's interleaved RoPE order into HF's rotate-half order (transformers'
    convert_llama_weights_to_hf permute): per head, rows (x0, y0, x1, y1, ...) -> (x0, x1, ..., y0, y1, ...)."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, hd // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim))


# ------------------------------------------------------------------ initialisation


def cross_attention_init(
    cfg: DecoderConfig, decoder: Mapping[str, Weight], mode: str, seed: int = 0
) -> dict[str, np.ndarray]:
    """Cross-attention weights initialised as the reference's train.py init_mode (spec §3):
    "copy": q_proj <- self_attn.q_proj; k_proj, v_proj <- the first encoder_hidden_size input
    columns of self_attn.k_proj, v_proj (both have n_kv_heads * head_dim rows, so GQA carries
    over as is); o_proj <- self_attn.o_proj; layernorm <- post_attention_layernorm. "zero": copy,
    then o_proj = 0 (the model starts exactly as its base decoder). "normal": copy, then
    o_proj ~ kaiming_normal_ (std sqrt(2 / fan_in)), drawn from `seed`."""
    if mode not in INIT_MODES:
        raise ValueError(f"init must be one of {INIT_MODES}, got {mode!r}")
    d_enc = cfg.encoder_hidden_size
    if d_enc > cfg.hidden_size:
        raise ValueError(
            f"init={mode!r} copies the first encoder_hidden_size ({d_enc}) input columns of the "
            f"self-attention k/v weights, but hidden_size is only {cfg.hidden_size}"
        )
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in range(cfg.num_hidden_layers - cfg.num_cross_attn_layers, cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        out[f"{pre}cross_attn.q_proj.weight"] = np.array(
            as_float32(decoder[f"{pre}self_attn.q_proj.weight"]), np.float32
        )
        out[f"{pre}cross_attn.k_proj.weight"] = np.array(
            as_float32(decoder[f"{pre}self_attn.k_proj.weight"])[:, :d_enc], np.float32
        )
        out[f"{pre}cross_attn.v_proj.weight"] = np.array(
            as_float32(decoder[f"{pre}self_attn.v_proj.weight"])[:, :d_enc], np.float32
        )
        out[f"{pre}cross_attn.layernorm.weight"] = np.array(
            decoder[f"{pre}post_attention_layernorm.weight"], np.float32
        )
        o = np.array(as_float32(decoder[f"{pre}self_attn.o_proj.weight"]), np.float32)
        if mode == "zero":
            o[...] = 0.0
        elif mode == "normal":  # torch.nn.init.kaiming_normal_: a=0, fan_in, leaky_relu gain sqrt(2)
            o[...] = rng.standard_normal(o.shape) * math.sqrt(2.0 / o.shape[1])
        out[f"{pre}cross_attn.o_proj.weight"] = o
    return out


def encoder_from_layers(
    source: Mapping[str, Weight], source_cfg: DecoderConfig, n_layers: int, prefix: str = "model."
) -> dict[str, Weight]:
    """encoder.* tensors from the first n_layers blocks of a decoder (in HF's RoPE layout)."""
    interleaved = source_cfg.rope is not None and source_cfg.rope.layout == "interleaved"
    out: dict[str, Weight] = {"encoder.norm.weight": np.array(as_float32(source[f"{prefix}norm.weight"]), np.float32)}
    for j in range(n_layers):
        for name, w in source.items():
            head = f"{prefix}layers.{j}."
            if not name.startswith(head) or ".cross_attn." in name:
                continue
            w = np.array(as_float32(w), np.float32)
            if interleaved and name.endswith("self_attn.q_proj.weight"):
                w = half_layout(w, source_cfg.num_attention_heads)
            elif interleaved and name.endswith("self_attn.k_proj.weight"):
                w = half_layout(w, source_cfg.num_key_value_heads)
            out[f"encoder.layers.{j}.{name[len(head) :]}"] = w
    return out


def encoder_config_of(decoder_raw: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The config dict of an encoder shaped like the decoder's layers (decoder-only keys dropped), plus overrides."""
    raw = {k: copy.deepcopy(v) for k, v in decoder_raw.items() if k not in _DECODER_ONLY_KEYS}
    raw.update(overrides, is_encoder=True, do_cross_attention=False)
    return raw


def random_encoder(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, Weight]:
    """A random encoder as transformers initialises a LlamaModel: normal(0, 0.02) matrices, unit
    norms; shapes: the weights of the encoder's config as a decoder's (build.param_shapes)."""
    rng = np.random.default_rng(seed)
    out: dict[str, Weight] = {}
    for name, shape in shapes.items():  # the encoder's blocks are a decoder's, under encoder.
        if name == "lm_head.weight":
            continue
        w = np.ones(shape, np.float32) if len(shape) == 1 else (rng.standard_normal(shape) * 0.02).astype(np.float32)
        out["encoder." + name.removeprefix("model.")] = w
    return out


def check_shares(cfg: DecoderConfig) -> None:
    """A config with encoder_shares_embeddings must describe an encoder as wide as the decoder, over its vocabulary."""
    enc = cfg.encoder
    if enc is None or (enc.vocab_size, enc.hidden_size) != (cfg.vocab_size, cfg.hidden_size):
        got = "no encoder" if enc is None else f"an encoder of vocab {enc.vocab_size}, width {enc.hidden_size}"
        raise CheckpointError(
            f"{SHARE_KEY}: the encoder shares the decoder's embedding table (vocab {cfg.vocab_size}, "
            f"width {cfg.hidden_size}), but the config describes {got}"
        )


def with_decoder_settings(cfg: DecoderConfig, decoder_cfg: DecoderConfig) -> DecoderConfig:
    """cfg with the decoder's RoPE settings (a load-time rope_scaling override, the GGUF layout)
    and generation defaults (eos from generation_config.json)."""
    return dataclasses.replace(
        cfg, rope=decoder_cfg.rope, rope_theta=decoder_cfg.rope_theta, eos_token_id=decoder_cfg.eos_token_id
    )


# ------------------------------------------------------------------ naming the decoder


def reference_of(decoder_path: str) -> str:
    """How a head names its decoder: a pulled model's name, else the decoder's absolute path."""
    for name in MODELS:
        if os.path.abspath(model_path(name)) == os.path.abspath(decoder_path):
            return name
    return os.path.abspath(decoder_path)


def decoder_reference(raw: dict[str, Any], head_dir: str) -> str:
    """What cepe.load reads for a head's decoder: a pulled name as is, a path relative to the head."""
    ref = raw.get(DECODER_KEY)
    if not isinstance(ref, str) or not ref:
        raise CheckpointError(f"{head_dir}/config.json: {DECODER_KEY!r} must name the decoder (a path or a model name)")
    if ref in MODELS or os.path.isabs(ref):
        return ref
    return os.path.normpath(os.path.join(head_dir, ref))
