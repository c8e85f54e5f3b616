"""`edgeinfer chat`: start-up, the turn loop over a `ChatSession`, the slash commands, and reading input.

In a terminal: a start line (model, quant, context, threads, power mode and why), a prompt with history (up-arrow)
and multi-line messages between triple quotes, answers streamed as they come with a dim stat line after each, and
Ctrl-C to stop an answer (kept as the assistant's turn); at an empty prompt a Ctrl-C only says how to leave and a
second one in a row leaves (as Node's REPL does; Ctrl-D, /quit or /bye leave at once). Without a terminal on stdin
it reads one message per line (or all of stdin as one with single=True) and prints only the answers on stdout, so it
can be scripted; everything else goes to stderr.

Sections: start-up, the loop, commands, input, output.
"""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from typing import Callable, TextIO

from edgeinfer.errors import InvalidArgument
from edgeinfer.session import SETTINGS, ChatSession, MessageTooLong, PowerWatch, SessionFileError

__all__ = ["chat_loop", "open_session", "run_chat_command", "start_line"]

QUIT = "quit"
MULTILINE = '"""'
EXIT_HINT = "press Ctrl-C again, Ctrl-D or /quit to exit"


# ================================================================ start-up

def run_chat_command(model_name: str | None, *, system: str | None = None, max_tokens: int = 1024,
                     single: bool = False, n_ctx: int | None = None, n_threads: int | None = None,
                     seed: int | None = None, power: str = "auto", kv_type: str | None = None,
                     draft: str | None = None, device: str = "auto", **options) -> None:
    """The `edgeinfer chat` command: open the model (pulled if needed), then chat over stdin/stdout.
    options: the CLI's sampling options (temperature, top_k, top_p, min_p, repeat_penalty; others ignored)."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    sampling = {k: v for k, v in options.items() if k in SETTINGS and k != "max_tokens"}
    session, line = open_session(model_name, system=system, max_tokens=max_tokens, n_ctx=n_ctx,
                                 n_threads=n_threads, seed=seed, power=power, kv_type=kv_type, console=console,
                                 draft=draft, device=device, **sampling)
    interactive = sys.stdin.isatty()
    with session.model:
        if interactive:
            _let_ctrl_c_interrupt()
            reader = _terminal_reader()
        else:
            reader = _PipeReader(sys.stdin, single)
        out = Output(sys.stdout, console, interactive)
        if interactive:
            out.info(line + " · /help for commands")
        chat_loop(session, reader, out)


def _let_ctrl_c_interrupt() -> None:
    """Ctrl-C stops an answer even when the chat was started by a process that ignores SIGINT (nohup, some launchers
    and test runners): a Python started with SIGINT ignored keeps it ignored, so no KeyboardInterrupt ever came and
    the answer ran to its end."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def open_session(model_name: str | None, *, system: str | None = None, max_tokens: int = 1024,
                 n_ctx: int | None = None, n_threads: int | None = None, seed: int | None = None,
                 power: str = "auto", kv_type: str | None = None, console=None, draft: str | None = None,
                 device: str = "auto", **sampling) -> tuple[ChatSession, str]:
    """Resolve the model (a progress bar while a catalogue model is pulled), plan its context and threads with the
    budget manager, load it and compile or load the kernels (a spinner on stderr meanwhile).
    Returns the session and the start line."""
    from rich.console import Console

    from edgeinfer.api import Model
    from models.fetch import default_model_name, resolve_model, rich_progress

    console = console or Console(stderr=True, highlight=False)
    model_name = model_name or default_model_name()
    refuse_base_model(model_name)  # before a pull or a load: a base model would only ramble
    with rich_progress(console) as progress:
        path = resolve_model(model_name, progress=progress)
    with console.status(f"loading {path.name}"):
        model = Model(path, n_ctx=n_ctx, n_threads=n_threads, seed=seed, power=power,  # planned by the budget
                      kv_type=kv_type, device=device)
    try:
        if draft is not None:
            with console.status(f"loading the draft model {draft}"):
                model.use_draft(draft)
        if model.metadata.get("tokenizer.chat_template") is None:  # ChatTemplate.from_metadata falls back then
            console.print(f"{path.name} has no chat template: using the {model.chat_template.name} format (a base "
                          f"model only continues text: use 'edgeinfer run')", style="yellow", markup=False,
                          soft_wrap=True)
        session = ChatSession(model, system=system, max_tokens=max_tokens,
                              power_watch=PowerWatch(power=power, n_threads=n_threads), **sampling)
        with console.status("warming up (a first run compiles the kernels: this can take minutes)"):
            session.warm_up()
    except BaseException:
        model.close()
        raise
    return session, start_line(model, model.plan)


def refuse_base_model(model_name: str) -> None:
    """Raise InvalidArgument (one line pointing to `edgeinfer run`) if `model_name` is a catalogue base model, by
    name or as a path to its file. Another file is chatted with: its template, or the architecture's built-in one."""
    from models.catalogue import catalogue_entry_for

    entry = catalogue_entry_for(model_name)
    if entry is not None and entry.kind == "base":
        raise InvalidArgument(f"{model_name} is a base model (no chat template): it continues text; "
                              f"use 'edgeinfer run {model_name} \"PROMPT\"'")


def start_line(model, plan) -> str:
    """One line: model file, quantization, context, threads and power mode, each with the plan's reason."""
    from edgeinfer.model_info import quantization_label

    quant = quantization_label(model.metadata.get("general.file_type")) or "unknown quantization"
    ctx_why = _reason(plan.reasons["n_ctx"]).split(";")[0]
    mode, _, power_why = plan.reasons["power"].partition(": ")
    threads = f"{model.n_threads} thread" + ("" if model.n_threads == 1 else "s")
    return (f"{model.path.name} · {quant} · n_ctx {model.n_ctx} ({ctx_why}) · {threads} "
            f"({_reason(plan.reasons['n_threads'])}) · power {mode} ({power_why}) · device {model.device.summary}")


def _reason(text: str) -> str:
    """A plan reason without its leading "value: "."""
    head, sep, rest = text.partition(": ")
    return rest if sep and head.strip().isdigit() else text


# ================================================================ the loop

def chat_loop(session: ChatSession, reader, out: "Output") -> None:
    """Read messages and commands until end of input (Ctrl-D), /quit, or a second Ctrl-C in a row at an empty prompt
    (the first one shows EXIT_HINT). Without a terminal a Ctrl-C while reading leaves at once."""
    while True:
        try:
            message = reader.read_message()
        except KeyboardInterrupt:  # a first Ctrl-C at an empty prompt
            if not out.interactive:
                out.end_of_input()
                return
            out.notice(EXIT_HINT)
            continue
        except EOFError:  # end of input, Ctrl-D, or the second Ctrl-C
            out.end_of_input()
            return
        if message is None:
            continue
        text, literal = message
        if not literal and text.startswith("/") and text.strip() != "/":
            if run_command(session, text.strip(), out) == QUIT:
                return
            continue
        if text.strip():
            answer(session, text.strip(), out)


def answer(session: ChatSession, text: str, out: "Output") -> None:
    """Stream the answer to one message; Ctrl-C (interactive) stops it and keeps the part generated."""
    try:
        pieces = session.send(text, stream=True)
    except MessageTooLong as e:
        out.error(str(e))
        return
    for line in session.notices:
        out.notice(line)
    n_notices, interrupted = len(session.notices), False
    try:
        for piece in pieces:
            out.answer_piece(piece)
    except KeyboardInterrupt:
        if not out.interactive:
            raise
        interrupted = True
    finally:
        pieces.close()
    out.answer_end()
    if interrupted:
        out.notice("interrupted: the partial answer is kept in the conversation")
    for line in session.notices[n_notices:]:
        out.notice(line)
    out.stat(format_turn_stats(session.last_stats))


def format_turn_stats(s) -> str:
    return (f"{s.prompt_tokens} prompt tokens ({s.prompt_tokens_evaluated} evaluated) · first token "
            f"{_seconds(s.time_to_first_token)} · {s.generated_tokens} tokens at {s.decode_tokens_per_second:.1f} tok/s")


def _seconds(t: float) -> str:
    return f"{t * 1000:.0f} ms" if t < 1 else f"{t:.2f} s"


# ================================================================ commands

@dataclass
class Command:
    run: Callable  # (session, argument, out) -> QUIT or None
    usage: str
    help: str


def run_command(session: ChatSession, line: str, out: "Output"):
    """Run a slash command line; QUIT to leave."""
    name, _, arg = line[1:].partition(" ")
    name = name.lower()
    command = COMMANDS.get(COMMAND_ALIASES.get(name, name))
    if command is None:
        out.error(f"unknown command /{name} (/help lists them; start with a space to send it as a message)")
        return None
    return command.run(session, arg.strip(), out)


def _help(session, arg, out):
    width = max(len(c.usage) for c in COMMANDS.values())
    lines = [f"{c.usage:<{width}}  {c.help}" for c in COMMANDS.values()]
    lines += [f"{MULTILINE + ' ... ' + MULTILINE:<{width}}  a message of several lines",
              "Ctrl-C stops an answer (the part generated is kept); twice at an empty prompt, or Ctrl-D, it leaves."]
    out.info("\n".join(lines))


def _reset(session, arg, out):
    session.reset()
    out.info("conversation cleared" + (" (system prompt kept)" if session.system else ""))


def _system(session, arg, out):
    if not arg:
        out.info(f"system prompt: {session.system}" if session.system else "no system prompt")
        return
    session.set_system(arg)
    out.info("system prompt set")


def _save(session, arg, out):
    if not arg:
        out.error("usage: /save FILE")
        return
    try:
        path, kv_path = session.save(arg)
    except OSError as e:
        out.error(f"cannot save: {e}")
        return
    out.info(f"saved {len(session.messages)} messages to {path} (KV cache: {kv_path.name})")


def _load(session, arg, out):
    if not arg:
        out.error("usage: /load FILE")
        return
    try:
        out.info(session.load(arg))
    except SessionFileError as e:
        out.error(str(e))


def format_speculation(s) -> str:
    """What speculative decoding did in a generation (GenerationStats s): guesses accepted, and tokens per decode
    pass (plain decoding's 1: the speed-up before the cost of checking the guesses); '' when nothing was guessed."""
    spec = s.speculation
    if not spec.drafted:
        return ""
    passes = max(s.generated_tokens - 1 - spec.accepted, 1)  # the first token comes from the prompt's pass
    return (f"speculation: {spec.accepted}/{spec.drafted} guesses accepted ({spec.acceptance_rate:.0%}), "
            f"{(s.generated_tokens - 1) / passes:.2f} tokens per decode pass")


def _stats(session, arg, out):
    s = session.stats()
    speculation = format_speculation(session.last_stats) if s["turns"] else ""
    last = "none yet" if not s["turns"] else (
        f"{format_turn_stats(session.last_stats)} · stop: "
        f"{'interrupted' if session.last_interrupted else s['last_stop_reason']}"
        f"{' · ' + speculation if speculation else ''}")
    out.info(f"conversation: {s['messages']} messages, {s['messages_in_context']} in the context · "
             f"KV cache: {s['cached_tokens']} of {s['n_ctx']} positions · threads: {s['n_threads']}\n"
             f"last turn: {last}\n"
             f"session: {s['turns']} turns, {s['total_prompt_tokens_evaluated']} prompt tokens evaluated, "
             f"{s['total_generated_tokens']} generated")


# /set names as typed -> setting names
SET_ALIASES = {"temp": "temperature", "top-k": "top_k", "top-p": "top_p", "min-p": "min_p",
               "repeat-penalty": "repeat_penalty", "max-tokens": "max_tokens", "n": "max_tokens"}


def _set(session, arg, out):
    if not arg:
        out.info(" · ".join(f"{k} {v}" for k, v in session.settings().items()))
        return
    name, _, value = arg.partition(" ")
    name = SET_ALIASES.get(name.lower(), name.lower())
    value = value.strip()
    try:
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r} (known: temp, {', '.join(list(SETTINGS)[1:])})")
        if not value:
            raise ValueError(f"usage: /set {name} VALUE")
        try:
            parsed = None if name == "seed" and value.lower() in ("none", "random") else SETTINGS[name](value)
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not {'an integer' if SETTINGS[name] is int else 'a number'}")
        session.set(**{name: parsed})
    except ValueError as e:
        out.error(str(e))
        return
    out.info(f"{name} = {parsed}")


def _quit(session, arg, out):
    return QUIT


COMMANDS = {
    "help": Command(_help, "/help", "this list"),
    "reset": Command(_reset, "/reset", "clear the conversation (the system prompt stays)"),
    "system": Command(_system, "/system TEXT", "set the system prompt (no TEXT: show it)"),
    "save": Command(_save, "/save FILE", "write the conversation (JSON) and its KV cache (FILE.kv.npz)"),
    "load": Command(_load, "/load FILE", "resume a saved conversation (its KV cache too, for the same model)"),
    "stats": Command(_stats, "/stats", "context use, the last turn's figures, session totals"),
    "set": Command(_set, "/set NAME VALUE", "temp, top_k, top_p, min_p, repeat_penalty, max_tokens, seed"),
    "quit": Command(_quit, "/quit", "leave (also /bye, /exit, Ctrl-D)"),
}
COMMAND_ALIASES = {"bye": "quit", "exit": "quit", "q": "quit", "?": "help"}


# ================================================================ input

class _Reader:
    """Messages from lines: `read_line` comes from the subclass, `read_message` joins triple-quoted blocks.

    `read_line` raises KeyboardInterrupt for a Ctrl-C at an empty prompt; `read_message` passes the first one on and
    turns a second in a row into EOFError (leave). A line read, or a Ctrl-C that cleared typed text
    (`ctrl_c_armed = False` in the subclass), starts the count again."""

    ctrl_c_armed = False  # the last thing read was a Ctrl-C at an empty prompt

    def read_line(self, continuation: bool = False) -> str:
        raise NotImplementedError

    def read_message(self) -> tuple[str, bool] | None:
        """(text, literal) for the next message: one line, or the lines between triple quotes (literal: never a
        command). None when a multi-line message was abandoned with Ctrl-C. KeyboardInterrupt for a first Ctrl-C
        at an empty prompt; EOFError at the end of input or for a second Ctrl-C in a row."""
        try:
            line = self.read_line(continuation=False)
        except KeyboardInterrupt:
            if self.ctrl_c_armed:
                raise EOFError from None
            self.ctrl_c_armed = True
            raise
        self.ctrl_c_armed = False
        stripped = line.strip()
        if not stripped.startswith(MULTILINE):
            return line, False
        rest = stripped[len(MULTILINE):]
        if rest.endswith(MULTILINE):  # """all on one line"""
            return rest[:-len(MULTILINE)], True
        lines = [rest] if rest else []
        while True:
            try:
                line = self.read_line(continuation=True)
            except EOFError:  # input ended inside the block: send what there is
                break
            except KeyboardInterrupt:
                return None
            if line.rstrip().endswith(MULTILINE):
                tail = line.rstrip()[:-len(MULTILINE)]
                if tail:  # text before the closing quotes; a line of only quotes adds no empty line
                    lines.append(tail)
                break
            lines.append(line)
        return "\n".join(lines), True


class _PipeReader(_Reader):
    """Lines of a pipe or file; with single=True, all of it as one message."""

    def __init__(self, stream: TextIO, single: bool = False):
        self.stream, self.single, self.done = stream, single, False

    def read_line(self, continuation: bool = False) -> str:
        line = self.stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def read_message(self) -> tuple[str, bool] | None:
        if not self.single:
            return super().read_message()
        if self.done:
            raise EOFError
        self.done = True
        return self.stream.read(), True


class _PromptToolkitReader(_Reader):
    """A terminal prompt with history (up-arrow); Ctrl-C clears a typed line, or at an empty prompt interrupts."""

    def __init__(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        keys = KeyBindings()

        @keys.add("c-c")
        def _(event):
            if event.current_buffer.text:
                event.current_buffer.reset()
                self.ctrl_c_armed = False  # something was typed since the last Ctrl-C
            else:
                event.app.exit(exception=KeyboardInterrupt())

        self.prompt = PromptSession(history=InMemoryHistory(), key_bindings=keys)

    def read_line(self, continuation: bool = False) -> str:
        return self.prompt.prompt("... " if continuation else "> ")


class _InputReader(_Reader):
    """Python's input() (readline history where available): when prompt_toolkit or a terminal output is missing.
    input() cannot tell a typed line from an empty one on Ctrl-C: every Ctrl-C counts as at an empty prompt."""

    def read_line(self, continuation: bool = False) -> str:
        return input("... " if continuation else "> ")


def _terminal_reader():
    if sys.stdout.isatty():
        try:
            return _PromptToolkitReader()
        except ImportError:
            pass
    return _InputReader()


# ================================================================ output

class Output:
    """Where the loop writes: answers to `stdout`; notices, command output and stats to the stderr `console`.
    Without a terminal only answers are written to stdout, each ending in one newline."""

    def __init__(self, stdout: TextIO, console, interactive: bool):
        self.stdout, self.console, self.interactive = stdout, console, interactive

    def answer_piece(self, piece: str) -> None:
        self.stdout.write(piece)
        self.stdout.flush()

    def answer_end(self) -> None:
        self.stdout.write("\n")
        self.stdout.flush()

    def end_of_input(self) -> None:
        if self.interactive:
            self.console.print()

    def info(self, text: str, style: str | None = None) -> None:
        # soft_wrap: long lines are left to the terminal, never cut into lines by rich (nor in a log file)
        self.console.print(text, style=style, markup=False, soft_wrap=True)

    def notice(self, text: str) -> None:
        self.info(text, "yellow")

    def error(self, text: str) -> None:
        self.info(text, "red")

    def stat(self, text: str) -> None:
        if self.interactive:
            self.info(text, "dim")
