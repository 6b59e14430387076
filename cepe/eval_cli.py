"""`cepe eval`: the paper's evaluation protocols as commands (cepe.eval does the work).

    cepe eval lm --model smollm2-135m-cepe --context 0,1024,4096 --out-dir eval_out

writes eval_out/calls.jsonl (one line per perplexity call, appended as it
completes: a rerun with the same --out-dir skips what is done),
eval_out/lm.json, eval_out/lm.csv and eval_out/lm.png."""

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


def cmd_eval_lm(args: argparse.Namespace) -> int:
    contexts = _ints(args.context, "--context")
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in ev.ALL_METHODS]
    if bad or not methods:
        raise ValueError(f"--method: unknown {bad or 'none given'}; choose from {','.join(ev.ALL_METHODS)}")
    if args.docs is not None and args.docs < 1:
        raise ValueError(f"--docs must be >= 1, got {args.docs}")
    model = load(args.model, n_threads=args.threads)
    docs = ev.load_documents(args.data, model.tokenizer, max_docs=args.docs)
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


def cmd_eval_qa(args: argparse.Namespace) -> int:
    from .eval_qa import evaluate_qa

    for name in ("k_decoder", "k_encoder", "shots", "max_new_tokens"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    model = load(args.model, n_threads=args.threads)
    corpus = None
    if args.corpus:
        from .retrieval import split_passages

        with open(args.corpus, encoding="utf-8") as f:
            corpus = split_passages(f.read())
    os.makedirs(args.out_dir, exist_ok=True)
    result = evaluate_qa(
        model, args.data, k_decoder=args.k_decoder, k_encoder=args.k_encoder, shots=args.shots, corpus=corpus,
        max_new_tokens=args.max_new_tokens, log_path=os.path.join(args.out_dir, "answers.jsonl"),
    )  # fmt: skip
    result = {"model": args.model, "data": args.data, **result}
    with open(os.path.join(args.out_dir, "qa.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    summary = {k: v for k, v in result.items() if k != "predictions"}
    print(json.dumps(summary, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def add_parser(sub: Any, common: Callable[..., None]) -> None:
    """`cepe eval` and its protocols, under the main parser's subcommands."""
    ev_p = sub.add_parser("eval", help="the CEPE paper's evaluation protocols (lm, qa)")
    ev_sub = ev_p.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    lm = ev_sub.add_parser(
        "lm",
        help="perplexity of the last W-1 tokens of each document, per method and context length",
        description="The CEPE paper's language-modelling protocol: for each document x, the perplexity of its "
        "last W-1 tokens given x[-W:] in the decoder and the N tokens before it as context (cepe: through the "
        "encoder; full: in the decoder; truncation: none), per method and N, with 95 % bootstrap intervals over "
        "documents. Resumable: calls.jsonl in --out-dir keeps every call's result.",
    )
    common(lm)
    lm.add_argument("--data", default=None, help="documents: .npy tokens, .jsonl ('text' or 'ids'), a text file; "
                    "default: the held-out documents cepe ships")  # fmt: skip
    lm.add_argument("--docs", type=int, default=None, help="use the first K documents")
    lm.add_argument("--decoder-window", type=int, default=256, help="decoder window W (W-1 tokens are scored)")
    lm.add_argument("--context", default="0,1024,4096", help="context lengths N, multiples of 256")
    lm.add_argument("--method", default=",".join(ev.METHODS), help=f"comma-separated, of {','.join(ev.ALL_METHODS)}")
    lm.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws")
    lm.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    lm.add_argument("--out-dir", default="cepe_eval", help="where calls.jsonl, lm.json, lm.csv and lm.png go")
    lm.set_defaults(func=cmd_eval_lm)

    qa = ev_sub.add_parser(
        "qa",
        help="open-domain QA: exact match and F1 with passages in the decoder and the encoder",
        description="The CEPE paper's open-domain QA protocol: the top --k-decoder passages in the prompt, the "
        "next --k-encoder in the encoder, --shots demonstrations (the file's first examples), greedy answers of "
        "at most --max-new-tokens tokens; exact match and F1 with SQuAD's answer normalisation. Resumable: "
        "answers.jsonl in --out-dir keeps every answer.",
    )
    common(qa)
    qa.add_argument("--data", required=True, help="QA JSON lines: question, answers, passages ({title, text})")
    qa.add_argument("--corpus", default=None, help="a text file to retrieve from (BM25) for lines without passages")
    qa.add_argument("--k-decoder", type=int, default=5, help="passages in the decoder's prompt")
    qa.add_argument("--k-encoder", type=int, default=0, help="further passages through the encoder")
    qa.add_argument("--shots", type=int, default=2, help="demonstrations (the first examples, not scored)")
    qa.add_argument("--max-new-tokens", type=int, default=25, help="the longest answer")
    qa.add_argument("--out-dir", default="cepe_eval", help="where answers.jsonl and qa.json go")
    qa.set_defaults(func=cmd_eval_qa)
