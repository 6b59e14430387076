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
  each other (OpsDecoder.pcw_nll).

- REPLUG (Shi et al., 2023): each passage prepended to the input separately,
  the next-token distributions ensembled with weights softmax(retrieval
  scores) (uniform without scores). It runs on the engine's forward:

    nll = replug_nll(model, passages, tokens, scored=255, scores=None)

OpsDecoder is the LLaMA decoder as cepe.ops calls, one token at a time; with a
cache that never evicts it computes what Model.perplexity computes.
"""

from __future__ import annotations

import math
import os
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


def _read_weights(path: str, cfg: DecoderConfig) -> dict[str, np.ndarray]:
    """The decoder's float32 weights under their HF names, from an HF directory or a GGUF file."""
    from .gguf_io import GGUFFile, is_gguf, weight_names

    if is_gguf(path):
        gf = GGUFFile(path)
        try:
            return {target: gf.get(name) for name, target in weight_names(gf, cfg).items()}
        finally:
            gf.close()
    from .safetensors_io import Checkpoint

    ckpt = Checkpoint(path)
    return {nm: ckpt.get(nm) for nm in ckpt.names() if nm.startswith(("model.", "lm_head."))}


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
        """The decoder of a loaded cepe.Model, its weights read again from model.path."""
        path = getattr(model, "path", None)
        if not path or not os.path.exists(path):
            raise ValueError(f"OpsDecoder.from_model: the model's files are not at {path!r}")
        return cls(model.config, _read_weights(path, model.config), n_threads)

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

    def pcw_nll(self, chunks: Any, tokens: Any, scored: int) -> float:
        """Mean NLL of the last `scored` tokens of `tokens` under parallel context windows:
        chunks (n, L) each at positions 0..L-1, attending only within itself; the tokens at
        positions L.. attend to every chunk token and causally to each other."""
        ctx = np.asarray(chunks, dtype=np.int64)
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ctx.ndim != 2 or ctx.shape[0] < 1 or ctx.shape[1] < 1:
            raise ValueError(f"chunks must be an (n, L) token array with n, L >= 1, got shape {ctx.shape}")
        T = ids.size
        if not 1 <= scored <= T - 1:
            raise ValueError(f"scored must be in [1, {T - 1}], got {scored}")
        V = self.cfg.vocab_size
        if ((ctx < 0) | (ctx >= V)).any() or ((ids < 0) | (ids >= V)).any():
            raise ValueError(f"token ids must be in [0, {V})")
        n, L = ctx.shape
        cos, sin = ops.rope_tables(np.arange(L + T, dtype=np.float64), self.rope)
        emb = self.w["model.embed_tokens.weight"]
        hc, ht = ops.embedding(ctx, emb), ops.embedding(ids[None], emb)
        for i in range(self.cfg.num_hidden_layers):
            qc, kc, vc = self._qkv(i, hc, cos[:L], sin[:L])
            qt, kt, vt = self._qkv(i, ht, cos[L:], sin[L:])
            ac = ops.attention(qc, kc, vc, causal=True, n_threads=self.nt)
            keys = np.concatenate([kc.reshape(1, n * L, self.KVH, self.hd), kt], axis=1)
            values = np.concatenate([vc.reshape(1, n * L, self.KVH, self.hd), vt], axis=1)
            at = ops.attention(qt, keys, values, causal=True, q_offset=n * L, n_threads=self.nt)
            assert isinstance(ac, np.ndarray) and isinstance(at, np.ndarray)
            hc, ht = self._finish_layer(i, hc, ac), self._finish_layer(i, ht, at)
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
            h = ops.embedding(ids[t : t + 1], self.w["model.embed_tokens.weight"])  # (1, C)
            for i in range(L):
                x = ops.rmsnorm(h, self._layer(i, "input_layernorm"), eps, n_threads=nt)
                q = ops.linear(x, self._layer(i, "self_attn.q_proj"), n_threads=nt).reshape(1, 1, H, hd)
                kc[i, n] = ops.linear(x, self._layer(i, "self_attn.k_proj"), n_threads=nt).reshape(KVH, hd)
                vc[i, n] = ops.linear(x, self._layer(i, "self_attn.v_proj"), n_threads=nt).reshape(KVH, hd)
                k = ops.rope_apply(kc[i, : n + 1], cos[: n + 1], sin[: n + 1], layout=self.rope.layout)  # type: ignore[arg-type]
                q = ops.rope_apply(q, cos[n : n + 1], sin[n : n + 1], layout=self.rope.layout)  # type: ignore[arg-type]
                a = ops.attention(q, k[None], vc[i, : n + 1][None], n_threads=nt)
                assert isinstance(a, np.ndarray)
                h = h + ops.linear(a.reshape(1, H * hd), self._layer(i, "self_attn.o_proj"), n_threads=nt)
                x = ops.rmsnorm(h, self._layer(i, "post_attention_layernorm"), eps, n_threads=nt)
                g = ops.linear(x, self._layer(i, "mlp.gate_proj"), n_threads=nt)
                u = ops.linear(x, self._layer(i, "mlp.up_proj"), n_threads=nt)
                h = h + ops.linear(ops.swiglu(g, u), self._layer(i, "mlp.down_proj"), n_threads=nt)
            n += 1
            if t + 1 >= first_scored:
                z = self._logits(h).astype(np.float64)[0]
                m = z.max()
                total += m + math.log(np.exp(z - m).sum()) - z[ids[t + 1]]
        return total / scored
