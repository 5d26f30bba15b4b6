"""Marian (Junczys-Dowmunt et al., 2018; the OPUS-MT models) <-> config.model: the paper's encoder-decoder:
post-LN LayerNorm, sinusoidal positions (sines then cosines: `sinusoidal_layout='split'`), one embedding shared by
source, target and the output layer, biases on every projection, token embeddings scaled by sqrt(d_model) or not
(`scale_embedding`).

Marian's LayerNorm epsilon is PyTorch's 1e-5, fixed; its `final_logits_bias` must be zero (config.model has no
output bias)."""

import numpy as np

from transformer.config import ConfigError
from transformer.interop import common

MODEL_TYPE = 'marian'
ARCHITECTURE = 'MarianMTModel'
_F = 'Marian'
_EPSILON = 1e-5  # torch.nn.LayerNorm's default, which Marian's layers use


def model_config(hf: dict) -> dict:
  """config.model's settings for a Hugging Face Marian `config.json`."""
  for ours, enc, dec in (
    ('d_ff', 'encoder_ffn_dim', 'decoder_ffn_dim'),
    ('num_heads', 'encoder_attention_heads', 'decoder_attention_heads'),
  ):
    if hf[enc] != hf[dec]:
      raise common.unsupported_hf(_F, dec, hf[dec], f'config.model.{ours} is one value for both stacks ({hf[enc]})')
  if hf.get('decoder_vocab_size') not in (None, hf['vocab_size']):
    raise common.unsupported_hf(_F, 'decoder_vocab_size', hf['decoder_vocab_size'], 'one vocabulary for both sides')
  for setting in ('share_encoder_decoder_embeddings', 'tie_word_embeddings'):
    if not hf.get(setting, True):
      raise common.unsupported_hf(_F, setting, False, 'config.model.tie_embeddings shares all three matrices')
  if hf.get('normalize_before', False):
    raise common.unsupported_hf(_F, 'normalize_before', True, 'Marian is post-LN')
  return dict(
    kind='encoder_decoder',
    vocab_size=hf['vocab_size'],
    num_encoder_layers=hf['encoder_layers'],
    num_decoder_layers=hf['decoder_layers'],
    d_model=hf['d_model'],
    d_ff=hf['encoder_ffn_dim'],
    num_heads=hf['encoder_attention_heads'],
    positional='sinusoidal',
    sinusoidal_layout='split',
    max_len=hf['max_position_embeddings'],
    norm_position='post',
    norm_type='layernorm',
    norm_epsilon=_EPSILON,
    activation=common.activation_from_hf(_F, 'activation_function', hf.get('activation_function', 'gelu')),
    attention_bias=True,
    scale_embeddings=bool(hf.get('scale_embedding', False)),
    tie_embeddings=True,
    dropout_rate=float(hf.get('dropout', 0.1)),
    attention_dropout_rate=float(hf.get('attention_dropout', 0.0)),
  )


def hf_config(cfg) -> dict:
  """A Hugging Face Marian `config.json` for `cfg`; a setting Marian cannot express is a ConfigError naming it."""
  common.require(
    _F,
    cfg,
    dict(
      positional='sinusoidal',
      sinusoidal_layout='split',
      norm_position='post',
      norm_type='layernorm',
      norm_epsilon=_EPSILON,
      attention_bias=True,
      tie_embeddings=True,
    ),
  )
  common.require_full_heads(_F, cfg)
  return dict(
    architectures=[ARCHITECTURE],
    model_type=MODEL_TYPE,
    vocab_size=cfg.vocab_size,
    decoder_vocab_size=cfg.vocab_size,
    encoder_layers=cfg.num_encoder_layers,
    decoder_layers=cfg.num_decoder_layers,
    d_model=cfg.d_model,
    encoder_ffn_dim=cfg.d_ff,
    decoder_ffn_dim=cfg.d_ff,
    encoder_attention_heads=cfg.num_heads,
    decoder_attention_heads=cfg.num_heads,
    max_position_embeddings=cfg.max_len,
    activation_function=common.activation_to_hf(_F, cfg.activation),
    scale_embedding=cfg.scale_embeddings,
    share_encoder_decoder_embeddings=True,
    tie_word_embeddings=True,
    dropout=cfg.dropout_rate,
    attention_dropout=cfg.attention_dropout_rate,
    activation_dropout=0.0,
    is_encoder_decoder=True,
  )


_ATTENTION = ('q_proj', 'k_proj', 'v_proj', 'out_proj')
_SUBLAYERS = (('self_attention', 'self_attn'), ('cross_attention', 'encoder_attn'))
_NORMS = (('self_attention_norm', 'self_attn_layer_norm'), ('cross_attention_norm', 'encoder_attn_layer_norm'))


def _layer_names(cross: bool):
  return _SUBLAYERS[: 1 + cross], _NORMS[: 1 + cross] + (('ffn_norm', 'final_layer_norm'),)


def params_from_hf(tensors: dict, cfg) -> dict:
  """Our flat parameters (`a/b/c` paths) from Marian's tensors (popped from `tensors`)."""
  get = lambda name: common.take(tensors, name, _F)
  shared = get('model.shared.weight')
  for name in ('model.encoder.embed_tokens.weight', 'model.decoder.embed_tokens.weight', 'lm_head.weight'):
    if name in tensors and not np.array_equal(tensors.pop(name), shared):
      raise common.unsupported_hf(_F, name, '(not model.shared.weight)', 'config.model.tie_embeddings shares one')
  for name in ('model.encoder.embed_positions.weight', 'model.decoder.embed_positions.weight'):
    tensors.pop(name, None)  # computed from max_position_embeddings
  bias = tensors.pop('final_logits_bias', None)
  if bias is not None and np.any(bias):
    raise ConfigError(
      "The Hugging Face Marian checkpoint's final_logits_bias is not zero: config.model has no output bias, so "
      'this checkpoint cannot be imported exactly.'
    )
  flat = {'shared_embedding/embedding': shared}
  for stack, layers, cross in (('encoder', cfg.num_encoder_layers, False), ('decoder', cfg.num_decoder_layers, True)):
    attentions, norms = _layer_names(cross)
    for i in range(layers):
      h, layer = f'model.{stack}.layers.{i}.', {}
      for ours, theirs in attentions:
        layer.update(common.prefixed(ours, common.attention_from_hf(get, f'{h}{theirs}.', _ATTENTION, cfg, True)))
      for ours, theirs in norms:
        layer.update(common.prefixed(ours, common.norm_from_hf(get, h + theirs)))
      for ours, theirs in (('wi', 'fc1'), ('wo', 'fc2')):
        layer[f'ffn/{ours}/kernel'] = common.transpose(get(f'{h}{theirs}.weight'))
        layer[f'ffn/{ours}/bias'] = get(f'{h}{theirs}.bias')
      flat.update(common.prefixed(f'{stack}/stack/layer_{i}', layer))
  return flat


def params_to_hf(flat: dict, cfg) -> dict:
  """Marian's tensors (`MarianMTModel` names) from our flat parameters."""
  shared = flat['shared_embedding/embedding']
  out = {'model.shared.weight': shared, 'final_logits_bias': np.zeros((1, cfg.vocab_size), shared.dtype)}
  for stack, layers, cross in (('encoder', cfg.num_encoder_layers, False), ('decoder', cfg.num_decoder_layers, True)):
    attentions, norms = _layer_names(cross)
    for i in range(layers):
      layer, h = common.sub(flat, f'{stack}/stack/layer_{i}'), f'model.{stack}.layers.{i}.'
      for ours, theirs in attentions:
        out.update(common.attention_to_hf(common.sub(layer, ours), f'{h}{theirs}.', _ATTENTION, True))
      for ours, theirs in norms:
        out.update(common.norm_to_hf(common.sub(layer, ours), h + theirs))
      for ours, theirs in (('wi', 'fc1'), ('wo', 'fc2')):
        out[f'{h}{theirs}.weight'] = common.transpose(layer[f'ffn/{ours}/kernel'])
        out[f'{h}{theirs}.bias'] = layer[f'ffn/{ours}/bias']
  return out
