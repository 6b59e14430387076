"""`cepe train --config FILE`: the warmup and stage-2 recipes from .npy token files, JSON
and TOML configs, the per-stage defaults, checkpoints, the JSONL log, resume, and clear errors
(exit status 2, the key named) for bad configs. Tiny random CEPE models from cepe.testing.reference."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import run_cli, run_config, write_config

import cepe
from cepe.errors import ConfigError
from cepe.testing.reference import make_reference
from cepe.train_run import STAGE_DEFAULTS, Data, load_config, open_data, parse_config

DEC_V, ENC_V = 101, 103  # make_reference's vocabularies


@pytest.fixture(scope="module")
def cepe_dir(tmp_path_factory):
    return make_reference(seed=7).save(str(tmp_path_factory.mktemp("train_cli_model")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_cli_data")
    rng = np.random.default_rng(0)
    np.save(d / "stream.npy", rng.integers(3, DEC_V, size=6000).astype(np.int32))
    np.save(d / "rows.npy", rng.integers(3, DEC_V, size=(12, 96)).astype(np.int64))
    docs = [rng.integers(3, DEC_V, size=n) for n in (50, 130, 20, 200)]
    np.save(d / "packed.npy", np.concatenate([[4], [len(x) for x in docs], *docs]).astype(np.int32))
    return d


def main_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """cepe.cli.main in this process (faster than a subprocess for the many error cases)."""
    from cepe.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def warmup_cfg(cepe_dir, data_dir, out, **kw) -> dict:
    return run_config(
        cepe_dir, str(data_dir / "stream.npy"), out, **{**dict(grad_accum=2, total_steps=6, threads=2), **kw}
    )


def read_log(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------ defaults


def test_stage_defaults_follow_the_spec(tmp_path):
    """§6.2: warmup lr 5e-4, init copy, 256 decoder tokens = the encoder's 4 x 64, 4000 steps, global batch
    256 of micro-batch 2; §6.3: stage 2 lr 3e-4, init none, 4096 decoder + 16 x 256 encoder tokens,
    20000 steps, global batch 128 of micro-batch 1; both: encoder trained, cosine warmup 0.04, wd 0,
    clip 1.0, KL off."""
    base = {"model": "m", "output_dir": "o", "tokens": "t.npy"}
    w = parse_config(base, source=str(tmp_path / "c.json"))
    assert (w.stage, w.lr, w.init, w.trainable) == ("warmup", 5e-4, "copy", "cross_attn+encoder")
    assert (w.decoder_len, w.n_ctx, w.ctx_len, w.stride, w.window) == (256, 4, 64, 256, 256)
    assert (w.total_steps, w.batch_size, w.grad_accum) == (4000, 256, 128)
    s = parse_config({**base, "stage": "stage2"}, source=str(tmp_path / "c.json"))
    assert (s.lr, s.init, s.trainable) == (3e-4, "none", "cross_attn+encoder")
    assert (s.decoder_len, s.n_ctx, s.ctx_len, s.stride, s.window) == (4096, 16, 256, 4096, 8192)
    assert (s.total_steps, s.batch_size, s.grad_accum) == (20000, 128, 128)
    for c in (w, s):
        assert (c.warmup_ratio, c.weight_decay, c.clip, c.kl_loss_cof, c.lm_loss_cof) == (0.04, 0.0, 1.0, 0.0, 1.0)
        assert c.model == str(tmp_path / "m") and c.tokens == [{"path": str(tmp_path / "t.npy"), "layout": "auto"}]
        assert c.log == str(tmp_path / "o" / "metrics.jsonl")
    assert set(STAGE_DEFAULTS) == {"warmup", "stage2"}
    # scaled-down sizes are settable; grad_accum follows the reference's micro-batch unless given
    small = parse_config({**base, "decoder_len": 64, "batch_size": 6}, source="c.json")
    assert (small.ctx_len, small.grad_accum) == (16, 3)


# ------------------------------------------------------------------ end to end


def test_warmup_end_to_end(cepe_dir, data_dir, tmp_path):
    """The CLI trains, writes the checkpoint (loadable, official layout), the JSONL log and the
    resolved config; the losses are those of cepe.Trainer driven with cepe.train_data's warmup batches."""
    out = tmp_path / "run"
    cfg_path = write_config(tmp_path / "warmup.toml", warmup_cfg(cepe_dir, data_dir, out, save_every=4))
    r = run_cli("train", "--config", cfg_path, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["step"] == summary["total_steps"] == summary["steps_run"] == 6
    assert summary["windows"] == 6000 // 24 and summary["checkpoint"] == str(out / "checkpoint")
    assert sorted(os.listdir(out)) == ["checkpoint", "metrics.jsonl", "train_config.json"]
    recs = read_log(out / "metrics.jsonl")
    assert [x["step"] for x in recs] == list(range(1, 7))
    assert all({"loss", "lm_loss", "kl_loss", "grad_norm", "lr", "seconds", "tokens", "epoch"} <= set(x) for x in recs)
    assert recs[0]["tokens"] == 4 * (24 + 24)
    assert summary["loss_last"] == recs[-1]["loss"]

    # the same run in process: Trainer + the warmup batches of the same seeded sampler
    cfg = load_config(cfg_path)
    model = cepe.load(cepe_dir, n_threads=2)
    data = open_data(cfg, model.config.vocab_size, model.config.encoder.vocab_size)
    trainer = cepe.Trainer(
        model, "cross_attn+encoder", lr=5e-3, warmup_ratio=0.04, total_steps=6, grad_accum=2, init="copy", seed=3
    )
    for k in range(6):
        batch = data.batch(cfg, k)
        np.testing.assert_array_equal(batch["encoder_input_ids"].reshape(4, 24), batch["input_ids"])
        assert trainer.step(batch)["loss"] == recs[k]["loss"]
    saved = cepe.load(out / "checkpoint", n_threads=2)
    probe = data.batch(cfg, 50)
    kw = {"encoder_input_ids": probe["encoder_input_ids"]}
    np.testing.assert_array_equal(saved.forward(probe["input_ids"], **kw), model.forward(probe["input_ids"], **kw))
    with open(out / "train_config.json") as f:
        assert json.load(f)["stage"] == "warmup"


def test_stage2_from_rows_and_packed_files(cepe_dir, data_dir, tmp_path):
    """Stage 2 over two files of other layouts (JSON config, relative paths): the encoder reads the
    n_ctx x ctx_len tokens before each decoder window, and the run trains."""
    out = tmp_path / "s2"
    cfg = dict(
        model=os.path.relpath(cepe_dir, tmp_path),
        output_dir="s2",
        stage="stage2",
        tokens=[str(data_dir / "rows.npy"), {"path": str(data_dir / "packed.npy"), "layout": "packed"}],
        decoder_len=32,
        n_ctx=3,
        ctx_len=16,
        batch_size=2,
        total_steps=4,
        lr=1e-3,
        threads=2,
    )
    cfg_path = write_config(tmp_path / "stage2.json", cfg)
    c = load_config(cfg_path)
    assert c.grad_accum == 2  # micro-batch 1, as the reference's stage 2
    data = open_data(c, DEC_V, ENC_V)
    # windows of 80 tokens, stride 32: one per 96-token row, 0 + 2 + 0 + 4 in the documents
    assert len(data.sampler) == 12 + 6
    for i in range(len(data.sampler)):
        f, off = data.sampler.location(i)
        tf = data.files[f]
        j = int(np.searchsorted(tf.starts, off, side="right")) - 1  # the sequence the window starts in
        assert off + 80 <= tf.starts[j] + tf.lengths[j]  # ... and ends in
        np.testing.assert_array_equal(data.sampler.window_tokens(i), data.files[f].tokens[off : off + 80])
    batch = data.batch(c, 0)
    assert batch["input_ids"].shape == (2, 32) and batch["encoder_input_ids"].shape == (2, 3, 16)
    idx = data.sampler.batch_indices(0, 2)
    w = data.sampler.windows(idx)
    np.testing.assert_array_equal(batch["encoder_input_ids"].reshape(2, 48), w[:, :48])
    np.testing.assert_array_equal(batch["input_ids"], w[:, 48:])
    r = run_cli("train", "--config", cfg_path, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["stage"] == "stage2" and summary["step"] == 4
    assert cepe.load(out / "checkpoint").config.is_cepe
    # stage 2 continues from the warmup output: a checkpoint is a valid `model`
    cfg2 = {**cfg, "model": str(out / "checkpoint"), "output_dir": str(tmp_path / "s2b"), "total_steps": 1}
    r = run_cli("train", "--config", write_config(tmp_path / "s2b.json", cfg2))
    assert r.returncode == 0, r.stderr
    assert "stage2: step 1/1" in r.stdout


def test_resume_continues_bit_exactly(cepe_dir, data_dir, tmp_path):
    """--steps 2, then --resume twice (the second with nothing left to do) == one uninterrupted run:
    the same losses in the log (steps after the checkpoint are not logged twice) and the same weights."""
    full = write_config(tmp_path / "full.json", warmup_cfg(cepe_dir, data_dir, tmp_path / "full"))
    assert run_cli("train", "--config", full).returncode == 0
    part = write_config(tmp_path / "part.json", warmup_cfg(cepe_dir, data_dir, tmp_path / "part"))
    r = run_cli("train", "--config", part, "--steps", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["step"] == 2
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:  # a crash after logging step 3, before saving it
        f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
    r = run_cli("train", "--config", part, "--resume", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["resume_from"] == str(tmp_path / "part" / "checkpoint") and s["steps_run"] == 4
    r = run_cli("train", "--config", part, "--resume", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["steps_run"] == 0
    a, b = read_log(tmp_path / "full" / "metrics.jsonl"), read_log(tmp_path / "part" / "metrics.jsonl")
    assert [x["step"] for x in b] == list(range(1, 7))
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    assert [x["grad_norm"] for x in a] == [x["grad_norm"] for x in b]
    from safetensors.numpy import load_file

    wa = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "checkpoint" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    # resume = "auto" starts fresh when there is nothing to resume
    auto = write_config(tmp_path / "auto.json", warmup_cfg(cepe_dir, data_dir, tmp_path / "auto", resume="auto"))
    r = run_cli("train", "--config", auto, "--steps", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["resume_from"] is None
    r = run_cli("train", "--config", auto, "--steps", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["step"] == 2
    # a resumed run must keep the data and the hyper-parameters
    changed = write_config(tmp_path / "part.json", warmup_cfg(cepe_dir, data_dir, tmp_path / "part", seed=4))
    r = run_cli("train", "--config", changed, "--resume")
    assert r.returncode == 2 and "seed: the run being resumed used 3" in r.stderr, r.stderr


def test_ceped_kl_from_teacher_tables(cepe_dir, data_dir, tmp_path):
    """distill_prob / distill_index (one row per window) feed the CEPED KL term: kl_loss > 0."""
    rng = np.random.default_rng(1)
    cfg = warmup_cfg(cepe_dir, data_dir, tmp_path / "kl", stage="stage2", n_ctx=2, ctx_len=8, decoder_len=24)
    cfg.update(kl_loss_cof=2.0, kl_mode="drop", total_steps=3, stride=24)
    n = (6000 - 40) // 24 + 1
    K, T_kl = 5, 8
    logits = rng.standard_normal((n, T_kl, DEC_V))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    idx = np.argsort(-p, -1)[..., :K].astype(np.int32)
    top = np.take_along_axis(p, idx, -1)
    np.save(tmp_path / "prob.npy", np.concatenate([top, 1 - top.sum(-1, keepdims=True)], -1).astype(np.float16))
    np.save(tmp_path / "index.npy", idx)
    cfg.update(distill_prob=str(tmp_path / "prob.npy"), distill_index=str(tmp_path / "index.npy"))
    r = run_cli("train", "--config", write_config(tmp_path / "kl.json", cfg), "--json")
    assert r.returncode == 0, r.stderr
    recs = read_log(tmp_path / "kl" / "metrics.jsonl")
    assert all(x["kl_loss"] > 0 and x["loss"] == pytest.approx(x["lm_loss"] + 2 * x["kl_loss"]) for x in recs)
    # the tables must have one row per window
    np.save(tmp_path / "index.npy", idx[:-1])
    cfg["output_dir"] = str(tmp_path / "kl2")
    r = run_cli("train", "--config", write_config(tmp_path / "kl2.json", cfg))
    assert r.returncode == 2 and "distill_index" in r.stderr and f"({n}, T_kl, K)" in r.stderr


def test_dry_run_and_help(cepe_dir, data_dir, tmp_path):
    cfg_path = write_config(tmp_path / "c.toml", warmup_cfg(cepe_dir, data_dir, tmp_path / "dry"))
    r = run_cli("train", "--config", cfg_path, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["windows"] == 250 and plan["tokens_per_step"] == 4 * 48 and plan["config"]["init"] == "copy"
    assert not os.path.exists(tmp_path / "dry")  # nothing written
    r = run_cli("--help")
    assert "train" in r.stdout
    r = run_cli("train", "--help")
    assert r.returncode == 0 and "--config" in r.stdout and "--resume" in r.stdout


# ------------------------------------------------------------------ bad configs


def bad_token_files(d):
    np.save(d / "floats.npy", np.zeros(100, np.float32))
    big = np.full(300, 5, np.int32)
    big[123] = 101  # the decoder's vocabulary is 0..100
    np.save(d / "big.npy", big)
    np.save(d / "short.npy", np.full((4, 20), 5, np.int32))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lrr": 1e-3}, "lrr: unknown key"),
        ({"tokens": None}, "tokens: required key is missing"),
        ({"model": None}, "model: required key is missing"),
        ({"tokens": "nope.npy"}, "tokens: no such token file"),
        ({"tokens": ["DATA/stream.npy", "nope.npy"]}, "tokens[1]: no such token file"),
        ({"tokens": [{"path": "DATA/stream.npy", "format": "rows"}]}, "tokens[0].format: unknown key"),
        ({"tokens": "BAD/floats.npy"}, "must hold integer token ids"),
        ({"tokens": "BAD/big.npy"}, "token id 101 at position 123, outside the decoder's vocabulary [0, 101)"),
        ({"tokens": "BAD/short.npy"}, "sequences too short: no sequence holds one warmup window of 24 tokens"),
        (
            {"tokens": "BAD/short.npy", "stage": "stage2", "ctx_len": 8, "decoder_len": 8, "n_ctx": 2},
            "window of 24 tokens (n_ctx * ctx_len + decoder_len = 2 * 8 + 8); the longest has 20",
        ),
        ({"stage": "pretrain"}, "stage: must be one of"),
        ({"n_ctx": 5}, "n_ctx: warmup splits the decoder's 24 tokens"),
        ({"ctx_len": 8}, "ctx_len: warmup chunks are decoder_len / n_ctx = 6"),
        ({"grad_accum": 3}, "grad_accum: batch_size (4) must split"),
        ({"decoder_len": 1}, "decoder_len: must be an integer >= 2"),
        ({"batch_size": "4"}, "batch_size: must be an integer"),
        ({"lr": -1.0}, "lr must be a finite number in [0.0"),
        ({"lr": "fast"}, "lr: must be a finite number"),
        ({"trainable": "decoder"}, "trainable must be one of"),
        ({"init": "xavier"}, "init must be one of"),
        ({"kl_loss_cof": 1.0}, "kl_loss_cof: > 0 needs the teacher tables"),
        ({"distill_prob": "p.npy"}, "distill_index: distill_prob and distill_index go together"),
        ({"e2llm": {"gmax": 3}}, "unknown e2llm keys"),
        ({"resume": 3}, "resume: must be true, false"),
        ({"resume": True}, "resume: no checkpoint"),
        ({"threads": 0}, "threads: must be an integer >= 1"),
        ({"model": "/nonexistent/model"}, "model: no such model directory"),
        ({"model": "PLAIN"}, "is not a CEPE checkpoint"),
    ],
)
def test_bad_configs_exit_2_naming_the_key(cepe_dir, data_dir, tmp_path, tiny, capsys, change, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    bad_token_files(bad)
    cfg = warmup_cfg(cepe_dir, data_dir, tmp_path / "out")
    for k, v in change.items():
        if v is None:
            cfg.pop(k)
            continue
        if isinstance(v, str):
            v = v.replace("DATA", str(data_dir)).replace("BAD", str(bad)).replace("PLAIN", tiny[0])
        if isinstance(v, list):
            v = [x.replace("DATA", str(data_dir)) if isinstance(x, str) else x for x in v]
            v = [{**x, "path": x["path"].replace("DATA", str(data_dir))} if isinstance(x, dict) else x for x in v]
        cfg[k] = v
    code, out, err = main_in_process(capsys, "train", "--config", write_config(tmp_path / "bad.json", cfg))
    assert code == 2, (out, err)
    assert err.startswith("cepe: error:") and message in err, err
    assert not os.path.exists(tmp_path / "out" / "checkpoint")


def test_bad_config_files(cepe_dir, data_dir, tmp_path):
    (tmp_path / "c.toml").write_text('model = "m"\noutput_dir = \n')
    r = run_cli("train", "--config", str(tmp_path / "c.toml"))
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    (tmp_path / "c.json").write_text("[1, 2]")
    r = run_cli("train", "--config", str(tmp_path / "c.json"))
    assert r.returncode == 2 and "must be a table of keys" in r.stderr
    r = run_cli("train", "--config", str(tmp_path / "none.json"))
    assert r.returncode == 2 and "--config: no such file" in r.stderr
    cfg_path = write_config(tmp_path / "ok.json", warmup_cfg(cepe_dir, data_dir, tmp_path / "o"))
    r = run_cli("train", "--config", cfg_path, "--steps", "0")
    assert r.returncode == 2 and "--steps must be >= 1" in r.stderr
    # an output_dir that already holds a checkpoint is not overwritten without resume
    assert run_cli("train", "--config", cfg_path, "--steps", "1").returncode == 0
    r = run_cli("train", "--config", cfg_path)
    assert r.returncode == 2 and "already holds a checkpoint" in r.stderr
    with pytest.raises(ConfigError, match="output_dir: required key is missing"):
        parse_config({"model": "m", "tokens": "t"})


def test_data_batches_are_a_pure_function_of_the_step(cepe_dir, data_dir, tmp_path):
    cfg = load_config(write_config(tmp_path / "c.json", warmup_cfg(cepe_dir, data_dir, tmp_path / "o")))
    d1: Data = open_data(cfg, DEC_V, ENC_V)
    d2: Data = open_data(cfg, DEC_V, ENC_V)
    seq = [d1.batch(cfg, k)["input_ids"] for k in range(5)]
    np.testing.assert_array_equal(d2.batch(cfg, 4)["input_ids"], seq[4])
