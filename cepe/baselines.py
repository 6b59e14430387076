"""Training-free long-context baselines that the C forward cannot express,
composed from cepe.ops on a model's own weights (so a comparison runs in one
process on one set of weights):

- StreamingLLM (Xiao et al., 2023): attention sinks (the first `sinks` tokens)
  plus the most recent tokens in a fixed-size KV cache; keys are cached before
  RoPE and rotated by their slot in the cache at every step ("positions
  re-assigned within the cache"); evaluated token by token, as its paper does.

    dec = OpsDecoder.from_model(model)
    nll = dec.streaming_nll(tokens, cache_size=256, scored=255)   # mean NLL of the last 255 tokens

- Parallel context windows (PCW, Ratner et al., 2023): the context's chunks
  (of any lengths) share position ids from 0 and each attends only within
  itself; the task tokens take positions after the longest and attend to every
  chunk and, causally, to each other (OpsDecoder.pcw_windows encodes the chunks
  once, pcw_logits / pcw_nll run the task tokens over them); with APE's
  refinement (Yang et al., 2025; APESettings): a shared prefix before every
  chunk, and a temperature and a scale on the task tokens' attention to the
  chunks.

- REPLUG (Shi et al., 2023): each passage prepended to the input separately,
  the next-token distributions ensembled with weights softmax(retrieval
  scores) (uniform without scores). It runs on the engine's forward:

    nll = replug_nll(model, passages, tokens, scored=255, scores=None)

  (replug_log_weights and replug_mix are its ensemble, for greedy decoding too.)

OpsDecoder is the LLaMA decoder as cepe.ops calls, one token at a time; with a
cache that never evicts it computes what Model.perplexity computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import ops
from .config import DecoderConfig
from .rope import RopeSettings

__all__ = [
    "APESettings",
    "OpsDecoder",
    "Windows",
    "log_softmax",
    "prompt_start",
    "replug_log_weights",
    "replug_mix",
    "replug_nll",
]


def replug_log_weights(n: int, scores: Sequence[float] | None = None) -> np.ndarray:
    """REPLUG's log ensemble weights of n passages: log softmax(scores), uniform without scores."""
    if n < 1:
        raise ValueError("REPLUG needs at least one passage")
    if scores is None:
        return np.full(n, -math.log(n))
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,) or not np.isfinite(s).all():
        raise ValueError(f"scores must be {n} finite numbers, one per passage")
    return s - s.max() - math.log(np.exp(s - s.max()).sum())


def replug_mix(logp: np.ndarray, logw: np.ndarray) -> np.ndarray:
    """log sum_k w_k p_k: per-passage log probabilities logp (K, ...) mixed over the first axis."""
    lp = np.asarray(logp, dtype=np.float64) + logw.reshape(-1, *([1] * (np.ndim(logp) - 1)))
    top = lp.max(axis=0)
    return top + np.log(np.exp(lp - top).sum(axis=0))


def log_softmax(z: np.ndarray) -> np.ndarray:
    """float64 log softmax over the last axis."""
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def replug_nll(
    model: Any, passages: Sequence[Any], tokens: Any, scored: int, scores: Sequence[float] | None = None
) -> float:
    """Mean NLL of the last `scored` tokens of `tokens` under REPLUG's ensemble: for each passage
    k (a 1-D token array), the decoder reads passage_k + tokens, and the target's probability is
    sum_k w_k p(target | passage_k, tokens before it), w = softmax(scores) (uniform if None)."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if not 1 <= scored <= ids.size - 1:
        raise ValueError(f"scored must be in [1, {ids.size - 1}], got {scored}")
    logw = replug_log_weights(len(passages), scores)
    targets = ids[-scored:]
    per_passage = []
    for p in passages:
        seq = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1), ids])
        # the logits at the positions that predict the scored tokens: the last scored + 1 but one
        logp = log_softmax(model.forward(seq[None])[0, -scored - 1 : -1])
        per_passage.append(logp[np.arange(scored), targets])
    return float(-replug_mix(np.stack(per_passage), logw).mean())


def prompt_start(model: Any) -> list[int]:
    """The token ids every prompt of the model begins with: BOS where its tokenizer adds one
    (the config's BOS for a model without a tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    bos = model.config.bos_token_id if tok is None else tok.bos_token_id
    if bos is None or (tok is not None and tok.encode("x")[:1] != [bos]):
        return []
    return [int(bos)]


@dataclass(frozen=True)
class APESettings:
    """APE's settings (Yang et al., 2025): a task token's attention to the context windows
    uses scores / temperature and its softmax mass times scale; every window follows the
    shared prefix (token ids; None: prompt_start, i.e. BOS where the model's prompts begin
    with one, else nothing)."""

    temperature: float = 1.0
    scale: float = 1.0
    prefix: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        t, s = self.temperature, self.scale
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (t, s)):
            raise ValueError(f"APE temperature and scale must be finite and > 0, got {t!r} and {s!r}")
        if self.prefix is not None:
            ids = tuple(self.prefix)
            if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"APE prefix must be token ids (ints >= 0), got {self.prefix!r}")
            object.__setattr__(self, "prefix", tuple(int(i) for i in ids))

    def prefix_ids(self, model: Any) -> np.ndarray:
        """The shared prefix's token ids for this model."""
        return np.asarray(prompt_start(model) if self.prefix is None else self.prefix, dtype=np.int64)

    def as_dict(self, model: Any) -> dict[str, Any]:
        """The settings in effect (prefix resolved): what a result was computed with."""
        return {"temperature": float(self.temperature), "scale": float(self.scale),
                "prefix": self.prefix_ids(model).tolist()}  # fmt: skip


@dataclass
class Windows:
    """Parallel context windows, encoded: per layer, the (keys, values, score scale, log weight)
    groups that a task token attends to besides the task tokens, and the task's first position."""

    parts: list[list[tuple[np.ndarray, np.ndarray, float, float]]]
    start: int


class OpsDecoder:
    """A LLaMA decoder run layer by layer with cepe.ops on its weights."""

    def __init__(self, cfg: DecoderConfig, weights: dict[str, np.ndarray], n_threads: int | None = 1) -> None:
        self.cfg, self.w, self.nt = cfg, weights, n_threads
        self.H, self.KVH, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if cfg.sliding_window:
            raise NotImplementedError("OpsDecoder: sliding-window models are not supported")
        self.rope = cfg.rope or RopeSettings(
            rope_theta=cfg.rope_theta, head_dim=self.hd, rotary_dim=self.hd,
            max_position_embeddings=cfg.max_position_embeddings,
            original_max_position_embeddings=cfg.max_position_embeddings,
        )  # fmt: skip
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight", head) if n not in weights]
        if missing:
            raise KeyError(f"OpsDecoder: missing weights {missing}")
        self.lm_head = weights[head]

    @classmethod
    def from_model(cls, model: Any, n_threads: int | None = 1) -> OpsDecoder:
        """The decoder of a loaded cepe.Model, on the very arrays the model computes with
        (read-only views: nothing is copied or read again) where they are float32; a matrix
        held in another format (GGUF blocks, bf16) is widened to float32 once here."""
        from .qtensor import as_float32, core_weights

        weights = core_weights(model._core)
        decoder = {k: as_float32(v) for k, v in weights.items() if k.startswith(("model.", "lm_head."))}
        return cls(model.config, decoder, n_threads)

    def _layer(self, i: int, name: str) -> np.ndarray:
        return self.w[f"model.layers.{i}.{name}.weight"]

    def _qkv(self, i: int, h: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, ...]:
        """Layer i's rotated q, k and v of hidden states h (B, T, C), tables (T, half)."""
        B, T, _ = h.shape
        x = ops.rmsnorm(h, self._layer(i, "input_layernorm"), self.cfg.rms_norm_eps, n_threads=self.nt)
        q = ops.linear(x, self._layer(i, "self_attn.q_proj"), n_threads=self.nt).reshape(B, T, self.H, self.hd)
        k = ops.linear(x, self._layer(i, "self_attn.k_proj"), n_threads=self.nt).reshape(B, T, self.KVH, self.hd)
        v = ops.linear(x, self._layer(i, "self_attn.v_proj"), n_threads=self.nt).reshape(B, T, self.KVH, self.hd)
        layout = self.rope.layout
        q = ops.rope_apply(q, cos, sin, layout=layout, out=q, n_threads=self.nt)  # type: ignore[arg-type]
        k = ops.rope_apply(k, cos, sin, layout=layout, out=k, n_threads=self.nt)  # type: ignore[arg-type]
        return q, k, v

    def _finish_layer(self, i: int, h: np.ndarray, a: np.ndarray) -> np.ndarray:
        """h + o_proj(a), then the MLP block."""
        nt, eps = self.nt, self.cfg.rms_norm_eps
        h = h + ops.linear(a.reshape(*h.shape[:2], -1), self._layer(i, "self_attn.o_proj"), n_threads=nt)
        x = ops.rmsnorm(h, self._layer(i, "post_attention_layernorm"), eps, n_threads=nt)
        g = ops.linear(x, self._layer(i, "mlp.gate_proj"), n_threads=nt)
        u = ops.linear(x, self._layer(i, "mlp.up_proj"), n_threads=nt)
        return h + ops.linear(ops.swiglu(g, u, n_threads=nt), self._layer(i, "mlp.down_proj"), n_threads=nt)

    def _nll(self, h: np.ndarray, targets: np.ndarray) -> float:
        """Mean NLL of targets (n,) under the logits of hidden states h (n, C)."""
        logp = log_softmax(self._logits(h))
        return float(-logp[np.arange(len(targets)), targets].mean())

    def _check_ids(self, *arrays: np.ndarray) -> None:
        V = self.cfg.vocab_size
        if any(((a < 0) | (a >= V)).any() for a in arrays):
            raise ValueError(f"token ids must be in [0, {V})")

    def pcw_windows(self, chunks: Any, *, prefix: Any = None, temperature: float = 1.0, scale: float = 1.0) -> Windows:
        """Encodes parallel context windows: chunks (an (n, L) array, or n 1-D arrays of any
        lengths), chunk i at positions P..P+L_i-1 after a shared prefix (P tokens at 0..P-1, none
        by default), attending to the prefix and causally within itself. The task tokens
        (pcw_logits) take positions from P + max L_i on, as PCW places them after the longest window.

        APE's refinement (Yang et al., 2025) with temperature T and scale S: a task token's
        attention to the chunk tokens uses scores / T and their softmax mass times S, i.e. the
        output is (Σ_prefix e^s v + S Σ_chunks e^(s/T) v + Σ_task e^s v) / (the same sums without
        v). T = S = 1 and no prefix is plain PCW."""
        if isinstance(chunks, np.ndarray) and chunks.ndim != 2:
            raise ValueError(f"chunks must be an (n, L) token array or a list of 1-D arrays, got shape {chunks.shape}")
        wins = [np.asarray(c, dtype=np.int64) for c in chunks]
        if not wins or any(w.ndim != 1 or w.size < 1 for w in wins):
            raise ValueError("chunks must hold at least one window, each a non-empty 1-D token array")
        pre = np.zeros(0, np.int64) if prefix is None else np.asarray(prefix, dtype=np.int64).reshape(-1)
        if not (temperature > 0 and scale > 0 and math.isfinite(temperature) and math.isfinite(scale)):
            raise ValueError(f"temperature and scale must be finite and > 0, got {temperature} and {scale}")
        self._check_ids(pre, *wins)
        P, longest = pre.size, max(w.size for w in wins)
        cos, sin = ops.rope_tables(np.arange(P + longest, dtype=np.float64), self.rope)
        emb = self.w["model.embed_tokens.weight"]
        hs = [ops.embedding(np.concatenate([pre, w])[None], emb) for w in wins]  # (1, P+L_i, C) each
        qk_scale = self.hd**-0.5
        parts = []
        for i in range(self.cfg.num_hidden_layers):
            ks, vs = [], []
            for j, h in enumerate(hs):
                S = h.shape[1]
                q, k, v = self._qkv(i, h, cos[:S], sin[:S])
                a = ops.attention(q, k, v, causal=True, n_threads=self.nt)
                assert isinstance(a, np.ndarray)
                hs[j] = self._finish_layer(i, h, a)
                ks.append(k[:, P:])
                vs.append(v[:, P:])
            layer = [(np.concatenate(ks, axis=1), np.concatenate(vs, axis=1), qk_scale / temperature, math.log(scale))]
            if P:  # the prefix sees only itself: the same keys and values in every window
                layer.append((k[:, :P], v[:, :P], qk_scale, 0.0))
            parts.append(layer)
        return Windows(parts, P + longest)

    def pcw_logits(
        self, windows: Windows, tokens: Any, *, last: bool = False, past: list[Any] | None = None
    ) -> np.ndarray:
        """float32 logits (T, V) of the task tokens (1-D) after encoded windows, each attending to
        every window token, the prefix and causally to the task tokens; last: only the last
        token's (V,). past (a list, empty at first) keeps the task tokens' keys and values:
        tokens then continue those already run with it, as in decoding one token at a time."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size < 1:
            raise ValueError("tokens must hold at least one token")
        self._check_ids(ids)
        h = self._task_hidden(windows, ids, past)[0]
        return self._logits(h[-1:])[0] if last else self._logits(h)

    def _task_hidden(self, windows: Windows, ids: np.ndarray, past: list[Any] | None = None) -> np.ndarray:
        n_past = 0 if not past else past[0][0].shape[1]
        T = ids.size
        start = windows.start + n_past
        cos, sin = ops.rope_tables(np.arange(start, start + T, dtype=np.float64), self.rope)
        ht = ops.embedding(ids[None], self.w["model.embed_tokens.weight"])
        qk_scale = self.hd**-0.5
        for i in range(self.cfg.num_hidden_layers):
            qt, kt, vt = self._qkv(i, ht, cos, sin)
            if past is not None:
                if n_past:
                    kt = np.concatenate([past[i][0], kt], axis=1)
                    vt = np.concatenate([past[i][1], vt], axis=1)
                    past[i] = (kt, vt)
                else:
                    past.append((kt, vt))
            groups = [(k, v, sc, logw, False) for k, v, sc, logw in windows.parts[i]]
            groups.append((kt, vt, qk_scale, 0.0, True))
            outs, lses = [], []
            for k, v, sc, logw, causal in groups:
                o, lse = ops.attention(
                    qt, k, v, causal=causal, q_offset=n_past, scale=sc, return_lse=True, n_threads=self.nt
                )
                outs.append(o)
                lses.append(lse + logw)
            top = np.max(lses, axis=0)
            w = [np.exp(lse - top)[..., None] for lse in lses]  # (1, T, H, 1) each
            at = sum(wi * o for wi, o in zip(w, outs, strict=True)) / sum(w)
            ht = self._finish_layer(i, ht, at.astype(np.float32))
        return ht

    def pcw_nll(
        self,
        chunks: Any,
        tokens: Any,
        scored: int,
        *,
        prefix: Any = None,
        temperature: float = 1.0,
        scale: float = 1.0,
    ) -> float:
        """Mean NLL of the last `scored` tokens of `tokens` under parallel context windows
        (pcw_windows: chunks, prefix, APE's temperature and scale)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = ids.size
        if not 1 <= scored <= T - 1:
            raise ValueError(f"scored must be in [1, {T - 1}], got {scored}")
        windows = self.pcw_windows(chunks, prefix=prefix, temperature=temperature, scale=scale)
        self._check_ids(ids)
        h = self._task_hidden(windows, ids)
        return self._nll(h[0, T - scored - 1 : T - 1], ids[T - scored :])

    def _logits(self, h: np.ndarray) -> np.ndarray:
        x = ops.rmsnorm(h, self.w["model.norm.weight"], self.cfg.rms_norm_eps, n_threads=self.nt)
        return ops.linear(x, self.lm_head, n_threads=self.nt)

    def streaming_nll(self, tokens: Any, cache_size: int, scored: int, sinks: int = 4) -> float:
        """Mean NLL of the last `scored` tokens of `tokens`, each predicted from the tokens before
        it through a StreamingLLM cache of cache_size entries: the first `sinks` tokens and the
        most recent cache_size - sinks ones, keys rotated by their slot in the cache."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = ids.size
        if not 1 <= scored <= T - 1:
            raise ValueError(f"scored must be in [1, {T - 1}], got {scored}")
        if not 0 <= sinks < cache_size:
            raise ValueError(f"need 0 <= sinks < cache_size, got sinks={sinks}, cache_size={cache_size}")
        if ((ids < 0) | (ids >= self.cfg.vocab_size)).any():
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")
        L, eps, nt = self.cfg.num_hidden_layers, self.cfg.rms_norm_eps, self.nt
        KVH, H, hd = self.KVH, self.H, self.hd
        kc = np.zeros((L, cache_size, KVH, hd), np.float32)  # pre-RoPE keys, by slot
        vc = np.zeros((L, cache_size, KVH, hd), np.float32)
        n = 0  # entries in the cache
        positions = np.arange(cache_size, dtype=np.float64)
        cos, sin = ops.rope_tables(positions, self.rope, seq_len=cache_size)
        total = 0.0
        first_scored = T - scored  # targets t >= first_scored, predicted at t - 1
        for t in range(T - 1):
            if n == cache_size:  # evict the oldest token after the sinks
                kc[:, sinks:-1] = kc[:, sinks + 1 :]
                vc[:, sinks:-1] = vc[:, sinks + 1 :]
                n -= 1
            h = ops.embedding(ids[None, t : t + 1], self.w["model.embed_tokens.weight"])  # (1, 1, C)
            for i in range(L):
                x = ops.rmsnorm(h, self._layer(i, "input_layernorm"), eps, n_threads=nt)
                q = ops.linear(x, self._layer(i, "self_attn.q_proj"), n_threads=nt).reshape(1, 1, H, hd)
                kc[i, n] = ops.linear(x, self._layer(i, "self_attn.k_proj"), n_threads=nt).reshape(KVH, hd)
                vc[i, n] = ops.linear(x, self._layer(i, "self_attn.v_proj"), n_threads=nt).reshape(KVH, hd)
                layout = self.rope.layout
                k = ops.rope_apply(kc[i, : n + 1], cos[: n + 1], sin[: n + 1], layout=layout, n_threads=nt)  # type: ignore[arg-type]
                q = ops.rope_apply(q, cos[n : n + 1], sin[n : n + 1], layout=layout, n_threads=nt)  # type: ignore[arg-type]
                a = ops.attention(q, k[None], vc[i, : n + 1][None], n_threads=nt)
                assert isinstance(a, np.ndarray)
                h = self._finish_layer(i, h, a)
            n += 1
            if t + 1 >= first_scored:
                z = self._logits(h[0]).astype(np.float64)[0]
                m = z.max()
                total += m + math.log(np.exp(z - m).sum()) - z[ids[t + 1]]
        return total / scored
