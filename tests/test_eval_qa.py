"""cepe eval qa / cepe.eval.evaluate_qa: the answer metrics against hand-worked
examples and the SQuAD v1.1 evaluation's logic written here, each method's
answers against the PyTorch reference's greedy answers on prompts built here
from the protocol's description, the protocol's loop on a tiny CEPE model with
a QA set written here, resuming, and the command."""

from __future__ import annotations

import json
import pathlib
import re
import string
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import TEXT, write_tokenizer
from test_baselines import torch_ape_logits, torch_pcw_logits

import cepe.eval as ev
from cepe.cli import main
from cepe.eval_qa import normalize_answer


def test_metrics_by_hand():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert ev.exact_match("the cat", ["A cat.", "dog"]) == 1.0
    assert ev.exact_match("cats", ["cat"]) == 0.0
    # prediction "black cat sat", gold "the cat sat down": common {cat, sat} = 2; p = 2/3, r = 2/3
    assert ev.f1_score("black cat sat", ["the cat sat down"]) == pytest.approx(2 / 3)
    assert ev.f1_score("black cat sat", ["dog", "black cat sat"]) == 1.0
    assert ev.f1_score("", ["the"]) == 0.0  # both normalise to nothing: no common token (SQuAD v1.1)
    assert ev.exact_match("", ["the"]) == 1.0
    assert ev.f1_score("x", ["y"]) == 0.0


# --- SQuAD v1.1's evaluate-v1.1.py, its logic written out as the oracle of the metrics


def squad_normalize(s: str) -> str:
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def squad_f1(prediction: str, ground_truth: str) -> float:
    prediction_tokens = squad_normalize(prediction).split()
    ground_truth_tokens = squad_normalize(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def squad_em(prediction: str, ground_truth: str) -> bool:
    return squad_normalize(prediction) == squad_normalize(ground_truth)


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


TRICKY = [
    ("The Beatles", ["the beatles!"]),
    ("  An   apple a day ", ["apple day"]),
    ("U.S.A.", ["USA", "United States"]),
    ("theatre", ["the atre"]),  # "the" inside a word stays
    ("Anne and the Andes", ["anne andes"]),
    ("a, an, the", [""]),  # normalises to nothing, as the gold does
    ("", ["the", "an"]),
    ("cat cat cat", ["the cat", "cat cat dog"]),  # Counter: repeated tokens count once per match
    ("New York City", ["new york", "york city new", "NYC"]),
    ("it's 42%", ["its 42"]),
    ("Café—au-lait", ["café—aulait"]),  # an em dash is not ASCII punctuation
    ("THE END.", ["end"]),
    ("x", ["y"]),
    ("tab\tand\nnewline", ["tab and newline"]),
    ("1,000,000", ["1000000", "one million"]),
]


@pytest.mark.parametrize("prediction,golds", TRICKY)
def test_metrics_match_the_squad_v11_evaluation(prediction, golds):
    assert normalize_answer(prediction) == squad_normalize(prediction)
    assert ev.exact_match(prediction, golds) == float(metric_max_over_ground_truths(squad_em, prediction, golds))
    assert ev.f1_score(prediction, golds) == pytest.approx(metric_max_over_ground_truths(squad_f1, prediction, golds))


def test_metrics_match_the_squad_v11_evaluation_on_random_answers():
    rng = np.random.default_rng(0)
    words = ["the", "The", "a", "an", "An", "cat", "Cat.", "dog", ",", "!", "a.b", "it's", " ", "\t", "THE", "an-t"]
    f1s = []
    for _ in range(400):
        pred = " ".join(rng.choice(words, size=rng.integers(0, 6)))
        golds = [" ".join(rng.choice(words, size=rng.integers(0, 5))) for _ in range(rng.integers(1, 4))]
        assert ev.exact_match(pred, golds) == float(metric_max_over_ground_truths(squad_em, pred, golds))
        f1s.append(ev.f1_score(pred, golds))
        assert f1s[-1] == pytest.approx(metric_max_over_ground_truths(squad_f1, pred, golds))
    assert 0 < np.mean(f1s) < 1 and len(set(f1s)) > 5  # the cases cover partial overlaps


def qa_set(n: int = 5) -> list[dict]:
    sentences = [s.strip() for s in TEXT.split(".") if s.strip()][:8]
    return [
        {
            "question": f"what is item {i}?",
            "answers": [sentences[i % 8].split()[-1], "fox"],
            "passages": [
                {"title": f"t{j}", "text": sentences[(i + j) % 8], "score": f"{1.5 - 0.9 * j + 0.3 * i:.2f}"}
                for j in range(4)
            ],
        }
        for i in range(n)
    ]


def spec_prompt(question: str, passages: list[dict], demos: list[tuple[str, str]]) -> str:
    """The paper's QA prompt (spec §7.3): `Document (Title: t): text` blocks, then the
    demonstrations and the question, as "Question: q\nAnswer: a", separated by blank lines."""
    blocks = [f"Document (Title: {p['title']}): {p['text']}" for p in passages]
    shots = [f"Question: {q}\nAnswer: {a}" for q, a in demos]
    return "\n\n".join([*blocks, *shots, f"Question: {question}\nAnswer:"])


def left_padded(rows: list[list[int]], length: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One encoder chunk per passage: its last `length` tokens, padded on the left (masked)."""
    ids, mask = np.zeros((len(rows), length), np.int64), np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        r = r[-length:]
        ids[i, length - len(r) :], mask[i, length - len(r) :] = r, 1
    return ids, mask


def reference_next(ref, tok, q: str, ps: list[dict], demos, method: str, k_decoder: int, ape):
    """The reference's next-token logits given the answer so far, by the method's description,
    on prompts built here."""
    enc = lambda text: tok.encode(text).ids  # noqa: E731 - with BOS, as a prompt is
    raw = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    blocks = [f"Document (Title: {p['title']}): {p['text']}\n\n" for p in ps]
    assert "".join(blocks) + spec_prompt(q, [], demos) == spec_prompt(q, ps, demos)  # the windows' split
    task = raw(spec_prompt(q, [], demos))
    if method == "cepe":  # the demonstrations packed into one more encoder chunk
        ids = enc(spec_prompt(q, ps[:k_decoder], []))
        shots = "\n\n".join(f"Question: {a}\nAnswer: {b}" for a, b in demos)
        chunks, mask = left_padded([raw(p["text"]) for p in ps[k_decoder:]] + [raw(shots)])
        E = ref.encode(chunks[None], mask[None])
        return lambda out: ref.forward(np.array([ids + out]), E, mask[None])[0, -1]
    if method in ("truncation", "full"):
        ids = enc(spec_prompt(q, ps[: k_decoder if method == "truncation" else None], demos))
        return lambda out: ref.forward(np.array([ids + out]))[0, -1]
    if method == "replug":
        prompts = [enc(spec_prompt(q, [p], demos)) for p in ps]
        w = torch.softmax(torch.tensor([float(p["score"]) for p in ps], dtype=torch.float64), 0)

        def mixed(out):
            probs = [torch.softmax(ref.forward(np.array([ids + out]))[0, -1].double(), -1) for ids in prompts]
            return torch.log(sum(wk * pk for wk, pk in zip(w, probs, strict=True)))

        return mixed
    if method == "pcw":  # each window a prompt of its own (BOS first)
        windows = [np.array(enc(b)) for b in blocks]
        return lambda out: torch_pcw_logits(ref.lm, windows, np.array(task + out))[-1]
    windows = [np.array(raw(b)) for b in blocks]  # ape: after the shared prefix, BOS
    return lambda out: torch_ape_logits(ref.lm, np.array([1]), windows, np.array(task + out), *ape)[-1]


@torch.no_grad()
def reference_answers(ref, tok, data, method: str, k_decoder: int, k_encoder: int, n_new: int, ape=(1.0, 1.0)):
    """Each scored question's greedy answer of the torch reference (at most n_new tokens,
    stopping at EOS, cut at a newline)."""
    demos = [(ex["question"], ex["answers"][0]) for ex in data[:2]]
    answers = []
    for ex in data[2:]:
        nxt = reference_next(ref, tok, ex["question"], ex["passages"][: k_decoder + k_encoder], demos, method,
                             k_decoder, ape)  # fmt: skip
        out: list[int] = []
        for _ in range(n_new):
            t = int(torch.argmax(nxt(out)))
            if t == 2:  # EOS
                break
            out.append(t)
        answers.append(tok.decode(out, skip_special_tokens=True).split("\n")[0].strip())
    return answers


@pytest.mark.parametrize("method", ["cepe", "truncation", "full", "replug", "pcw", "ape"])
def test_each_method_answers_as_the_reference_does(tiny_cepe, reference, method):
    from tokenizers import Tokenizer

    write_tokenizer(pathlib.Path(tiny_cepe.path), 101)
    tok = Tokenizer.from_file(str(pathlib.Path(tiny_cepe.path) / "tokenizer.json"))
    ref = reference.load_reference(tiny_cepe.path)
    model = tiny_cepe.load()
    data = qa_set()
    ape = ev.APESettings(temperature=0.8, scale=0.9)
    result = ev.evaluate_qa(model, data, k_decoder=1, k_encoder=2, max_new_tokens=10, method=method, ape=ape)
    got = [p["prediction"] for p in result["predictions"]]
    assert got == reference_answers(ref, tok, data, method, 1, 2, 10, ape=(0.8, 0.9))
    assert result["method"] == method and all(got)


def test_the_methods_differ_and_check_their_arguments(tiny_cepe, tiny_llama):
    write_tokenizer(pathlib.Path(tiny_cepe.path), 101)
    model = tiny_cepe.load()
    data = qa_set()
    preds = {
        m: tuple(p["prediction"] for p in ev.evaluate_qa(model, data, k_decoder=1, k_encoder=2, max_new_tokens=6,
                                                         method=m)["predictions"])
        for m in ev.QA_METHODS
    }  # fmt: skip
    assert len(set(preds.values())) >= 5, preds  # each method reads the passages its own way
    with pytest.raises(ValueError, match="unknown QA method"):
        ev.evaluate_qa(model, data, method="streaming")
    with pytest.raises(ValueError, match="needs passages"):
        ev.evaluate_qa(model, data, k_decoder=0, method="pcw")
    bad = [dict(ex) for ex in data]
    bad[3] = {**bad[3], "passages": [{"text": "x", "score": "high"}]}
    with pytest.raises(ValueError, match="score"):
        ev.evaluate_qa(model, bad, k_decoder=1, method="replug")
    write_tokenizer(pathlib.Path(tiny_llama.path), 101)
    with pytest.raises(ValueError, match="CEPE model"):
        ev.evaluate_qa(tiny_llama.load(), data, k_decoder=1, k_encoder=1, method="cepe")


class Refusing:
    def __init__(self, model) -> None:
        self.config, self.tokenizer = model.config, model.tokenizer

    def generate_text(self, *a, **k):
        raise AssertionError("an answer the log holds was generated again")


def test_protocol_loop_metrics_and_resume(tiny_cepe, tmp_path):
    write_tokenizer(pathlib.Path(tiny_cepe.path), 101)
    model = tiny_cepe.load()
    data = qa_set()
    log = tmp_path / "answers.jsonl"
    result = ev.evaluate_qa(model, data, k_decoder=1, k_encoder=2, log_path=log, bootstrap=100)
    assert result["questions"] == 3  # the first two are the demonstrations
    preds = result["predictions"]
    assert [p["index"] for p in preds] == [2, 3, 4]
    for p in preds:
        assert p["em"] == ev.exact_match(p["prediction"], p["answers"])
        assert p["f1"] == ev.f1_score(p["prediction"], p["answers"])
    assert result["exact_match"] == pytest.approx(sum(p["em"] for p in preds) / 3)
    # an answer set to the prediction scores 1
    data2 = [dict(ex) for ex in data]
    data2[2] = {**data2[2], "answers": [preds[0]["prediction"]]}
    again = ev.evaluate_qa(Refusing(model), data, k_decoder=1, k_encoder=2, log_path=log)
    assert again["predictions"] == preds
    fresh = ev.evaluate_qa(model, data2, k_decoder=1, k_encoder=2)
    assert fresh["predictions"][0]["prediction"] == preds[0]["prediction"]  # greedy: the same answer
    assert preds[0]["prediction"] and fresh["predictions"][0]["em"] == 1.0
    with pytest.raises(ValueError, match="more than shots"):
        ev.evaluate_qa(model, data[:2], k_decoder=1)


def test_command(tiny_cepe, tmp_path, capsys):
    write_tokenizer(pathlib.Path(tiny_cepe.path), 101)
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in qa_set(4)))
    out = tmp_path / "out"
    argv = ["eval", "qa", "--model", tiny_cepe.path, "--data", str(path), "--k-decoder", "1", "--k-encoder", "1",
            "--out-dir", str(out), "--json", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)["cepe"]
    assert summary["questions"] == 2 and 0.0 <= summary["f1"] <= 1.0
    saved = json.loads((out / "qa.json").read_text())
    assert len(saved["results"]["cepe"]["predictions"]) == 2
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2
    # more methods, APE's settings: each answered and logged under its own key
    assert main([*argv, "--method", "cepe,full,ape", "--ape-temperature", "0.5", "--ape-prefix", "the fox"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary) == ["cepe", "full", "ape"]
    assert summary["ape"]["ape"]["temperature"] == 0.5 and summary["ape"]["ape"]["prefix"][0] == 1
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2 * 3  # cepe's two were taken from the log
    assert main([*argv, "--method", "cepe,bogus"]) == 2
    assert "--method" in capsys.readouterr().err
    path.write_text('{"question": "q", "answers": "not a list"}\n')
    assert main(argv) == 2
    assert "answers" in capsys.readouterr().err
