"""Parsing an HF LLaMA-family config.json into the decoder's hyper-parameters.

Every problem raises ConfigError (or NotImplementedError for valid settings this
version does not run) naming the key, so a user can fix the file.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import ConfigError
from .files import CONFIG_LIMIT, read_json
from .rope import LAYOUTS, RopeSettings, parse_rope

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# cepe's own config.json key: "interleaved" for weights in Meta's RoPE pair order (x[2j], x[2j+1]),
# as GGUF files store them; absent or "half" for HF's rotate-half order. transformers ignores it.
ROPE_LAYOUT_KEY = "rope_layout"
MAX_LAYERS = 4096  # no real model is near this; a corrupt file claiming millions must not allocate for them


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    sliding_window: int = 0
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # CEPE (LlamaForCausalContextLM): cross-attention in the last
    # num_cross_attn_layers layers, reading encoder states of encoder_hidden_size.
    num_cross_attn_layers: int = 0
    encoder_hidden_size: int = 0
    encoder: DecoderConfig | None = None
    rope: RopeSettings | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_cepe(self) -> bool:
        return self.num_cross_attn_layers > 0

    def core_kwargs(self) -> dict[str, Any]:
        """Arguments for cepe_c.Model."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "sliding_window": self.sliding_window,
            "num_cross_attn_layers": self.num_cross_attn_layers,
            "encoder_hidden_size": self.encoder_hidden_size,
            "rope": None if self.rope is None else self.rope.to_core(),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("raw")
        if self.encoder is not None:
            d["encoder"] = self.encoder.to_dict()
        if self.rope is not None:
            d["rope"] = self.rope.to_core()
        return d


def _int(cfg: dict[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    if key not in cfg or cfg[key] is None:
        if default is None:
            raise ConfigError(f"config.json: missing required key {key!r}")
        return default
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"config.json: {key!r} must be an integer, got {v!r}")
    if v < minimum:
        raise ConfigError(f"config.json: {key!r} must be >= {minimum}, got {v}")
    if v > 2**31 - 1:
        raise ConfigError(f"config.json: {key!r} is too large: {v}")
    return v


def _float(cfg: dict[str, Any], key: str, default: float) -> float:
    v = cfg.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"config.json: {key!r} must be a number, got {v!r}")
    v = float(v) if isinstance(v, float) or abs(v) < 2**1000 else float("inf")  # an int past float's range
    if not (v > 0.0 and v < float("inf")):
        raise ConfigError(f"config.json: {key!r} must be a finite number > 0, got {v}")
    return v


def _token_ids(v: Any, key: str) -> tuple[int, ...]:
    if v is None or v == -1:  # -1: "unset" in older LLaMA configs
        return ()
    items = v if isinstance(v, list) else [v]
    for t in items:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ConfigError(f"config.json: {key!r} must be a token id or a list of them, got {v!r}")
    return tuple(items)


def _parse_cepe(cfg: dict[str, Any], hidden: int) -> dict[str, Any]:
    """CEPE's keys on top of LlamaConfig (spec §1.2); {} for a plain decoder."""
    do_cross = cfg.get("do_cross_attention", False)
    if not isinstance(do_cross, bool):
        raise ConfigError(f"config.json: 'do_cross_attention' must be true or false, got {do_cross!r}")
    if not do_cross:
        return {}
    n_layers = _int(cfg, "num_hidden_layers")
    n_cross = _int(cfg, "num_cross_attn_layers", 0, minimum=0)
    if n_cross > n_layers:
        raise ConfigError(f"config.json: num_cross_attn_layers ({n_cross}) exceeds num_hidden_layers ({n_layers})")
    n_states = _int(cfg, "num_cross_attn_hidden_states", 1)
    if n_states != 1:
        raise NotImplementedError(
            f"config.json: num_cross_attn_hidden_states={n_states} is not supported (only 1: every cross-attention "
            "layer reads the encoder's final hidden state)"
        )
    if cfg.get("encoder_is_model"):
        raise NotImplementedError("config.json: encoder_is_model=true (decoder as its own encoder) is not supported")
    mode = cfg.get("encode_mode", "context_only")
    if mode != "context_only":
        raise NotImplementedError(f"config.json: encode_mode {mode!r} is not supported (only 'context_only')")
    enc_raw = cfg.get("encoder_config")
    if not isinstance(enc_raw, dict):
        raise ConfigError("config.json: do_cross_attention is true but 'encoder_config' is missing or not an object")
    try:
        encoder = parse_config({**enc_raw, "do_cross_attention": False})
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("config.json: ", "config.json: encoder_config.", 1)) from None
    d_enc = _int(cfg, "encoder_hidden_size", hidden)
    if n_cross and d_enc != encoder.hidden_size:
        raise ConfigError(
            f"config.json: encoder_hidden_size ({d_enc}) differs from encoder_config.hidden_size "
            f"({encoder.hidden_size})"
        )
    return {"num_cross_attn_layers": n_cross, "encoder_hidden_size": d_enc, "encoder": encoder}


def _saved_scaling(override: dict[str, Any], rope: RopeSettings) -> dict[str, Any]:
    """A rope_scaling override as config.json records it, with what it inherited from the
    checkpoint spelled out, so the saved config parses to the same settings without the override."""
    block = {**override, "rope_theta": rope.rope_theta, "partial_rotary_factor": rope.partial_rotary_factor}
    if rope.rope_type in ("yarn", "llama3", "longrope"):
        block["original_max_position_embeddings"] = rope.original_max_position_embeddings
    return block


def parse_config(cfg: Any, rope_scaling: dict[str, Any] | None = None) -> DecoderConfig:
    """Validates an HF config dict (LLaMA, Mistral or CEPE) and returns the model's parameters.

    rope_scaling, when given, replaces the checkpoint's RoPE scaling (E2-LLM's
    inference rule, or any transformers rope_scaling dict)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise NotImplementedError(f"config.json: {key}=true is not supported (LLaMA has no biases)")

    hidden = _int(cfg, "hidden_size")
    if _int(cfg, "num_hidden_layers") > MAX_LAYERS:  # before anything is sized by it
        raise ConfigError(f"config.json: 'num_hidden_layers' {cfg['num_hidden_layers']} is larger than {MAX_LAYERS}")
    heads = _int(cfg, "num_attention_heads")
    kv_heads = _int(cfg, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ConfigError(
            f"config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    if cfg.get("head_dim") is not None:
        head_dim = _int(cfg, "head_dim")
    elif hidden % heads:
        raise ConfigError(
            f"config.json: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) "
            "and no 'head_dim' is given"
        )
    else:
        head_dim = hidden // heads
    if head_dim % 2:
        raise ConfigError(f"config.json: head_dim must be even for RoPE, got {head_dim}")
    if head_dim > 256:
        raise NotImplementedError(f"config.json: head_dim {head_dim} is larger than the supported 256")
    layout = cfg.get(ROPE_LAYOUT_KEY, "half")
    if layout not in LAYOUTS:
        raise ConfigError(f"config.json: {ROPE_LAYOUT_KEY!r} must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    rope = parse_rope(cfg, rope_scaling, layout=layout)
    if rope_scaling is not None:  # the override is the model's RoPE now: a saved copy keeps it
        cfg = {**cfg, "rope_scaling": _saved_scaling(rope_scaling, rope)}

    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigError(f"config.json: 'tie_word_embeddings' must be true or false, got {tie!r}")
    vocab = _int(cfg, "vocab_size")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        bad = [t for t in _token_ids(cfg.get(key), key) if t >= vocab]
        if bad:
            raise ConfigError(f"config.json: {key!r} {bad[0]} is outside the vocabulary [0, {vocab})")
    window = cfg.get("sliding_window") if model_type == "mistral" else None
    return DecoderConfig(
        vocab_size=_int(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size"),
        num_hidden_layers=_int(cfg, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(cfg, "rms_norm_eps", 1e-6),
        rope_theta=rope.rope_theta,
        rope=rope,
        tie_word_embeddings=tie,
        sliding_window=0 if window is None else _int(cfg, "sliding_window"),
        max_position_embeddings=_int(cfg, "max_position_embeddings", 2048),
        model_type=model_type,
        bos_token_id=(_token_ids(cfg.get("bos_token_id"), "bos_token_id") or (None,))[0],
        eos_token_id=_token_ids(cfg.get("eos_token_id"), "eos_token_id"),
        pad_token_id=(_token_ids(cfg.get("pad_token_id"), "pad_token_id") or (None,))[0],
        **_parse_cepe(cfg, hidden),
        raw=cfg,
    )


def read_config(model_dir: str, rope_scaling: dict[str, Any] | None = None) -> DecoderConfig:
    """The DecoderConfig of an HF model directory: config.json, plus generation_config.json's
    eos_token_id when present (each at most CONFIG_LIMIT bytes, and a regular file)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no config.json in {model_dir}")
    raw = read_json(path, what="config.json", limit=CONFIG_LIMIT, error=ConfigError)
    cfg = parse_config(raw, rope_scaling)
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.lexists(gen_path):  # generate()'s defaults, as in transformers
        gen = read_json(gen_path, what="generation_config.json", limit=CONFIG_LIMIT, error=ConfigError)
        if isinstance(gen, dict) and gen.get("eos_token_id") is not None:
            eos = _token_ids(gen["eos_token_id"], "generation_config.eos_token_id")
            cfg = replace(cfg, eos_token_id=eos)
    return cfg
