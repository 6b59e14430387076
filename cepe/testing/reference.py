"""A PyTorch oracle for CEPE written from the spec (CEPE.md §2-§4), built from
transformers' LLaMA modules: the decoder and encoder blocks are transformers'
own; cross-attention is added between self-attention and the MLP of the last k
layers, as the official LlamaForCausalContextLM does. It also writes
checkpoints in the official layout, which cepe.load reads.

    from cepe.testing.reference import make_reference
    ref = make_reference(seed=0)            # a tiny random CEPE model
    path = ref.save(tmp_dir)                # cepe.load(path) computes the same
    logits = ref(ids, ref.encode(chunks))   # the oracle's logits

It needs torch, transformers and safetensors (the test extra); nothing else in
cepe imports it, so cepe itself never needs torch."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from . import TINY_CEPE, TINY_LLAMA

try:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, repeat_kv
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"cepe.testing.reference needs torch, transformers and safetensors ({exc}): pip install 'cepe[test]'"
    ) from exc

NEG = torch.finfo(torch.float32).min  # the reference's additive mask value


class CrossAttention(torch.nn.Module):
    def __init__(self, cfg: LlamaConfig, d_enc: int) -> None:
        super().__init__()
        H, KVH, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.KVH, self.hd = H, KVH, hd
        self.layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.q_proj = torch.nn.Linear(cfg.hidden_size, H * hd, bias=False)
        self.k_proj = torch.nn.Linear(d_enc, KVH * hd, bias=False)
        self.v_proj = torch.nn.Linear(d_enc, KVH * hd, bias=False)
        self.o_proj = torch.nn.Linear(H * hd, cfg.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, E: torch.Tensor, emask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = h.shape
        N = E.shape[1]
        q = self.q_proj(self.layernorm(h)).view(B, T, self.H, self.hd).transpose(1, 2)
        k = self.k_proj(E).view(B, N, self.KVH, self.hd).transpose(1, 2)
        v = self.v_proj(E).view(B, N, self.KVH, self.hd).transpose(1, 2)
        k, v = repeat_kv(k, self.H // self.KVH), repeat_kv(v, self.H // self.KVH)
        s = q @ k.transpose(2, 3) / self.hd**0.5  # no RoPE, no causal mask
        if emask is not None:
            s = s + (1.0 - emask[:, None, None, :].float()) * NEG
        a = torch.softmax(s, dim=-1) @ v
        if emask is not None:
            # A row whose context is all padding has no context: it attends to
            # nothing and adds 0 (the additive mask alone would average its V).
            a = a * (emask.reshape(B, N).sum(-1) > 0).to(a.dtype)[:, None, None, None]
        return self.o_proj(a.transpose(1, 2).reshape(B, T, self.H * self.hd))


class CepeReference(torch.nn.Module):
    def __init__(self, dec_cfg: LlamaConfig, enc_cfg: LlamaConfig, n_cross: int) -> None:
        super().__init__()
        dec_cfg._attn_implementation = "eager"
        enc_cfg._attn_implementation = "eager"
        self.dec_cfg, self.enc_cfg, self.n_cross = dec_cfg, enc_cfg, n_cross
        self.lm = LlamaForCausalLM(dec_cfg)
        self.encoder = LlamaModel(enc_cfg)
        L = dec_cfg.num_hidden_layers
        self.cross = torch.nn.ModuleDict(
            {str(i): CrossAttention(dec_cfg, enc_cfg.hidden_size) for i in range(L - n_cross, L)}
        )

    def randomize(self, seed: int, scale: float = 0.15) -> CepeReference:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
        return self.eval()

    # ----------------------------------------------------------------- encoder
    @torch.no_grad()
    def encode(self, chunks: np.ndarray, mask: np.ndarray | None = None) -> torch.Tensor:
        """(B, n_ctx, L) -> (B, n_ctx*L, d_enc): chunks independent, bidirectional,
        positions = slot index, padded keys masked, final norm applied."""
        ids = torch.as_tensor(chunks, dtype=torch.long)
        B, n, L = ids.shape
        ids = ids.reshape(B * n, L)
        m = torch.ones(B * n, L) if mask is None else torch.as_tensor(mask).reshape(B * n, L).float()
        enc = self.encoder
        h = enc.embed_tokens(ids)
        pos = torch.arange(L)[None].expand(B * n, L)
        cos_sin = enc.rotary_emb(h, pos)
        attn_mask = ((1.0 - m)[:, None, None, :] * NEG).expand(B * n, 1, L, L)
        for layer in enc.layers:
            a, _ = layer.self_attn(layer.input_layernorm(h), position_embeddings=cos_sin, attention_mask=attn_mask)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return enc.norm(h).reshape(B, n * L, -1)

    # ----------------------------------------------------------------- decoder
    @torch.no_grad()
    def forward(
        self,
        ids: np.ndarray,
        E: torch.Tensor | None = None,
        emask: np.ndarray | None = None,
        attention_mask: np.ndarray | None = None,
    ) -> torch.Tensor:
        x = torch.as_tensor(ids, dtype=torch.long)
        B, T = x.shape
        m = torch.ones(B, T) if attention_mask is None else torch.as_tensor(attention_mask).float()
        pos = (m.cumsum(1) - 1).clamp(min=0).long()
        em = None if emask is None else torch.as_tensor(emask).reshape(B, -1)
        model = self.lm.model
        h = model.embed_tokens(x)
        cos_sin = model.rotary_emb(h, pos)
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        allowed = ~causal[None] & (m[:, None, :] > 0)
        attn_mask = torch.where(allowed, 0.0, NEG)[:, None]
        for i, layer in enumerate(model.layers):
            a, _ = layer.self_attn(layer.input_layernorm(h), position_embeddings=cos_sin, attention_mask=attn_mask)
            h = h + a
            if E is not None and str(i) in self.cross:  # between self-attention and MLP
                h = h + self.cross[str(i)](h, E, em)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm.lm_head(model.norm(h))

    @torch.no_grad()
    def greedy(
        self, ids: np.ndarray, n: int, E: torch.Tensor | None = None, emask: np.ndarray | None = None
    ) -> np.ndarray:
        seq = np.asarray(ids)
        out = []
        for _ in range(n):
            nxt = self.forward(seq, E, emask)[:, -1].argmax(-1).numpy()
            out.append(nxt)
            seq = np.concatenate([seq, nxt[:, None]], axis=1)
        return np.stack(out, axis=1)

    # -------------------------------------------------------------- checkpoint
    def official_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"model.{k}": v for k, v in self.lm.model.state_dict().items()}
        sd["lm_head.weight"] = self.lm.lm_head.weight
        sd.update({f"encoder.{k}": v for k, v in self.encoder.state_dict().items()})
        for i, mod in self.cross.items():
            sd.update({f"model.layers.{i}.cross_attn.{k}": v for k, v in mod.state_dict().items()})
        return {k: v.detach().contiguous().clone() for k, v in sd.items() if not k.endswith("inv_freq")}

    def official_config(self) -> dict:
        cfg = self.dec_cfg.to_dict()
        enc = self.enc_cfg.to_dict()
        enc.update(is_encoder=True, do_cross_attention=False)
        cfg.update(
            architectures=["LlamaForCausalContextLM"],
            do_cross_attention=True,
            num_cross_attn_layers=self.n_cross,
            num_cross_attn_hidden_states=1,
            encoder_config=enc,
            encoder_hidden_size=self.enc_cfg.hidden_size,
            encoder_is_model=False,
            encode_mode="context_only",
        )
        cfg.pop("_attn_implementation", None)
        return cfg

    def save(self, path: str) -> str:
        os.makedirs(path, exist_ok=True)
        save_file(self.official_state_dict(), os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.official_config(), f, indent=1, default=str)
        return path


def make_reference(seed: int = 0, n_cross: int | None = None, **dec_over: Any) -> CepeReference:
    dec = dict(TINY_LLAMA)
    dec.update(dec_over)
    enc = {**TINY_CEPE["encoder"], "vocab_size": 103}  # tiny_cepe's encoder, with a vocabulary of its own size
    torch.manual_seed(seed)
    dcfg, ecfg = LlamaConfig(**dec), LlamaConfig(**enc)
    k = dcfg.num_hidden_layers if n_cross is None else n_cross
    return CepeReference(dcfg, ecfg, k).randomize(seed)


_LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
    "tie_word_embeddings", "bos_token_id", "eos_token_id",
)  # fmt: skip


def load_reference(path: str | os.PathLike[str], rope_scaling: dict[str, Any] | None = None) -> CepeReference:
    """The reference holding a CEPE checkpoint's weights (official layout: config.json and
    model.safetensors, as CepeReference.save and cepe.testing.write_tiny_cepe write them);
    rope_scaling (e.g. {"rope_type": "linear", "factor": 2.0}) replaces the decoder's RoPE."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    dec_kw = {k: cfg[k] for k in _LLAMA_KEYS if k in cfg}
    dec = LlamaConfig(**dec_kw) if rope_scaling is None else LlamaConfig(**dec_kw, rope_scaling=dict(rope_scaling))
    enc_raw = cfg["encoder_config"]
    enc = LlamaConfig(**{k: enc_raw[k] for k in _LLAMA_KEYS if k in enc_raw})
    ref = CepeReference(dec, enc, int(cfg["num_cross_attn_layers"]))
    sd = load_file(os.path.join(path, "model.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.startswith("encoder."):
            state["encoder." + name[len("encoder.") :]] = t
        elif ".cross_attn." in name:
            layer, rest = name[len("model.layers.") :].split(".cross_attn.")
            state[f"cross.{layer}.{rest}"] = t
        elif name == "lm_head.weight":
            state["lm.lm_head.weight"] = t
        else:
            state["lm." + name] = t
    if dec.tie_word_embeddings and "lm.lm_head.weight" not in state:
        state["lm.lm_head.weight"] = state["lm.model.embed_tokens.weight"]
    if enc.tie_word_embeddings:
        state.pop("encoder.lm_head.weight", None)
    missing, unexpected = ref.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise KeyError(f"{path}: missing {missing}, unexpected {unexpected}")
    return ref.eval()
