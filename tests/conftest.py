import os

# Tests compile hundreds of tiny XLA programs and time none: skip LLVM's expensive optimisations
# (about a third of the suite's time). Set before JAX starts; subprocesses inherit it.
os.environ['XLA_FLAGS'] = ' '.join(
  [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true']
).strip()

import pytest  # noqa: E402

from transformer.config import ModelConfig  # noqa: E402


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
