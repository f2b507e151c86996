"""Small models used by the demos and the bench lab's tasks."""

from optimlab.models.rnn import ExplodingRNN, SequenceData, make_sequence_data, sequence_batches

__all__ = ["ExplodingRNN", "SequenceData", "make_sequence_data", "sequence_batches"]
