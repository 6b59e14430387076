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
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

import cepe_c

from .checks import check_seed
from .config import ROPE_LAYOUT_KEY, DecoderConfig, parse_config
from .errors import CheckpointError

HEAD_FILE = "head.safetensors"
DECODER_KEY = "cepe_decoder"
FINGERPRINT_KEY = "cepe_decoder_fingerprint"
SHARE_KEY = "encoder_shares_embeddings"
INIT_MODES = ("copy", "zero", "normal")
_SHAPE_KEYS = (
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


def fingerprint(weights: dict[str, np.ndarray]) -> str:
    return hashlib.sha256(np.ascontiguousarray(weights["model.norm.weight"], dtype="<f4").tobytes()).hexdigest()


def half_layout(w: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows from Meta's interleaved RoPE order into HF's rotate-half order (transformers'
    convert_llama_weights_to_hf permute): per head, rows (x0, y0, x1, y1, ...) -> (x0, x1, ..., y0, y1, ...)."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, hd // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim))


# ------------------------------------------------------------------ initialisation


def cross_attention_init(
    cfg: DecoderConfig, decoder: dict[str, np.ndarray], mode: str, seed: int = 0
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
        out[f"{pre}cross_attn.q_proj.weight"] = np.array(decoder[f"{pre}self_attn.q_proj.weight"], np.float32)
        out[f"{pre}cross_attn.k_proj.weight"] = np.array(
            decoder[f"{pre}self_attn.k_proj.weight"][:, :d_enc], np.float32
        )
        out[f"{pre}cross_attn.v_proj.weight"] = np.array(
            decoder[f"{pre}self_attn.v_proj.weight"][:, :d_enc], np.float32
        )
        out[f"{pre}cross_attn.layernorm.weight"] = np.array(
            decoder[f"{pre}post_attention_layernorm.weight"], np.float32
        )
        o = np.array(decoder[f"{pre}self_attn.o_proj.weight"], np.float32)
        if mode == "zero":
            o[...] = 0.0
        elif mode == "normal":  # torch.nn.init.kaiming_normal_: a=0, fan_in, leaky_relu gain sqrt(2)
            o[...] = rng.standard_normal(o.shape) * math.sqrt(2.0 / o.shape[1])
        out[f"{pre}cross_attn.o_proj.weight"] = o
    return out


def _encoder_from_layers(
    source: dict[str, np.ndarray], source_cfg: DecoderConfig, n_layers: int, prefix: str = "model."
) -> dict[str, np.ndarray]:
    """encoder.* tensors from the first n_layers blocks of a decoder (in HF's RoPE layout)."""
    interleaved = source_cfg.rope is not None and source_cfg.rope.layout == "interleaved"
    out = {"encoder.norm.weight": np.array(source[f"{prefix}norm.weight"], np.float32)}
    for j in range(n_layers):
        for name, w in source.items():
            head = f"{prefix}layers.{j}."
            if not name.startswith(head) or ".cross_attn." in name:
                continue
            w = np.array(w, np.float32)
            if interleaved and name.endswith("self_attn.q_proj.weight"):
                w = half_layout(w, source_cfg.num_attention_heads)
            elif interleaved and name.endswith("self_attn.k_proj.weight"):
                w = half_layout(w, source_cfg.num_key_value_heads)
            out[f"encoder.layers.{j}.{name[len(head) :]}"] = w
    return out


def _encoder_config(decoder_raw: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    raw = {k: copy.deepcopy(v) for k, v in decoder_raw.items() if k not in _DECODER_ONLY_KEYS}
    raw.update(overrides, is_encoder=True, do_cross_attention=False)
    return raw


def _random_encoder(enc_cfg: DecoderConfig, seed: int) -> dict[str, np.ndarray]:
    """A random encoder as transformers initialises a LlamaModel: normal(0, 0.02) matrices, unit norms."""
    rng = np.random.default_rng(seed)
    d, ff = enc_cfg.hidden_size, enc_cfg.intermediate_size
    qd, kvd = enc_cfg.num_attention_heads * enc_cfg.head_dim, enc_cfg.num_key_value_heads * enc_cfg.head_dim

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    out = {"encoder.embed_tokens.weight": normal(enc_cfg.vocab_size, d), "encoder.norm.weight": np.ones(d, np.float32)}
    for j in range(enc_cfg.num_hidden_layers):
        p = f"encoder.layers.{j}."
        out.update(
            {
                p + "input_layernorm.weight": np.ones(d, np.float32),
                p + "post_attention_layernorm.weight": np.ones(d, np.float32),
                p + "self_attn.q_proj.weight": normal(qd, d),
                p + "self_attn.k_proj.weight": normal(kvd, d),
                p + "self_attn.v_proj.weight": normal(kvd, d),
                p + "self_attn.o_proj.weight": normal(d, qd),
                p + "mlp.gate_proj.weight": normal(ff, d),
                p + "mlp.up_proj.weight": normal(ff, d),
                p + "mlp.down_proj.weight": normal(d, ff),
            }
        )
    return out


# ------------------------------------------------------------------ assembling


def _check_shares(cfg: DecoderConfig) -> None:
    enc = cfg.encoder
    if enc is None or (enc.vocab_size, enc.hidden_size) != (cfg.vocab_size, cfg.hidden_size):
        got = "no encoder" if enc is None else f"an encoder of vocab {enc.vocab_size}, width {enc.hidden_size}"
        raise CheckpointError(
            f"{SHARE_KEY}: the encoder shares the decoder's embedding table (vocab {cfg.vocab_size}, "
            f"width {cfg.hidden_size}), but the config describes {got}"
        )


def assemble(
    cfg: DecoderConfig,
    weights: Iterable[tuple[str, np.ndarray]],
    *,
    n_threads: int,
    device: str,
    dtype: str,
    path: str,
    tokenizer: Any = None,
    where: str = "",
    progress: int | None = None,
) -> Any:
    """A Model of `cfg` over (name, array) pairs, bound zero-copy where the core allows. A config
    with encoder_shares_embeddings binds the decoder's table as the encoder's too. progress: the
    number of tensors, to show a loading bar."""
    from tqdm.auto import tqdm

    from .load import make_backend
    from .model import Model

    shares = bool(cfg.raw.get(SHARE_KEY))
    if shares:
        _check_shares(cfg)
    core = cepe_c.Model(
        cfg.core_kwargs(),
        cfg.encoder.core_kwargs() if cfg.encoder is not None else None,
        n_threads=n_threads,
        backend=make_backend(device),
        bf16=dtype == "bfloat16",
    )
    bar = tqdm(total=progress, desc="loading", unit="tensor", disable=None if progress else True, leave=False)
    with bar:
        for name, w in weights:
            try:
                core.bind(name, w)
                if shares and name == "model.embed_tokens.weight":
                    core.bind("encoder.embed_tokens.weight", w)
            except ValueError as exc:  # wrong shape or unexpected name, from the core
                raise CheckpointError(f"{where or path}: {exc}") from None
            bar.update(1)
    try:
        core.finalize()
    except KeyError as exc:
        raise CheckpointError(f"{where or path}: {exc.args[0]}") from None
    model = Model(core, cfg, n_threads=n_threads, path=path, device=device)
    model.dtype = dtype
    model.tokenizer = tokenizer
    return model


def _like(model: Any) -> dict[str, Any]:
    return {"n_threads": model.n_threads, "device": model.device, "dtype": model.dtype}


def attach_encoder(
    decoder: Any,
    *,
    encoder: Any = "copy",
    encoder_layers: int = 2,
    encoder_config: dict[str, Any] | None = None,
    num_cross_attn_layers: int | None = None,
    share_embeddings: bool | None = None,
    init: str = "zero",
    seed: int = 0,
) -> Any:
    """A CEPE model: `decoder` (a cepe.Model, or anything cepe.load takes) plus an encoder and
    cross-attention in its last `num_cross_attn_layers` layers (default: the upper third).

    encoder: "copy" (default): the decoder's own first `encoder_layers` blocks, run
    bidirectionally (their weights copied, so training starts from a language-aware encoder);
    "random": a fresh encoder shaped by `encoder_config` (HF keys; default: the decoder's shape
    with `encoder_layers` layers); or another checkpoint (a path, name or cepe.Model): a CEPE
    model's encoder, or a plain decoder's first `encoder_layers` blocks. Its vocabulary must be
    the decoder's.
    share_embeddings: the encoder reads the decoder's token-embedding table instead of a copy
    (default: True for the copied encoder, False for a random one or another checkpoint's).
    init: the cross-attention's initialisation (cross_attention_init): "zero" (o_proj = 0: the
    model starts as its decoder), "copy" or "normal".
    The decoder's weights are shared with `decoder`, not copied.
    """
    from .load import load
    from .model import Model

    seed = check_seed(seed)
    dec = decoder if isinstance(decoder, Model) else load(decoder)
    if dec.config.is_cepe or dec.config.encoder is not None:
        raise ValueError("decoder already has a CEPE encoder and cross-attention")
    if isinstance(encoder_layers, bool) or not isinstance(encoder_layers, int) or encoder_layers < 1:
        raise ValueError(f"encoder_layers must be an int >= 1, got {encoder_layers!r}")
    L = dec.config.num_hidden_layers
    k = max(1, L // 3) if num_cross_attn_layers is None else num_cross_attn_layers
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= L:
        raise ValueError(f"num_cross_attn_layers must be an int in [1, {L}], got {num_cross_attn_layers!r}")
    dec_w = cepe_c.train_weights(dec._core)
    raw = dec.config.raw
    if not raw:
        raise ValueError("the decoder has no config dict to extend")

    if isinstance(encoder, str) and encoder == "copy":
        if encoder_layers > L:
            raise ValueError(f"encoder_layers={encoder_layers} but the decoder has only {L} layers to copy")
        enc_raw = _encoder_config(raw, num_hidden_layers=encoder_layers)
        enc_w = _encoder_from_layers(dec_w, dec.config, encoder_layers)
        enc_w["encoder.embed_tokens.weight"] = dec_w["model.embed_tokens.weight"]
    elif isinstance(encoder, str) and encoder == "random":
        enc_raw = _encoder_config(raw, num_hidden_layers=encoder_layers, **(encoder_config or {}))
        enc_w = _random_encoder(parse_config(enc_raw), seed)
    else:
        src = encoder if isinstance(encoder, Model) else load(encoder)
        src_w = cepe_c.train_weights(src._core)
        if src.config.encoder is not None:
            enc_raw = {k2: v for k2, v in src.config.raw["encoder_config"].items()}
            enc_w = {n: w for n, w in src_w.items() if n.startswith("encoder.")}
            if src.config.raw.get(SHARE_KEY):
                enc_w["encoder.embed_tokens.weight"] = src_w["model.embed_tokens.weight"]
        else:
            n_src = src.config.num_hidden_layers
            if encoder_layers > n_src:
                raise ValueError(f"encoder_layers={encoder_layers} but {src.path} has only {n_src} layers")
            enc_raw = _encoder_config(src.config.raw, num_hidden_layers=encoder_layers)
            enc_w = _encoder_from_layers(src_w, src.config, encoder_layers)
            enc_w["encoder.embed_tokens.weight"] = src_w["model.embed_tokens.weight"]
    enc_cfg = parse_config(enc_raw)
    if enc_cfg.vocab_size != dec.config.vocab_size:
        raise ValueError(
            f"the encoder's vocabulary ({enc_cfg.vocab_size}) differs from the decoder's ({dec.config.vocab_size}): "
            "they read the same token ids"
        )
    same_table = enc_w.get("encoder.embed_tokens.weight") is dec_w["model.embed_tokens.weight"]
    share = (same_table or encoder == "copy") if share_embeddings is None else bool(share_embeddings)
    if share:
        enc_w.pop("encoder.embed_tokens.weight", None)
    elif enc_w.get("encoder.embed_tokens.weight") is dec_w["model.embed_tokens.weight"]:
        enc_w["encoder.embed_tokens.weight"] = np.array(dec_w["model.embed_tokens.weight"])  # its own copy

    cepe_raw = {
        **copy.deepcopy(raw),
        "architectures": ["LlamaForCausalContextLM"],
        "do_cross_attention": True,
        "num_cross_attn_layers": k,
        "num_cross_attn_hidden_states": 1,
        "encoder_hidden_size": enc_cfg.hidden_size,
        "encoder_config": enc_raw,
        "encode_mode": "context_only",
        DECODER_KEY: _reference_of(dec),
        FINGERPRINT_KEY: fingerprint(dec_w),
    }
    if share:
        cepe_raw[SHARE_KEY] = True
    cfg = _with_decoder_settings(parse_config(cepe_raw), dec.config)
    cross = cross_attention_init(cfg, dec_w, init, seed)
    weights = {**dec_w, **enc_w, **cross}
    return assemble(cfg, weights.items(), **_like(dec), path=dec.path, tokenizer=dec.tokenizer)


def _reference_of(model: Any) -> str:
    """How a head names its decoder: a pulled model's name, else the decoder's absolute path."""
    from .pull import MODELS, model_path

    for name in MODELS:
        if os.path.abspath(model_path(name)) == os.path.abspath(model.path):
            return name
    return os.path.abspath(model.path)


def _with_decoder_settings(cfg: DecoderConfig, decoder_cfg: DecoderConfig) -> DecoderConfig:
    """cfg with the decoder's RoPE settings (a load-time rope_scaling override, the GGUF layout)
    and generation defaults (eos from generation_config.json)."""
    import dataclasses

    return dataclasses.replace(
        cfg, rope=decoder_cfg.rope, rope_theta=decoder_cfg.rope_theta, eos_token_id=decoder_cfg.eos_token_id
    )


# ------------------------------------------------------------------ head directories


def decoder_reference(raw: dict[str, Any], head_dir: str) -> str:
    """What cepe.load reads for a head's decoder: a pulled name as is, a path relative to the head."""
    from .pull import MODELS

    ref = raw.get(DECODER_KEY)
    if not isinstance(ref, str) or not ref:
        raise CheckpointError(f"{head_dir}/config.json: {DECODER_KEY!r} must name the decoder (a path or a model name)")
    if ref in MODELS or os.path.isabs(ref):
        return ref
    return os.path.normpath(os.path.join(head_dir, ref))


def load_head(
    head_dir: str,
    raw: dict[str, Any],
    *,
    device: str,
    n_threads: int,
    rope_scaling: dict[str, Any] | None,
    check_weights: bool,
    dtype: str,
) -> Any:
    """cepe.load for a head directory: its decoder (loaded as cepe.load would) plus head.safetensors."""
    from .load import check_weight, load
    from .safetensors_io import SafetensorsFile

    head_path = os.path.join(head_dir, HEAD_FILE)
    if not os.path.lexists(head_path):  # anything else there: SafetensorsFile says what is wrong with it
        raise CheckpointError(f"{head_dir}: config.json names a decoder ({DECODER_KEY}) but there is no {HEAD_FILE}")
    ref = decoder_reference(raw, head_dir)
    raw = {**raw, DECODER_KEY: ref}  # resolved: a copy saved elsewhere still finds the decoder
    if os.path.abspath(ref) == os.path.abspath(head_dir):
        raise CheckpointError(f"{head_dir}/config.json: {DECODER_KEY!r} names the head directory itself")
    try:
        dec = load(
            ref, device=device, n_threads=n_threads, rope_scaling=rope_scaling, check_weights=check_weights, dtype=dtype
        )
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{head_dir}: the head's decoder is missing: {exc}") from None
    if dec.config.is_cepe:
        raise CheckpointError(f"{head_dir}: the head's decoder {ref} is itself a CEPE model")
    cfg = _with_decoder_settings(parse_config(raw, rope_scaling), dec.config)
    mismatch = [
        f"{key} {getattr(cfg, key)} (head) vs {getattr(dec.config, key)} (decoder)"
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
        if getattr(cfg, key) != getattr(dec.config, key)
    ]
    if mismatch:
        raise CheckpointError(f"{head_dir}: the head does not match its decoder {ref}: " + "; ".join(mismatch))
    dec_w = cepe_c.train_weights(dec._core)
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
        weights[name] = check_weight(name, head.get(name), head_path) if check_weights else head.get(name)
    return assemble(cfg, weights.items(), **_like(dec), path=head_dir, tokenizer=dec.tokenizer, where=head_path)
