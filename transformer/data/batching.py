"""Padding examples into fixed-shape numpy batches."""

import numpy as np


def pad_batch(examples, batch_size: int, length: int):
  """Stacks dicts of 1-D int sequences into `[batch_size, length]` arrays, zero-padded on the right.

  Missing rows (a short final eval batch) are all padding, so every batch has one shape: one
  compilation, and global arrays of equal size on every process.
  """
  keys = examples[0].keys()
  batch = {key: np.zeros((batch_size, length), np.int32) for key in keys}
  for row, example in enumerate(examples):
    for key in keys:
      values = example[key][:length]
      batch[key][row, : len(values)] = values
  return batch
