"""benchmarks/matmul_shapes.py measures the products the model computes, at the shapes it computes them."""

import os
import sys

import numpy as np
import pytest
from conftest import tiny

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import matmul_shapes  # noqa: E402


def test_shapes_are_the_steps_and_the_decoding_loops_matmuls():
  config = tiny(d_model=16, d_ff=48, vocab_size=100)
  found = matmul_shapes.shapes(config, tokens=64, decode_batches=(1, 8))
  assert found == [
    ('train: attention projection', 64, 16, 16, 'nn'),
    ('train: attention projection, input gradient', 64, 16, 16, 'nt'),
    ('train: attention projection, weight gradient', 16, 64, 16, 'tn'),
    ('train: FFN in', 64, 16, 48, 'nn'),
    ('train: FFN in, input gradient', 64, 48, 16, 'nt'),
    ('train: FFN in, weight gradient', 16, 64, 48, 'tn'),
    ('train: FFN out', 64, 48, 16, 'nn'),
    ('train: FFN out, input gradient', 64, 16, 48, 'nt'),
    ('train: FFN out, weight gradient', 48, 64, 16, 'tn'),
    ('train: logits (tied table)', 64, 16, 100, 'nt'),
    ('train: logits, input gradient', 64, 100, 16, 'nn'),
    ('train: logits, table gradient', 16, 64, 100, 'tn'),
    ('decode batch 1: FFN in', 1, 16, 48, 'nn'),
    ('decode batch 1: logits', 1, 16, 100, 'nt'),
    ('decode batch 8: FFN in', 8, 16, 48, 'nn'),
    ('decode batch 8: logits', 8, 16, 100, 'nt'),
  ]
  # Enough distinct weights to pass the cache: 64 MiB of them, one [k, n] float32 matrix being 4 k n bytes.
  assert matmul_shapes.copies(512, 2048) == 16 and matmul_shapes.copies(2048, 2048) == 4
  assert matmul_shapes.flops(8, 512, 2048) == 2 * 8 * 512 * 2048 * 16


def operands(layout, m=3, k=5, n=4):
  """a [m, k], b [k, n], and the two as `layout` stores them."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)
  stored = (a.T.copy() if layout == 'tn' else a, b.T.copy() if layout == 'nt' else b)
  assert (stored[0].shape, stored[1].shape) == matmul_shapes._stored(m, k, n, layout)
  return a, b, stored


@pytest.mark.parametrize('layout', matmul_shapes.LAYOUTS)
def test_each_layout_is_the_product_of_its_stored_operands_in_xla(layout):
  a, b, stored = operands(layout)
  np.testing.assert_allclose(matmul_shapes.xla_matmul(*stored, layout), a @ b, rtol=1e-5)


@pytest.mark.parametrize('layout', matmul_shapes.LAYOUTS)
def test_each_layout_is_the_product_of_its_stored_operands_in_pytorch(layout):
  torch = pytest.importorskip('torch')  # the [bench] extra
  a, b, stored = operands(layout)
  result = matmul_shapes.torch_matmul(*(torch.from_numpy(x) for x in stored), layout)
  np.testing.assert_allclose(result.numpy(), a @ b, rtol=1e-5)


def test_compare_shows_each_shapes_best_round_for_both_libraries(monkeypatch):
  import compare

  found = [('train: FFN in', 64, 16, 48, 'nn'), ('decode batch 8: logits', 8, 16, 100, 'nt')]
  rounds = {
    'XLA': [{'shapes': found, 'rates': [2e9, 1e9]}, {'shapes': found, 'rates': [1e9, 3e9]}],
    'PyTorch': [{'shapes': found, 'rates': [4e9, 1e9]}, {'shapes': found, 'rates': [1e9, 1e9]}],
  }
  asked = []
  monkeypatch.setattr(compare, 'alternate', lambda jobs, count: asked.append((jobs, count)) or rounds)
  monkeypatch.setitem(compare.HAVE, 'torch', True)
  args = compare.argparse.Namespace(variant='tiny', rounds=2)
  rows = compare.matmuls_section(args, {})
  assert [impl for impl, _ in asked[0][0].values()] == ['shapes_xla', 'shapes_torch'] and asked[0][1] == 2
  assert rows == [
    (
      'f32 matmul rate, train: FFN in: [64 x 16] x [16 x 48] (nn), XLA vs PyTorch',
      '2 GFLOP/s',
      '4 GFLOP/s',
      '0.50x',
      'report',
      '',
    ),
    (
      'f32 matmul rate, decode batch 8: logits: [8 x 16] x [16 x 100] (nt), XLA vs PyTorch',
      '3 GFLOP/s',
      '1 GFLOP/s',
      '3.00x',
      'report',
      '',
    ),
  ]
