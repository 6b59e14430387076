"""attach_encoder: a CEPE model made from a decoder and a new head (an encoder and cross-attention).

    model = cepe.attach_encoder(cepe.load("smollm2-135m"), encoder_layers=2, num_cross_attn_layers=10)

The head's format and initialisation are cepe.head's; the model is assembled by cepe.build.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np

from .build import build, param_shapes
from .checks import check_seed
from .config import parse_config
from .head import (
    DECODER_KEY,
    FINGERPRINT_KEY,
    SHARE_KEY,
    cross_attention_init,
    encoder_config_of,
    encoder_from_layers,
    fingerprint,
    random_encoder,
    reference_of,
    with_decoder_settings,
)
from .load import load
from .model import Model
from .qtensor import Weight, core_weights


def _like(model: Model) -> dict[str, Any]:
    return {"n_threads": model.n_threads, "device": model.device, "dtype": model.dtype}


def attach_encoder(
    decoder: Model | str | os.PathLike[str],
    *,
    encoder: Model | str | os.PathLike[str] = "copy",
    encoder_layers: int = 2,
    encoder_config: dict[str, Any] | None = None,
    num_cross_attn_layers: int | None = None,
    share_embeddings: bool | None = None,
    init: str = "zero",
    seed: int = 0,
) -> Model:
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
    dec_w = core_weights(dec._core)
    raw = dec.config.raw
    if not raw:
        raise ValueError("the decoder has no config dict to extend")

    enc_w: dict[str, Weight]
    if isinstance(encoder, str) and encoder == "copy":
        if encoder_layers > L:
            raise ValueError(f"encoder_layers={encoder_layers} but the decoder has only {L} layers to copy")
        enc_raw = encoder_config_of(raw, num_hidden_layers=encoder_layers)
        enc_w = encoder_from_layers(dec_w, dec.config, encoder_layers)
        enc_w["encoder.embed_tokens.weight"] = dec_w["model.embed_tokens.weight"]
    elif isinstance(encoder, str) and encoder == "random":
        enc_raw = encoder_config_of(raw, num_hidden_layers=encoder_layers, **(encoder_config or {}))
        enc_w = random_encoder(param_shapes(parse_config(enc_raw)), seed)
    else:
        src = encoder if isinstance(encoder, Model) else load(encoder)
        src_w = core_weights(src._core)
        if src.config.encoder is not None:
            enc_raw = {k2: v for k2, v in src.config.raw["encoder_config"].items()}
            enc_w = {n: w for n, w in src_w.items() if n.startswith("encoder.")}
            if src.config.raw.get(SHARE_KEY):
                enc_w["encoder.embed_tokens.weight"] = src_w["model.embed_tokens.weight"]
        else:
            n_src = src.config.num_hidden_layers
            if encoder_layers > n_src:
                raise ValueError(f"encoder_layers={encoder_layers} but {src.path} has only {n_src} layers")
            enc_raw = encoder_config_of(src.config.raw, num_hidden_layers=encoder_layers)
            enc_w = encoder_from_layers(src_w, src.config, encoder_layers)
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
        DECODER_KEY: reference_of(dec.path),
        FINGERPRINT_KEY: fingerprint(dec_w),
    }
    if share:
        cepe_raw[SHARE_KEY] = True
    cfg = with_decoder_settings(parse_config(cepe_raw), dec.config)
    cross = cross_attention_init(cfg, dec_w, init, seed)
    weights = {**dec_w, **enc_w, **cross}
    return build(cfg, weights.items(), **_like(dec), path=dec.path, tokenizer=dec.tokenizer)
