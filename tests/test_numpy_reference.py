"""The Flax models' float32 logits equal an independent NumPy float64 forward pass (tests/numpy_reference.py),
for a handful of configurations that together cover every positional encoding, norm, activation,
grouped heads, windows, padding and tied/untied outputs. Torch-free: runs in CI, unlike the
PyTorch reference of the benchmark (tests/test_bench.py)."""

import jax
import numpy as np
import numpy_reference
import pytest
from conftest import tiny

from transformer import models

CASES = [
  dict(kind='encoder_decoder', positional='sinusoidal'),  # the paper's model: post-LN, LayerNorm, ReLU, tied
  dict(kind='encoder_decoder', positional='learned', norm_position='pre', activation='gelu', tie_embeddings=False),
  dict(kind='encoder_decoder', positional='rope', norm_type='rmsnorm', activation='swiglu', num_kv_heads=2),
  dict(kind='decoder_only', positional='rope', norm_type='rmsnorm', activation='swiglu', num_kv_heads=2),
  dict(kind='decoder_only', positional='alibi', num_kv_heads=1, d_k=6, d_v=10, norm_position='pre'),
  dict(kind='decoder_only', positional='none', attention_window=3, tie_embeddings=False),
]


def _case_id(case):
  return '-'.join(f'{k}={v}' for k, v in case.items())


def _tokens(shape, seed):
  return np.array(jax.random.randint(jax.random.key(seed), shape, 3, 37))


@pytest.mark.parametrize('case', CASES, ids=_case_id)
def test_logits_equal_the_numpy_reference(case):
  cfg = tiny(**case)
  kind = cfg.kind
  model = models.build_model(cfg)
  # Non-trivial norms and biases (they start at ones and zeros): a swapped scale/bias or a skipped
  # bias then shows.
  params = models.init_params(model, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(
    treedef, [x + 0.1 * jax.random.normal(k, x.shape) if x.ndim == 1 else x for x, k in zip(leaves, keys)]
  )
  source = _tokens((2, 7), seed=2)
  source[1, 4:] = 0  # a padded source row
  target = _tokens((2, 9), seed=3)
  target[0, 6:] = 0  # a padded target row
  if kind == 'encoder_decoder':
    ours = jax.jit(model.apply)({'params': params}, source, target)  # one compile beats eager dispatch
    expected = numpy_reference.encoder_decoder(cfg, params, source, target)
  else:
    ours = jax.jit(model.apply)({'params': params}, target)
    expected = numpy_reference.decoder_only(cfg, params, target)
  assert ours.shape == expected.shape == (2, 9, cfg.vocab_size)
  # float32 against float64: a few float32 roundings per layer on logits of scale ~1-10.
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_the_reference_is_not_trivially_equal():
  """Control: the comparison's tolerance separates a real difference (one FFN bias entry moved by 1e-3)."""
  cfg = tiny(positional='rope')
  model = models.build_model(cfg)
  params = models.init_params(model, jax.random.key(0))
  target = _tokens((2, 9), seed=3)
  expected = numpy_reference.decoder_only(cfg, params, target)
  np.testing.assert_allclose(model.apply({'params': params}, target), expected, rtol=1e-5, atol=1e-5)
  bias = params['decoder']['stack']['layer_1']['ffn']['wo']['bias']
  params['decoder']['stack']['layer_1']['ffn']['wo']['bias'] = bias.at[0].add(1e-3)
  assert not np.allclose(model.apply({'params': params}, target), expected, rtol=1e-5, atol=1e-5)
