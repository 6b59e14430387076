"""cepe eval qa / cepe.eval.evaluate_qa: the answer metrics against hand-worked
examples, the protocol's loop on a tiny CEPE model with a QA set written here,
resuming, and the command."""

from __future__ import annotations

import json
import pathlib

import pytest
from conftest import TEXT, write_tokenizer

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
    assert ev.f1_score("", ["the"]) == 1.0  # both normalise to nothing
    assert ev.f1_score("x", ["y"]) == 0.0


def qa_set(n: int = 5) -> list[dict]:
    sentences = [s.strip() for s in TEXT.split(".") if s.strip()][:8]
    return [
        {
            "question": f"what is item {i}?",
            "answers": [sentences[i % 8].split()[-1], "fox"],
            "passages": [{"title": f"t{j}", "text": sentences[(i + j) % 8]} for j in range(4)],
        }
        for i in range(n)
    ]


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
    summary = json.loads(capsys.readouterr().out)
    assert summary["questions"] == 2 and 0.0 <= summary["f1"] <= 1.0
    saved = json.loads((out / "qa.json").read_text())
    assert len(saved["predictions"]) == 2
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2
    path.write_text('{"question": "q", "answers": "not a list"}\n')
    assert main(argv) == 2
    assert "answers" in capsys.readouterr().err
