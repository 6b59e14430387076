#!/usr/bin/env python
"""Decoder throughput: cepe vs PyTorch/transformers on a SmolLM2-135M-shaped random LLaMA.

    python benchmarks/bench_decoder.py                 # full run, all CPUs
    python benchmarks/bench_decoder.py --quick         # smoke run (4 layers, short sequences)

Measures, in one run and with one thread count for everything:
  pp<P>   prefill of P tokens (default 512), tokens/s, computing only the last position's logits;
  tg<D>   greedy decode of D new tokens (default 128) after a 16-token prompt, tokens/s;
  and the machine's limits: float32 GEMM GFLOP/s and copy bandwidth (GB/s), from which prefill
  is reported as a fraction of GEMM peak and decode as a fraction of the bandwidth roofline.

Each engine (and the machine probe) runs in its own child process, one after the other: on a
small machine the idle-spinning thread pools of one library (OpenMP, OpenBLAS, MKL) otherwise
slow down the next one by up to ~10x for a while. The two engines alternate --rounds times
(default 2) and each one's timed runs are pooled, so a slow spell of the (shared) host does not
land on one engine only. The machine probe runs before and after the engines; the higher
figures are kept.

Then the paired prefill, which the pp target is judged on: both engines loaded at once in two
child processes, one prefill at a time alternating between them (--pairs runs each, 0.5 s
apart), so that the two runs of each pair see the same state of the host; the pp ratio is the
median of the pairs' time ratios (the ratio of the best times is reported beside it).

Prints one JSON object on stdout (progress goes to stderr) and writes a bar plot to --out
(bench_decoder.png; bench_decoder_quick.png with --quick). Each figure is the best of
rounds x --repeats timed runs, each round's after one untimed warm-up run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from _common import (
    SMOLLM2_135M,
    add_model_and_out_args,
    children_cpu_s,
    cpu_model_name,
    git_state,
    machine_busy_s,
    print_result,
    pyplot,
    save_figure,
    settle_counts,
    usable_cpus,
)

SEED = 1234
PROMPT_LEN = 16
PAUSE_S = 1.0  # between probes of different libraries, so their thread pools go idle
PAIR_PAUSE_S = 0.5  # between the paired prefill's runs (spinning OpenMP pools sleep within milliseconds)
ENGINES = ("cepe", "torch")

# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M), random weights.
FULL_CONFIG = SMOLLM2_135M
QUICK_LAYERS = 4

TARGETS = {
    "pp_ratio_cepe_over_torch": 1.3,
    "tg_ratio_cepe_over_torch": 1.5,
    "pp_frac_of_gemm_peak": 0.60,
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def time_runs(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def model_config(quick: bool) -> dict:
    cfg = dict(FULL_CONFIG)
    if quick:
        cfg["num_hidden_layers"] = QUICK_LAYERS
    return cfg


def inputs(vocab_size: int, prefill: int) -> tuple[np.ndarray, np.ndarray]:
    """The (1, prefill) ids of the prefill benchmark and the (1, PROMPT_LEN) decode prompt."""
    rng = np.random.default_rng(SEED)
    pp_ids = rng.integers(0, vocab_size, size=(1, prefill), dtype=np.int64)
    prompt = rng.integers(0, vocab_size, size=(1, PROMPT_LEN), dtype=np.int64)
    return pp_ids, prompt


# --------------------------------------------------------------------------- model and work


def ensure_model(model_dir: str, cfg_kwargs: dict) -> None:
    """Writes a random LLaMA with cfg_kwargs to model_dir (fp32 safetensors), or reuses it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg_path = os.path.join(model_dir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            saved = json.load(f)
        # rope_theta is saved under rope_parameters by transformers 5
        mismatched = {k: (saved.get(k), v) for k, v in cfg_kwargs.items() if k != "rope_theta" and saved.get(k) != v}
        if mismatched:
            sys.exit(
                f"--model-dir {model_dir} holds a different model ({{key: (saved, wanted)}}: {mismatched}); "
                "use another directory"
            )
        log(f"reusing the model in {model_dir}")
        return
    os.makedirs(model_dir, exist_ok=True)
    seed_everything(SEED)
    model = LlamaForCausalLM(LlamaConfig(**cfg_kwargs)).to(torch.float32).eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    log(f"wrote a random model ({n / 1e6:.1f}M parameters) to {model_dir}")


def model_shape(cfg: dict) -> dict:
    d, ff, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = d // cfg["num_attention_heads"]
    q_dim, kv_dim = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer_linear = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * ff
    return {
        "d": d,
        "layers": n_layers,
        "q_dim": q_dim,
        "kv_dim": kv_dim,
        "linear_params": n_layers * per_layer_linear,  # q, k, v, o, gate, up, down of all layers
        "norm_params": (2 * n_layers + 1) * d,
        "embedding_params": cfg["vocab_size"] * d,  # tied: also the lm_head
    }


def prefill_flops(s: dict, t: int) -> dict:
    linear = 2 * s["linear_params"] * t
    lm_head = 2 * s["embedding_params"]  # logits="last": one row
    # causal attention: QK^T and PV over t(t+1)/2 (query, key) pairs, 2*head_dim FLOPs each per
    # query head, i.e. 2 * 2 * q_dim FLOPs per pair and layer
    attention = s["layers"] * 2 * 2 * s["q_dim"] * t * (t + 1) // 2
    total = linear + lm_head + attention
    return {"linear": linear, "lm_head": lm_head, "attention": attention, "total": total}


def decode_bytes_per_token(s: dict, prompt: int, n_new: int) -> dict:
    weights = 4 * (s["linear_params"] + s["norm_params"] + s["embedding_params"] + s["d"])
    # K and V of every cached position, read once per layer, averaged over the decode steps
    mean_ctx = prompt + (n_new - 1) / 2
    kv = 4 * s["layers"] * 2 * s["kv_dim"] * mean_ctx
    return {"weights": weights, "kv_cache_mean": int(kv), "total": int(weights + kv)}


# --------------------------------------------------------------------------- phase: machine limits


def engine_blas_sgemm() -> Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None:
    """cblas_sgemm of the BLAS cepe_c links (oneMKL from the mkl wheel, or
    scipy-openblas32), via ctypes; None if not found."""
    try:
        import cepe_c  # loads the library, so the CDLL below is the same instance
    except ImportError:
        return None
    try:
        if cepe_c.blas_info().startswith("oneMKL"):
            import importlib.metadata as md

            dist = md.distribution("mkl")
            path = next(str(dist.locate_file(f)) for f in dist.files or [] if "libmkl_intel_lp64.so" in str(f))
            fn = ctypes.CDLL(path).cblas_sgemm
        else:
            import scipy_openblas32

            lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so"))
            fn = lib.scipy_cblas_sgemm
    except (ImportError, OSError, AttributeError, StopIteration):  # PackageNotFoundError is an ImportError
        return None
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    fn.restype = None

    def sgemm(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
        m, k = a.shape
        n = b.shape[1]
        # CblasRowMajor = 101, CblasNoTrans = 111
        fn(101, 111, 111, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, n, 0.0, c.ctypes.data, n)

    return sgemm


def with_peak(out: dict, suffix: str) -> dict:
    keys = [k for k in out if k.endswith(suffix)]
    best = max(keys, key=lambda k: out[k])
    out["peak" + suffix] = out[best]
    out["peak_source"] = best
    return out


def bench_gemm(n: int, threads: int, repeats: int) -> dict:
    import torch

    import cepe_c

    flops = 2.0 * n**3
    rng = np.random.default_rng(SEED)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    out: dict = {"size": [n, n, n], "flops": flops}
    runs = repeats + 2

    sgemm = engine_blas_sgemm()
    if sgemm is not None:
        cepe_c.set_blas_threads(threads)
        out["engine_blas_gflops"] = flops / min(time_runs(lambda: sgemm(a, b, c), runs)) / 1e9
        if not np.allclose(c[:4, :4], a[:4] @ b[:, :4], rtol=1e-3, atol=1e-2):
            raise RuntimeError("the engine BLAS's sgemm gave a wrong product")
        time.sleep(PAUSE_S)
    out["numpy_gflops"] = flops / min(time_runs(lambda: np.matmul(a, b, out=c), runs)) / 1e9
    time.sleep(PAUSE_S)
    torch.set_num_threads(threads)
    ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.empty(n, n)
    out["torch_mkl_gflops"] = flops / min(time_runs(lambda: torch.mm(ta, tb, out=tc), runs)) / 1e9
    return with_peak(out, "_gflops")


def bench_copy(mib: int, threads: int, repeats: int) -> dict:
    import torch

    src = np.ones(mib * 2**20 // 4, dtype=np.float32)
    dst = np.zeros_like(src)
    moved = 2.0 * src.nbytes  # read src + write dst (write-allocate traffic not counted)
    out: dict = {"array_mib": mib, "bytes_counted_per_copy": moved}
    runs = repeats + 2
    out["numpy_copyto_gbs"] = moved / min(time_runs(lambda: np.copyto(dst, src), runs)) / 1e9
    torch.set_num_threads(threads)
    ts, td = torch.from_numpy(src), torch.from_numpy(dst)
    out["torch_copy_gbs"] = moved / min(time_runs(lambda: td.copy_(ts), runs)) / 1e9
    return with_peak(out, "_gbs")


def figures(d: dict, suffix: str) -> str:
    return ", ".join(f"{k.removesuffix(suffix)} {v:.1f}" for k, v in d.items() if k.endswith(suffix))


def bench_gpu(gemm_n: int, copy_mib: int, device: str, repeats: int) -> tuple[dict, dict]:
    """The GPU's fp32 GEMM rate (torch.mm through cuBLAS, TF32 off: cepe's
    fp32 GEMMs use no TF32 either) and its device-to-device copy bandwidth,
    each timed with CUDA events."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device(device)

    def timed(fn: Callable[[], object]) -> float:
        fn()
        torch.cuda.synchronize(dev)
        best = float("inf")
        for _ in range(repeats + 2):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                fn()
            stop.record()
            stop.synchronize()
            best = min(best, start.elapsed_time(stop) / 1e3 / 10)
        return best

    n = gemm_n * 2  # a GPU needs a larger product to reach its rate
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    c = torch.empty(n, n, device=dev)
    gemm = {"size": [n, n, n], "flops": 2.0 * n**3}
    gemm["torch_cuda_fp32_gflops"] = gemm["flops"] / timed(lambda: torch.mm(a, b, out=c)) / 1e9
    src = torch.ones(copy_mib * 2**20 // 4, device=dev)
    dst = torch.empty_like(src)
    bw = {"array_mib": copy_mib, "bytes_counted_per_copy": 2.0 * src.numel() * 4}
    bw["torch_cuda_copy_gbs"] = bw["bytes_counted_per_copy"] / timed(lambda: dst.copy_(src)) / 1e9
    return with_peak(gemm, "_gflops"), with_peak(bw, "_gbs")


def phase_machine(args: argparse.Namespace) -> dict:
    gemm_n, copy_mib = (512, 32) if args.quick else (2048, 256)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: this torch build sees no GPU, so the GPU's peaks cannot be measured")
        gemm, bw = bench_gpu(gemm_n, copy_mib, args.device, args.repeats)
        log(f"GPU sgemm GFLOP/s: {figures(gemm, '_gflops')}; copy GB/s: {figures(bw, '_gbs')}")
        return {"sgemm": gemm, "copy_bandwidth": bw}
    gemm = bench_gemm(gemm_n, args.threads, args.repeats)
    log(f"sgemm {gemm_n}^3 GFLOP/s: {figures(gemm, '_gflops')}")
    time.sleep(PAUSE_S)
    bw = bench_copy(copy_mib, args.threads, args.repeats)
    log(f"copy {copy_mib} MiB GB/s: {figures(bw, '_gbs')}")
    return {"sgemm": gemm, "copy_bandwidth": bw}


# --------------------------------------------------------------------------- phases: engines


def summarize(times: list[float], tokens: int) -> dict:
    best = min(times)
    return {
        "tok_s": tokens / best,
        "best_s": best,
        "median_s": statistics.median(times),
        "times_s": [round(t, 4) for t in times],
    }


def decode_stats(gen: Callable[[int], object], args: argparse.Namespace) -> dict:
    tg = summarize(time_runs(lambda: gen(args.decode), args.repeats), args.decode)
    t1 = min(time_runs(lambda: gen(1), args.repeats))
    tg["prompt_plus_1_token_s"] = t1
    tg["tok_s_excl_prompt"] = (args.decode - 1) / max(tg["best_s"] - t1, 1e-9)
    return tg


def merge_rounds(results: list[dict], args: argparse.Namespace) -> dict:
    """One engine's figures over all rounds: every timed run pooled, best and
    median taken over the pool; each round's own figures kept under "rounds"."""
    out = dict(results[-1])
    out["pp"] = summarize([t for r in results for t in r["pp"]["times_s"]], args.prefill)
    tg = summarize([t for r in results for t in r["tg"]["times_s"]], args.decode)
    tg["prompt_plus_1_token_s"] = min(r["tg"]["prompt_plus_1_token_s"] for r in results)
    tg["tok_s_excl_prompt"] = (args.decode - 1) / max(tg["best_s"] - tg["prompt_plus_1_token_s"], 1e-9)
    out["tg"] = tg
    out["rounds"] = [{"pp_tok_s": r["pp"]["tok_s"], "tg_tok_s": r["tg"]["tok_s"]} for r in results]
    return out


def cepe_engine(args: argparse.Namespace) -> tuple[object, Callable[[], object], float]:
    """(model, prefill callable, load seconds) of cepe."""
    import cepe

    pp_ids, _ = inputs(model_config(args.quick)["vocab_size"], args.prefill)
    t0 = time.perf_counter()
    m = cepe.load(args.model_dir, n_threads=args.threads, device=args.device)
    return m, lambda: m.forward(pp_ids, logits="last"), time.perf_counter() - t0


def phase_cepe(args: argparse.Namespace) -> dict:
    import cepe
    import cepe_c

    _, prompt = inputs(model_config(args.quick)["vocab_size"], args.prefill)
    m, prefill, load_s = cepe_engine(args)
    log(f"cepe: {m}")

    pp = summarize(time_runs(prefill, args.repeats), args.prefill)
    log(f"cepe pp{args.prefill}: {pp['tok_s']:.1f} tok/s")
    logits = prefill()[0]

    def gen(n: int) -> np.ndarray:
        return m.generate(prompt, n, eos_token_id=[])

    tg = decode_stats(gen, args)
    log(f"cepe tg{args.decode}: {tg['tok_s']:.1f} tok/s")
    np.savez(os.path.join(args.scratch, "cepe.npz"), logits=logits, tokens=np.asarray(gen(args.decode))[0])
    return {
        "load_s": load_s,
        "pp": pp,
        "tg": tg,
        "versions": {"cepe": cepe.__version__, "blas": cepe_c.blas_info().strip()},
    }


def torch_engine(args: argparse.Namespace) -> tuple[object, Callable[[], object], float, dict]:
    """(model, prefill callable, load seconds, facts) of transformers: the callable runs under
    torch.inference_mode() and waits for the GPU."""
    import inspect

    import torch
    from transformers import LlamaForCausalLM

    pp_ids, _ = inputs(model_config(args.quick)["vocab_size"], args.prefill)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    # --device cuda: torch on the GPU too when its build has CUDA (else its CPU numbers, said in the JSON)
    dev = "cuda" if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    hf = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval().to(dev)
    load_s = time.perf_counter() - t0
    ids = torch.from_numpy(pp_ids).to(dev)
    has_keep = "logits_to_keep" in inspect.signature(hf.forward).parameters
    kw = {"logits_to_keep": 1} if has_keep else {}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)  # GPU work is asynchronous

    def prefill() -> object:
        with torch.inference_mode():
            out = hf(ids, **kw)
        sync()
        return out

    facts = {"device": dev, "has_keep": has_keep}
    return hf, prefill, load_s, facts


def phase_torch(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    _, prompt = inputs(model_config(args.quick)["vocab_size"], args.prefill)
    hf, prefill, load_s, facts = torch_engine(args)
    dev, has_keep = facts["device"], facts["has_keep"]
    hf.generation_config.pad_token_id = 0
    p_ids = torch.from_numpy(prompt).to(dev)
    mask = torch.ones_like(p_ids)
    attn = hf.config._attn_implementation
    log(f"torch: attn_implementation={attn}, threads={torch.get_num_threads()}, logits_to_keep={has_keep}")

    pp = summarize(time_runs(prefill, args.repeats), args.prefill)
    log(f"torch pp{args.prefill}: {pp['tok_s']:.1f} tok/s")
    with torch.inference_mode():
        logits = prefill().logits[0, -1].float().cpu().numpy()

        def gen(n: int) -> torch.Tensor:
            return hf.generate(p_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        tg = decode_stats(gen, args)
        log(f"torch tg{args.decode}: {tg['tok_s']:.1f} tok/s")
        tokens = gen(args.decode)[0, PROMPT_LEN:].cpu().numpy()
    np.savez(os.path.join(args.scratch, "torch.npz"), logits=logits, tokens=tokens)
    return {
        "load_s": load_s,
        "pp": pp,
        "tg": tg,
        "attn_implementation": attn,
        "device": dev,
        "prefill_call": f"hf(ids{', logits_to_keep=1' if has_keep else ''}) under torch.inference_mode() "
        "(use_cache left at its default)",
        "generate_call": "hf.generate(prompt, attention_mask=ones, max_new_tokens=D, min_new_tokens=D, "
        "do_sample=False) under torch.inference_mode()",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


PHASES = {"machine": phase_machine, "cepe": phase_cepe, "torch": phase_torch}


def run_phase(phase: str, args: argparse.Namespace, model_dir: str, scratch: str) -> tuple[dict, dict]:
    """Runs one phase in a fresh Python process; returns the dict it wrote, and how busy the
    machine was meanwhile with work other than this benchmark (other_load: CPUs, on average)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--scratch", scratch]
    cmd += ["--model-dir", model_dir, "--threads", str(args.threads), "--repeats", str(args.repeats)]
    cmd += ["--prefill", str(args.prefill), "--decode", str(args.decode), "--device", args.device]
    cmd += ["--quick"] if args.quick else []
    time.sleep(PAUSE_S)
    busy0, own0, t0 = machine_busy_s(), children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, stdout=sys.stderr)
    busy1, own1, wall = machine_busy_s(), children_cpu_s(), time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench_decoder: the {phase} phase failed (exit status {proc.returncode})")
    load: dict = {"wall_s": round(wall, 2), "own_cpu_s": round(own1 - own0, 2)}
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0) - (own1 - own0))
        load["other_cpu_s"] = round(other, 2)
        load["other_load"] = round(other / wall, 3)
        if load["other_load"] > 0.1:
            log(
                f"warning: other processes kept {load['other_load']:.2f} CPUs busy on average during the "
                f"{phase} phase; its figures are contended"
            )
    with open(os.path.join(scratch, f"{phase}.json")) as f:
        return json.load(f), load


# --------------------------------------------------------------------------- paired prefill


def serve_prefill(args: argparse.Namespace) -> None:
    """Child process of the paired prefill: loads one engine, warms it up, says "ready", then
    times one prefill per "run" line on stdin. Answers "<seconds> <CPU seconds of the run>
    <CPU seconds since its previous answer>" (CPU time: all of the process's threads)."""
    if args.serve == "cepe":
        _, prefill, _ = cepe_engine(args)
    else:
        _, prefill, _, _ = torch_engine(args)
    for _ in range(2):
        prefill()
    print("ready", flush=True)
    last = time.process_time()
    for line in sys.stdin:
        if line.strip() != "run":
            break
        c0, t0 = time.process_time(), time.perf_counter()
        prefill()
        dt, c1 = time.perf_counter() - t0, time.process_time()
        print(f"{dt!r} {c1 - c0!r} {c0 - last!r}", flush=True)
        last = c1


def paired_prefill(args: argparse.Namespace, model_dir: str) -> dict:
    """Both engines loaded at once in two child processes, their prefills alternating one at a
    time (cepe first in even pairs, torch first in odd ones) with PAIR_PAUSE_S before each run,
    so that the two runs of a pair see the same state of the host (its speed drifts over
    minutes). An idle child only waits on its pipe; the CPU time each spent between its runs
    (`idle_cpu_s`: thread pools spinning down) is reported, as is the rest of the machine's."""
    base = [sys.executable, os.path.abspath(__file__), "--model-dir", model_dir, "--threads", str(args.threads)]
    base += ["--prefill", str(args.prefill), "--device", args.device] + (["--quick"] if args.quick else [])
    procs = {
        e: subprocess.Popen(base + ["--serve", e], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for e in ENGINES
    }
    times: dict[str, list[float]] = {e: [] for e in ENGINES}
    run_cpu = dict.fromkeys(ENGINES, 0.0)
    idle_cpu = dict.fromkeys(ENGINES, 0.0)
    try:
        for e, p in procs.items():
            if p.stdout is None or p.stdout.readline().strip() != "ready":
                sys.exit(f"bench_decoder: the paired {e} prefill process failed to start")
        busy0, t_start = machine_busy_s(), time.perf_counter()
        for i in range(args.pairs):
            for e in ENGINES if i % 2 == 0 else ENGINES[::-1]:
                time.sleep(PAIR_PAUSE_S)
                p = procs[e]
                assert p.stdin is not None and p.stdout is not None
                p.stdin.write("run\n")
                p.stdin.flush()
                reply = p.stdout.readline().split()
                if len(reply) != 3:
                    sys.exit(f"bench_decoder: the paired {e} prefill process stopped")
                times[e].append(float(reply[0]))
                run_cpu[e] += float(reply[1])
                idle_cpu[e] += float(reply[2]) if len(times[e]) > 1 else 0.0  # the first: since warm-up
        busy1, wall = machine_busy_s(), time.perf_counter() - t_start
    finally:
        for p in procs.values():
            if p.stdin is not None:
                p.stdin.close()
            p.wait(timeout=60)
    ratios = [t / c for c, t in zip(times["cepe"], times["torch"], strict=True)]
    out: dict = {
        "pairs": args.pairs,
        "pause_s": PAIR_PAUSE_S,
        "cepe": summarize(times["cepe"], args.prefill),
        "torch": summarize(times["torch"], args.prefill),
        "ratio_of_bests": min(times["torch"]) / min(times["cepe"]),
        "median_of_pair_ratios": statistics.median(ratios),
        "quartiles_of_pair_ratios": [round(q, 4) for q in statistics.quantiles(ratios, n=4)] if len(ratios) > 1 else [],
        "pair_ratios": [round(r, 4) for r in ratios],
        "idle_cpu_s": {e: round(v, 3) for e, v in idle_cpu.items()},
        "wall_s": round(wall, 2),
    }
    if busy0 is not None and busy1 is not None:
        # the first idle interval (from warm-up to the first run) is not in idle_cpu: a slight overestimate
        other = max(0.0, (busy1 - busy0) - sum(run_cpu.values()) - sum(idle_cpu.values()))
        out["other_load"] = round(other / wall, 3)
        if out["other_load"] > 0.1:
            log(f"warning: other processes kept {out['other_load']:.2f} CPUs busy during the paired prefill")
    return out


# --------------------------------------------------------------------------- report


def merge_machine(runs: list[dict]) -> dict:
    """The higher of each figure over the probe runs (before and after the engines)."""
    out = {}
    for key, suffix in (("sgemm", "_gflops"), ("copy_bandwidth", "_gbs")):
        merged = dict(runs[0][key])
        for r in runs[1:]:
            for k, v in r[key].items():
                if k.endswith(suffix) and not k.startswith("peak"):
                    merged[k] = max(merged.get(k, 0.0), v)
        merged = with_peak({k: v for k, v in merged.items() if not k.startswith("peak")}, suffix)
        merged["per_run"] = [
            {k: round(v, 2) for k, v in r[key].items() if k.endswith(suffix) and not k.startswith("peak")} for r in runs
        ]
        out[key] = merged
    return out


def agreement(scratch: str) -> dict:
    c, t = np.load(os.path.join(scratch, "cepe.npz")), np.load(os.path.join(scratch, "torch.npz"))
    tc, tt = c["tokens"], t["tokens"]
    same = len(tc) if np.array_equal(tc, tt) else int(np.argmin(tc == tt))
    return {
        "pp_last_logits_max_abs_diff": float(np.max(np.abs(c["logits"] - t["logits"]))),
        "pp_last_logits_max_abs": float(np.max(np.abs(t["logits"]))),
        "pp_argmax_equal": bool(np.argmax(c["logits"]) == np.argmax(t["logits"])),
        "tg_greedy_tokens_identical_prefix": same,
    }


def write_plot(result: dict, path: str) -> str | None:
    plt = pyplot(log)
    if plt is None:
        return None
    r, roof = result["results"], result["roofline"]
    panels = [
        (f"pp{result['prefill_tokens']} (prefill)", "pp", roof["pp_tok_s_at_gemm_peak"], "at GEMM peak"),
        (f"tg{result['decode_tokens']} (decode)", "tg", roof["tg_tok_s_at_bandwidth"], "bandwidth roofline"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, (title, key, limit, limit_label) in zip(axes, panels, strict=True):
        src = result["paired_prefill"] if key == "pp" else {e: r[e][key] for e in ENGINES}
        vals = [src["cepe"]["tok_s"], src["torch"]["tok_s"]]
        bars = ax.bar(["cepe", "torch"], vals, color=["tab:blue", "tab:orange"])
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
        ax.axhline(limit, color="gray", ls="--", lw=1)
        ax.annotate(f"{limit_label}: {limit:.0f}", (1.45, limit), ha="right", va="bottom", color="gray", fontsize=8)
        ax.set_ylim(0, max(*vals, limit) * 1.15)
        ax.set_title(f"{title}: cepe/torch = {result['ratios'][f'{key}_cepe_over_torch']:.2f}x", fontsize=10)
        ax.set_ylabel("tokens/s")
    machine = f"{result['threads']} threads, {result['machine']['cpu']}"
    return save_figure(fig, path, f"{result['model']['name']}\n{machine}")


def report(
    args: argparse.Namespace, cfg: dict, machine: dict, cepe: dict, torch: dict, agree: dict, paired: dict
) -> dict:
    shape = model_shape(cfg)
    fl = prefill_flops(shape, args.prefill)
    by = decode_bytes_per_token(shape, PROMPT_LEN, args.decode)
    peak_gflops = machine["sgemm"]["peak_gflops"]
    peak_gbs = machine["copy_bandwidth"]["peak_gbs"]
    tg_roof = peak_gbs * 1e9 / by["total"]
    for r in (cepe, torch):
        r["pp"]["gflops"] = fl["total"] / r["pp"]["best_s"] / 1e9
        r["pp"]["frac_of_gemm_peak"] = r["pp"]["gflops"] / peak_gflops
        r["tg"]["gbs_effective"] = r["tg"]["tok_s"] * by["total"] / 1e9
        r["tg"]["frac_of_bw_roofline"] = r["tg"]["tok_s"] / tg_roof
        r["tg"]["frac_of_bw_roofline_excl_prompt"] = r["tg"]["tok_s_excl_prompt"] / tg_roof
    ratios = {
        # judged on the paired prefill's typical ratio: a ratio of bests follows the fastest single
        # run of each engine, an extreme of a noisy distribution (reported beside it)
        "pp_cepe_over_torch": paired["median_of_pair_ratios"],
        "pp_paired_ratio_of_bests": paired["ratio_of_bests"],
        "pp_paired_median_of_pair_ratios": paired["median_of_pair_ratios"],
        "pp_rounds_ratio_of_bests": cepe["pp"]["tok_s"] / torch["pp"]["tok_s"],
        "tg_cepe_over_torch": cepe["tg"]["tok_s"] / torch["tg"]["tok_s"],
        "tg_excl_prompt_cepe_over_torch": cepe["tg"]["tok_s_excl_prompt"] / torch["tg"]["tok_s_excl_prompt"],
    }
    met = {
        "pp_ratio_cepe_over_torch": ratios["pp_cepe_over_torch"] >= TARGETS["pp_ratio_cepe_over_torch"],
        "tg_ratio_cepe_over_torch": ratios["tg_cepe_over_torch"] >= TARGETS["tg_ratio_cepe_over_torch"],
        "pp_frac_of_gemm_peak": cepe["pp"]["frac_of_gemm_peak"] >= TARGETS["pp_frac_of_gemm_peak"],
    }
    versions = {"git": git_state(), "python": platform.python_version(), "numpy": np.__version__}
    versions.update(cepe.pop("versions"))
    versions.update(torch.pop("versions"))
    method = {
        "isolation": "machine probe, cepe and torch each run in a fresh child process, one after another "
        f"with {PAUSE_S:g} s pauses; the machine probe runs before and after the engines, the higher "
        "figure of each kept",
        "pp": "time of one forward over (1, P) random ids; cepe: m.forward(ids, logits='last'); "
        f"torch: {torch.pop('prefill_call')}; tok/s = P / time",
        "pp_ratio": "pp_cepe_over_torch (what the target is judged on) is the median of the paired prefill's "
        "pair ratios (torch time / cepe time of two adjacent runs): both engines loaded in two child processes, "
        f"one run at a time alternating ({PAIR_PAUSE_S:g} s before each run, cepe first in even pairs and torch "
        "first in odd ones), `pairs` runs each. Also reported: its quartiles, the ratio of the two engines' best "
        "paired times (pp_paired_ratio_of_bests), and best to best over the per-round phases, the engines "
        "minutes apart (pp_rounds_ratio_of_bests)",
        "tg": f"time of a whole greedy generate of D new tokens after a {PROMPT_LEN}-token prompt (prompt "
        "prefill included, same for both); tok/s = D / time. cepe: m.generate(prompt, D, eos_token_id=[]); "
        f"torch: {torch.pop('generate_call')}. tok_s_excl_prompt = (D-1) / (time(D) - time(1 new token))",
        "torch_attn_implementation": torch.pop("attn_implementation"),
        "prefill_flops": "2*linear_params*P (q,k,v,o,gate,up,down of all layers) + 2*vocab*hidden (lm_head, "
        "last token only) + layers*2*2*n_heads*head_dim*P(P+1)/2 (causal QK^T and PV); norms, RoPE, "
        "softmax, SiLU ignored",
        "decode_bytes_per_token": "4*(linear_params + norm_params + vocab*hidden [tied lm_head, read once] "
        "+ hidden [embedding row]) + mean KV-cache bytes read (4*layers*2*kv_dim*mean context)",
        "gemm_peak": "max GFLOP/s of float32 C = A @ B at the given size over: the BLAS cepe_c links "
        "(oneMKL or scipy-openblas32 cblas_sgemm via ctypes, `threads` threads), numpy's bundled OpenBLAS (its "
        "default thread count), torch.mm (MKL, `threads` threads)",
        "gpu_peaks": "with --device cuda the GEMM peak is torch.mm of fp32 square matrices on the GPU (TF32 off) "
        "and the bandwidth a device-to-device torch copy_, both timed with CUDA events",
        "bandwidth": "max over numpy.copyto (1 thread) and torch copy_ (`threads` threads) of a large "
        "float32 array; bytes = read + write (2 x array size), write-allocate traffic not counted",
    }
    return {
        "benchmark": "bench_decoder",
        "quick": args.quick,
        "threads": args.threads,
        "device": args.device,
        "prefill_tokens": args.prefill,
        "decode_tokens": args.decode,
        "decode_prompt_tokens": PROMPT_LEN,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "statistic": "best (minimum time) of `repeats` timed runs, after 1 untimed warm-up run",
        "model": {
            "name": f"SmolLM2-135M-shaped LLaMA, random weights (seed {SEED}), fp32 safetensors",
            "config": cfg,
            "params_total": shape["linear_params"] + shape["norm_params"] + shape["embedding_params"],
            "params_linear": shape["linear_params"],
            "params_embedding_tied_lm_head": shape["embedding_params"],
        },
        "method": method,
        "machine": {"cpu": cpu_model_name(), "cpus_usable": usable_cpus(), **machine},
        "work": {"prefill_flops": fl, "decode_bytes_per_token": by},
        "roofline": {
            "pp_tok_s_at_gemm_peak": peak_gflops * 1e9 / (fl["total"] / args.prefill),
            "tg_tok_s_at_bandwidth": tg_roof,
        },
        "results": {"cepe": cepe, "torch": torch},
        "paired_prefill": paired,
        "ratios": ratios,
        "targets": TARGETS,
        "met": met,
        "agreement": agree,
        "versions": versions,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "GOMP_"))},
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="threads for both engines (default: all CPUs)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure, best kept (default 3)")
    add_model_and_out_args(p)
    p.add_argument("--prefill", type=int, default=None, help="prefill length (default 512)")
    p.add_argument("--decode", type=int, default=None, help="new tokens to decode (default 128)")
    p.add_argument(
        "--device",
        default="cpu",
        help="cepe device: cpu, cuda or cuda:N (torch runs on the GPU too when its build has CUDA)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="cepe and torch phases alternate this many times, runs pooled (default 2; the host's speed drifts)",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="paired prefill: runs per engine, both engines loaded, alternating one run at a time (default 30)",
    )
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_LAYERS} layers, pp64, tg16, 1 repeat")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)  # internal: child process
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--serve", choices=ENGINES, help=argparse.SUPPRESS)  # internal: paired prefill child
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = usable_cpus()
    settle_counts(
        p, args, (("repeats", 3, 1), ("rounds", 2, 1), ("pairs", 30, 4), ("prefill", 512, 64), ("decode", 128, 16))
    )
    max_pos = FULL_CONFIG["max_position_embeddings"]
    if args.prefill > max_pos or PROMPT_LEN + args.decode > max_pos:
        p.error(f"--prefill and {PROMPT_LEN} + --decode must be <= {max_pos}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:  # child process of the paired prefill
        serve_prefill(args)
        return 0
    if args.phase is not None:  # child process: run one phase, write its JSON to the scratch dir
        seed_everything(SEED)
        out = PHASES[args.phase](args)
        with open(os.path.join(args.scratch, f"{args.phase}.json"), "w") as f:
            json.dump(out, f)
        return 0

    cfg = model_config(args.quick)
    with tempfile.TemporaryDirectory(prefix="cepe_bench_") as tmp:
        model_dir = args.model_dir or os.path.join(tmp, "model")
        scratch = os.path.join(tmp, "scratch")
        os.makedirs(scratch)
        ensure_model(model_dir, cfg)
        load = {}
        machine_before, load["machine_before"] = run_phase("machine", args, model_dir, scratch)
        rounds: dict[str, list[dict]] = {"cepe": [], "torch": []}
        for r in range(args.rounds):  # alternating, so a slow spell of the host hits both engines
            for engine in ("cepe", "torch"):
                res, load[f"{engine}_{r + 1}"] = run_phase(engine, args, model_dir, scratch)
                rounds[engine].append(res)
        res_cepe, res_torch = merge_rounds(rounds["cepe"], args), merge_rounds(rounds["torch"], args)
        time.sleep(PAUSE_S)
        log(f"paired prefill: {args.pairs} runs each, alternating")
        paired = paired_prefill(args, model_dir)
        pc, pt = paired["cepe"]["tok_s"], paired["torch"]["tok_s"]
        log(
            f"paired pp{args.prefill}: cepe {pc:.1f}, torch {pt:.1f} tok/s; ratio of bests "
            f"{paired['ratio_of_bests']:.3f}, median of pair ratios {paired['median_of_pair_ratios']:.3f}"
        )
        machine_after, load["machine_after"] = run_phase("machine", args, model_dir, scratch)
        agree = agreement(scratch)

    machine = merge_machine([machine_before, machine_after])
    result = report(args, cfg, machine, res_cepe, res_torch, agree, paired)
    result["other_load"] = {
        "what": "per phase: wall time, CPU seconds of the phase's process, CPU seconds the rest of the "
        "machine used meanwhile (/proc/stat minus ours), and that as an average number of busy CPUs; "
        "well above 0 means the figures of that phase are contended",
        **load,
    }
    return print_result(result, args.out, "bench_decoder_quick.png" if args.quick else "bench_decoder.png", write_plot)


if __name__ == "__main__":
    sys.exit(main())
