"""Bounded reads of the small files cepe reads whole: configs, tokenizers, indexes, state.

Every such read goes through here, so that a path naming a FIFO, a device (``/dev/zero``),
a directory, or a file far larger than its kind ever is fails at once with an error naming
the file, instead of blocking forever or reading until memory runs out:

    cfg = read_json(path, what="config.json", limit=CONFIG_LIMIT, error=ConfigError)
    text = read_text(path, what="--prompt-file", limit=TEXT_LIMIT)
    with open_regular(path, what="safetensors file", error=CheckpointError) as f:
        ...  # a regular file, opened for reading in binary mode

Symlinks are followed; what they point to must be a regular file. The file is opened with
O_NONBLOCK and checked again on the open descriptor (so a path swapped for a FIFO between the
check and the open cannot block), then switched back to blocking reads. A read takes at most
`limit` + 1 bytes, so a file that grows while it is read (or a /proc file that reports size 0)
is bounded too.

Limits by kind of file, each well above the largest real file of its kind:

- CONFIG_LIMIT (16 MiB): config.json, generation_config.json, tokenizer_config.json,
  special_tokens_map.json, chat_template.jinja, model.safetensors.index.json, small JSON state.
- TOKENIZER_LIMIT (64 MiB): tokenizer.json (the largest real ones are about 35 MB) and
  SentencePiece tokenizer.model files.
- TEXT_LIMIT (256 MiB): text a user hands the CLI as input (prompts, documents).

Errors are `error` (a ValueError subclass chosen by the caller: ConfigError for configs,
CheckpointError for checkpoint files); a missing file raises FileNotFoundError and an
unreadable one PermissionError, as open() does.
"""

from __future__ import annotations

import json
import os
import stat
from io import BufferedReader
from typing import Any

MiB = 1 << 20
CONFIG_LIMIT = 16 * MiB
TOKENIZER_LIMIT = 64 * MiB
TEXT_LIMIT = 256 * MiB


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB and n % (MiB // 16) == 0 else f"{n} bytes"


def describe(mode: int) -> str:
    """What kind of file a st_mode describes, as words: "a directory", "a FIFO (named pipe)", ..."""
    for test, words in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return "not a regular file"


def _refuse(path: str, what: str, mode: int, error: type[Exception]) -> Exception:
    target = ""
    if os.path.islink(path):
        target = f" (a symlink to {os.path.realpath(path)})"
    return error(f"{path}: {what} must be a regular file, but it is {describe(mode)}{target}")


def check_regular(
    path: str | os.PathLike[str], what: str, *, limit: int | None = None, error: type[Exception] = ValueError
) -> os.stat_result:
    """os.stat(path) (symlinks followed) after checking that it is a regular file of at most
    `limit` bytes; raises `error` naming the file otherwise."""
    p = os.fspath(path)
    st = os.stat(p)
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(p, what, st.st_mode, error)
    if limit is not None and st.st_size > limit:
        raise error(f"{p}: {what} is {st.st_size} bytes, more than the {_size(limit)} such a file may have")
    return st


def open_regular(
    path: str | os.PathLike[str], what: str, *, limit: int | None = None, error: type[Exception] = ValueError
) -> BufferedReader:
    """The regular file at `path`, opened for binary reading (the caller closes it). Raises
    `error` naming the file for a directory, FIFO, device or socket, and for a file of more
    than `limit` bytes; never blocks on a FIFO."""
    p = os.fspath(path)
    check_regular(p, what, limit=limit, error=error)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    fd = os.open(p, flags)
    try:
        st = os.fstat(fd)  # what was opened, not what the path named a moment ago
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(p, what, st.st_mode, error)
        if limit is not None and st.st_size > limit:
            raise error(f"{p}: {what} is {st.st_size} bytes, more than the {_size(limit)} such a file may have")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(path: str | os.PathLike[str], *, what: str, limit: int, error: type[Exception] = ValueError) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` of them (else `error`)."""
    p = os.fspath(path)
    with open_regular(p, what, limit=limit, error=error) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{p}: {what} holds more than the {_size(limit)} such a file may have")
    return data


def read_text(path: str | os.PathLike[str], *, what: str, limit: int, error: type[Exception] = ValueError) -> str:
    """read_small, decoded as UTF-8 (a BOM is dropped); `error` names the file when it is not UTF-8."""
    data = read_small(path, what=what, limit=limit, error=error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{os.fspath(path)}: {what} is not valid UTF-8 ({exc})") from None


def read_json(
    path: str | os.PathLike[str],
    *,
    what: str,
    limit: int,
    error: type[Exception] = ValueError,
    object_pairs_hook: Any = None,
) -> Any:
    """read_text, parsed as JSON. Invalid JSON, JSON nested too deep for the parser and
    integers past Python's digit limit raise `error` saying "<path> is not valid JSON"."""
    p = os.fspath(path)
    text = read_text(p, what=what, limit=limit, error=error)
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as exc:
        raise error(f"{p} is not valid JSON: {exc}") from None
    except RecursionError:
        raise error(f"{p} is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        if type(exc) is not ValueError:  # object_pairs_hook's own error, naming the file already
            raise
        raise error(f"{p} is not valid JSON: {exc}") from None  # a number past Python's int-digit limit
