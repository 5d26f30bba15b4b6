"""Llama (Touvron et al., 2023; Llama 3.1's RoPE scaling) <-> config.model: decoder-only, pre-norm RMSNorm,
SwiGLU, RoPE with its base and `llama3` scaling, grouped-query attention, unscaled token embeddings, untied (or
tied) output layer, no biases (or `attention_bias`).

Hugging Face's Llama rotates feature pairs (i, i + head_dim / 2) (`rotate_half`), as `layers.apply_rope` does:
q_proj and k_proj map over without a permutation."""

from transformer.interop import common

MODEL_TYPE = 'llama'
ARCHITECTURE = 'LlamaForCausalLM'
_F = 'Llama'


def _rope(hf: dict) -> dict:
  """RoPE's settings, from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x)."""
  params = dict(hf.get('rope_parameters') or {})
  if not params:
    params = dict(hf.get('rope_scaling') or {})
    params.setdefault('rope_theta', hf.get('rope_theta', 10000.0))
  kind = params.get('rope_type', params.get('type', 'default'))
  setting = 'rope_parameters.rope_type' if 'rope_parameters' in hf else 'rope_scaling.rope_type'
  out = dict(rope_base=float(params.get('rope_theta', 10000.0)))
  if kind == 'llama3':
    out.update(
      rope_scaling='llama3',
      rope_scaling_factor=float(params['factor']),
      rope_low_freq_factor=float(params['low_freq_factor']),
      rope_high_freq_factor=float(params['high_freq_factor']),
      rope_original_max_len=int(params['original_max_position_embeddings']),
    )
  elif kind != 'default':
    raise common.unsupported_hf(_F, setting, kind, "config.model.rope_scaling has 'none' (default) and 'llama3'")
  return out


def model_config(hf: dict) -> dict:
  """config.model's settings for a Hugging Face Llama `config.json`."""
  if hf.get('hidden_act', 'silu') != 'silu':
    raise common.unsupported_hf(_F, 'hidden_act', hf['hidden_act'], 'activation=swiglu gates with silu')
  if hf.get('mlp_bias', False):
    raise common.unsupported_hf(_F, 'mlp_bias', True, 'the swiglu feed-forward block has no biases')
  d_model, heads = hf['hidden_size'], hf['num_attention_heads']
  head_dim = hf.get('head_dim') or d_model // heads
  return dict(
    kind='decoder_only',
    vocab_size=hf['vocab_size'],
    num_decoder_layers=hf['num_hidden_layers'],
    d_model=d_model,
    d_ff=hf['intermediate_size'],
    num_heads=heads,
    d_k=head_dim,
    d_v=head_dim,
    num_kv_heads=hf.get('num_key_value_heads') or heads,
    positional='rope',
    max_len=hf.get('max_position_embeddings', 2048),
    norm_position='pre',
    norm_type='rmsnorm',
    norm_epsilon=float(hf.get('rms_norm_eps', 1e-6)),
    activation='swiglu',
    attention_bias=bool(hf.get('attention_bias', False)),
    scale_embeddings=False,
    tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
    dropout_rate=0.0,
    attention_dropout_rate=float(hf.get('attention_dropout', 0.0)),
    **_rope(hf),
  )


def hf_config(cfg) -> dict:
  """A Hugging Face Llama `config.json` for `cfg`; a setting Llama cannot express is a ConfigError naming it."""
  common.require(
    _F,
    cfg,
    dict(positional='rope', norm_position='pre', norm_type='rmsnorm', activation='swiglu', scale_embeddings=False),
  )
  if cfg.head_dim_qk != cfg.head_dim_v:
    raise common.unsupported_ours(_F, 'd_v', cfg.d_v, f'Llama has one head_dim: d_v = d_k = {cfg.head_dim_qk}')
  rope = dict(rope_theta=cfg.rope_base, rope_type='default')
  if cfg.rope_scaling == 'llama3':
    rope.update(
      rope_type='llama3',
      factor=cfg.rope_scaling_factor,
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_len,
    )
  return dict(
    architectures=[ARCHITECTURE],
    model_type=MODEL_TYPE,
    vocab_size=cfg.vocab_size,
    num_hidden_layers=cfg.num_decoder_layers,
    hidden_size=cfg.d_model,
    intermediate_size=cfg.d_ff,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.kv_heads,
    head_dim=cfg.head_dim_qk,
    max_position_embeddings=cfg.max_len,
    rms_norm_eps=cfg.norm_epsilon,
    hidden_act='silu',
    attention_bias=cfg.attention_bias,
    mlp_bias=False,
    tie_word_embeddings=cfg.tie_embeddings,
    attention_dropout=cfg.attention_dropout_rate,
    rope_parameters=rope,  # transformers >= 5
    rope_theta=cfg.rope_base,  # transformers 4.x
    rope_scaling=None if cfg.rope_scaling == 'none' else {k: v for k, v in rope.items() if k != 'rope_theta'},
  )


_ATTENTION = ('q_proj', 'k_proj', 'v_proj', 'o_proj')


def params_from_hf(tensors: dict, cfg) -> dict:
  """Our flat parameters (`a/b/c` paths) from Llama's tensors (popped from `tensors`)."""
  tensors.update({k[len('model.') :]: tensors.pop(k) for k in list(tensors) if k.startswith('model.')})
  for name in [k for k in tensors if k.endswith('rotary_emb.inv_freq')]:
    del tensors[name]  # a buffer older versions saved: recomputed from rope_theta
  get = lambda name: common.take(tensors, name, _F)
  flat = {'embedding/embedding': get('embed_tokens.weight')}
  for i in range(cfg.num_decoder_layers):
    h, layer = f'layers.{i}.', {}
    attention = common.attention_from_hf(get, h + 'self_attn.', _ATTENTION, cfg, cfg.attention_bias)
    layer.update(common.prefixed('self_attention', attention))
    layer['self_attention_norm/scale'] = get(h + 'input_layernorm.weight')
    layer['ffn_norm/scale'] = get(h + 'post_attention_layernorm.weight')
    for ours, theirs in (('gate', 'gate_proj'), ('up', 'up_proj'), ('down', 'down_proj')):
      layer[f'ffn/{ours}/kernel'] = common.transpose(get(f'{h}mlp.{theirs}.weight'))
    flat.update(common.prefixed(f'decoder/stack/layer_{i}', layer))
  flat['decoder/stack/final_norm/scale'] = get('norm.weight')
  if not cfg.tie_embeddings:
    flat['decoder/output_embedding/embedding'] = get('lm_head.weight')
  return flat


def params_to_hf(flat: dict, cfg) -> dict:
  """Llama's tensors (`LlamaForCausalLM` names) from our flat parameters."""
  out = {'model.embed_tokens.weight': flat['embedding/embedding']}
  for i in range(cfg.num_decoder_layers):
    layer, h = common.sub(flat, f'decoder/stack/layer_{i}'), f'model.layers.{i}.'
    attention = common.sub(layer, 'self_attention')
    out.update(common.attention_to_hf(attention, h + 'self_attn.', _ATTENTION, cfg.attention_bias))
    out[h + 'input_layernorm.weight'] = layer['self_attention_norm/scale']
    out[h + 'post_attention_layernorm.weight'] = layer['ffn_norm/scale']
    for ours, theirs in (('gate', 'gate_proj'), ('up', 'up_proj'), ('down', 'down_proj')):
      out[f'{h}mlp.{theirs}.weight'] = common.transpose(layer[f'ffn/{ours}/kernel'])
  out['model.norm.weight'] = flat['decoder/stack/final_norm/scale']
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = flat['decoder/output_embedding/embedding']
  return out
