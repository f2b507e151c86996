"""Fixtures of the trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimlab.train.data import stdlib_corpus


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 000 characters of the stdlib corpus in a file (what --data reads)."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(stdlib_corpus(30_000), encoding="utf-8")
    return path
