"""Types: cepe_c.pyi against the built module (mypy's stubtest), and `mypy --strict` on user code
(the examples, and a script below) seeing cepe as an installed, typed package (py.typed, and
cepe_c's stub package)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")
ROOT = Path(__file__).resolve().parent.parent

USER_SCRIPT = """
import pickle
from collections.abc import Iterator

import numpy as np

import cepe
from cepe.rag import answer

model: cepe.Model = cepe.load("smollm2-135m", n_threads=2)
cache: cepe.KVCache = model.create_cache(1, 64)
logits: np.ndarray = model.forward(np.array([[1, 2, 3]]), cache=cache)
out = model.generate(np.array([1, 2, 3]), 8, temperature=0.7, seed=1)
assert isinstance(out, np.ndarray)  # a cepe.Generation with details=True or logprobs=True
ids: np.ndarray = out
text = model.generate_text("Hello", max_new_tokens=8)
pieces = model.generate_text("Hello", stream=True)
reply = model.chat([{"role": "user", "content": "hi"}])
result = model.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4)
sampler = cepe.Sampler(model.config.vocab_size, temperature=0.8, top_k=40, seed=0)
token: int = sampler.sample(logits[0, -1])
again: cepe.Model = pickle.loads(pickle.dumps(model))
qa = answer("Who?", ["a passage"], model=model)
words: str = qa.text
ppl: float = model.perplexity_text("some text")
stream: str | Iterator[str] = text
"""


def test_stubs_match_the_module():
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "cepe_c"], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_user_code_passes_mypy_strict(tmp_path):
    site = tmp_path / "site"  # cepe as pip installs it: the package (py.typed) and cepe_c-stubs
    site.mkdir()
    for name in ("cepe", "cepe_c-stubs"):
        os.symlink(ROOT / name, site / name)
    (tmp_path / "user_script.py").write_text(USER_SCRIPT)
    files = [str(tmp_path / "user_script.py"), *map(str, sorted((ROOT / "examples").glob("*.py")))]
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--python-version", "3.11", *files],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
