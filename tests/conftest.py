import atexit
import fcntl
import hashlib
import os
import shutil
import tempfile

# Tests compile hundreds of tiny XLA programs and time none: skip LLVM's expensive optimisations (about a
# third of the suite's time) and use XLA CPU's older loop emitters, not its MLIR fusion emitters (a tiny
# model's train step compiles in 3 s instead of 7). Set before JAX starts; subprocesses inherit it.
os.environ['XLA_FLAGS'] = ' '.join(
  [
    os.environ.get('XLA_FLAGS', ''),
    '--xla_backend_optimization_level=0',
    '--xla_llvm_disable_expensive_passes=true',
    '--xla_cpu_use_fusion_emitters=false',
  ]
).strip()
# Tests train the same programs again and again (a reference, then a resume, in one process or several).
# JAX's persistent cache, keyed by the program, flags and devices, lets a later test load what an earlier one
# compiled: one folder per session, which the xdist workers and the scripts tests start inherit (launch.py
# runs use the library's own cache, experiment/run.py). Faster compiles are not worth the disk write.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jax-compilation-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')

import pytest  # noqa: E402

from transformer.config import ModelConfig  # noqa: E402

# The peak FLOP/s test runs configure for MFU: otherwise each CPU run times a 2048^2 matmul (about 2 s) to
# measure one. Tests compare no MFU; tests/test_metrics.py and one bench test cover the measured basis.
PEAK_FLOPS = 1e12


def tiny(**overrides) -> ModelConfig:
  """A model small enough to compile in a second; float32 and no dropout unless overridden."""
  values = dict(
    kind='decoder_only',
    vocab_size=37,
    num_encoder_layers=2,
    num_decoder_layers=2,
    d_model=32,
    d_ff=48,
    num_heads=4,
    dropout_rate=0.0,
    max_len=32,
    attention_impl='reference',
  )
  values.update(overrides)
  return ModelConfig(**values)


@pytest.fixture
def tiny_config():
  return tiny


def pytest_collection_modifyitems(items):
  """The tests marked `slow(seconds)` first, longest first: xdist deals tests out in collection order, so a
  long test collected last would keep one worker busy for minutes after the other ran out of tests."""
  items.sort(key=lambda item: -(item.get_closest_marker('slow').args[0] if item.get_closest_marker('slow') else 0))


@pytest.fixture(scope='session')
def shared(tmp_path_factory):
  """`shared(name, key, make)`: the directory `make(directory)` filled for this `key`, made once per test
  session: the xdist workers share it (the first to ask makes it under a file lock, the other waits for
  it). For runs only compared against (an uninterrupted reference run): treat the directory as read-only."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # the session's folder, above each worker's own
  (root / 'shared').mkdir(exist_ok=True)

  def get(name: str, key, make):
    directory = root / 'shared' / f'{name}-{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}'
    done = directory.with_name(directory.name + '.done')
    with open(directory.with_name(directory.name + '.lock'), 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not done.exists():
        shutil.rmtree(directory, ignore_errors=True)  # a make that failed (in either worker) starts again
        make(directory)
        done.touch()
    return directory

  return get
