"""The Pallas GPU flash kernel (`flash.py`) in Pallas' interpret mode on the CPU, against the dense masked
reference (`attention.dot_product_attention` under `make_attention_mask`), outputs and gradients; and its
GPU programs compiled through the CUDA plugin where it is installed (not in CI: `gpu.unavailable()`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny
from jax.sharding import PartitionSpec as P

from transformer import attention, flash, parallel, platform
from transformer.accelerators import gpu
from transformer.block_attention import SelfMask
from transformer.config import ConfigError


def _inputs(batch, length, heads, kv_heads, d_qk, d_v, seed=0):
  r = np.random.default_rng(seed)
  shapes = [(batch, length, heads, d_qk), (batch, length, kv_heads, d_qk), (batch, length, kv_heads, d_v)]
  shapes.append((batch, length, heads, d_v))  # the loss's weights: every output and gradient is used
  return [jnp.asarray(r.normal(size=shape), jnp.float32) for shape in shapes]


def _packed_positions(segment_ids):
  """Positions restarting at each segment, as the data pipeline packs rows."""
  segment_ids = np.asarray(segment_ids)
  starts = np.concatenate([np.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  index = np.arange(segment_ids.shape[1])
  return jnp.asarray(index - np.maximum.accumulate(np.where(starts, index, 0), axis=1))


def _loss_and_grads(attend, q, k, v, w):
  return jax.value_and_grad(lambda q, k, v: (attend(q, k, v) * w).sum(), argnums=(0, 1, 2))(q, k, v)


def _assert_matches_reference(q, k, v, w, segment_ids, *, causal, positions=None):
  """Outputs (all of them: padding queries attend within segment 0 in both) and the gradients of a weighted
  sum of them. Float32, rtol 1e-5; atol 1e-5 of the array's largest entry: an entry near zero is a sum of
  larger terms that cancel, and its rounding error is relative to those (interpret mode sums in another
  order and exponentiates with exp2, about 1e-7 of the terms)."""
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(q.shape[1]), segment_ids.shape)
  mask = attention.make_attention_mask(positions, positions, segment_ids, segment_ids, causal=causal)
  out = flash.attention(q, k, v, segment_ids, segment_ids, causal=causal, interpret=True)
  expected = attention.dot_product_attention(q, k, v, mask)
  got = [out] + list(
    _loss_and_grads(lambda q, k, v: flash.attention(q, k, v, segment_ids, segment_ids, causal=causal), q, k, v, w)[1]
  )
  want = [expected] + list(
    _loss_and_grads(lambda q, k, v: attention.dot_product_attention(q, k, v, mask), q, k, v, w)[1]
  )
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()), err_msg=name)


def test_causal_rows_match_the_reference():
  q, k, v, w = _inputs(2, 16, 4, 4, 16, 16)
  _assert_matches_reference(q, k, v, w, jnp.ones((2, 16), jnp.int32), causal=True)


def test_non_causal_rows_with_padding_match_the_reference():
  q, k, v, w = _inputs(2, 16, 4, 4, 16, 16, seed=1)
  segment_ids = jnp.asarray([[1] * 11 + [0] * 5, [1] * 16])
  _assert_matches_reference(q, k, v, w, segment_ids, causal=False)


def test_packed_rows_match_the_reference_under_positions_restarting_per_segment():
  """Causality on array indices within a segment is the mask's rule on positions restarting at each one."""
  q, k, v, w = _inputs(2, 16, 4, 4, 16, 16, seed=2)
  segment_ids = jnp.asarray([[1] * 5 + [2] * 6 + [3] * 3 + [0] * 2, [1] * 9 + [2] * 7])
  _assert_matches_reference(q, k, v, w, segment_ids, causal=True, positions=_packed_positions(segment_ids))


@pytest.mark.parametrize('causal', [True, False])
def test_odd_lengths_are_padded_with_tokens_no_real_token_sees(causal):
  """13 tokens run as 16 (one power-of-two block); 130 as 256 (whole blocks of 128). The non-causal rows
  have padding (segment 0) of their own, which must not see the added tokens either."""
  q, k, v, w = _inputs(2, 13, 2, 2, 16, 16, seed=3)
  _assert_matches_reference(q, k, v, w, jnp.asarray([[1] * 10 + [0] * 3, [2] * 13]), causal=causal)
  if causal:
    q, k, v, w = _inputs(1, 130, 1, 1, 16, 16, seed=4)
    _assert_matches_reference(q, k, v, w, jnp.asarray([[1] * 70 + [2] * 60]), causal=True)


@pytest.mark.parametrize('kv_heads', [2, 1])
def test_grouped_heads_read_their_own_key_head(kv_heads):
  """Query head n reads key/value head n // G: with K=2 and N=4, heads 0 and 1 read key head 0."""
  q, k, v, w = _inputs(2, 16, 4, kv_heads, 16, 16, seed=5)
  _assert_matches_reference(q, k, v, w, jnp.asarray([[1] * 9 + [2] * 7, [1] * 16]), causal=True)


@pytest.mark.parametrize('d_qk, d_v', [(16, 24), (40, 16)])
def test_key_and_value_head_sizes_may_differ(d_qk, d_v):
  """Zero-padded to the larger, which the kernel pads to a power of two; the scale stays 1/sqrt(d_k)."""
  q, k, v, w = _inputs(2, 16, 2, 2, d_qk, d_v, seed=6)
  _assert_matches_reference(q, k, v, w, jnp.asarray([[1] * 12 + [0] * 4, [1] * 16]), causal=False)


def test_self_mask_routes_flash_to_the_kernel_with_its_segment_ids():
  """`SelfMask.attend(impl='flash')` (the model's self-attention) equals its dense form under the reference."""
  q, k, v, _ = _inputs(2, 16, 4, 2, 16, 16, seed=7)
  segment_ids = jnp.asarray([[1] * 6 + [2] * 10, [1] * 13 + [0] * 3])
  positions = _packed_positions(segment_ids)
  mask = SelfMask(positions, positions, segment_ids, segment_ids, causal=True)
  got = mask.attend(q, k, v, impl='flash')
  want = attention.dot_product_attention(q, k, v, mask.dense())
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_blocks_and_lengths_are_what_triton_takes():
  assert [flash.padded_length(n) for n in (1, 13, 16, 17, 128, 129, 300)] == [16, 16, 16, 32, 128, 256, 384]
  # Bytes of one padded feature row -> (forward q block, forward k block, backward block).
  for size, dtype, blocks in [
    (64, jnp.float32, (128, 128, 32)),
    (96, jnp.bfloat16, (128, 128, 32)),
    (128, jnp.float32, (128, 64, 32)),
    (256, jnp.bfloat16, (128, 64, 32)),
    (256, jnp.float32, (64, 32, 32)),
    (512, jnp.float32, (32, 32, 16)),
  ]:
    got = flash.block_sizes(size, dtype)
    assert (got.block_q, got.block_k, got.block_q_dkv, got.block_kv_dkv, got.block_q_dq, got.block_kv_dq) == (
      blocks + (blocks[2],) * 3
    )


def test_supports_names_what_to_change():
  check = lambda config, **kw: flash.supports(
    config, **{'dropout': False, 'bias': False, 'window': False, 'pattern': False, **kw}
  )
  assert check(tiny()) is None
  assert check(tiny(d_model=2048, num_heads=4)) is None  # 512 float32 features per head fit
  assert 'attention_dropout_rate=0' in check(tiny(), dropout=True)
  assert 'no bias (positional=alibi adds ALiBi)' in check(tiny(positional='alibi'), bias=True)
  assert 'attention_window=0' in check(tiny(), window=True)
  assert 'attention_pattern=dense' in check(tiny(attention_pattern='strided'), pattern=True)
  reason = check(tiny(d_model=4096, num_heads=4))
  assert 'at most 512 features per head in float32' in reason and 'd_k=1024' in reason
  assert check(tiny(d_model=4096, num_heads=4, dtype='bfloat16')) is None


def test_an_explicit_flash_the_kernel_cannot_run_is_refused():
  with pytest.raises(ConfigError, match='attention_impl=flash: the flash kernel has no sliding window'):
    attention.resolve_impl(tiny(attention_impl='flash', attention_window=4), dropout=False)
  assert attention.resolve_impl(tiny(attention_impl='flash'), dropout=False) == 'flash'


_REASON = gpu.unavailable()
needs_plugin = pytest.mark.skipif(
  bool(_REASON), reason=f'{_REASON} (CI installs no CUDA wheels: too big for it)' if _REASON else ''
)


def _compiled_gradient(name, shapes, dtype, sharding_rules=()):
  """The gradient of a weighted sum of flash attention's outputs, compiled for the GPUs `name`."""
  from jax.sharding import Mesh, NamedSharding

  from transformer import accelerators

  devices = accelerators.parse(name).devices()
  mesh = Mesh(np.array(devices).reshape(len(devices), 1, 1), ('data', 'fsdp', 'tensor'))
  rows = NamedSharding(mesh, P(('data', 'fsdp')))
  (batch, length, heads, d), kv_heads = shapes
  args = [
    jax.ShapeDtypeStruct(shape, dt, sharding=rows)
    for shape, dt in [
      ((batch, length, heads, d), dtype),
      ((batch, length, kv_heads, d), dtype),
      ((batch, length, kv_heads, d), dtype),
      ((batch, length), jnp.int32),
    ]
  ]
  loss = lambda q, k, v, s: flash.attention(q, k, v, s, s, causal=True).astype(jnp.float32).sum()
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), platform.activation_sharding(sharding_rules):
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()


@needs_plugin
@pytest.mark.parametrize('d, dtype', [(64, jnp.bfloat16), (256, jnp.float32), (512, jnp.float32)])
def test_the_gradient_compiles_for_an_h100_in_memory_linear_in_length(d, dtype):
  """Triton's kernels compile deviceless (the plugin's ptxas checks their shared memory: the kernel's default
  blocks overflow it at these head sizes in float32). The temporaries are a few arrays of q's size (the
  output, its cotangent, the softmax statistics), never a [N, T, T] score tensor as XLA's dense kernel's
  (docs/models.md, "GPU: flash")."""
  length, heads = 4096, 8
  compiled = _compiled_gradient('h100-1', ((1, length, heads, d), heads), dtype)
  assert '__gpu$xla.gpu.triton' in compiled.as_text()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 3 * length * heads * d * 4 < heads * length * length * 4  # one float32 score tensor is more


@needs_plugin
def test_on_eight_gpus_each_runs_its_own_rows_and_heads():
  """Without the shard_map XLA gathers q, k and v to every GPU (a pallas_call cannot be partitioned)."""
  compiled = _compiled_gradient('h100-8', ((16, 512, 8, 64), 2), jnp.bfloat16, parallel.LOGICAL_RULES)
  text = compiled.as_text()
  assert 'all-gather' not in text and '__gpu$xla.gpu.triton' in text
  assert 'bf16[2,512,8,64]' in text  # each GPU's two rows, the heads whole (one data axis of 8)
