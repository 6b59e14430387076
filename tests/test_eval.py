"""cepe.eval and `cepe eval lm`: the paper's LM protocol against the PyTorch
reference on a tiny CEPE model, resuming from the calls log, and the outputs."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import cepe.eval as ev
from cepe.cli import main

W = 16


class Counting:
    """A model whose perplexity calls are counted (or refused)."""

    def __init__(self, model, refuse: bool = False) -> None:
        self.model, self.config, self.calls, self.refuse = model, model.config, 0, refuse

    def perplexity(self, *args, **kwargs):
        if self.refuse:
            raise AssertionError("a call that the log already holds ran again")
        self.calls += 1
        return self.model.perplexity(*args, **kwargs)


def docs_for(n_docs: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 101, size=length + 7 * i) for i in range(n_docs)]


def ref_nll(ref, dec: np.ndarray, chunks: np.ndarray | None = None) -> float:
    """Mean NLL of the last W-1 tokens of dec, from the reference's logits."""
    E = None if chunks is None else ref.encode(chunks[None])
    logits = ref.forward(dec[None], E)[0].double()
    logp = torch.log_softmax(logits[-W:-1], -1)
    return float(-logp[torch.arange(W - 1), torch.as_tensor(dec[-(W - 1) :])].mean())


@pytest.mark.cepe_config(max_position_embeddings=300)
def test_protocol_matches_the_reference(tiny_cepe, reference):
    ref = reference.load_reference(tiny_cepe.path)
    model = Counting(tiny_cepe.load())
    docs = docs_for(3, W + 512)
    result = ev.evaluate_lm(model, docs, window=W, contexts=[0, 256, 512], bootstrap=500)
    rows = result["results"]
    for d, x in enumerate(docs):
        trunc = ref_nll(ref, x[-W:])
        for r in rows["truncation"]:
            assert r["nll_per_doc"][d] == pytest.approx(trunc, abs=1e-4)
        for r in rows["cepe"]:
            n = r["N"]
            want = trunc if n == 0 else ref_nll(ref, x[-W:], x[-W - n : -W].reshape(-1, 256))
            assert r["nll_per_doc"][d] == pytest.approx(want, abs=1e-4), (d, n)
        full = {r["N"]: r for r in rows["full"]}
        assert full[256]["nll_per_doc"][d] == pytest.approx(ref_nll(ref, x[-W - 256 :]), abs=1e-4)
    assert full[512]["ppl"] is None and "max_position_embeddings 300" in full[512]["reason"]
    # identical calls run once: truncation = cepe at 0 = full at 0 (one call), cepe at 256, 512, full at 256
    assert model.calls == 4 * len(docs)
    for method in ("cepe", "truncation"):
        for r in rows[method]:
            assert r["ppl"] == pytest.approx(np.exp(np.mean(r["nll_per_doc"])))
            assert r["ci95"][0] <= r["ppl"] <= r["ci95"][1]
    diffs = {p["N"]: p for p in result["paired"]["cepe_minus_truncation"]}
    assert diffs[0]["diff"] == 0 and diffs[0]["ci95"] == [0.0, 0.0]
    table = ev.table(result)
    assert {(t["method"], t["N"]) for t in table} == {(m, n) for m in ev.METHODS for n in (0, 256, 512)}


def test_resumes_from_the_calls_log(tiny_cepe, tmp_path):
    model = tiny_cepe.load()
    docs = docs_for(2, W + 256)
    log = tmp_path / "calls.jsonl"
    first = ev.evaluate_lm(Counting(model), docs, window=W, contexts=[0, 256], log_path=log, bootstrap=50)
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * 3  # per document: truncation (shared with cepe/full at 0), cepe at 256, full at 256
    again = ev.evaluate_lm(Counting(model, refuse=True), docs, window=W, contexts=[0, 256], log_path=log, bootstrap=50)
    assert again["resumed_calls"] == len(lines)
    assert again["results"] == first["results"]  # JSON keeps every float exactly
    # an interrupted run: two complete lines and half a line; the rest is computed
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    counting = Counting(model)
    third = ev.evaluate_lm(counting, docs, window=W, contexts=[0, 256], log_path=log, bootstrap=50)
    assert counting.calls == len(lines) - 2
    for m in ev.METHODS:
        for a, b in zip(first["results"][m], third["results"][m], strict=True):
            assert a["nll_per_doc"] == pytest.approx(b["nll_per_doc"], abs=1e-12)
    with pytest.raises(ValueError, match="another run"):
        ev.evaluate_lm(model, docs, window=W + 1, contexts=[0], log_path=log)


def test_bad_arguments(tiny_llama, tiny_cepe, tmp_path):
    llama = tiny_llama.load()
    docs = docs_for(1, W + 256)
    with pytest.raises(ValueError, match="not a CEPE model"):
        ev.evaluate_lm(llama, docs, window=W, contexts=[0, 256])
    with pytest.raises(ValueError, match="multiple of 256"):
        ev.evaluate_lm(llama, docs, window=W, contexts=[100], methods=["truncation"])
    with pytest.raises(ValueError, match="fewer than"):
        ev.evaluate_lm(llama, docs, window=W, contexts=[512], methods=["full"])
    with pytest.raises(ValueError, match="unknown method"):
        ev.evaluate_lm(llama, docs, window=W, methods=["replug?"])
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="tokenizer"):
        ev.load_documents(tmp_path / "d.jsonl", None)
    np.save(tmp_path / "d.npy", np.zeros((2, 3, 4), np.int64))
    with pytest.raises(ValueError, match="1-D or 2-D"):
        ev.load_documents(tmp_path / "d.npy")


def test_cli_writes_json_csv_plot_and_resumes(tiny_cepe, tmp_path, capsys):
    data = tmp_path / "docs.npy"
    np.save(data, np.stack(docs_for(1, W + 256)[:1] * 2))
    out = tmp_path / "out"
    argv = ["eval", "lm", "--model", tiny_cepe.path, "--data", str(data), "--decoder-window", str(W),
            "--context", "0,256", "--bootstrap", "100", "--out-dir", str(out), "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "cepe" in text and "N=   256" in text
    result = json.loads((out / "lm.json").read_text())
    assert result["docs"] == 2 and result["contexts"] == [0, 256]
    with open(out / "lm.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["method"] for r in rows} == set(ev.METHODS)
    if importlib.util.find_spec("matplotlib"):  # an optional dependency: no plot without it
        assert os.path.getsize(out / "lm.png") > 1000
    n_lines = len((out / "calls.jsonl").read_text().splitlines())
    assert main([*argv, "--json"]) == 0  # the rerun takes every call from the log
    again = json.loads(capsys.readouterr().out)
    assert again["resumed_calls"] == n_lines
    assert again["results"]["cepe"][1]["nll_per_doc"] == result["results"]["cepe"][1]["nll_per_doc"]
    assert main([*argv, "--method", "ape", "--ape-scale", "0.5", "--json"]) == 0  # APE's settings reach the run
    ape = json.loads(capsys.readouterr().out)
    assert ape["ape"] == {"temperature": 1.0, "scale": 0.5, "prefix": [1]} and ape["resumed_calls"] == 2
    assert ape["results"]["ape"][1]["nll_per_doc"] != result["results"]["cepe"][1]["nll_per_doc"]
    assert main([*argv, "--method", "ape", "--ape-temperature", "0"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["eval", "lm", "--model", tiny_cepe.path, "--method", "streaming?"]) == 2
    assert "--method" in capsys.readouterr().err
