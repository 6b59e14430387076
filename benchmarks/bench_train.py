#!/usr/bin/env python
"""Training throughput and memory: a CEPE training step in cepe against the same step in PyTorch autograd.

    python benchmarks/bench_train.py --threads 2          # full run
    python benchmarks/bench_train.py --quick              # smoke run (4+2 layers, short sequences)
    python benchmarks/bench_train.py --device cuda        # both engines on the GPU
    python benchmarks/bench_train.py --dtype bfloat16     # the frozen decoder in bf16 in both engines

The model (random weights, official CEPE layout, fp32 safetensors): a SmolLM2-135M-shaped decoder
(30 layers, d 576, 9 query / 3 KV heads, ff 1536, vocab 49152, tied embeddings), a 6-layer
bidirectional encoder (d 512, 8 heads, ff 1408) and cross-attention in every decoder layer. One
training step on one sequence: 512 decoder tokens (labels = the tokens) and 4 x 256 encoder tokens;
the decoder frozen (no weight gradients, no optimizer state, gradients through its activations),
cross-attention + encoder trained; AdamW (betas 0.9/0.999, eps 1e-8, wd 0), clip 1.0, cosine lr.

- cepe: cepe.Trainer(model, "cross_attn+encoder", ...).step(batch), timed as its two phases
  (forward + backward, then clip + AdamW).
- torch: the model written from the spec here (RMSNorm, RoPE, SDPA attention with GQA, SwiGLU;
  cross-attention without RoPE or mask), the same weights loaded from the same file; decoder params
  requires_grad=False; loss.backward(), clip_grad_norm_, torch.optim.AdamW (its default CPU
  implementation), LambdaLR; torch.set_num_threads(threads).

Each engine runs in its own child process (load, 1 untimed warm-up step, --steps timed steps); the
children alternate, cepe/torch then torch/cepe, for --repeats rounds, so a change in the machine's
load hits both. tokens/s = (decoder + encoder tokens of a step) / step time, best over all timed
steps (the median is also reported). Memory per child from /proc/self/status: peak RSS (VmHWM) and
the peak above the weights = VmHWM - RSS after imports - 4 x parameters. Each child records
other_load (CPUs the rest of the machine kept busy meanwhile, from /proc/stat).

With --dtype bfloat16 the frozen decoder's matrices are held in bf16 in both engines, the trained
part and the optimizer state stay float32: cepe.load(..., dtype="bfloat16") under the same Trainer
(its frozen products multiply bf16 weights by activations rounded to bf16, with fp32 sums, where the
CPU has AVX512-BF16; elsewhere bf16 weight tiles widened into fp32 GEMMs). torch, by --torch-bf16:
  frozen    the same precision as cepe: the frozen decoder parameters cast to torch.bfloat16, each
            frozen product's input cast to bf16 and its output back to float32; the trained
            products stay float32 (the default: the issue's "the same decoder in bf16");
  autocast  the frozen decoder parameters in torch.bfloat16 and the forward under
            torch.autocast(bfloat16), as a torch user writes mixed precision: every matmul, the
            trained ones' too, runs in bf16 with fp32 masters (less work than cepe's step).
The op breakdown (fp32 ops) is skipped.

With --device cuda both engines train on the GPU (cepe.load(..., device="cuda"); torch's model and
batch moved there, TF32 off, CUDA synchronized before each clock read), the op breakdown is skipped,
and each child also reports its GPU memory: what NVML says the process holds at the end (both
engines keep their allocations cached, so that is their peak plus the CUDA context) and, for torch,
torch.cuda.max_memory_allocated.

Prints one JSON object on stdout (progress on stderr) and writes a bar plot to --out
(bench_train.png; bench_train_quick.png with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from _common import (
    CEPE_ENCODER,
    SMOLLM2_135M,
    add_model_and_out_args,
    cepe_tensors,
    children_cpu_s,
    cpu_model_name,
    ensure_cepe_model,
    git_state,
    gpu_process_bytes,
    machine_busy_s,
    proc_status,
    settle_counts,
    usable_cpus,
)

SEED = 1234
PAUSE_S = 1.0  # between child processes, so thread pools go idle
CONTENDED = 0.25  # other_load above which a child's timings are marked contended
LR, WARMUP_RATIO, TOTAL_STEPS, CLIP = 3e-4, 0.04, 1000, 1.0

DECODER = {**SMOLLM2_135M, "rope_theta": 100000.0, "max_position_embeddings": 8192}  # SmolLM2-135M's shape
ENCODER = CEPE_ENCODER
FULL = dict(decoder_tokens=512, n_ctx=4, ctx_len=256)
QUICK = dict(decoder_layers=4, encoder_layers=2, decoder_tokens=128, n_ctx=4, ctx_len=64)
TARGETS = {"tok_s_ratio_cepe_over_torch": 1.5, "peak_rss_ratio_cepe_over_torch": 1.0}
KB = 1024


def log(msg: str) -> None:
    print(f"[bench_train] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- model


def model_configs(quick: bool) -> tuple[dict, dict]:
    dec, enc = dict(DECODER), dict(ENCODER)
    if quick:
        dec["num_hidden_layers"] = QUICK["decoder_layers"]
        enc["num_hidden_layers"] = QUICK["encoder_layers"]
    return dec, enc


def sizes(quick: bool) -> dict:
    s = dict(QUICK if quick else FULL)
    return {k: s[k] for k in ("decoder_tokens", "n_ctx", "ctx_len")}


def param_counts(dec: dict, enc: dict) -> dict:
    shapes = cepe_tensors(dec, enc)
    total = sum(math.prod(s) for s in shapes.values())
    cross = sum(math.prod(s) for n, s in shapes.items() if ".cross_attn." in n)
    encoder = sum(math.prod(s) for n, s in shapes.items() if n.startswith("encoder."))
    return {"total": total, "trainable": cross + encoder, "cross_attn": cross, "encoder": encoder}


def step_flops(dec: dict, enc: dict, s: dict) -> dict:
    """Matmul FLOPs of one training step (norms, RoPE, softmax, SiLU, AdamW ignored). Backward: the
    frozen decoder's linear layers and the tied lm_head form input gradients only (1x their forward),
    the trained cross-attention and encoder input + weight gradients (2x); attention backward is
    FlashAttention-2's 5 GEMMs against the forward's 2 (2.5x)."""

    def dims(cfg: dict) -> tuple[int, int, int, int, int, int]:
        d, h = cfg["hidden_size"], cfg["num_attention_heads"]
        hd = d // h
        return d, h, hd, h * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"]

    T, n, Lc = s["decoder_tokens"], s["n_ctx"], s["ctx_len"]
    Ne = n * Lc
    d, H, hd, qd, kvd, ff = dims(dec)
    de, He, hde, qde, kvde, ffe = dims(enc)
    L, Le = dec["num_hidden_layers"], enc["num_hidden_layers"]
    dec_lin = 2 * T * L * (2 * d * qd + 2 * d * kvd + 3 * d * ff)
    lm_head = 2 * T * dec["vocab_size"] * d
    self_att = L * 4 * H * hd * T * (T + 1) // 2
    cross_lin = L * (2 * T * 2 * d * qd + 2 * Ne * 2 * de * kvd)
    cross_att = L * 4 * H * hd * T * Ne
    enc_lin = 2 * Ne * Le * (2 * de * qde + 2 * de * kvde + 3 * de * ffe)
    enc_att = Le * 4 * He * hde * n * Lc * Lc
    fwd = {
        "decoder_linear": dec_lin,
        "lm_head": lm_head,
        "self_attention": self_att,
        "cross_attn_linear": cross_lin,
        "cross_attention": cross_att,
        "encoder_linear": enc_lin,
        "encoder_attention": enc_att,
    }
    bwd_factor = {
        "decoder_linear": 1.0,
        "lm_head": 1.0,
        "self_attention": 2.5,
        "cross_attn_linear": 2.0,
        "cross_attention": 2.5,
        "encoder_linear": 2.0,
        "encoder_attention": 2.5,
    }
    bwd = {k: int(v * bwd_factor[k]) for k, v in fwd.items()}
    return {"forward": fwd, "backward": bwd, "total": sum(fwd.values()) + sum(bwd.values())}


def make_batch(vocab: int, s: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {
        "input_ids": rng.integers(3, vocab, size=(1, s["decoder_tokens"]), dtype=np.int64),
        "encoder_input_ids": rng.integers(3, vocab, size=(1, s["n_ctx"], s["ctx_len"]), dtype=np.int64),
    }


# --------------------------------------------------------------------------- child: memory helpers


def weight_bytes(args: argparse.Namespace) -> int:
    """Bytes the weights take as held: float32, or the frozen decoder in bf16 with --dtype bfloat16."""
    counts = param_counts(*model_configs(args.quick))
    if args.dtype == "float32":
        return 4 * counts["total"]
    return 2 * (counts["total"] - counts["trainable"]) + 4 * counts["trainable"]


def memory_report(st_imports: dict, st_loaded: dict, weights: int) -> dict:
    end = proc_status()
    return {
        "rss_after_imports": st_imports["VmRSS"],
        "rss_after_load": st_loaded["VmRSS"],
        "rss_end": end["VmRSS"],
        "rss_file_end": end["RssFile"],
        "rss_anon_end": end["RssAnon"],
        "peak_rss": end["VmHWM"],
        "weights_bytes": weights,
        "peak_above_weights": end["VmHWM"] - st_imports["VmRSS"] - weights,
        "maxrss_getrusage": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KB,
    }


def on_gpu(args: argparse.Namespace) -> bool:
    return args.device.startswith("cuda")


# --------------------------------------------------------------------------- child: cepe


def phase_cepe(args: argparse.Namespace) -> dict:
    import cepe
    import cepe_c

    st_imports = proc_status()
    dec, enc = model_configs(args.quick)
    batch = make_batch(dec["vocab_size"], sizes(args.quick))
    dtype = None if args.dtype == "float32" else args.dtype  # None: the file's fp32 as stored
    model = cepe.load(args.model_dir, n_threads=args.threads, device=args.device, dtype=dtype)
    trainer = cepe.Trainer(
        model,
        "cross_attn+encoder",
        lr=LR,
        warmup_ratio=WARMUP_RATIO,
        total_steps=TOTAL_STEPS,
        clip=CLIP,
        weight_decay=0.0,
    )
    st_loaded = proc_status()
    steps = []
    for _ in range(args.steps + 1):  # step 0: the untimed warm-up
        t0 = time.perf_counter()
        st = trainer._accumulate(batch)  # forward + backward (what Trainer.step does first)
        t1 = time.perf_counter()
        st.update(trainer._state.update())  # clip + AdamW
        t2 = time.perf_counter()
        steps.append({"loss": st["loss"], "grad_norm": st["grad_norm"], "fwd_bwd_s": t1 - t0, "update_s": t2 - t1})
    memory = memory_report(st_imports, st_loaded, weight_bytes(args))
    if on_gpu(args):
        memory["gpu_process_bytes"] = gpu_process_bytes()
    return {
        "steps": steps,
        "memory": memory,
        "n_trainable": int(trainer.params.size),
        "versions": {"cepe": cepe.__version__, "blas": cepe_c.blas_info().strip()},
    }


# --------------------------------------------------------------------------- child: torch


def build_torch_model(dec: dict, enc: dict, cast_frozen: bool = False):  # -> torch.nn.Module
    """CEPE from the spec (§2-§4) in plain torch, with the official parameter names. cast_frozen:
    a product whose weight is held in bf16 (a frozen one, --torch-bf16 frozen) takes its input
    cast to bf16 and gives float32 back, as cepe's frozen bf16 products do."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Linear(nn.Linear):
        def forward(self, x):
            if cast_frozen and self.weight.dtype != x.dtype:
                return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
            return super().forward(x)

    class RMSNorm(nn.Module):
        def __init__(self, d: int, eps: float) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def rope_tables(n: int, hd: int, theta: float, device):
        inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
        ang = torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv)
        ang = torch.cat([ang, ang], -1)
        return ang.cos(), ang.sin()

    def rotate(x, cos, sin):
        h = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin

    class Attention(nn.Module):
        def __init__(self, cfg: dict, d_kv_in: int | None = None, cross: bool = False) -> None:
            super().__init__()
            d = cfg["hidden_size"]
            self.H, self.KVH = cfg["num_attention_heads"], cfg["num_key_value_heads"]
            self.hd = d // self.H
            if cross:
                self.layernorm = RMSNorm(d, cfg["rms_norm_eps"])
            self.q_proj = Linear(d, self.H * self.hd, bias=False)
            self.k_proj = Linear(d_kv_in or d, self.KVH * self.hd, bias=False)
            self.v_proj = Linear(d_kv_in or d, self.KVH * self.hd, bias=False)
            self.o_proj = Linear(self.H * self.hd, d, bias=False)

        def forward(self, x, kv_in=None, rope=None, causal=False):
            B, T, _ = x.shape
            src = x if kv_in is None else kv_in
            N = src.shape[1]
            q = self.q_proj(x).view(B, T, self.H, self.hd).transpose(1, 2)
            k = self.k_proj(src).view(B, N, self.KVH, self.hd).transpose(1, 2)
            v = self.v_proj(src).view(B, N, self.KVH, self.hd).transpose(1, 2)
            if rope is not None:
                q, k = rotate(q, *rope), rotate(k, *rope)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=self.KVH != self.H)
            return self.o_proj(a.transpose(1, 2).reshape(B, T, self.H * self.hd))

    class MLP(nn.Module):
        def __init__(self, d: int, ff: int) -> None:
            super().__init__()
            self.gate_proj = Linear(d, ff, bias=False)
            self.up_proj = Linear(d, ff, bias=False)
            self.down_proj = Linear(ff, d, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self, cfg: dict, d_enc: int | None) -> None:
            super().__init__()
            d = cfg["hidden_size"]
            self.input_layernorm = RMSNorm(d, cfg["rms_norm_eps"])
            self.self_attn = Attention(cfg)
            if d_enc is not None:
                self.cross_attn = Attention(cfg, d_enc, cross=True)
            self.post_attention_layernorm = RMSNorm(d, cfg["rms_norm_eps"])
            self.mlp = MLP(d, cfg["intermediate_size"])

        def forward(self, h, rope, causal, E=None):
            h = h + self.self_attn(self.input_layernorm(h), rope=rope, causal=causal)
            if E is not None:  # between self-attention and MLP, no RoPE, no mask
                h = h + self.cross_attn(self.cross_attn.layernorm(h), kv_in=E)
            return h + self.mlp(self.post_attention_layernorm(h))

    class Stack(nn.Module):
        def __init__(self, cfg: dict, d_enc: int | None) -> None:
            super().__init__()
            self.cfg = cfg
            self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
            self.layers = nn.ModuleList([Layer(cfg, d_enc) for _ in range(cfg["num_hidden_layers"])])
            self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

        def forward(self, ids, causal, E=None):
            h = self.embed_tokens(ids)
            if cast_frozen:  # a bf16 table's rows, as float32
                h = h.float()
            hd = self.cfg["hidden_size"] // self.cfg["num_attention_heads"]
            rope = rope_tables(ids.shape[1], hd, self.cfg["rope_theta"], ids.device)  # positions 0..T-1 (per chunk)
            for layer in self.layers:
                h = layer(h, rope, causal, E)
            return self.norm(h)

    class Cepe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Stack(dec, enc["hidden_size"])
            self.encoder = Stack(enc, None)

        def forward(self, ids, chunks):
            B, n, L = chunks.shape
            E = self.encoder(chunks.reshape(B * n, L), causal=False).reshape(B, n * L, -1)
            h = self.model(ids, causal=True, E=E)
            w = self.model.embed_tokens.weight
            logits = (h.to(w.dtype) @ w.T).to(h.dtype) if cast_frozen else h @ w.T  # tied lm_head
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return Cepe()


def phase_torch(args: argparse.Namespace) -> dict:
    import torch

    st_imports = proc_status()
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    dec, enc = model_configs(args.quick)
    batch = make_batch(dec["vocab_size"], sizes(args.quick))
    dev = torch.device(args.device if on_gpu(args) else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as cepe's GEMMs
    ids = torch.from_numpy(batch["input_ids"]).to(dev)
    chunks = torch.from_numpy(batch["encoder_input_ids"]).to(dev)
    with torch.device("meta"):
        model = build_torch_model(dec, enc, cast_frozen=args.dtype == "bfloat16" and args.torch_bf16 == "frozen")
    model.load_state_dict(load_file(os.path.join(args.model_dir, "model.safetensors")), strict=True, assign=True)
    model.to(dev)

    def clock() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(".cross_attn." in name or name.startswith("encoder."))
        if p.requires_grad:
            trainable.append(p)
        elif args.dtype == "bfloat16":  # the frozen decoder held in bf16; trained tensors stay fp32
            p.data = p.data.to(torch.bfloat16)
    autocast = torch.autocast(
        dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16" and args.torch_bf16 == "autocast"
    )
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    warmup = math.ceil(TOTAL_STEPS * WARMUP_RATIO)

    def lr_lambda(k: int) -> float:  # HF's cosine schedule with linear warmup
        if k < warmup:
            return k / max(1, warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (k - warmup) / max(1, TOTAL_STEPS - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    st_loaded = proc_status()
    steps = []
    for _ in range(args.steps + 1):
        t0 = clock()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(ids, chunks)
        t1 = clock()
        loss.backward()
        t2 = clock()
        norm = torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        opt.step()
        sched.step()
        t3 = clock()
        steps.append(
            {
                "loss": float(loss.detach()),
                "grad_norm": float(norm),
                "fwd_s": t1 - t0,
                "bwd_s": t2 - t1,
                "fwd_bwd_s": t2 - t0,
                "update_s": t3 - t2,
            }
        )
    memory = memory_report(st_imports, st_loaded, weight_bytes(args))
    if dev.type == "cuda":
        memory["gpu_process_bytes"] = gpu_process_bytes()
        memory["torch_max_memory_allocated"] = torch.cuda.max_memory_allocated(dev)
    return {
        "steps": steps,
        "memory": memory,
        "n_trainable": int(sum(p.numel() for p in trainable)),
        "optimizer": f"torch.optim.AdamW (foreach={opt.defaults.get('foreach')}, fused={opt.defaults.get('fused')})",
        "versions": {"torch": torch.__version__},
    }


# --------------------------------------------------------------------------- children: op breakdown


def op_inventory(dec: dict, enc: dict, s: dict) -> dict:
    """The ops of one training step with their shapes and counts: linear layers (name: N, in, out,
    count, which gradients), attention (B, Tq, Tk, H, KVH, hd, causal, count) and SwiGLU (N, count)."""
    T, Ne, n, Lc = s["decoder_tokens"], s["n_ctx"] * s["ctx_len"], s["n_ctx"], s["ctx_len"]
    d, ff, L, H, KVH = (
        dec[k]
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    )
    de, ffe, Le, He, KVHe = (
        enc[k]
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    )
    hd, hde = d // H, de // He
    linear = {
        "decoder q,o": (T, d, H * hd, 2 * L, "dx"),
        "decoder k,v": (T, d, KVH * hd, 2 * L, "dx"),
        "decoder gate,up": (T, d, ff, 2 * L, "dx"),
        "decoder down": (T, ff, d, L, "dx"),
        "lm_head (tied)": (T, d, dec["vocab_size"], 1, "dx"),
        "cross q,o": (T, d, H * hd, 2 * L, "both"),
        "cross k,v": (Ne, de, KVH * hd, 2 * L, "both"),
        "encoder q,k,v,o": (Ne, de, He * hde, 4 * Le, "both"),
        "encoder gate,up": (Ne, de, ffe, 2 * Le, "both"),
        "encoder down": (Ne, ffe, de, Le, "both"),
    }
    attention = {
        "decoder self (causal)": (1, T, T, H, KVH, hd, True, L),
        "cross": (1, T, Ne, H, KVH, hd, False, L),
        "encoder (per chunk)": (n, Lc, Lc, He, KVHe, hde, False, Le),
    }
    swiglu = {"decoder swiglu": (T * ff, L), "encoder swiglu": (Ne * ffe, Le)}
    return {"linear": linear, "attention": attention, "swiglu": swiglu}


def _best(fn, *args, **kw) -> float:
    """The best of 10 timed calls fn(*args, **kw), after one untimed call."""
    fn(*args, **kw)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        fn(*args, **kw)
        times.append(time.perf_counter() - t0)
    return min(times)


def phase_ops(args: argparse.Namespace, engine: str) -> dict:
    """Forward and backward time of each op of the step, alone, best of 10 (cepe: the core's ops through
    its test bindings, BLAS single-threaded inside the OpenMP team as in a model; torch: the same ops
    under autograd, backward timed alone)."""
    dec, enc = model_configs(args.quick)
    inv = op_inventory(dec, enc, sizes(args.quick))
    rng = np.random.default_rng(SEED)

    def f32(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    out: dict = {}
    if engine == "cepe":
        import cepe.ops as ops
        import cepe_c

        cepe_c.set_blas_threads(1)  # as cepe.load does: threads come from the OpenMP team
        nt = args.threads
        for name, (N, C, OC, cnt, g) in inv["linear"].items():
            x, w, dy = f32(N, C), f32(OC, C), f32(N, OC)
            fw = _best(ops.linear, x, w, n_threads=nt)
            bw = _best(ops.linear_backward, dy, x, w, weight_grad=g == "both", n_threads=nt)
            out[name] = {"group": "linear", "fwd_s": fw, "bwd_s": bw, "count": cnt}
        for name, (B, Tq, Tk, H, KVH, hd, causal, cnt) in inv["attention"].items():
            q, k, v, do = f32(B, Tq, H, hd), f32(B, Tk, KVH, hd), f32(B, Tk, KVH, hd), f32(B, Tq, H, hd)
            q_offset = 0  # the training forward's queries start at the first key
            o, lse = ops.attention(q, k, v, causal=causal, q_offset=q_offset, return_lse=True, n_threads=nt)
            fw = _best(ops.attention, q, k, v, causal=causal, q_offset=q_offset, return_lse=True, n_threads=nt)
            bw = _best(ops.attention_backward, do, q, k, v, o, lse, causal=causal, q_offset=q_offset, n_threads=nt)
            out[name] = {"group": "attention", "fwd_s": fw, "bwd_s": bw, "count": cnt}
        for name, (N, cnt) in inv["swiglu"].items():
            gt, up, dy = f32(N), f32(N), f32(N)
            fw = _best(ops.swiglu, gt, up)
            bw = _best(ops.swiglu_backward, dy, gt, up)
            # the core's MLP backward recomputes silu(gate) * up (not kept from the forward)
            out[name] = {"group": "swiglu", "fwd_s": fw, "bwd_s": bw + fw, "count": cnt}
        return out
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)

    def bwd_only(make, inputs, grad_out) -> float:
        def once() -> float:
            y = make()
            t0 = time.perf_counter()
            torch.autograd.grad(y, inputs, grad_out)
            return time.perf_counter() - t0

        once()
        return min(once() for _ in range(10))

    for name, (N, C, OC, cnt, g) in inv["linear"].items():
        x = torch.from_numpy(f32(N, C)).requires_grad_(True)
        w = torch.from_numpy(f32(OC, C)).requires_grad_(g == "both")
        dy = torch.from_numpy(f32(N, OC))
        with torch.no_grad():
            fw = _best(torch.matmul, x, w.T)
        bw = bwd_only(lambda x=x, w=w: x @ w.T, [x, w] if g == "both" else [x], dy)
        out[name] = {"group": "linear", "fwd_s": fw, "bwd_s": bw, "count": cnt}
    for name, (B, Tq, Tk, H, KVH, hd, causal, cnt) in inv["attention"].items():
        q = torch.from_numpy(f32(B, H, Tq, hd)).requires_grad_(True)
        k = torch.from_numpy(f32(B, KVH, Tk, hd)).requires_grad_(True)
        v = torch.from_numpy(f32(B, KVH, Tk, hd)).requires_grad_(True)
        do = torch.from_numpy(f32(B, H, Tq, hd))

        def sdpa(q=q, k=k, v=v, causal=causal, gqa=KVH != H):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        with torch.no_grad():
            fw = _best(sdpa)
        out[name] = {"group": "attention", "fwd_s": fw, "bwd_s": bwd_only(sdpa, [q, k, v], do), "count": cnt}
    for name, (N, cnt) in inv["swiglu"].items():
        gt = torch.from_numpy(f32(N)).requires_grad_(True)
        up = torch.from_numpy(f32(N)).requires_grad_(True)
        dy = torch.from_numpy(f32(N))

        def act(gt=gt, up=up):
            return F.silu(gt) * up

        with torch.no_grad():
            fw = _best(act)
        out[name] = {"group": "swiglu", "fwd_s": fw, "bwd_s": bwd_only(act, [gt, up], dy), "count": cnt}
    return out


def op_summary(ops: dict) -> dict:
    """Per op and per group: seconds per step (time x count), forward and backward."""
    groups: dict = {}
    for o in ops.values():
        o["step_fwd_s"], o["step_bwd_s"] = o["fwd_s"] * o["count"], o["bwd_s"] * o["count"]
        g = groups.setdefault(o["group"], {"step_fwd_s": 0.0, "step_bwd_s": 0.0})
        g["step_fwd_s"] += o["step_fwd_s"]
        g["step_bwd_s"] += o["step_bwd_s"]
    total = sum(g["step_fwd_s"] + g["step_bwd_s"] for g in groups.values())
    return {"ops": ops, "groups": groups, "total_s": total}


# --------------------------------------------------------------------------- child: data-parallel rank


def phase_dp(args: argparse.Namespace) -> dict:
    """One rank of `--nproc N` (started by torchrun): one sequence per rank per step (the global
    batch is N sequences). The warm-up step is cepe.distributed.DataParallel.step; each timed step
    runs its pieces with clocks between them: the rank's forward + backward, a barrier (the wait
    for the slower rank: contention, not communication), the gradient all-reduce (gloo), the
    update. Rank 0 writes the result."""
    import torch

    import cepe
    import cepe.distributed as cd

    ctx = cd.init("cpu")
    dec, enc = model_configs(args.quick)
    batch = make_batch(dec["vocab_size"], sizes(args.quick))
    model = cepe.load(args.model_dir, n_threads=args.threads)
    trainer = cepe.Trainer(
        model, "cross_attn+encoder", lr=LR, warmup_ratio=WARMUP_RATIO, total_steps=TOTAL_STEPS, clip=CLIP
    )
    dp = cd.DataParallel(trainer, ctx)
    dp.step(batch)  # the untimed warm-up, through the library's step
    grads = torch.from_numpy(trainer.grad_buffer)
    rows = (ctx.rank, ctx.world_size)
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.zero_grad()
        st = trainer.compute_gradients(batch, scale=1.0 / ctx.world_size, rows=rows)
        t1 = time.perf_counter()
        dp.barrier()
        t2 = time.perf_counter()
        torch.distributed.all_reduce(grads)
        t3 = time.perf_counter()
        trainer.apply_update()
        t4 = time.perf_counter()
        steps.append(
            {"step_s": t4 - t0, "fwd_bwd_s": t1 - t0, "wait_s": t2 - t1, "allreduce_s": t3 - t2, "update_s": t4 - t3}
        )
        steps[-1]["loss"] = st["loss"]
    out = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "steps": steps,
        "buffer_bytes": int(trainer.grad_buffer.nbytes),
        "n_trainable": int(trainer.params.size),
    }
    cd.shutdown()
    if ctx.rank != 0:
        sys.exit(0)  # rank 0 writes the phase's JSON
    return out


PHASES = {
    "cepe": phase_cepe,
    "dp": phase_dp,
    "torch": phase_torch,
    "cepe_ops": lambda a: phase_ops(a, "cepe"),
    "torch_ops": lambda a: phase_ops(a, "torch"),
}


# --------------------------------------------------------------------------- parent


def run_child(engine: str, args: argparse.Namespace, model_dir: str, scratch: str) -> dict:
    out_path = os.path.join(scratch, f"{engine}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", engine, "--scratch", scratch]
    cmd += ["--model-dir", model_dir, "--threads", str(args.threads), "--steps", str(args.steps)]
    cmd += ["--device", args.device, "--dtype", args.dtype, "--torch-bf16", args.torch_bf16]
    cmd += ["--quick"] if args.quick else []
    time.sleep(PAUSE_S)
    load_before = os.getloadavg()
    busy0, own0, t0 = machine_busy_s(), children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, stdout=sys.stderr)
    busy1, own1, wall = machine_busy_s(), children_cpu_s(), time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench_train: the {engine} child failed (exit status {proc.returncode})")
    with open(out_path) as f:
        res = json.load(f)
    os.remove(out_path)
    load = {"wall_s": round(wall, 2), "own_cpu_s": round(own1 - own0, 2), "loadavg_before": load_before}
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0) - (own1 - own0))
        load["other_load"] = round(other / wall, 3)
    res["load"] = load
    if engine.endswith("_ops"):
        return res
    timed = res["steps"][1:]
    best = min(s["fwd_bwd_s"] + s["update_s"] for s in timed)
    contended = load.get("other_load", 0.0) > CONTENDED
    log(
        f"{engine}: best step {best:.3f} s, peak RSS {res['memory']['peak_rss'] / 2**20:.0f} MiB, "
        f"other_load {load.get('other_load')}" + (" (CONTENDED)" if contended else "")
    )
    return res


def engine_summary(runs: list[dict], tokens: int) -> dict:
    timed = [s for r in runs for s in r["steps"][1:]]
    clean = [s for r in runs if r["load"].get("other_load", 0.0) <= CONTENDED for s in r["steps"][1:]]
    step_s = [s["fwd_bwd_s"] + s["update_s"] for s in timed]
    best = min(step_s)
    i = step_s.index(best)
    mem = [r["memory"] for r in runs]
    return {
        "tok_s": tokens / best,
        "best_step_s": best,
        "median_step_s": statistics.median(step_s),
        "best_phases_s": {k: v for k, v in timed[i].items() if k.endswith("_s")},
        "median_fwd_bwd_s": statistics.median(s["fwd_bwd_s"] for s in timed),
        "median_update_s": statistics.median(s["update_s"] for s in timed),
        "tok_s_uncontended_steps": tokens / min(s["fwd_bwd_s"] + s["update_s"] for s in clean) if clean else None,
        "step_times_s": [round(x, 4) for x in step_s],
        "peak_rss": statistics.median(m["peak_rss"] for m in mem),
        "peak_above_weights": statistics.median(m["peak_above_weights"] for m in mem),
        "gpu_process_bytes": max((m.get("gpu_process_bytes") or 0 for m in mem), default=0) or None,
        "memory_per_run": mem,
        "other_load_per_run": [r["load"].get("other_load") for r in runs],
        "n_trainable": runs[0]["n_trainable"],
    }


def write_plot(result: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot written")
        return None
    c, t = result["results"]["cepe"], result["results"]["torch"]
    ops = result.get("op_breakdown")
    fig, axes = plt.subplots(1, 3 if ops else 2, figsize=(15 if ops else 10, 4.2))
    colors = ["tab:blue", "tab:orange"]
    ax = axes[0]
    vals = [c["tok_s"], t["tok_s"]]
    bars = ax.bar(["cepe", "torch"], vals, color=colors)
    for bar, v in zip(bars, vals, strict=True):
        ax.annotate(f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
    target = TARGETS["tok_s_ratio_cepe_over_torch"] * t["tok_s"]
    ax.axhline(target, color="gray", ls="--", lw=1)
    ax.annotate("target: 1.5x torch", (1.45, target), ha="right", va="bottom", color="gray", fontsize=8)
    ax.set_ylim(0, max(vals + [target]) * 1.15)
    ax.set_ylabel("training tokens/s (decoder + encoder)")
    ax.set_title(f"step throughput: cepe/torch = {result['ratios']['tok_s_cepe_over_torch']:.2f}x", fontsize=10)
    ax = axes[1]
    x = np.arange(2)
    mib = 2**20
    total = [c["peak_rss"] / mib, t["peak_rss"] / mib]
    above = [c["peak_above_weights"] / mib, t["peak_above_weights"] / mib]
    b1 = ax.bar(x - 0.2, total, 0.4, label="peak RSS", color=colors, alpha=0.9)
    b2 = ax.bar(x + 0.2, above, 0.4, label="peak above imports + weights", color=colors, alpha=0.45, hatch="//")
    for bars_, vals_ in ((b1, total), (b2, above)):
        for bar, v in zip(bars_, vals_, strict=True):
            ax.annotate(f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, ["cepe", "torch"])
    ax.set_ylabel("MiB")
    ax.set_title(f"peak memory: cepe/torch = {result['ratios']['peak_rss_cepe_over_torch']:.2f}x", fontsize=10)
    ax.legend(fontsize=8)
    if ops:  # seconds per step by op group, each op timed alone
        ax = axes[2]
        groups = ["linear", "attention", "swiglu"]
        shades = {"linear": "tab:green", "attention": "tab:red", "swiglu": "tab:purple"}
        for i, eng in enumerate(["cepe", "torch"]):
            bottom = 0.0
            for grp in groups:
                gs = ops[eng]["groups"].get(grp, {"step_fwd_s": 0.0, "step_bwd_s": 0.0})
                for part, alpha in (("step_fwd_s", 0.9), ("step_bwd_s", 0.45)):
                    label = f"{grp} {'forward' if part == 'step_fwd_s' else 'backward'}" if i == 0 else None
                    ax.bar(i, gs[part], 0.5, bottom=bottom, color=shades[grp], alpha=alpha, label=label)
                    bottom += gs[part]
            ax.annotate(f"{bottom:.2f} s", (i, bottom), ha="center", va="bottom", fontsize=8)
        ax.set_xticks([0, 1], ["cepe", "torch"])
        ax.set_ylabel("seconds per step (ops timed alone)")
        ax.set_title("where the step's time goes", fontsize=10)
        ax.legend(fontsize=7)
    s = result["sizes"]
    fig.suptitle(
        f"{result['model']['name']}; {s['decoder_tokens']} decoder + {s['n_ctx']}x{s['ctx_len']} encoder tokens; "
        f"{result['threads']} threads, {result['machine']['cpu']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="threads for both engines (default: all CPUs)")
    p.add_argument("--repeats", type=int, default=None, help="rounds of (cepe, torch) children (default 3)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per child after 1 warm-up (default 3)")
    add_model_and_out_args(p)
    p.add_argument("--quick", action="store_true", help="smoke run: 4+2 layers, 128 + 4x64 tokens, 1 round")
    p.add_argument(
        "--no-op-breakdown",
        dest="op_breakdown",
        action="store_false",
        help="skip timing each op of the step alone in both engines (the profile behind the ratio)",
    )
    p.add_argument("--device", default="cpu", help="device of both engines: cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="format of the frozen decoder's matrices in both engines (trained tensors: float32)",
    )
    p.add_argument(
        "--torch-bf16",
        choices=("frozen", "autocast"),
        default="frozen",
        help="with --dtype bfloat16, torch's precision: frozen (as cepe: only the frozen decoder's products "
        "in bf16) or autocast (every matmul in bf16)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="data-parallel instead: N cepe processes (gloo, torchrun) against one, all-reduce share of the step",
    )
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (args.device == "cpu" or args.device == "cuda" or args.device.startswith("cuda:")):
        p.error(f"--device must be cpu, cuda or cuda:N, not {args.device!r}")
    args.threads = args.threads or usable_cpus()
    settle_counts(p, args, (("repeats", 3, 1), ("steps", 3, 2)))
    return args


def main_dp(args: argparse.Namespace) -> int:
    """`--nproc N`: rounds of (N data-parallel ranks, one process) with the same threads and
    sequence per process; the all-reduce's share of the step and its bandwidth."""
    n = args.nproc
    threads = max(1, args.threads // n)
    dec, enc = model_configs(args.quick)
    s = sizes(args.quick)
    one_args = argparse.Namespace(**{**vars(args), "threads": threads, "device": "cpu"})
    rounds: dict[str, list[dict]] = {"dp": [], "one": []}
    with tempfile.TemporaryDirectory(prefix="cepe_bench_train_dp_") as tmp:
        model_dir = args.model_dir or os.path.join(tmp, "model")
        scratch = os.path.join(tmp, "scratch")
        os.makedirs(scratch)
        ensure_cepe_model(model_dir, dec, enc, SEED, log)
        for r in range(args.repeats):
            for what in ("dp", "one") if r % 2 == 0 else ("one", "dp"):
                log(f"round {r + 1}/{args.repeats}: {what}")
                if what == "one":
                    res = run_child("cepe", one_args, model_dir, scratch)
                    rounds["one"].append([x["fwd_bwd_s"] + x["update_s"] for x in res["steps"][1:]])
                    continue
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
                cmd += [os.path.abspath(__file__), "--phase", "dp", "--scratch", scratch, "--model-dir", model_dir]
                cmd += ["--threads", str(threads), "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
                time.sleep(PAUSE_S)
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                if subprocess.run(cmd, stdout=sys.stderr, env=env).returncode != 0:
                    sys.exit("bench_train: the data-parallel run failed")
                with open(os.path.join(scratch, "dp.json")) as f:
                    rounds["dp"].append(json.load(f))
    dp_steps = [x for r in rounds["dp"] for x in r["steps"]]
    med = {k: statistics.median(x[k] for x in dp_steps) for k in ("step_s", "fwd_bwd_s", "wait_s", "allreduce_s")}
    one_s = statistics.median(t for r in rounds["one"] for t in r)
    nbytes = rounds["dp"][0]["buffer_bytes"]
    ar = [x["allreduce_s"] / x["step_s"] for x in dp_steps]
    result = {
        "benchmark": "bench_train --nproc",
        "quick": args.quick,
        "nproc": n,
        "threads_per_process": threads,
        "repeats": args.repeats,
        "timed_steps_per_run": args.steps,
        "sizes": {**s, "sequences_per_rank": 1, "global_batch": n},
        "buffer_bytes": nbytes,
        "n_trainable": rounds["dp"][0]["n_trainable"],
        "dp_median_s": med,
        "dp_steps": [{k: round(v, 4) for k, v in x.items()} for x in dp_steps],
        "allreduce_busbw_GBps": nbytes * 2 * (n - 1) / n / med["allreduce_s"] / 1e9,
        "one_process_step_s_median": one_s,
        "ratios": {
            "allreduce_over_step_median": statistics.median(ar),
            "allreduce_over_step_max": max(ar),
            "wait_over_step_median": med["wait_s"] / med["step_s"],
            "dp_step_over_one_process_step": med["step_s"] / one_s,
        },
        "target": {"allreduce_over_step": 0.05},
        "met": statistics.median(ar) < 0.05,
        "machine": {"cpu": cpu_model_name(), "cpus_usable": usable_cpus(), "loadavg_end": os.getloadavg()},
        "versions": {"git": git_state(), "python": platform.python_version(), "numpy": np.__version__},
    }
    print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase is not None:  # child process
        out = PHASES[args.phase](args)
        with open(os.path.join(args.scratch, f"{args.phase}.json"), "w") as f:
            json.dump(out, f)
        return 0
    if args.nproc is not None:
        if args.nproc < 1 or args.device != "cpu":
            sys.exit("bench_train: --nproc needs N >= 1 and runs on the CPU (gloo)")
        return main_dp(args)

    dec, enc = model_configs(args.quick)
    s = sizes(args.quick)
    tokens = s["decoder_tokens"] + s["n_ctx"] * s["ctx_len"]
    runs: dict[str, list[dict]] = {"cepe": [], "torch": []}
    with tempfile.TemporaryDirectory(prefix="cepe_bench_train_") as tmp:
        model_dir = args.model_dir or os.path.join(tmp, "model")
        scratch = os.path.join(tmp, "scratch")
        os.makedirs(scratch)
        ensure_cepe_model(model_dir, dec, enc, SEED, log)
        for r in range(args.repeats):
            order = ["cepe", "torch"] if r % 2 == 0 else ["torch", "cepe"]
            for engine in order:
                log(f"round {r + 1}/{args.repeats}: {engine}")
                runs[engine].append(run_child(engine, args, model_dir, scratch))
        breakdown = None
        if args.op_breakdown and not on_gpu(args) and args.dtype == "float32":  # the CPU's fp32 ops
            breakdown = {}
            for engine in ("cepe", "torch"):
                log(f"op breakdown: {engine}")
                res_ops = run_child(f"{engine}_ops", args, model_dir, scratch)
                load = res_ops.pop("load")
                breakdown[engine] = {**op_summary(res_ops), "load": load}

    res = {e: engine_summary(v, tokens) for e, v in runs.items()}
    work = step_flops(dec, enc, s)
    for r in res.values():
        r["gflops"] = work["total"] / r["best_step_s"] / 1e9
    c, t = res["cepe"], res["torch"]
    ratios = {
        "tok_s_cepe_over_torch": c["tok_s"] / t["tok_s"],
        "median_step_torch_over_cepe": t["median_step_s"] / c["median_step_s"],
        "peak_rss_cepe_over_torch": c["peak_rss"] / t["peak_rss"],
        "peak_above_weights_cepe_over_torch": c["peak_above_weights"] / max(t["peak_above_weights"], 1),
    }
    if c["gpu_process_bytes"] and t["gpu_process_bytes"]:
        ratios["gpu_process_bytes_cepe_over_torch"] = c["gpu_process_bytes"] / t["gpu_process_bytes"]
    first = {e: runs[e][0]["steps"][0] for e in runs}
    agreement = {
        "first_step_loss": {e: first[e]["loss"] for e in first},
        "first_step_loss_rel_diff": abs(first["cepe"]["loss"] - first["torch"]["loss"]) / abs(first["torch"]["loss"]),
        "first_step_grad_norm": {e: first[e]["grad_norm"] for e in first},
        "first_step_grad_norm_rel_diff": abs(first["cepe"]["grad_norm"] - first["torch"]["grad_norm"])
        / abs(first["torch"]["grad_norm"]),
        "trainable_params": {e: res[e]["n_trainable"] for e in res},
    }
    versions = {"git": git_state(), "python": platform.python_version(), "numpy": np.__version__}
    versions.update(runs["cepe"][0]["versions"])
    versions.update(runs["torch"][0]["versions"])
    counts = param_counts(dec, enc)
    result = {
        "benchmark": "bench_train",
        "quick": args.quick,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "torch_bf16": args.torch_bf16 if args.dtype == "bfloat16" else None,
        "repeats": args.repeats,
        "timed_steps_per_child": args.steps,
        "sizes": {**s, "tokens_per_step": tokens, "batch_rows": 1},
        "model": {
            "name": "CEPE: SmolLM2-135M-shaped decoder (tied) + 6-layer d512 encoder, cross-attn in every layer"
            if not args.quick
            else "CEPE quick: 4-layer SmolLM2-width decoder + 2-layer d512 encoder",
            "decoder": dec,
            "encoder": enc,
            "params": counts,
            "init": f"N(0, 0.02^2), norms 1, seed {SEED}, fp32 safetensors",
        },
        "method": {
            "step": "one optimizer step on 1 sequence: forward, loss (shifted CE, labels = decoder tokens), "
            "backward (decoder frozen), clip 1.0, AdamW, cosine lr",
            "tok_s": "(decoder + encoder tokens of the step) / step wall time; best of all timed steps of all "
            "children of the engine",
            "isolation": f"each engine in fresh child processes, alternating each round, {PAUSE_S:g} s pauses",
            "cepe": "cepe.Trainer(model, 'cross_attn+encoder').step(batch), timed as _accumulate "
            "(forward+backward) + the core's update (clip + AdamW)"
            + ("; cepe.load(dtype='bfloat16'): frozen decoder matrices in bf16" if args.dtype == "bfloat16" else ""),
            "torch": "the spec's model in torch (SDPA attention, GQA), decoder requires_grad False; "
            + runs["torch"][0]["optimizer"]
            + (
                {
                    "frozen": "; frozen decoder parameters in torch.bfloat16, each frozen product's input cast "
                    "to bf16 and its output to float32 (trained products float32)",
                    "autocast": "; frozen decoder parameters in torch.bfloat16, forward under torch.autocast(bfloat16)",
                }[args.torch_bf16]
                if args.dtype == "bfloat16"
                else ""
            ),
            "memory": "per child, /proc/self/status: peak_rss = VmHWM; peak_above_weights = VmHWM - VmRSS after "
            "imports - the weights' bytes as held (4 per parameter; 2 per frozen one with --dtype bfloat16)",
        },
        "work": {"flops": work, "gflop_per_step": work["total"] / 1e9},
        "machine": {"cpu": cpu_model_name(), "cpus_usable": usable_cpus(), "loadavg_end": os.getloadavg()},
        "results": res,
        "ratios": ratios,
        "targets": TARGETS,
        "met": {
            "tok_s_ratio_cepe_over_torch": ratios["tok_s_cepe_over_torch"] >= TARGETS["tok_s_ratio_cepe_over_torch"],
            "peak_rss_ratio_cepe_over_torch": ratios["peak_rss_cepe_over_torch"]
            <= TARGETS["peak_rss_ratio_cepe_over_torch"],
        },
        "agreement": agreement,
        "op_breakdown": breakdown,
        "other_load": {e: [r["load"] for r in runs[e]] for e in runs},
        "versions": versions,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "GOMP_"))},
    }
    os.makedirs(args.out, exist_ok=True)
    bf16 = {"frozen": "_bf16", "autocast": "_bf16_autocast"}[args.torch_bf16] if args.dtype == "bfloat16" else ""
    stem = "bench_train" + bf16 + ("_quick" if args.quick else "")
    result["plot"] = write_plot(result, os.path.join(args.out, f"{stem}.png"))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
