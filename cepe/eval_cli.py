"""`cepe eval`: the paper's evaluation protocols as commands (cepe.eval does the work).

    cepe eval lm --model smollm2-135m-cepe --context 0,1024,4096 --out-dir eval_out

writes eval_out/calls.jsonl (one line per perplexity call, appended as it
completes: a rerun with the same --out-dir skips what is done),
eval_out/lm.json, eval_out/lm.csv and eval_out/lm.png.

    cepe eval qa --model M --data nq.jsonl --k-decoder 5 --k-encoder 10 --method cepe,full,replug

writes eval_out/answers.jsonl (resumable the same way) and eval_out/qa.json."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from . import eval as ev
from .load import load


def _ints(spec: str, what: str) -> list[int]:
    try:
        return sorted({int(t) for t in spec.replace(" ", "").split(",") if t})
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {spec!r}") from None


def _ape(args: argparse.Namespace, model: Any) -> ev.APESettings:
    """APE's settings from --ape-temperature, --ape-scale and --ape-prefix (text after BOS, where
    the model's prompts begin with one)."""
    prefix = None
    if args.ape_prefix is not None:
        if model.tokenizer is None:
            raise ValueError("--ape-prefix is text and needs the model's tokenizer, and the model has none")
        from .baselines import prompt_start

        prefix = prompt_start(model) + list(model.tokenizer.encode(args.ape_prefix, add_special_tokens=False))
    return ev.APESettings(args.ape_temperature, args.ape_scale, None if prefix is None else tuple(prefix))


def _add_ape_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ape-temperature", type=float, default=1.0, help="APE: attention temperature on the windows")
    p.add_argument("--ape-scale", type=float, default=1.0, help="APE: scale of the windows' attention mass")
    p.add_argument("--ape-prefix", default=None, metavar="TEXT",
                   help="APE: the shared prefix before every window, BOS (where prompts begin with one) + TEXT "
                   "(default: BOS alone)")  # fmt: skip


def cmd_eval_lm(args: argparse.Namespace) -> int:
    contexts = _ints(args.context, "--context")
    methods = _methods(args.method, ev.ALL_METHODS)
    if args.docs is not None and args.docs < 1:
        raise ValueError(f"--docs must be >= 1, got {args.docs}")
    model = load(args.model, n_threads=args.threads)
    docs = ev.load_documents(args.data, model.tokenizer, max_docs=args.docs)
    ape = _ape(args, model)
    os.makedirs(args.out_dir, exist_ok=True)

    def on_row(method: str, row: dict[str, Any]) -> None:
        if row.get("ppl") is None:
            print(f"{method:10s} N={ev.fmt_n(row['N']):>5s}: {row['reason']}", file=sys.stderr)
        else:
            ci = row["ci95"]
            print(f"{method:10s} N={ev.fmt_n(row['N']):>5s}: ppl {row['ppl']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]",
                  file=sys.stderr)  # fmt: skip

    result = ev.evaluate_lm(
        model, docs, window=args.decoder_window, contexts=contexts, methods=methods, bootstrap=args.bootstrap,
        seed=args.seed, log_path=os.path.join(args.out_dir, "calls.jsonl"), progress=not args.json, on_row=on_row,
        ape=ape,
    )  # fmt: skip
    result = {"model": args.model, "data": args.data or "cepe.corpus.heldout_tokens()", **result}
    with open(os.path.join(args.out_dir, "lm.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    ev.write_csv(result, os.path.join(args.out_dir, "lm.csv"))
    plotted = ev.write_plot(result, os.path.join(args.out_dir, "lm.png"), title=f"{args.model}: LM protocol")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for r in ev.table(result):
            ppl = "-" if r["ppl"] is None else f"{r['ppl']:.3f} [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]"
            print(f"{r['method']:10s} N={ev.fmt_n(r['N']):>6s}  ppl {ppl}")
        print(f"written to {args.out_dir}: calls.jsonl, lm.json, lm.csv" + (", lm.png" if plotted else ""))
    return 0


def _methods(spec: str, known: tuple[str, ...]) -> list[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        raise ValueError(f"--method: unknown {bad or 'none given'}; choose from {','.join(known)}")
    return methods


def cmd_eval_qa(args: argparse.Namespace) -> int:
    from .eval_qa import QA_METHODS, evaluate_qa

    for name in ("k_decoder", "k_encoder", "shots", "max_new_tokens"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    methods = _methods(args.method, QA_METHODS)
    model = load(args.model, n_threads=args.threads)
    ape = _ape(args, model)
    corpus = None
    if args.corpus:
        from .retrieval import split_passages

        with open(args.corpus, encoding="utf-8") as f:
            corpus = split_passages(f.read())
    os.makedirs(args.out_dir, exist_ok=True)
    results = {}
    for method in methods:
        results[method] = evaluate_qa(
            model, args.data, k_decoder=args.k_decoder, k_encoder=args.k_encoder, shots=args.shots, corpus=corpus,
            max_new_tokens=args.max_new_tokens, log_path=os.path.join(args.out_dir, "answers.jsonl"), method=method,
            ape=ape,
        )  # fmt: skip
    with open(os.path.join(args.out_dir, "qa.json"), "w", encoding="utf-8") as f:
        json.dump({"model": args.model, "data": args.data, "results": results}, f, indent=1)
    summary = {m: {k: v for k, v in r.items() if k != "predictions"} for m, r in results.items()}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for m, r in summary.items():
            em, f1 = r["exact_match_ci95"] or [0.0, 0.0], r["f1_ci95"] or [0.0, 0.0]
            print(f"{m:10s} EM {r['exact_match']:.3f} [{em[0]:.3f}, {em[1]:.3f}]  "
                  f"F1 {r['f1']:.3f} [{f1[0]:.3f}, {f1[1]:.3f}]  ({r['questions']} questions)")  # fmt: skip
        print(f"written to {args.out_dir}: answers.jsonl, qa.json")
    return 0


def add_parser(sub: Any, common: Callable[..., None]) -> None:
    """`cepe eval` and its protocols, under the main parser's subcommands."""
    from .eval_qa import QA_METHODS

    ev_p = sub.add_parser("eval", help="the CEPE paper's evaluation protocols (lm, qa)")
    ev_sub = ev_p.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    lm = ev_sub.add_parser(
        "lm",
        help="perplexity of the last W-1 tokens of each document, per method and context length",
        description="The CEPE paper's language-modelling protocol: for each document x, the perplexity of its "
        "last W-1 tokens given x[-W:] in the decoder and the N tokens before it as context (cepe: through the "
        "encoder; full: in the decoder; truncation: none; streaming, replug, pcw, ape, e2llm-cepe: the training-free "
        "baselines of cepe.baselines), per method and N, with 95 % bootstrap intervals over documents. Resumable: "
        "calls.jsonl in --out-dir keeps every call's result (APE's under its settings).",
    )
    common(lm)
    lm.add_argument("--data", default=None, help="documents: .npy tokens, .jsonl ('text' or 'ids'), a text file; "
                    "default: the held-out documents cepe ships")  # fmt: skip
    lm.add_argument("--docs", type=int, default=None, help="use the first K documents")
    lm.add_argument("--decoder-window", type=int, default=256, help="decoder window W (W-1 tokens are scored)")
    lm.add_argument("--context", default="0,1024,4096", help="context lengths N, multiples of 256")
    lm.add_argument("--method", default=",".join(ev.METHODS), help=f"comma-separated, of {','.join(ev.ALL_METHODS)}")
    _add_ape_options(lm)
    lm.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws")
    lm.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    lm.add_argument("--out-dir", default="cepe_eval", help="where calls.jsonl, lm.json, lm.csv and lm.png go")
    lm.set_defaults(func=cmd_eval_lm)

    qa = ev_sub.add_parser(
        "qa",
        help="open-domain QA: exact match and F1 with passages in the decoder and the encoder",
        description="The CEPE paper's open-domain QA protocol: the top --k-decoder passages in the prompt, the "
        "next --k-encoder in the encoder, --shots demonstrations (the file's first examples), greedy answers of "
        "at most --max-new-tokens tokens; exact match and F1 with SQuAD's answer normalisation. --method picks "
        "how the passages are used (cepe: as above; truncation: the --k-decoder ones only; full: all in the prompt; "
        "replug: each in a prompt of its own, next-token distributions mixed by retrieval score; pcw, ape: parallel "
        "windows). Resumable: answers.jsonl in --out-dir keeps every answer, under its method and settings.",
    )
    common(qa)
    qa.add_argument("--data", required=True, help="QA JSON lines: question, answers, passages ({title, text, score})")
    qa.add_argument("--corpus", default=None, help="a text file to retrieve from (BM25) for lines without passages")
    qa.add_argument("--k-decoder", type=int, default=5, help="passages in the decoder's prompt")
    qa.add_argument("--k-encoder", type=int, default=0, help="further passages through the encoder")
    qa.add_argument("--shots", type=int, default=2, help="demonstrations (the first examples, not scored)")
    qa.add_argument("--max-new-tokens", type=int, default=25, help="the longest answer")
    qa.add_argument("--method", default="cepe", help=f"comma-separated, of {','.join(QA_METHODS)}")
    _add_ape_options(qa)
    qa.add_argument("--out-dir", default="cepe_eval", help="where answers.jsonl and qa.json (results per method) go")
    qa.set_defaults(func=cmd_eval_qa)
