"""examples/: each script run as a user runs it (a subprocess) on tiny inputs, its output checked
against the same request made through the API directly."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TEXT, write_chat_tokenizer

import cepe
from cepe import rag
from cepe.retrieval import split_passages

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENV = {**os.environ, "CEPE_CACHE": "/nonexistent-cepe-cache", "OMP_NUM_THREADS": "1"}


def run_example(name: str, *args: str) -> list[str]:
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.rstrip("\n").split("\n")


def test_long_document_qa(cepe_text_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT * 3)
    lines = run_example("long_document_qa.py", "--model", cepe_text_dir, "--document", str(doc), "what glitters?")
    model = cepe.load(cepe_text_dir)
    n = len(model.tokenizer.encode(TEXT * 3))
    assert lines[0] == f"[{n} document tokens in the encoder; the decoder's window is {model.window}]"
    want = model.generate_text("what glitters?", context=TEXT * 3, max_new_tokens=64, temperature=0.0)
    assert "\n".join(lines[1:]) == want.rstrip("\n")


def test_rag_folder(cepe_text_dir, tmp_path):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    sentences = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
    for i, s in enumerate(sentences):
        (folder / ("sub" if i % 2 else "") / f"n{i:02d}.txt").write_text(s + "\n")
    lines = run_example("rag_folder.py", "--model", cepe_text_dir, "--in-encoder", "2", str(folder), "early bird?")
    docs = [p.read_text() for p in sorted(folder.rglob("*.txt"))]
    out = rag.answer("early bird?", split_passages(docs), in_decoder=3, in_encoder=2, model=cepe.load(cepe_text_dir))
    assert [ln.split("] ", 1)[1] for ln in lines[:5]] == [p.text[:80] for p in out.in_decoder + out.in_encoder]
    assert "the early bird catches the worm." in lines[0]
    assert "\n".join(lines[5:]) == out.text


def test_train_head(text_dir, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text(TEXT * 8)
    out = tmp_path / "head"
    lines = run_example("train_head.py", "--decoder", text_dir, "--text", str(text), "--out", str(out), "--steps", "3")
    assert lines[-1].endswith(f"over 3 steps; head saved to {out}")
    head = cepe.load(str(out))
    assert head.config.is_cepe
    ids = np.asarray(head.tokenizer.encode("the quick brown fox"))[None]
    chunks = np.asarray(head.tokenizer.encode(TEXT, add_special_tokens=False)[:64]).reshape(1, 1, 64)
    # cross-attention starts at zero; three steps made it read the context
    assert not np.allclose(head.forward(ids, encoder_input_ids=chunks), cepe.load(text_dir).forward(ids))


def test_openai_client(tiny, tmp_path):
    pytest.importorskip("uvicorn")
    shutil.copytree(tiny[0], tmp_path / "m")
    write_chat_tokenizer(tmp_path / "m", 97)
    model_dir = str(tmp_path / "m")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cepe", "serve", "--model", model_dir, "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen([*cmd, "--log-level", "warning"], env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        lines = run_example("openai_client.py", "--base-url", f"http://127.0.0.1:{port}/v1", "--question", "hi")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    want = cepe.load(model_dir).create_chat_completion(
        [{"role": "user", "content": "hi"}], max_tokens=48, temperature=0
    )
    assert isinstance(want, dict)
    assert lines == [*want["choices"][0]["message"]["content"].split("\n"), "(streamed the same)"]
