#!/usr/bin/env python
"""Language modelling with CEPE on held-out real text: perplexity of a document's last tokens vs context size.

    python benchmarks/bench_cepe_lm.py                                    # full run (10 docs, N up to 32K)
    python benchmarks/bench_cepe_lm.py --million                          # + one 1M-token-context call
    python benchmarks/bench_cepe_lm.py --model /tmp/h1 --docs 2 --contexts 0,512,1024   # smoke run

The CEPE paper's LM protocol (spec §7.1) on the held-out documents cepe ships tokenized with
SmolLM2's tokenizer (`cepe.corpus.heldout_tokens()`: 10 documents of the Python standard library,
each >= 33,281 tokens; --docs K takes the first K). For a document x, a decoder window W (--window)
and a context size N (--contexts), the scored tokens are always x[-(W-1):], predicted from the
tokens before them:

  cepe        decoder input x[-W:]; the N tokens before it, x[-W-N:-W], go to the encoder as N/256
              chunks of 256: m.perplexity(x[-W:], eval_window=W-1, encoder_input_ids=chunks);
              N = 0: no encoder input.
  truncation  the decoder alone on x[-W:] (= cepe at N = 0): the same value for every N.
  full        all W+N tokens in the decoder: m.perplexity(x[-W-N:], eval_window=W-1), only while
              W+N <= max_position_embeddings (else null).

Identical calls (cepe at N=0, truncation, full at N=0) run once per document and are shared.
Per (method, N): the per-document mean NLL (log of the call's perplexity), perplexity =
exp(mean over documents of the NLL), a 95% percentile-bootstrap interval over documents (resampled
with replacement, the same draws for every method and N, so differences are paired), and the
median wall time of the call per document (after one untimed warm-up call). Targets: (1) CEPE's
perplexity does not rise as N grows beyond the interval of the previous N; (2) at the largest N
where full attention fits, CEPE recovers >= 50% of full attention's gain over truncation;
(3) CEPE's time is linear in N (log-log exponent over N >= 1024 <= 1.15).

--million additionally runs ONE CEPE call with a 1,048,576-token context in a child process (so its
peak RSS is that call's process alone; target <= 8 GB). The context is the held-out documents
concatenated and repeated: a cost measurement, not a quality one (the scored tokens recur in it).

Prints one JSON object on stdout (progress on stderr), writes it to --out, and draws a two-panel
plot (perplexity vs N; seconds per document vs N) to --plot (default benchmarks/cepe_lm.png).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np
from _common import (
    children_cpu_s,
    cpu_model_name,
    git_state,
    machine_busy_s,
    plain_log_y,
    proc_status,
    pyplot,
    save_figure,
    usable_cpus,
)

# the protocol itself (calls, shared calls, bootstrap, paired differences, the perplexity panel) is cepe.eval's
from cepe.eval import (  # noqa: E402
    CHUNK,
    METHODS,
    LMCalls,
    boot_ppl,
    call_shape,
    fmt_n,
    interval,
    paired,
    plot_perplexity,
    row_at,
    summarize,
)

DEFAULT_CONTEXTS = "0,1024,2048,4096,7680,16384,32768"
MILLION = 1 << 20
CONTENDED = 0.25  # other_load (CPUs other processes kept busy on average) above which times are inflated
TARGETS = {
    "recovered_fraction_min": 0.5,  # (2) >=
    "cepe_time_loglog_exponent_max": 1.15,  # (3) <=
    "time_fit_min_n": 1024,  # (3) fit over N >= this
    "million_peak_rss_gb_max": 8.0,  # --million: <=
}
GB = 1e9
KB = 1024


def log(msg: str) -> None:
    print(f"[bench_cepe_lm] {msg}", file=sys.stderr, flush=True)


def own_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def clean(obj: object) -> object:
    """JSON-safe: numpy scalars to Python, NaN/Inf to None."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------- model and data


def model_summary(model: object, arg: str) -> dict:
    c = model.config
    enc = c.encoder
    return {
        "arg": arg,
        "path": getattr(model, "path", None),
        "cepe_decoder": c.raw.get("cepe_decoder"),
        "is_cepe": bool(c.is_cepe),
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "encoder_layers": enc.num_hidden_layers if enc is not None else None,
        "encoder_hidden_size": c.encoder_hidden_size if enc is not None else None,
        "num_cross_attn_layers": c.num_cross_attn_layers if c.is_cepe else 0,
    }


def heldout_ids(n_docs: int) -> list[str] | None:
    """The manifest ids of the shipped held-out documents (same order), or None if they do not line up."""
    from cepe import corpus

    try:
        docs = [d["id"] for d in corpus.load_manifest()["documents"] if d["split"] == "heldout"]
    except (OSError, ValueError, KeyError):
        return None
    return docs if len(docs) == n_docs else None


# --------------------------------------------------------------------------- statistics


def loglog_fit(ns: list[int], ts: list[float]) -> float | None:
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


# --------------------------------------------------------------------------- the protocol


def reusable_calls(path: str, summary: dict, docs: list[np.ndarray], args: argparse.Namespace) -> dict:
    """The decoder-only calls of a previous run, keyed as cepe.eval.LMCalls.cache (the engine's
    calls), if that run used the same decoder on the same documents with the same window and
    threads; else exits naming the mismatch."""
    with open(path) as f:
        old = json.load(f)
    want = {
        "cepe_decoder": summary.get("cepe_decoder"),
        "window": args.window,
        "threads": args.threads,
        "doc_tokens": [len(d) for d in docs],
    }
    got = {
        "cepe_decoder": old.get("model", {}).get("cepe_decoder"),
        "window": old.get("window"),
        "threads": old.get("threads"),
        "doc_tokens": old.get("data", {}).get("doc_tokens", [])[: len(docs)],
    }
    diff = [k for k in want if want[k] != got[k]]
    if diff:
        sys.exit(f"--reuse {path}: not the same decoder-only calls ({', '.join(diff)} differ)")
    cache: dict[tuple[int, int, int, str], tuple[float, float]] = {}
    for method in ("truncation", "full", "cepe"):
        for row in old.get("results", {}).get(method, []):
            if row.get("ppl") is None:
                continue
            dec_len, n_ctx = call_shape(method, row["N"], args.window)
            if n_ctx == 0:
                for d in range(len(docs)):
                    cache[(d, dec_len, 0, "engine")] = (row["nll_per_doc"][d], row["s_per_doc"][d])
    return cache


def reused_million(path: str, summary: dict) -> dict | None:
    """A previous run's 1M-token call, if its model had the same shape: its time and memory depend
    on the shapes, not on the weights (its perplexity is the previous head's)."""
    with open(path) as f:
        old = json.load(f)
    keys = ("cepe_decoder", "layers", "hidden_size", "encoder_layers", "encoder_hidden_size", "num_cross_attn_layers")
    if not old.get("million") or any(old.get("model", {}).get(k) != summary.get(k) for k in keys):
        return None
    return {**old["million"], "reused_from": path, "perplexity_of": "the head measured in that run"}


def evaluate(
    args: argparse.Namespace, model: object, docs: list[np.ndarray], reused: dict | None = None
) -> tuple[dict, dict]:
    """{method: [row per N]}, and the bootstrap draws' document indices."""
    W, D = args.window, len(docs)
    max_pos = model.config.max_position_embeddings
    idx = np.random.default_rng(args.seed).integers(0, D, size=(args.bootstrap, D))
    calls = LMCalls(model, docs, W)
    calls.cache.update(reused or {})
    # warm-up (untimed): thread pool start, first-touch of weight pages
    warm = docs[0][-W - CHUNK :] if "cepe" in args.methods and model.config.is_cepe else None
    t0 = time.perf_counter()
    if warm is not None:
        model.perplexity(warm[CHUNK:].astype(np.int64), eval_window=W - 1, encoder_input_ids=warm[None, :CHUNK])
    else:
        model.perplexity(docs[0][-W:].astype(np.int64), eval_window=W - 1)
    log(f"warm-up call: {time.perf_counter() - t0:.2f} s")

    rows: dict[str, list[dict]] = {m: [] for m in args.methods}
    for n in args.contexts:
        for method in args.methods:
            dec_len, n_ctx = call_shape(method, n, W)
            if method == "full" and dec_len > max_pos:
                rows[method].append(
                    {"N": n, "ppl": None, "reason": f"W+N = {dec_len} > max_position_embeddings {max_pos}"}
                )
                log(f"{method:10s} N={fmt_n(n):>5s}: not run (W+N = {dec_len} > {max_pos})")
                continue
            was_reused = all((d, dec_len, n_ctx, "engine") in (reused or {}) for d in range(D))
            busy0, own0, w0 = machine_busy_s(), own_cpu_s(), time.perf_counter()
            res = [calls.run(d, dec_len, n_ctx) for d in range(D)]
            busy1, own1, wall = machine_busy_s(), own_cpu_s(), time.perf_counter() - w0
            nll = np.array([r[0] for r in res])
            secs = [r[1] for r in res]
            row = {"N": n, "decoder_tokens": dec_len, "encoder_chunks": n_ctx // CHUNK, **summarize(nll, secs, idx)}
            if was_reused:
                row["reused_from"] = args.reuse
            elif wall > 0.05 and busy0 is not None and busy1 is not None:
                row["other_load"] = round(max(0.0, (busy1 - busy0) - (own1 - own0)) / wall, 3)
            rows[method].append(row)
            ci = row["ci95"]
            log(
                f"{method:10s} N={fmt_n(n):>5s}: ppl {row['ppl']:8.3f} [{ci[0]:.3f}, {ci[1]:.3f}], "
                f"median {row['median_s_per_doc']:.3f} s/doc"
                + (f", other load {row['other_load']:.2f} CPUs" if "other_load" in row else "")
            )
    return rows, {"idx": idx}


def trunc_row(rows: dict) -> dict | None:
    """Truncation's row (the same at every N)."""
    rs = [r for r in rows.get("truncation", []) if r.get("ppl") is not None]
    return rs[0] if rs else None


def targets(rows: dict, idx: np.ndarray, max_pos: int, window: int) -> dict:
    out: dict[str, dict] = {}
    cepe = [r for r in rows.get("cepe", []) if r.get("ppl") is not None]

    # (1) no rise beyond the interval as N grows
    pairs = []
    for prev, nxt in zip(cepe, cepe[1:], strict=False):
        pairs.append(
            {
                "from_N": prev["N"],
                "to_N": nxt["N"],
                "ppl_from": prev["ppl"],
                "ppl_to": nxt["ppl"],
                "upper_from": prev["ci95"][1],
                "ok": nxt["ppl"] <= prev["ci95"][1],
            }
        )
    # informational: does the context help at all? (the rule above also passes a flat curve)
    vs_trunc = paired(rows, idx, "cepe", "truncation")
    last = vs_trunc[-1] if vs_trunc and vs_trunc[-1]["N"] > 0 else None
    out["ppl_falls_with_context"] = {
        "rule": "for each consecutive pair of N: ppl_cepe(N_next) <= upper 95% bound of ppl_cepe(N_prev)",
        "pairs": pairs,
        "ppl_first": cepe[0]["ppl"] if cepe else None,
        "ppl_last": cepe[-1]["ppl"] if cepe else None,
        "pass": all(p["ok"] for p in pairs) if pairs else None,
        "below_truncation_at_largest_n": None
        if last is None or last["ci95"] is None
        else {"N": last["N"], "diff": last["diff"], "ci95": last["ci95"], "significant": last["ci95"][1] < 0},
    }

    # (2) share of full attention's gain over truncation that CEPE recovers
    t2: dict = {
        "rule": "recovered = (ppl_trunc - ppl_cepe) / (ppl_trunc - ppl_full) >= "
        f"{TARGETS['recovered_fraction_min']} at the largest N > 0 where W+N <= max_position_embeddings "
        f"({max_pos})",
        "pass": None,
    }
    common = [
        r["N"]
        for r in rows.get("full", [])
        if r["N"] > 0 and r.get("ppl") is not None and row_at(rows, "cepe", r["N"]) and trunc_row(rows)
    ]
    if common:
        n = max(common)
        rc, rf = row_at(rows, "cepe", n), row_at(rows, "full", n)
        rt = trunc_row(rows)
        nc, nf, nt = (np.array(r["nll_per_doc"]) for r in (rc, rf, rt))
        gain = rt["ppl"] - rf["ppl"]
        rec = (rt["ppl"] - rc["ppl"]) / gain if gain > 0 else None
        bt, bc, bf = boot_ppl(nt, idx), boot_ppl(nc, idx), boot_ppl(nf, idx)
        den = bt - bf
        ok = den > 0
        draws = np.where(ok, (bt - bc) / np.where(ok, den, 1.0), np.nan)
        t2.update(
            {
                "N": n,
                "ppl_truncation": rt["ppl"],
                "ppl_cepe": rc["ppl"],
                "ppl_full": rf["ppl"],
                "full_gain_over_truncation": gain,
                "cepe_gain_over_truncation": rt["ppl"] - rc["ppl"],
                "recovered": rec,
                "recovered_ci95": interval(draws),
                "draws_with_positive_full_gain": int(ok.sum()),
                "draws": int(ok.size),
                "pass": None if rec is None else rec >= TARGETS["recovered_fraction_min"],
            }
        )
        if rec is None:
            t2["note"] = "full attention is not better than truncation here: the fraction is undefined"
    else:
        t2["note"] = "needs cepe, truncation and full at some N > 0 where full attention fits"
    out["recovers_half_of_full_gain"] = t2

    # (3) cost linear in N
    lo = TARGETS["time_fit_min_n"]
    pts = [(r["N"], r["median_s_per_doc"]) for r in cepe if r["N"] >= lo]
    exp_all = loglog_fit([p[0] for p in pts], [p[1] for p in pts])
    exp_last = loglog_fit([p[0] for p in pts[-2:]], [p[1] for p in pts[-2:]])
    # the fixed cost (decoder window, N = 0) flattens the slope at small N: also fit the cost above it
    base = next((r["median_s_per_doc"] for r in cepe if r["N"] == 0), None)
    above = [(n, t - base) for n, t in pts if base is not None and t > base]
    exp_above = loglog_fit([p[0] for p in above], [p[1] for p in above]) if len(above) == len(pts) else None
    out["cepe_time_linear_in_n"] = {
        "rule": f"least-squares slope of log(median s/doc) vs log(N) over N >= {lo} <= "
        f"{TARGETS['cepe_time_loglog_exponent_max']}",
        "points": [{"N": n, "median_s_per_doc": t} for n, t in pts],
        "exponent": exp_all,
        "exponent_last_segment": exp_last,
        "exponent_above_n0": exp_above,
        "note": f"the time includes the decoder's fixed cost on its {window}-token window, which lowers the "
        "slope at small N; exponent_above_n0 fits time(N) - time(0) instead (informational)",
        "pass": None if exp_all is None else exp_all <= TARGETS["cepe_time_loglog_exponent_max"],
    }
    return out


# --------------------------------------------------------------------------- --million


def million_child(args: argparse.Namespace) -> dict:
    import cepe
    from cepe import corpus

    W, M = args.window, args.million_tokens
    st_start = proc_status()
    t0 = time.perf_counter()
    model = cepe.load(args.model, n_threads=args.threads)
    load_s = time.perf_counter() - t0
    st_load = proc_status()
    maxrss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KB
    docs = corpus.heldout_tokens()
    total = sum(len(d) for d in docs)
    reps = -(-(M + W) // total)
    stream = np.concatenate(docs * reps)[: M + W].astype(np.int64)
    ctx, dec = stream[:M].reshape(-1, CHUNK), stream[M:]
    del stream, docs
    st_before = proc_status()
    t0 = time.perf_counter()
    ppl = model.perplexity(dec, eval_window=W - 1, encoder_input_ids=ctx)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KB
    st_end = proc_status()
    return {
        "context_tokens": M,
        "encoder_chunks": M // CHUNK,
        "decoder_tokens": W,
        "eval_window": W - 1,
        "context_source": f"the {len(corpus.heldout_tokens())} held-out documents ({total} tokens) concatenated "
        f"and repeated {reps}x, cut to {M + W} tokens; the last {W} go to the decoder. A cost measurement, "
        "not a quality one: the training split cannot be had tokenized without the pinned standard library, "
        "and with repetition the scored tokens recur in the context",
        "load_s": load_s,
        "seconds": secs,
        "tokens_per_s": (M + W) / secs,
        "perplexity": ppl,
        "peak_rss_bytes": peak,
        "peak_rss_gb": peak / GB,
        "rss_after_load_bytes": st_load.get("VmRSS"),
        "rss_after_load_gb": st_load.get("VmRSS", 0) / GB,
        "peak_rss_after_load_bytes": maxrss_load,
        "peak_above_load_bytes": peak - st_load.get("VmRSS", 0),
        "proc_status": {"start": st_start, "after_load": st_load, "before_call": st_before, "end": st_end},
        "threads": args.threads,
    }


def run_million(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="cepe_bench_lm_") as tmp:
        out = os.path.join(tmp, "million.json")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--million-child",
            "--child-out",
            out,
            "--model",
            args.model,
            "--threads",
            str(args.threads),
            "--window",
            str(args.window),
            "--million-tokens",
            str(args.million_tokens),
        ]
        log(f"--million: one call with {args.million_tokens} context tokens in a child process")
        busy0, own0, t0 = machine_busy_s(), children_cpu_s(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=sys.stderr, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.million_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # our own child's process group only
            proc.wait()
            rc = None
        busy1, own1, wall = machine_busy_s(), children_cpu_s(), time.perf_counter() - t0
        res: dict = {}
        if rc is None:
            res = {"timed_out": True, "timeout_s": args.million_timeout}
        elif rc != 0 or not os.path.exists(out):
            res = {"failed": True, "exit_status": rc}
        else:
            with open(out) as f:
                res = json.load(f)
        res["child_wall_s"] = round(wall, 2)
        if busy0 is not None and busy1 is not None and wall > 0:
            res["other_load"] = round(max(0.0, (busy1 - busy0) - (own1 - own0)) / wall, 3)
        if "peak_rss_gb" in res:
            res["target_peak_rss_gb_max"] = TARGETS["million_peak_rss_gb_max"]
            res["pass"] = res["peak_rss_gb"] <= TARGETS["million_peak_rss_gb_max"]
            log(
                f"--million: {res['seconds']:.1f} s, peak RSS {res['peak_rss_gb']:.2f} GB "
                f"(after load {res['rss_after_load_gb']:.2f} GB), ppl {res['perplexity']:.3f}"
            )
        else:
            log(f"--million: {'timed out' if rc is None else f'failed (exit status {rc})'}")
        return res


# --------------------------------------------------------------------------- plot


def write_plot(result: dict, path: str) -> str | None:
    plt = pyplot(log)
    if plt is None:
        return None

    rows = result["results"]
    ns = result["contexts"]
    pos = [n for n in ns if n > 0]
    zero_x = (min(pos) / 2) if pos else 1.0  # where N = 0 is drawn on the log axis

    def x(n: int) -> float:
        return n if n > 0 else zero_x

    def ok(method: str) -> list[dict]:
        return [r for r in rows.get(method, []) if r.get("ppl") is not None]

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    ax = axes[0]
    plot_perplexity(ax, {**result, "results": {m: rows[m] for m in ("truncation", "full", "cepe") if m in rows}})
    limit = result["model"]["max_position_embeddings"] - result["window"]
    if "full" in rows and pos and limit < max(pos):
        ax.axvline(limit, color="tab:orange", ls=":", lw=1)
        ax.annotate(
            "full attention's limit", (limit, 0.98), xycoords=("data", "axes fraction"), ha="right", va="top",
            fontsize=7, color="tab:orange", rotation=90,
        )  # fmt: skip
    ax.set_title(f"{result['data']['docs']} held-out stdlib documents", fontsize=9)

    ax = axes[1]
    for method, color, label in (
        ("cepe", "tab:blue", "CEPE"),
        ("full", "tab:orange", "full attention"),
    ):
        rs = ok(method)
        if not rs:
            continue
        ax.plot([x(r["N"]) for r in rs], [r["median_s_per_doc"] for r in rs], "o-", color=color, ms=4, label=label)
    hot = [
        (x(r["N"]), r["median_s_per_doc"])
        for m in ("cepe", "full")
        for r in ok(m)
        if r.get("other_load", 0.0) > CONTENDED
    ]
    if hot:
        ax.plot(*zip(*hot, strict=True), "x", color="red", ms=9, label=f"other load > {CONTENDED} CPU: time inflated")
    t3 = result["targets"].get("cepe_time_linear_in_n", {})
    if t3.get("exponent") is not None and len(t3["points"]) >= 2:
        fit_n = np.array([p["N"] for p in t3["points"]], dtype=float)
        fit_t = np.array([p["median_s_per_doc"] for p in t3["points"]])
        k = t3["exponent"]
        c = np.exp(np.mean(np.log(fit_t) - k * np.log(fit_n)))
        grid = np.geomspace(fit_n.min(), fit_n.max(), 20)
        ax.plot(grid, c * grid**k, "--", color="tab:blue", lw=0.8, label=f"CEPE fit: time ~ N^{k:.2f}")
    plain_log_y(ax)
    ax.set_ylabel("seconds per document (median)")
    ax.set_title(f"{result['threads']} threads, {result['machine']['cpu']}", fontsize=9)

    ax.set_xlabel(axes[0].get_xlabel())  # the N axis itself is plot_perplexity's, shared
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    tg = result["targets"]

    def mark(t: dict) -> str:
        return {True: " (pass)", False: " (FAIL)"}.get(t.get("pass"), "")

    bits = []
    t1 = tg.get("ppl_falls_with_context", {})
    if t1.get("pass") is not None:
        bits.append(f"no rise with N{mark(t1)}")
    t2 = tg.get("recovers_half_of_full_gain", {})
    if t2.get("recovered") is not None:
        bits.append(f"CEPE recovers {100 * t2['recovered']:.0f}% of full's gain at {fmt_n(t2['N'])}{mark(t2)}")
    if t3.get("exponent") is not None:
        bits.append(f"CEPE time ~ N^{t3['exponent']:.2f}{mark(t3)}")
    if result.get("million") and result["million"].get("peak_rss_gb") is not None:
        mm = result["million"]
        bits.append(f"1M context: {mm['seconds']:.0f} s, peak RSS {mm['peak_rss_gb']:.2f} GB{mark(mm)}")
    title = f"{result['model']['arg']}: CEPE LM protocol, window {result['window']}"
    if bits:
        title += "\n" + "; ".join(bits)
    return save_figure(fig, path, title)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-cepe", help="CEPE model: a name or a directory")
    p.add_argument("--threads", type=int, default=2, help="engine threads (default 2)")
    p.add_argument("--docs", type=int, default=None, help="use the first K held-out documents (default all)")
    p.add_argument("--window", type=int, default=256, help="decoder window W (default 256); W-1 tokens are scored")
    p.add_argument("--contexts", default=DEFAULT_CONTEXTS, help=f"context sizes N (default {DEFAULT_CONTEXTS})")
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated, of cepe,truncation,full; 'none' for none"
    )
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument(
        "--plot",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "cepe_lm.png"),
        help="plot path (default benchmarks/cepe_lm.png); '' for none",
    )
    p.add_argument(
        "--reuse",
        default=None,
        help="a previous run's JSON: its decoder-only calls (truncation, full attention, CEPE at N = 0) are "
        "taken from it instead of rerun when the decoder, documents, window and threads are the same "
        "(a new head leaves them unchanged)",
    )
    p.add_argument("--million", action="store_true", help="also one call with a 1M-token context (child process)")
    p.add_argument("--million-tokens", type=int, default=MILLION, help=argparse.SUPPRESS)
    p.add_argument("--million-timeout", type=float, default=3600.0, help="seconds for --million (default 3600)")
    p.add_argument("--million-child", action="store_true", help=argparse.SUPPRESS)  # internal: child process
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [] if args.methods == "none" else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {','.join(METHODS)}")
    try:
        args.contexts = sorted({int(n) for n in args.contexts.split(",")})
    except ValueError:
        p.error(f"--contexts must be comma-separated integers, got {args.contexts!r}")
    if any(n < 0 or n % CHUNK for n in args.contexts):
        p.error(f"each context size must be a non-negative multiple of {CHUNK}")
    if args.window < 2:
        p.error("--window must be >= 2")
    if args.million_tokens <= 0 or args.million_tokens % CHUNK:
        p.error(f"--million-tokens must be a positive multiple of {CHUNK}")
    if args.bootstrap < 1:
        p.error("--bootstrap must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.million_child:
        res = million_child(args)
        with open(args.child_out, "w") as f:
            json.dump(clean(res), f)
        return 0

    import cepe
    from cepe import corpus

    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    all_docs = corpus.heldout_tokens()
    k = len(all_docs) if args.docs is None else args.docs
    if not 1 <= k <= len(all_docs):
        sys.exit(f"--docs must be in [1, {len(all_docs)}], got {args.docs}")
    docs = all_docs[:k]
    ids = heldout_ids(len(all_docs))
    need = args.window + max(args.contexts)
    short = [i for i, d in enumerate(docs) if len(d) < need]
    if short and args.methods:
        sys.exit(f"documents {short} hold fewer than W + max(N) = {need} tokens")

    t0 = time.perf_counter()
    model = cepe.load(args.model, n_threads=args.threads)
    load_s = time.perf_counter() - t0
    summary = model_summary(model, args.model)
    log(
        f"loaded {args.model} in {load_s:.1f} s: {summary['layers']} layers, encoder {summary['encoder_layers']} "
        f"layers, cross-attention in {summary['num_cross_attn_layers']}; {k} documents, window {args.window}, "
        f"N in {args.contexts}, {args.threads} threads"
    )
    if "cepe" in args.methods and not model.config.is_cepe and any(args.contexts):
        sys.exit(f"{args.model} is not a CEPE model (no cross-attention): it cannot take a context")

    rows: dict = {}
    draws = None
    if args.methods:
        reused = reusable_calls(args.reuse, summary, docs, args) if args.reuse else None
        rows, boot = evaluate(args, model, docs, reused)
        draws = boot["idx"]
    max_pos = model.config.max_position_embeddings
    del model
    gc.collect()

    result: dict = {
        "benchmark": "bench_cepe_lm",
        "command": shlex.join(["python", *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "threads": args.threads,
        "window": args.window,
        "eval_tokens": args.window - 1,
        "chunk": CHUNK,
        "contexts": args.contexts,
        "methods": args.methods,
        "model": {**summary, "load_s": round(load_s, 2)},
        "data": {
            "source": "cepe.corpus.heldout_tokens(): held-out Python standard library documents, SmolLM2 tokenizer",
            "docs": k,
            "doc_ids": ids[:k] if ids else None,
            "doc_tokens": [len(d) for d in docs],
        },
        "protocol": {
            "scored": f"the last W-1 = {args.window - 1} tokens of each document",
            "cepe": f"m.perplexity(x[-W:], eval_window=W-1, encoder_input_ids=x[-W-N:-W].reshape(-1, {CHUNK})); "
            "N = 0: no encoder input",
            "truncation": "m.perplexity(x[-W:], eval_window=W-1): the same for every N",
            "full": "m.perplexity(x[-W-N:], eval_window=W-1) while W+N <= max_position_embeddings, else null",
            "shared_calls": "identical calls (cepe at N=0, truncation, full at N=0) run once per document",
            "ppl": "exp(mean over documents of the per-document mean NLL)",
            "ci95": f"2.5/97.5 percentiles over {args.bootstrap} bootstrap draws of the documents (seed {args.seed}; "
            "the same draws for every method and N)",
            "time": "time.perf_counter() around each call, after one untimed warm-up call; median over documents",
            "other_load": "CPUs other processes kept busy on average while a row ran (/proc/stat); above "
            f"{CONTENDED} its times are inflated",
        },
        "results": rows,
    }
    if draws is not None:
        result["paired"] = {
            "cepe_minus_truncation": paired(rows, draws, "cepe", "truncation"),
            "cepe_minus_full": paired(rows, draws, "cepe", "full"),
        }
        result["targets"] = targets(rows, draws, max_pos, args.window)
    else:
        result["targets"] = {}
    if args.reuse and not args.million:
        result["million"] = reused_million(args.reuse, summary)
    if args.million:
        result["million"] = run_million(args)
    if result.get("million") and "pass" in result["million"]:
        result["targets"]["million_peak_rss"] = {
            "rule": f"peak RSS of the 1M-context call's process <= {TARGETS['million_peak_rss_gb_max']} GB",
            "peak_rss_gb": result["million"]["peak_rss_gb"],
            "pass": result["million"]["pass"],
        }
    caveats = []
    loads = [r["other_load"] for rs in rows.values() for r in rs if "other_load" in r]
    if loads and max(loads) > CONTENDED:
        caveats.append(
            f"other processes kept up to {max(loads):.2f} CPUs busy during the timed rows: their times are inflated"
        )
    tr = trunc_row(rows)
    if tr is not None and any(r["N"] > 0 for r in rows.get("cepe", [])):
        if all(np.allclose(r["nll_per_doc"], tr["nll_per_doc"], rtol=0, atol=1e-6) for r in rows["cepe"]):
            caveats.append(
                "CEPE's NLL equals truncation's at every N: the context has no effect (an untrained head with "
                "zero-initialised cross-attention output?)"
            )
    result["caveats"] = caveats
    result["machine"] = {"cpu": cpu_model_name(), "cpus_usable": usable_cpus()}
    result["git"] = git_state()
    result["versions"] = {"python": platform.python_version(), "numpy": np.__version__, "cepe": cepe.__version__}
    result["env"] = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "GOMP_"))}
    result["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    result = clean(result)
    result["plot"] = write_plot(result, args.plot) if args.plot and rows else None
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
