"""cepe.corpus: the pinned standard-library split, its packed .npy files, and its errors."""

from __future__ import annotations

import json
import os
import sysconfig

import numpy as np
import pytest

from cepe import corpus
from cepe.train_data import WindowSampler, open_tokens


def words(text: str) -> list[int]:
    """A stand-in tokenizer: one token per whitespace-separated word (ids by hash, < 1000)."""
    return [hash(w) % 1000 for w in text.split()]


def fake_stdlib(root, n_files: int = 3, words_per_file: int = 40) -> str:
    """A tiny library: two packages and two top-level modules."""
    for pkg in ("alpha", "beta"):
        d = root / pkg
        d.mkdir(parents=True)
        (d / "__init__.py").write_text(f"# {pkg}\n")
        for i in range(n_files):
            (d / f"m{i}.py").write_text(" ".join(f"{pkg}{i}w{j}" for j in range(words_per_file)) + "\n")
    (root / "one.py").write_text("x " * words_per_file)
    (root / "two.py").write_text("y " * words_per_file)
    return str(root)


def test_shipped_manifest_is_a_clean_split():
    m = corpus.load_manifest()
    files = {}
    for doc in m["documents"]:
        for rel, digest in doc["files"]:
            assert rel not in files, f"{rel} is in two documents"
            files[rel] = doc["split"]
            assert len(digest) == 64
    held = {rel.split("/")[0] for rel, split in files.items() if split == "heldout"}
    assert held == set(m["heldout_units"])
    assert all(doc["approx_tokens"] >= corpus.MIN_DOC_TOKENS for doc in m["documents"])


def test_shipped_heldout_tokens_are_long_documents():
    docs = corpus.heldout_tokens()
    n_held = sum(d["split"] == "heldout" for d in corpus.load_manifest()["documents"])
    assert len(docs) == n_held >= 8
    assert min(len(d) for d in docs) >= corpus.MIN_DOC_TOKENS
    assert all(d.dtype == np.int32 and d.min() >= 0 and d.max() < 49152 for d in docs)


@pytest.mark.skipif(
    sysconfig.get_python_version() != corpus.load_manifest()["python"], reason="the split was pinned on another Python"
)
def test_heldout_rebuilds_to_the_shipped_tokens(tmp_path):
    """The interpreter's library still matches the pins, and SmolLM2's tokenizer gives the shipped ids."""
    import cepe
    from cepe.pull import is_pulled

    if not is_pulled():
        pytest.skip("smollm2-135m not pulled")
    tok = cepe.load("smollm2-135m").tokenizer
    paths = corpus.build(str(tmp_path), lambda s: tok.encode(s, add_special_tokens=False), splits=["heldout"])
    np.testing.assert_array_equal(np.load(paths["heldout"]), np.load(corpus.HELDOUT_NPY))


def test_plan_build_and_train_reads_the_packed_files(tmp_path):
    root = fake_stdlib(tmp_path / "lib")
    m = corpus.plan(words, root=root, min_tokens=50, heldout_units=("beta",), slack=0)
    assert {d["split"] for d in m["documents"] if d["id"].startswith("beta")} == {"heldout"}
    by_unit = {d["id"].split("/")[0] for d in m["documents"]}
    assert by_unit == {"alpha", "beta", "_modules"}
    for doc in m["documents"]:  # cut at file boundaries, each at least min_tokens (+ slack) long
        assert doc["approx_tokens"] >= 50
    # the short tail of a unit joins its last document: every file of alpha is in some document
    alpha_files = [f for d in m["documents"] if d["id"].startswith("alpha") for f, _ in d["files"]]
    assert alpha_files == sorted(alpha_files) and len(alpha_files) == 4
    orig_root = corpus.stdlib_root
    try:
        corpus.stdlib_root = lambda: root  # type: ignore[assignment]
        paths = corpus.build(str(tmp_path / "out"), words, manifest=m, progress=False)
    finally:
        corpus.stdlib_root = orig_root  # type: ignore[assignment]
    train = corpus.unpack(np.load(paths["train"]))
    assert len(train) == sum(d["split"] == "train" for d in m["documents"])
    tf = open_tokens(paths["train"], "packed")
    assert tf.n_tokens == sum(len(d) for d in train)
    sampler = WindowSampler([tf], 16, 16)
    assert len(sampler) == sum(len(d) // 16 for d in train)


def test_changed_file_is_named(tmp_path):
    root = fake_stdlib(tmp_path / "lib")
    m = corpus.plan(words, root=root, min_tokens=50, heldout_units=("beta",), slack=0)
    victim = m["documents"][0]["files"][1][0]
    with open(os.path.join(root, victim), "a") as f:
        f.write("changed\n")
    split = m["documents"][0]["split"]
    with pytest.raises(corpus.CorpusError, match=victim.replace(".", r"\.")):
        corpus.documents(m, split, root=root)
    os.remove(os.path.join(root, victim))
    with pytest.raises(corpus.CorpusError, match="missing"):
        corpus.documents(m, split, root=root)


def test_not_text_and_empty_split_errors(tmp_path):
    root = fake_stdlib(tmp_path / "lib")
    (tmp_path / "lib" / "alpha" / "bad.py").write_bytes(b"\xff\xfe\x00binary")
    m = corpus.plan(
        words, root=root, min_tokens=50, heldout_units=("beta",), slack=0
    )  # undecodable files are left out of a plan
    assert all(not f.endswith("bad.py") for d in m["documents"] for f, _ in d["files"])
    m["documents"][0]["files"].append(["alpha/bad.py", "0" * 64])
    with pytest.raises(corpus.CorpusError, match="not UTF-8 text"):
        corpus.documents(m, m["documents"][0]["split"], root=root)
    with pytest.raises(corpus.CorpusError, match="split is empty"):
        corpus.plan(words, root=root, min_tokens=50_000, heldout_units=("beta",))  # no unit is long enough
    with pytest.raises(ValueError, match="split"):
        corpus.documents(m, "test", root=root)


def test_manifest_and_packed_format_errors(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"format": 99}))
    with pytest.raises(corpus.CorpusError, match="not a cepe corpus manifest"):
        corpus.load_manifest(str(p))
    with pytest.raises(ValueError, match="packed"):
        corpus.unpack(np.array([2, 3, 4, 1, 2], dtype=np.int32))
    with pytest.raises(ValueError, match="packed"):
        corpus.unpack(np.zeros((2, 2), dtype=np.int32))
    docs = [np.arange(3), np.arange(5)]
    back = corpus.unpack(corpus.pack(docs))
    assert [d.tolist() for d in back] == [d.tolist() for d in docs]
