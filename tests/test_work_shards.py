"""Corpus preparation split by `--shard i/n` (cepe.work_shards): the shards of `cepe corpus` read
in order are the unsharded token file's windows, and `cepe teacher --shard` then `--merge` writes
the unsharded tables bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_config, write_config
from test_corpus import fake_stdlib, words

from cepe import corpus
from cepe.cli import main
from cepe.teacher import merge_shards
from cepe.testing.reference import make_reference
from cepe.train_data import WindowSampler, open_tokens
from cepe.train_run import load_config
from cepe.work_shards import parse_shard, shard_path, shard_range

V = 101


def test_parse_and_ranges():
    assert parse_shard("0/1") == (0, 1) and parse_shard(" 3 / 8 ") == (3, 8)
    for bad in ("1/1", "-1/4", "a/b", "2", "2/0", ""):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    for count in (0, 1, 7, 100):
        for n in (1, 3, 8):
            ranges = [shard_range(count, i, n) for i in range(n)]
            assert ranges[0][0] == 0 and ranges[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))  # contiguous, in order
            assert max(hi - lo for lo, hi in ranges) - min(hi - lo for lo, hi in ranges) <= 1
    assert shard_path("/d/distill_prob.npy", 2, 8) == "/d/distill_prob-00002-of-00008.npy"


def test_corpus_shards_read_as_the_whole(tmp_path, monkeypatch):
    root = fake_stdlib(tmp_path / "lib", n_files=6)
    m = corpus.plan(words, root=root, min_tokens=40, heldout_units=("beta",), slack=0)
    monkeypatch.setattr(corpus, "stdlib_root", lambda: root)
    whole = corpus.build(str(tmp_path / "whole"), words, manifest=m, splits=["train"], progress=False)["train"]
    parts = [
        corpus.build(str(tmp_path / "parts"), words, manifest=m, splits=["train"], progress=False, shard=(i, 3))[
            "train"
        ]
        for i in range(3)
    ]
    assert parts[1] == str(tmp_path / "parts" / "train-00001-of-00003.npy")
    one = WindowSampler([open_tokens(whole, "packed")], 8, 5)
    many = WindowSampler([open_tokens(p, "packed") for p in parts], 8, 5)
    assert len(one) == len(many) > 10
    np.testing.assert_array_equal(one.windows(range(len(one))), many.windows(range(len(many))))


@pytest.fixture(scope="module")
def teacher(model_factory):
    return model_factory("shard_teacher_v101", vocab_size=V, seed=5)


def test_teacher_shards_merge_to_the_unsharded_tables(tmp_path, teacher, capsys):
    student = make_reference(seed=7).save(str(tmp_path / "student"))
    np.save(tmp_path / "stream.npy", np.random.default_rng(0).integers(3, V, size=300).astype(np.int32))
    stage2 = dict(stage="stage2", decoder_len=16, n_ctx=2, ctx_len=8, stride=10, batch_size=2, total_steps=2)
    path = write_config(
        tmp_path / "c.json", run_config(student, str(tmp_path / "stream.npy"), tmp_path / "run", **stage2)
    )
    common = ["teacher", "--config", str(path), "--teacher", teacher[0], "--top-k", "4", "--json"]
    assert main([*common, "--out-prob", str(tmp_path / "p.npy"), "--out-index", str(tmp_path / "i.npy")]) == 0
    capsys.readouterr()
    for i in range(3):
        assert main([*common, "--shard", f"{i}/3"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["distill_prob"] == str(tmp_path / "run" / f"distill_prob-0000{i}-of-00003.npy")
    with pytest.raises(FileNotFoundError, match="shard 0 of 4 is missing"):
        merge_shards(load_config(str(path)), 4)
    assert main([*common, "--merge", "3"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["n_windows"] == (300 - 32) // 10 + 1
    for key, whole in (("distill_prob", "p.npy"), ("distill_index", "i.npy")):
        a, b = np.load(merged[key]), np.load(tmp_path / whole)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
