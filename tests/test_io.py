import json
import os
import stat
from pathlib import Path

import pytest

from optimlab.io import atomic_write, atomic_write_text


def test_atomic_write_replaces_and_keeps_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_atomic_write_failure_keeps_previous_content(tmp_path):
    target = tmp_path / "file.txt"
    atomic_write_text(target, "kept")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_write_json_and_markdown_writes_both_files_into_a_new_folder(tmp_path):
    from optimlab.io import write_json_and_markdown

    out = tmp_path / "new" / "folder"
    json_path, markdown_path = write_json_and_markdown(out, "bench", {"ms": 1.5, "where": Path("x")}, "| a |\n")
    assert (json_path, markdown_path) == (out / "bench.json", out / "bench.md")
    assert json.loads(json_path.read_text()) == {"ms": 1.5, "where": "x"}  # a Path is written as its str
    assert markdown_path.read_text() == "| a |\n"
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md"]  # no temporaries left
