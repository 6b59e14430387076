"""Tools for experiments written as pytest files: tiny random models on disk,
and assertions that say where two results part.

The pytest plugin (cepe.testing.plugin, registered through the `pytest11`
entry point, so installing cepe is enough) turns these into fixtures:
`tiny_llama`, `tiny_cepe`, `default_model` and `reference`; see
examples/test_experiment.py. Nothing here imports torch: the PyTorch
reference lives in cepe.testing.reference, imported only when asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..safetensors_io import write_safetensors
from ..save import write_json

__all__ = [
    "TINY_CEPE",
    "TINY_LLAMA",
    "TinyModel",
    "assert_generations_equal",
    "assert_logits_close",
    "tiny_config",
    "write_tiny_cepe",
    "write_tiny_llama",
]

# A LLaMA small enough to run in milliseconds, with grouped-query attention.
TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
# The CEPE encoder of tiny_cepe (its own width and heads) and its cross-attention layers.
TINY_CEPE: dict[str, Any] = dict(
    encoder=dict(
        vocab_size=101,
        hidden_size=40,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=5,
        rms_norm_eps=1e-6,
        rope_theta=5000.0,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    num_cross_attn_layers=3,
)


@dataclass(frozen=True)
class TinyModel:
    """A random model written to `path` (config.json + model.safetensors)."""

    path: str
    config: dict[str, Any] = field(repr=False)
    seed: int = 0

    def load(self, **kwargs: Any) -> Any:
        """cepe.load(self.path, **kwargs)."""
        from ..load import load

        return load(self.path, **kwargs)

    def __fspath__(self) -> str:
        return self.path


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _llama_tensors(cfg: dict[str, Any], prefix: str, rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    """Random weights of a LLaMA stack under prefix ("model." or "encoder."): matrices
    N(0, scale²), norm weights U(0.5, 1.5) so that they matter."""

    def mat(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (rng.random(n) + 0.5).astype(np.float32)

    C, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KVH, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], _head_dim(cfg)
    t = {f"{prefix}embed_tokens.weight": mat(V, C), f"{prefix}norm.weight": norm(C)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        t |= {
            p + "input_layernorm.weight": norm(C),
            p + "self_attn.q_proj.weight": mat(H * hd, C),
            p + "self_attn.k_proj.weight": mat(KVH * hd, C),
            p + "self_attn.v_proj.weight": mat(KVH * hd, C),
            p + "self_attn.o_proj.weight": mat(C, H * hd),
            p + "post_attention_layernorm.weight": norm(C),
            p + "mlp.gate_proj.weight": mat(inter, C),
            p + "mlp.up_proj.weight": mat(inter, C),
            p + "mlp.down_proj.weight": mat(C, inter),
        }
    return t


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """TINY_LLAMA with overrides (also head_dim, rope_scaling, sliding_window): a tiny LLaMA's
    config keys, for write_tiny_llama or transformers' LlamaConfig."""
    unknown = set(overrides) - set(TINY_LLAMA) - {"head_dim", "rope_scaling", "sliding_window"}
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(TINY_LLAMA)}")
    return {**TINY_LLAMA, **overrides}


def _llama_config(overrides: dict[str, Any]) -> dict[str, Any]:
    cfg = tiny_config(**overrides)
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float32")
    cfg.setdefault("head_dim", _head_dim(cfg))
    return cfg


def write_tiny_llama(path: str | os.PathLike[str], seed: int = 0, scale: float = 0.15, **config: Any) -> TinyModel:
    """A random LLaMA checkpoint in path: TINY_LLAMA with `config`'s changes."""
    cfg = _llama_config(config)
    rng = np.random.default_rng(seed)
    tensors = _llama_tensors(cfg, "model.", rng, scale)
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = (rng.standard_normal((cfg["vocab_size"], cfg["hidden_size"])) * scale).astype(
            np.float32
        )
    return _write(os.fspath(path), cfg, tensors, seed)


def write_tiny_cepe(
    path: str | os.PathLike[str],
    seed: int = 0,
    scale: float = 0.15,
    *,
    encoder: dict[str, Any] | None = None,
    num_cross_attn_layers: int | None = None,
    **config: Any,
) -> TinyModel:
    """A random CEPE checkpoint (decoder, encoder, cross-attention in the last
    num_cross_attn_layers layers) in the official LlamaForCausalContextLM layout."""
    cfg = _llama_config(config)
    enc = {**TINY_CEPE["encoder"], **(encoder or {})}
    enc.setdefault("head_dim", _head_dim(enc))
    L = cfg["num_hidden_layers"]
    k = min(TINY_CEPE["num_cross_attn_layers"], L) if num_cross_attn_layers is None else num_cross_attn_layers
    if not 1 <= k <= L:
        raise ValueError(f"num_cross_attn_layers must be in [1, {L}], got {k}")
    rng = np.random.default_rng(seed)
    tensors = _llama_tensors(cfg, "model.", rng, scale)
    tensors["lm_head.weight"] = (rng.standard_normal((cfg["vocab_size"], cfg["hidden_size"])) * scale).astype(
        np.float32
    )
    enc_tensors = _llama_tensors(enc, "encoder.", rng, scale)
    tensors |= enc_tensors
    C, D = cfg["hidden_size"], enc["hidden_size"]
    H, KVH, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    for i in range(L - k, L):
        p = f"model.layers.{i}.cross_attn."
        tensors |= {
            p + "layernorm.weight": (rng.random(C) + 0.5).astype(np.float32),
            p + "q_proj.weight": (rng.standard_normal((H * hd, C)) * scale).astype(np.float32),
            p + "k_proj.weight": (rng.standard_normal((KVH * hd, D)) * scale).astype(np.float32),
            p + "v_proj.weight": (rng.standard_normal((KVH * hd, D)) * scale).astype(np.float32),
            p + "o_proj.weight": (rng.standard_normal((C, H * hd)) * scale).astype(np.float32),
        }
    cfg.update(
        architectures=["LlamaForCausalContextLM"],
        tie_word_embeddings=False,
        do_cross_attention=True,
        num_cross_attn_layers=k,
        num_cross_attn_hidden_states=1,
        encoder_config={**enc, "model_type": "llama", "is_encoder": True, "do_cross_attention": False},
        encoder_hidden_size=D,
        encoder_is_model=False,
        encode_mode="context_only",
    )
    return _write(os.fspath(path), cfg, tensors, seed)


def _write(path: str, cfg: dict[str, Any], tensors: dict[str, np.ndarray], seed: int) -> TinyModel:
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "model.safetensors"), tensors)
    write_json(os.path.join(path, "config.json"), cfg)
    return TinyModel(path, cfg, seed)


# ------------------------------------------------------------------ assertions


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def assert_logits_close(
    actual: Any, expected: Any, *, atol: float = 1e-4, rtol: float = 0.0, what: str = "logits"
) -> None:
    """|actual - expected| <= atol + rtol * |expected| everywhere (NumPy arrays or torch
    tensors of one shape), else AssertionError naming the worst position, its values and
    whether the argmax (the greedy token) still agrees there."""
    a, e = _numpy(actual).astype(np.float64), _numpy(expected).astype(np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} differs from the expected {e.shape}")
    if not np.isfinite(a).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise AssertionError(f"{what}: non-finite value {a[bad]} at {bad}")
    excess = np.abs(a - e) - (atol + rtol * np.abs(e))
    if a.size == 0 or excess.max() <= 0:
        return
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), a.shape))
    n_bad = int((excess > 0).sum())
    msg = (
        f"{what}: {n_bad} of {a.size} values differ by more than atol={atol} + rtol={rtol}·|expected|; "
        f"worst at {worst}: {a[worst]:.6g} vs {e[worst]:.6g} (|diff| {abs(a[worst] - e[worst]):.3g})"
    )
    if a.ndim >= 1 and a.shape[-1] > 1:
        row = worst[:-1]
        msg += f"; argmax there {int(np.argmax(a[row]))} vs {int(np.argmax(e[row]))}"
    raise AssertionError(msg)


def _rows(x: Any) -> list[list[int]]:
    if hasattr(x, "ids") and hasattr(x, "lengths"):  # cepe.Generation: each row up to its length
        ids, lengths = np.atleast_2d(np.asarray(x.ids)), np.atleast_1d(np.asarray(x.lengths))
        return [[int(t) for t in row[:n]] for row, n in zip(ids, lengths, strict=True)]
    if isinstance(x, np.ndarray) or hasattr(x, "detach"):
        arr = np.atleast_2d(_numpy(x))
        return [[int(t) for t in row] for row in arr]
    items = list(x)
    if all(isinstance(t, (int, np.integer)) for t in items):
        return [[int(t) for t in items]]
    return [[int(t) for t in row] for row in items]


def assert_generations_equal(actual: Any, expected: Any, *, what: str = "generation") -> None:
    """Token ids equal row by row ((n,) or (B, n) arrays, lists, tensors or
    cepe.Generation), else AssertionError naming the first row and step that differ."""
    a, e = _rows(actual), _rows(expected)
    if len(a) != len(e):
        raise AssertionError(f"{what}: {len(a)} rows, expected {len(e)}")
    for r, (x, y) in enumerate(zip(a, e, strict=True)):
        if x == y:
            continue
        step = next((i for i, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), min(len(x), len(y)))
        raise AssertionError(
            f"{what}: row {r} differs from step {step} on: got {x[step : step + 8]}, expected {y[step : step + 8]} "
            f"(lengths {len(x)} and {len(y)})"
        )
