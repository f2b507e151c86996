"""Character-level text data: a deterministic corpus, a character vocabulary, a train/val split, batches.

* :func:`stdlib_corpus` concatenates the Python standard library's own ``.py`` files in sorted order
  (no downloads, the same text on every run of the same Python), up to ``max_chars`` characters.
* :class:`CharVocab` maps characters to ids (sorted unique characters of the text) and back.
* :func:`build_corpus` encodes a text and splits it: the first ``1 - val_fraction`` for training, the rest
  for validation (a contiguous split, so no validation text leaks into training windows).
* :func:`sample_batch` draws random windows (for quick experiments and the benchmark lab);
  :class:`WindowDataset` + :class:`EpochBatches` give the trainer epoch-based batches through
  ``torch.utils.data.DistributedSampler``, so data-parallel ranks see disjoint shards, the union of the
  ranks' batches at a step is the batch one process would take with ``world_size`` times the batch size,
  and a position ``(epoch, batch)`` is enough to resume exactly.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

__all__ = [
    "CharVocab",
    "CharCorpus",
    "stdlib_corpus",
    "read_text_file",
    "build_corpus",
    "sample_batch",
    "WindowDataset",
    "EpochBatches",
]

_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def stdlib_corpus(max_chars: int = 2_000_000) -> str:
    """The standard library's ``.py`` sources, sorted by relative path, joined by newlines, cut at ``max_chars``.

    Test suites and installed packages are skipped. Deterministic for a given Python installation.
    """
    if max_chars < 1:
        raise ValueError(f"Invalid max_chars: {max_chars} (accepted range: >= 1)")
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)
        files.extend(Path(directory) / n for n in names if n.endswith(".py"))
    pieces: list[str] = []
    total = 0
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        text = path.read_text(encoding="utf-8", errors="replace")
        pieces.append(text)
        total += len(text) + 1
        if total >= max_chars:
            break
    return "\n".join(pieces)[:max_chars]


def read_text_file(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file; a missing file raises ``FileNotFoundError`` naming it, a file that is not
    UTF-8 text (invalid UTF-8, or NUL bytes as in binary files) raises ``ValueError`` naming it."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Data file not found: {file} (pass --data with an existing text file)")
    raw = file.read_bytes()
    if b"\0" in raw:
        raise ValueError(f"Invalid --data: {file} holds NUL bytes at offset {raw.index(0)} (a binary file?); "
                         "pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"Invalid --data: {file} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
                         f"{error.start}); pass a UTF-8 text file") from None
    return text


class CharVocab:
    """A character vocabulary: id(c) = position of c in the sorted unique characters."""

    def __init__(self, chars: Sequence[str]) -> None:
        if not chars:
            raise ValueError("Invalid chars: a vocabulary needs at least one character")
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("Invalid chars: expected distinct single characters")
        self.chars = list(chars)
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The vocabulary of the distinct characters of ``text``."""
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and self.chars == other.chars

    def encode(self, text: str) -> Tensor:
        """``text`` → int64 tensor of ids; a character outside the vocabulary raises ``ValueError``."""
        try:
            return torch.tensor([self._index[c] for c in text], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"Character {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Ids → text."""
        values = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join(self.chars[i] for i in values)


@dataclass
class CharCorpus:
    """An encoded text split into training and validation token tensors (int64, 1-D)."""

    vocab: CharVocab
    train: Tensor
    val: Tensor


def build_corpus(text: str, block_size: int, val_fraction: float = 0.1, vocab: CharVocab | None = None) -> CharCorpus:
    """Encode ``text`` and split it: the first ⌊(1 − val_fraction)·n⌋ ids train, the rest validate.

    Each split must hold at least ``block_size + 1`` characters (one input window plus its shifted
    targets); otherwise ``ValueError`` says how long the corpus is and how long it must be.
    ``vocab`` (e.g. from a checkpoint) must cover the text; by default it is built from ``text``.
    """
    if block_size < 1:
        raise ValueError(f"Invalid block_size: {block_size} (accepted range: >= 1)")
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"Invalid val_fraction: {val_fraction} (accepted range: (0, 1))")
    n_val = int(len(text) * val_fraction)
    n_train = len(text) - n_val
    needed = block_size + 1
    if min(n_train, n_val) < needed:
        minimum = max(needed, int(needed / val_fraction) + 1, int(needed / (1 - val_fraction)) + 1)
        raise ValueError(
            f"The corpus has {len(text)} characters, too short for block_size={block_size} with "
            f"val_fraction={val_fraction}: each split needs >= {needed} characters, i.e. >= {minimum} in all "
            f"(use a longer text or a smaller --block-size)"
        )
    vocab = vocab if vocab is not None else CharVocab.from_text(text)
    ids = vocab.encode(text)
    return CharCorpus(vocab=vocab, train=ids[:n_train], val=ids[n_train:])


def sample_batch(tokens: Tensor, batch_size: int, block_size: int,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``batch_size`` windows at uniformly random offsets: x = tokens[o : o+T], y = tokens[o+1 : o+T+1]."""
    if len(tokens) < block_size + 1:
        raise ValueError(f"Invalid tokens: {len(tokens)} tokens, need >= block_size + 1 = {block_size + 1}")
    offsets = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    x = torch.stack([tokens[o:o + block_size] for o in offsets.tolist()])
    y = torch.stack([tokens[o + 1:o + 1 + block_size] for o in offsets.tolist()])
    return x, y


class WindowDataset(Dataset):
    """Non-overlapping windows: item i is (tokens[iT : iT+T], tokens[iT+1 : iT+T+1]) with T = block_size."""

    def __init__(self, tokens: Tensor, block_size: int) -> None:
        if len(tokens) < block_size + 1:
            raise ValueError(f"Invalid tokens: {len(tokens)} tokens, need >= block_size + 1 = {block_size + 1}")
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = index * self.block_size
        return self.tokens[start:start + self.block_size], self.tokens[start + 1:start + 1 + self.block_size]

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Stack the windows ``indices`` into (inputs, targets), each (len(indices), block_size)."""
        pairs = [self[i] for i in indices]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class EpochBatches:
    """Batches of window indices for one rank, epoch by epoch, through ``DistributedSampler``.

    Epoch e shuffles the windows with seed ``seed + e`` (``set_epoch``); rank r of W takes every W-th
    index of that permutation (``drop_last=True``, so every rank gets the same count), and cuts its share
    into batches of ``batch_size`` (an incomplete last batch is dropped). :meth:`indices` addresses a batch
    by ``(epoch, batch)``, which is all a checkpoint needs to store to resume the stream exactly. Hence for
    any W, the union over ranks of batch b is permutation[b·W·B : (b+1)·W·B], the batch b of one process
    with batch size W·B.
    """

    def __init__(self, dataset: WindowDataset, batch_size: int, *, world_size: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (accepted range: >= 1)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self._order: list[int] = []
        self._order_epoch: int | None = None
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"Invalid batch_size: {batch_size} x {world_size} rank(s) exceeds the {len(dataset)} training "
                f"windows of the corpus (use a longer text or a smaller batch size / block size)"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch on this rank."""
        return len(self.sampler) // self.batch_size

    def indices(self, epoch: int, batch: int) -> list[int]:
        """The window indices of batch ``batch`` (0 <= batch < batches_per_epoch) of ``epoch`` on this rank."""
        if not (0 <= batch < self.batches_per_epoch):
            raise ValueError(f"Invalid batch: {batch} (accepted range: 0..{self.batches_per_epoch - 1})")
        if self._order_epoch != epoch:
            self.sampler.set_epoch(epoch)
            self._order = list(self.sampler)
            self._order_epoch = epoch
        return self._order[batch * self.batch_size:(batch + 1) * self.batch_size]
