"""Character data: corpus, vocabulary, split, random batches, and the sharded epoch stream."""

from __future__ import annotations

import pytest
import torch

from optimlab.train.data import (
    CharVocab,
    EpochBatches,
    WindowDataset,
    build_corpus,
    read_text_file,
    sample_batch,
    stdlib_corpus,
)


def test_stdlib_corpus_is_deterministic_python_source() -> None:
    first, second = stdlib_corpus(50_000), stdlib_corpus(50_000)
    assert first == second and len(first) == 50_000
    assert "def " in first and "import " in first
    assert stdlib_corpus(1000) == first[:1000]


def test_vocab_roundtrip_and_order() -> None:
    text = "hello, world\n\tÿ"
    vocab = CharVocab.from_text(text)
    assert vocab.chars == sorted(set(text))
    ids = vocab.encode(text)
    assert ids.dtype == torch.long and vocab.decode(ids) == text
    assert [vocab.chars[i] for i in ids.tolist()] == list(text)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode("Z")


@pytest.mark.parametrize("chars", [[], ["a", "a"], ["ab"]])
def test_vocab_rejects_bad_chars(chars: list[str]) -> None:
    with pytest.raises(ValueError, match="chars"):
        CharVocab(chars)


@pytest.mark.parametrize("length,val_fraction", [(1000, 0.1), (777, 0.25), (5000, 0.05)])
def test_split_is_contiguous(length: int, val_fraction: float) -> None:
    text = stdlib_corpus(length)
    corpus = build_corpus(text, block_size=8, val_fraction=val_fraction)
    n_val = int(length * val_fraction)
    assert len(corpus.val) == n_val and len(corpus.train) == length - n_val
    assert corpus.vocab.decode(torch.cat([corpus.train, corpus.val])) == text


def test_short_corpus_names_lengths() -> None:
    with pytest.raises(ValueError, match=r"has 50 characters, too short for block_size=64.*>= 65 characters"):
        build_corpus("x" * 50, block_size=64)
    build_corpus("ab" * 330, block_size=64)  # 66 validation characters: just enough


def test_read_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text_file(tmp_path / "nope.txt")


def test_sample_batch_targets_are_shifted_inputs() -> None:
    tokens = torch.arange(100)
    x, y = sample_batch(tokens, 6, 10, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (6, 10)
    assert torch.equal(y, x + 1)  # arange: the next token is the id plus one
    again, _ = sample_batch(tokens, 6, 10, torch.Generator().manual_seed(3))
    assert torch.equal(x, again)


def test_windows_cover_the_tokens_without_overlap() -> None:
    tokens = torch.arange(53)
    windows = WindowDataset(tokens, 8)
    assert len(windows) == 6  # (53 - 1) // 8
    x, y = windows.batch(range(len(windows)))
    assert torch.equal(x.flatten(), tokens[:48]) and torch.equal(y.flatten(), tokens[1:49])


@pytest.mark.parametrize("n_windows,batch,world", [(101, 3, 2), (64, 4, 4), (50, 5, 3), (37, 2, 1)])
def test_rank_shards_union_is_the_single_process_batch(n_windows: int, batch: int, world: int) -> None:
    """Batch b of the W ranks together = batch b of one process with batch size W·B, for every epoch and b."""
    windows = WindowDataset(torch.arange(n_windows * 4 + 1), 4)
    single = EpochBatches(windows, batch * world, seed=7)
    ranks = [EpochBatches(windows, batch, world_size=world, rank=r, seed=7) for r in range(world)]
    assert all(r.batches_per_epoch == single.batches_per_epoch for r in ranks)
    for epoch in range(3):
        seen: list[int] = []
        for b in range(single.batches_per_epoch):
            shards = [r.indices(epoch, b) for r in ranks]
            assert sorted(sum(shards, [])) == sorted(single.indices(epoch, b))
            assert all(len(s) == batch for s in shards)
            seen += single.indices(epoch, b)
        assert len(seen) == len(set(seen))  # an epoch never repeats a window
    assert single.indices(0, 0) != single.indices(1, 0)  # set_epoch reshuffles


def test_epoch_batches_bad_input() -> None:
    windows = WindowDataset(torch.arange(41), 4)  # 10 windows
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatches(windows, 0)
    with pytest.raises(ValueError, match=r"batch_size: 6 x 2 rank\(s\) exceeds the 10 training windows"):
        EpochBatches(windows, 6, world_size=2)
    with pytest.raises(ValueError, match="batch"):
        EpochBatches(windows, 5).indices(0, 2)
