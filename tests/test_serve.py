"""`cepe serve` end to end: the official `openai` client against a server started here on
127.0.0.1 (a tiny model with a chat template, and a tiny CEPE model): models, completions,
chat, streaming, 8 concurrent clients (each gets its own answer, as alone, and they are
batched), embeddings, cepe_context, and bad requests (4xx with a message; the server keeps
serving after each)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import TEXT

import cepe
from cepe.completions import Limits, context_from, embed

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from cepe.serve import create_app  # noqa: E402 - after the skips: it needs starlette

NAME = "tiny-chat"


class Server:
    """A uvicorn server in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app) -> None:
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self, **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120, **kw)

    def post(self, path: str, data: bytes, content_type: str = "application/json"):
        """(status, parsed JSON body) of a raw POST."""
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def model(chat_dir):
    return cepe.load(chat_dir, n_threads=1)


@pytest.fixture(scope="module")
def server(model):
    # a batch waits 300 ms for more requests, so clients started together always share one
    s = Server(create_app(model, model_name=NAME, batch_wait_s=0.3))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def cepe_model(cepe_chat_dir):
    m = cepe.load(cepe_chat_dir, n_threads=1)
    m.chunk_len = 8
    return m


@pytest.fixture(scope="module")
def cepe_server(cepe_model):
    s = Server(create_app(cepe_model, model_name="tiny-cepe", limits=Limits(max_context_tokens=400)))
    yield s
    s.stop()


MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]


def greedy_ids(model, ids, n, **kw):
    """Model.generate's greedy tokens, without the eos that ends them."""
    out = model.generate(np.array(ids), n, temperature=0.0, **kw).tolist()
    return out[: out.index(2)] if 2 in out else out


def chat_ids(model, messages):
    tok = model.tokenizer
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def assert_serving(client):
    """The server still answers a plain request."""
    r = client.completions.create(model=NAME, prompt="the", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------ endpoints


def test_models(client, server):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with urllib.request.urlopen(server.url + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


def test_completion(client, model):
    r = client.completions.create(model=NAME, prompt="the quick brown", max_tokens=12, temperature=0)
    ids = model.tokenizer.encode("the quick brown")
    assert r.choices[0].text == model.tokenizer.decode(greedy_ids(model, ids, 12))
    assert r.object == "text_completion" and r.model == NAME
    assert r.usage.prompt_tokens == len(ids) and 1 <= r.usage.completion_tokens <= 12
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")
    two = client.completions.create(model=NAME, prompt=["the quick brown", ids], max_tokens=12, temperature=0)
    assert [c.text for c in two.choices] == [r.choices[0].text] * 2 and [c.index for c in two.choices] == [0, 1]


def test_chat(client, model):
    r = client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == model.tokenizer.decode(greedy_ids(model, chat_ids(model, MSGS), 12))
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(chat_ids(model, MSGS))
    same = model.create_chat_completion(MSGS, max_tokens=12, temperature=0)
    assert same["choices"][0]["message"]["content"] == r.choices[0].message.content


def test_chat_stream(client):
    kw = dict(model=NAME, messages=MSGS, max_tokens=12, temperature=0.9, seed=7)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and not chunks[-1].choices
    assert len({c.id for c in chunks}) == 1


def test_completion_stream(client):
    kw = dict(model=NAME, prompt="a stitch in", max_tokens=10, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_sampling_fields(client):
    kw = dict(model=NAME, messages=MSGS, max_tokens=10, temperature=1.0, top_p=0.9, seed=5)
    a = client.chat.completions.create(**kw)
    assert a.choices[0].message.content == client.chat.completions.create(**kw).choices[0].message.content
    n = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in n.choices] == [0, 1, 2]
    assert n.choices[0].message.content == a.choices[0].message.content
    r = client.chat.completions.create(
        model=NAME,
        messages=MSGS,
        max_tokens=6,
        temperature=0.7,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"5": -100},
        logprobs=True,
        top_logprobs=2,
        stop=["zz"],
        user="ignored",
        metadata={"ignored": "yes"},
        extra_body={"top_k": 20, "min_p": 0.01, "repeat_penalty": 1.1},
    )
    content = r.choices[0].logprobs.content
    assert len(content) <= 6 and all(len(t.top_logprobs) == 2 for t in content)
    lp = client.completions.create(model=NAME, prompt="the", max_tokens=4, temperature=0, logprobs=2, echo=True)
    assert lp.choices[0].text.startswith("the") and len(lp.choices[0].logprobs.tokens) <= 4


# ----------------------------------------------------------- concurrency


def test_eight_concurrent_clients_get_their_own_answers(server, client):
    prompts = [f"{w} " * (1 + i % 3) + TEXT[i * 7 : i * 7 + 20] for i, w in enumerate("abcdefgh")]

    def ask(i: int):
        kw = dict(model=NAME, prompt=prompts[i], max_tokens=6 + i)
        if i % 2:  # half sampled (each with its own seed), half greedy
            kw.update(temperature=1.0, seed=100 + i)
        else:
            kw.update(temperature=0)
        if i == 3:
            return "".join(
                c.choices[0].text for c in server.client().completions.create(stream=True, **kw) if c.choices
            )
        return server.client().completions.create(**kw).choices[0].text

    alone = [ask(i) for i in range(8)]
    before = dict(server.app.state.worker.stats)
    barrier = threading.Barrier(8)

    def together(i: int):
        barrier.wait()
        return ask(i)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(together, range(8)))
    assert answers == alone
    stats = server.app.state.worker.stats
    assert stats["rows"] - before["rows"] == 8
    assert stats["batches"] - before["batches"] < 8 and stats["max_batch_rows"] > 1  # batched
    assert_serving(client)


# ---------------------------------------------------------------- bad input


def test_bad_json(server, client):
    for body in (b"{not json", b"\xff\xfe", b"[1, 2]", b""):
        status, out = server.post("/v1/chat/completions", body)
        assert status == 400 and out["error"]["message"], (body, out)
    assert_serving(client)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"stop": 7}, "stop"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"stream": "yes"}, "stream"),
        ({"seed": 1.5}, "seed"),
        ({"cepe_context": ["a document"]}, "cepe_context"),
    ],
)
def test_bad_fields_are_400_naming_the_field(server, client, fields, param):
    body = {"model": NAME, "messages": MSGS, "max_tokens": 4, **fields}
    status, out = server.post("/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and out["error"]["param"] == param and out["error"]["message"]
    assert_serving(client)


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x")
    assert_serving(client)


def test_too_long_prompt(client, model):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=NAME, prompt="the " * (model.window + 10), max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=model.window)
    assert_serving(client)


def test_unknown_path_and_method(server, client):
    with pytest.raises(openai.NotFoundError):
        client.get("/nowhere", cast_to=object)
    status, out = server.post("/v1/models", b"{}")
    assert status == 405 and out["error"]["message"]
    assert_serving(client)


def test_embeddings_need_a_cepe_model(client):
    with pytest.raises(openai.BadRequestError, match="CEPE"):
        client.embeddings.create(model=NAME, input="the quick brown fox")
    assert_serving(client)


def test_disconnected_stream_is_cancelled(server, client):
    stats = server.app.state.worker.stats
    before = stats["cancelled_rows"]
    stream = client.completions.create(
        model=NAME, prompt="the", max_tokens=900, temperature=0, stream=True, logit_bias={"2": -100}
    )
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 60
    while stats["cancelled_rows"] == before:  # the row stops at its next step, not after 900 tokens
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert_serving(client)


def test_a_model_without_a_tokenizer(tiny):
    s = Server(create_app(cepe.load(tiny[0], n_threads=1), model_name="ids-only"))
    try:
        c = s.client()
        r = c.completions.create(model="ids-only", prompt=[5, 6, 7], max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError, match="tokenizer"):
            c.completions.create(model="ids-only", prompt="text", max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="tokenizer"):
            c.chat.completions.create(model="ids-only", messages=MSGS, max_tokens=4)
    finally:
        s.stop()


# ------------------------------------------------------------------- CEPE


def test_embeddings(cepe_server, cepe_model):
    c = cepe_server.client()
    texts = [TEXT[:120], "the early bird"]
    r = c.embeddings.create(model="tiny-cepe", input=texts)
    tok = cepe_model.tokenizer
    want = embed(cepe_model, [tok.encode(t, add_special_tokens=False) for t in texts])
    got = np.array([d.embedding for d in r.data])
    assert got.shape == (2, cepe_model.config.encoder_hidden_size)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert r.usage.prompt_tokens == sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)
    b64 = c.embeddings.create(model="tiny-cepe", input="the early bird", encoding_format="base64")
    raw = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4")
    np.testing.assert_allclose(raw, want[1], rtol=1e-6)
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="tiny-cepe", input="x " * 500)  # over max_context_tokens


def test_cepe_context(cepe_server, cepe_model):
    c = cepe_server.client()
    docs = [TEXT[:150], TEXT[150:200]]
    r = c.chat.completions.create(
        model="tiny-cepe", messages=MSGS, max_tokens=8, temperature=0, extra_body={"cepe_context": docs}
    )
    chunks, mask = context_from(cepe_model, docs, Limits())
    states = cepe_model.encode(chunks, mask)
    want = greedy_ids(
        cepe_model, chat_ids(cepe_model, MSGS), 8, encoder_hidden_states=states, encoder_attention_mask=mask.reshape(-1)
    )
    assert r.choices[0].message.content == cepe_model.tokenizer.decode(want)
    plain = c.chat.completions.create(model="tiny-cepe", messages=MSGS, max_tokens=8, temperature=0)
    assert plain.choices[0].message.content == cepe_model.tokenizer.decode(
        greedy_ids(cepe_model, chat_ids(cepe_model, MSGS), 8)
    )
    with pytest.raises(openai.BadRequestError, match="cepe_context"):
        c.completions.create(model="tiny-cepe", prompt="x", extra_body={"cepe_context": ["x " * 500]})
    with pytest.raises(openai.BadRequestError, match="cepe_context"):
        c.completions.create(model="tiny-cepe", prompt="x", extra_body={"cepe_context": 5})


# -------------------------------------------------------------------- CLI


def test_cepe_serve_command(chat_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CEPE_CACHE": "/nonexistent-cepe-cache"}
    cmd = [sys.executable, "-m", "cepe", "serve", "--model", chat_dir, "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen([*cmd, "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            try:
                assert [m.id for m in c.models.list()] == [chat_dir]
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        r = c.chat.completions.create(model=chat_dir, messages=MSGS, max_tokens=4, temperature=0)
        assert r.choices[0].message.content is not None
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/v1" in err and "stopped" in err


def test_cepe_serve_refuses_bad_options(chat_dir):
    r = subprocess.run(
        [sys.executable, "-m", "cepe", "serve", "--model", chat_dir, "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--port" in r.stderr
