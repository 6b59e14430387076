"""The CEPE paper's language-modelling protocol (spec §7.1) as a library:
perplexity of the last W-1 tokens of each document, predicted from a decoder
window of W tokens and N tokens of context before it, per method and N, with
percentile-bootstrap intervals over documents.

    import cepe, cepe.eval
    model = cepe.load("smollm2-135m-cepe")
    result = cepe.eval.evaluate_lm(model, cepe.eval.load_documents(None), window=256, contexts=[0, 1024, 4096])
    cepe.eval.table(result)            # one dict per (method, N): ppl, ci95_low, ci95_high, ...

Methods (call_shape gives each call's decoder length and context size):
  cepe        decoder input x[-W:]; the N tokens before it go to the encoder as N/256 chunks
  truncation  the decoder alone on x[-W:] (the same value for every N)
  full        all W+N tokens in the decoder, while W+N <= max_position_embeddings
  streaming   StreamingLLM: x[-W-N:] token by token through a W-entry KV cache (4 attention
              sinks + the W-4 most recent tokens; cepe.baselines), at N = 0 the same as truncation
  replug      REPLUG: each 256-token chunk of the context prepended to x[-W:] separately, the
              next-token distributions averaged (uniform weights: no retriever scores the chunks);
              at N = 0 the same as truncation
  e2llm-cepe  E2-LLM + CEPE: the decoder reads the last 2W tokens with RoPE scaled linearly by 2 (as
              E2-LLM runs a model on twice its window), the rest of the context goes to the encoder
              (N below W: the decoder reads all W+N tokens, scaled the same)
  pcw         parallel context windows: the context's 256-token chunks share positions 0..255 and
              each attends within itself, x[-W:] follows at 256.. and attends to all (cepe.baselines)
  ape         APE: pcw with every chunk after a shared prefix, and x[-W:]'s attention to the chunks
              with a temperature and a scale (settings: APESettings, default T = S = 1, prefix BOS where the
              model's prompts begin with one)

pcw, replug and ape at N = 0 have no context to place: the same call as truncation.

Identical calls (cepe at N=0, truncation, full at N=0) run once per document.
With log_path, every call's result is appended to a JSON-lines file as it
completes and a rerun skips the calls already there (resumable). `cepe eval
lm` is the command-line face; benchmarks/bench_cepe_lm.py adds timings and
the paper's targets on top.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .baselines import APESettings
from .bootstrap import boot_ppl, bootstrap_indices, interval
from .eval_qa import QA_METHODS, evaluate_qa, exact_match, f1_score  # the QA protocol, cepe.eval's too
from .progress import bar as progress_bar

CHUNK = 256  # encoder chunk length
METHODS = ("cepe", "truncation", "full")  # the default set
ALL_METHODS = (*METHODS, "streaming", "replug", "pcw", "ape", "e2llm-cepe")
E2LLM_FACTOR = 2  # e2llm-cepe: the decoder's window and RoPE scale
_BASELINES = ("streaming", "replug", "pcw", "ape")
STREAMING_SINKS = 4

__all__ = [
    "ALL_METHODS",
    "APESettings",
    "CHUNK",
    "METHODS",
    "QA_METHODS",
    "LMCalls",
    "boot_ppl",
    "bootstrap_indices",
    "call_shape",
    "evaluate_lm",
    "evaluate_qa",
    "exact_match",
    "f1_score",
    "interval",
    "load_documents",
    "paired",
    "row_at",
    "plot_perplexity",
    "summarize",
    "table",
    "write_csv",
    "write_plot",
]


def call_shape(method: str, n: int, window: int) -> tuple[int, int]:
    """(decoder length, context size) of a method's call at context size n."""
    if method in ("cepe", "replug", "pcw", "ape"):
        return window, n
    if method == "truncation":
        return window, 0
    if method in ("full", "streaming"):
        return window + n, 0
    if method == "e2llm-cepe":
        extra = min(n, (E2LLM_FACTOR - 1) * window)
        return window + extra, n - extra
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")


def _kind(method: str, n: int, ape_key: str = "ape") -> str:
    """Which computation a call is: the engine's forward, or a baseline composed from cepe.ops (at
    N = 0 StreamingLLM's cache never evicts, so it is the engine's truncation call). An APE call's
    kind holds its settings (ape_key), so results of other settings are never taken for it."""
    if method == "e2llm-cepe":
        return method  # another RoPE: never the engine's unscaled call
    if method not in _BASELINES or n == 0:
        return "engine"
    return ape_key if method == "ape" else method


# ------------------------------------------------------------------ statistics


def summarize(nll: Sequence[float], seconds: Sequence[float], idx: np.ndarray) -> dict[str, Any]:
    """A (method, N) row from the per-document mean NLLs: perplexity = exp(mean NLL), its
    bootstrap interval, and the median seconds per document."""
    a = np.asarray(nll, dtype=np.float64)
    return {
        "ppl": float(np.exp(a.mean())),
        "ci95": interval(boot_ppl(a, idx)),
        "nll_per_doc": a.tolist(),
        "median_s_per_doc": float(np.median(seconds)),
        "s_per_doc": [float(s) for s in seconds],
    }


def row_at(rows: dict[str, list[dict[str, Any]]], method: str, n: int) -> dict[str, Any] | None:
    for r in rows.get(method, []):
        if r["N"] == n and r.get("ppl") is not None:
            return r
    return None


def paired(rows: dict[str, list[dict[str, Any]]], idx: np.ndarray, a: str, b: str) -> list[dict[str, Any]]:
    """ppl(a) - ppl(b) at each N where both ran, with its bootstrap interval (the same resampled docs)."""
    out = []
    for ra in rows.get(a, []):
        rb = row_at(rows, b, ra["N"])
        if ra.get("ppl") is None or rb is None:
            continue
        na, nb = np.array(ra["nll_per_doc"]), np.array(rb["nll_per_doc"])
        out.append(
            {
                "N": ra["N"],
                "diff": ra["ppl"] - rb["ppl"],
                "ci95": interval(boot_ppl(na, idx) - boot_ppl(nb, idx)),
                "docs_where_a_is_lower": int((na < nb).sum()),
                "docs": len(na),
            }
        )
    return out


# ------------------------------------------------------------------- the calls


class LMCalls:
    """Runs each perplexity call once per (document, decoder length, context size, kind), keeping
    (mean NLL of the last window-1 tokens, seconds); with log_path, appends each result to that
    JSON-lines file and starts from the results already in it. ape: the settings of APE's calls,
    whose kind (ape_key) names them."""

    def __init__(
        self,
        model: Any,
        docs: Sequence[np.ndarray],
        window: int,
        *,
        log_path: str | os.PathLike[str] | None = None,
        ape: APESettings | None = None,
    ) -> None:
        self.model, self.docs, self.window = model, docs, window
        self.ape = APESettings() if ape is None else ape
        self.ape_key = "ape:" + json.dumps(self.ape.as_dict(model), sort_keys=True)
        self.cache: dict[tuple[int, int, int, str], tuple[float, float]] = {}
        self.log_path = None if log_path is None else os.fspath(log_path)
        self._ops_decoder: Any = None
        self._scaled: Any = None
        self.resumed = 0  # calls answered from the log
        self._logged: set[tuple[int, int, int, str]] = set()  # the log's calls not yet asked for
        if self.log_path and os.path.exists(self.log_path):
            self._resume()

    def _key_fields(self) -> dict[str, Any]:
        return {"window": self.window, "doc_tokens": [len(d) for d in self.docs]}

    def _resume(self) -> None:
        assert self.log_path is not None
        with open(self.log_path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    if f.read().strip():  # only the last line may be cut short (an interrupted write)
                        raise ValueError(f"{self.log_path}: line {n} is not JSON") from None
                    break
                if rec.get("window") != self.window or rec.get("doc_tokens") != len(self.docs[rec["doc"]]):
                    raise ValueError(
                        f"{self.log_path}: line {n} is from another run (window {rec.get('window')}, a document of "
                        f"{rec.get('doc_tokens')} tokens); use another file or delete it"
                    )
                key = (rec["doc"], rec["decoder_tokens"], rec["context_tokens"], rec.get("kind", "engine"))
                self.cache[key] = (rec["nll"], rec["seconds"])
                self._logged.add(key)

    def run(self, d: int, dec_len: int, n_ctx: int, kind: str = "engine") -> tuple[float, float]:
        """(mean NLL of the last window-1 tokens of document d, seconds of the call)."""
        key = (d, dec_len, n_ctx, kind)
        if key in self.cache:
            if key in self._logged:
                self._logged.discard(key)
                self.resumed += 1
            return self.cache[key]
        x = self.docs[d]
        dec = np.ascontiguousarray(x[len(x) - dec_len :], dtype=np.int64)
        t0 = time.perf_counter()
        if kind in ("streaming", "pcw") or kind == self.ape_key:
            if self._ops_decoder is None:
                from .baselines import OpsDecoder

                # small ops (one token at a time for StreamingLLM): an OpenMP team costs more than it saves
                self._ops_decoder = OpsDecoder.from_model(self.model, n_threads=1)
            if kind == "streaming":
                nll = self._ops_decoder.streaming_nll(dec, self.window, self.window - 1, sinks=STREAMING_SINKS)
            else:
                ctx = x[len(x) - dec_len - n_ctx : len(x) - dec_len].reshape(-1, CHUNK)
                ape: dict[str, Any] = {}
                if kind == self.ape_key:
                    a = self.ape
                    ape = {"prefix": a.prefix_ids(self.model), "temperature": a.temperature, "scale": a.scale}
                nll = self._ops_decoder.pcw_nll(ctx, dec, self.window - 1, **ape)
        elif kind == "e2llm-cepe":
            if self._scaled is None:
                from .load import load

                scaling = {"rope_type": "linear", "factor": float(E2LLM_FACTOR)}
                self._scaled = load(
                    self.model.path, rope_scaling=scaling, n_threads=getattr(self.model, "n_threads", None)
                )
            kw: dict[str, Any] = {}
            if n_ctx:
                ctx = x[len(x) - dec_len - n_ctx : len(x) - dec_len]
                kw["encoder_input_ids"] = np.ascontiguousarray(ctx, dtype=np.int64).reshape(-1, CHUNK)
            nll = math.log(self._scaled.perplexity(dec, eval_window=self.window - 1, **kw))
        elif kind == "replug":
            from .baselines import replug_nll

            ctx = x[len(x) - dec_len - n_ctx : len(x) - dec_len]
            nll = replug_nll(self.model, list(ctx.reshape(-1, CHUNK)), dec, self.window - 1)
        else:
            kw = {}
            if n_ctx:
                ctx = x[len(x) - dec_len - n_ctx : len(x) - dec_len]
                kw["encoder_input_ids"] = np.ascontiguousarray(ctx, dtype=np.int64).reshape(-1, CHUNK)
            nll = math.log(self.model.perplexity(dec, eval_window=self.window - 1, **kw))
        self.cache[key] = (nll, time.perf_counter() - t0)
        if self.log_path:
            rec = {
                "doc": d, "decoder_tokens": dec_len, "context_tokens": n_ctx, "kind": kind, "nll": self.cache[key][0],
                "seconds": self.cache[key][1], "window": self.window, "doc_tokens": len(x),
            }  # fmt: skip
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return self.cache[key]


# --------------------------------------------------------------------- protocol


def _check(
    model: Any, docs: Sequence[np.ndarray], window: int, contexts: Sequence[int], methods: Sequence[str]
) -> None:
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not docs:
        raise ValueError("no documents")
    for m in methods:
        call_shape(m, 0, window)
    if any(n < 0 or n % CHUNK for n in contexts):
        raise ValueError(f"each context size must be a non-negative multiple of {CHUNK}, got {list(contexts)}")
    need = window + max(contexts, default=0)
    short = [i for i, d in enumerate(docs) if len(d) < need]
    if short:
        raise ValueError(f"documents {short} hold fewer than window + max(contexts) = {need} tokens")
    extra = (E2LLM_FACTOR - 1) * window
    if "e2llm-cepe" in methods and any(n > extra for n in contexts):
        if extra % CHUNK:
            raise ValueError(f"e2llm-cepe: {E2LLM_FACTOR - 1} x window = {extra} must be a multiple of {CHUNK}")
        if not model.config.is_cepe:
            raise ValueError("e2llm-cepe: the model is not a CEPE model (no cross-attention)")
    if "cepe" in methods and any(contexts) and not model.config.is_cepe:
        raise ValueError("the model is not a CEPE model (no cross-attention): method 'cepe' cannot take a context")


def evaluate_lm(
    model: Any,
    docs: Sequence[np.ndarray],
    *,
    window: int = 256,
    contexts: Iterable[int] = (0,),
    methods: Sequence[str] = METHODS,
    bootstrap: int = 2000,
    seed: int = 0,
    log_path: str | os.PathLike[str] | None = None,
    progress: bool = False,
    on_row: Callable[[str, dict[str, Any]], None] | None = None,
    ape: APESettings | None = None,
) -> dict[str, Any]:
    """The protocol over docs (1-D token arrays, each >= window + max(contexts) tokens).
    Returns {"window", "contexts", "methods", "docs", "results": {method: [row per N]},
    "paired": {"cepe_minus_truncation": [...], "cepe_minus_full": [...]}}; a row holds N,
    decoder_tokens, encoder_chunks, ppl, ci95, nll_per_doc, median_s_per_doc, s_per_doc (ppl
    None with a reason where full attention does not fit). on_row(method, row) is called as
    each row completes. ape: APE's settings (default APESettings(): T = S = 1, prefix BOS where prompts begin
    with one), part
    of each APE call's key in the log, so a rerun with other settings computes its own."""
    ns = sorted({int(n) for n in contexts})
    _check(model, docs, window, ns, methods)
    if bootstrap < 1:
        raise ValueError(f"bootstrap must be >= 1, got {bootstrap}")
    D = len(docs)
    idx = bootstrap_indices(D, bootstrap, seed)
    calls = LMCalls(model, docs, window, log_path=log_path, ape=ape)
    prefix_len = len(calls.ape.prefix_ids(model))
    max_pos = model.config.max_position_embeddings
    plan = [(m, n) for n in ns for m in methods]
    bar = progress_bar(total=len(plan) * D, desc="eval lm", unit="call", disable=None if progress else True)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for method, n in plan:
        dec_len, n_ctx = call_shape(method, n, window)
        kind = _kind(method, n, calls.ape_key)
        skip = None
        if kind == "streaming" and window > max_pos:
            skip = f"W = {window} > max_position_embeddings {max_pos}"
        elif kind in ("replug", "pcw") and window + CHUNK > max_pos:
            skip = f"W + {CHUNK} = {window + CHUNK} > max_position_embeddings {max_pos}"
        elif kind == calls.ape_key and prefix_len + window + CHUNK > max_pos:
            skip = f"prefix + W + {CHUNK} = {prefix_len + window + CHUNK} > max_position_embeddings {max_pos}"
        elif method == "full" and dec_len > max_pos:
            skip = f"W+N = {dec_len} > max_position_embeddings {max_pos}"
        row: dict[str, Any]
        if skip is not None:
            row = {"N": n, "ppl": None, "reason": skip}
            bar.update(D)
        else:
            res = []
            for d in range(D):
                res.append(calls.run(d, dec_len, n_ctx, kind))
                bar.update(1)
            row = {"N": n, "decoder_tokens": dec_len, "encoder_chunks": n_ctx // CHUNK}
            row.update(summarize([r[0] for r in res], [r[1] for r in res], idx))
        rows[method].append(row)
        if on_row is not None:
            on_row(method, row)
    bar.close()
    return {
        "window": window,
        "eval_tokens": window - 1,
        "chunk": CHUNK,
        "contexts": ns,
        "methods": list(methods),
        "docs": D,
        "bootstrap": {"draws": bootstrap, "seed": seed},
        "resumed_calls": calls.resumed,
        **({"ape": calls.ape.as_dict(model)} if "ape" in methods else {}),
        "results": rows,
        "paired": {
            "cepe_minus_truncation": paired(rows, idx, "cepe", "truncation"),
            "cepe_minus_full": paired(rows, idx, "cepe", "full"),
        },
    }


# ------------------------------------------------------------------------ data


def load_documents(
    data: str | os.PathLike[str] | None, tokenizer: Any = None, *, max_docs: int | None = None
) -> list[np.ndarray]:
    """Token documents for evaluate_lm:
    - None: the held-out documents cepe ships (cepe.corpus.heldout_tokens(), SmolLM2's tokenizer);
    - .npy: a 1-D integer array (one document), a 2-D one (a document per row) or an object
      array of 1-D arrays;
    - .jsonl: one JSON object a line with a "text" (tokenized with `tokenizer`) or "ids" field;
    - any other file: one UTF-8 text document, tokenized with `tokenizer`."""
    docs: list[np.ndarray]
    if data is None:
        from .corpus import heldout_tokens

        docs = heldout_tokens()
    else:
        path = os.fspath(data)
        if path.endswith(".npy"):
            a = np.load(path, allow_pickle=False) if not _is_object_npy(path) else np.load(path, allow_pickle=True)
            if a.dtype == object:
                docs = [np.asarray(d) for d in a]
            elif a.ndim == 1:
                docs = [a]
            elif a.ndim == 2:
                docs = list(a)
            else:
                raise ValueError(f"{path}: expected a 1-D or 2-D token array, got shape {a.shape}")
        elif path.endswith(".jsonl"):
            docs = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if "ids" in rec:
                        docs.append(np.asarray(rec["ids"]))
                    elif "text" in rec:
                        docs.append(_encode(tokenizer, rec["text"], f"{path}: line {n}"))
                    else:
                        raise ValueError(f"{path}: line {n} has neither 'text' nor 'ids'")
        else:
            with open(path, encoding="utf-8") as f:
                docs = [_encode(tokenizer, f.read(), path)]
    for i, d in enumerate(docs):
        if d.ndim != 1 or d.dtype.kind not in "iu":
            raise ValueError(f"document {i}: expected a 1-D integer token array, got {d.dtype} of shape {d.shape}")
    docs = [np.ascontiguousarray(d, dtype=np.int64) for d in docs]
    return docs if max_docs is None else docs[:max_docs]


def _is_object_npy(path: str) -> bool:
    try:
        np.load(path, allow_pickle=False, mmap_mode="r")
        return False
    except ValueError:
        return True


def _encode(tokenizer: Any, text: str, where: str) -> np.ndarray:
    if tokenizer is None:
        raise ValueError(f"{where}: text needs the model's tokenizer, and the model has none")
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


# --------------------------------------------------------------------- outputs


def table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per (method, N): method, N, ppl, ci95_low, ci95_high, median_s_per_doc, docs,
    reason (pandas.DataFrame(table(result)) makes a data frame of it)."""
    out = []
    for method, rows in result["results"].items():
        for r in rows:
            ci = r.get("ci95") or [None, None]
            out.append(
                {
                    "method": method, "N": r["N"], "ppl": r.get("ppl"), "ci95_low": ci[0], "ci95_high": ci[1],
                    "median_s_per_doc": r.get("median_s_per_doc"), "docs": result["docs"],
                    "reason": r.get("reason", ""),
                }
            )  # fmt: skip
    return out


def write_csv(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    rows = table(result)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["method", "N", "ppl"])
        w.writeheader()
        w.writerows(rows)


def fmt_n(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def plot_perplexity(ax: Any, result: dict[str, Any]) -> None:
    """Perplexity vs N per method, with 95 % bands, on a matplotlib axis (log-2 x axis, N = 0
    drawn at the left end)."""
    import matplotlib.ticker

    rows, ns = result["results"], result["contexts"]
    pos = [n for n in ns if n > 0]
    zero_x = (min(pos) / 2) if pos else 1.0

    def x(n: int) -> float:
        return n if n > 0 else zero_x

    def ok(method: str) -> list[dict[str, Any]]:
        return [r for r in rows.get(method, []) if r.get("ppl") is not None]

    if ok("truncation"):
        t = ok("truncation")[0]
        ax.axhline(t["ppl"], color="tab:gray", ls="--", lw=1.2, label=f"truncation (decoder, {result['window']} tok)")
        if t["ci95"]:
            ax.axhspan(t["ci95"][0], t["ci95"][1], color="tab:gray", alpha=0.12)
    styles = {
        "full": ("tab:orange", "full attention (W+N in decoder)"),
        "cepe": ("tab:blue", "CEPE (N in encoder)"),
        "streaming": ("tab:green", "StreamingLLM (W-entry cache)"),
        "replug": ("tab:purple", "REPLUG (256-token chunks, uniform)"),
        "pcw": ("tab:brown", "parallel context windows (256)"),
        "ape": ("tab:pink", "APE (256-token windows)"),
        "e2llm-cepe": ("tab:cyan", "E2-LLM (2W, scale 2) + CEPE"),
    }
    for method in [m for m in rows if m != "truncation"]:
        color, label = styles.get(method, (None, method))
        rs = ok(method)
        if not rs:
            continue
        xs = [x(r["N"]) for r in rs]
        line = ax.plot(xs, [r["ppl"] for r in rs], "o-", color=color, ms=4, label=label)[0]
        if all(r["ci95"] for r in rs):
            ax.fill_between(
                xs, [r["ci95"][0] for r in rs], [r["ci95"][1] for r in rs], color=line.get_color(), alpha=0.18
            )
    ax.set_ylabel(f"perplexity, last {result['window'] - 1} tokens (95% band)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([x(n) for n in ns])
    ax.set_xticklabels([fmt_n(n) for n in ns])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("context tokens N" + (" (0 drawn at the left end)" if 0 in ns else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def write_plot(result: dict[str, Any], path: str | os.PathLike[str], title: str = "") -> bool:
    """plot_perplexity into a PNG; False (nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    plot_perplexity(ax, result)
    ax.set_title(title or f"{result['docs']} documents, window {result['window']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)
    plt.close(fig)
    return True
