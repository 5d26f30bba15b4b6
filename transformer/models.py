"""`EncoderDecoder` (the paper's model) and `DecoderOnly`, built from the same blocks and one `ModelConfig`.

Token conventions shared with the tokenizers: id 0 is padding (segment id 0), id 1 starts every
decoder input (`shift_right`). Inputs may be packed: several sequences per row, told apart by
`segment_ids` (1, 2, ... ; 0 = padding) with `positions` restarting at 0 in each.
"""

import dataclasses
import functools
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer import cached_attention, layers, patterns, platform
from transformer.attention import PREFILL, MultiHeadAttention, make_attention_mask
from transformer.block_attention import SelfMask
from transformer.config import ConfigError, ModelConfig
from transformer.tokens import BOS_ID, PAD_ID

_REMAT_POLICIES = {
  'full': None,  # save nothing: recompute the whole block in the backward pass
  'dots': platform.SAVE_MATMULS,  # save every matmul's output
}


def _constrain(x, *axes):
  """Shards an activation by logical axis names (`parallel.LOGICAL_RULES`); a no-op outside
  `platform.activation_sharding` (one device, pmap, decoding)."""
  rules = platform.activation_rules()
  return nn.with_logical_constraint(x, axes, rules=rules) if rules else x


class Block(nn.Module):
  """One layer: self-attention, optional cross-attention, feed-forward; each a residual sub-layer.

  `ctx` holds what every layer shares (masks, ALiBi bias, RoPE positions, cache index, encoder
  output), built once by the stack's owner so that all layers (and `nn.scan`) see the same values.
  """

  config: ModelConfig
  cross: bool = False
  decode: bool = False
  deterministic: bool = True
  layer: int = 0  # its place in the stack (a scanned stack's one layer: 0)

  @nn.compact
  def __call__(self, x, ctx, dropout_key=None):
    cfg = self.config
    self_mask = ctx['self_mask']
    if hasattr(self_mask, 'for_layer'):  # a pattern drawn per layer (BigBird's random blocks)
      self_mask = self_mask.for_layer(self.layer)
    dropout = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
    # This layer's key (from the Stack) split by dropout site, never by module path: scanned and
    # unrolled layers then drop the same units.
    site = lambda i: None if dropout_key is None else jax.random.fold_in(dropout_key, i)

    def sublayer(x, fn, name, key):
      # Post-LN (paper): LayerNorm(x + Dropout(f(x))). Pre-LN: x + Dropout(f(LayerNorm(x))).
      if cfg.norm_position == 'pre':
        return x + dropout(fn(layers.norm(cfg, f'{name}_norm')(x)), rng=key)
      return layers.norm(cfg, f'{name}_norm')(x + dropout(fn(x), rng=key))

    attention = functools.partial(MultiHeadAttention, cfg, deterministic=self.deterministic)
    x = sublayer(
      x,
      lambda h: attention(decode=self.decode, name='self_attention')(
        h, h, self_mask, ctx['self_bias'], ctx['rope_positions'], ctx['cache_index'], dropout_rng=site(1)
      ),
      'self_attention',
      site(0),
    )
    if self.cross:
      x = sublayer(
        x,
        lambda h: attention(decode=self.decode, cross=True, name='cross_attention')(
          h, ctx['encoded'], ctx['cross_mask'], dropout_rng=site(3)
        ),
        'cross_attention',
        site(2),
      )
    x = sublayer(x, layers.FeedForward(cfg, name='ffn'), 'ffn', site(4))
    return _constrain(x, 'activation_batch', 'activation_length', 'activation_embed'), None


class Stack(nn.Module):
  """`num_layers` blocks, unrolled or as one scanned layer (`scan_layers`), optionally rematerialised."""

  config: ModelConfig
  num_layers: int
  cross: bool = False
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, ctx):
    cfg = self.config
    block = Block
    if cfg.remat != 'none':
      # Under scan, CSE across iterations is impossible anyway; unrolled, prevent_cse keeps remat real.
      block = nn.remat(Block, prevent_cse=not cfg.scan_layers, policy=_REMAT_POLICIES[cfg.remat])
    kwargs = dict(cross=self.cross, decode=self.decode, deterministic=self.deterministic)
    keys = None
    if not self.deterministic and (cfg.dropout_rate > 0 or cfg.attention_dropout_rate > 0):
      # Layer i's dropout key is fold_in(the Stack's key, i) in both layouts (the Stack's path is the
      # same in both), so `scan_layers` changes no dropout mask.
      key = self.make_rng('dropout')
      keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(self.num_layers))
    if cfg.scan_layers:
      scanned = nn.scan(
        block,
        variable_axes={'params': 0, 'cache': 0},
        split_rngs={'params': True},
        in_axes=(nn.broadcast, 0),
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )
      x, _ = scanned(cfg, **kwargs, name='layers')(x, ctx, keys)
    else:
      for i in range(self.num_layers):
        x, _ = block(cfg, **kwargs, layer=i, name=f'layer_{i}')(x, ctx, None if keys is None else keys[i])
    if cfg.norm_position == 'pre':
      x = layers.norm(cfg, 'final_norm')(x)
    return x


class _Embedder(nn.Module):
  """Token embedding + positional encoding (added ones only) + dropout."""

  config: ModelConfig
  embed: nn.Module

  @nn.compact
  def __call__(self, tokens, positions, deterministic):
    cfg = self.config
    if cfg.positional == 'learned' and tokens.shape[1] > cfg.max_len:
      raise ConfigError(
        f'Input length {tokens.shape[1]} exceeds config.model.max_len={cfg.max_len}, the size of the '
        'learned position table: raise max_len, shorten the inputs, or use positional=sinusoidal/rope/alibi.'
      )
    x = self.embed(tokens)
    if cfg.positional == 'sinusoidal':
      x += layers.sinusoidal(positions, cfg.d_model, x.dtype, cfg.sinusoidal_layout)
    elif cfg.positional == 'learned':
      x += layers.LearnedPositions(cfg, name='position_embedding')(positions)
    x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
    return _constrain(x, 'activation_batch', 'activation_length', 'activation_embed')


def _defaults(tokens, positions, segment_ids, start=0):
  if segment_ids is None:
    segment_ids = (tokens != PAD_ID).astype(jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return positions, segment_ids


def _self_attention_ctx(cfg, q_positions, kv_positions, q_segments, kv_segments, causal, cache_index=None):
  alibi = cfg.positional == 'alibi'
  self_mask = SelfMask(
    q_positions,
    kv_positions,
    q_segments,
    kv_segments,
    q_offset=cache_index,
    causal=causal,
    window=cfg.attention_window,
    pattern=patterns.from_config(cfg, causal=causal),
    alibi=alibi,
  )
  return dict(
    self_mask=self_mask,
    self_bias=(layers.alibi_bias(q_positions, kv_positions, cfg.num_heads) if alibi else None),
    rope_positions=q_positions if cfg.positional == 'rope' else None,
    cache_index=cache_index,
    encoded=None,
    cross_mask=None,
  )


class Encoder(nn.Module):
  config: ModelConfig
  embed: nn.Module

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, deterministic=True):
    cfg = self.config
    positions, segment_ids = _defaults(tokens, positions, segment_ids)
    x = _Embedder(cfg, self.embed, name='embedder')(tokens, positions, deterministic)
    ctx = _self_attention_ctx(cfg, positions, positions, segment_ids, segment_ids, causal=False)
    return Stack(cfg, cfg.num_encoder_layers, deterministic=deterministic, name='stack')(x, ctx)


class Decoder(nn.Module):
  """Causal stack with optional cross-attention; in decode mode keeps one KV cache per layer.

  The cache also records each slot's position and segment id (one copy for all layers), so the mask
  for new tokens is built here exactly as in a full forward pass. Unwritten slots have segment 0 and
  are never attended to by real tokens.
  """

  config: ModelConfig
  embed: nn.Module
  cross: bool = False

  @nn.compact
  def __call__(
    self,
    tokens,
    positions=None,
    segment_ids=None,
    encoded=None,
    encoder_segment_ids=None,
    deterministic=True,
    decode=False,
  ):
    cfg = self.config
    kv_positions = kv_segments = cache_index = None
    prefill = decode == PREFILL
    if decode:
      initialized = self.has_variable('cache', 'index')
      index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
      start = index.value if initialized else 0
      positions, segment_ids = _defaults(tokens, positions, segment_ids, start)
      cached_pos = self.variable('cache', 'positions', jnp.zeros, tokens.shape, jnp.int32)
      cached_seg = self.variable('cache', 'segment_ids', jnp.zeros, tokens.shape, jnp.int32)
      if initialized:
        cache_index = 0 if prefill else index.value
        cached_pos.value = jax.lax.dynamic_update_slice(cached_pos.value, positions, (0, cache_index))
        cached_seg.value = jax.lax.dynamic_update_slice(cached_seg.value, segment_ids, (0, cache_index))
        index.value = jnp.asarray(cache_index + tokens.shape[1], jnp.int32)
        if not prefill:
          kv_positions, kv_segments = cached_pos.value, cached_seg.value
    positions, segment_ids = _defaults(tokens, positions, segment_ids)
    if kv_positions is None:
      kv_positions, kv_segments = positions, segment_ids

    x = _Embedder(cfg, self.embed, name='embedder')(tokens, positions, deterministic)
    # A prefill attends to its own tokens as a forward pass does (blocks, splash), and writes the cache.
    mask_index = None if prefill else cache_index
    ctx = _self_attention_ctx(
      cfg, positions, kv_positions, segment_ids, kv_segments, causal=True, cache_index=mask_index
    )
    ctx['cache_index'] = cache_index
    dropout = cfg.attention_dropout_rate > 0 and not deterministic
    if mask_index is not None and not dropout and not cached_attention.DENSE_REFERENCE:
      # Attend to the written slots only: the dense mask and bias above go unused (XLA drops them).
      filled = cache_index + tokens.shape[1]
      rule = ctx['self_mask']  # the same window, ALiBi and pattern, read over the cache's blocks
      mask = cached_attention.CacheMask(
        positions, kv_positions, segment_ids, kv_segments, filled, rule.window, rule.alibi, rule.pattern
      )
      ctx.update(self_mask=mask, self_bias=None)
    if self.cross:
      if decode:
        encoder_segment_ids = self._cached_encoder_segments(encoded, encoder_segment_ids)
      ctx['encoded'] = encoded
      ctx['cross_mask'] = make_attention_mask(None, None, segment_ids, encoder_segment_ids, causal=False)
    x = Stack(cfg, cfg.num_decoder_layers, cross=self.cross, decode=decode, deterministic=deterministic, name='stack')(
      x, ctx
    )
    if cfg.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = layers.Embed(cfg, cfg.vocab_size, name='output_embedding').attend(x)
    return _constrain(logits, 'activation_batch', 'activation_length', 'activation_vocab')

  def _cached_encoder_segments(self, encoded, encoder_segment_ids):
    # Decoding caches what cross-attention needs from the source at the call that passes `encoded`
    # (the layers cache its keys/values); later steps may pass encoded=None and skip that work.
    if encoded is not None:
      self.variable('cache', 'encoder_segment_ids', lambda: encoder_segment_ids).value = encoder_segment_ids
      return encoder_segment_ids
    if not self.has_variable('cache', 'encoder_segment_ids'):
      raise ConfigError('Decoding without `encoded` needs a cache filled by an earlier decode call with it.')
    return self.get_variable('cache', 'encoder_segment_ids')


class EncoderDecoder(nn.Module):
  """The paper's model: `encode` the source once, `decode` targets (optionally one step at a time)."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    if cfg.tie_embeddings:  # source, target and pre-softmax share one matrix (paper, 3.4)
      source = target = layers.Embed(cfg, cfg.vocab_size, name='shared_embedding')
    else:
      source = layers.Embed(cfg, cfg.vocab_size, name='source_embedding')
      target = layers.Embed(cfg, cfg.vocab_size, name='target_embedding')
    self.encoder = Encoder(cfg, source)
    self.decoder = Decoder(cfg, target, cross=True)

  def encode(self, inputs, positions=None, segment_ids=None, deterministic=True):
    return self.encoder(inputs, positions, segment_ids, deterministic)

  def decode(
    self,
    encoded,
    encoder_segment_ids,
    decoder_inputs,
    positions=None,
    segment_ids=None,
    deterministic=True,
    decode=False,
  ):
    """Logits for `decoder_inputs`. With `decode=True`, `encoded` and `encoder_segment_ids` may be None
    after the first call: cross-attention then reuses the keys/values that call cached."""
    return self.decoder(decoder_inputs, positions, segment_ids, encoded, encoder_segment_ids, deterministic, decode)

  def __call__(
    self,
    inputs,
    decoder_inputs,
    *,
    inputs_positions=None,
    inputs_segment_ids=None,
    decoder_positions=None,
    decoder_segment_ids=None,
    deterministic=True,
    decode=False,
  ):
    """Logits `[B, T, vocab]` (float32) for `decoder_inputs` (targets shifted right) given `inputs`."""
    if inputs_segment_ids is None:
      inputs_segment_ids = (inputs != PAD_ID).astype(jnp.int32)
    encoded = self.encode(inputs, inputs_positions, inputs_segment_ids, deterministic)
    return self.decode(
      encoded, inputs_segment_ids, decoder_inputs, decoder_positions, decoder_segment_ids, deterministic, decode
    )


class DecoderOnly(nn.Module):
  """A causal language model; with `tie_embeddings` the input embedding is the pre-softmax layer."""

  config: ModelConfig

  def setup(self):
    self.decoder = Decoder(self.config, layers.Embed(self.config, self.config.vocab_size, name='embedding'))

  def __call__(self, tokens, *, positions=None, segment_ids=None, deterministic=True, decode=False):
    """Logits `[B, T, vocab]` (float32) predicting each next token."""
    return self.decoder(tokens, positions, segment_ids, deterministic=deterministic, decode=decode)


def build_model(config: ModelConfig) -> nn.Module:
  """The model `config` describes (`setup.resolve` types an experiment's `config.model`)."""
  return EncoderDecoder(config) if config.kind == 'encoder_decoder' else DecoderOnly(config)


def dummy_inputs(config: ModelConfig, batch_size: int = 1, length: int = 8, source_length: int = 0):
  """Positional call arguments of the right kind and shape (all-ones tokens) for init or eval_shape."""
  target = jnp.ones((batch_size, length), jnp.int32)
  if config.kind == 'encoder_decoder':
    return jnp.ones((batch_size, source_length or length), jnp.int32), target
  return (target,)


def init_params(model: nn.Module, rng, batch_size: int = 1, length: int = 8):
  """Initial parameters (logical-axis boxes removed; `parallel.state_shardings` reads them).

  Jitted: eager, every initializer and layer op would compile on its own (hundreds of small programs
  for a model that compiles in one). The training engine jits its own init, with output shardings.
  `scan_layers` is a layout, not a model: scanned parameters are the unrolled ones stacked, so one
  seed gives the same weights (and losses) in both layouts.
  """
  cfg = model.config
  params = nn.unbox(jax.jit(unrolled(model).init)(rng, *dummy_inputs(cfg, batch_size, length))['params'])
  return stack_layers(params) if cfg.scan_layers else params


def unrolled(model: nn.Module) -> nn.Module:
  """A `scan_layers` model's unrolled twin (remat off too, which only trades memory in a backward pass): the
  same function of `unstack_layers(params)`. Any other model as it is."""
  cfg = model.config
  if not cfg.scan_layers:
    return model
  return model.clone(config=dataclasses.replace(cfg, scan_layers=False, remat='none'))


def init_cache(model: nn.Module, batch_size: int, max_length: int, source_length: int = 1):
  """An empty KV cache for `max_length` decoder tokens (allocated, nothing computed)."""
  args = dummy_inputs(model.config, batch_size, max_length, source_length)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, decode=True)['cache'])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def shift_right(targets, segment_ids=None):
  """Decoder inputs: targets moved one step right with `BOS_ID` first in each (packed) segment."""
  shifted = jnp.pad(targets, ((0, 0), (1, 0)), constant_values=BOS_ID)[:, :-1]
  if segment_ids is None:
    return jnp.where(targets == PAD_ID, PAD_ID, shifted)
  starts = segment_ids != jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
  shifted = jnp.where(starts, BOS_ID, shifted)
  return jnp.where(segment_ids == 0, PAD_ID, shifted)


def stack_layers(params):
  """Unrolled parameters (`layer_0`, `layer_1`, ...) -> the `scan_layers` layout (one `layers` tree)."""
  return convert_layers(params, scanned=True)


def unstack_layers(params):
  """The `scan_layers` layout -> unrolled parameters; the inverse of `stack_layers`."""
  return convert_layers(params, scanned=False)


_LAYER_NAME = re.compile(r'layer_(\d+)')


def convert_layers(tree, scanned: bool):
  """`tree` with every layer stack in the scanned layout (`scanned=True`: `layer_0..layer_{n-1}` -> one
  `layers` subtree with a leading layer axis) or the unrolled one (`scanned=False`: the inverse).

  Any pytree holding such dicts converts (params, cache, a TrainState, optax states whose `mu` / `nu`
  mirror the params); dicts already in the target layout stay as they are. Both layouts compute the
  same function, so a checkpoint moves between them. Traceable: under `jax.eval_shape` it converts
  abstract trees too (e.g. a restore target).
  """
  is_dict = lambda x: isinstance(x, Mapping)
  return jax.tree.map(lambda x: _convert_dict(x, scanned) if is_dict(x) else x, tree, is_leaf=is_dict)


def _convert_dict(node, scanned):
  out = {k: convert_layers(v, scanned) for k, v in node.items()}
  indices = {int(m.group(1)): k for k in out if isinstance(k, str) and (m := _LAYER_NAME.fullmatch(k))}
  if scanned and indices:
    if sorted(indices) != list(range(len(indices))):
      raise ValueError(f'Layers {sorted(indices)} are not layer_0..layer_{len(indices) - 1}.')
    blocks = [out.pop(indices[i]) for i in range(len(indices))]
    out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  elif not scanned and 'layers' in out:
    stacked = out.pop('layers')
    leaves = jax.tree.leaves(stacked)
    if not leaves:
      raise ValueError('A `layers` subtree without arrays: its number of layers is unknown.')
    for i in range(leaves[0].shape[0]):
      out[f'layer_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return type(node)(out)
