"""What the family mappings share: the layout conversions between PyTorch's `Linear` weights and ours, and the
errors that name a Hugging Face setting or one of ours."""

import numpy as np

from transformer.config import ConfigError

# Hugging Face activation names <-> config.model.activation (the non-gated ones).
ACTIVATIONS_FROM_HF = {
  'relu': 'relu',
  'gelu_new': 'gelu',  # the tanh approximation: jax.nn.gelu's default
  'gelu_pytorch_tanh': 'gelu',
  'gelu': 'gelu_exact',
  'silu': 'silu',
  'swish': 'silu',
}
ACTIVATIONS_TO_HF = {'relu': 'relu', 'gelu': 'gelu_new', 'gelu_exact': 'gelu', 'silu': 'silu'}


def unsupported_hf(family: str, setting: str, value, expected: str) -> ConfigError:
  return ConfigError(
    f'Hugging Face {family} setting {setting}={value!r} has no equivalent in config.model: {expected}. '
    'Only checkpoints the model can express exactly are imported.'
  )


def unsupported_ours(family: str, key: str, value, expected: str) -> ConfigError:
  return ConfigError(
    f'config.model.{key}={value!r} has no Hugging Face {family} equivalent ({expected}): export needs a model '
    f'that {family} expresses exactly.'
  )


def require(family: str, cfg, settings: dict) -> None:
  """An `unsupported_ours` error for the first `config.model` key of `settings` whose value differs."""
  for key, value in settings.items():
    if getattr(cfg, key) != value:
      raise unsupported_ours(family, key, getattr(cfg, key), f'{family} needs {value!r}')


def require_full_heads(family: str, cfg) -> None:
  """Errors unless every head is a whole attention head: no grouped keys and values, d_model // num_heads wide."""
  if cfg.kv_heads != cfg.num_heads:
    raise unsupported_ours(family, 'num_kv_heads', cfg.num_kv_heads, f'{family} has no grouped-query attention: 0')
  for key in ('d_k', 'd_v'):
    if getattr(cfg, key) not in (0, cfg.d_model // cfg.num_heads):
      raise unsupported_ours(family, key, getattr(cfg, key), f'{family} heads are d_model // num_heads wide: 0')


def activation_from_hf(family: str, setting: str, name: str) -> str:
  if name not in ACTIVATIONS_FROM_HF:
    raise unsupported_hf(family, setting, name, f'one of {", ".join(ACTIVATIONS_FROM_HF)}')
  return ACTIVATIONS_FROM_HF[name]


def activation_to_hf(family: str, activation: str) -> str:
  if activation not in ACTIVATIONS_TO_HF:
    raise unsupported_ours(family, 'activation', activation, f'one of {", ".join(ACTIVATIONS_TO_HF)}')
  return ACTIVATIONS_TO_HF[activation]


# PyTorch's Linear holds [out, in]; our kernels are [in, ...out axes].
def linear_to_heads(weight, heads: int, head_dim: int):
  """A q/k/v projection `[heads * head_dim, d_model]` (heads major) -> our kernel `[d_model, heads, head_dim]`."""
  return np.ascontiguousarray(weight.T.reshape(weight.shape[1], heads, head_dim))


def heads_to_linear(kernel):
  """Our q/k/v kernel `[d_model, heads, head_dim]` -> PyTorch's `[heads * head_dim, d_model]`."""
  return np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T)


def linear_from_heads(weight, heads: int, head_dim: int):
  """An output projection `[d_model, heads * head_dim]` -> our kernel `[heads, head_dim, d_model]`."""
  return np.ascontiguousarray(weight.T.reshape(heads, head_dim, weight.shape[0]))


def heads_from_linear(kernel):
  """Our output kernel `[heads, head_dim, d_model]` -> PyTorch's `[d_model, heads * head_dim]`."""
  return np.ascontiguousarray(kernel.reshape(-1, kernel.shape[-1]).T)


def transpose(weight):
  return np.ascontiguousarray(weight.T)


def take(tensors: dict, name: str, family: str):
  """`tensors[name]` (popped, so that what is left over can be reported); a missing one is a ConfigError."""
  if name not in tensors:
    raise ConfigError(f'The Hugging Face {family} checkpoint has no tensor {name!r}: it is incomplete or not {family}.')
  return tensors.pop(name)


def attention_from_hf(get, prefix: str, names: tuple, cfg, bias: bool) -> dict:
  """Our `query/key/value/out` parameters from PyTorch `Linear`s named `prefix + names[i]` (+ `.weight`,
  `.bias`); `get(name)` reads one tensor."""
  q, k, v, o = names
  heads, kv_heads, d_qk, d_v = cfg.num_heads, cfg.kv_heads, cfg.head_dim_qk, cfg.head_dim_v
  out = {
    'query/kernel': linear_to_heads(get(f'{prefix}{q}.weight'), heads, d_qk),
    'key/kernel': linear_to_heads(get(f'{prefix}{k}.weight'), kv_heads, d_qk),
    'value/kernel': linear_to_heads(get(f'{prefix}{v}.weight'), kv_heads, d_v),
    'out/kernel': linear_from_heads(get(f'{prefix}{o}.weight'), heads, d_v),
  }
  if bias:
    out['query/bias'] = get(f'{prefix}{q}.bias').reshape(heads, d_qk)
    out['key/bias'] = get(f'{prefix}{k}.bias').reshape(kv_heads, d_qk)
    out['value/bias'] = get(f'{prefix}{v}.bias').reshape(kv_heads, d_v)
    out['out/bias'] = get(f'{prefix}{o}.bias')
  return out


def attention_to_hf(params: dict, prefix: str, names: tuple, bias: bool) -> dict:
  """The inverse of `attention_from_hf`: `params` holds `query/kernel`, ... of one attention layer."""
  q, k, v, o = names
  out = {
    f'{prefix}{q}.weight': heads_to_linear(params['query/kernel']),
    f'{prefix}{k}.weight': heads_to_linear(params['key/kernel']),
    f'{prefix}{v}.weight': heads_to_linear(params['value/kernel']),
    f'{prefix}{o}.weight': heads_from_linear(params['out/kernel']),
  }
  if bias:
    for ours, theirs in (('query', q), ('key', k), ('value', v), ('out', o)):
      out[f'{prefix}{theirs}.bias'] = np.ascontiguousarray(params[f'{ours}/bias'].reshape(-1))
  return out


def sub(flat: dict, prefix: str) -> dict:
  """The entries of a flat `a/b/c` dict under `prefix/`, with the prefix removed."""
  return {k[len(prefix) + 1 :]: v for k, v in flat.items() if k.startswith(prefix + '/')}


def prefixed(prefix: str, flat: dict) -> dict:
  return {f'{prefix}/{k}': v for k, v in flat.items()}


def norm_from_hf(get, name: str, with_bias: bool = True) -> dict:
  out = {'scale': get(f'{name}.weight')}
  if with_bias:
    out['bias'] = get(f'{name}.bias')
  return out


def norm_to_hf(params: dict, name: str) -> dict:
  out = {f'{name}.weight': params['scale']}
  if 'bias' in params:
    out[f'{name}.bias'] = params['bias']
  return out
