"""A plain NumPy (float64) forward pass of `transformer.models`, written from the paper and the configs'
documented meaning, not from the Flax code: the torch-free reference `test_numpy_reference` compares
the models' logits with.

It reads the Flax parameter dict (unrolled layers: `layer_0`, `layer_1`, ...) and covers what a
`ModelConfig` can say except dropout: embeddings scaled by sqrt(d_model); sinusoidal, learned, rope,
alibi or no positions; LayerNorm / RMSNorm, pre or post; relu / gelu / swiglu FFN; multi-head
attention with grouped key/value heads, padding (segment) masks, causal and sliding-window masks;
tied or untied output embeddings; decoder-only and encoder-decoder.
"""

import math

import numpy as np

_MASKED = -1e9  # the models' finite "minus infinity": a query that sees no key averages all of them


def sinusoidal(positions, d_model):
  """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) (paper, 3.5)."""
  out = np.zeros(positions.shape + (d_model,))
  for i in range(0, d_model, 2):
    angle = positions / 10000.0 ** (i / d_model)
    out[..., i] = np.sin(angle)
    if i + 1 < d_model:
      out[..., i + 1] = np.cos(angle)
  return out


def rope(x, positions, base):
  """Rotates feature pairs (j, j + D/2) of `x` [B, T, H, D] by angle position * base^(-j / (D/2))."""
  half = x.shape[-1] // 2
  out = np.empty_like(x)
  for j in range(half):
    angle = positions[:, :, None] * base ** (-j / half)  # [B, T, 1]
    a, b = x[..., j], x[..., j + half]
    out[..., j] = a * np.cos(angle) - b * np.sin(angle)
    out[..., j + half] = b * np.cos(angle) + a * np.sin(angle)
  return out


def alibi_slopes(num_heads):
  """Press et al. (2022): 2^(-8i/n) for i = 1..n when n is a power of two; otherwise the slopes of the
  largest power of two below n, then every other slope of twice that many."""

  def geometric(n):
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

  closest = 1
  while closest * 2 <= num_heads:
    closest *= 2
  return np.array(geometric(closest) + geometric(2 * closest)[0::2][: num_heads - closest])


def norm(cfg, p, x):
  if cfg.norm_type == 'layernorm':
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + cfg.norm_epsilon) * p['scale'] + p['bias']
  return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_epsilon) * p['scale']


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ffn(cfg, p, x):
  if cfg.activation == 'swiglu':
    gate = x @ p['gate']['kernel']
    return (gate / (1 + np.exp(-gate)) * (x @ p['up']['kernel'])) @ p['down']['kernel']
  hidden = x @ p['wi']['kernel'] + p['wi']['bias']
  hidden = np.maximum(hidden, 0) if cfg.activation == 'relu' else gelu_tanh(hidden)
  return hidden @ p['wo']['kernel'] + p['wo']['bias']


def visible(q_pos, kv_pos, q_seg, kv_seg, causal, window):
  """bool [B, T, S]: query t sees key s iff same segment (0 = padding), and, if causal, the key is not
  later; with a window, the key is fewer than `window` positions away."""
  batch, length, keys = q_seg.shape[0], q_seg.shape[1], kv_seg.shape[1]
  out = np.zeros((batch, length, keys), bool)
  for b in range(batch):
    for t in range(length):
      for s in range(keys):
        ok = q_seg[b, t] == kv_seg[b, s]
        if causal:
          ok = ok and kv_pos[b, s] <= q_pos[b, t]
        if window:
          ok = ok and abs(int(q_pos[b, t]) - int(kv_pos[b, s])) < window
        out[b, t, s] = ok
  return out


def attention(cfg, p, x_q, x_kv, mask, q_pos=None, kv_pos=None, self_attention=True):
  """Multi-head attention; query head n uses key/value head n // (num_heads / kv_heads)."""
  heads, kv_heads = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
  q = np.einsum('btd,dhk->bthk', x_q, p['query']['kernel'])
  k = np.einsum('bsd,dhk->bshk', x_kv, p['key']['kernel'])
  v = np.einsum('bsd,dhk->bshk', x_kv, p['value']['kernel'])
  if self_attention and cfg.positional == 'rope':
    q, k = rope(q, q_pos, cfg.rope_base), rope(k, kv_pos, cfg.rope_base)
  group = heads // kv_heads
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  slopes = alibi_slopes(heads)
  for n in range(heads):
    logits = np.einsum('btk,bsk->bts', q[:, :, n], k[:, :, n // group]) / math.sqrt(q.shape[-1])
    if self_attention and cfg.positional == 'alibi':
      logits = logits - slopes[n] * np.abs(q_pos[:, :, None] - kv_pos[:, None, :])
    logits = np.where(mask, logits, _MASKED)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out[:, :, n] = np.einsum('bts,bsk->btk', weights, v[:, :, n // group])
  return np.einsum('bthk,hkd->btd', out, p['out']['kernel'])


def sublayer(cfg, p_norm, x, fn):
  if cfg.norm_position == 'pre':
    return x + fn(norm(cfg, p_norm, x))
  return norm(cfg, p_norm, x + fn(x))


def embed(cfg, table, p_embedder, tokens, positions):
  x = table[tokens] * math.sqrt(cfg.d_model)
  if cfg.positional == 'sinusoidal':
    x = x + sinusoidal(positions, cfg.d_model)
  elif cfg.positional == 'learned':
    x = x + p_embedder['position_embedding']['embedding'][positions]
  return x


def stack(cfg, p, x, num_layers, self_mask, positions, encoded=None, cross_mask=None):
  for i in range(num_layers):
    layer = p[f'layer_{i}']
    x = sublayer(
      cfg,
      layer['self_attention_norm'],
      x,
      lambda h, layer=layer: attention(cfg, layer['self_attention'], h, h, self_mask, positions, positions),
    )
    if encoded is not None:
      x = sublayer(
        cfg,
        layer['cross_attention_norm'],
        x,
        lambda h, layer=layer: attention(cfg, layer['cross_attention'], h, encoded, cross_mask, self_attention=False),
      )
    x = sublayer(cfg, layer['ffn_norm'], x, lambda h, layer=layer: ffn(cfg, layer['ffn'], h))
  if cfg.norm_position == 'pre':
    x = norm(cfg, p['final_norm'], x)
  return x


def _float64(tree):
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    return {k: _float64(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def _defaults(tokens, positions, segment_ids):
  if segment_ids is None:
    segment_ids = (tokens != 0).astype(np.int64)
  if positions is None:
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(positions), np.asarray(segment_ids)


def decoder_only(cfg, params, tokens, positions=None, segment_ids=None):
  """Logits [B, T, vocab] of `models.DecoderOnly(cfg)` with `params`."""
  p, tokens = _float64(params), np.asarray(tokens)
  positions, segment_ids = _defaults(tokens, positions, segment_ids)
  table = p['embedding']['embedding']
  x = embed(cfg, table, p['decoder'].get('embedder', {}), tokens, positions)
  mask = visible(positions, positions, segment_ids, segment_ids, True, cfg.attention_window)
  x = stack(cfg, p['decoder']['stack'], x, cfg.num_decoder_layers, mask, positions)
  output = table if cfg.tie_embeddings else p['decoder']['output_embedding']['embedding']
  return x @ output.T


def encoder_decoder(cfg, params, inputs, decoder_inputs):
  """Logits [B, T, vocab] of `models.EncoderDecoder(cfg)` with `params` (unpacked rows, 0 = padding)."""
  p, inputs, decoder_inputs = _float64(params), np.asarray(inputs), np.asarray(decoder_inputs)
  if cfg.tie_embeddings:
    source = target = p['shared_embedding']['embedding']
  else:
    source, target = p['source_embedding']['embedding'], p['target_embedding']['embedding']
  src_pos, src_seg = _defaults(inputs, None, None)
  tgt_pos, tgt_seg = _defaults(decoder_inputs, None, None)
  x = embed(cfg, source, p['encoder'].get('embedder', {}), inputs, src_pos)
  src_mask = visible(src_pos, src_pos, src_seg, src_seg, False, cfg.attention_window)
  encoded = stack(cfg, p['encoder']['stack'], x, cfg.num_encoder_layers, src_mask, src_pos)
  y = embed(cfg, target, p['decoder'].get('embedder', {}), decoder_inputs, tgt_pos)
  tgt_mask = visible(tgt_pos, tgt_pos, tgt_seg, tgt_seg, True, cfg.attention_window)
  cross_mask = visible(tgt_pos, src_pos, tgt_seg, src_seg, False, 0)
  y = stack(cfg, p['decoder']['stack'], y, cfg.num_decoder_layers, tgt_mask, tgt_pos, encoded, cross_mask)
  output = target if cfg.tie_embeddings else p['decoder']['output_embedding']['embedding']
  return y @ output.T
