"""RoPE scaling settings and E2-LLM positions.

parse_rope() reads the RoPE part of an HF config.json (transformers 5's
`rope_parameters`, or 4.x's `rope_scaling` + `rope_theta`) into a RopeSettings,
optionally replaced by a user's override (`cepe.load(path, rope_scaling={...})`).
The numbers themselves come from the C core (csrc/rope/frequencies.c), which matches
transformers 5.23's rope init functions:

    inv_freq, magnitude = cepe.rope.rope_frequencies(config_dict, seq_len=8192)

A token at position p rotates pair j by p * inv_freq[j]; cos and sin are
multiplied by `magnitude` (YaRN's / LongRoPE's attention factor, else 1).

E2-LLM (arXiv:2401.06951) trains on short windows whose positions look like
pieces of a g-times longer window (e2llm_positions) and runs inference with
plain linear scaling by g (e2llm_scale_for_length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

import cepe_c

from .errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# rope_type values transformers knows that this version does not implement.
UNSUPPORTED_ROPE_TYPES = ("proportional", "axial")
LAYOUTS = ("half", "interleaved")

# Keys transformers accepts in rope_parameters / rope_scaling (any type).
_KNOWN_KEYS = frozenset(
    {
        "rope_type",
        "type",
        "rope_theta",
        "partial_rotary_factor",
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
        "short_factor",
        "long_factor",
        "low_freq_factor",
        "high_freq_factor",
    }
)
# Types whose window L is original_max_position_embeddings (HF's standardize_rope_params).
_USES_ORIGINAL_WINDOW = ("yarn", "llama3", "longrope")
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class RopeSettings:
    """Everything the C core needs for one model's RoPE (see cepe_rope_config in csrc/cepe.h).

    original_max_position_embeddings is resolved as transformers does: for
    dynamic NTK it is max_position_embeddings (the L of HF's formula)."""

    rope_type: str = "default"
    rope_theta: float = 10000.0
    head_dim: int = 128
    rotary_dim: int = 128
    partial_rotary_factor: float = 1.0
    factor: float | None = None
    original_max_position_embeddings: int = 2048
    max_position_embeddings: int = 2048
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    layout: str = "half"

    @property
    def length_dependent(self) -> bool:
        """True when the table changes with the sequence length (dynamic NTK, LongRoPE)."""
        return self.rope_type in ("dynamic", "longrope")

    def to_core(self) -> dict[str, Any]:
        """The settings dict cepe_c.rope_frequencies takes."""
        return {
            "rope_type": self.rope_type,
            "layout": self.layout,
            "rope_theta": self.rope_theta,
            "head_dim": self.head_dim,
            "rotary_dim": self.rotary_dim,
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "mscale": self.mscale,
            "mscale_all_dim": self.mscale_all_dim,
            "attention_factor": self.attention_factor,
            "truncate": self.truncate,
            "short_factor": None if self.short_factor is None else list(self.short_factor),
            "long_factor": None if self.long_factor is None else list(self.long_factor),
        }


# ------------------------------------------------------------------ parsing


def _number(block: dict[str, Any], key: str, where: str) -> float | None:
    """block[key] as a finite float, None when absent or null."""
    v = block.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}.{key} must be a number, got {v!r}")
    if isinstance(v, int) and abs(v) >= 2**1000 or not math.isfinite(v):  # an int past float's range too
        raise ConfigError(f"{where}.{key} must be a finite number, got {v!r}")
    return float(v)


def _required_number(block: dict[str, Any], key: str, where: str, rope_type: str) -> float:
    v = _number(block, key, where)
    if v is None:
        raise ConfigError(f"{where}.{key} is required for rope_type {rope_type!r}")
    return v


def _positive_int(v: Any, key: str) -> int:
    """An int >= 1 that fits int32; integral floats (4096.0) are accepted."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    if not 1 <= v <= _INT32_MAX:
        raise ConfigError(f"{key} must be in [1, {_INT32_MAX}], got {v}")
    return v


def _factor_list(block: dict[str, Any], key: str, where: str, n_pairs: int) -> tuple[float, ...]:
    v = block.get(key)
    if v is None:
        raise ConfigError(f"{where}.{key} is required for rope_type 'longrope'")
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise ConfigError(f"{where}.{key} must be a list of numbers, got {v!r}")
    if any(isinstance(x, int) and abs(x) >= 2**1000 for x in v):
        raise ConfigError(f"{where}.{key} holds a number past float's range")
    if len(v) != n_pairs:
        raise ConfigError(f"{where}.{key} must have {n_pairs} entries (rotary_dim/2), got {len(v)}")
    return tuple(float(x) for x in v)


def _checkpoint_block(cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The checkpoint's RoPE dict and its name. As transformers: a non-empty
    rope_scaling (4.x) wins over rope_parameters (5.x)."""
    for key in ("rope_scaling", "rope_parameters"):
        block = cfg.get(key)
        if block is not None and not isinstance(block, dict):
            raise ConfigError(f"config.json: {key!r} must be an object or null, got {block!r}")
    scaling, params = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    if scaling:
        return scaling, "config.json: rope_scaling"
    return params or {}, "config.json: rope_parameters"


def _rope_type(block: dict[str, Any], where: str) -> str:
    if any(isinstance(v, dict) for v in block.values()):
        raise NotImplementedError(f"{where}: per-layer-type RoPE parameters are not supported")
    rtype = block.get("rope_type", block.get("type", "default"))  # old key `type`, as HF
    if rtype in UNSUPPORTED_ROPE_TYPES:
        raise NotImplementedError(f"{where}.rope_type {rtype!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if rtype not in ROPE_TYPES:
        raise ConfigError(f"{where}.rope_type: unknown value {rtype!r} (supported: {', '.join(ROPE_TYPES)})")
    return rtype


def _head_dim(cfg: dict[str, Any]) -> int:
    if cfg.get("head_dim") is not None:
        return _positive_int(cfg["head_dim"], "config.json: head_dim")
    for key in ("hidden_size", "num_attention_heads"):
        if key not in cfg:
            raise ConfigError(f"config.json: missing required key {key!r} (needed for the RoPE head_dim)")
    hidden = _positive_int(cfg["hidden_size"], "config.json: hidden_size")
    return hidden // _positive_int(cfg["num_attention_heads"], "config.json: num_attention_heads")


def _rotary_dim(head_dim: int, prf: float, where: str) -> int:
    if not 0.0 < prf <= 1.0:
        raise ConfigError(f"{where}.partial_rotary_factor must be in (0, 1], got {prf}")
    dim = int(head_dim * prf)  # as transformers: truncation, not rounding
    if dim < 2 or dim % 2:
        raise ConfigError(
            f"{where}.partial_rotary_factor {prf} gives rotary_dim int({head_dim} * {prf}) = {dim}; "
            "it must be even and >= 2"
        )
    return dim


def _original_window(
    cfg: dict[str, Any], block: dict[str, Any], rtype: str, where: str, max_pos: int, is_override: bool
) -> int:
    """L as transformers resolves it: dynamic measures against
    max_position_embeddings; yarn/llama3/longrope read
    original_max_position_embeddings, where a top-level value (Phi-3) wins
    over the checkpoint's rope dict (but not over a user's override), and
    max_position_embeddings is the fallback."""
    if rtype not in _USES_ORIGINAL_WINDOW:
        return max_pos
    key = "original_max_position_embeddings"
    if is_override and block.get(key) is not None:
        return _positive_int(block[key], f"{where}.{key}")
    if cfg.get(key) is not None:
        return _positive_int(cfg[key], f"config.json: {key}")
    if block.get(key) is not None:
        return _positive_int(block[key], f"{where}.{key}")
    return max_pos


def _variant_fields(block: dict[str, Any], rtype: str, where: str, rotary_dim: int) -> dict[str, Any]:
    """The type-specific settings, with transformers' required keys enforced."""
    if rtype == "default":
        return {}
    if rtype in ("linear", "dynamic"):
        return {"factor": _required_number(block, "factor", where, rtype)}
    if rtype == "llama3":
        return {k: _required_number(block, k, where, rtype) for k in ("factor", "low_freq_factor", "high_freq_factor")}
    if rtype == "yarn":
        if "factor" not in block:  # HF requires the key; null means max_pos / original
            raise ConfigError(f"{where}.factor is required for rope_type 'yarn'")
        truncate = block.get("truncate", True)  # HF: `if truncate:`, so null means False
        if truncate is not None and not isinstance(truncate, bool):
            raise ConfigError(f"{where}.truncate must be true or false, got {truncate!r}")
        keys = ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
        return {**{k: _number(block, k, where) for k in keys}, "truncate": bool(truncate)}
    n_pairs = rotary_dim // 2  # longrope
    return {
        "factor": _number(block, "factor", where),
        "attention_factor": _number(block, "attention_factor", where),
        "short_factor": _factor_list(block, "short_factor", where, n_pairs),
        "long_factor": _factor_list(block, "long_factor", where, n_pairs),
    }


def _core_check(settings: RopeSettings, where: str) -> None:
    """Range checks live in the C core (cepe_rope_check); its messages say
    `rope_scaling.<key>`, rewritten here to where the value came from."""
    try:
        cepe_c.rope_frequencies(settings.to_core(), 0)
    except ValueError as exc:
        msg = str(exc)
        if msg.startswith("rope_scaling"):
            msg = where + msg[len("rope_scaling") :]
        raise ConfigError(msg) from None


def parse_rope(
    config_dict: dict[str, Any], override: dict[str, Any] | None = None, *, layout: str = "half"
) -> RopeSettings:
    """The RoPE settings of an HF config.json dict.

    override: a rope_scaling dict ({"rope_type": "linear", "factor": 4}) that
    replaces the checkpoint's scaling; rope_theta and partial_rotary_factor
    stay the checkpoint's unless the override sets them.
    layout: "half" (HF checkpoints) or "interleaved" (Meta / GGUF weights)."""
    if not isinstance(config_dict, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(config_dict).__name__}")
    if layout not in LAYOUTS:
        raise ConfigError(f"rope layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    ckpt, ckpt_where = _checkpoint_block(config_dict)
    if override is None:
        block, where = ckpt, ckpt_where
    else:
        if not isinstance(override, dict):
            raise ConfigError(f"rope_scaling must be a dict, got {type(override).__name__}")
        unknown = sorted(set(override) - _KNOWN_KEYS, key=str)
        if unknown:
            raise ConfigError(f"rope_scaling: unknown key(s) {', '.join(map(repr, unknown))}")
        block, where = override, "rope_scaling"
    rtype = _rope_type(block, where)

    def inherited(key: str, default: float) -> float:
        # block value, else the checkpoint's rope dict, else top level (HF's setdefault order)
        for src, name in ((block, where), (ckpt, ckpt_where), (config_dict, "config.json")):
            v = _number(src, key, name)
            if v is not None:
                return v
        return default

    theta = inherited("rope_theta", 10000.0)
    if theta <= 1.0:
        raise ConfigError(f"{where}.rope_theta must be > 1, got {theta}")
    head_dim = _head_dim(config_dict)
    prf = inherited("partial_rotary_factor", 1.0)
    rotary_dim = _rotary_dim(head_dim, prf, where)
    max_pos = _positive_int(config_dict.get("max_position_embeddings", 2048), "config.json: max_position_embeddings")
    settings = RopeSettings(
        rope_type=rtype,
        rope_theta=theta,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        partial_rotary_factor=prf,
        original_max_position_embeddings=_original_window(
            config_dict, block, rtype, where, max_pos, override is not None
        ),
        max_position_embeddings=max_pos,
        layout=layout,
        **_variant_fields(block, rtype, where, rotary_dim),
    )
    _core_check(settings, where)
    return settings


# --------------------------------------------------------------- frequencies


def rope_frequencies(
    config_or_settings: RopeSettings | dict[str, Any], seq_len: int | None = None
) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies (float32, rotary_dim/2) and the cos/sin
    magnitude for a config dict or RopeSettings.

    seq_len: the current sequence length (max position + 1). Only dynamic NTK
    and LongRoPE depend on it; None gives the table a model starts with."""
    settings = config_or_settings
    if isinstance(settings, dict):
        settings = parse_rope(settings)
    if not isinstance(settings, RopeSettings):
        raise TypeError(f"expected a config dict or RopeSettings, got {type(config_or_settings).__name__}")
    n = 0 if seq_len is None else seq_len
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= _INT32_MAX:
        raise ValueError(f"seq_len must be None or an integer in [0, {_INT32_MAX}], got {seq_len!r}")
    inv_freq, magnitude = cepe_c.rope_frequencies(settings.to_core(), int(n))
    return inv_freq, float(magnitude)


# ------------------------------------------------------------------- E2-LLM


class E2LLMPositions(NamedTuple):
    positions: np.ndarray  # (n, R) float64: [0, 1, 2, 3, 4+t, ..., R-1+t] / g per row
    scales: np.ndarray  # (n,) int32: g of each row
    offsets: np.ndarray  # (n,) int32: t of each row


def _int32_arg(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"e2llm: {name} must be an integer, got {v!r}")
    if not -_INT32_MAX - 1 <= v <= _INT32_MAX:
        raise ValueError(f"e2llm: {name} must fit in int32, got {v}")
    return int(v)


def e2llm_positions(R: int, L: int, g_max: int, n: int = 1, seed: int = 0) -> E2LLMPositions:
    """E2-LLM training positions for n windows of R tokens of a base model
    with context window L: per row a scale g ~ U{1..g_max} and an offset
    t ~ U{0..max(0, g*L - R)}; the first 4 tokens (attention sinks) keep
    their positions, the others are shifted by t, and all are divided by g.
    Reproducible for a seed (one draw per row; a row per training step or
    per sequence is the caller's choice)."""
    args = {name: _int32_arg(name, v) for name, v in (("R", R), ("L", L), ("g_max", g_max), ("n", n))}
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise ValueError(f"e2llm: seed must be an integer in [0, 2**64), got {seed!r}")
    return E2LLMPositions(*cepe_c.e2llm_positions(seed=int(seed), **args))


def e2llm_scale_for_length(target_len: int, train_len: int) -> dict[str, Any]:
    """The rope_scaling override for running an E2-LLM model on target_len
    tokens: linear scaling by g = target_len / train_len (train_len: the base
    model's window L), rounded up to the integer scales E2-LLM trains with
    and at least 1."""
    for name, v in (("target_len", target_len), ("train_len", train_len)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"e2llm: {name} must be an integer >= 1, got {v!r}")
    g = max(1, -(-int(target_len) // int(train_len)))
    return {"rope_type": "linear", "factor": float(g)}
