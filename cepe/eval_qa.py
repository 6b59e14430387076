"""The CEPE paper's open-domain QA protocol (spec §7.3) over a JSON-lines file:
for each question, the top k_decoder passages go into the prompt and the next
k_encoder into the encoder (one chunk each), with two demonstrations (for
CEPE packed into one more encoder chunk, question and answer only); greedy
decoding of at most 25 tokens, stopping at a newline (cepe.rag.answer); exact
match and F1 with the SQuAD v1.1 evaluation's answer normalisation. The
baselines answer from the same passages (cepe.eval_qa_methods: truncation,
full, replug, pcw, ape).

    result = cepe.eval.evaluate_qa(model, "nq.jsonl", k_decoder=5, k_encoder=10, method="cepe")

Each line: {"question": str, "answers": [str, ...], "passages": [{"title", "text", "score"} | str, ...]}
("ctxs" is read as "passages"; "score", the retrieval score, weighs REPLUG's
ensemble; without passages, `corpus` gives a BM25 retriever). The first `shots`
lines are the demonstrations and are not scored.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from .baselines import APESettings
from .bootstrap import bootstrap_indices, interval
from .eval_qa_methods import QA_METHODS, QAAnswerer

__all__ = ["QA_METHODS", "evaluate_qa", "exact_match", "f1_score", "normalize_answer", "read_qa"]


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces (SQuAD's)."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised answer, else 0.0."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """The best token-overlap F1 of the prediction against the answers (0 without a common
    token, also when both normalise to nothing, as SQuAD v1.1's evaluation scores it)."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for a in answers:
        gold = normalize_answer(a).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def read_qa(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The examples of a QA JSON-lines file, checked."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{os.fspath(path)}: line {n} is not JSON ({exc.msg})") from None
            q, answers = ex.get("question"), ex.get("answers")
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"{os.fspath(path)}: line {n}: 'question' must be a non-empty string")
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{os.fspath(path)}: line {n}: 'answers' must be a non-empty list of strings")
            passages = ex.get("passages", ex.get("ctxs"))
            if passages is not None and not isinstance(passages, list):
                raise ValueError(f"{os.fspath(path)}: line {n}: 'passages' must be a list")
            out.append({"question": q, "answers": answers, "passages": passages})
    return out


def _passages(items: list[Any], i: int) -> list[Any]:
    """The file's passages ({"title", "text"} objects or strings), in the file's order."""
    from .retrieval import Passage

    out = []
    for j, p in enumerate(items):
        if isinstance(p, str):
            out.append(Passage(p, 0.0, j))
        elif isinstance(p, dict) and isinstance(p.get("text"), str):
            try:  # DPR-style files write the score as a string
                score = float(p.get("score", 0.0))
            except (TypeError, ValueError):
                score = float("nan")
            if not np.isfinite(score):
                raise ValueError(f"example {i}: passage {j}: 'score' must be a finite number, got {p['score']!r}")
            out.append(Passage(p["text"], score, j, str(p.get("title") or "")))
        else:
            raise ValueError(f"example {i}: passage {j} must be a string or an object with a 'text' string")
    return out


def _done(log_path: str | None, run: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The answers the log holds for this run's settings (method, passages, APE's settings...)."""
    if not log_path or not os.path.exists(log_path):
        return {}
    done = {}
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # an interrupted write: the rest is computed again
            if rec.get("run") == run:
                done[rec["index"]] = rec
    return done


def evaluate_qa(
    model: Any,
    data: str | os.PathLike[str] | Sequence[dict[str, Any]],
    *,
    k_decoder: int = 5,
    k_encoder: int = 0,
    shots: int = 2,
    corpus: Sequence[str] | None = None,
    max_new_tokens: int = 25,
    bootstrap: int = 1000,
    seed: int = 0,
    log_path: str | os.PathLike[str] | None = None,
    method: str = "cepe",
    ape: APESettings | None = None,
) -> dict[str, Any]:
    """Exact match and F1 (means, with 95 % bootstrap intervals) and each prediction of one
    method (QA_METHODS; cepe.eval_qa_methods), from the top k_decoder + k_encoder passages of
    each question. ape: APE's settings (default APESettings()). With log_path every answer is
    appended to that JSON-lines file and a rerun with the same settings skips those done."""
    from .retrieval import BM25Retriever

    examples = read_qa(data) if isinstance(data, (str, os.PathLike)) else list(data)
    if len(examples) <= shots:
        raise ValueError(f"need more than shots = {shots} examples (the first {shots} are the demonstrations)")
    demos = [(ex["question"], ex["answers"][0]) for ex in examples[:shots]]
    answerer = QAAnswerer(
        model, method, k_decoder=k_decoder, k_encoder=k_encoder, demos=demos, max_new_tokens=max_new_tokens, ape=ape
    )
    run: dict[str, Any] = {"method": method, "k_decoder": k_decoder, "k_encoder": k_encoder, "shots": shots,
                           "max_new_tokens": max_new_tokens}  # fmt: skip
    if method == "ape":
        run["ape"] = answerer.ape.as_dict(model)
    log = None if log_path is None else os.fspath(log_path)
    done = _done(log, run)
    k = k_decoder + k_encoder
    bm25: BM25Retriever | None = None
    records = []
    for i, ex in enumerate(examples[shots:], start=shots):
        rec = done.get(i)
        if rec is None or rec.get("question") != ex["question"]:
            if ex["passages"] is not None:
                found = _passages(ex["passages"], i)[:k]
            elif corpus is not None:
                bm25 = BM25Retriever(list(corpus)) if bm25 is None else bm25
                found = bm25(ex["question"], min(k, len(bm25.passages))) if k else []
            else:
                raise ValueError(f"example {i} has no passages and no corpus was given")
            text = answerer(ex["question"], found)
            rec = {
                "index": i, "question": ex["question"], "prediction": text, "answers": ex["answers"],
                "em": exact_match(text, ex["answers"]), "f1": f1_score(text, ex["answers"]), "run": run,
            }  # fmt: skip
            if log:
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
        records.append(rec)
    em, f1 = np.array([r["em"] for r in records]), np.array([r["f1"] for r in records])
    idx = bootstrap_indices(len(records), bootstrap, seed)
    return {
        "method": method,
        **({"ape": run["ape"]} if "ape" in run else {}),
        "k_decoder": k_decoder,
        "k_encoder": k_encoder,
        "shots": shots,
        "questions": len(records),
        "exact_match": float(em.mean()),
        "exact_match_ci95": interval(em[idx].mean(axis=1)),
        "f1": float(f1.mean()),
        "f1_ci95": interval(f1[idx].mean(axis=1)),
        "predictions": records,
    }
