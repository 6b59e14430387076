"""cepe.load by name: Hugging Face repo ids through huggingface_hub's cache (a cache laid out in
tmp_path as huggingface_hub writes it, checked with its own scan_cache_dir), offline errors, and
the names suggested for a typo. No test here uses the network."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil

import huggingface_hub as hub
import numpy as np
import pytest
from huggingface_hub.file_download import repo_folder_name

import cepe
from cepe.resolve import resolve

pull = importlib.import_module("cepe.pull")  # the module; cepe.pull is the function

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    d = tmp_path / "hub"
    d.mkdir()
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(d))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)  # nothing here may reach the network
    return d


def add_repo(cache, repo_id: str, files: dict[str, str]) -> str:
    """A snapshot as huggingface_hub stores one: blobs named by content hash, the snapshot's
    files symlinks to them, refs/main naming the commit. files: name in repo -> source path."""
    root = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(SHA)
    snap = root / "snapshots" / SHA
    for name, src in files.items():
        data = open(src, "rb").read()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(src, blob)
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snap / name).parent), snap / name)
    return str(snap)


def dir_files(path: str) -> dict[str, str]:
    return {f: os.path.join(path, f) for f in os.listdir(path)}


def test_repo_id_loads_from_the_hf_cache(hf_cache, tiny):
    path, _ = tiny
    snap = add_repo(hf_cache, "org/tiny-llama", dir_files(path))
    # huggingface_hub's own reader of its cache sees the repo we laid out
    assert [r.repo_id for r in hub.scan_cache_dir(str(hf_cache)).repos] == ["org/tiny-llama"]
    model = cepe.load("org/tiny-llama")
    assert model.path == snap
    ids = np.arange(1, 9)[None]
    np.testing.assert_array_equal(model.forward(ids), cepe.load(path).forward(ids))


def test_gguf_repo_picks_its_one_file_or_asks(hf_cache, tmp_path):
    one, two = tmp_path / "a.Q4_0.gguf", tmp_path / "a.Q8_0.gguf"
    one.write_bytes(b"GGUF1")
    two.write_bytes(b"GGUF2")
    snap = add_repo(hf_cache, "org/one-gguf", {"a.Q4_0.gguf": str(one), "README.md": str(one)})
    assert resolve("org/one-gguf") == os.path.join(snap, "a.Q4_0.gguf")
    snap2 = add_repo(hf_cache, "org/two-gguf", {"a.Q4_0.gguf": str(one), "a.Q8_0.gguf": str(two)})
    with pytest.raises(FileNotFoundError, match=r"holds 2 GGUF files and no config.json: name one.*two-gguf/a\.Q8_0"):
        resolve("org/two-gguf")
    assert resolve("org/two-gguf/a.Q8_0.gguf") == os.path.join(snap2, "a.Q8_0.gguf")


@pytest.mark.skipif(not pull.is_pulled(), reason="the default model is not pulled")
def test_gguf_file_of_a_repo_loads(hf_cache):
    add_repo(hf_cache, "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", {"smol.Q4_1.gguf": pull.model_path()})
    model = cepe.load("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smol.Q4_1.gguf")
    ref = cepe.load("smollm2-135m")
    ids = np.arange(1, 6)[None]
    np.testing.assert_array_equal(model.forward(ids, logits="last"), ref.forward(ids, logits="last"))


def test_uncached_repo_offline_says_so(hf_cache, tiny):
    add_repo(hf_cache, "org/tiny-llama", dir_files(tiny[0]))
    with pytest.raises(FileNotFoundError) as err:
        cepe.load("org/tiny-lama")
    msg = str(err.value)
    assert "org/tiny-lama is not in the cache" in msg and "HF_HUB_OFFLINE" in msg and str(hf_cache) in msg
    assert "did you mean 'org/tiny-llama'" in msg


def test_uncached_repo_without_network_says_so(hf_cache, monkeypatch):
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(FileNotFoundError, match=r"org/absent is not in the cache .* the Hub cannot be reached"):
        resolve("org/absent")


@pytest.mark.parametrize("typo", ["smollm2", "smolm2-135m", "SmolLM2-135M"])
def test_typo_lists_the_names_that_exist(typo, hf_cache):
    with pytest.raises(FileNotFoundError) as err:
        cepe.load(typo)
    msg = str(err.value)
    assert f"no file, directory or model named {typo!r}" in msg
    assert "did you mean 'smollm2-135m'" in msg and "smollm2-135m-cepe" in msg


def test_paths_are_not_names(tmp_path, hf_cache):
    assert resolve(str(tmp_path)) == str(tmp_path)  # existing: as is
    missing = str(tmp_path / "absent")
    assert resolve(missing) == missing  # missing paths: cepe.load says what is missing
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        cepe.load(missing)
    assert resolve("./a/b") == "./a/b" and resolve("m.gguf") == "m.gguf"


def test_directory_of_gguf_files_never_asks_for_config_json(tmp_path, hf_cache):
    d = tmp_path / "models"
    d.mkdir()
    (d / "a.Q4_0.gguf").write_bytes(b"GGUF1")
    assert resolve(str(d)) == str(d / "a.Q4_0.gguf")
    (d / "a.Q8_0.gguf").write_bytes(b"GGUF2")
    with pytest.raises(FileNotFoundError) as err:
        cepe.load(str(d))
    msg = str(err.value)
    assert f"{d} holds 2 GGUF files and no config.json: name one ({d / 'a.Q4_0.gguf'}, " in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve(str(empty)) == str(empty)  # not a GGUF directory: cepe.load names what is missing
