"""cepe.teacher / `cepe teacher`: the CEPED teacher tables (spec CEPE.md §6.4, the reference's
data/calculate_logits.py), checked against transformers' logits of the whole window, then fed
to `cepe train` with kl_loss_cof > 0. The teacher is a tiny random LlamaForCausalLM (conftest),
and the student is a tiny CEPE model (cepe.testing.reference) that shares its vocabulary."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import run_cli, run_config, write_config

import cepe
import cepe.teacher as ct
from cepe.teacher import teacher_tables, top_k_table
from cepe.testing.reference import make_reference
from cepe.train_run import load_config

V = 101  # make_reference's decoder vocabulary; the teacher's too
N_TOK, DEC, N_CTX, CTX = 400, 24, 2, 8
W = N_CTX * CTX + DEC  # a stage-2 window: 16 encoder tokens + 24 decoder tokens


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return make_reference(seed=7).save(str(tmp_path_factory.mktemp("teacher_student")))


@pytest.fixture(scope="module")
def teacher(model_factory):
    return model_factory("teacher_v101", vocab_size=V, seed=5)  # (dir, transformers model)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher_data")
    toks = np.random.default_rng(0).integers(3, V, size=N_TOK).astype(np.int32)
    np.save(d / "stream.npy", toks)
    return str(d / "stream.npy"), toks


def stage2_cfg(student_dir, stream, out, **kw) -> dict:
    stage2 = dict(stage="stage2", decoder_len=DEC, n_ctx=N_CTX, ctx_len=CTX, batch_size=2, total_steps=2, lr=1e-3)
    return run_config(student_dir, stream[0], out, **{**stage2, **kw})


def oracle(hf, window: np.ndarray, t_kl: int, k: int):
    """transformers' logits of the whole window -> float64 softmax -> torch.topk, for the last t_kl
    positions: (probabilities (t_kl, k + 1), ids (t_kl, k + 1)): one more than kept, to see gaps."""
    with torch.no_grad():
        logits = hf(torch.as_tensor(window, dtype=torch.long)[None]).logits[0, -t_kl:]
    p = torch.softmax(logits.double(), dim=-1)
    top = torch.topk(p, k + 1, dim=-1)
    return top.values.numpy(), top.indices.numpy()


# ------------------------------------------------------------------ the tables against an oracle


@pytest.mark.parametrize("stage, t_kl, k", [("stage2", None, 10), ("stage2", 7, 1), ("warmup", None, 50)])
def test_tables_match_transformers(student_dir, teacher, stream, tmp_path, monkeypatch, stage, t_kl, k):
    """One row per window in window-number order, (n, T_kl, K + 1) float16 and (n, T_kl, K) int32; row r of
    window i is the teacher's softmax at window position W - T_kl + r after reading the whole window
    (stage 2: the encoder's 16 tokens, then the decoder's 24), as transformers computes it."""
    monkeypatch.setattr(ct, "SLICE", 5)  # several scored slices per window, after the cached prefix
    kw = dict(stage="warmup", n_ctx=4, ctx_len=DEC // 4) if stage == "warmup" else {}
    cfg = load_config(write_config(tmp_path / "c.json", stage2_cfg(student_dir, stream, tmp_path / "o", **kw)))
    win = DEC if stage == "warmup" else W
    n = (N_TOK - win) // DEC + 1
    tdir, hf = teacher
    out = teacher_tables(tdir, cfg, top_k=k, t_kl=t_kl, progress=False)
    T = DEC if t_kl is None else t_kl
    pp, ip = str(tmp_path / "o" / "distill_prob.npy"), str(tmp_path / "o" / "distill_index.npy")
    assert (out["n_windows"], out["T_kl"], out["K"], out["distill_prob"], out["distill_index"]) == (n, T, k, pp, ip)
    assert sorted(os.listdir(tmp_path / "o")) == ["distill_index.npy", "distill_prob.npy"]  # no temporary files
    prob, index = np.load(pp), np.load(ip)
    assert prob.shape == (n, T, k + 1) and prob.dtype == np.float16
    assert index.shape == (n, T, k) and index.dtype == np.int32
    assert out["prob_shape"] == list(prob.shape) and out["index_shape"] == list(index.shape)
    assert np.all(np.diff(prob[..., :k].astype(np.float32), axis=-1) <= 0)  # descending
    np.testing.assert_allclose(prob.astype(np.float64).sum(-1), 1.0, atol=5e-3)
    assert out["mean_rest_mass"] == pytest.approx(prob[..., k].astype(np.float64).mean(), abs=1e-3)

    for i in (0, n - 1):
        window = stream[1][i * DEC : i * DEC + win]  # stride = decoder_len
        p_ref, id_ref = oracle(hf, window, T, k)
        np.testing.assert_allclose(prob[i, :, :k], p_ref[:, :k], rtol=0, atol=1e-3)
        np.testing.assert_allclose(prob[i, :, k], 1 - p_ref[:, :k].sum(-1), rtol=0, atol=1e-3)
        # ids equal wherever the probability is clear of its neighbours (no near-tie the float32
        # logits of two implementations could order differently)
        gap = np.diff(p_ref, axis=-1)  # <= 0, (T, k)
        clear = np.ones((T, k), bool)
        clear &= np.concatenate([np.full((T, 1), True), gap[:, : k - 1] < -1e-5], axis=1)
        clear &= gap[:, :k] < -1e-5
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(index[i][clear], id_ref[:, :k][clear])


def test_top_k_table_is_exact():
    """float64 softmax, top k by probability (ties: the lower id, as a stable argsort of -p), the
    rest of the mass in the last bucket."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, V)).astype(np.float32)
    x[::3] = np.round(x[::3])  # many exact ties, some at the k-th place
    for k in (1, 5, 50, V - 1):
        top, idx, rest = top_k_table(x, k)
        p = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ref = np.argsort(-p, axis=-1, kind="stable")[:, :k]
        np.testing.assert_array_equal(idx, ref)
        np.testing.assert_array_equal(top, np.take_along_axis(p, ref, -1))
        np.testing.assert_allclose(rest, 1 - top.sum(-1), rtol=0, atol=1e-12)
        assert (rest >= 0).all()


# ------------------------------------------------------------------ end to end


def test_cli_tables_then_ceped_training(student_dir, teacher, stream, tmp_path):
    """One config for both: `cepe teacher` writes the config's distill_prob / distill_index, then
    `cepe train` with kl_loss_cof 1.0 reads them and reports a finite KL term."""
    cfg = stage2_cfg(student_dir, stream, tmp_path / "run", kl_loss_cof=1.0, stride=12)
    cfg.update(distill_prob="tables/prob.npy", distill_index="tables/index.npy")
    cfg_path = write_config(tmp_path / "ceped.json", cfg)
    r = run_cli("teacher", "--config", cfg_path, "--teacher", teacher[0], "--top-k", "8", "--t-kl", "16", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    n = (N_TOK - W) // 12 + 1
    assert out["distill_prob"] == str(tmp_path / "tables" / "prob.npy")
    assert out["prob_shape"] == [n, 16, 9] and out["index_shape"] == [n, 16, 8]
    assert sorted(os.listdir(tmp_path / "tables")) == ["index.npy", "prob.npy"]

    r = run_cli("train", "--config", cfg_path, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps_run"] == 2
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert [x["step"] for x in recs] == [1, 2]
    for x in recs:
        assert math.isfinite(x["kl_loss"]) and x["kl_loss"] > 0
        assert x["loss"] == pytest.approx(x["lm_loss"] + x["kl_loss"])


def test_cli_default_paths_and_text_output(student_dir, teacher, stream, tmp_path, capsys):
    """Without distill_* in the config the tables go to <output_dir>; the summary names the files and shapes."""
    from cepe.cli import main

    cfg_path = write_config(tmp_path / "c.json", stage2_cfg(student_dir, stream, tmp_path / "o"))
    assert main(["teacher", "--config", cfg_path, "--teacher", teacher[0], "--top-k", "3", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    n = (N_TOK - W) // DEC + 1
    assert f"{tmp_path / 'o' / 'distill_prob.npy'} ({n}, {DEC}, 4) float16" in text
    assert f"{tmp_path / 'o' / 'distill_index.npy'} ({n}, {DEC}, 3) int32" in text
    assert np.load(tmp_path / "o" / "distill_index.npy").shape == (n, DEC, 3)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"top_k": 0}, ValueError, r"top_k must be in \[1, vocab_size = 101\).*got 0$"),
        ({"top_k": V}, ValueError, r"top_k must be in \[1, vocab_size = 101\).*got 101$"),
        ({"top_k": 2.5}, TypeError, "top_k must be an int"),
        ({"t_kl": DEC + 1}, ValueError, r"t_kl must be in \[1, decoder_len = 24\].*got 25$"),
        ({"t_kl": 0}, ValueError, r"t_kl must be in \[1, decoder_len = 24\].*got 0$"),
        ({"out_index": "SAME"}, ValueError, "out_prob and out_index must be two different files"),
    ],
)
def test_argument_errors(student_dir, teacher, stream, tmp_path, kw, exc, match):
    cfg = load_config(write_config(tmp_path / "c.json", stage2_cfg(student_dir, stream, tmp_path / "o")))
    if kw.get("out_index") == "SAME":
        kw = {"out_prob": str(tmp_path / "t.npy"), "out_index": str(tmp_path / "t.npy")}
    with pytest.raises(exc, match=match):
        teacher_tables(cepe.load(teacher[0], n_threads=1), cfg, progress=False, **kw)
    assert not os.path.exists(tmp_path / "o")


def test_teacher_vocab_must_be_the_students(student_dir, tiny, stream, tmp_path, capsys):
    """conftest's `tiny` has 97 tokens, the student 101: refused before anything is computed, by the
    function (ValueError naming the teacher) and the CLI (status 2)."""
    cfg_path = write_config(tmp_path / "c.json", stage2_cfg(student_dir, stream, tmp_path / "o"))
    msg = r"teacher: its vocabulary has 97 tokens, the student's \(.*\) has 101"
    with pytest.raises(ValueError, match=msg):
        teacher_tables(tiny[0], load_config(cfg_path), progress=False)
    from cepe.cli import main

    assert main(["teacher", "--config", cfg_path, "--teacher", tiny[0]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cepe: error: teacher: its vocabulary has 97 tokens")
    assert main(["teacher", "--config", cfg_path, "--teacher", tiny[0], "--t-kl", "99"]) == 2
    assert "t_kl must be in [1, decoder_len = 24]" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_config_errors(teacher, stream, tmp_path):
    """The student must be a CEPE model (its vocabulary is the reference); the data is checked as
    `cepe train` checks it (cepe.ConfigError naming the key)."""
    bad = stage2_cfg(teacher[0], stream, tmp_path / "o")  # a plain decoder as the student
    with pytest.raises(cepe.ConfigError, match="model: .* is not a CEPE checkpoint"):
        teacher_tables(teacher[0], load_config(write_config(tmp_path / "a.json", bad)), progress=False)
    missing = stage2_cfg(str(tmp_path / "nope"), stream, tmp_path / "o")
    with pytest.raises(cepe.ConfigError, match="model: no such model directory"):
        teacher_tables(teacher[0], load_config(write_config(tmp_path / "b.json", missing)), progress=False)


def test_too_short_data_is_a_config_error(student_dir, teacher, tmp_path):
    np.save(tmp_path / "short.npy", np.arange(3, 3 + W - 1, dtype=np.int32))
    cfg = stage2_cfg(student_dir, (str(tmp_path / "short.npy"), None), tmp_path / "o")
    with pytest.raises(cepe.ConfigError, match="tokens: sequences too short"):
        teacher_tables(teacher[0], load_config(write_config(tmp_path / "c.json", cfg)), progress=False)


def test_a_failed_run_leaves_no_table(student_dir, teacher, stream, tmp_path, monkeypatch):
    """The tables are written under temporary names and renamed at the end: an error halfway leaves
    the old files (here: none) and no temporary ones."""
    cfg = load_config(write_config(tmp_path / "c.json", stage2_cfg(student_dir, stream, tmp_path / "o")))
    calls = []

    def failing(logits, k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return top_k_table(logits, k)

    monkeypatch.setattr(ct, "top_k_table", failing)
    with pytest.raises(RuntimeError, match="boom"):
        teacher_tables(teacher[0], cfg, top_k=4, progress=False)
    assert os.listdir(tmp_path / "o") == []
