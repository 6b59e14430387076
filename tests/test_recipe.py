"""Multi-stage recipes (cepe.recipe), `cepe init` and `cepe corpus`: a head made from a plain
decoder, trained through two stages, exported, resumable; the shipped recipe checks clean."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import build_hf_model, save_model

import cepe
from cepe.cli import main
from cepe.errors import ConfigError
from cepe.recipe import RECIPES_DIR, run_recipe
from cepe.train_run import read_config_file

V = 101


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    hf = build_hf_model(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=3)
    return save_model(hf, str(tmp_path_factory.mktemp("recipe_dec")))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe_data")
    rng = np.random.default_rng(0)
    np.save(d / "stream.npy", rng.integers(3, V, size=4000).astype(np.int32))
    return str(d / "stream.npy")


def recipe(decoder_dir: str, token_path: str, **over) -> dict:
    raw = {
        "threads": 1,
        "seed": 1,
        "save_every": 2,
        "trainable": "cross_attn+encoder",
        "model": {"decoder": decoder_dir, "encoder_layers": 1, "num_cross_attn_layers": 1, "init": "zero"},
        "tokens": token_path,
        "stages": [
            {"stage": "warmup", "init": "none", "decoder_len": 16, "n_ctx": 2, "batch_size": 2, "total_steps": 3},
            {"stage": "stage2", "decoder_len": 16, "n_ctx": 2, "ctx_len": 8, "batch_size": 2, "total_steps": 4},
        ],
        "export": {"dtype": "float16"},
    }
    raw.update(over)
    return raw


def test_recipe_runs_every_stage_and_exports_a_head(decoder_dir, tokens, tmp_path):
    out = str(tmp_path / "run")
    raw = recipe(decoder_dir, tokens)
    res = run_recipe(str(tmp_path / "r.toml"), raw, output_dir=out)
    assert res["finished"] and [s["name"] for s in res["stages"]] == ["warmup", "stage2"]
    assert [s["step"] for s in res["stages"]] == [3, 4]
    assert sorted(os.listdir(res["head"])) == ["config.json", "head.safetensors"]
    for stage in ("warmup", "stage2"):
        with open(os.path.join(out, stage, "metrics.jsonl")) as f:
            assert len(f.readlines()) == (3 if stage == "warmup" else 4)
    # stage 2 started from the warmup's weights, and the head is the stage-2 checkpoint in fp16
    trained = cepe.load(os.path.join(out, "stage2", "checkpoint"))
    head = cepe.load(res["head"])
    rng = np.random.default_rng(3)
    ids, ctx = rng.integers(3, V, size=(1, 12)), rng.integers(3, V, size=(1, 2, 8))
    a = trained.forward(ids, encoder_input_ids=ctx)
    b = head.forward(ids, encoder_input_ids=ctx)
    np.testing.assert_allclose(a, b, atol=5e-2 * np.abs(a).max(), rtol=0)
    assert np.abs(a - cepe.load(decoder_dir).forward(ids)).max() > 0  # training changed the head
    # a rerun finds every stage finished and trains nothing
    again = run_recipe(str(tmp_path / "r.toml"), raw, output_dir=out)
    assert [s["steps_run"] for s in again["stages"]] == [0, 0]


def test_recipe_resumes_where_steps_stopped(decoder_dir, tokens, tmp_path):
    raw = recipe(decoder_dir, tokens)
    full = run_recipe("r.toml", raw, output_dir=str(tmp_path / "full"))
    part = str(tmp_path / "part")
    first = run_recipe("r.toml", raw, output_dir=part, max_steps=2)
    assert not first["finished"] and len(first["stages"]) == 1 and first["stages"][0]["step"] == 2
    while not (res := run_recipe("r.toml", raw, output_dir=part, max_steps=2))["finished"]:
        pass
    w_full = cepe.load(full["head"])
    w_part = cepe.load(res["head"])
    ids = np.arange(3, 15)[None]
    ctx = np.arange(3, 19).reshape(1, 2, 8)
    np.testing.assert_array_equal(
        w_full.forward(ids, encoder_input_ids=ctx), w_part.forward(ids, encoder_input_ids=ctx)
    )


def test_later_stages_keep_the_trained_cross_attention(decoder_dir, tokens, tmp_path):
    """A second warmup stage (whose kind defaults to init "copy") must not re-initialise the
    cross-attention the first stage trained: with a negligible rate it changes nothing."""
    raw = recipe(decoder_dir, tokens)
    first = dict(raw["stages"][0], init="zero", lr=1e-2)
    raw["stages"] = [
        first,
        {
            "name": "again",
            "stage": "warmup",
            "decoder_len": 16,
            "n_ctx": 2,
            "batch_size": 2,
            "total_steps": 1,
            "lr": 1e-12,
        },
    ]
    out = str(tmp_path / "o")
    run_recipe("r.toml", raw, output_dir=out)
    with open(os.path.join(out, "again", "train_config.json")) as f:
        assert json.load(f)["init"] == "none"
    a = cepe.load(os.path.join(out, "warmup", "checkpoint"))
    b = cepe.load(os.path.join(out, "again", "checkpoint"))
    ids, ctx = np.arange(3, 15)[None], np.arange(3, 19).reshape(1, 2, 8)
    x, y = a.forward(ids, encoder_input_ids=ctx), b.forward(ids, encoder_input_ids=ctx)
    np.testing.assert_allclose(x, y, atol=1e-4 * np.abs(x).max(), rtol=0)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"output_dir": None}, "output_dir"),
        ({"stages": []}, "stages"),
        ({"model": {"decoder": "x", "depth": 2}}, "model.depth"),
        ({"model": 3}, "model"),
        ({"tokens": {"corpus": "wikipedia"}}, "tokens.corpus"),
        ({"export": {"dtype": "float16", "where": "x"}}, "export"),
    ],
)
def test_recipe_errors(decoder_dir, tokens, tmp_path, over, match):
    raw = recipe(decoder_dir, tokens, **over)
    raw = {k: v for k, v in raw.items() if v is not None}
    out = None if "output_dir" in over else str(tmp_path / "o")
    with pytest.raises(ConfigError, match=match):
        run_recipe(str(tmp_path / "r.toml"), raw, output_dir=out)


def test_duplicate_stage_names(decoder_dir, tokens, tmp_path):
    raw = recipe(decoder_dir, tokens)
    raw["stages"] = [raw["stages"][0], raw["stages"][0]]
    with pytest.raises(ConfigError, match="unique"):
        run_recipe("r.toml", raw, output_dir=str(tmp_path / "o"), dry_run=True)


def test_shipped_recipe_checks_clean():
    """The recipe behind the shipped head parses, and its stages are what the head was trained with."""
    path = os.path.join(RECIPES_DIR, "smollm2-135m-cepe.toml")
    raw = read_config_file(path)
    assert raw["model"]["decoder"] == "smollm2-135m"
    assert [s["stage"] for s in raw["stages"]] == ["warmup", "stage2", "warmup", "stage2"]
    from cepe.train_run import parse_config

    for i, st in enumerate(raw["stages"]):
        shared = {k: v for k, v in raw.items() if k not in ("model", "tokens", "export", "stages")}
        parse_config(
            {
                **shared,
                **{k: v for k, v in st.items() if k != "name"},
                "model": "m",
                "output_dir": "o",
                "tokens": "t.npy",
            },
            source=f"{path}[{i}]",
        )


def test_cli_init_and_train_recipe(decoder_dir, tokens, tmp_path, capsys):
    head = str(tmp_path / "head")
    code = main(
        ["init", "--decoder", decoder_dir, "--out", head, "--encoder-layers", "2", "--cross-layers", "2", "--json"]
    )
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["encoder_layers"] == 2 and info["num_cross_attn_layers"] == 2 and info["encoder_shares_embeddings"]
    model = cepe.load(head)
    assert model.config.num_cross_attn_layers == 2 and model.config.encoder.num_hidden_layers == 2
    # refuses to overwrite
    assert main(["init", "--decoder", decoder_dir, "--out", head]) == 2
    assert "not empty" in capsys.readouterr().err
    cfg = tmp_path / "r.json"
    raw = recipe(decoder_dir, tokens)
    raw["model"] = head
    cfg.write_text(json.dumps(raw))
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "run"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["finished"] and os.path.isdir(res["head"])
    # --output-dir is for recipes only
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"model": head, "output_dir": "o", "tokens": tokens}))
    assert main(["train", "--config", str(flat), "--output-dir", "x"]) == 2
    assert "recipes" in capsys.readouterr().err
