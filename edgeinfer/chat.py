"""The interactive chat loop of `edgeinfer chat`: streamed answers over the model's chat template.

Each turn re-renders the whole conversation; the engine's prefix cache evaluates only the new tokens."""
from __future__ import annotations

import sys

from edgeinfer.api import Model


def run_chat(model: Model, *, system: str | None = None, max_tokens: int = 1024, sampling: dict | None = None,
             stdin=None, stdout=None) -> list[dict]:
    """Read user messages (one per line) and stream the answers until end of input or /quit; returns the history."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    if interactive:
        print(f"{model.path.name}: {model.config.arch}, n_ctx {model.n_ctx}, {model.n_threads} threads. "
              "Type /quit or Ctrl-D to leave.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=stdout, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/quit", "/exit"):
            break
        messages.append({"role": "user", "content": text})
        reply = []
        try:
            for piece in model.chat(messages, stream=True, max_tokens=max_tokens, **(sampling or {})):
                reply.append(piece)
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            pass  # stop this answer; keep what was generated
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return messages
