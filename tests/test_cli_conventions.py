"""One command line, one set of conventions: every subcommand's --help is rendered and its options inspected."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from optimlab import __version__
from optimlab.cli import app

SAME_MEANING = {"--output": "--out"}  # two spellings of one option


def _commands() -> dict[tuple[str, ...], object]:
    """Every command and group of `optimlab`, by its path of names (the root is ())."""
    found = {}

    def walk(command: object, path: tuple[str, ...]) -> None:
        found[path] = command
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


COMMANDS = _commands()


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_covered() -> None:
    names = {" ".join(path) for path in COMMANDS}
    assert {"train", "bench", "report", "lr-find", "hessian", "schedule plot", "demo ddp", "demo functions"} <= names


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda path: " ".join(path) or "optimlab")
def test_help_follows_the_conventions(path: tuple[str, ...]) -> None:
    text = _help(path)
    assert "--help" in text
    assert "<bool>" not in text  # a boolean flag takes no value
    assert not re.search(r"(?<!\[)\bdefault:|Default \d", text, re.IGNORECASE), text  # written [default: ...]
    for param in getattr(COMMANDS[path], "params", []):
        longs = [o for o in param.opts + param.secondary_opts if o.startswith("--")]
        shorts = [o for o in param.opts + param.secondary_opts if re.fullmatch(r"-\w", o)]
        if param.param_type_name != "option":
            continue
        assert longs, param.opts
        assert all(o in text for o in longs + shorts), (longs, shorts)
        if "--quiet" in longs:
            assert "-q" in shorts, path
        if {"--out", "--output"} & set(longs):
            assert "-o" in shorts, path


def test_a_short_flag_means_one_thing_across_commands() -> None:
    meanings: dict[str, set[str]] = {}
    for path, command in COMMANDS.items():
        for param in getattr(command, "params", []):
            if param.param_type_name != "option":
                continue
            names = param.opts + param.secondary_opts
            longs = {SAME_MEANING.get(o, o) for o in names if o.startswith("--")}
            for short in (o for o in names if re.fullmatch(r"-\w", o)):
                meanings.setdefault(short, set()).update(longs)
    assert {short: sorted(longs) for short, longs in meanings.items() if len(longs) > 1} == {}
    assert meanings["-o"] == {"--out"} and meanings["-q"] == {"--quiet"}


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"optimlab {__version__}\n"


def test_bench_dash_o_is_no_longer_an_optimizer_list() -> None:
    result = CliRunner().invoke(app, ["bench", "-o", "out/"])
    assert result.exit_code == 2 and "No such option: -o" in result.output


def test_bench_jobs_zero_is_refused(tmp_path) -> None:
    result = CliRunner().invoke(app, ["bench", "--quick", "--jobs", "0", "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 2 and result.stderr == "error: Invalid --jobs: 0 (accepted range: >= 1)\n"
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("args", [
    ("train", "--steps", "5", "-o", "{ro}/run"),
    ("lr-find", "-t", "rosenbrock", "--num-iter", "5", "-o", "{ro}/lr.png"),
    ("hessian", "-t", "rosenbrock", "--train-steps", "0", "-o", "{ro}/h.png"),
    ("landscape", "-t", "rosenbrock", "--train-steps", "0", "-o", "{ro}/l.png"),
    ("schedule", "plot", "cosine", "-o", "{ro}/lr.png"),
    ("report", "-o", "{ro}/report"),
    ("demo", "ddp", "-o", "{ro}/ddp"),
    ("demo", "schedules", "-o", "{ro}/demo"),
    ("demo", "clipping", "-o", "{ro}/demo"),
    ("demo", "functions", "-o", "{ro}/demo"),
], ids=lambda args: " ".join(a for a in args[:2] if not a.startswith("-")))
def test_read_only_output_is_refused_before_the_work(read_only_dir, args: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [a.format(ro=read_only_dir) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: Invalid --out") or result.stderr.startswith("error: Invalid --output")
    assert f"cannot write to {read_only_dir}" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_full_disk_in_any_command_is_one_line(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The console script's backstop: ENOSPC while `schedule plot` writes its PNG (injected where the bytes reach
    the disk) ends with one line and exit code 2, no traceback, and no file left behind."""
    import errno
    import sys

    import optimlab.io
    from optimlab.cli import main

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(optimlab.io.os, "fsync", fsync)
    monkeypatch.setattr(sys, "argv", ["optimlab", "schedule", "plot", "cosine", "-o", str(tmp_path / "lr.png")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: cannot write or read {tmp_path / 'lr.png'}: no space left on device\n"
    assert list(tmp_path.iterdir()) == []
