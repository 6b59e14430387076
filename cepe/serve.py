"""`cepe serve`: an OpenAI-compatible HTTP server over one cepe.Model.

Install with `pip install "cepe[serve]"` (Starlette and uvicorn). Endpoints:

- GET  /v1/models, /v1/models/{id}: the one model served (its id: --model-name, else the
  name or path given to --model);
- POST /v1/completions: text or token-id prompts (several at once), n, echo, logprobs;
- POST /v1/chat/completions: the model's chat template; `"stream": true` answers with
  server-sent events ("data: {chunk}" lines, then "data: [DONE]");
- POST /v1/embeddings: a CEPE model's encoder states, mean-pooled over each input's
  tokens and scaled to unit length (cepe.completions.embed); 400 for another model;
- GET  /health: "ok" and the batching counters.

The request fields and their checks are cepe.completions'; a CEPE model also takes
`"cepe_context": ["document", ...]` in completions and chat requests, documents that go
through its encoder (chunked into 256-token chunks) instead of the decoder's window.
Errors are OpenAI's error objects ({"error": {"message", "type", "param", "code"}}): 400
for a bad body or field (the field named in "param"), 404 for another model's id, 413 for
a body over MAX_BODY_BYTES, 503 when the queue is full, 500 when the model fails.

Batching: one worker thread owns the model (a model is fed by one thread, and a batch
needs one owner). Requests queue up; the worker takes the first one, then everything that
arrives within batch_wait_s (50 ms) after it or is already waiting, up to max_batch rows
(choices), and decodes them together with cepe.batching.decode_batch: one forward per step
for the whole batch. A request that arrives while a batch runs waits for the next batch
(the KV cache of a batch has a fixed set of rows). Each row samples from its own seeded
stream, so an answer does not depend on what it was batched with. Tokenizing and
rendering chat templates run in a thread pool, off the event loop and off the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .batching import ParamError, Row, Step, decode_batch
from .completions import (
    Job,
    Limits,
    chat_job,
    completion_job,
    embed,
    embedding_inputs,
    embedding_result,
)

MAX_BODY_BYTES = 32 << 20  # a request body larger than this is refused (413)


def _no_model(m: Any, name: str) -> HTTPError:
    return HTTPError(404, f"the model {m!r} does not exist: this server serves {name!r}", "model", "model_not_found")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ------------------------------------------------------------------ worker


_DONE = object()  # the end of a task's events


@dataclass
class _Task:
    deliver: Callable[[Any], None]  # called from the worker thread with each event
    job: Job | None = None  # a completion: events are list[Step], then _DONE
    call: Callable[[], Any] | None = None  # anything else: one event, its result


class Worker:
    """The thread that owns the model: runs queued calls, and decodes queued completion jobs
    in batches (see the module docstring). stats: batches run, rows decoded, the largest
    batch (in rows), rows cancelled (their client went away)."""

    def __init__(self, model: Any, *, max_batch: int = 8, batch_wait_s: float = 0.05, max_queue: int = 256) -> None:
        self.model = model
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self._q: queue.Queue[_Task | None] = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._run, name="cepe-serve-worker", daemon=True)
        self.stats = {"batches": 0, "rows": 0, "max_batch_rows": 0, "cancelled_rows": 0}
        self._running: list[Row] = []  # the rows of the batch in progress

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stops: the rows of the batch in progress end at their next step, queued tasks get an error."""
        while True:
            try:
                task = self._q.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task.deliver(RuntimeError("the server is shutting down"))
        for r in self._running:
            r.cancel()
        self._q.put(None)
        self._thread.join(timeout=60)

    def submit(self, task: _Task) -> None:
        try:
            self._q.put_nowait(task)
        except queue.Full:
            raise HTTPError(503, "the server is busy (its queue is full): retry later", code="server_busy") from None

    def _gather(self, first: _Task, later: list[_Task]) -> list[_Task]:
        """first, plus the job tasks waiting or arriving within batch_wait_s, up to max_batch rows;
        other tasks go to `later`."""
        assert first.job is not None
        batch, rows = [first], len(first.job.rows)
        deadline = time.monotonic() + self.batch_wait_s
        while rows < self.max_batch:
            try:
                task = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if task is None:
                self._q.put(None)  # the stop sentinel: handled after this batch
                break
            if task.job is None:
                later.append(task)
            elif rows + len(task.job.rows) > self.max_batch:
                later.append(task)  # too many rows for this batch: first in the next
                break
            else:
                batch.append(task)
                rows += len(task.job.rows)
        return batch

    def _run(self) -> None:
        later: list[_Task] = []
        while True:
            task = later.pop(0) if later else self._q.get()
            if task is None:
                return
            if task.job is None:
                assert task.call is not None
                try:
                    task.deliver(task.call())
                except Exception as exc:  # noqa: BLE001 - handed to the request
                    task.deliver(exc)
                continue
            self._decode(self._gather(task, later))

    def _decode(self, batch: list[_Task]) -> None:
        rows, owner = [], []
        for t in batch:
            assert t.job is not None
            for i, r in enumerate(t.job.rows):
                rows.append(r)
                owner.append((t, i))
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(rows))
        self._running = rows
        try:
            for steps in decode_batch(self.model, rows):
                mine: dict[int, list[Step]] = {}
                for st in steps:
                    t, i = owner[st.row]
                    st.row = i
                    mine.setdefault(id(t), []).append(st)
                for t in batch:
                    if id(t) in mine:
                        t.deliver(mine[id(t)])
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets it
            for t in batch:
                t.deliver(exc)
            return
        finally:
            self._running = []
        self.stats["cancelled_rows"] += sum(r.finish_reason == "cancelled" for r in rows)
        for t in batch:
            t.deliver(_DONE)


# ------------------------------------------------------------------ app


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _failure(exc: BaseException) -> HTTPError:
    if isinstance(exc, ParamError):
        return HTTPError(400, str(exc), exc.param)
    if isinstance(exc, MemoryError):
        return HTTPError(500, f"out of memory: {exc}")
    return HTTPError(500, f"the model failed: {type(exc).__name__}: {exc}")


def create_app(
    model: Any,
    *,
    model_name: str | None = None,
    limits: Limits | None = None,
    max_batch: int = 8,
    batch_wait_s: float = 0.05,
    max_queue: int = 256,
) -> Starlette:
    """The ASGI application serving `model` (its worker starts and stops with the app's
    lifespan). app.state.worker.stats holds the batching counters."""
    name = model_name or os.path.basename(os.path.normpath(model.path))
    lim = limits or Limits(max_context_tokens=model.max_context_tokens or 65536)
    worker = Worker(model, max_batch=max_batch, batch_wait_s=batch_wait_s, max_queue=max_queue)
    created = int(time.time())

    async def body_of(request: Request) -> dict[str, Any]:
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY_BYTES:
                raise HTTPError(413, f"the request body exceeds {MAX_BODY_BYTES >> 20} MiB")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        m = body.get("model")
        if m is not None and m != name:
            raise _no_model(m, name)
        return body

    def card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "cepe"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [card()]})

    async def model_info(request: Request) -> Response:
        if request.path_params["model"] != name:
            raise _no_model(request.path_params["model"], name)
        return JSONResponse(card())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": name, **worker.stats})

    async def run(job: Job) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def deliver(event: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (shutting down): nobody is listening
                for r in job.rows:
                    r.cancel()

        worker.submit(_Task(deliver, job=job))
        if not job.stream:
            try:
                while (event := await events.get()) is not _DONE:
                    if isinstance(event, BaseException):
                        raise _failure(event)
            except asyncio.CancelledError:
                for r in job.rows:
                    r.cancel()
                raise
            return JSONResponse(job.result())

        async def stream() -> AsyncIterator[str]:
            try:
                while (event := await events.get()) is not _DONE:
                    if isinstance(event, BaseException):
                        err = _failure(event)
                        yield _sse({"error": {"message": err.message, "type": "server_error", "param": None}})
                        return
                    for chunk in job.chunks(event):
                        yield _sse(chunk)
                for chunk in job.final_chunks():
                    yield _sse(chunk)
                yield "data: [DONE]\n\n"
            finally:  # the client went away, or the job ended: a running row stops at its next step
                for r in job.rows:
                    r.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def parse(make: Callable[..., Any], request: Request) -> Any:
        """The request's body through make (tokenizing, rendering: in a thread pool); a bad
        value, ParamError or other, is the client's: 400."""
        body = await body_of(request)
        try:
            return await run_in_threadpool(make, model, body, name, lim)
        except ParamError:
            raise
        except (ValueError, TypeError) as exc:
            raise HTTPError(400, str(exc)) from None

    async def completions(request: Request) -> Response:
        return await run(await parse(completion_job, request))

    async def chat_completions(request: Request) -> Response:
        return await run(await parse(chat_job, request))

    async def embeddings(request: Request) -> Response:
        body = await body_of(request)
        try:
            inputs = await run_in_threadpool(embedding_inputs, model, body, lim)
        except ParamError:
            raise
        except (ValueError, TypeError) as exc:
            raise HTTPError(400, str(exc)) from None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()

        def settle(event: Any) -> None:
            if not done.done():
                done.set_result(event)

        def deliver(event: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutting down)
                loop.call_soon_threadsafe(settle, event)

        worker.submit(_Task(deliver, call=lambda: embed(model, inputs)))
        vectors = await done
        if isinstance(vectors, BaseException):
            raise _failure(vectors)
        n_tokens = sum(len(i) for i in inputs)
        return JSONResponse(embedding_result(name, vectors, n_tokens, body.get("encoding_format") or "float"))

    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError)
        return exc.response()

    async def on_param(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ParamError)
        return HTTPError(400, str(exc), exc.param).response()

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        return HTTPError(code, f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}").response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.close)

    app = Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model_info, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={HTTPError: on_error, ParamError: on_param, 404: not_found, 405: not_found},
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.state.model_name = name
    return app


def serve(
    model: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    sock: socket.socket | None = None,
    **app_options: Any,
) -> None:
    """Serves `model` until interrupted (Ctrl-C / SIGTERM); app_options go to create_app."""
    import uvicorn

    app = create_app(model, **app_options)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    where = f"http://{host}:{port}/v1"
    print(f"cepe: serving {app.state.model_name!r} on {where}", file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=None if sock is None else [sock])
