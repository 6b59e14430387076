"""`cepe chat`: an interactive chat in the terminal.

Each line read is a user turn; the reply streams as it is decoded (Model.chat, with the
model's chat template and the whole history). Ctrl-C during a reply stops that reply (what
was written of it stays in the history) and the chat goes on; Ctrl-C at the prompt is
ignored; Ctrl-D (end of input) or /exit ends it; /reset clears the history. When the history
no longer fits the model's window with max_new_tokens to spare, its oldest turns are
dropped (the system message stays).
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from .completions import chat_prompt
from .text import require_tokenizer

HELP = "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply"


def _fit(model: Any, history: list[dict[str, str]], max_new_tokens: int) -> bool:
    """Drops the oldest turns until the prompt plus max_new_tokens fits the window; whether it dropped any."""
    dropped = False
    first = 1 if history and history[0]["role"] == "system" else 0
    while len(history) - first > 1 and len(chat_prompt(model, history)) + max_new_tokens > model.window:
        del history[first]
        while len(history) - first > 1 and history[first]["role"] != "user":
            del history[first]
        dropped = True
    return dropped


def _read(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    """One line of input (without its newline), or None at the end of input."""
    if interactive and stdin is sys.stdin and stdout is sys.stdout:
        try:
            return input("> ")
        except EOFError:
            return None
    line = stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def run_chat(
    model: Any,
    *,
    system: str | None = None,
    max_new_tokens: int = 512,
    context: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    **sampling: Any,
) -> int:
    """Chats on stdin/stdout until the end of input or /exit; returns the exit status (0).
    sampling: Model.chat's settings (temperature, top_p, top_k, min_p, repeat_penalty, seed)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    name = os.path.basename(os.path.normpath(model.path))
    if not require_tokenizer(model).chat_template:
        raise ValueError(f"{name} has no chat template: cepe chat needs one (cepe generate --raw continues text)")
    if interactive:
        print(f"cepe chat: {name} ({HELP})", file=stdout, flush=True)
    while True:
        try:
            line = _read(stdin, stdout, interactive)
        except KeyboardInterrupt:
            print(f"\n({HELP})", file=stdout, flush=True)
            continue
        if line is None:
            if interactive:
                print(file=stdout)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            del history[1 if system else 0 :]
            print("(history cleared)", file=stdout, flush=True)
            continue
        history.append({"role": "user", "content": line})
        if _fit(model, history, max_new_tokens):
            print("(the oldest turns were dropped to fit the model's window)", file=stdout, flush=True)
        reply: list[str] = []
        try:
            for piece in model.chat(history, max_new_tokens=max_new_tokens, context=context, stream=True, **sampling):
                reply.append(piece)
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write(" [stopped]")
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
