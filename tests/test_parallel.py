"""Sharded (jit over a mesh), pmap'd and multi-process training compute what one device computes.

Multi-device cases run this file as a script in subprocesses (see `__main__`): the device count must be
in XLA_FLAGS before JAX starts. Each subprocess trains several layouts, to start JAX as few times as
possible; the one-device references (the plain `train` functions) run in the pytest process meanwhile.
"""

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny

from transformer import models, optim, parallel, train
from transformer.config import ConfigError, MeshConfig, TrainConfig

STEPS = 3
BATCH = 16
# Decoder-only with multi-query attention: kv_heads=1 cannot be split over 'tensor' (replicated instead).
# Encoder-decoder with scanned, rematerialised layers: its parameters get a leading 'layers' axis.
# Both with d_ff 4x d_model (the paper's ratio): the FFN's weight gradient takes `layers`' wide-kernel path.
WIDE_FFN = dict(d_ff=128)
MODELS = {
  'decoder_only': dict(num_kv_heads=1, **WIDE_FFN),
  'encoder_decoder': dict(scan_layers=True, remat='full', **WIDE_FFN),
}


def _setup(kind, parallelism='jit', mesh=(-1, 1, 1), dropout=0.0, accum=1):
  """(train_config, model, optimizer, schedule): the arguments of `parallel.make_runner`."""
  model = models.build_model(tiny(kind=kind, dropout_rate=dropout, attention_dropout_rate=dropout, **MODELS[kind]))
  # adamw (masked weight decay) chained after clipping: the optimizer state shardings must follow.
  config = TrainConfig.from_config(
    dict(
      batch_size=BATCH,
      optimizer='adamw',
      learning_rate=3e-3,
      warmup_steps=1,
      weight_decay=0.1,
      grad_clip=1.0,
      grad_accum_steps=accum,
      parallelism=parallelism,
      mesh=dict(zip(('data', 'fsdp', 'tensor'), mesh)),
    )
  )
  d_model = model.config.d_model
  return config, model, optim.make_optimizer(config, d_model), optim.learning_rate_schedule(config, d_model)


def _batch(kind):
  """A fixed global batch with padding: row i of the targets ends with i % 12 padding tokens."""
  rng = np.random.default_rng(0)
  targets = rng.integers(2, 37, (BATCH, 12)).astype(np.int32)
  targets[np.arange(12)[None, :] >= 12 - np.arange(BATCH)[:, None] % 12] = 0
  batch = {'targets': targets}
  if kind == 'encoder_decoder':
    inputs = rng.integers(2, 37, (BATCH, 10)).astype(np.int32)
    inputs[np.arange(10)[None, :] >= 10 - np.arange(BATCH)[:, None] % 12 // 2] = 0
    batch['inputs'] = inputs
  return batch


def _leaves(tree):
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _reference(kind, dropout=0.0):
  """One device, no Runner: the plain pure functions of `train`."""
  config, model, optimizer, schedule = _setup(kind, dropout=dropout)
  state = jax.jit(lambda: train.init_state(model, optimizer, 0))()
  step = jax.jit(train.make_train_step(model, optimizer, schedule, config))
  batch = _batch(kind)
  losses, norms = [], []
  for _ in range(STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
    norms.append(float(metrics['param_norm']))
  sums = jax.jit(train.make_eval_step(model))(state.params, batch)
  return dict(
    losses=losses,
    param_norms=norms,
    eval={k: float(v) for k, v in sums.items()},
    params={k: np.asarray(v) for k, v in _leaves(state.params).items()},
  )


def _run(kind, parallelism, mesh, dropout=0.0, accum=1):
  """Trains through a `Runner`, feeding this process only its own rows of the global batch."""
  runner = parallel.make_runner(*_setup(kind, parallelism, mesh, dropout, accum))
  local = runner.local_batch_size()
  start = jax.process_index() * local
  batch = {k: v[start : start + local] for k, v in _batch(kind).items()}
  state = runner.init_state(0)
  out = dict(local_batch_size=local, losses=[], param_norms=[])
  if runner.mesh is not None:  # where a few parameters and their Adam moments live
    out['specs'] = {
      name: tuple(leaf.sharding.spec)
      for name, leaf in _leaves(state).items()
      if name.endswith(("['wi']['kernel']", "['key']['kernel']", "['embedding']['embedding']"))
    }
  for step in range(STEPS):
    if step == STEPS - 1:  # a round trip through the checkpoint layout must change nothing
      checkpoint = runner.to_checkpoint(state)
      out['checkpoint_layout_ok'] = all(
        jax.tree.leaves(
          jax.tree.map(
            lambda x, a: x.shape == a.shape and x.dtype == a.dtype and x.sharding.is_equivalent_to(a.sharding, x.ndim),
            checkpoint,
            runner.abstract_state(),
          )
        )
      )
      state = runner.from_checkpoint(checkpoint)
    state, metrics = runner.train_step(state, batch)
    out['losses'].append(float(metrics['loss']))
    out['param_norms'].append(float(metrics['param_norm']))
  out['eval'] = {k: float(v) for k, v in runner.eval_step(state, batch).items()}
  params = runner.to_checkpoint(state).params
  if all(leaf.is_fully_addressable for leaf in jax.tree.leaves(params)):
    out['params'] = {k: np.asarray(v) for k, v in _leaves(params).items()}
  return out


def _worker(job):
  """Subprocess body: train each layout of `job['runs']` (multi-process runs are in test_scale.py)."""
  results = {'process_count': jax.process_count(), 'device_count': jax.device_count()}
  for kind, parallelism, mesh, dropout, accum in job['runs']:
    results[kind, parallelism, tuple(mesh), dropout, accum] = _run(kind, parallelism, mesh, dropout, accum)
  with open(job['out'], 'wb') as f:
    pickle.dump(results, f)


def _launch(job, devices, tmp_path, name):
  job = dict(job, out=str(tmp_path / f'{name}.pkl'))
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}',
  )
  return job['out'], subprocess.Popen(
    [sys.executable, __file__, json.dumps(job)], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
  )


def _collect(launched, timeout=300):
  """Waits for every subprocess (killing all if one fails, so none hangs in a collective).

  No layout may make XLA rematerialise a whole array to change its sharding (its warning goes to
  stderr): the model's activations carry their own sharding constraints."""
  results = []
  try:
    for out, proc in launched:
      stdout, stderr = proc.communicate(timeout=timeout)
      assert proc.returncode == 0, f'subprocess failed:\n{stdout}\n{stderr[-5000:]}'
      assert 'rematerializ' not in stderr, stderr[-5000:]
      with open(out, 'rb') as f:
        results.append(pickle.load(f))
  finally:
    for _, proc in launched:
      if proc.poll() is None:
        proc.kill()
  return results


def _assert_same(run, reference, params=True):
  np.testing.assert_allclose(run['losses'], reference['losses'], rtol=1e-5)
  np.testing.assert_allclose(run['param_norms'], reference['param_norms'], rtol=1e-5)
  for key, value in reference['eval'].items():
    np.testing.assert_allclose(run['eval'][key], value, rtol=1e-5, err_msg=key)
  if params:
    assert run['params'].keys() == reference['params'].keys()
    # Adam divides by sqrt(v): float32 reordering noise in a near-zero gradient can move a parameter
    # by a few % of the learning rate (3e-3); anything wrong would move the losses and most entries.
    for name, value in reference['params'].items():
      np.testing.assert_allclose(run['params'][name], value, rtol=1e-5, atol=1e-4, err_msg=name)
  assert run['checkpoint_layout_ok']


# (kind, parallelism, mesh, dropout, accum), each against one device without accumulation. Dropout
# (residual and attention) is drawn per example from its index in the global batch, so neither the
# layout (device index under pmap, shard under jit) nor the micro-batch changes a mask; accumulation
# normalises by the whole batch's tokens.
# (8,1,1), (1,1,8), pmap and 2 processes (jit on (2,2,2), and pmap) run end to end through launch.py in
# test_scale.py; these two meshes are tested here only (the launch.py path around the Runner is the same).
LAYOUTS = [
  ('decoder_only', 'jit', (2, 2, 2), 0.1, 2),
  ('encoder_decoder', 'jit', (1, 2, 4), 0.1, 2),
]


@pytest.mark.slow(39)
def test_jit_meshes_on_8_devices_match_one_device(tmp_path):
  launched = _launch(dict(runs=LAYOUTS), 8, tmp_path, 'eight')
  # This process has one device: its references are computed while the subprocess runs.
  assert jax.device_count() == 1
  try:
    references = {
      (kind, dropout): _reference(kind, dropout)
      for kind, _, _, dropout, _ in LAYOUTS + [('decoder_only', '', (), 0.0, 1)]
    }
  except BaseException:
    launched[1].kill()
    raise
  assert references['decoder_only', 0.1]['losses'] != references['decoder_only', 0.0]['losses']  # dropout on
  [results] = _collect([launched])
  assert results['device_count'] == 8
  for kind, parallelism, mesh, dropout, accum in LAYOUTS:
    run = results[kind, parallelism, mesh, dropout, accum]
    assert run['local_batch_size'] == BATCH
    _assert_same(run, references[kind, dropout])

  # The rules: 'embed' over fsdp, 'mlp' / 'heads' over tensor, 'layers' never; a dimension the mesh
  # axis does not divide (vocab 37, kv_heads 1, on tensor=2) stays whole. Adam's moments follow params.
  specs = results['decoder_only', 'jit', (2, 2, 2), 0.1, 2]['specs']
  wi = "['decoder']['stack']['layer_0']['ffn']['wi']['kernel']"
  key = "['decoder']['stack']['layer_0']['self_attention']['key']['kernel']"
  assert specs['.params' + wi] == ('fsdp', 'tensor')
  assert specs['.params' + key] == ('fsdp', None, None)
  assert specs[".params['embedding']['embedding']"] == (None, 'fsdp')
  assert specs['.opt_state[1][0].mu' + wi] == specs['.opt_state[1][0].nu' + wi] == ('fsdp', 'tensor')
  specs = results['encoder_decoder', 'jit', (1, 2, 4), 0.1, 2]['specs']
  assert specs[".params['encoder']['stack']['layers']['ffn']['wi']['kernel']"] == (None, 'fsdp', 'tensor')


def _mesh(data, fsdp=1, tensor=1):
  return dict(data=data, fsdp=fsdp, tensor=tensor)


@pytest.mark.parametrize(
  'mesh,message',
  [
    (_mesh(2), r'config.train.mesh.data=2, .* has 2 devices, but the device count is 1'),
    (_mesh(-1, 2), r'config.train.mesh.fsdp=2.*the device count 1 is not a multiple of .* product 2'),
    (_mesh(-1, -1), r'at most one may be -1'),
    (_mesh(0), r'config.train.mesh.data=0.* positive'),
  ],
)
def test_bad_mesh_names_the_keys_and_the_device_count(mesh, message):
  with pytest.raises(ConfigError, match=message):
    parallel.make_mesh(MeshConfig(**mesh))


def test_mesh_fills_the_minus_one_axis():
  assert dict(parallel.make_mesh(MeshConfig(**_mesh(1, -1))).shape) == {
    'data': 1,
    'fsdp': jax.device_count(),
    'tensor': 1,
  }


@pytest.mark.parametrize(
  'overrides,message',
  [
    (dict(batch_size=3, grad_accum_steps=2), r'config.train.batch_size=3 must be divisible by .* = 2'),
    (dict(batch_size=3, grad_accum_steps=2, parallelism='pmap'), r'config.train.batch_size=3 .*pmap'),
    (dict(parallelism='tpu'), r"parallelism='tpu' is not one of: jit, pmap"),
  ],
)
def test_bad_runner_settings(overrides, message):
  config, model, optimizer, schedule = _setup('decoder_only')
  with pytest.raises(ConfigError, match=message):  # parallelism is refused by TrainConfig, the rest by the runner
    parallel.make_runner(dataclasses.replace(config, **overrides), model, optimizer, schedule)


if __name__ == '__main__':
  _worker(json.loads(sys.argv[1]))
