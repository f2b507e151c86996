import os
import stat

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
