"""Every CLI command end to end on tiny random model directories made here
(subprocesses, as a user runs them), with --json, and the bad inputs."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import TEXT, overcommit_always

import cepe


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CEPE_CACHE": os.environ.get("CEPE_CACHE", "/nonexistent-cepe-cache")}
    return subprocess.run(
        [sys.executable, "-m", "cepe", *args], capture_output=True, text=True, input=stdin, env=env, timeout=300
    )


def ok_json(*args: str, stdin: str | None = None) -> dict:
    r = run(*args, "--json", stdin=stdin)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_help_reads_well():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("generate", "perplexity", "encode", "rag", "convert", "info", "bench", "pull", "train"):
        assert cmd in r.stdout


def test_info(text_dir):
    out = ok_json("info", text_dir)
    assert out["model"]["hidden_size"] == 48 and out["backends"]["cpu"]["available"]
    assert "Tokenizer" in out["model"]["tokenizer"]


def test_info_reads_as_text(text_dir, cepe_text_dir):
    r = run("info", text_dir)
    assert r.returncode == 0, r.stderr
    c = cepe.load(text_dir).config
    lines = r.stdout.splitlines()
    assert lines[0] == f"cepe {cepe.__version__}" and lines[1] == "backends:"
    assert lines[2].startswith("  cpu   available: ")
    assert f"model: {text_dir}" in lines
    assert (
        f"  decoder     llama, {c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP {c.intermediate_size}, "
        f"{c.num_attention_heads} heads ({c.num_key_value_heads} KV) of {c.head_dim}"
    ) in lines
    assert any(ln.startswith("  CEPE        no (a plain decoder") for ln in lines)
    assert "{" not in r.stdout  # no dict reprs
    cfg = cepe.load(cepe_text_dir).config
    out = run("info", cepe_text_dir).stdout
    assert (
        f"  CEPE        encoder of {cfg.encoder.num_hidden_layers} layers (hidden {cfg.encoder_hidden_size}), "
        f"cross-attention in the last {cfg.num_cross_attn_layers} layers"
    ) in out.splitlines()


@pytest.mark.skipif(not importlib.import_module("cepe.pull").is_pulled(), reason="the default model is not pulled")
def test_rag_with_the_default_model(tmp_path):
    """`cepe rag` without --model: the default (plain) model, no encoder, k clamped with a notice,
    one passage per one-line fact."""
    facts = tmp_path / "facts.txt"
    facts.write_text(
        "Paris is the capital of France.\nThe Nile is a river in Africa.\n"
        "Mount Everest is the highest mountain on Earth.\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "cepe", "rag", "What is the capital of France?", "--corpus", str(facts), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "cepe: warning: 10 passages asked for, but the corpus has 3: using them all" in r.stderr
    out = json.loads(r.stdout)
    assert out["in_encoder"] == [] and len(out["in_decoder"]) == 3
    assert out["in_decoder"][0] == "Paris is the capital of France."
    assert "Paris" in out["answer"]


def test_generate_text_and_ids(text_dir):
    """The defaults are generate_text's (llama.cpp's sampling, seed 0): the same
    text from the CLI, streamed or not, and from Python; --greedy is temperature 0."""
    from cepe.sampling import TEXT_DEFAULTS

    model = cepe.load(text_dir)
    out = ok_json("generate", "the early bird", "--model", text_dir, "--max-new-tokens", "12")
    assert out["text"] == model.generate_text("the early bird", max_new_tokens=12)
    assert out["completion_tokens"] <= 12 and out["finish_reason"] in ("eos", "stop", "length")
    streamed = run("generate", "the early bird", "--model", text_dir, "--max-new-tokens", "12")
    assert streamed.returncode == 0 and streamed.stdout.rstrip("\n") == out["text"]
    assert re.fullmatch(
        r"cepe: \d+ new tokens, [\d.]+ tokens/s \(prompt \d+ tokens, [\d.]+ s to the first token\)\n", streamed.stderr
    )
    ids = ok_json("generate", "--model", text_dir, "--ids", "3 4 5", "--max-new-tokens", "5")
    assert ids["new_ids"] == model.generate(np.array([3, 4, 5]), 5, **TEXT_DEFAULTS).tolist()
    greedy = ok_json(
        "generate", "--model", text_dir, "--ids", "3 4 5", "--max-new-tokens", "5", "--greedy", "--repeat-penalty", "1"
    )
    assert greedy["new_ids"] == model.generate(np.array([3, 4, 5]), 5).tolist()
    biased = ok_json(
        "generate", "--model", text_dir, "--ids", "3 4 5", "--max-new-tokens", "3", "--logit-bias", "7=100"
    )
    assert biased["new_ids"] == [7, 7, 7]


def test_help_shows_every_default():
    r = run("generate", "--help")
    help_text = " ".join(r.stdout.split("options:")[1].split())  # each option's own entry
    for option, default in [
        ("--temperature", "0.8"),
        ("--top-k", "40"),
        ("--top-p", "0.95"),
        ("--min-p", "0.05"),
        ("--repeat-penalty", "1.1"),
        ("--repeat-last-n", "64"),
        ("--seed", "0"),
        ("--max-tokens", "128"),  # the entry of --max-new-tokens, --max-tokens
        ("--typical-p", "1.0"),
    ]:
        entry = re.escape(option) + r" [A-Z_]+(?:(?! --).)*?\(default: " + re.escape(default) + r"\)"
        assert re.search(entry, help_text), option
    for cmd in ("perplexity", "rag", "bench", "init", "teacher"):
        assert "(default:" in run(cmd, "--help").stdout, cmd


def test_perplexity(text_dir, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT[:150])
    out = ok_json("perplexity", "--model", text_dir, "--file", str(f))
    assert out["perplexity"] == pytest.approx(cepe.load(text_dir).perplexity_text(TEXT[:150]), rel=1e-6)
    assert ok_json("perplexity", TEXT[:150], "--model", text_dir)["perplexity"] == pytest.approx(out["perplexity"])
    assert ok_json("perplexity", "--model", text_dir, "--file", "-", stdin=TEXT[:150])["perplexity"] == pytest.approx(
        out["perplexity"], rel=1e-9
    )


def test_cepe_commands(cepe_text_dir, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(TEXT)
    states = tmp_path / "e.npy"
    out = ok_json("encode", "--model", cepe_text_dir, "--file", str(ctx), "--out", str(states))
    assert out["chunk_len"] == 256 and np.load(states).shape == tuple(out["shape"])
    gen = ok_json(
        "generate", "where there is", "--model", cepe_text_dir, "--context-file", str(ctx), "--max-new-tokens", "8"
    )
    assert gen["text"] == cepe.load(cepe_text_dir).generate_text("where there is", context=TEXT, max_new_tokens=8)
    ppl = ok_json("perplexity", "--model", cepe_text_dir, "--text", "the lazy dog jumps", "--context-file", str(ctx))
    assert ppl["perplexity"] > 1.0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(["the quick brown fox", "a stitch in time", "smoke and fire", "the early bird", "gold that glitters"])
    )
    rag = ok_json(
        "rag",
        "what does the early bird catch?",
        "--model",
        cepe_text_dir,
        "--corpus",
        str(corpus),
        "--one-per-line",
        "--in-decoder",
        "2",
        "--in-encoder",
        "2",
    )
    assert len(rag["in_decoder"]) == 2 and len(rag["in_encoder"]) == 2 and isinstance(rag["answer"], str)


def test_bench(text_dir):
    out = ok_json("bench", "--model", text_dir, "--prompt-tokens", "32", "--new-tokens", "4")
    assert out["prefill_32_tok_s"] > 0 and out["decode_4_tok_s"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--model", "/nonexistent/model"], "no such model directory"),
        (["generate", "--model", "DIR", "--ids", "3 x"], "--ids must be integers"),
        (["generate", "--model", "DIR", "--ids", "3 1000"], "outside the vocabulary"),
        (["generate", "--model", "DIR"], "give a prompt"),
        (["generate", "hi", "--model", "DIR", "--temperature", "-1"], "temperature must be"),
        (["generate", "hi", "--model", "DIR", "--min-p", "2"], "min_p must be in [0, 1], got 2.0"),
        (["generate", "hi", "--model", "DIR", "--logit-bias", "7"], "--logit-bias must be ID=BIAS"),
        (["generate", "hi", "--model", "DIR", "--logit-bias", "1000=1"], "logit_bias token 1000 is outside"),
        (["perplexity", "x", "--model", "DIR", "--text", "y"], "as an argument or with --text, not both"),
        (["generate", "hi", "--model", "DIR", "--threads", "0"], "n_threads must be in"),
        (["perplexity", "--model", "DIR"], "give the text with --text or --file"),
        (["perplexity", "--model", "DIR", "--file", "/nonexistent.txt"], "No such file"),
        (["encode", "--model", "DIR", "--text", "hello"], "not a CEPE checkpoint"),
        (["rag", "q?", "--model", "DIR", "--corpus", "/nonexistent.txt"], "No such file"),
        (["generate", "hi"], "cepe pull smollm2-135m"),
        (["info", "/nonexistent/model"], "no such model directory"),
        (
            ["perplexity", "--model", "DIR", "--file", "/dev/zero"],
            "/dev/zero: --file file must be a regular file, but it is a character device",
        ),
        (
            ["perplexity", "--model", "DIR", "--text", "a b", "--context-file", "/dev/zero"],
            "/dev/zero: --context-file file must be a regular file",
        ),
        (["generate", "hi", "--model", "DIR", "--context-file", "/dev/zero"], "--context-file file must be a regular"),
        (["encode", "--model", "DIR", "--file", "/dev/zero"], "/dev/zero: --file file must be a regular file"),
        (["rag", "q?", "--model", "DIR", "--corpus", "/dev/zero"], "/dev/zero: --corpus file must be a regular file"),
        (["rag", "q?", "--model", "DIR", "--corpus", "/tmp"], "/tmp: --corpus file must be a regular file"),
        (
            ["rag", "q?", "--model", "DIR", "--corpus", "/nonexistent.txt", "--in-decoder", "0", "--in-encoder", "0"],
            "--in-decoder and --in-encoder are both 0",
        ),
        (
            ["rag", "q?", "--model", "DIR", "--corpus", "/nonexistent.txt", "--in-encoder", "-1"],
            "--in-encoder must be in [0, 2147483647], got -1",
        ),
        (["rag", "q?", "--model", "DIR", "--corpus", "/nonexistent.txt", "--words", "0"], "--words must be in [1, "),
        (["bench", "--model", "DIR", "--prompt-tokens", "-5"], "--prompt-tokens must be in [1, 2147483647], got -5"),
        (["bench", "--model", "DIR", "--new-tokens", "0"], "--new-tokens must be in [1, 2147483647], got 0"),
        (
            ["generate", "hi", "--model", "DIR", "--top-k", str(2**31)],
            "--top-k must be in [0, 2147483647], got 2147483648",
        ),
        (["generate", "hi", "--model", "DIR", "--max-new-tokens", str(2**31)], "--max-new-tokens must be in [0, "),
        (["generate", "hi", "--model", "DIR", "--max-new-tokens", "-1"], "--max-new-tokens must be in [0, "),
        (["generate", "hi", "--model", "DIR", "--seed", "-1"], "--seed must be in [0, "),
        (["perplexity", "--model", "DIR", "--text", "x y", "--eval-window", "0"], "--eval-window must be in [1, "),
    ],
)
def test_bad_input_exits_2_with_a_message(text_dir, args, message):
    r = run(*[text_dir if a == "DIR" else a for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("cepe: error:") and message in r.stderr, r.stderr


def test_rag_errors(cepe_text_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = run("rag", "q?", "--model", cepe_text_dir, "--corpus", str(empty))
    assert r.returncode == 2 and "the corpus is empty" in r.stderr
    small = tmp_path / "small.txt"
    small.write_text("one passage\ntwo passages\n")
    r = run("rag", "q?", "--model", cepe_text_dir, "--corpus", str(small), "--one-per-line", "--json")
    assert r.returncode == 0, r.stderr
    assert "cepe: warning: 20 passages asked for, but the corpus has 2: using them all" in r.stderr
    out = json.loads(r.stdout)
    assert sorted(out["in_decoder"] + out["in_encoder"]) == ["one passage", "two passages"]


def last_line_error(r: subprocess.CompletedProcess) -> str:
    """The CLI ends every failure with one line "cepe: error: ..." and status 2."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.rstrip("\n").split("\n")
    assert lines[-1].startswith("cepe: error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[-1]


def test_invalid_utf8_names_the_file(text_dir, cepe_text_dir, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"the quick \xff\xfe brown fox")
    line = last_line_error(run("perplexity", "--model", text_dir, "--file", str(bad)))
    assert f"{bad}: --file file is not valid UTF-8" in line
    line = last_line_error(run("rag", "q?", "--model", cepe_text_dir, "--corpus", str(bad)))
    assert f"{bad}: --corpus file is not valid UTF-8" in line
    line = last_line_error(run("perplexity", "--model", text_dir, "--text", "a b", "--context-file", str(bad)))
    assert f"{bad}: --context-file file is not valid UTF-8" in line
    r = subprocess.run(
        [sys.executable, "-m", "cepe", "perplexity", "--model", text_dir, "--file", "-"],
        input=b"bad \xff bytes",
        capture_output=True,
        timeout=300,
    )
    r = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())
    assert "--file -: stdin is not valid UTF-8" in last_line_error(r)


def test_undecodable_prompt_is_named(text_dir):
    """Bytes that are not UTF-8 on the command line reach Python as lone surrogates."""
    r = subprocess.run(
        [sys.executable, "-m", "cepe", "generate", b"caf\xe9 au lait", "--model", text_dir, "--raw"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "cepe: error: prompt is not valid UTF-8 text" in last_line_error(r)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for m in messages %}", "(line 1): TemplateSyntaxError: Unexpected end of template"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "range() of 100000"),
        ("{{ raise_exception('bad role') }}", "TemplateError: bad role"),
    ],
)
def test_chat_template_errors_name_the_template(text_dir, tmp_path, template, message):
    d = tmp_path / "m"
    shutil.copytree(text_dir, d)
    conf = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": template}))
    line = last_line_error(run("generate", "hi", "--model", str(d), "--max-new-tokens", "2"))
    assert f"cepe: error: chat template of {d / 'tokenizer_config.json'}" in line and message in line, line


def test_long_prompt_warns_at_once(text_dir):
    ids = " ".join(["5"] * 1100)
    r = run("generate", "--model", text_dir, "--ids", ids, "--max-new-tokens", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("cepe: warning: the prompt plus max_new_tokens hold 1102 tokens, 1.1x the model's ")
    assert "CEPE" in r.stderr and "rope_scaling" in r.stderr and "Traceback" not in r.stderr
    assert len(json.loads(r.stdout)["new_ids"]) == 2


@pytest.mark.skipif(overcommit_always(), reason="the kernel grants any allocation (vm.overcommit_memory = 1)")
def test_out_of_memory_is_one_line(text_dir):
    r = run("generate", "--model", text_dir, "--ids", "3 4", "--max-new-tokens", str(2**31 - 10))
    line = last_line_error(r)
    assert "out of memory" in line and "lower max_new_tokens" in line, line


def test_misspelt_option_names_the_close_one():
    r = run("generate", "hi", "--temprature", "0.5")
    assert r.returncode == 2
    assert "unrecognized arguments: --temprature 0.5 (did you mean: --temprature -> --temperature?)" in r.stderr
    r = run("rag", "q?", "--corpus", "x.txt", "--in-encodr", "3")
    assert r.returncode == 2 and "--in-encodr -> --in-encoder" in r.stderr
