#!/usr/bin/env python
"""`cepe serve` throughput: completion tokens per second at 1 and at 8 concurrent clients.

    python benchmarks/bench_serve.py                    # the default model (cepe pull), all CPUs
    python benchmarks/bench_serve.py --quick            # fewer, shorter requests

Starts the server (cepe.serve.create_app under uvicorn) in this process on a free port of
127.0.0.1, then runs two phases against it over HTTP (the standard library's client, one
thread per client), one after the other:

  c1: one client sends --requests chat completions, one at a time;
  cN: --clients clients (default 8) each send --requests of them, all at once.

Every request asks for exactly --max-tokens tokens (greedy, the end-of-sequence token banned
with logit_bias so that no reply stops early), each with its own prompt. Throughput is the
completion tokens of a phase over its wall time; the ratio cN / c1 is what batching buys
(requests that arrive together are decoded in one forward per step). The worker's counters
say how many batches ran and how large they were. Prints one JSON object (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from _common import cpu_model_name, git_state, machine_busy_s, usable_cpus

TOPICS = ["the sea", "a lighthouse", "the moon", "autumn", "a city at night", "mountains", "rain", "a library"]
FORMS = ["a haiku", "a limerick", "two sentences", "a short poem"]


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write {FORMS[i % len(FORMS)]} about {TOPICS[i % len(TOPICS)]} (#{i})."}]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def phase(url: str, name: str, clients: int, requests: int, max_tokens: int, eos: int, first: int) -> dict:
    def client(c: int) -> list[tuple[float, int]]:
        out = []
        for k in range(requests):
            i = first + c * requests + k
            t = time.perf_counter()
            r = post(
                url,
                {
                    "model": name,
                    "messages": prompt(i),
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "logit_bias": {str(eos): -100},
                },
            )
            out.append((time.perf_counter() - t, r["usage"]["completion_tokens"]))
        return out

    busy0, cpu0, start = machine_busy_s(), time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for per in pool.map(client, range(clients)) for x in per]
    wall = time.perf_counter() - start
    busy1, cpu1 = machine_busy_s(), time.process_time()
    tokens = sum(n for _, n in results)
    others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (cpu1 - cpu0))
    return {
        "clients": clients,
        "requests": len(results),
        "completion_tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "mean_latency_s": round(sum(t for t, _ in results) / len(results), 3),
        "other_processes_cpu_s": None if others is None else round(others, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="pulled name, HF directory or GGUF")
    ap.add_argument("--threads", type=int, default=None, help="the model's threads (default: all CPUs)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2, help="requests per client in each phase")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=50.0)
    ap.add_argument("--quick", action="store_true", help="--requests 1 --max-tokens 16")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_tokens = 1, 16

    import uvicorn

    import cepe
    from cepe.serve import create_app

    model = cepe.load(args.model, n_threads=args.threads)
    eos = int(model.config.eos_token_id[0])
    app = create_app(model, model_name="bench", max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        post(url, {"model": "bench", "messages": prompt(999), "max_tokens": 2})  # warm-up
        stats = app.state.worker.stats
        print(f"c1: 1 client x {args.requests} requests of {args.max_tokens} tokens", file=sys.stderr)
        c1 = phase(url, "bench", 1, args.requests, args.max_tokens, eos, 0)
        before = dict(stats)
        n = args.clients
        print(f"c{n}: {n} clients x {args.requests} requests", file=sys.stderr)
        cn = phase(url, "bench", n, args.requests, args.max_tokens, eos, 100)
        cn["batches"] = stats["batches"] - before["batches"]
        cn["mean_batch_rows"] = round((stats["rows"] - before["rows"]) / max(1, cn["batches"]), 2)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    print(
        json.dumps(
            {
                "benchmark": "bench_serve",
                "model": args.model,
                "model_path": model.path,
                "threads": model.n_threads,
                "max_tokens": args.max_tokens,
                "max_batch": args.max_batch,
                "batch_wait_ms": args.batch_wait_ms,
                "c1": c1,
                f"c{n}": cn,
                "throughput_ratio": round(cn["tokens_per_s"] / c1["tokens_per_s"], 2),
                "machine": {"cpu": cpu_model_name(), "usable_cpus": usable_cpus()},
                "git": git_state(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
