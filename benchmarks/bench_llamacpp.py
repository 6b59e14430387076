#!/usr/bin/env python
"""cepe against llama.cpp on the same GGUF files: pp512, tg128 and peak RSS, 2 threads.

    python benchmarks/bench_llamacpp.py                                   # build (once), then measure
    python benchmarks/bench_llamacpp.py --cache-dir /work/cache/llcpp --rounds 2 --repetitions 3 \\
        --out bench_llamacpp.json --plot bench_llamacpp.png

llama.cpp: `llama-bench` and `llama-quantize` built from the llama-cpp-python source
distribution on PyPI (it vendors llama.cpp): the sdist is taken from --cache-dir or fetched with
`pip download --no-deps --no-binary llama-cpp-python`, unpacked, and built with cmake (Release,
GGML_NATIVE=ON, static, only those two targets; `nice`, -j2), all under --cache-dir and reused
by later runs. Files: the default model (the pulled SmolLM2-135M-Instruct Q4_1 GGUF) as it is,
and its Q8_0, Q4_0, F16 and F32 copies from `llama-quantize --allow-requantize`, also cached.

Both engines read the same files, each run in a process of its own (its peak RSS is that child's
ru_maxrss from wait4), the engines alternating within each of --rounds rounds, the order
reversed from one round to the next, so a slow spell of a shared host lands on both:
- llama.cpp: `llama-bench -m FILE -p 512 -n 128 -r R -t T -o json` (after its own warm-up run);
- cepe: cepe.load(FILE, n_threads=T), one warm-up, then R timed prefills of 512 random tokens
  (logits of the last position, as `cepe bench`) and R greedy decodes of 128 tokens after a
  1-token prompt (llama-bench's tg128 starts from an empty context).
Each figure is the median over all rounds' samples, with the min and max beside it; the ratios
cepe / llama.cpp are of the medians. Targets: cepe >= 1.0x llama.cpp on pp512 and tg128 for
every format, peak RSS <= 1.3x llama.cpp's. Prints one JSON object on stdout (progress on
stderr) and draws --plot: bars per format and engine, whiskers from min to max.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

from _common import cpu_model_name, emit_json, git_state, usable_cpus

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE, VERSION = "llama-cpp-python", "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}"
TOOLS = ("llama-bench", "llama-quantize")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)
FORMATS = ("Q4_1", "Q8_0", "Q4_0", "F16", "F32")  # Q4_1: the pulled file as it is
TARGETS = {"pp_ratio": 1.0, "tg_ratio": 1.0, "rss_ratio_max": 1.3}


def log(msg: str) -> None:
    print(f"[bench_llamacpp] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=os.path.join("~", ".cache", "cepe", "llcpp"))
    p.add_argument("--model", default="smollm2-135m", help="a pulled model's name or a GGUF path")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repetitions", type=int, default=3, help="timed runs of each test per round (llama-bench -r)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--build-only", action="store_true", help="build llama.cpp's tools and make the files, then stop")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--plot", default="bench_llamacpp.png")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run cepe on this file, print JSON
    return p.parse_args()


# ------------------------------------------------------------------ building llama.cpp


def run(cmd: list[str], **kw: object) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def sdist(cache: str) -> str:
    path = os.path.join(cache, f"{SDIST}.tar.gz")
    if not os.path.exists(path):
        run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, "--no-build-isolation"]
            + ["--dest", cache, f"{PACKAGE}=={VERSION}"]
        )
    return path


def build_tools(cache: str) -> dict[str, str]:
    """llama-bench and llama-quantize, built once under cache/build-native."""
    build = os.path.join(cache, "build-native")
    tools = {t: os.path.join(build, "bin", t) for t in TOOLS}
    if all(os.access(p, os.X_OK) for p in tools.values()):
        return tools
    os.makedirs(cache, exist_ok=True)
    src_root = os.path.join(cache, "src")
    llama = os.path.join(src_root, SDIST, "vendor", "llama.cpp")
    if not os.path.isfile(os.path.join(llama, "CMakeLists.txt")):
        with tarfile.open(sdist(cache)) as tf:
            tf.extractall(src_root, filter="data")
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    run([*nice, "cmake", "-S", llama, "-B", build, *CMAKE_FLAGS])
    run([*nice, "cmake", "--build", build, "--config", "Release", "-j2", "--target", *TOOLS])
    return tools


def model_files(tools: dict[str, str], cache: str, source: str, formats: list[str], source_type: str) -> dict[str, str]:
    """{format: GGUF path}: the source as it is, and llama-quantize's copies (cached)."""
    out_dir = os.path.join(cache, "models")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(source))[0].split(".")[0]
    files = {}
    for fmt in formats:
        if fmt == source_type:
            files[fmt] = source
            continue
        dst = os.path.join(out_dir, f"{stem}.{fmt}.gguf")
        if not os.path.exists(dst):
            tmp = dst + ".tmp"
            cmd = [tools["llama-quantize"], "--allow-requantize", source, tmp, fmt, "2"]
            log("$ " + " ".join(cmd))
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"llama-quantize failed ({done.returncode}): {done.stderr[-2000:]}")
            os.replace(tmp, dst)
        files[fmt] = dst
    return files


# ------------------------------------------------------------------ measuring


def child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, int, float]:
    """Runs cmd; returns its stdout, its peak RSS in bytes (wait4's ru_maxrss) and its wall seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    return out.decode(), ru.ru_maxrss * 1024, time.perf_counter() - start


def llamacpp(tool: str, path: str, a: argparse.Namespace) -> dict:
    cmd = [tool, "-m", path, "-p", str(a.prompt), "-n", str(a.gen), "-r", str(a.repetitions)]
    out, rss, wall = child([*cmd, "-t", str(a.threads), "-o", "json"])
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] == a.prompt and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == a.gen and r["n_prompt"] == 0)
    return {"pp": list(pp["samples_ts"]), "tg": list(tg["samples_ts"]), "rss": rss, "wall_s": wall}


def cepe_run(path: str, a: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--threads", str(a.threads)]
    cmd += ["--prompt", str(a.prompt), "--gen", str(a.gen), "--repetitions", str(a.repetitions)]
    out, rss, wall = child(cmd, env)
    return {**json.loads(out), "rss": rss, "wall_s": wall}


def worker(a: argparse.Namespace) -> None:
    """In its own process: cepe's pp and tg on one file, through the Python API."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import numpy as np

    import cepe

    start = time.perf_counter()
    model = cepe.load(a.worker, n_threads=a.threads)
    load_s = time.perf_counter() - start
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, a.prompt))
    model.forward(ids, logits="last")  # warm-up
    model.generate(ids[:, :1], 8, eos_token_id=[])
    pp, tg = [], []
    for _ in range(a.repetitions):
        t = time.perf_counter()
        model.forward(ids, logits="last")
        pp.append(a.prompt / (time.perf_counter() - t))
        t = time.perf_counter()
        model.generate(ids[:, :1], a.gen, eos_token_id=[])
        tg.append(a.gen / (time.perf_counter() - t))
    print(json.dumps({"pp": pp, "tg": tg, "load_s": load_s}))


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fmts = list(result["formats"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(
        axes,
        (
            ("pp", f"prefill pp{result['config']['prompt']} (tokens/s)"),
            ("tg", f"decode tg{result['config']['gen']} (tokens/s)"),
            ("rss_mb", "peak RSS (MB)"),
        ),
        strict=True,
    ):
        x = np.arange(len(fmts))
        for j, eng in enumerate(("llama.cpp", "cepe")):
            s = [result["formats"][f][eng][key] for f in fmts]
            med = np.array([v["median"] for v in s])
            lo = med - np.array([v["min"] for v in s])
            hi = np.array([v["max"] for v in s]) - med
            ax.bar(x + (j - 0.5) * 0.38, med, 0.38, yerr=[lo, hi], capsize=3, label=eng)
        ax.set_xticks(x, fmts)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle(f"{result['model']}, {result['config']['threads']} threads, {result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    a = parse_args()
    if a.worker:
        worker(a)
        return
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from cepe.gguf_io import GGUFFile
    from cepe.pull import resolve

    cache = os.path.abspath(os.path.expanduser(a.cache_dir))
    source = resolve(a.model)
    gf = GGUFFile(source)
    source_type = max(
        (t.type_name for t in gf.tensors.values() if len(t.shape) == 2),
        key=list(t.type_name for t in gf.tensors.values()).count,
    )
    gf.close()
    formats = [f.strip().upper() for f in a.formats.split(",") if f.strip()]
    tools = build_tools(cache)
    files = model_files(tools, cache, source, formats, source_type)
    if a.build_only:
        print(json.dumps({"tools": tools, "files": files}, indent=1))
        return
    samples: dict = {
        f: {e: {"pp": [], "tg": [], "rss": [], "load_s": []} for e in ("llama.cpp", "cepe")} for f in files
    }
    for rnd in range(a.rounds):
        order = list(files) if rnd % 2 == 0 else list(reversed(files))
        for fmt in order:
            engines = ("llama.cpp", "cepe") if (rnd + order.index(fmt)) % 2 == 0 else ("cepe", "llama.cpp")
            for eng in engines:
                log(f"round {rnd + 1}/{a.rounds}: {fmt} {eng}")
                r = llamacpp(tools["llama-bench"], files[fmt], a) if eng == "llama.cpp" else cepe_run(files[fmt], a)
                s = samples[fmt][eng]
                s["pp"] += r["pp"]
                s["tg"] += r["tg"]
                s["rss"].append(r["rss"])
                if "load_s" in r:
                    s["load_s"].append(r["load_s"])
                pp, tg = statistics.median(r["pp"]), statistics.median(r["tg"])
                log(f"  pp {pp:.1f} tg {tg:.1f} rss {r['rss'] / 1e6:.0f} MB")
    result: dict = {
        "model": os.path.basename(source),
        "machine": {"cpu": cpu_model_name(), "usable_cpus": usable_cpus()},
        "git": git_state(),
        "llama_cpp": f"{PACKAGE} {VERSION} (vendored llama.cpp), GGML_NATIVE=ON",
        "config": {
            "threads": a.threads,
            "rounds": a.rounds,
            "repetitions": a.repetitions,
            "prompt": a.prompt,
            "gen": a.gen,
        },
        "targets": TARGETS,
        "formats": {},
    }
    for fmt, per in samples.items():
        row: dict = {}
        for eng, s in per.items():
            row[eng] = {
                "pp": spread(s["pp"]),
                "tg": spread(s["tg"]),
                "rss_mb": spread([x / 1e6 for x in s["rss"]]),
            }
            if s["load_s"]:
                row[eng]["load_s"] = spread(s["load_s"])
        c, ll = row["cepe"], row["llama.cpp"]
        ratios = {
            "pp": c["pp"]["median"] / ll["pp"]["median"],
            "tg": c["tg"]["median"] / ll["tg"]["median"],
            "rss": c["rss_mb"]["max"] / ll["rss_mb"]["max"],
        }
        row["ratio_cepe_over_llamacpp"] = {k: round(v, 3) for k, v in ratios.items()}
        row["targets_met"] = {
            "pp": ratios["pp"] >= TARGETS["pp_ratio"],
            "tg": ratios["tg"] >= TARGETS["tg_ratio"],
            "rss": ratios["rss"] <= TARGETS["rss_ratio_max"],
        }
        result["formats"][fmt] = row
    result["all_targets_met"] = all(all(r["targets_met"].values()) for r in result["formats"].values())
    emit_json(result, a.out)
    if a.plot:
        plot(result, a.plot)
        log(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
