"""The commands that manage model files on disk: `list` (and later `rm`, `prune`)."""
from __future__ import annotations

import click


@click.command("list")
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


def register_model_commands(group: click.Group) -> None:
    """Add this module's commands to the `edgeinfer` command group."""
    group.add_command(list_cmd)
