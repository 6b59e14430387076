"""Model.chat / create_completion / create_chat_completion (OpenAI shapes), the batched decoder
under them (cepe.batching: a row answers the same alone or in a batch), its sampler, and
`cepe chat` in the terminal (stdin fed, Ctrl-C during a reply)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import TEXT

import cepe
from cepe.batching import ParamError, Row, checked_settings, decode_batch
from cepe.chat import run_chat
from cepe.completions import context_from, embed
from cepe.sampling import SamplingSettings


@pytest.fixture(scope="module")
def model(chat_dir):
    return cepe.load(chat_dir, n_threads=1)


@pytest.fixture(scope="module")
def cepe_model(cepe_chat_dir):
    m = cepe.load(cepe_chat_dir, n_threads=1)
    m.chunk_len = 8
    return m


MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]


# ------------------------------------------------------------------ Model.chat


def test_chat_is_generate_text_with_the_template(model):
    for kw in ({}, {"temperature": 0.0, "repeat_penalty": 1.0}, {"temperature": 1.1, "seed": 5, "top_k": 0}):
        want = model.generate_text("the quick brown fox", max_new_tokens=12, chat=True, **kw)
        assert model.chat("the quick brown fox", max_new_tokens=12, **kw) == want
        assert model.chat([{"role": "user", "content": "the quick brown fox"}], max_new_tokens=12, **kw) == want
        pieces = list(model.chat("the quick brown fox", max_new_tokens=12, stream=True, **kw))
        assert "".join(pieces) == want and all(pieces)


def test_chat_history_and_stop(model):
    full = model.chat(MSGS, max_new_tokens=16, temperature=0.9, seed=4)
    assert full == model.chat(MSGS, max_new_tokens=16, temperature=0.9, seed=4)
    if len(full) > 3:
        stop = full[2:4]
        cut = model.chat(MSGS, max_new_tokens=16, temperature=0.9, seed=4, stop=stop)
        assert cut == full[: full.find(stop)]


def test_chat_refuses_bad_arguments(model, tiny):
    with pytest.raises(ValueError, match="temperature"):
        model.chat("hi", temperature=-1)
    with pytest.raises(ValueError, match="repeat_last_n"):
        model.chat("hi", repeat_last_n=-2)
    with pytest.raises(ValueError, match="top_p"):
        model.chat("hi", top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.chat("hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="role"):
        model.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="logit_bias"):
        model.chat("hi", logit_bias={10**6: 1.0})
    with pytest.raises(ValueError, match="context"):
        model.chat("hi", context="no encoder here")
    no_template = cepe.load(tiny[0])
    with pytest.raises(ValueError):  # no tokenizer at all
        no_template.chat("hi")


def test_chat_with_a_cepe_context(cepe_model):
    doc = TEXT[:300]
    with_ctx = cepe_model.chat("what is gold?", max_new_tokens=10, context=doc, temperature=0, repeat_penalty=1)
    chunks, mask = context_from(cepe_model, [doc], cepe.completions.Limits())
    states = cepe_model.encode(chunks, mask)
    tok = cepe_model.tokenizer
    ids = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "what is gold?"}], add_generation_prompt=True),
        add_special_tokens=False,
    )
    want = cepe_model.generate(np.array(ids), 10, encoder_hidden_states=states, encoder_attention_mask=mask.reshape(-1))
    want = [t for t in want.tolist() if t != 2]
    assert with_ctx == tok.decode(want)


# ------------------------------------------------------------- OpenAI shapes


def test_create_chat_completion(model):
    r = model.create_chat_completion(MSGS, max_tokens=10, temperature=0)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    (choice,) = r["choices"]
    greedy = model.chat(MSGS, max_new_tokens=10, temperature=0, repeat_penalty=1)
    assert choice["message"] == {"role": "assistant", "content": greedy}
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    u = r["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and 1 <= u["completion_tokens"] <= 10


def test_create_chat_completion_stream(model):
    full = model.create_chat_completion(MSGS, max_tokens=10, seed=3)
    chunks = list(
        model.create_chat_completion(MSGS, max_tokens=10, seed=3, stream=True, stream_options={"include_usage": True})
    )
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def test_n_choices_and_seeds(model):
    r = model.create_chat_completion(MSGS, max_tokens=8, n=3, seed=11)
    texts = [c["message"]["content"] for c in r["choices"]]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert texts[0] == model.create_chat_completion(MSGS, max_tokens=8, seed=11)["choices"][0]["message"]["content"]
    assert texts[1] == model.create_chat_completion(MSGS, max_tokens=8, seed=12)["choices"][0]["message"]["content"]


def test_logprobs_are_the_models(model):
    r = model.create_chat_completion(MSGS, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r["choices"][0]["logprobs"]["content"]
    tok = model.tokenizer
    ids = tok.encode(tok.apply_chat_template(MSGS, add_generation_prompt=True), add_special_tokens=False)
    logits = model.forward(np.array(ids))[-1].astype(np.float64)
    lsm = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    first = content[0]
    assert first["logprob"] == pytest.approx(lsm.max(), abs=1e-5)
    assert len(first["top_logprobs"]) == 3 and first["top_logprobs"][0]["logprob"] == pytest.approx(lsm.max(), abs=1e-5)
    assert first["bytes"] == list(first["token"].encode())


def test_create_completion(model):
    greedy = {"temperature": 0.0, "repeat_penalty": 1.0, "chat": False}
    want = model.generate_text("the quick brown", max_new_tokens=12, **greedy)
    r = model.create_completion("the quick brown", max_tokens=12, temperature=0)
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == want
    ids = model.tokenizer.encode("the quick brown")
    assert model.create_completion(ids, max_tokens=12, temperature=0)["choices"][0]["text"] == want
    echo = model.create_completion("the quick brown", max_tokens=12, temperature=0, echo=True)
    assert echo["choices"][0]["text"] == "the quick brown" + want
    two = model.create_completion(["the quick brown", "a stitch"], max_tokens=12, temperature=0)
    assert [c["text"] for c in two["choices"]] == [want, model.generate_text("a stitch", max_new_tokens=12, **greedy)]
    lp = model.create_completion("the quick brown", max_tokens=3, temperature=0, logprobs=2)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) <= 3
    assert model.create_completion("the quick brown")["usage"]["completion_tokens"] <= 16  # OpenAI's default


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"stop": 5}, "stop"),
        ({"seed": -1}, "seed"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"typical_p": 0}, "typical_p"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"cepe_context": ["doc"]}, "cepe_context"),
    ],
)
def test_bad_fields_name_the_field(model, kw, param):
    with pytest.raises(ParamError) as e:
        model.create_chat_completion(MSGS, **kw)
    assert e.value.param == param


def test_too_long_prompt(model):
    with pytest.raises(ParamError, match="maximum context length"):
        model.create_completion("the " * 1100)


# ------------------------------------------------------------------- batching


def test_a_row_answers_the_same_alone_or_in_a_batch(model):
    tok = model.tokenizer
    prompts = ["the quick brown fox", "a stitch", "where there is smoke there is fire. actions", "all"]
    settings = [
        ({"temperature": 0.0}, None),
        ({"temperature": 1.0}, 1),
        ({"temperature": 0.8, "top_p": 0.9, "top_k": 20}, 2),
        ({"temperature": 1.2, "min_p": 0.05, "presence_penalty": 1.0, "frequency_penalty": 0.5}, 3),
    ]
    budgets = [9, 14, 5, 12]

    def rows():
        return [
            Row(tok.encode(p), n, SamplingSettings(**s), seed=seed, stop=["zz"] if i == 1 else ())
            for i, (p, n, (s, seed)) in enumerate(zip(prompts, budgets, settings, strict=True))
        ] + [Row(tok.encode("all"), 12, SamplingSettings(), eos_ids=[])]

    alone = []
    for r in rows():
        for _ in decode_batch(model, [r]):
            pass
        alone.append((r.tokens, r.text, r.finish_reason))
    together = rows()
    for _ in decode_batch(model, together):
        pass
    assert [(r.tokens, r.text, r.finish_reason) for r in together] == alone
    assert len(together[4].tokens) == 12 and together[4].finish_reason == "length"  # eos_ids=[]: never stops


def test_a_row_samples_as_generate_does(model):
    """The same sampler chain and random stream as Model.generate, for a batch of one."""
    ids = model.tokenizer.encode("the quick brown fox")
    kw = {"temperature": 0.9, "top_k": 30, "top_p": 0.95, "min_p": 0.02, "repeat_penalty": 1.2, "repeat_last_n": 8}
    for seed in (0, 7, 2**63):
        want = model.generate(np.array(ids), 15, seed=seed, eos_token_id=[], **kw).tolist()
        row = Row(ids, 15, SamplingSettings(**kw), seed=seed, eos_ids=[])
        list(decode_batch(model, [row]))
        assert row.tokens == want


def test_batched_rows_with_and_without_cepe_context(cepe_model):
    tok = cepe_model.tokenizer
    ctx = context_from(cepe_model, [TEXT[:200], TEXT[200:260]], cepe.completions.Limits())

    def rows():
        return [
            Row(tok.encode("the early bird"), 8, SamplingSettings(), context=ctx),
            Row(tok.encode("a stitch in time"), 8, SamplingSettings()),
            Row(tok.encode("gold"), 8, SamplingSettings(temperature=1.0), seed=5, context=(ctx[0][:1], ctx[1][:1])),
        ]

    alone = []
    for r in rows():
        list(decode_batch(cepe_model, [r]))
        alone.append(r.tokens)
    together = rows()
    list(decode_batch(cepe_model, together))
    assert [r.tokens for r in together] == alone
    plain = cepe_model.generate(np.array(tok.encode("a stitch in time")), 8)
    assert together[1].tokens == [t for t in plain.tolist() if t != 2]


def test_cancelled_row_stops(model):
    r = Row(model.tokenizer.encode("the"), 50, SamplingSettings(), eos_ids=[])
    gen = decode_batch(model, [r])
    next(gen)
    r.cancel()
    rest = list(gen)
    assert rest[-1][0].finish_reason == "cancelled" and len(r.tokens) == 1


def test_checked_settings_name_the_field():
    for kw, param in [
        ({"temperature": "x"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"logit_bias": {500: 1}}, "logit_bias"),
        ({"seed": -5}, "seed"),
        ({"seed": 2**64}, "seed"),
    ]:
        with pytest.raises(ParamError) as e:
            checked_settings(97, **kw)
        assert e.value.param == param, kw


def test_embed_is_the_mean_of_the_encoder_states(cepe_model):
    ids = cepe_model.tokenizer.encode(TEXT[:100], add_special_tokens=False)
    (v,) = embed(cepe_model, [ids])
    chunks, mask = context_from(cepe_model, [TEXT[:100]], cepe.completions.Limits())
    states = cepe_model.encode(chunks, mask).reshape(-1, cepe_model.config.encoder_hidden_size)
    mean = states[mask.reshape(-1) == 1].mean(axis=0)
    np.testing.assert_allclose(v, mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- cepe chat


def _replies(model, turns, max_new_tokens):
    history, out = [], []
    for t in turns:
        history.append({"role": "user", "content": t})
        reply = model.chat(history, max_new_tokens=max_new_tokens)
        history.append({"role": "assistant", "content": reply})
        out.append(reply)
    return out


def test_cepe_chat_reads_stdin(chat_dir, model):
    turns = ["the quick brown fox", "a stitch in time"]
    r = subprocess.run(
        [sys.executable, "-m", "cepe", "chat", "--model", chat_dir, "--max-new-tokens", "8", "--threads", "1"],
        input="\n".join(turns) + "\n/reset\n" + turns[1] + "\n",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CEPE_CACHE": "/nonexistent-cepe-cache"},
    )
    assert r.returncode == 0, r.stderr
    want = _replies(model, turns, 8)
    fresh = _replies(model, turns[1:], 8)
    assert r.stdout.split("\n") == [want[0], want[1], "(history cleared)", fresh[0], ""]


def test_ctrl_c_stops_a_reply_not_the_chat(model, monkeypatch):
    calls = {"n": 0}
    forward = cepe.Model.forward

    def interrupted(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # the prompt, one step, then Ctrl-C during the third forward
            raise KeyboardInterrupt
        return forward(self, *a, **kw)

    monkeypatch.setattr(cepe.Model, "forward", interrupted)
    out = io.StringIO()
    stdin = io.StringIO("the quick brown fox\na stitch in time\n")
    status = run_chat(model, max_new_tokens=8, stdin=stdin, stdout=out)
    monkeypatch.setattr(cepe.Model, "forward", forward)
    lines = out.getvalue().split("\n")
    assert status == 0 and lines[0].endswith(" [stopped]") and len(lines) == 3
    partial = lines[0][: -len(" [stopped]")]
    history = [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": partial}]
    history.append({"role": "user", "content": "a stitch in time"})
    assert lines[1] == model.chat(history, max_new_tokens=8)


def test_cepe_chat_drops_the_oldest_turns_to_fit(model):
    from cepe.chat import _fit

    turn = " ".join(TEXT.split()[:60])
    history = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        history += [{"role": "user", "content": f"{i} {turn}"}, {"role": "assistant", "content": turn}]
    history.append({"role": "user", "content": "last"})
    budget = model.window - 300
    assert _fit(model, history, budget)
    assert history[0]["role"] == "system" and history[1]["role"] == "user" and history[-1]["content"] == "last"
    n = len(model.tokenizer.encode(model.tokenizer.apply_chat_template(history), add_special_tokens=False))
    assert n + budget <= model.window and len(history) < 14
    assert not _fit(model, history, budget)


def test_past_the_window_warns_once(model):
    ids = model.tokenizer.encode(" ".join(["fox"] * (model.window - 10)))[: model.window - 10]
    row = Row(ids, 20, SamplingSettings(), eos_ids=[])
    with pytest.warns(cepe.LongInputWarning) as record:
        list(decode_batch(model, [row]))
    assert len([w for w in record if issubclass(w.category, cepe.LongInputWarning)]) == 1
    assert len(row.tokens) == 20
