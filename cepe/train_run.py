"""`cepe train --config FILE`: the two reference training stages from token files (spec CEPE.md §6).

The config is a JSON or TOML file (by extension: .toml is TOML, anything else JSON) of flat keys;
relative paths in it are relative to the config file's directory. See TrainConfig for the keys and
STAGE_DEFAULTS for the per-stage defaults (the reference recipes, §6.2 and §6.3). Batches come from
cepe.train_data. Checkpoints go to <output_dir>/checkpoint (the official layout plus optimizer state,
replaced atomically every save_every steps and at the end: the next stage's `model`), the resolved
config to <output_dir>/train_config.json and one JSON line per step to <output_dir>/metrics.jsonl.

Every problem with the config raises cepe.ConfigError naming the key (the CLI exits with status 2).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .checks import check_seed
from .config import read_config
from .distributed import env_world_size
from .errors import ConfigError
from .files import CONFIG_LIMIT, read_json, read_small
from .load import load
from .progress import bar as progress_bar
from .train import Trainer, checkpoint_world_size, read_checkpoint_state
from .train_data import (
    LAYOUTS,
    TokenFile,
    WindowSampler,
    check_token_range,
    load_npy,
    make_batch,
    open_tokens,
    stage_window,
)

STAGES = ("warmup", "stage2")
CONFIG_FILE = "train_config.json"  # the resolved config of a run, in its output_dir
CHECKPOINT = "checkpoint"  # <output_dir>/checkpoint

# The reference recipes (spec §6.2, §6.3). batch_size is the global batch (sequences per optimizer
# step); micro_batch the reference's per-device batch, from which grad_accum defaults.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "warmup": {
        "decoder_len": 256,
        "n_ctx": 4,  # the encoder reads the decoder's 256 tokens as 4 chunks of 64
        "batch_size": 256,
        "micro_batch": 2,
        "lr": 5e-4,
        "total_steps": 4000,
        "init": "copy",
        "trainable": "cross_attn+encoder",
    },
    "stage2": {
        "decoder_len": 4096,
        "n_ctx": 16,
        "ctx_len": 256,  # 16 x 256 preceding tokens in the encoder
        "batch_size": 128,
        "micro_batch": 1,
        "lr": 3e-4,
        "total_steps": 20000,
        "init": "none",  # resumes from the warmup stage's weights
        "trainable": "cross_attn+encoder",
    },
}
# Keys that may differ when a run is resumed (they do not change what is computed).
_RESUME_FREE = {"model", "output_dir", "resume", "threads", "log", "save_every", "device"}
INT_MAX = 2**63 - 1  # integer keys end up in the C core's int64 (cepe.train.INT_MAX)


@dataclass
class TrainConfig:
    """A resolved training config. Keys (all optional unless marked):

    model (required): a CEPE model directory (official layout; a previous stage's checkpoint too).
    output_dir (required): where checkpoint/, metrics.jsonl and train_config.json go.
    stage: "warmup" (default) or "stage2".
    tokens (required): a .npy path, or a list of paths or of {path, layout} tables
        (layout: "auto" | "stream" | "rows" | "packed"; see cepe.train_data).
    decoder_len, n_ctx, ctx_len, stride: the example's shape. warmup: the decoder reads decoder_len
        tokens and the encoder the same tokens as n_ctx chunks (ctx_len = decoder_len / n_ctx);
        stage2: the encoder reads the n_ctx * ctx_len tokens before the decoder's decoder_len.
        Windows advance by stride (default decoder_len) within each sequence.
    batch_size: sequences per optimizer step, split into grad_accum micro-batches.
    trainable, lr, weight_decay, warmup_ratio, total_steps, grad_accum, clip, lm_loss_cof,
        kl_loss_cof, kl_mode, e2llm, seed, init, logit_floats: cepe.Trainer's arguments.
        seed also orders the data.
    distill_prob, distill_index: CEPED teacher tables (.npy, one row per window in
        window-number order: (n_windows, T_kl, K + 1) float16 and (n_windows, T_kl, K) int).
    save_every: steps between checkpoints (0: only at the end).
    log: the JSONL metrics file (default <output_dir>/metrics.jsonl).
    resume: false, true (continue <output_dir>/checkpoint), "auto" (continue it if it exists)
        or a checkpoint directory.
    threads: CPU threads (default: all). device: "cpu" or "cuda".
    """

    model: str
    output_dir: str
    tokens: list[dict[str, str]]
    stage: str = "warmup"
    decoder_len: int = 0
    n_ctx: int = 0
    ctx_len: int = 0
    stride: int = 0
    batch_size: int = 0
    grad_accum: int = 0
    trainable: str = ""
    lr: float = 0.0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.04
    total_steps: int = 0
    clip: float = 1.0
    lm_loss_cof: float = 1.0
    kl_loss_cof: float = 0.0
    kl_mode: str = "smooth_1e-6"
    e2llm: dict[str, Any] | None = None
    seed: int = 42
    init: str = ""
    logit_floats: int = 0
    distill_prob: str | None = None
    distill_index: str | None = None
    save_every: int = 500
    log: str = ""
    resume: bool | str = False
    threads: int | None = None
    device: str = "cpu"
    source: str = field(default="", repr=False)  # the config file, for messages

    def data_dict(self) -> dict[str, Any]:
        """What train_config.json records (everything but `source`)."""
        d = asdict(self)
        d.pop("source")
        return d

    @property
    def window(self) -> int:
        return stage_window(self.stage, self.decoder_len, self.n_ctx, self.ctx_len)

    @property
    def tokens_per_step(self) -> int:
        """Decoder + encoder tokens of one optimizer step."""
        enc = self.decoder_len if self.stage == "warmup" else self.n_ctx * self.ctx_len
        return self.batch_size * (self.decoder_len + enc)


_KEYS = {f.name for f in fields(TrainConfig)} - {"source"}


# ------------------------------------------------------------------ reading a config


def read_config_file(path: str) -> dict[str, Any]:
    """The raw key/value table of a JSON or TOML (.toml) config file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config: no such file: {path}")
    data = read_small(path, what="the training config", limit=CONFIG_LIMIT, error=ConfigError)
    if path.lower().endswith(".toml"):
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ConfigError(f"{path}: TOML configs need Python >= 3.11 or `pip install tomli`") from None
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except ValueError as exc:  # not UTF-8, not TOML, or an integer past Python's digit limit
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    else:
        try:
            raw = json.loads(data.decode("utf-8-sig"))
        except ValueError as exc:  # not UTF-8, not JSON, or an integer past Python's digit limit
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a table of keys, got {type(raw).__name__}")
    return raw


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _split_error(batch_size: int, world_size: int, grad_accum: int) -> str | None:
    """Why a global batch does not split into world_size x grad_accum equal micro-batches, or None."""
    if batch_size % (world_size * grad_accum) == 0:
        return None
    split = f"world_size ({world_size}) x grad_accum" if world_size > 1 else "grad_accum"
    return f"batch_size ({batch_size}) must split into {split} ({grad_accum}) equal micro-batches"


def parse_config(
    raw: dict[str, Any], source: str = "<config>", base_dir: str | None = None, world_size: int | None = None
) -> TrainConfig:
    """Validates a raw config table and fills in the stage's defaults. Relative paths are taken
    relative to base_dir (default: the directory of `source`). world_size: the data-parallel
    processes (default: torchrun's WORLD_SIZE, else 1); batch_size is the global batch and
    grad_accum the micro-batches of each process."""
    where = source
    if world_size is None:
        world_size = env_world_size()

    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {msg}")

    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise err(unknown[0], f"unknown key (known keys: {', '.join(sorted(_KEYS))})")
    for key in ("model", "output_dir", "tokens"):
        if key not in raw:
            raise err(key, "required key is missing")
    base = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(source))

    def path_of(key: str, v: Any) -> str:
        if not isinstance(v, str) or not v:
            raise err(key, f"must be a path (a non-empty string), got {v!r}")
        return os.path.normpath(os.path.join(base, os.path.expanduser(v)))

    stage = raw.get("stage", "warmup")
    if stage not in STAGES:
        raise err("stage", f"must be one of {STAGES}, got {stage!r}")
    d = STAGE_DEFAULTS[stage]
    out: dict[str, Any] = {"stage": stage, "source": source}
    out["model"] = path_of("model", raw["model"])
    out["output_dir"] = path_of("output_dir", raw["output_dir"])

    toks = raw["tokens"]
    entries = [toks] if isinstance(toks, (str, dict)) else toks
    if not isinstance(entries, list) or not entries:
        raise err("tokens", "must be a path, or a non-empty list of paths or {path, layout} tables")
    files = []
    for i, e in enumerate(entries):
        key = f"tokens[{i}]" if isinstance(toks, list) else "tokens"
        if isinstance(e, str):
            e = {"path": e}
        if not isinstance(e, dict):
            raise err(key, f"must be a path or a {{path, layout}} table, got {e!r}")
        bad = sorted(set(e) - {"path", "layout"})
        if bad:
            raise err(f"{key}.{bad[0]}", "unknown key (expected path, layout)")
        if "path" not in e:
            raise err(f"{key}.path", "required key is missing")
        layout = e.get("layout", "auto")
        if layout not in LAYOUTS:
            raise err(f"{key}.layout", f"must be one of {LAYOUTS}, got {layout!r}")
        files.append({"path": path_of(f"{key}.path", e["path"]), "layout": layout})
    out["tokens"] = files

    def get_int(key: str, default: int, lo: int = 1) -> int:
        v = raw.get(key, default)
        if not _is_int(v) or v < lo:
            raise err(key, f"must be an integer >= {lo}, got {v!r}")
        if v > INT_MAX:
            raise err(key, f"must be an integer <= {INT_MAX}, got {v!r}")
        return int(v)

    out["decoder_len"] = get_int("decoder_len", d["decoder_len"], 2)
    out["n_ctx"] = get_int("n_ctx", d["n_ctx"])
    if stage == "warmup":
        if out["decoder_len"] % out["n_ctx"]:
            raise err(
                "n_ctx",
                f"warmup splits the decoder's {out['decoder_len']} tokens into n_ctx equal encoder chunks, "
                f"but {out['decoder_len']} is not divisible by {out['n_ctx']}",
            )
        want = out["decoder_len"] // out["n_ctx"]
        if "ctx_len" in raw and raw["ctx_len"] != want:
            raise err("ctx_len", f"warmup chunks are decoder_len / n_ctx = {want} tokens, got {raw['ctx_len']!r}")
        out["ctx_len"] = want
    else:
        out["ctx_len"] = get_int("ctx_len", d["ctx_len"])
    out["stride"] = get_int("stride", out["decoder_len"])
    out["batch_size"] = get_int("batch_size", d["batch_size"])
    micro = d["micro_batch"]
    per_rank, rest = divmod(out["batch_size"], world_size)
    default_accum = per_rank // micro if rest == 0 and per_rank % micro == 0 else max(per_rank, 1)
    out["grad_accum"] = get_int("grad_accum", default_accum)
    bad_split = _split_error(out["batch_size"], world_size, out["grad_accum"])
    if bad_split:
        raise err("grad_accum", bad_split)
    out["total_steps"] = get_int("total_steps", d["total_steps"])
    out["save_every"] = get_int("save_every", 500, 0)
    out["logit_floats"] = get_int("logit_floats", 0, 0)
    try:
        out["seed"] = check_seed(raw.get("seed", 42))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None

    for key, default in (("trainable", d["trainable"]), ("init", d["init"]), ("kl_mode", "smooth_1e-6")):
        v = raw.get(key, default)
        if not isinstance(v, str):
            raise err(key, f"must be a string, got {v!r}")
        out[key] = v
    for key, default in (
        ("lr", d["lr"]),
        ("weight_decay", 0.0),
        ("warmup_ratio", 0.04),
        ("clip", 1.0),
        ("lm_loss_cof", 1.0),
        ("kl_loss_cof", 0.0),
    ):
        v = raw.get(key, default)
        if not _is_num(v) or not math.isfinite(v):
            raise err(key, f"must be a finite number, got {v!r}")
        out[key] = float(v)
    e2 = raw.get("e2llm")
    if e2 is not None and not isinstance(e2, dict):
        raise err("e2llm", f"must be a table {{g_max, L, per_sequence}} or absent, got {e2!r}")
    out["e2llm"] = e2
    for key in ("distill_prob", "distill_index"):
        out[key] = path_of(key, raw[key]) if raw.get(key) is not None else None
    if (out["distill_prob"] is None) != (out["distill_index"] is None):
        missing = "distill_index" if out["distill_index"] is None else "distill_prob"
        raise err(missing, "distill_prob and distill_index go together")
    if out["kl_loss_cof"] > 0 and out["distill_prob"] is None:
        raise err("kl_loss_cof", "> 0 needs the teacher tables distill_prob and distill_index (CEPED, spec §6.4)")
    out["log"] = (
        path_of("log", raw["log"]) if raw.get("log") is not None else os.path.join(out["output_dir"], "metrics.jsonl")
    )
    resume = raw.get("resume", False)
    if isinstance(resume, bool) or resume == "auto":
        out["resume"] = resume
    elif isinstance(resume, str) and resume:
        out["resume"] = path_of("resume", resume)
    else:
        raise err("resume", f'must be true, false, "auto" or a checkpoint directory, got {resume!r}')
    threads = raw.get("threads")
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise err("threads", f"must be an integer >= 1, got {threads!r}")
    out["threads"] = threads
    device = raw.get("device", "cpu")
    if device not in ("cpu", "cuda"):
        raise err("device", f"must be 'cpu' or 'cuda', got {device!r}")
    out["device"] = device
    return TrainConfig(**out)


def load_config(path: str, *, world_size: int | None = None, **overrides: Any) -> TrainConfig:
    """Reads and validates a config file; `overrides` (e.g. threads=2, resume=True) replace its keys.
    world_size: as parse_config's."""
    raw = read_config_file(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(raw, source=path, world_size=world_size)


# ------------------------------------------------------------------ the run


@dataclass
class Data:
    """The token files, the window sampler and the optional teacher tables of a run."""

    files: list[TokenFile]
    sampler: WindowSampler
    distill_prob: np.ndarray | None = None
    distill_index: np.ndarray | None = None

    def batch(self, cfg: TrainConfig, step: int, rank: int = 0, world_size: int = 1) -> dict[str, np.ndarray]:
        """Rank `rank`'s rows of optimizer step `step`'s global batch: a pure function of
        (seed, step, rank, world_size), so a resumed run reads what an uninterrupted one would."""
        n = cfg.batch_size // world_size
        idx = self.sampler.batch_indices(step, cfg.batch_size)[rank * n : (rank + 1) * n]
        out = make_batch(cfg.stage, self.sampler.windows(idx), cfg.n_ctx, cfg.ctx_len)
        if self.distill_prob is not None and self.distill_index is not None:
            out["distill_prob"] = np.asarray(self.distill_prob[idx])
            out["distill_index"] = np.asarray(self.distill_index[idx])
        return out


def open_data(cfg: TrainConfig, vocab_size: int, encoder_vocab_size: int) -> Data:
    """Opens and checks the token files (ids in range, at least one window) and teacher tables."""
    where = cfg.source
    files = []
    limit = min(vocab_size, encoder_vocab_size)
    what = "the decoder's" if vocab_size <= encoder_vocab_size else "the encoder's"
    for i, spec in enumerate(cfg.tokens):
        key = f"tokens[{i}]" if len(cfg.tokens) > 1 else "tokens"
        try:
            tf = open_tokens(spec["path"], spec["layout"], name=key)
            check_token_range(tf, limit, name=key, what=what)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        files.append(tf)
    sampler = WindowSampler(files, cfg.window, cfg.stride, cfg.seed)
    if len(sampler) == 0:
        longest = max((int(tf.lengths.max()) for tf in files if tf.lengths.size), default=0)
        need = (
            f"decoder_len = {cfg.decoder_len}"
            if cfg.stage == "warmup"
            else f"n_ctx * ctx_len + decoder_len = {cfg.n_ctx} * {cfg.ctx_len} + {cfg.decoder_len}"
        )
        raise ConfigError(
            f"{where}: tokens: sequences too short: no sequence holds one {cfg.stage} window of {cfg.window} tokens "
            f"({need}); the longest has {longest}"
        )
    data = Data(files, sampler)
    if cfg.distill_prob is not None and cfg.distill_index is not None:
        data.distill_prob, data.distill_index = _open_teacher(cfg, len(sampler), vocab_size)
    return data


def _open_teacher(cfg: TrainConfig, n_windows: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    where = cfg.source
    arrays = []
    for key in ("distill_prob", "distill_index"):
        path = getattr(cfg, key)
        try:
            a = load_npy(path, "teacher table")
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"{where}: {key}: {exc}") from None
        if a.ndim != 3 or a.shape[0] != n_windows:
            last = "K + 1" if key == "distill_prob" else "K"
            raise ConfigError(
                f"{where}: {key}: {path} has shape {a.shape}; expected ({n_windows}, T_kl, {last}), "
                f"one row per window ({n_windows} windows)"
            )
        arrays.append(a)
    prob, index = arrays
    if not np.issubdtype(prob.dtype, np.floating):
        raise ConfigError(f"{where}: distill_prob: must hold floats (float16), got {prob.dtype}")
    if not np.issubdtype(index.dtype, np.integer):
        raise ConfigError(f"{where}: distill_index: must hold integers, got {index.dtype}")
    if prob.shape[:2] != index.shape[:2] or prob.shape[2] != index.shape[2] + 1:
        raise ConfigError(
            f"{where}: distill_prob {prob.shape} and distill_index {index.shape} do not match "
            "((n, T_kl, K + 1) and (n, T_kl, K))"
        )
    if prob.shape[1] > cfg.decoder_len:
        raise ConfigError(f"{where}: distill_prob: T_kl = {prob.shape[1]} exceeds decoder_len = {cfg.decoder_len}")
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= vocab_size:
        raise ConfigError(f"{where}: distill_index: holds ids in [{lo}, {hi}], outside [0, {vocab_size})")
    return prob, index


def _checkpoint_dir(cfg: TrainConfig) -> str:
    return os.path.join(cfg.output_dir, CHECKPOINT)


def _has_checkpoint(path: str) -> bool:
    return any(os.path.lexists(os.path.join(p, "trainer_state.json")) for p in (path, path + ".old"))


def _resume_from(cfg: TrainConfig) -> str | None:
    """The checkpoint directory to continue, or None to start fresh."""
    ckpt = _checkpoint_dir(cfg)
    if cfg.resume is False:
        if _has_checkpoint(ckpt):
            raise ConfigError(
                f"{cfg.source}: output_dir: {cfg.output_dir} already holds a checkpoint; set resume = true "
                "(or pass --resume) to continue it, or choose another output_dir"
            )
        return None
    if cfg.resume == "auto":
        return ckpt if _has_checkpoint(ckpt) else None
    path = ckpt if cfg.resume is True else str(cfg.resume)
    if not _has_checkpoint(path):
        raise ConfigError(f"{cfg.source}: resume: no checkpoint (trainer_state.json) in {path}")
    return path


def _check_resume_config(cfg: TrainConfig, ckpt: str) -> None:
    """A resumed run must compute what the interrupted one would have: every key but _RESUME_FREE
    must equal the one recorded in train_config.json (next to the checkpoint, in its output_dir)."""
    saved_path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), CONFIG_FILE)
    if not os.path.lexists(saved_path):
        return  # a checkpoint written by cepe.Trainer.save directly: nothing to compare with
    saved = read_json(saved_path, what=CONFIG_FILE, limit=CONFIG_LIMIT, error=ConfigError)
    if not isinstance(saved, dict):
        raise ConfigError(f"{saved_path}: expected a JSON object, got {type(saved).__name__}")
    now = json.loads(json.dumps(cfg.data_dict()))  # tuples -> lists, as saved
    diff = [k for k in sorted(now) if k not in _RESUME_FREE and saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{cfg.source}: {k}: the run being resumed used {saved.get(k)!r}, the config says {now[k]!r} "
            f"(a resumed run must keep every setting but {', '.join(sorted(_RESUME_FREE))})"
        )


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _trim_log(path: str, step: int) -> None:
    """Keeps the log's records of steps <= step (a resumed run re-logs the steps after its checkpoint)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                break  # a torn last line
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _trainer_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "warmup_ratio": cfg.warmup_ratio,
        "total_steps": cfg.total_steps,
        "grad_accum": cfg.grad_accum,
        "clip": cfg.clip,
        "lm_loss_cof": cfg.lm_loss_cof,
        "kl_loss_cof": cfg.kl_loss_cof,
        "kl_mode": cfg.kl_mode,
        "e2llm": cfg.e2llm,
        "seed": cfg.seed,
        "init": cfg.init,
        "logit_floats": cfg.logit_floats,
    }


def _check_resumed_trainer(cfg: TrainConfig, trainer: Any) -> None:
    """The checkpoint's own hyper-parameters (trainer_state.json) against the config's."""
    st = trainer._state_dict()
    want = _trainer_kwargs(cfg)
    want.pop("init")  # applied once, at the start
    want["trainable"] = cfg.trainable
    want["e2llm"] = trainer._check_e2llm(cfg.e2llm, trainer.model)  # with its defaults filled in, as saved
    for k, v in want.items():
        got = st.get(k)
        if isinstance(v, float) and isinstance(got, (int, float)):
            same = float(got) == v
        else:
            same = json.loads(json.dumps(got)) == json.loads(json.dumps(v))
        if not same:
            raise ConfigError(f"{cfg.source}: {k}: the checkpoint being resumed has {got!r}, the config says {v!r}")


def _check_world_size(cfg: TrainConfig, ckpt: str, world_size: int) -> None:
    """A run continues only with the world size that wrote its checkpoint: another one changes the
    micro-batches and the order of the gradient sums, so the steps would not be those of the
    uninterrupted run."""
    try:
        st, state_path = read_checkpoint_state(ckpt)
        saved = checkpoint_world_size(st, state_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cfg.source}: resume: {exc}") from None
    if saved != world_size:
        how = "one process (no torchrun, no --nproc)" if saved == 1 else f"{saved} processes (--nproc {saved})"
        raise ConfigError(
            f"{cfg.source}: resume: the checkpoint {ckpt} was written by a run of world size {saved}, this run has "
            f"world size {world_size}; resume it with {how}: another world size changes the micro-batches and the "
            "order of the gradient sums, so the run would not continue exactly"
        )


def run(cfg: TrainConfig, *, max_steps: int | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Trains per `cfg` until total_steps (or `max_steps` more steps), saving checkpoints; returns a
    summary. dry_run: check the config, the model and the data, and return the plan without training.

    Under torchrun (RANK and WORLD_SIZE set) the run is data-parallel (cepe.distributed): each rank
    trains on its rows of every global batch; rank 0 alone writes the checkpoints, the log and
    train_config.json, while the others wait at a barrier."""
    from . import distributed

    parallel = distributed.launched() and not dry_run
    world_size = distributed.env_world_size() if parallel else 1
    device = distributed.rank_device(cfg.device) if parallel else cfg.device
    bad_split = _split_error(cfg.batch_size, world_size, cfg.grad_accum)
    if bad_split:
        raise ConfigError(f"{cfg.source}: grad_accum: {bad_split}")
    ckpt_from = _resume_from(cfg)
    if ckpt_from is not None:
        _check_world_size(cfg, ckpt_from, world_size)
        _check_resume_config(cfg, ckpt_from)
    model_path = ckpt_from if ckpt_from is not None else cfg.model
    if not os.path.exists(model_path):
        raise ConfigError(f"{cfg.source}: model: no such model directory: {model_path}")
    if ckpt_from is None:
        try:
            model = load(cfg.model, n_threads=cfg.threads, device=device)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{cfg.source}: model: {exc}") from None
        mcfg = model.config
    else:
        mcfg = read_config(ckpt_from if os.path.isdir(ckpt_from) else ckpt_from + ".old")
        model = None
    if not mcfg.is_cepe or mcfg.encoder is None:
        raise ConfigError(
            f"{cfg.source}: model: {cfg.model} is not a CEPE checkpoint (no cross-attention / encoder_config)"
        )
    data = open_data(cfg, mcfg.vocab_size, mcfg.encoder.vocab_size)
    n_windows = len(data.sampler)
    plan = {
        "stage": cfg.stage,
        "model": cfg.model,
        "output_dir": cfg.output_dir,
        "checkpoint": _checkpoint_dir(cfg),
        "log": cfg.log,
        "resume_from": ckpt_from,
        "windows": n_windows,
        "window_tokens": cfg.window,
        "tokens_in_files": int(sum(tf.n_tokens for tf in data.files)),
        "epochs": cfg.total_steps * cfg.batch_size / n_windows,
        "tokens_per_step": cfg.tokens_per_step,
        "config": cfg.data_dict(),
    }
    if dry_run:
        return plan

    ctx = distributed.init(cfg.device) if parallel else None
    if ckpt_from is not None:
        trainer = Trainer.resume(ckpt_from, n_threads=cfg.threads, device=device)
        _check_resumed_trainer(cfg, trainer)
    else:
        assert model is not None
        try:
            trainer = Trainer(model, cfg.trainable, **_trainer_kwargs(cfg))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{cfg.source}: {exc}") from None
    dp = distributed.DataParallel(trainer, ctx) if ctx is not None else None
    rank = ctx.rank if ctx is not None else 0
    start = trainer.step_count
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        _write_json_atomic(os.path.join(cfg.output_dir, CONFIG_FILE), cfg.data_dict())
        if ckpt_from is None:
            if os.path.exists(cfg.log):
                os.remove(cfg.log)
        else:
            _trim_log(cfg.log, start)
        os.makedirs(os.path.dirname(os.path.abspath(cfg.log)), exist_ok=True)
    end = cfg.total_steps if max_steps is None else min(cfg.total_steps, start + max_steps)
    ckpt = _checkpoint_dir(cfg)
    saved_at = start if ckpt_from is not None else -1
    losses: list[float] = []
    t_run = time.perf_counter()

    def save() -> None:  # rank 0 writes; the others wait for it
        nonlocal saved_at
        if rank == 0:
            trainer.save(ckpt)
        saved_at = trainer.step_count
        if dp is not None:
            dp.barrier(f"the checkpoint of step {trainer.step_count}")

    with (
        open(cfg.log, "a", encoding="utf-8") if rank == 0 else contextlib.nullcontext() as log,
        progress_bar(
            total=cfg.total_steps,
            initial=start,
            desc=f"cepe train ({cfg.stage})",
            unit="step",
            disable=None if rank == 0 else True,
        ) as bar,
    ):
        try:
            for step in range(start, end):
                t0 = time.perf_counter()
                if dp is None:
                    st = trainer.step(data.batch(cfg, step))
                else:
                    st = dp.step(data.batch(cfg, step, rank, world_size), batch_rows=cfg.batch_size)
                dt = time.perf_counter() - t0
                losses.append(st["loss"])
                rec = {
                    "step": trainer.step_count,
                    **st,
                    "seconds": dt,
                    "tokens": cfg.tokens_per_step,
                    "tokens_per_s": cfg.tokens_per_step / dt if dt > 0 else None,
                    "epoch": (step + 1) * cfg.batch_size / n_windows,
                    "world_size": world_size,
                }
                if dp is not None:
                    rec["allreduce_seconds"] = dp.allreduce_seconds
                if log is not None:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{st['loss']:.4f}", lr=f"{st['lr']:.2e}")
                bar.update(1)
                if cfg.save_every and trainer.step_count % cfg.save_every == 0 and trainer.step_count < end:
                    save()
        except KeyboardInterrupt:
            # the weights are those of the last completed step on every rank: rank 0 saves them
            # without waiting for ranks that are being interrupted too
            if rank == 0 and trainer.step_count != saved_at:
                bar.write(f"interrupted: saving the checkpoint of step {trainer.step_count} to {ckpt}")
                trainer.save(ckpt)
            raise
    if trainer.step_count != saved_at:
        save()
    if dp is not None:
        # every rank leaves the group together: a process that exits with the group's threads
        # still running is killed by std::terminate while its peer may still be using it
        dp.barrier("the end of the run")
        distributed.shutdown()
    seconds = time.perf_counter() - t_run
    n = len(losses)
    return {
        **{k: plan[k] for k in ("stage", "checkpoint", "log", "resume_from", "windows")},
        "step": trainer.step_count,
        "total_steps": cfg.total_steps,
        "steps_run": n,
        "loss_first": losses[0] if n else None,
        "loss_last": losses[-1] if n else None,
        "loss_last_10_mean": float(np.mean(losses[-10:])) if n else None,
        "seconds": seconds,
        "tokens_per_s": n * cfg.tokens_per_step / seconds if n and seconds > 0 else None,
        "world_size": world_size,
        "rank": rank,
    }
