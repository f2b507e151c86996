"""Shared fixtures: deterministic seeds, a non-interactive matplotlib backend, GPU skipping, a small or read-only
filesystem."""

import os
import subprocess

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _mount_tmpfs(folder, options: str) -> bool:
    """Mount a tmpfs on ``folder`` (root only); False where that is not allowed."""
    if os.geteuid() != 0:
        return False
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return mount.returncode == 0


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2 MiB filesystem (tmpfs) to fill up; skipped where mounting needs privileges this process lacks."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if not _mount_tmpfs(folder, "size=2m"):
        pytest.skip("mounting a tmpfs needs root")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder that cannot be written: a read-only tmpfs as root, a mode-0555 folder otherwise."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        if not _mount_tmpfs(folder, "ro,size=64k"):
            pytest.skip("root ignores file modes and cannot mount a read-only tmpfs here")
        yield folder
        subprocess.run(["umount", "-l", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
