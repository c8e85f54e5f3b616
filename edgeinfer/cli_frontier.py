"""`edgeinfer frontier SOURCE`: measure the quality-latency-memory-energy frontier of a model's variants and pick one.

Arguments are all checked before any work (types, ratios, sizes, files, the plot's format and matplotlib); the run
shows a progress bar naming the variant and step on stderr; Ctrl-C keeps what was measured, still prints the table
and writes the outputs, then exits 130.
"""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import click

from edgeinfer.cli import FiniteFloatRange, ThreadCounts, compute_threads_available
from edgeinfer.errors import InvalidArgument

DEFAULT_TEXT = "default_text.txt"  # in the edgeinfer.frontier package: public-domain prose and some code


def default_text() -> str:
    return resources.files("edgeinfer.frontier").joinpath(DEFAULT_TEXT).read_text(encoding="utf-8")


def _read_text(path: str | None) -> str:
    if path is None:
        return default_text()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"--text {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None


def _check_output(option: str, path: str | None) -> None:
    if path is not None and path != "-" and not Path(path).resolve().parent.is_dir():
        raise InvalidArgument(f"{option} {path}: the directory {Path(path).resolve().parent} does not exist")


@click.command("frontier")
@click.argument("source")
@click.option("--types", default=",".join(("F16", "Q8_0", "Q4_K_M", "Q4_0")), show_default=True,
              help="Comma-separated weight types (edgeinfer convert's --type names), each made once and cached.")
@click.option("--prune", "prunes", default="0", show_default=True,
              help="Comma-separated FFN pruning ratios in [0, 1), each combined with every type.")
@click.option("--kv-types", default="f16", show_default=True, help="Comma-separated KV cache types: f32, f16, q8_0.")
@click.option("-t", "--threads", type=ThreadCounts(), default=None,
              help="Comma-separated thread counts (default: 1,2 or just 1).")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=2048, show_default=True,
              help="Context (positions) the peak RSS is measured at, its whole KV cache resident.")
@click.option("-p", "--prompt-tokens", type=click.IntRange(min=0), default=512, show_default=True,
              help="Prefill test tokens (as edgeinfer bench -p); 0 skips.")
@click.option("-n", "--gen-tokens", type=click.IntRange(min=0), default=128, show_default=True,
              help="Decode test tokens (as edgeinfer bench -n); 0 skips.")
@click.option("-r", "--reps", type=click.IntRange(min=1), default=3, show_default=True,
              help="Repetitions of each speed test, after a warm-up.")
@click.option("--ttft-tokens", type=click.IntRange(min=0), default=512, show_default=True,
              help="Prompt length for the time to first token; 0 skips.")
@click.option("--text", "text_file", default=None, metavar="FILE",
              help="Text for perplexity and KL (default: a few KB of prose and code shipped with edgeinfer).")
@click.option("--ppl-ctx", type=click.IntRange(min=4), default=512, show_default=True,
              help="Perplexity chunk length (as edgeinfer perplexity --ctx).")
@click.option("--chunks", type=click.IntRange(min=1), default=None, help="Score only the first N chunks.")
@click.option("--watts", type=FiniteFloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Power of one busy core, for the energy estimate where no RAPL counter or battery is readable.")
@click.option("--price-kwh", type=FiniteFloatRange(min=0), default=None,
              help="Electricity price per kWh: adds the cost of 1K tokens.")
@click.option("--json", "json_file", default=None, metavar="FILE", help="Write the results as JSON ('-': stdout).")
@click.option("--csv", "csv_file", default=None, metavar="FILE", help="Write one CSV row per variant ('-': stdout).")
@click.option("--plot", "plot_file", default=None, metavar="FILE.png|FILE.svg",
              help="Plot quality loss against decode speed (needs matplotlib: pip install 'edgeinfer[frontier]').")
@click.option("--max-memory", default=None, metavar="SIZE", help="Constraint: peak RSS at most SIZE (600MB, 1.5GB).")
@click.option("--min-tok-s", type=FiniteFloatRange(min=0), default=None, help="Constraint: decode tokens/s at least.")
@click.option("--max-kl", type=FiniteFloatRange(min=0), default=None, help="Constraint: KL divergence at most.")
@click.option("--prefer", type=click.Choice(["quality", "speed", "memory", "energy"]), default="quality",
              show_default=True, help="Which variant meeting the constraints is best.")
def frontier_cmd(source, types, prunes, kv_types, threads, n_ctx, prompt_tokens, gen_tokens, reps, ttft_tokens,
                 text_file, ppl_ctx, chunks, watts, price_kwh, json_file, csv_file, plot_file, max_memory,
                 min_tok_s, max_kl, prefer):
    """Measure SOURCE's variants (a catalogue name, GGUF file or Hugging Face checkpoint directory): size, peak
    RSS, prefill and decode speed, time to first token, KL and top-1 against the highest-precision variant,
    perplexity, energy per token; mark the Pareto frontier; with constraints, choose one."""
    from edgeinfer.bench import BenchError, bench_context
    from edgeinfer.frontier.choose import Constraints, choose, parse_size
    from edgeinfer.frontier.measure import MeasureSettings
    from edgeinfer.frontier.report import check_plot_path
    from edgeinfer.frontier.run import FrontierSpec
    from edgeinfer.frontier.variants import parse_kv_types, parse_prunes, parse_types

    constraints = Constraints(parse_size(max_memory) if max_memory is not None else None, min_tok_s, max_kl)
    try:
        bench_context(prompt_tokens, gen_tokens, n_ctx)
    except BenchError as e:
        raise click.UsageError(str(e)) from None
    if ttft_tokens >= n_ctx:
        raise click.UsageError(f"--ttft-tokens {ttft_tokens} needs a context of more than {ttft_tokens} (--ctx)")
    for option, path in (("--json", json_file), ("--csv", csv_file), ("--plot", plot_file)):
        _check_output(option, path)
    if plot_file is not None:
        check_plot_path(plot_file)
    settings = MeasureSettings(n_ctx=n_ctx, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, reps=reps,
                               ttft_tokens=ttft_tokens, text=_read_text(text_file), ppl_ctx=ppl_ctx, chunks=chunks,
                               watts=watts)
    spec = FrontierSpec(source, parse_types(types), parse_prunes(prunes), parse_kv_types(kv_types),
                        threads or tuple(sorted({1, min(2, compute_threads_available())})), settings, price_kwh,
                        text_file or "default")
    result = _run_with_progress(spec)
    if constraints.given():
        result["choice"] = choose(result["variants"], constraints, prefer)
    _outputs(result, json_file, csv_file, plot_file)
    if result["interrupted"]:
        sys.exit(130)


def _run_with_progress(spec) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeinfer.frontier import run

    console = Console(stderr=True)
    plain = not console.is_terminal  # a log file gets one line per step instead of a bar it cannot redraw
    # Redrawn twice a second, not rich's default 10: the redrawing thread shares the cores being measured (at 10
    # Hz beside a 2-thread child on 2 cores, prefill measured 5-15% below `edgeinfer bench`).
    bar = Progress(TextColumn("{task.fields[variant]:<22}"), TextColumn("{task.description:<48}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True, refresh_per_second=2,
                   disable=plain)

    class RichProgress(run.Progress):
        task = None

        def begin(self, total):
            bar.start()
            self.task = bar.add_task("starting", total=total, variant="")

        def step(self, variant, text):
            if plain and not text.startswith(("converting: tensor", "perplexity chunk")):
                click.echo(f"{variant}: {text}", err=True)
            bar.update(self.task, description=text[:48], variant=variant)

        def advance(self):
            bar.advance(self.task)

    try:
        return run.run_frontier(spec, RichProgress())
    finally:
        bar.stop()


def _outputs(result: dict, json_file, csv_file, plot_file) -> None:
    """The table and the choice on stdout (unless JSON or CSV goes there), then the files."""
    from rich.console import Console

    from edgeinfer.frontier import report

    choice = result.pop("choice", None)
    if choice is not None:
        result["choice"] = choice.to_json()
    to_stdout = "-" in (json_file, csv_file)
    console = Console(stderr=to_stdout, width=max(Console().width, 160))
    console.print(report.table(result))
    for line in report.notes(result) + (_choice_lines(choice) if choice is not None else []):
        console.print(line, highlight=False, markup=False)
    for path, text in ((json_file, report.to_json(result) if json_file else None),
                       (csv_file, report.to_csv(result) if csv_file else None)):
        if path == "-":
            click.echo(text, nl=False)
        elif path is not None:
            report.write_atomically(path, text)
    if plot_file is not None:
        report.plot(result, plot_file)


def _choice_lines(choice) -> list[str]:
    if choice.best is None:
        return ["no variant meets the constraints:", *[f"  {line}" for line in choice.binding]]
    from edgeinfer.frontier.report import num

    b = choice.best
    lines = [f"best: {b['label']} (peak RSS {num(b.get('peak_rss_bytes'), '.0f', 1e6)} MB, decode "
             f"{num(b.get('decode_tok_s'), '.1f')} tok/s, KL {num(b.get('kl'), '.4f')})", "use it:",
             *[f"  {c}" for c in choice.commands], "the others:"]
    return lines + [f"  {row['label']}: {why}" for row, why in choice.lost]
