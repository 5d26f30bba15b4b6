"""What `launch.py` runs, given a resolved config.

Imports JAX and the rest of the library inside the functions: `launch.py` reads `MODES` before it parses
flags, and `--help` stays fast."""

import os
import time

MODES = ('train', 'eval', 'decode', 'sweep', 'bench', 'compile', 'prepare', 'status', 'export')


def dry_run(config) -> str:
  """Builds the model abstractly (`jax.eval_shape`: nothing allocated) and tabulates its parameters."""
  import jax

  from transformer import models, setup, summary
  from transformer.tasks import common

  common.check_ignored(config)  # as training would: a data setting this corpus never reads is an error
  start = time.perf_counter()
  model_config = setup.resolve(config).model_config  # config.model.vocab_size: no tokenizer is trained
  model = models.build_model(model_config)
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  seconds = time.perf_counter() - start
  header = (
    f'{model_config.kind}: N={model_config.num_encoder_layers}/{model_config.num_decoder_layers} '
    f'd_model={model_config.d_model} d_ff={model_config.d_ff} h={model_config.num_heads} '
    f'd_k={model_config.head_dim_qk} d_v={model_config.head_dim_v} kv_heads={model_config.kv_heads} '
    f'vocab={model_config.vocab_size} (built abstractly in {seconds:.1f}s)'
  )
  return header + '\n' + summary.param_table(params)


def enable_compilation_cache():
  """JAX's persistent cache: a re-run or resume of the same shapes skips XLA compilation. JAX's own
  variables, when set, win over the defaults here (the tests share one folder and cache shorter compiles)."""
  import jax

  directory = os.environ.get('TRANSFORMER_COMPILATION_CACHE') or os.environ.get(
    'JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.expanduser('~'), '.cache', 'transformer-jax')
  )
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update(
    'jax_persistent_cache_min_compile_time_secs',
    float(os.environ.get('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', 1.0)),
  )


def run(config, mode: str, workdir: str, overrides: tuple[str, ...] = ()):
  """Runs `mode` on a resolved config (None for 'status'). `overrides` are the command line's `--config.*`
  flags, which a sweep passes on to every variant."""
  if mode == 'status':  # files and the scheduler only: no config needed, JAX not started
    from transformer.experiment import status

    print(status.status_text(workdir), flush=True)
    return None
  from transformer.config import ConfigError

  if mode == 'prepare':  # tokenizing only: JAX not started
    from transformer.experiment import prepare

    return prepare.run_prepare(config)
  enable_compilation_cache()
  if 'sweep' in config and mode not in ('sweep', 'bench', 'compile'):  # else it would train its base quietly
    raise ConfigError(
      f'This config is a sweep: run it with --mode sweep (not --mode {mode}; --mode bench compares its '
      "variants' speed, --mode compile their memory on accelerators), or give its base experiment file to "
      '--mode {mode}.'.replace('{mode}', mode)
    )
  if mode == 'train':
    from transformer import loop  # the engine's imports (orbax, grain) are not needed for a dry run

    return loop.train_and_evaluate(config, workdir)
  if mode == 'eval':
    from transformer import loop

    return loop.evaluate_checkpoint(config, workdir)
  if mode == 'decode':
    from transformer import loop

    return loop.decode_checkpoint(config, workdir)
  if mode == 'export':
    from transformer.interop import export

    return export.run_export(config, workdir)
  if mode == 'sweep':
    from transformer.experiment import sweep

    return sweep.run_sweep(config, workdir, overrides)
  if mode == 'bench':
    if 'sweep' in config:  # its variants side by side, timed in alternating rounds
      from transformer.experiment import bench_sweep

      return bench_sweep.run_bench_sweep(config, workdir, overrides)
    from transformer.experiment import bench

    return bench.run_bench(config)
  if mode == 'compile':
    from transformer.experiment import aot

    return aot.run_compile(config, workdir, overrides)
  raise ValueError(f'Unknown mode {mode!r}; expected one of {MODES}.')
