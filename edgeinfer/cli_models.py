"""The commands that manage model files on disk: `list`, `rm` and `prune`."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click

_GAP = "  "  # between the columns of `list`


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per model (a JSON list).")
def list_cmd(as_json: bool) -> None:
    """Show the catalogue models and which are downloaded."""
    from edgeinfer.paths import models_dir
    from models.fetch import list_models

    rows = list_models()
    if as_json:
        click.echo(json.dumps([{**row, "path": str(row["path"])} for row in rows], indent=2))
        return
    click.echo(format_model_table(rows, shutil.get_terminal_size().columns, models_dir()))


def format_model_table(rows: list[dict], width: int, directory: Path) -> str:
    """`list_models()` rows as text at most `width` characters wide where it can be, never cutting a name: a table
    with a path column, else without it (one line naming the models directory), else one model per two lines."""
    has_kind = any(row.get("kind") for row in rows)
    header = ["name", *(["kind"] if has_kind else []), "arch", "quant", "size", "downloaded", "path"]
    cells = [[row["name"] + (" (default)" if row["default"] else ""), *([row.get("kind") or ""] if has_kind else []),
              row["arch"], row["quant"], f"{row['size'] / 1e6:.0f} MB", "yes" if row["downloaded"] else "no",
              str(row["path"]) if row["downloaded"] else ""] for row in rows]
    footnote = [f"downloaded files are in {directory}"] if any(row["downloaded"] for row in rows) else []
    for drop_path in (False, True):
        table = [line[:-1] if drop_path else line for line in [header, *cells]]
        lines = _aligned(table)
        if max(len(line) for line in lines) <= width:
            return "\n".join(lines + (footnote if drop_path else []))
    folded = []
    for row, line in zip(rows, cells):  # the name alone on a line, the rest indented below it
        details = [cell for cell in line[1:-2] if cell] + ["downloaded" if row["downloaded"] else "not downloaded"]
        folded += [line[0], "    " + ", ".join(details)]
    return "\n".join(folded + footnote)


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [_GAP.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]


@click.command("rm")
@click.argument("model")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
def rm_cmd(model: str, dry_run: bool) -> None:
    """Remove a downloaded catalogue MODEL (file, verification marker, partial files) and its repacked cache.

    Given a path to a GGUF file instead, removes only that file's repacked cache: rm never deletes your own files."""
    from edgeinfer.errors import InvalidArgument, ModelNotFound
    from edgeinfer.paths import models_dir
    from edgeinfer.backends.cpu_repack import cache_files_of
    from models.fetch import downloaded_files, load_catalogue, model_path, unknown_model

    path = Path(model).expanduser()
    entries = load_catalogue()
    if path.is_file():
        files = cache_files_of(path)
        if not files:
            raise InvalidArgument(f"{path}: has no repacked cache to remove (rm never deletes a model file given "
                                  f"by path)")
    elif path.is_dir():
        raise ModelNotFound(f"{path} is a directory, not a GGUF file")
    elif model in entries:
        files = downloaded_files(entries[model]) + cache_files_of(model_path(entries[model]))
        if not files:
            raise ModelNotFound(f"{model}: not downloaded (nothing to remove in {models_dir()})")
    else:
        raise unknown_model(model, entries, "no such file and not a catalogue model")
    _remove([(f, "") for f in files], dry_run)


@click.command("prune")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--frontier", "all_frontier", is_flag=True,
              help="Also remove every cached `edgeinfer frontier` weight variant (made again on the next run).")
def prune_cmd(dry_run: bool, all_frontier: bool) -> None:
    """Remove files no run will use again: repacked caches whose model is gone or changed, partial downloads,
    compiled kernels of other edgeinfer versions and frontier variants whose source is gone or changed (with
    --frontier, every frontier variant). Downloaded models are kept (see `edgeinfer rm`)."""
    from edgeinfer.backends.cpu_repack import stale_cache_files
    from kernels_cpu import stale_cache_dirs
    from models.fetch import stale_partials

    frontier = _frontier_files(all_frontier)
    taken = {path for path, _ in frontier}
    found = (frontier + [(p, why) for p, why in stale_cache_files() if p not in taken]
             + [(p, "partial download of a finished process") for p in stale_partials()]
             + [(d, "kernels compiled from other sources") for d in stale_cache_dirs()])
    if not found:
        click.echo("nothing to prune")
        return
    _remove(found, dry_run)


def _frontier_files(all_variants: bool) -> list[tuple[Path, str]]:
    """(path, why) for each frontier source directory to remove (stale ones; all with all_variants), each preceded
    by its variants' repacked caches (which would be stale once the variants are gone)."""
    from edgeinfer.backends.cpu_repack import cache_files_of
    from edgeinfer.frontier.variants import cached_variant_dirs, variant_files

    out = []
    for directory, stale in cached_variant_dirs():
        if stale or all_variants:
            why = stale or "frontier variants (--frontier)"
            out += [(cache, "repacked cache of a frontier variant") for variant in variant_files(directory)
                    for cache in cache_files_of(variant)]
            out.append((directory, why))
    return out


def _remove(found: list[tuple[Path, str]], dry_run: bool) -> None:
    """Delete (or with dry_run only list) each (path, why), in order, one line each; then the total freed."""
    freed = 0
    for path, why in found:
        size = _disk_bytes(path)
        if not dry_run:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            except OSError as e:
                click.echo(f"warning: cannot remove {path} ({e.strerror or e})", err=True)
                continue
        freed += size
        click.echo(f"{'would remove' if dry_run else 'removed'} {path} ({_megabytes(size)})"
                   + (f": {why}" if why else ""))
    click.echo(f"{'would free' if dry_run else 'freed'} {_megabytes(freed)}")


def _disk_bytes(path: Path) -> int:
    """Size of a file, or of every file under a directory, in bytes (0 for what vanished meanwhile)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    except OSError:
        return 0


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def register_model_commands(group: click.Group) -> None:
    """Add this module's commands to the `edgeinfer` command group."""
    for command in (list_cmd, rm_cmd, prune_cmd):
        group.add_command(command)
