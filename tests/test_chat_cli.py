"""`edgeinfer chat` as a person and a script use it: the real program in a pseudo-terminal, and behind a pipe.

The terminal tests drive the program through a pty (pure Python: `pty.fork`), so prompt_toolkit, Ctrl-C (SIGINT
from the terminal's line discipline) and the rich output run as they do for a user; the screen is the output with
the terminal's escape sequences removed. Timeouts are generous: a first run compiles the kernels.
"""
import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from cli_helpers import assert_one_error_line, run_edgeinfer
from conftest import model_path

slow = pytest.mark.slow
CHAT = [sys.executable, "-m", "edgeinfer.cli", "chat", "smollm2-135m-instruct"]
# one thread: on a shared 2-core machine two threads wait on each other and answers crawl
OPTIONS = ["--temp", "0", "--seed", "1", "--max-tokens", "48", "--threads", "1"]
START_TIMEOUT = 600  # loading, and on a first run compiling the kernels
TURN_TIMEOUT = 300
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\x08")


@pytest.fixture(scope="module")
def fetched():
    model_path("smollm2-135m-instruct")  # pull outside the timed runs


class Terminal:
    """A program in a pseudo-terminal of 50x200: type into it, wait for text on its screen."""

    def __init__(self, argv, cwd, sigint_ignored=False):
        env = {**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", "COLUMNS": "200", "LINES": "50"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            try:
                os.chdir(cwd)
                # an ignored SIGINT survives exec (nohup, some launchers and test-runner workers pass one on)
                signal.signal(signal.SIGINT, signal.SIG_IGN if sigint_ignored else signal.SIG_DFL)
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.raw = b""
        self.status = None

    @property
    def screen(self) -> str:
        """Everything shown so far, escape sequences and carriage returns removed."""
        return ESCAPES.sub("", self.raw.decode("utf-8", "replace")).replace("\r", "")

    def _pump(self, seconds: float) -> bool:
        """Read what the program wrote within `seconds`; False once it closed the terminal."""
        ready, _, _ = select.select([self.fd], [], [], seconds)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child exited
            return False
        self.raw += data
        return bool(data)

    def expect(self, pattern: str, timeout: float, since: int = 0) -> re.Match:
        """Wait for the regex `pattern` in the screen from offset `since`."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.screen, since)
            if match:
                return match
            if time.monotonic() > deadline or not self._pump(0.2):
                raise AssertionError(f"{pattern!r} not on the screen after {timeout} s:\n{self.screen[-3000:]}")

    def type(self, text: str) -> int:
        """Type text (\\r is Enter); returns the screen length before it, to expect what follows."""
        while self._pump(0.3):  # let the prompt settle first
            if not select.select([self.fd], [], [], 0)[0]:
                break
        since = len(self.screen)
        os.write(self.fd, text.encode())
        return since

    def wait(self, timeout: float) -> int:
        """The exit status, once the program has ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._pump(0.2)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
        raise AssertionError(f"still running after {timeout} s:\n{self.screen[-2000:]}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except ProcessLookupError:
                pass
        os.close(self.fd)


@pytest.fixture
def terminal(tmp_path, fetched):
    started = []

    def start(*args, sigint_ignored=False):
        t = Terminal([*CHAT, *args], tmp_path, sigint_ignored)
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


def test_ctrl_c_stops_an_answer_when_started_with_sigint_ignored(terminal):
    """Python keeps a SIGINT it was started with ignored: the chat turns Ctrl-C back on, or the answer ran to its
    end (seen in CI, where the suite's worker processes passed an ignored SIGINT on)."""
    t = terminal(*OPTIONS[:-4], "--max-tokens", "400", "--threads", "1", sigint_ignored=True)
    t.expect(r"\n>", START_TIMEOUT)
    since = t.type("Tell me a long story about a dragon and a knight.\r")
    t.expect(r"a knight\.\n\s*(\S+\s+){2}\S", TURN_TIMEOUT, since)
    os.write(t.fd, b"\x03")
    t.expect(r"interrupted: the partial answer is kept in the conversation", TURN_TIMEOUT, since)


STAT_LINE = r"\d+ prompt tokens \(\d+ evaluated\) · first token [\d.]+ m?s · \d+ tokens at [\d.]+ tok/s\n"


@slow
def test_a_conversation_in_the_terminal(terminal, tmp_path):
    t = terminal(*OPTIONS)
    t.expect(r"SmolLM2-135M-Instruct\.Q4_1\.gguf · Q4_1 · n_ctx \d+ \(.+\) · 1 thread \(asked for\) · "
             r"power \w+ \(.+\)", START_TIMEOUT)
    t.expect(r"\n>", 30)  # the prompt (prompt_toolkit moves the cursor past its space instead of writing it)

    since = t.type("Hi, my name is Ana.\r")
    t.expect(STAT_LINE, TURN_TIMEOUT, since)
    since = t.type("What is my name?\r")
    t.expect(STAT_LINE, TURN_TIMEOUT, since)

    since = t.type("/stats\r")
    t.expect(r"conversation: 4 messages, 4 in the context · KV cache: \d+ of \d+ positions", 30, since)
    t.expect(r"session: 2 turns", 30, since)

    since = t.type("/set max_tokens 400\r")
    t.expect(r"max_tokens = 400", 30, since)
    since = t.type("Tell me a long story about a dragon and a knight.\r")
    t.expect(r"a knight\.\n\s*(\S+\s+){2}\S", TURN_TIMEOUT, since)  # the answer's first words are on the screen
    os.write(t.fd, b"\x03")
    t.expect(r"interrupted: the partial answer is kept in the conversation", TURN_TIMEOUT, since)

    saved = tmp_path / "conv.json"
    since = t.type(f"/save {saved}\r")
    t.expect(r"saved 6 messages to ", 60, since)
    since = t.type("/reset\r")
    t.expect(r"conversation cleared", 30, since)
    since = t.type(f"/load {saved}\r")
    t.expect(r"loaded 6 messages from .*; KV cache restored \(\d+ tokens: no re-evaluation\)", 60, since)
    t.type("/quit\r")
    assert t.wait(60) == 0

    doc = json.loads(saved.read_text())
    roles = [m["role"] for m in doc["messages"]]
    assert roles == ["user", "assistant"] * 3
    assert doc["messages"][4]["content"] == "Tell me a long story about a dragon and a knight."
    partial = doc["messages"][5]["content"]
    assert partial.strip(), "the interrupted answer was not kept"
    screen = t.screen
    for message in doc["messages"][1::2]:  # every answer as it was shown
        assert message["content"] in screen
    assert (tmp_path / "conv.json.kv.npz").exists()


HINT = r"press Ctrl-C again, Ctrl-D or /quit to exit"


def next_prompt(t, since, timeout=30):
    """Wait for a prompt after `since`: a Ctrl-C before it is not "at a prompt"."""
    t.expect(r"\n>", timeout, since)


@slow
def test_ctrl_c_clears_a_typed_line_then_twice_at_an_empty_prompt_leaves(terminal):
    t = terminal(*OPTIONS)
    t.expect(r"/help for commands", START_TIMEOUT)
    t.expect(r"\n>", 30)  # the prompt (prompt_toolkit moves the cursor past its space instead of writing it)
    t.type("something I changed my mind about")
    t.type("\x03")  # clears the line
    since = t.type("/help\r")
    t.expect(r"/save FILE +write the conversation", 30, since)
    t.expect(r"/save FILE[\s\S]*\n>", 30, since)
    since = t.type("\x03")  # at an empty prompt: only the hint
    t.expect(HINT, 30, since)
    next_prompt(t, since)
    t.type("typed, then cleared")
    since = t.type("\x03")  # clears the line: something was typed since the first Ctrl-C, so this one...
    since = t.type("\x03")  # ...at the empty prompt again only shows the hint
    t.expect(HINT, 30, since)
    next_prompt(t, since)
    t.type("\x03")  # the second in a row: leave, a deliberate exit (0)
    assert t.wait(60) == 0


@slow
def test_after_the_ctrl_c_hint_the_conversation_goes_on_then_bye_leaves(terminal):
    t = terminal(*OPTIONS)
    t.expect(r"/help for commands", START_TIMEOUT)
    t.expect(r"\n>", 30)
    since = t.type("\x03")
    t.expect(HINT, 30, since)
    next_prompt(t, since)
    since = t.type("Say hello.\r")
    t.expect(STAT_LINE, TURN_TIMEOUT, since)  # answered
    next_prompt(t, since)
    since = t.type("\x03")  # the message in between: a first Ctrl-C again
    t.expect(HINT, 30, since)
    next_prompt(t, since)
    t.type("/bye\r")
    assert t.wait(60) == 0


def run_piped(args, text, timeout=START_TIMEOUT + 2 * TURN_TIMEOUT):
    return subprocess.run([*CHAT, *args], input=text, capture_output=True, text=True, timeout=timeout)


@slow
def test_piped_messages_print_only_the_answers(tmp_path, fetched):
    saved = tmp_path / "piped.json"
    done = run_piped(OPTIONS, f"hi\nbye\n/save {saved}\n")
    assert done.returncode == 0, done.stderr
    answers = [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "assistant"]
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert done.stdout == "".join(a + "\n" for a in answers)  # no prompt, start line or stats on stdout


@slow
def test_piped_single_message(fetched):
    from edgeinfer.api import Model

    message = "Say hello.\n/this line is part of the message, not a command\n"
    done = run_piped([*OPTIONS, "--single", "--max-tokens", "12"], message)
    assert done.returncode == 0, done.stderr
    with Model(model_path("smollm2-135m-instruct"), n_ctx=512, n_threads=1) as model:  # the same steps in-process
        session = model.session(max_tokens=12, temperature=0.0, seed=1)
        session.warm_up()
        expected = session.send(message.strip())  # the chat sends a message without surrounding blank space
    assert done.stdout == expected + "\n"


@slow
def test_piped_long_conversation_drops_the_oldest_turns_with_a_notice(fetched):
    line = "Here is a list of fruits: " + ", ".join(["apple", "banana", "cherry", "grape"] * 8) + ". Which is red?"
    done = run_piped(["--ctx", "256", *OPTIONS, "--max-tokens", "24"], (line + "\n") * 4)
    assert done.returncode == 0, done.stderr
    assert "context full (256 tokens): dropped the oldest" in done.stderr
    assert done.stdout.count("\n") >= 4


# ---------------------------------------------------------------- base models: one line pointing to `run`

def test_chat_with_a_catalogue_base_model_says_so_in_one_line_before_fetching(tmp_path):
    home = tmp_path / "home"  # empty: a pull would have to download, so the refusal comes before it
    done = run_edgeinfer("chat", "gemma3-270m", env={"EDGEINFER_HOME": str(home)}, input="hi\n", timeout=60)
    line = assert_one_error_line(done, "gemma3-270m is a base model (no chat template)",
                                 "use 'edgeinfer run gemma3-270m \"PROMPT\"'")
    assert line == ("error: gemma3-270m is a base model (no chat template): it continues text; "
                    "use 'edgeinfer run gemma3-270m \"PROMPT\"'")
    assert not (home / "models").exists() and done.stdout == ""


@slow
def test_chat_with_a_catalogue_base_model_file_by_path_says_so_too():
    path = str(model_path("gemma3-270m"))
    done = run_edgeinfer("chat", path, input="hi\n", timeout=60)
    assert_one_error_line(done, f"{path} is a base model", f"use 'edgeinfer run {path} \"PROMPT\"'")


@slow
def test_chat_with_another_file_without_a_template_uses_the_built_in_one_and_says_so(tmp_path):
    renamed = tmp_path / "my-gemma.gguf"  # not a catalogue file name: chatted with, in the built-in Gemma format
    renamed.symlink_to(model_path("gemma3-270m"))
    done = run_edgeinfer("chat", str(renamed), *OPTIONS, "--max-tokens", "4", "--ctx", "256", input="Hi\n")
    assert done.returncode == 0, done.stderr
    assert "my-gemma.gguf has no chat template: using the built-in gemma3 format" in done.stderr
    assert done.stdout.endswith("\n") and done.stdout.strip()


# ---------------------------------------------------------------- reading messages (no model)

def messages_of(text: str, single: bool = False) -> list:
    from edgeinfer.chat import _PipeReader

    reader, out = _PipeReader(io.StringIO(text), single), []
    while True:
        try:
            out.append(reader.read_message())
        except EOFError:
            return out


def test_one_message_per_line_and_triple_quoted_blocks():
    text = 'hi\n/stats\n"""\nfirst line\n/not a command\n"""\n"""one line"""\n"""unclosed\nat the end\n'
    assert messages_of(text) == [("hi", False), ("/stats", False), ("first line\n/not a command", True),
                                 ("one line", True), ("unclosed\nat the end", True)]


def test_single_reads_everything_as_one_literal_message():
    assert messages_of('a\n/b\n"""\n', single=True) == [('a\n/b\n"""\n', True)]


class Recorder:
    """An Output that records what would be shown: (method name, *arguments)."""

    def __init__(self, interactive=False):
        self.lines, self.interactive = [], interactive

    def __getattr__(self, name):  # info, notice, error, end_of_input, ...
        return lambda *args, **kw: self.lines.append((name, *args))


class NoModel:  # a message would reach send(): fail loudly
    def send(self, text, **kw):
        raise AssertionError(f"sent {text!r}")


def test_commands_are_told_from_messages():
    from edgeinfer.chat import COMMANDS, chat_loop

    out = Recorder()
    chat_loop(NoModel(), _reader("/frob\n/help\n/quit\nnever read\n"), out)
    assert out.lines[0] == ("error", "unknown command /frob (/help lists them; start with a space to send it as a "
                                     "message)")
    assert out.lines[1][0] == "info" and all(c.usage in out.lines[1][1] for c in COMMANDS.values())
    assert len(out.lines) == 2  # /quit left before "never read"


def test_bye_is_quit_and_listed_in_help():
    from edgeinfer.chat import chat_loop, run_command

    out = Recorder()
    chat_loop(NoModel(), _reader("/bye\nnever read\n"), out)
    assert out.lines == []  # left before "never read", and said nothing
    run_command(NoModel(), "/help", out)
    assert "/bye" in out.lines[0][1] and "twice at an empty prompt" in out.lines[0][1]


def scripted_reader(*script):
    """A reader whose `read_line` replays `script`: text lines, or KeyboardInterrupt for a Ctrl-C at a prompt."""
    from edgeinfer.chat import _Reader

    steps = list(script)

    class Scripted(_Reader):
        def read_line(self, continuation=False):
            if not steps:
                raise EOFError
            step = steps.pop(0)
            if step is KeyboardInterrupt:
                raise KeyboardInterrupt
            return step

    return Scripted()


def test_one_ctrl_c_at_an_empty_prompt_only_hints_a_second_in_a_row_leaves():
    from edgeinfer.chat import EXIT_HINT, chat_loop

    out = Recorder(interactive=True)
    # hint, a command (the count starts again), hint, leave: "after" is never read
    chat_loop(NoModel(), scripted_reader(KeyboardInterrupt, "/stats?", KeyboardInterrupt, KeyboardInterrupt,
                                         "after"), out)
    assert [line[0] for line in out.lines] == ["notice", "error", "notice", "end_of_input"]
    assert out.lines[0] == ("notice", EXIT_HINT) == out.lines[2]


def test_without_a_terminal_a_ctrl_c_while_reading_leaves_at_once():
    from edgeinfer.chat import chat_loop

    out = Recorder(interactive=False)
    chat_loop(NoModel(), scripted_reader(KeyboardInterrupt, "never sent"), out)
    assert out.lines == [("end_of_input",)]


def _reader(text):
    from edgeinfer.chat import _PipeReader

    return _PipeReader(io.StringIO(text))
