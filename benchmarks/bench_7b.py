#!/usr/bin/env python
"""A LLaMA-2-7B-shaped CEPE model on the CPU: load time, peak RSS, decode tokens/s and a CEPE
forward (2K decoder tokens, 8K context tokens), from three forms of the same random weights.

    python benchmarks/bench_7b.py --dir /data/cepe7b                    # the full model (8.5B parameters)
    python benchmarks/bench_7b.py --dir /tmp/cepe7b-s16 --scale 16      # 32/16 = 2 decoder layers, 24/16 -> 2 encoder

The model is the official CEPE layout (spec CEPE.md 1.3): decoder 32 x 4096 (LLaMA-2-7B: 32 heads,
intermediate 11008, vocab 32000), encoder 24 x 1024 (16 heads, intermediate 4096, vocab 32001),
cross-attention in every decoder layer; N(0, 0.02^2) weights, unit norms. --scale S divides the
layer counts by S (widths kept), so the script runs on a small machine. Written once under --dir
(never inside the repository), reused by later runs:
- whole-bf16/: the whole model as bf16 safetensors (one shard per layer, an index);
- q8_0/:  `cepe quantize --type q8_0` of it: decoder.gguf (Q8_0) + the bf16 head (config.json, head.safetensors);
- q4_k/:  a bf16 decoder.gguf from `cepe quantize --type bf16`, requantized by llama.cpp's
  `llama-quantize ... Q4_K_M` (gguf.quants has no Q4_K quantizer; built by bench_llamacpp.py's
  build_tools under --llcpp-cache) + the same bf16 head.

Each measurement runs in a process of its own (peak RSS: that child's VmHWM, read after the load
and after the measurement, the high-water mark restarted in between):
  load    cepe.load(path): seconds, peak RSS (the other two report their load's as well);
  decode  tokens/s of a greedy decode of --gen tokens after a 16-token prompt;
  cepe    forward of --dec-tokens decoder tokens (logits of the last position) with --ctx-tokens
          context tokens in 256-token encoder chunks: seconds, peak RSS.

Before running a form, its peak is estimated; a form whose estimate exceeds the memory the
machine has available (MemAvailable, less --headroom-gb) is reported as not run instead of
driving the machine into swap. The estimate comes from two probes of this shape in the same
form, with 1 and 2 decoder layers and 1 encoder layer (written under --dir/probe and
--dir/probe2), each measured as the cepe child above: a straight line through the two gives
a fixed part and a per-decoder-layer part of the loaded weights, of the load's peak and of
the forward's growth over the loaded model (its K/V, scratch, weight pages first touched),
extended to the model's decoder layers; the encoder's further layers add their parameters at
2 bytes each (the encoder is bf16 in every form). The JSON reports the fitted parts.
Targets (at --scale 1): bf16 peak <= 20 GB; Q4_K decoder + bf16 head <= 9 GB. Prints one
JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from _common import cepe_tensors, cpu_model_name, emit_json, git_state, llama_shape, official_config, usable_cpus

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9
DECODER = llama_shape(  # LLaMA-2-7B
    vocab=32000, hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=32, eps=1e-5, theta=10000.0, max_pos=4096,
    tied=False,
)  # fmt: skip
ENCODER = llama_shape(  # the official CEPE encoder
    vocab=32001, hidden=1024, ffn=4096, layers=24, heads=16, kv_heads=16, eps=1e-6, theta=10000.0, max_pos=512,
    tied=True,
)  # fmt: skip
FORMS = ("whole-bf16", "q4_k", "q8_0")
TARGETS_GB = {"whole-bf16": 20.0, "q4_k": 9.0}
CHUNK = 256
SEED = 7


def log(msg: str) -> None:
    print(f"[bench_7b] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="where the model files go (outside the repository)")
    p.add_argument("--scale", type=int, default=1, help="divide the layer counts by this (1: the full model)")
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gen", type=int, default=16, help="decoded tokens")
    p.add_argument("--dec-tokens", type=int, default=2048)
    p.add_argument("--ctx-tokens", type=int, default=8192)
    p.add_argument("--headroom-gb", type=float, default=1.5)
    p.add_argument("--llcpp-cache", default=os.path.join("~", ".cache", "cepe", "llcpp"))
    p.add_argument("--estimate-only", action="store_true", help="measure the probe, estimate, write and run nothing")
    p.add_argument(
        "--measure",
        default="load,decode,cepe",
        help="the children to run per form, in this order (of load,decode,cepe)",
    )
    p.add_argument("--probes-from", help="reuse the probes of an earlier run's JSON (same --dir, same engine)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--worker", nargs=2, metavar=("WHAT", "PATH"), help=argparse.SUPPRESS)
    return p.parse_args()


# ------------------------------------------------------------------ the model files


def shapes(scale: int, dec_layers: int | None = None, enc_layers: int | None = None) -> tuple[dict, dict]:
    dec = {**DECODER, "num_hidden_layers": dec_layers or max(1, DECODER["num_hidden_layers"] // scale)}
    enc = {**ENCODER, "num_hidden_layers": enc_layers or max(1, round(ENCODER["num_hidden_layers"] / scale))}
    return dec, enc


def n_params(dec: dict, enc: dict) -> int:
    return sum(math.prod(s) for s in cepe_tensors(dec, enc).values())


def write_whole(path: str, dec: dict, enc: dict) -> None:
    """Random weights as bf16 safetensors shards (one per layer, so no more than a layer is in memory)."""
    from cepe.safetensors_io import write_safetensors

    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in cepe_tensors(dec, enc).items():
        parts = name.split(".")
        key = f"{parts[0]}-{parts[2]}" if parts[1] == "layers" else f"{parts[0]}-rest"
        groups.setdefault(key, {})[name] = shape
    rng = np.random.default_rng(SEED)
    index: dict[str, str] = {}
    for i, (key, group) in enumerate(groups.items()):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            n: np.ones(s, np.float32) if n.endswith("norm.weight") else rng.standard_normal(s, np.float32) * 0.02
            for n, s in group.items()
        }
        write_safetensors(os.path.join(tmp, shard), tensors, "bfloat16")
        index.update(dict.fromkeys(group, shard))
        log(f"  {shard} ({key})")
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(official_config(dec, enc), f, indent=1)
    os.replace(tmp, path)


def write_q4k(root: str, llcpp_cache: str) -> None:
    """bf16 decoder.gguf (cepe quantize) -> Q4_K_M (llama-quantize), beside the bf16 head."""
    from bench_llamacpp import build_tools

    from cepe.quantize import DECODER_FILE, quantize

    tmp = os.path.join(root, "q4_k.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    quantize(os.path.join(root, "whole-bf16"), tmp, "bf16")
    tools = build_tools(os.path.abspath(os.path.expanduser(llcpp_cache)))
    bf16 = os.path.join(tmp, "bf16.gguf")
    os.rename(os.path.join(tmp, DECODER_FILE), bf16)
    cmd = [tools["llama-quantize"], bf16, os.path.join(tmp, DECODER_FILE), "Q4_K_M", "2"]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    os.unlink(bf16)
    os.replace(tmp, os.path.join(root, "q4_k"))


def ensure_model(root: str, dec: dict, enc: dict, forms: list[str], llcpp_cache: str) -> dict[str, str]:
    from cepe.quantize import quantize

    os.makedirs(root, exist_ok=True)
    whole = os.path.join(root, "whole-bf16")
    cfg_path = os.path.join(whole, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            if json.load(f) != official_config(dec, enc):
                sys.exit(f"{whole} holds another model: use another --dir")
    else:
        log(f"writing {whole} ({n_params(dec, enc) / 1e9:.2f}B parameters, bf16)")
        write_whole(whole, dec, enc)
    paths = {"whole-bf16": whole}
    for form in forms:
        path = os.path.join(root, form)
        paths[form] = path
        if form == "whole-bf16" or os.path.exists(path):
            continue
        start = time.perf_counter()
        if form == "q8_0":
            quantize(whole, path, "q8_0")
        else:
            write_q4k(root, llcpp_cache)
        log(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    return paths


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ------------------------------------------------------------------ measuring


def status(key: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM: the peak RSS) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    """Restarts VmHWM from the current RSS (Linux >= 4.0), so the next peak is the measurement's own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(what: str, path: str, a: argparse.Namespace) -> None:
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import cepe

    base = status("VmRSS")
    start = time.perf_counter()
    model = cepe.load(path, n_threads=a.threads)
    out: dict = {"load_s": time.perf_counter() - start, "rss_base": base}
    out.update(load_peak=status("VmHWM"), rss_loaded=status("VmRSS"))
    reset_peak()
    rng = np.random.default_rng(0)
    if what == "decode":
        prompt = rng.integers(3, 32000, size=(1, 16))
        model.generate(prompt, 2, eos_token_id=[])  # warm-up
        start = time.perf_counter()
        model.generate(prompt, a.gen, eos_token_id=[])
        out["decode_tok_s"] = a.gen / (time.perf_counter() - start)
    elif what == "cepe":
        ids = rng.integers(3, 32000, size=(1, a.dec_tokens))
        chunks = rng.integers(3, 32000, size=(a.ctx_tokens // CHUNK, CHUNK))
        start = time.perf_counter()
        # recomputed cross-attention K/V: what the full model picks by default (its 32 layers' K/V
        # over 8K context tokens far exceed Model.prefill_kv_budget_bytes); a probe of 1 layer would
        # keep its own (256 MiB: within the budget) and take the other path
        model.forward(ids, encoder_input_ids=chunks, logits="last", keep_cross_kv=False)
        out["cepe_forward_s"] = time.perf_counter() - start
    out["run_peak"] = status("VmHWM")
    print(json.dumps(out))


def child(what: str, path: str, a: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.abspath(__file__), "--dir", a.dir, "--worker", what, path]
    cmd += ["--threads", str(a.threads), "--gen", str(a.gen)]
    cmd += ["--dec-tokens", str(a.dec_tokens), "--ctx-tokens", str(a.ctx_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, _ = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": f"the {what} child failed with status {os.waitstatus_to_exitcode(status)}"}
    r = json.loads(out)
    # not wait4's ru_maxrss: a forked child inherits the parent's high-water mark until exec (a
    # parent that wrote the files in-process would lend it its own peak), and reset_peak restarts it
    return {**r, "peak_rss_gb": max(r["load_peak"], r["run_peak"]) / GB}


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def line(y1: float, y2: float) -> tuple[float, float]:
    """(fixed, per layer) of the line through (1, y1) and (2, y2); the per-layer part is
    clamped at 0 (a probe's noise must not make more layers cost less)."""
    per = max(0.0, y2 - y1)
    return y1 - per, per


def fit(p1: dict, p2: dict, layers: int, enc_extra_params: int) -> dict:
    """The fitted parts (bytes) of two probes' figures (over each child's base RSS) at 1 and
    2 decoder layers, and the peak they predict at `layers` decoder layers."""
    parts: dict = {}
    for key, fig in (
        ("weights", lambda p: p["rss_loaded"] - p["rss_base"]),
        ("load_peak", lambda p: p["load_peak"] - p["rss_base"]),
        ("forward", lambda p: max(0, p["run_peak"] - p["rss_loaded"])),
    ):
        parts[key + "_fixed"], parts[key + "_per_layer"] = line(fig(p1), fig(p2))
    parts["encoder_extra"] = 2.0 * enc_extra_params
    at = {k: parts[k + "_fixed"] + parts[k + "_per_layer"] * layers for k in ("weights", "load_peak", "forward")}
    base = max(p1["rss_base"], p2["rss_base"])
    load = base + at["load_peak"] + parts["encoder_extra"]
    run = base + at["weights"] + parts["encoder_extra"] + at["forward"]
    parts["forward_at_layers"] = at["forward"]
    parts["peak"] = max(load, run)
    return parts


def main() -> None:
    a = parse_args()
    if a.worker:
        what, path = a.worker
        worker(what, path, a)
        return
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    root = os.path.abspath(os.path.expanduser(a.dir))
    if os.path.commonpath([root, REPO_ROOT]) == REPO_ROOT:
        sys.exit(f"--dir {root} is inside the repository: choose a directory outside it")
    if a.scale < 1 or a.dec_tokens < 1 or a.ctx_tokens < CHUNK:
        sys.exit("--scale must be >= 1, --dec-tokens >= 1, --ctx-tokens >= 256")
    forms = [f.strip() for f in a.forms.split(",") if f.strip()]
    unknown = set(forms) - set(FORMS)
    if unknown:
        sys.exit(f"--forms: unknown {sorted(unknown)} (known: {', '.join(FORMS)})")
    measures = [w.strip() for w in a.measure.split(",") if w.strip()]
    if not measures or set(measures) - {"load", "decode", "cepe"}:
        sys.exit(f"--measure: {a.measure!r} is not a list of load, decode, cepe")
    dec, enc = shapes(a.scale)
    params = n_params(dec, enc)
    result: dict = {
        "machine": {"cpu": cpu_model_name(), "usable_cpus": usable_cpus(), "mem_available_gb": mem_available() / GB},
        "git": git_state(),
        "config": {
            "scale": a.scale,
            "decoder_layers": dec["num_hidden_layers"],
            "encoder_layers": enc["num_hidden_layers"],
            "params": params,
            "threads": a.threads,
            "gen": a.gen,
            "dec_tokens": a.dec_tokens,
            "ctx_tokens": a.ctx_tokens,
        },
        "targets_gb": TARGETS_GB if a.scale == 1 else "apply at --scale 1 only",
        "forms": {},
    }
    # the probes: the same forms at 1 and 2 decoder layers (1 encoder layer), measured first
    probe_shapes = [shapes(1, dec_layers=n, enc_layers=1) for n in (1, 2)]
    probes: dict[str, list[dict]] = {form: [] for form in forms}
    if a.probes_from:
        with open(a.probes_from) as f:
            earlier = json.load(f)["forms"]
        for form in forms:  # stored in GB where they are bytes
            probes[form] = [
                {k: v * GB if k.startswith(("rss", "load_peak", "run_peak")) else v for k, v in p.items()}
                for p in earlier[form]["probes"]
            ]
        result["probes_from"] = a.probes_from
    for n, (pdec, penc) in enumerate([] if a.probes_from else probe_shapes, 1):
        probe_paths = ensure_model(
            os.path.join(root, "probe" if n == 1 else f"probe{n}"), pdec, penc, forms, a.llcpp_cache
        )
        for form in forms:
            probes[form].append(child("cepe", probe_paths[form], a))
            log(f"probe {form}, {n} decoder layer(s): {probes[form][-1]}")
    same = (dec, enc) == probe_shapes[0]  # the first probe's own shape: its files serve
    target_dir = os.path.join(root, "probe" if same else f"scale{a.scale}")
    enc_layer_params = n_params(*shapes(1, dec_layers=1, enc_layers=2)) - n_params(*probe_shapes[0])
    enc_extra_params = (enc["num_hidden_layers"] - 1) * enc_layer_params
    for form in forms:
        row: dict = {}
        p1, p2 = probes[form]
        if "error" in p1 or "error" in p2:
            row["not_run"] = f"probe: {p1.get('error') or p2.get('error')}"
            result["forms"][form] = row
            continue
        parts = fit(p1, p2, dec["num_hidden_layers"], enc_extra_params)
        est = parts.pop("peak")
        avail = mem_available() - a.headroom_gb * GB
        row["estimated_peak_gb"] = round(est / GB, 2)
        row["fit_gb"] = {k: round(v / GB, 4) for k, v in parts.items()}
        row["probes"] = [
            {
                k: round(v / GB, 4) if k.startswith(("rss", "load_peak", "run_peak")) else round(v, 2)
                for k, v in p.items()
            }
            for p in (p1, p2)
        ]
        dec_layer_params = n_params(*probe_shapes[1]) - n_params(*probe_shapes[0])
        row["bytes_per_decoder_layer_weight"] = round(parts["weights_per_layer"] / dec_layer_params, 3)
        if a.estimate_only:
            row["not_run"] = f"--estimate-only (fits: {est <= avail}; {avail / GB:.1f} GB available)"
        elif est > avail:
            row["not_run"] = (
                f"estimated peak {est / GB:.1f} GB > the {avail / GB:.1f} GB available "
                f"(MemAvailable less {a.headroom_gb} GB headroom)"
            )
            log(f"{form}: not run: {row['not_run']}")
        else:
            path = ensure_model(target_dir, dec, enc, [form], a.llcpp_cache)[form]
            row["disk_gb"] = round(disk_bytes(path) / GB, 3)
            for what in measures:
                log(f"{form}: {what}")
                r = child(what, path, a)
                row[what] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                log(f"  {row[what]}")
            row["peak_rss_gb"] = max(row[w].get("peak_rss_gb", 0.0) for w in measures)
        if a.scale == 1 and form in TARGETS_GB:
            peak = row.get("peak_rss_gb")
            row["target_gb"] = TARGETS_GB[form]
            row["target_met"] = None if peak is None else peak <= TARGETS_GB[form]
        result["forms"][form] = row
    emit_json(result, a.out)


if __name__ == "__main__":
    main()
