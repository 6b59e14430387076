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
  share position ids 0..L-1 and each attends only within itself; the task
  tokens take positions from L on and attend to every chunk and, causally, to
  each other (OpsDecoder.pcw_nll); with APE's refinement (Yang et al., 2025): a
  shared prefix before every chunk, and a temperature and a scale on the task
  tokens' attention to the chunks.

- REPLUG (Shi et al., 2023): each passage prepended to the input separately,
  the next-token distributions ensembled with weights softmax(retrieval
  scores) (uniform without scores). It runs on the engine's forward:

    nll = replug_nll(model, passages, tokens, scored=255, scores=None)

OpsDecoder is the LLaMA decoder as cepe.ops calls, one token at a time; with a
cache that never evicts it computes what Model.perplexity computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import ops
from .config import DecoderConfig
from .rope import RopeSettings

__all__ = ["OpsDecoder", "replug_nll"]


def replug_nll(
    model: Any, passages: Sequence[Any], tokens: Any, scored: int, scores: Sequence[float] | None = None
) -> float:
    """Mean NLL of the last `scored` tokens of `tokens` under REPLUG's ensemble: for each passage
    k (a 1-D token array), the decoder reads passage_k + tokens, and the target's probability is
    sum_k w_k p(target | passage_k, tokens before it), w = softmax(scores) (uniform if None)."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if not 1 <= scored <= ids.size - 1:
        raise ValueError(f"scored must be in [1, {ids.size - 1}], got {scored}")
    if not passages:
        raise ValueError("REPLUG needs at least one passage")
    if scores is None:
        logw = np.full(len(passages), -math.log(len(passages)))
    else:
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != (len(passages),) or not np.isfinite(s).all():
            raise ValueError(f"scores must be {len(passages)} finite numbers, one per passage")
        logw = s - s.max() - math.log(np.exp(s - s.max()).sum())
    targets = ids[-scored:]
    per_passage = []
    for p in passages:
        seq = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1), ids])
        # the logits at the positions that predict the scored tokens: the last scored + 1 but one
        z = model.forward(seq[None])[0, -scored - 1 : -1].astype(np.float64)
        m = z.max(axis=1, keepdims=True)
        logp = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
        per_passage.append(logp[np.arange(scored), targets])
    lp = np.stack(per_passage) + logw[:, None]  # (K, scored)
    top = lp.max(axis=0)
    return float(-(top + np.log(np.exp(lp - top).sum(axis=0))).mean())


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
        z = self._logits(h).astype(np.float64)
        m = z.max(axis=1, keepdims=True)
        logp = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(targets)), targets].mean())

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
        """Mean NLL of the last `scored` tokens of `tokens` under parallel context windows:
        chunks (n, L) each at positions P..P+L-1 after a shared prefix (P tokens at 0..P-1,
        none by default), attending to the prefix and within itself; the tokens at positions
        P+L.. attend to the prefix, every chunk token and causally to each other.

        APE's refinement (Yang et al., 2025) with temperature T and scale S: a task token's
        attention to the chunk tokens uses scores / T and their softmax mass times S, i.e. the
        output is (Σ_prefix e^s v + S Σ_chunks e^(s/T) v + Σ_task e^s v) / (the same sums without
        v). T = S = 1 and no prefix is plain PCW."""
        ctx = np.asarray(chunks, dtype=np.int64)
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        pre = np.zeros(0, np.int64) if prefix is None else np.asarray(prefix, dtype=np.int64).reshape(-1)
        if ctx.ndim != 2 or ctx.shape[0] < 1 or ctx.shape[1] < 1:
            raise ValueError(f"chunks must be an (n, L) token array with n, L >= 1, got shape {ctx.shape}")
        T = ids.size
        if not 1 <= scored <= T - 1:
            raise ValueError(f"scored must be in [1, {T - 1}], got {scored}")
        if not (temperature > 0 and scale > 0 and math.isfinite(temperature) and math.isfinite(scale)):
            raise ValueError(f"temperature and scale must be finite and > 0, got {temperature} and {scale}")
        V = self.cfg.vocab_size
        if any(((a < 0) | (a >= V)).any() for a in (ctx, ids, pre)):
            raise ValueError(f"token ids must be in [0, {V})")
        n, L = ctx.shape
        P = pre.size
        rows = np.concatenate([np.broadcast_to(pre, (n, P)), ctx], axis=1)  # (n, P+L)
        cos, sin = ops.rope_tables(np.arange(P + L + T, dtype=np.float64), self.rope)
        emb = self.w["model.embed_tokens.weight"]
        hc, ht = ops.embedding(rows, emb), ops.embedding(ids[None], emb)
        KVH, hd = self.KVH, self.hd
        qk_scale = hd**-0.5
        for i in range(self.cfg.num_hidden_layers):
            qc, kc, vc = self._qkv(i, hc, cos[: P + L], sin[: P + L])
            qt, kt, vt = self._qkv(i, ht, cos[P + L :], sin[P + L :])
            ac = ops.attention(qc, kc, vc, causal=True, n_threads=self.nt)
            assert isinstance(ac, np.ndarray)
            parts = [  # (keys, values, score scale, log weight, causal)
                (kc[:, P:].reshape(1, n * L, KVH, hd), vc[:, P:].reshape(1, n * L, KVH, hd),
                 qk_scale / temperature, math.log(scale), False),
                (kt, vt, qk_scale, 0.0, True),
            ]  # fmt: skip
            if P:
                parts.append((kc[:1, :P], vc[:1, :P], qk_scale, 0.0, False))
            outs, lses = [], []
            for k, v, sc, logw, causal in parts:
                o, lse = ops.attention(
                    qt, k, v, causal=causal, q_offset=0, scale=sc, return_lse=True, n_threads=self.nt
                )
                outs.append(o)
                lses.append(lse + logw)
            top = np.max(lses, axis=0)
            w = [np.exp(lse - top)[..., None] for lse in lses]  # (1, T, H, 1) each
            at = sum(wi * o for wi, o in zip(w, outs, strict=True)) / sum(w)
            hc, ht = self._finish_layer(i, hc, ac), self._finish_layer(i, ht, at.astype(np.float32))
        return self._nll(ht[0, T - scored - 1 : T - 1], ids[T - scored :])

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
