"""Atomic file writes: a reader (or a crash) never sees a half-written file.

Every file optimlab writes that a user may care about (figures, reports, checkpoints, JSON results)
goes through :func:`atomic_write`: the content is written to a temporary file in the same folder,
flushed and fsync'ed, then renamed over the destination, which POSIX guarantees to be atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["benchmark_main", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "atomic_savefig",
           "ensure_writable", "fsync_folder", "os_error_text", "write_json_and_markdown"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` keeps its previous content; an ``OSError``
    that names no file gets ``path`` as its ``filename``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(target)  # name the file the failed write was for (fsync, write: no name)
        raise
    fsync_folder(target.parent)  # make the rename itself durable


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """fsync ``folder`` itself, so that renames and new entries in it survive a crash (best effort: a
    filesystem that cannot fsync a folder is left as it is)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json_and_markdown(out: str | os.PathLike[str], name: str, results: Any, markdown: str) -> tuple[Path, Path]:
    """Write ``results`` as ``NAME.json`` and ``markdown`` as ``NAME.md`` into ``out`` (created if missing),
    each atomically; return both paths. Values JSON cannot encode are written as their ``str``."""
    folder = Path(out)
    json_path, markdown_path = folder / f"{name}.json", folder / f"{name}.md"
    atomic_write_text(json_path, json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(markdown_path, markdown)
    return json_path, markdown_path


def benchmark_main(description: str, run: Callable[[bool], Any],
                   write: Callable[[Any, str], tuple[Path, Path]], to_markdown: Callable[[Any], str],
                   argv: list[str] | None = None) -> None:
    """The command line of a benchmark script (``benchmarks/*.py``): ``--out DIR`` (default ``docs``) and
    ``--quick``; runs ``run(quick)``, writes its JSON and markdown files into ``DIR`` with ``write`` and prints
    their paths and the markdown."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="docs", help="folder for the JSON and markdown files (default: docs)")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (checks the bookkeeping)")
    args = parser.parse_args(argv)
    results = run(args.quick)
    print(to_markdown(results))
    print("wrote " + ", ".join(str(path) for path in write(results, args.out)))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically (a SIGKILL mid-write leaves the previous file intact).

    A failed write raises the ``OSError`` behind it (``errno.ENOSPC`` for a full disk), not the
    ``RuntimeError`` torch's zip writer wraps it in."""
    import torch

    try:
        with atomic_write(path, "wb") as handle:
            torch.save(obj, handle)
    except RuntimeError as error:  # torch's zip writer reports a failed write as "[enforce fail at ...]"
        cause = _os_error_behind(error)
        if cause is None:
            raise
        raise cause from error


def _os_error_behind(error: BaseException) -> OSError | None:
    """The ``OSError`` (e.g. ENOSPC) that an exception was raised while handling, if any."""
    seen = error.__context__ or error.__cause__
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__context__ or seen.__cause__
    return seen


def atomic_savefig(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically; the format comes from ``path``'s suffix. Returns the path."""
    target = Path(path)
    fmt = kwargs.pop("format", target.suffix.lstrip(".") or "png")
    kwargs.setdefault("dpi", 120)
    kwargs.setdefault("bbox_inches", "tight")
    with atomic_write(target, "wb") as handle:
        fig.savefig(handle, format=fmt, **kwargs)
    return target



def os_error_text(error: OSError) -> str:
    """An ``OSError``'s cause in words, lower-case (``"no space left on device"``, ``"read-only file system"``)."""
    text = error.strerror or os.strerror(error.errno) if error.errno else str(error)
    return text[:1].lower() + text[1:]


def ensure_writable(folder: str | os.PathLike[str], option: str) -> Path:
    """Create ``folder`` if needed and prove that a file can be written there (a probe file, removed at once).

    Run it before a long computation whose results go to ``folder``. Raises ``ValueError`` (one line:
    ``"Invalid <option>: cannot write to <folder>: read-only file system"``) when the folder cannot be
    created or written. Returns the folder.
    """
    target = Path(folder)
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".optimlab-write-check.", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"Invalid {option}: cannot write to {target}: {os_error_text(error)}") from None
    return target
