"""What cepe.load's first argument names: a path, a pulled or shipped model, or a Hugging Face repo.

    cepe.load("path/to/dir_or.gguf")                  # a path that exists wins
    cepe.load("smollm2-135m")                         # `cepe pull`'s cache (cepe.pull)
    cepe.load("HuggingFaceTB/SmolLM2-135M-Instruct")  # huggingface_hub's cache, else the Hub
    cepe.load("org/repo/model.Q4_K_M.gguf")           # one file of a repo (repos with several GGUFs)

Hugging Face repos are looked up offline first, in huggingface_hub's own cache ($HF_HUB_CACHE,
where transformers and `hf download` put them); only a repo that is not there is fetched, and then
only what cepe reads (configs, safetensors, tokenizer files, or the one GGUF file). Without a
network (or with HF_HUB_OFFLINE=1) a repo that is not cached raises FileNotFoundError saying so.
A name that is none of these raises FileNotFoundError listing the close names that exist.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any

from .pull import MODELS, SHIPPED
from .pull import resolve as resolve_pulled

# huggingface_hub's repo id rule: "name" or "org/name", letters, digits, "-", "_", "." (no "--", "..").
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
# What cepe reads of an HF model directory (cepe.load), fetched when a repo is not cached yet.
HF_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def _is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name and not name.endswith(".gguf")


def _split_gguf(name: str) -> tuple[str, str] | None:
    """ "org/repo/sub/file.gguf" as (repo id, file in the repo), else None."""
    parts = name.split("/")
    if len(parts) < 3 or not name.endswith(".gguf") or not _is_repo_id("/".join(parts[:2])):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as exc:  # a dependency of cepe (and of tokenizers): only a broken install lacks it
        raise ImportError(f"Hugging Face repo ids need huggingface_hub: {exc}") from None
    return huggingface_hub


def cached_repos() -> list[str]:
    """The model repo ids in huggingface_hub's cache (none when it has no cache)."""
    hub = _hub()
    try:
        info = hub.scan_cache_dir(hub.constants.HF_HUB_CACHE)
    except (hub.errors.CacheNotFound, OSError):
        return []
    return sorted(r.repo_id for r in info.repos if r.repo_type == "model")


def known_names() -> list[str]:
    return sorted({*MODELS, *SHIPPED})


def _suggest(name: str, candidates: list[str]) -> str:
    lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)
    close += [c for c in lower if c.startswith(name.lower()) and c not in close]
    return f"; did you mean {' or '.join(repr(lower[c]) for c in close[:3])}?" if close else ""


def _unknown(name: str) -> FileNotFoundError:
    repos = cached_repos()
    listing = f"pulled or shipped models: {', '.join(known_names())}"
    if repos:
        listing += f"; cached Hugging Face repos: {', '.join(repos)}"
    return FileNotFoundError(
        f"no file, directory or model named {name!r}{_suggest(name, known_names() + repos)} "
        f"({listing}; or give a Hugging Face repo id, org/name)"
    )


def _one_gguf(where: str, prefix: str, files: list[str]) -> str:
    """The one GGUF file among a repo's or a directory's files (where: what holds them, for
    errors; prefix: what names a file of them)."""
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(f"{where} holds no config.json and no GGUF file: not a model cepe reads")
    if len(ggufs) > 1:
        names = ", ".join(os.path.join(prefix, f) for f in ggufs[:20])
        raise FileNotFoundError(f"{where} holds {len(ggufs)} GGUF files and no config.json: name one ({names})")
    return ggufs[0]


def _in_dir(where: str, prefix: str, directory: str) -> str:
    """An HF model directory as is; a directory of GGUF files without config.json: its one GGUF file."""
    if os.path.lexists(os.path.join(directory, "config.json")):
        return directory
    files = [os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory) for f in fs]
    if not any(f.endswith(".gguf") for f in files):
        return directory  # cepe.load says what an HF model directory lacks
    return os.path.join(directory, _one_gguf(where, prefix, files))


def _offline_hint(hub: Any, repo_id: str, exc: BaseException) -> FileNotFoundError:
    cache = hub.constants.HF_HUB_CACHE
    offline = hub.constants.HF_HUB_OFFLINE
    why = "HF_HUB_OFFLINE is set" if offline else f"the Hub cannot be reached ({type(exc).__name__}: {exc})"
    return FileNotFoundError(
        f"Hugging Face repo {repo_id} is not in the cache ({cache}) and {why}: download it where there is a "
        f"network (`hf download {repo_id}`, or cepe.load({repo_id!r}) there) and copy the cache over"
        + _suggest(repo_id, cached_repos())
    )


def resolve_hub(repo_id: str, filename: str | None = None) -> str:
    """The local path of a Hugging Face model repo (its snapshot directory, or its GGUF
    file): from huggingface_hub's cache when it is there, else downloaded into it."""
    hub = _hub()
    cache = hub.constants.HF_HUB_CACHE
    try:
        if filename is not None:
            return str(hub.hf_hub_download(repo_id, filename, cache_dir=cache, local_files_only=True))
        snapshot = str(hub.snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
        return _in_dir(f"Hugging Face repo {repo_id}", repo_id, snapshot)
    except hub.errors.LocalEntryNotFoundError:
        pass  # not cached: fetch it below
    except hub.errors.HFValidationError as exc:
        raise ValueError(f"{repo_id!r} is not a valid Hugging Face repo id: {exc}") from None
    if hub.constants.HF_HUB_OFFLINE:
        raise _offline_hint(hub, repo_id, RuntimeError("offline")) from None
    try:  # one request first: without a network it fails at once (downloads retry for half a minute)
        info = hub.HfApi(endpoint=hub.constants.ENDPOINT).model_info(repo_id)
    except hub.errors.GatedRepoError:
        raise PermissionError(f"Hugging Face repo {repo_id} is gated: accept its terms and `hf auth login`") from None
    except hub.errors.RepositoryNotFoundError:
        raise FileNotFoundError(
            f"no Hugging Face repo {repo_id} (or it is private: `hf auth login`)" + _suggest(repo_id, cached_repos())
        ) from None
    except Exception as exc:  # noqa: BLE001 - the HTTP client's connection errors vary by version
        raise _offline_hint(hub, repo_id, exc) from None
    files = [s.rfilename for s in info.siblings or []]
    if filename is not None and filename not in files:
        raise FileNotFoundError(f"Hugging Face repo {repo_id} has no file {filename}")
    if filename is None and "config.json" not in files:  # a GGUF repo: only its one GGUF file
        filename = _one_gguf(f"Hugging Face repo {repo_id}", repo_id, files)
    endpoint = hub.constants.ENDPOINT
    if filename is not None:
        return str(hub.hf_hub_download(repo_id, filename, cache_dir=cache, endpoint=endpoint))
    return str(hub.snapshot_download(repo_id, cache_dir=cache, allow_patterns=HF_FILES, endpoint=endpoint))


def resolve(path_or_name: str) -> str:
    """cepe.load's view of its argument: an existing path as is (a directory of GGUF files
    without config.json: its one GGUF file); a pulled or shipped
    model's name (cepe.pull.resolve); a Hugging Face repo id ("org/name", or
    "org/name/file.gguf") as its local copy; a path-like argument that does not
    exist as is (cepe.load says it is missing); anything else FileNotFoundError
    listing the close names."""
    if os.path.isdir(path_or_name):
        return _in_dir(path_or_name, path_or_name, path_or_name)
    if os.path.exists(path_or_name):
        return path_or_name
    if path_or_name in MODELS or path_or_name in SHIPPED:
        return resolve_pulled(path_or_name)
    gguf = _split_gguf(path_or_name)
    if gguf is not None:
        return resolve_hub(*gguf)
    if _is_repo_id(path_or_name) and not path_or_name.startswith("."):
        return resolve_hub(path_or_name)
    if os.sep in path_or_name or "/" in path_or_name or path_or_name.endswith(".gguf"):
        return path_or_name  # a path: cepe.load names what is missing
    raise _unknown(path_or_name)
