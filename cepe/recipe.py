"""Multi-stage training recipes: one config file that makes a CEPE head from a plain decoder.

    cepe train --config cepe/recipes/smollm2-135m-cepe.toml --output-dir runs/smollm2-135m-cepe

A recipe is a `cepe train` config with a ``stages`` list. Its top-level keys are defaults for
every stage (any key of cepe.train_run.TrainConfig), and three keys may be tables:

- ``model = {decoder = ..., encoder_layers = ..., num_cross_attn_layers = ..., init = ...,
  encoder = "copy", share_embeddings = ...}``: cepe.attach_encoder's arguments; the head is
  made once into ``<output_dir>/init`` (a plain path or name works too);
- ``tokens = {corpus = "stdlib", split = "train"}``: the pinned standard-library corpus
  (cepe.corpus), tokenized once with the decoder's tokenizer into ``<output_dir>/corpus``;
- ``export = {dtype = "float16"}``: after the last stage, the trained head is written to
  ``<output_dir>/head`` (config.json + head.safetensors) in that dtype.

Stage i trains in ``<output_dir>/<stage name>`` (``name`` key, default the stage kind) and
starts from stage i-1's checkpoint; its cross-attention initialisation (``init``) defaults to
"none" there, and in the first stage when ``model`` is a table (which initialised it). Every
stage resumes where it stopped (resume = "auto"), so rerunning the same command after an
interruption continues the recipe; a finished stage is skipped.
"""

from __future__ import annotations

import json
import os
from typing import Any

from . import corpus
from .attach import attach_encoder
from .errors import ConfigError
from .load import load
from .pull import MODELS
from .train_run import parse_config, run

RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
_TABLE_KEYS = ("model", "tokens", "export", "stages", "output_dir")
_MODEL_KEYS = {"decoder", "encoder", "encoder_layers", "num_cross_attn_layers", "init", "share_embeddings", "seed"}


def is_recipe(raw: dict[str, Any]) -> bool:
    return "stages" in raw


def _init_model(spec: dict[str, Any], out: str, base: str, source: str, threads: int | None) -> str:
    """The recipe's starting head, made once into <out>/init."""
    bad = sorted(set(spec) - _MODEL_KEYS)
    if bad:
        raise ConfigError(f"{source}: model.{bad[0]}: unknown key (known: {', '.join(sorted(_MODEL_KEYS))})")
    if "decoder" not in spec:
        raise ConfigError(f"{source}: model.decoder: required key is missing")
    path = os.path.join(out, "init")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    decoder = spec["decoder"]
    if not isinstance(decoder, str) or not decoder:
        raise ConfigError(f"{source}: model.decoder: must be a path or a model name, got {decoder!r}")
    if decoder not in MODELS:
        decoder = os.path.normpath(os.path.join(base, os.path.expanduser(decoder)))
    kwargs = {k: v for k, v in spec.items() if k != "decoder"}
    try:
        model = attach_encoder(load(decoder, n_threads=threads), **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: model: {exc}") from None
    model.save(path, head_only=True)
    return path


def _corpus_tokens(spec: dict[str, Any], out: str, model_path: str, source: str) -> dict[str, str]:
    """The pinned corpus split, tokenized once into <out>/corpus/<split>.npy."""
    bad = sorted(set(spec) - {"corpus", "split"})
    if bad or spec.get("corpus") != "stdlib":
        key = f"tokens.{bad[0]}" if bad else "tokens.corpus"
        raise ConfigError(f'{source}: {key}: a corpus table is {{corpus = "stdlib", split = "train"}}')
    split = spec.get("split", "train")
    path = os.path.join(out, "corpus", f"{split}.npy")
    if not os.path.isfile(path):
        tok = load(model_path).tokenizer
        if tok is None:
            raise ConfigError(f"{source}: tokens: the model has no tokenizer to tokenize the corpus with")
        corpus.build(os.path.dirname(path), lambda s: tok.encode(s, add_special_tokens=False), splits=[split])
    return {"path": path, "layout": "packed"}


def run_recipe(
    path: str,
    raw: dict[str, Any],
    *,
    output_dir: str | None = None,
    threads: int | None = None,
    max_steps: int | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Runs every stage of a recipe (see the module docstring); returns a summary per stage."""
    base = os.path.dirname(os.path.abspath(path))
    stages = raw["stages"]
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ConfigError(f"{path}: stages: must be a non-empty list of stage tables")
    out_raw = output_dir if output_dir is not None else raw.get("output_dir")
    if not isinstance(out_raw, str) or not out_raw:
        raise ConfigError(f"{path}: output_dir: required (in the recipe, or --output-dir)")
    out = os.path.abspath(out_raw if output_dir is not None else os.path.join(base, os.path.expanduser(out_raw)))
    shared = {k: v for k, v in raw.items() if k not in _TABLE_KEYS}
    if threads is not None:
        shared["threads"] = threads
    os.makedirs(out, exist_ok=True)

    model = raw.get("model")
    if isinstance(model, dict):
        model_path = _init_model(model, out, base, path, shared.get("threads"))
    elif isinstance(model, str):
        model_path = os.path.normpath(os.path.join(base, os.path.expanduser(model)))
    else:
        raise ConfigError(f"{path}: model: must be a path or a table of attach_encoder arguments")
    tokens = raw.get("tokens")
    if isinstance(tokens, dict) and "corpus" in tokens:
        tokens = _corpus_tokens(tokens, out, model_path, path)

    summaries = []
    names = set()
    for i, stage in enumerate(stages):
        name = stage.get("name", stage.get("stage", "warmup"))
        if not isinstance(name, str) or not name or os.sep in name or name in names or name in ("init", "corpus"):
            raise ConfigError(f"{path}: stages[{i}].name: must be a unique plain name, got {name!r}")
        names.add(name)
        cfg_raw = {**shared, **{k: v for k, v in stage.items() if k != "name"}}
        cfg_raw.setdefault("resume", "auto")
        if i > 0 or isinstance(model, dict):  # the weights come trained (or initialised) already
            cfg_raw.setdefault("init", "none")
        cfg_raw.update(model=model_path, output_dir=os.path.join(out, name))
        if tokens is not None:
            cfg_raw.setdefault("tokens", tokens)
        cfg = parse_config(cfg_raw, source=f"{path} [stages[{i}] {name}]", base_dir=base)
        summary = run(cfg, max_steps=max_steps, dry_run=dry_run)
        summaries.append({"name": name, **summary})
        if dry_run:  # the later stages are checked against the starting model (same vocabulary)
            continue
        model_path = summary["checkpoint"]
        if summary["step"] < cfg.total_steps:  # --steps ran out inside this stage
            return {"output_dir": out, "stages": summaries, "finished": False}
    result: dict[str, Any] = {"output_dir": out, "stages": summaries, "finished": not dry_run}
    export = raw.get("export")
    if export is not None and not dry_run:
        if not isinstance(export, dict) or set(export) - {"dtype"}:
            raise ConfigError(f'{path}: export: must be a table {{dtype = "float16"}}')
        head = load(model_path, n_threads=shared.get("threads"))
        result["head"] = head.save(
            os.path.join(out, "head"), head_only=True, dtype=export.get("dtype", "float32"), overwrite=True
        )
        with open(os.path.join(out, "recipe.json"), "w", encoding="utf-8") as f:
            json.dump({"recipe": os.path.abspath(path), **raw}, f, indent=1, default=str)
    return result
