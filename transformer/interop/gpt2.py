"""GPT-2 (Radford et al., 2019) <-> config.model: decoder-only, learned positions, pre-LN LayerNorm, GELU (tanh
approximation), biases everywhere, unscaled token embeddings, tied (or untied) output layer.

GPT-2's `Conv1D` stores `[in, out]` (not `Linear`'s `[out, in]`), its fused `c_attn` the query, key and value
side by side, each heads-major."""

import numpy as np

from transformer.interop import common

MODEL_TYPE = 'gpt2'
ARCHITECTURE = 'GPT2LMHeadModel'
_F = 'GPT-2'


def model_config(hf: dict) -> dict:
  """config.model's settings for a Hugging Face GPT-2 `config.json`."""
  for setting, expected in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False)):
    if hf.get(setting, expected) != expected:
      raise common.unsupported_hf(_F, setting, hf[setting], f'only {expected} is expressed')
  if hf.get('add_cross_attention', False):
    raise common.unsupported_hf(_F, 'add_cross_attention', True, 'a decoder-only model has no cross-attention')
  d_model = hf['n_embd']
  return dict(
    kind='decoder_only',
    vocab_size=hf['vocab_size'],
    num_decoder_layers=hf['n_layer'],
    d_model=d_model,
    d_ff=hf.get('n_inner') or 4 * d_model,
    num_heads=hf['n_head'],
    positional='learned',
    max_len=hf['n_positions'],
    norm_position='pre',
    norm_type='layernorm',
    norm_epsilon=float(hf.get('layer_norm_epsilon', 1e-5)),
    activation=common.activation_from_hf(_F, 'activation_function', hf.get('activation_function', 'gelu_new')),
    attention_bias=True,
    scale_embeddings=False,
    tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
    dropout_rate=float(hf.get('resid_pdrop', 0.1)),
    attention_dropout_rate=float(hf.get('attn_pdrop', 0.1)),
  )


def hf_config(cfg) -> dict:
  """A Hugging Face GPT-2 `config.json` for `cfg`; a setting GPT-2 cannot express is a ConfigError naming it."""
  common.require(
    _F,
    cfg,
    dict(positional='learned', norm_position='pre', norm_type='layernorm', attention_bias=True, scale_embeddings=False),
  )
  common.require_full_heads(_F, cfg)
  return dict(
    architectures=[ARCHITECTURE],
    model_type=MODEL_TYPE,
    vocab_size=cfg.vocab_size,
    n_layer=cfg.num_decoder_layers,
    n_embd=cfg.d_model,
    n_inner=cfg.d_ff,
    n_head=cfg.num_heads,
    n_positions=cfg.max_len,
    layer_norm_epsilon=cfg.norm_epsilon,
    activation_function=common.activation_to_hf(_F, cfg.activation),
    tie_word_embeddings=cfg.tie_embeddings,
    resid_pdrop=cfg.dropout_rate,
    embd_pdrop=cfg.dropout_rate,
    attn_pdrop=cfg.attention_dropout_rate,
    scale_attn_weights=True,
  )


def params_from_hf(tensors: dict, cfg) -> dict:
  """Our flat parameters (`a/b/c` paths) from GPT-2's tensors (popped from `tensors`)."""
  tensors.update({k[len('transformer.') :]: tensors.pop(k) for k in list(tensors) if k.startswith('transformer.')})
  for name in [k for k in tensors if k.endswith(('.attn.bias', '.attn.masked_bias'))]:
    del tensors[name]  # the causal-mask buffers older versions saved
  get = lambda name: common.take(tensors, name, _F)
  d, heads, head_dim = cfg.d_model, cfg.num_heads, cfg.head_dim_qk
  flat = {'embedding/embedding': get('wte.weight'), 'decoder/embedder/position_embedding/embedding': get('wpe.weight')}
  for i in range(cfg.num_decoder_layers):
    h, layer = f'h.{i}.', {}
    qkv, qkv_bias = np.split(get(h + 'attn.c_attn.weight'), 3, axis=1), np.split(get(h + 'attn.c_attn.bias'), 3)
    for j, name in enumerate(('query', 'key', 'value')):
      layer[f'self_attention/{name}/kernel'] = qkv[j].reshape(d, heads, head_dim)
      layer[f'self_attention/{name}/bias'] = qkv_bias[j].reshape(heads, head_dim)
    layer['self_attention/out/kernel'] = get(h + 'attn.c_proj.weight').reshape(heads, head_dim, d)
    layer['self_attention/out/bias'] = get(h + 'attn.c_proj.bias')
    layer.update(common.prefixed('self_attention_norm', common.norm_from_hf(get, h + 'ln_1')))
    layer.update(common.prefixed('ffn_norm', common.norm_from_hf(get, h + 'ln_2')))
    layer['ffn/wi/kernel'], layer['ffn/wi/bias'] = get(h + 'mlp.c_fc.weight'), get(h + 'mlp.c_fc.bias')
    layer['ffn/wo/kernel'], layer['ffn/wo/bias'] = get(h + 'mlp.c_proj.weight'), get(h + 'mlp.c_proj.bias')
    flat.update(common.prefixed(f'decoder/stack/layer_{i}', layer))
  flat.update(common.prefixed('decoder/stack/final_norm', common.norm_from_hf(get, 'ln_f')))
  if not cfg.tie_embeddings:
    flat['decoder/output_embedding/embedding'] = get('lm_head.weight')
  return flat


def params_to_hf(flat: dict, cfg) -> dict:
  """GPT-2's tensors (`GPT2LMHeadModel` names) from our flat parameters."""
  out = {'transformer.wte.weight': flat['embedding/embedding']}
  out['transformer.wpe.weight'] = flat['decoder/embedder/position_embedding/embedding']
  for i in range(cfg.num_decoder_layers):
    layer, h = common.sub(flat, f'decoder/stack/layer_{i}'), f'transformer.h.{i}.'
    names = ('query', 'key', 'value')
    kernels = [layer[f'self_attention/{n}/kernel'].reshape(cfg.d_model, -1) for n in names]
    out[h + 'attn.c_attn.weight'] = np.concatenate(kernels, axis=1)
    out[h + 'attn.c_attn.bias'] = np.concatenate([layer[f'self_attention/{n}/bias'].reshape(-1) for n in names])
    out[h + 'attn.c_proj.weight'] = layer['self_attention/out/kernel'].reshape(-1, cfg.d_model)
    out[h + 'attn.c_proj.bias'] = layer['self_attention/out/bias']
    out.update(common.norm_to_hf(common.sub(layer, 'self_attention_norm'), h + 'ln_1'))
    out.update(common.norm_to_hf(common.sub(layer, 'ffn_norm'), h + 'ln_2'))
    out[h + 'mlp.c_fc.weight'], out[h + 'mlp.c_fc.bias'] = layer['ffn/wi/kernel'], layer['ffn/wi/bias']
    out[h + 'mlp.c_proj.weight'], out[h + 'mlp.c_proj.bias'] = layer['ffn/wo/kernel'], layer['ffn/wo/bias']
  out.update(common.norm_to_hf(common.sub(flat, 'decoder/stack/final_norm'), 'transformer.ln_f'))
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = flat['decoder/output_embedding/embedding']
  return out
