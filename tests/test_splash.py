"""The Pallas TPU splash kernel (`splash.py`) in Pallas' interpret mode on the CPU, against the dense masked
reference (`attention.dot_product_attention` under `make_attention_mask` and the pattern's token mask),
outputs and gradients; its shard_map on 8 simulated devices against one device (a subprocess: this file as a
script); and its TPU program compiled through libtpu (skipped without it, as tests/test_compile.py).

Rows are 200 tokens unless a test says otherwise: the kernel runs them as 256 (two blocks of 128, its
smallest), so every case also pads an odd length and crosses a block boundary.
"""

import json
import os
import re
import subprocess
import sys

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny
from hypothesis import given, settings
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from test_properties_masks import PROFILE, packed_rows

from transformer import accelerators, attention, parallel, patterns, platform, splash
from transformer.block_attention import SelfMask
from transformer.config import ConfigError

LENGTH = 200
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(batch, length, heads, kv_heads, d_qk, d_v, seed=0):
  r = np.random.default_rng(seed)
  shapes = [(batch, length, heads, d_qk), (batch, length, kv_heads, d_qk), (batch, length, kv_heads, d_v)]
  shapes.append((batch, length, heads, d_v))  # the loss's weights: every output and gradient is used
  return [jnp.asarray(r.normal(size=shape), jnp.float32) for shape in shapes]


def _segments(*rows):
  """Segment ids from (segment, count) runs per row: ((1, 150), (0, 50)) is 150 real tokens, 50 padding."""
  return jnp.asarray([sum(([segment] * count for segment, count in row), []) for row in rows], jnp.int32)


def reference(q, k, v, segment_ids, *, causal, window=0, pattern=None, layer=0):
  """The semantics splash must have: the dense mask on positions = indices, and the pattern's token mask."""
  length = q.shape[1]
  index = jnp.arange(length)
  positions = jnp.broadcast_to(index, segment_ids.shape)
  mask = attention.make_attention_mask(positions, positions, segment_ids, segment_ids, causal=causal, window=window)
  if pattern is not None:
    mask &= pattern.token_mask(index[:, None], index[None, :], length, length, layer)[None, None]
  return attention.dot_product_attention(q, k, v, mask)


def _loss_and_grads(attend, q, k, v, w):
  return jax.value_and_grad(lambda q, k, v: (attend(q, k, v) * w).sum(), argnums=(0, 1, 2))(q, k, v)


def assert_matches_reference(q, k, v, w, segment_ids, **mask):
  """Outputs (all of them: padding queries attend within segment 0 in both) and the gradients of a weighted
  sum of them w.r.t. q, k and v. Float32, rtol 1e-5; atol 1e-5 of the array's largest entry, or of 1 (the
  inputs' scale) when that is smaller: an entry near zero is a sum of larger terms that cancel, and its
  rounding error is relative to those (the kernel sums each row block by block, rescaling as its running
  maximum grows; measured differences stay below 1e-6 of that scale). A one-token row's dq is exactly 0 in
  the reference (one key: the softmax cannot move) and about 1e-7 in the kernel."""
  attend = lambda q, k, v: splash.attention(q, k, v, segment_ids, segment_ids, interpret=True, **mask)
  dense = lambda q, k, v: reference(q, k, v, segment_ids, **mask)
  got = [attend(q, k, v), *_loss_and_grads(attend, q, k, v, w)[1]]
  want = [dense(q, k, v), *_loss_and_grads(dense, q, k, v, w)[1]]
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(float(jnp.abs(b).max()), 1.0), err_msg=name)


PADDED_AND_PACKED = _segments(((1, 150), (0, 50)), ((1, 60), (2, 70), (3, 66), (0, 4)))


@pytest.mark.parametrize('causal', [True, False])
def test_padded_and_packed_rows_match_the_reference(causal):
  """Row 0: one sequence and padding; row 1: three packed sequences, the second across the block boundary."""
  q, k, v, w = _inputs(2, LENGTH, 4, 4, 16, 16)
  assert_matches_reference(q, k, v, w, PADDED_AND_PACKED, causal=causal)


@pytest.mark.parametrize('causal, window', [(True, 7), (False, 7), (True, 150)])
def test_sliding_windows_match_the_reference(causal, window):
  """Keys at distance < window: behind the query when causal, both sides when not; 150 spans a block edge."""
  q, k, v, w = _inputs(2, LENGTH, 4, 4, 16, 16, seed=1)
  assert_matches_reference(q, k, v, w, PADDED_AND_PACKED, causal=causal, window=window)


@pytest.mark.parametrize(
  'kind, causal, options',
  [
    ('strided', True, dict(stride=3)),
    ('fixed', False, dict(stride=4, summary=1)),
    ('bigbird', True, dict(local=3, global_blocks=1, random=2)),
    ('bigbird', False, dict(local=3, global_blocks=2, random=2)),
  ],
)
def test_block_patterns_match_their_token_mask(kind, causal, options):
  """Blocks of 16 tokens, 8 x 8 of them in each of the kernel's blocks; BigBird drawn for layer 1 (its own
  random blocks, not layer 0's), its table for the row's 13 blocks, not the padded row's 16."""
  pattern = patterns.Pattern(kind, block=16, causal=causal, **options)
  assert not np.array_equal(pattern.table(13, 13, 1), pattern.table(13, 13, 0)) or kind != 'bigbird'
  q, k, v, w = _inputs(2, LENGTH, 4, 2, 16, 16, seed=2)
  assert_matches_reference(q, k, v, w, PADDED_AND_PACKED, causal=causal, pattern=pattern, layer=1)


def test_a_pattern_of_kernel_sized_blocks_skips_empty_blocks_and_keeps_a_window():
  """Pattern blocks of 128 tokens are the kernel's blocks: the table is its block mask, and an empty block is
  never visited (fixed, chunks of 2 blocks: block 2 sees block 1, its summary, not block 0); a window on top
  cuts within the allowed ones."""
  pattern = patterns.Pattern('fixed', block=128, causal=True, stride=2, summary=1)
  assert splash.block_size(300, pattern) == 128 and not pattern.table(3, 3)[2, 0]
  q, k, v, w = _inputs(1, 300, 2, 1, 8, 8, seed=3)
  segment_ids = _segments(((1, 290), (0, 10)))
  assert_matches_reference(q, k, v, w, segment_ids, causal=True, pattern=pattern, window=200)


@pytest.mark.parametrize('length', [1, 131])
def test_odd_lengths_are_padded_with_tokens_no_real_token_sees(length):
  """1 token runs as 128, 131 as 256; the padding queries (segment 0) of the non-causal row must not see the
  added tokens either."""
  q, k, v, w = _inputs(2, length, 2, 2, 16, 16, seed=4)
  real = max(1, length - 9)
  assert_matches_reference(q, k, v, w, _segments(((1, real), (0, length - real)), ((2, length),)), causal=False)


@pytest.mark.parametrize('kv_heads', [2, 1])
def test_grouped_heads_read_their_own_key_head(kv_heads):
  """Query head n reads key/value head n // G: with K=2 and N=4, heads 0 and 1 read key head 0."""
  q, k, v, w = _inputs(2, LENGTH, 4, kv_heads, 16, 16, seed=5)
  assert_matches_reference(q, k, v, w, PADDED_AND_PACKED, causal=True)


@pytest.mark.parametrize('d_qk, d_v', [(16, 8), (8, 24)])
def test_key_and_value_head_sizes_may_differ(d_qk, d_v):
  """The kernel takes both sizes as they are; the scale is 1/sqrt(d_k)."""
  q, k, v, w = _inputs(2, LENGTH, 4, 2, d_qk, d_v, seed=6)
  assert_matches_reference(q, k, v, w, PADDED_AND_PACKED, causal=True)


@settings(PROFILE, max_examples=4)
@given(rows=packed_rows(2, 136), causal=st.booleans(), window=st.sampled_from([0, 5]))
def test_any_segment_layout_matches_the_reference(rows, causal, window):
  """Random packings (1-4 segments of random lengths, then padding; a row may be all padding)."""
  q, k, v, w = _inputs(2, 136, 2, 1, 8, 8, seed=7)
  assert_matches_reference(q, k, v, w, jnp.asarray(rows[1]), causal=causal, window=window)


def test_self_mask_routes_splash_to_the_kernel_on_packed_positions():
  """`SelfMask.attend(impl='splash')` (the model's self-attention), positions restarting per segment: the real
  tokens' outputs equal its dense form's (padding sits at position 0 there, at its index in the kernel)."""
  q, k, v, _ = _inputs(2, LENGTH, 4, 2, 16, 16, seed=8)
  segment_ids = PADDED_AND_PACKED
  starts = np.r_[0, 60, 130, 196]
  positions = np.broadcast_to(np.arange(LENGTH), (2, LENGTH)).copy()
  positions[1] -= starts[np.searchsorted(starts, np.arange(LENGTH), side='right') - 1]
  positions = jnp.asarray(np.where(np.asarray(segment_ids) > 0, positions, 0))
  pattern = patterns.Pattern('bigbird', block=16, causal=True, local=3, global_blocks=1, random=2)
  mask = SelfMask(positions, positions, segment_ids, segment_ids, causal=True, pattern=pattern, layer=1)
  real = (segment_ids > 0)[..., None, None]
  got = jnp.where(real, mask.attend(q, k, v, impl='splash'), 0)
  want = jnp.where(real, attention.dot_product_attention(q, k, v, mask.dense()), 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_blocks_are_the_largest_that_divide_the_row_and_the_pattern():
  assert [splash.block_size(n) for n in (1, 128, 131, 300, 512, 1000, 2048, 65536)] == [128, 128, 256, 128] + [512] * 4
  assert splash.block_size(640) == 128 and splash.block_size(768) == 256
  pattern = lambda block: patterns.Pattern('strided', block=block, causal=True)
  assert [splash.block_size(4096, pattern(b)) for b in (16, 64, 128, 256, 1024)] == [128, 128, 128, 256, 512]


def test_masks_without_a_pattern_are_computed_in_the_kernel():
  """64k tokens build no [T, T] array: causal, window and full masks are splash's lazy ones."""
  length = 65536
  assert type(splash._mask(length, length, True, 0, None, 0)) is splash.splash.CausalMask
  assert type(splash._mask(length, length, False, 64, None, 0)) is splash.splash.LocalMask
  assert type(splash._mask(length, length, False, 0, None, 0)) is splash.splash.FullMask


@pytest.mark.parametrize(
  'pattern', [patterns.Pattern('strided', 16, causal=True), patterns.Pattern('bigbird', 16, causal=False, random=2)]
)
def test_a_patterns_mask_read_block_by_block_is_its_token_mask(pattern):
  """What the kernel reads of a 1000-token row (1024 padded, blocks of 128), block by block, is the token
  mask with causality, and allows the padding tokens everything (their segment keeps them apart); blocks
  without a pattern block are answered without building the token mask, and must be so too."""
  length, padded, size = 1000, 1024, 128
  mask = splash._mask(length, padded, pattern.causal, 0, pattern, 1)
  index = np.arange(padded)
  i, j = index[:, None], index[None, :]
  real = np.minimum(index, length - 1)
  want = pattern.token_mask(real[:, None], real[None, :], length, length, 1) | (i >= length) | (j >= length)
  want &= (i >= j) | (not pattern.causal)
  for top in range(0, padded, size):
    for left in range(0, padded, size):
      block = mask[top : top + size, left : left + size]
      np.testing.assert_array_equal(block, want[top : top + size, left : left + size], err_msg=f'{top}, {left}')


def test_supports_names_what_to_change():
  check = lambda config, **kw: splash.supports(config, **{'dropout': False, 'bias': False, **kw})
  assert check(tiny()) is None
  assert check(tiny(attention_window=8)) is None and check(tiny(attention_pattern='bigbird', scan_layers=False)) is None
  assert 'attention_dropout_rate=0' in check(tiny(), dropout=True)
  assert 'adds no bias' in check(tiny(positional='alibi'), bias=True)


def test_an_explicit_splash_the_kernel_cannot_run_is_refused():
  with pytest.raises(ConfigError, match='attention_impl=splash: the splash kernel adds no bias'):
    attention.resolve_impl(tiny(attention_impl='splash', positional='alibi'), dropout=False)
  with pytest.raises(ConfigError, match='attention_impl=splash: the splash kernel has no attention dropout'):
    attention.resolve_impl(tiny(attention_impl='splash', attention_dropout_rate=0.1), dropout=True)
  assert attention.resolve_impl(tiny(attention_impl='splash'), dropout=False) == 'splash'


@pytest.mark.parametrize(
  'heads, kv_heads, want',
  [
    (8, 8, (P(('data', 'fsdp'), None, 'tensor', None), P(('data', 'fsdp'), None, 'tensor', None))),
    (8, 1, (P(('data', 'fsdp'), None, 'tensor', None), P(('data', 'fsdp'), None, None, None))),
    (8, 3, (P(('data', 'fsdp'), None, None, None), P(('data', 'fsdp'), None, None, None))),  # 3 heads on 2 devices
  ],
)
def test_under_a_mesh_the_kernel_runs_on_each_devices_rows_and_heads(heads, kv_heads, want):
  """Batch and heads split as the activation rules split them; key heads that cannot follow the query heads
  keep both whole (else query head n would meet the wrong key head); inside the train step's vmap over batch
  shards (its rules leave the batch to the vmap) the batch stays whole here."""
  mesh = AbstractMesh((2, 2, 2), ('data', 'fsdp', 'tensor'))
  with jax.sharding.use_abstract_mesh(mesh), platform.activation_sharding(parallel.LOGICAL_RULES):
    q_spec, kv_spec, segment_spec = platform.kernel_specs(8, heads, kv_heads)
  assert (q_spec, kv_spec) == want and segment_spec == P(('data', 'fsdp'), None)
  inner = tuple((name, None if name == 'activation_batch' else axes) for name, axes in parallel.LOGICAL_RULES)
  with jax.sharding.use_abstract_mesh(mesh), platform.activation_sharding(inner):
    assert platform.kernel_specs(8, heads, kv_heads)[2] == P(None, None)
  assert platform.kernel_specs(8, heads, kv_heads) is None  # outside a mesh


def _eight_devices():
  """Subprocess body (8 CPU devices): splash's loss and gradients on a (2, 2, 2) mesh under the model's
  activation rules, called directly (the eval step's way) and inside a vmap over the 4 batch shards with
  `spmd_axis_name` (the train step's), against the same on one device; and whether each program holds the
  shard_map (a manual computation). On the CPU XLA could partition the interpreted kernel by itself: only the
  program shows that the shard_map is there, which a TPU needs (test below)."""
  from transformer import train

  batch, heads, kv_heads = 8, 4, 2
  q, k, v, w = _inputs(batch, LENGTH, heads, kv_heads, 16, 8, seed=9)
  segment_ids = jnp.concatenate([PADDED_AND_PACKED] * (batch // 2))

  def loss_and_grads(q, k, v, w, segment_ids):
    attend = lambda q, k, v: splash.attention(q, k, v, segment_ids, segment_ids, causal=True, window=150)
    return _loss_and_grads(attend, q, k, v, w)

  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  config = tiny(num_heads=heads, num_kv_heads=kv_heads)
  layout = train.MeshLayout(mesh, parallel.BATCH_AXES, parallel.activation_rules(config, mesh))

  def direct(*args):
    with train.sharding_context(layout):
      return loss_and_grads(*args)

  def per_shard(*args):
    with train.sharding_context(layout):

      def one_shard(*args):
        with platform.activation_sharding(layout.inner_rules()):
          return loss_and_grads(*args)

      split = lambda x: x.reshape((layout.shards, -1) + x.shape[1:])
      loss, grads = jax.vmap(one_shard, spmd_axis_name=layout.batch_axes)(*map(split, args))
      return loss.sum(), jax.tree.map(lambda x: x.reshape((batch,) + x.shape[2:]), grads)

  args = (q, k, v, w, segment_ids)
  want = jax.jit(loss_and_grads)(*args)
  rows = jax.sharding.NamedSharding(mesh, P(parallel.BATCH_AXES))
  out = {}
  for step in (direct, per_shard):
    jitted = jax.jit(step, in_shardings=(rows,) * len(args))
    got = jitted(*args)
    out[step.__name__] = {
      'manual': 'manual_computation' in jitted.lower(*args).as_text(),
      'loss': [float(got[0]), float(want[0])],
      'grads': [float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(got[1], want[1])],
    }
  print(json.dumps(out))


@pytest.mark.slow(25)
def test_on_eight_devices_the_sharded_kernel_equals_one_device():
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(__file__)]),
    XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8',
  )
  proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(results) == {'direct', 'per_shard'}
  for name, result in results.items():
    assert result['manual'], name
    got, want = result['loss']
    assert got == pytest.approx(want, rel=1e-5), name
    assert max(result['grads']) < 1e-5, (name, result['grads'])


_TPU_REASON = accelerators.parse('v5e-8').unavailable()


@pytest.mark.skipif(bool(_TPU_REASON), reason=_TPU_REASON or '')
@pytest.mark.slow(15)
def test_the_tpu_train_step_runs_the_mosaic_kernel_on_each_chips_rows_and_heads(tmp_path):
  """A tiny model's train step with attention_impl=splash compiled for v5e-8 on a (2, 2, 2) mesh: the kernel is
  a Mosaic custom call (forward, dq and dk/dv per layer) whose output holds each chip's 4 of 16 rows and 2 of 4
  heads (without the shard_map XLA gathers every row and head to every chip)."""
  from test_compile import small, train_report

  config = small(mesh=(2, 2, 2), seq_len=256, attention_impl='splash', num_kv_heads=2)
  report = train_report(config, workdir=tmp_path)
  assert report['steps']['train']['fits']
  text = (tmp_path / 'train.hlo.txt').read_text()
  outputs = re.findall(r'= \(?(.*?)\)? custom-call\(.*custom_call_target="tpu_custom_call"', text)
  assert len(outputs) == 2 * 3, outputs  # 2 layers x (forward, dq, dk/dv)
  forward = [o for o in outputs if 'f32[4,2,256,128]' in o]  # the forward's softmax statistics per lane
  assert len(forward) == 2 and all('bf16[4,2,256,16]' in o for o in forward), outputs


if __name__ == '__main__':
  _eight_devices()
