"""A real long-document corpus every machine has: the Python standard library's own source.

The standard library (PSF licence) is long-form, real code and prose, present wherever Python
is, and close to the CodeParrot domain the CEPE paper measures on. A *unit* is one top-level
package (its ``.py`` files, walked in sorted order) or, for the top-level modules, all of them in
sorted order. Each unit is cut at file boundaries into documents of at least ``min_tokens``
tokens (the last short piece joins the document before it), so no file is in two documents. Each
file enters its document as a ``# <path>`` line followed by its text. Held-out units
(HELDOUT_UNITS) never share a file with the training units.

The split is pinned: ``cepe/data/stdlib_corpus.json`` lists every document with its files and
their SHA-256, for the interpreter it was made with. ``build`` reads exactly those files and
refuses, naming the file, when this interpreter's library differs, so the held-out set is the
same on every machine. The held-out set is also shipped tokenized with SmolLM2's tokenizer
(``cepe/data/stdlib_heldout.npy``, ``heldout_tokens()``), so the benchmark runs on it even where
the library differs.

Output: ``.npy`` files in the "packed" layout ``cepe train`` reads
(``[n, len_1..len_n, tokens of doc 1, ...]``, int32): ``train.npy`` and ``heldout.npy``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import ConfigError
from .progress import track

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
MANIFEST = os.path.join(DATA_DIR, "stdlib_corpus.json")
HELDOUT_NPY = os.path.join(DATA_DIR, "stdlib_heldout.npy")
MANIFEST_FORMAT = 1
# The longest setting of the paper's LM protocol: 32K context tokens + the 256 scored ones.
MIN_DOC_TOKENS = 32768 + 256
HELDOUT_UNITS = ("asyncio", "email", "http", "importlib", "multiprocessing", "xml")
# Units that are tables or generated data rather than text to model.
EXCLUDED_UNITS = ("encodings", "__phello__", "site-packages")
MODULES_UNIT = "_modules"  # the top-level .py files, as one unit
# Tokens counted file by file can merge across a file boundary once joined: plan this many more.
_SLACK = 256

Encode = Callable[[str], Sequence[int]]


class CorpusError(ConfigError):
    """The corpus cannot be built as pinned (a file differs, a split is empty, a file is not text)."""


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _units(root: str) -> dict[str, list[str]]:
    """unit name -> its files (paths relative to root, '/'-separated, sorted walk order)."""
    units: dict[str, list[str]] = {}
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry in EXCLUDED_UNITS:
            continue
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            files = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
                files += [f"{rel}/{f}" for f in sorted(filenames) if f.endswith(".py")]
            if files:
                units[entry] = files
        elif entry.endswith(".py") and os.path.isfile(path):
            units.setdefault(MODULES_UNIT, []).append(entry)
    return units


def _read(root: str, rel: str) -> tuple[str, str]:
    """(text, sha256 of the bytes) of one library file; CorpusError if it is not UTF-8 text."""
    path = os.path.join(root, rel)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not UTF-8 text ({exc})") from None
    if "\x00" in text:
        raise CorpusError(f"{path}: not text (holds NUL bytes)")
    return text, hashlib.sha256(raw).hexdigest()


def _file_text(rel: str, text: str) -> str:
    return f"# {rel}\n{text}" + ("" if text.endswith("\n") else "\n")


def plan(
    encode: Encode,
    *,
    root: str | None = None,
    min_tokens: int = MIN_DOC_TOKENS,
    heldout_units: Sequence[str] = HELDOUT_UNITS,
    slack: int = _SLACK,
) -> dict[str, Any]:
    """A fresh manifest of this interpreter's library: every document, its split, files and hashes."""
    root = root or stdlib_root()
    docs: list[dict[str, Any]] = []
    for unit, files in _units(root).items():
        split = "heldout" if unit in heldout_units else "train"
        group: list[list[str]] = []
        n = 0
        pieces: list[tuple[list[list[str]], int]] = []
        for rel in files:
            try:
                text, digest = _read(root, rel)
            except CorpusError:  # the library's own test data holds deliberately undecodable files
                continue
            group.append([rel, digest])
            n += len(encode(_file_text(rel, text)))
            if n >= min_tokens + slack:
                pieces.append((group, n))
                group, n = [], 0
        if group:
            if pieces:  # the short tail joins the document before it
                last, m = pieces.pop()
                pieces.append((last + group, m + n))
            else:
                pieces.append((group, n))
        for i, (group, n) in enumerate(pieces):
            if n >= min_tokens + slack:
                docs.append({"id": f"{unit}/{i}", "split": split, "files": group, "approx_tokens": n})
    for split in ("train", "heldout"):
        if not any(d["split"] == split for d in docs):
            raise CorpusError(f"the {split} split is empty (min_tokens={min_tokens})")
    return {
        "format": MANIFEST_FORMAT,
        "python": sysconfig.get_python_version(),
        "min_tokens": min_tokens,
        "heldout_units": list(heldout_units),
        "documents": docs,
    }


def load_manifest(path: str = MANIFEST) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CorpusError(f"{path}: not a cepe corpus manifest (format {MANIFEST_FORMAT})")
    return manifest


def documents(manifest: dict[str, Any], split: str, *, root: str | None = None) -> list[tuple[str, str]]:
    """[(id, text)] of one split, read from this interpreter's library and checked against the pins."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = root or stdlib_root()
    out = []
    for doc in manifest["documents"]:
        if doc["split"] != split:
            continue
        parts = []
        for rel, digest in doc["files"]:
            path = os.path.join(root, rel)
            if not os.path.isfile(path):
                raise CorpusError(
                    f"{path}: missing; the pinned split was made with Python {manifest['python']}'s library"
                )
            text, got = _read(root, rel)
            if got != digest:
                raise CorpusError(
                    f"{path} differs from the pinned split (sha256 {got[:12]}..., pinned {digest[:12]}...): "
                    f"it was made with Python {manifest['python']}'s library; the tokenized held-out set ships "
                    "with cepe (cepe.corpus.heldout_tokens())"
                )
            parts.append(_file_text(rel, text))
        out.append((doc["id"], "".join(parts)))
    if not out:
        raise CorpusError(f"the manifest has no {split} documents")
    return out


def pack(docs: Sequence[np.ndarray]) -> np.ndarray:
    """The packed layout: [n, len_1..len_n, tokens of doc 1, ..., tokens of doc n] (int32)."""
    lens = [len(d) for d in docs]
    return np.concatenate([np.array([len(docs), *lens], dtype=np.int32), *[np.asarray(d, np.int32) for d in docs]])


def unpack(packed: np.ndarray) -> list[np.ndarray]:
    """The documents of a packed array (views)."""
    a = np.asarray(packed)
    if a.ndim != 1 or a.size < 1 or a[0] < 0 or a.size < 1 + int(a[0]):
        raise ValueError("not a packed token array ([n, len_1..len_n, tokens...])")
    n = int(a[0])
    lens = a[1 : 1 + n].astype(np.int64)
    if (lens < 0).any() or 1 + n + int(lens.sum()) != a.size:
        raise ValueError("not a packed token array: the lengths do not add up to its size")
    starts = 1 + n + np.concatenate([[0], np.cumsum(lens)[:-1]])
    return [a[s : s + int(k)] for s, k in zip(starts, lens, strict=True)]


def _save_npy(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build(
    out_dir: str,
    encode: Encode,
    *,
    manifest: dict[str, Any] | None = None,
    splits: Sequence[str] = ("train", "heldout"),
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> dict[str, str]:
    """Tokenizes the pinned documents into out_dir/<split>.npy (packed); returns {split: path}.
    shard=(i, n): only shard i of n of each split's documents (cepe.work_shards), into
    out_dir/<split>-0000i-of-0000n.npy; `cepe train` reads the n files, listed in shard order,
    as the windows of the unsharded file."""
    from .work_shards import shard_path, shard_range

    manifest = manifest or load_manifest()
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split in splits:
        docs = documents(manifest, split)
        name = os.path.join(out_dir, f"{split}.npy")
        if shard is not None:
            lo, hi = shard_range(len(docs), *shard)
            docs, name = docs[lo:hi], shard_path(name, *shard)
        toks = [
            np.asarray(encode(text), dtype=np.int32)
            for _, text in track(docs, desc=f"tokenizing {split}", unit="doc", disable=None if progress else True)
        ]
        paths[split] = name
        _save_npy(paths[split], pack(toks))
    return paths


def heldout_tokens() -> list[np.ndarray]:
    """The shipped held-out documents, tokenized with SmolLM2's tokenizer (the same on every machine)."""
    return unpack(np.load(HELDOUT_NPY))
