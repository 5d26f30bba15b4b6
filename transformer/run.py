"""What `launch.py` runs, given a resolved config."""

import time

import jax

from transformer import models, summary
from transformer.config import ModelConfig


def dry_run(config) -> str:
  """Builds the model abstractly (`jax.eval_shape`: nothing allocated) and tabulates its parameters."""
  start = time.perf_counter()
  model_config = ModelConfig.from_config(config.model)
  model = models.build_model(model_config)
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  seconds = time.perf_counter() - start
  header = (f'{model_config.kind}: N={model_config.num_encoder_layers}/{model_config.num_decoder_layers} '
            f'd_model={model_config.d_model} d_ff={model_config.d_ff} h={model_config.num_heads} '
            f'd_k={model_config.head_dim_qk} d_v={model_config.head_dim_v} kv_heads={model_config.kv_heads} '
            f'vocab={model_config.vocab_size} (built abstractly in {seconds:.1f}s)')
  return header + '\n' + summary.param_table(params)


def run(config, mode: str, workdir: str | None):
  raise NotImplementedError(
      f'--mode {mode} needs the training engine, which is not in this version yet: '
      'use --dry_run to build a model and count its parameters.')
