"""Training a small character-level GPT: model, data, trainer, checkpoints, data-parallel launch."""

from optimlab.train.data import CharCorpus, CharVocab, build_corpus, sample_batch, stdlib_corpus
from optimlab.train.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "CharCorpus", "CharVocab", "build_corpus", "sample_batch", "stdlib_corpus"]
