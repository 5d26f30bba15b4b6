"""Autoregressive decoding: greedy, sampling and beam search, each one jitted `lax.while_loop` over the KV cache.

Both model kinds share one layout. The decoder sees `[BOS, prompt, generated...]`, as in training
(`shift_right` puts BOS first): prompts are given without BOS, right-padded with 0, and the cache
holds them as prefilled `[B, 1 + P]` with padding as segment 0, which no real token attends to. Each
row's positions start at 0 on BOS and continue from its own prompt length, so rows with prompts of
different lengths decode exactly as if each were alone. An encoder-decoder has no prompt: it prefills
BOS with the encoded source, and the cache keeps the source's cross-attention keys/values.

Outputs hold the generated tokens only: EOS included, PAD (0) after it (PAD itself is never generated).
`lengths` limits each row's number of generated tokens (a row that reaches it without EOS simply stops).

Compiled loops are cached by jit on (model, static options, shapes): the model is a hashable module.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from transformer import cached_attention, matmuls, models
from transformer.attention import PREFILL
from transformer.config import ConfigError
from transformer.tokens import BOS_ID, EOS_ID, PAD_ID

METHODS = ('greedy', 'sample')


def generate(
  model,
  params,
  *,
  inputs=None,
  prompts=None,
  max_len: int,
  method: str = 'greedy',
  rng=None,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  lengths=None,
):
  """Greedy or sampled continuations, int32 `[B, max_len]` (EOS included, PAD after it).

  `inputs` `[B, S]`: source tokens (encoder-decoder). `prompts` `[B, P]`: optional decoder-only prefix
  (no BOS; right-padded with 0). Sampling draws from softmax(logits / temperature) restricted to the
  `top_k` most likely tokens (0: all) and to the smallest set whose probability reaches `top_p`;
  temperature 0 means greedy. `lengths` int `[B]`: per-row limit on generated tokens (<= max_len).
  """
  if method not in METHODS:
    raise ConfigError(f'Decoding method {method!r} is unknown: choose one of {", ".join(METHODS)}.')
  if method == 'sample' and rng is None:
    raise ConfigError("method='sample' needs an `rng` key (e.g. jax.random.key(seed)).")
  if (
    not (math.isfinite(temperature) and temperature >= 0)
    or not (top_k >= 0 and top_k == int(top_k))
    or not 0 < top_p <= 1
  ):
    raise ConfigError(
      f'Sampling needs a finite temperature >= 0, an integer top_k >= 0 and 0 < top_p <= 1 '
      f'(got temperature={temperature}, top_k={top_k}, top_p={top_p}).'
    )
  inputs, prompts, lengths = _check(model, inputs, prompts, max_len, lengths)
  if method == 'greedy':  # one compiled loop whatever the (unused) sampling options
    rng, temperature, top_k, top_p = jax.random.key(0), 1.0, 0, 1.0
  return _generate(
    model,
    params,
    inputs,
    prompts,
    lengths,
    rng,
    jnp.float32(temperature),
    max_len=max_len,
    sample=method == 'sample',
    top_k=int(top_k),
    top_p=float(top_p),
  )


def beam_search(
  model, params, *, inputs=None, prompts=None, beam_size: int = 4, alpha: float = 0.6, max_len: int, lengths=None
):
  """The `beam_size` best hypotheses per row, best first: (tokens `[B, beam, max_len]`, scores `[B, beam]`).

  A score is the sum of token log-probabilities (EOS included) divided by the GNMT length penalty
  ((5 + length) / 6) ** alpha (Wu et al., 2016; the Transformer paper uses alpha 0.6); length counts
  the EOS. Each step extends the alive hypotheses by their top 2 * beam_size candidates; those among
  the best beam_size that emit EOS are set aside as finished, and the best others stay alive. A row
  stops when no alive hypothesis can still beat its worst finished one, or at its length limit, where
  the best candidates are returned without EOS. With beam_size=1 and alpha=0 this is greedy search.
  """
  if beam_size < 1:
    raise ConfigError(f'beam_size={beam_size} must be >= 1.')
  if not (math.isfinite(alpha) and alpha >= 0):
    raise ConfigError(
      f'alpha={alpha} must be finite and >= 0 (a negative length penalty rewards short outputs '
      'without bound, and early stopping would be wrong).'
    )
  inputs, prompts, lengths = _check(model, inputs, prompts, max_len, lengths)
  tokens, scores, _ = _beam_search(
    model, params, inputs, prompts, lengths, jnp.float32(alpha), beam_size=int(beam_size), max_len=max_len
  )
  return tokens, scores


def length_penalty(length, alpha):
  """GNMT's ((5 + length) / 6) ** alpha."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def greedy_uncached(model, params, *, inputs=None, prompts=None, max_len: int):
  """Greedy decoding the slow way: a full forward pass over the whole prefix for every new token.

  The reference for tests and benchmarks: each row is laid out contiguously (BOS, its prompt, its
  tokens) in a fixed-size buffer, with no cache and no per-row position bookkeeping.
  """
  inputs, prompts, lengths = _check(model, inputs, prompts, max_len, None)
  batch = lengths.shape[0]
  width = 0 if prompts is None else prompts.shape[1]
  prompt_lengths = jnp.zeros((batch,), jnp.int32) if prompts is None else _prompt_lengths(prompts)
  buffer = jnp.zeros((batch, 1 + width + max_len), jnp.int32).at[:, 0].set(BOS_ID)
  if prompts is not None:
    buffer = buffer.at[:, 1 : 1 + width].set(prompts)
  done = jnp.zeros((batch,), bool)
  for i in range(max_len):
    buffer, done = _uncached_step(model, params, inputs, buffer, done, prompt_lengths + i)
    if bool(done.all()):
      break
  rows = jnp.arange(batch)[:, None]
  return buffer[rows, prompt_lengths[:, None] + 1 + jnp.arange(max_len)]


@functools.partial(jax.jit, static_argnames='model')
def _uncached_step(model, params, inputs, buffer, done, last):
  """Appends the argmax after column `last` of each row (PAD once the row has emitted EOS)."""
  if model.config.kind == 'encoder_decoder':
    logits = model.apply({'params': params}, inputs, buffer)
  else:
    logits = model.apply({'params': params}, buffer)
  token = jnp.argmax(_no_pad(jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]), axis=-1)
  token = jnp.where(done, PAD_ID, token).astype(jnp.int32)
  buffer = buffer.at[jnp.arange(buffer.shape[0]), last + 1].set(token)
  return buffer, done | (token == EOS_ID)


def _no_pad(scores):
  # PAD marks "no token" in outputs, so it is never generated. Beam search masks it after the
  # softmax: hypothesis scores stay the model's own log-probabilities.
  return scores.at[..., PAD_ID].set(-jnp.inf)


def _check(model, inputs, prompts, max_len, lengths):
  """Validates the call (outside jit, where values are concrete); returns arrays and `lengths`."""
  cfg = model.config
  if cfg.kind == 'encoder_decoder':
    if inputs is None or prompts is not None:
      raise ConfigError(
        'An encoder-decoder model decodes from `inputs` (source tokens [batch, length]) and takes no `prompts`.'
      )
    _check_ids('inputs', inputs, cfg.vocab_size)
    inputs = jnp.asarray(inputs, jnp.int32)
    batch, width = inputs.shape[0], 0
  else:
    if inputs is not None:
      raise ConfigError('A decoder-only model has no `inputs`: pass the prefix as `prompts` [batch, length].')
    batch, width = (1 if lengths is None else len(lengths)), 0  # no prompt: start from BOS alone
    if prompts is not None:
      _check_ids('prompts', prompts, cfg.vocab_size)
      _check_right_padded(prompts)
      prompts = jnp.asarray(prompts, jnp.int32)
      batch, width = prompts.shape
      prompts = prompts if width else None
  if max_len < 1:
    raise ConfigError(f'max_len={max_len} must be >= 1.')
  if cfg.positional == 'learned' and width + max_len > cfg.max_len:  # BOS is position 0
    raise ConfigError(
      f'Decoding {max_len} tokens after a prompt of {width} reaches position {width + max_len - 1}, '
      f'beyond the learned position table (config.model.max_len={cfg.max_len}): decode fewer '
      'tokens or raise max_len.'
    )
  if lengths is None:
    lengths = jnp.full((batch,), max_len, jnp.int32)
  else:
    try:
      values = np.asarray(lengths)
    except jax.errors.TracerArrayConversionError:  # called under jit: checked by the caller's trace only
      values = None
    if values is not None:
      if values.shape != (batch,) or values.min(initial=1) < 1 or values.max(initial=1) > max_len:
        raise ConfigError(f'lengths must be {batch} integers in [1, max_len={max_len}]; got {values.tolist()}.')
    lengths = jnp.asarray(lengths, jnp.int32)
  return inputs, prompts, lengths


def _concrete(x):
  """`x` as numpy, or None under jit or for an array spread over hosts (values not here: the caller's concern)."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.is_fully_addressable:
    return None
  try:
    return np.asarray(x)
  except jax.errors.TracerArrayConversionError:
    return None


def _check_ids(name, tokens, vocab_size):
  """Token ids outside the vocabulary would be clamped by the embedding lookup: silently other tokens."""
  values = _concrete(tokens)
  if values is None:
    return
  if values.ndim != 2:
    raise ConfigError(f'{name} must be [batch, length] token ids; got shape {values.shape}.')
  bad = (values < 0) | (values >= vocab_size)
  if bad.any():
    row, col = (int(i[0]) for i in np.nonzero(bad))
    raise ConfigError(
      f'{name}[{row}, {col}] = {values[row, col]} is not a token id of this model (0 to '
      f'vocab_size - 1 = {vocab_size - 1}): encode with the tokenizer the model was trained with.'
    )


def _check_right_padded(prompts):
  """A prompt's length is its count of real tokens, so a PAD before a token would shift its positions."""
  values = _concrete(prompts)
  if values is None:
    return
  holes = (values[:, :-1] == PAD_ID) & (values[:, 1:] != PAD_ID)
  if holes.any():
    row = int(np.flatnonzero(holes.any(axis=1))[0])
    raise ConfigError(
      f'prompts row {row} has padding (id {PAD_ID}) before a token: {values[row].tolist()}. Prompts must be '
      'right-padded, each row its tokens first and padding only at the end.'
    )


def _prompt_lengths(prompts):
  return (prompts != PAD_ID).sum(axis=1).astype(jnp.int32)


def _unrolled(model, params):
  """The model and parameters a decoding loop runs: a `scan_layers` model with its layers unrolled (its
  parameters unstacked, under jit) and without remat, which changes no number. In a scanned step XLA copied
  every layer's KV cache into and out of the loop over layers at every token (4.7x slower greedy decoding of
  the lm shape at batch 8, docs/performance.md); unrolled, each layer's cache is updated in place. The cost:
  the decoding call holds a copy of the layers' weights, and its compile time grows with depth."""
  if not model.config.scan_layers:
    return model, params
  return models.unrolled(model), models.unstack_layers(params)


def _prefill(model, params, inputs, prompts, batch, max_len):
  """Cache after `[BOS, prompt]`, the logits for the first new token `[B, V]`, and a step function.

  `step(cache, tokens [N], i)` feeds the `i`-th generated token (0-based) of each row and returns
  (logits `[N, V]`, cache); `N` may be a multiple of the batch (beams, row-major).
  """
  cfg = model.config
  width = 0 if prompts is None else prompts.shape[1]
  prompt_lengths = jnp.zeros((batch,), jnp.int32) if prompts is None else _prompt_lengths(prompts)
  tokens = jnp.full((batch, 1), BOS_ID, jnp.int32)
  if prompts is not None:
    tokens = jnp.concatenate([tokens, prompts], axis=1)
  segments = (tokens != PAD_ID).astype(jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  # The last generated token is never fed back: BOS + prompt + (max_len - 1) slots.
  cache_length = 1 + width + max_len - 1
  source_length = inputs.shape[1] if inputs is not None else 1
  cache = models.init_cache(model, batch, cache_length, source_length)

  if cfg.kind == 'encoder_decoder':
    source_segments = (inputs != PAD_ID).astype(jnp.int32)
    encoded = model.apply({'params': params}, inputs, segment_ids=source_segments, method='encode')
    call = lambda cache, tokens, positions, segments, encoded=None, source_segments=None, decode=True: model.apply(
      {'params': params, 'cache': cache},
      encoded,
      source_segments,
      tokens,
      positions,
      segments,
      decode=decode,
      method='decode',
      mutable=['cache'],
    )
    logits, state = call(cache, tokens, positions, segments, encoded, source_segments, decode=PREFILL)
  else:
    call = lambda cache, tokens, positions, segments, decode=True: model.apply(
      {'params': params, 'cache': cache},
      tokens,
      positions=positions,
      segment_ids=segments,
      decode=decode,
      mutable=['cache'],
    )
    logits, state = call(cache, tokens, positions, segments, decode=PREFILL)
  first = jnp.take_along_axis(logits, prompt_lengths[:, None, None], axis=1)[:, 0]

  def step(cache, tokens, i):
    copies = tokens.shape[0] // batch
    positions = jnp.repeat(prompt_lengths, copies) + 1 + i
    with matmuls.kernel_first_matmuls():
      logits, state = call(cache, tokens[:, None], positions[:, None], jnp.ones_like(tokens)[:, None])
    return logits[:, 0], state['cache']

  return state['cache'], first, step


def lower_generate(model, params, inputs, prompts, lengths, rng, temperature, *, max_len: int):
  """`generate`'s greedy loop lowered for abstract arguments (ShapeDtypeStructs, `--mode compile`)."""
  return _generate.lower(
    model, params, inputs, prompts, lengths, rng, temperature, max_len=max_len, sample=False, top_k=0, top_p=1.0
  )


@functools.partial(jax.jit, static_argnames=('model', 'max_len', 'sample', 'top_k', 'top_p'))
def _generate(model, params, inputs, prompts, lengths, rng, temperature, *, max_len, sample, top_k, top_p):
  model, params = _unrolled(model, params)
  batch = lengths.shape[0]
  cache, logits, step = _prefill(model, params, inputs, prompts, batch, max_len)

  def emit(i, cache, tokens, done, logits):
    logits = _no_pad(logits)
    if sample:
      token = _sample(jax.random.fold_in(rng, i), logits, temperature, top_k, top_p)
    else:
      token = argmax(logits)
    token = jnp.where(done, PAD_ID, token).astype(jnp.int32)
    tokens = tokens.at[:, i].set(token)
    done = done | (token == EOS_ID) | (i + 1 >= lengths)
    return i + 1, cache, tokens, done

  def body(state):
    i, cache, tokens, done = state
    logits, cache = step(cache, tokens[:, i - 1], i - 1)
    return emit(i, cache, tokens, done, logits)

  # The first token comes from the prefill; each loop turn feeds one token and picks the next.
  state = emit(0, cache, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch,), bool), logits)
  _, _, tokens, _ = jax.lax.while_loop(lambda s: (s[0] < max_len) & ~s[3].all(), body, state)
  return tokens


def argmax(scores):
  """`jnp.argmax(scores, axis=-1)` (the first maximum wins, a NaN before all) as two plain reductions: XLA
  CPU runs argmax's paired (value, index) reduction 5x slower (164 against 34 us for 8 rows of 8192)."""
  best = jnp.max(scores, axis=-1, keepdims=True)
  hit = (scores == best) | jnp.isnan(scores)
  vocab = scores.shape[-1]
  return jnp.min(jnp.where(hit, jnp.arange(vocab), vocab), axis=-1)


def _sample(rng, logits, temperature, top_k, top_p):
  """One token per row from the filtered, tempered distribution; argmax when temperature is 0."""
  greedy = argmax(logits)
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    # Keep the most likely tokens until their probability reaches top_p (the top one always).
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  drawn = jax.random.categorical(rng, logits / jnp.maximum(temperature, 1e-6), axis=-1)
  return jnp.where(temperature > 0, drawn, greedy)


def _cache_axes(model, cache, which):
  """Each cache leaf's axis that grows with `models.init_cache`'s argument `which` (0: the batch, 1: the
  decoder's slots), None where none does; found by comparing two small caches (of one block each, so a
  block of `cache` is looked up by its tuple's path)."""
  sizes = [tuple(3 if k == which and grown else 2 for k in range(3)) for grown in (False, True)]
  shapes = [jax.eval_shape(lambda s=s: models.init_cache(model, *s)) for s in sizes]
  axes = jax.tree.map(lambda a, b: next((k for k, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y), None), *shapes)
  by_path = {_unblocked(path): axis for path, axis in jax.tree_util.tree_flatten_with_path(axes)[0]}
  # A None axis is no leaf of `axes`: a path missing there has none.
  return [by_path.get(_unblocked(path)) for path, _ in jax.tree_util.tree_flatten_with_path(cache)[0]]


def _block_index(path):
  """A cache leaf's place in its tuple of blocks (`cached_attention.split`), None if it is no block."""
  return path[-1].idx if isinstance(path[-1], jax.tree_util.SequenceKey) else None


def _unblocked(path):
  return path[:-1] if _block_index(path) is not None else path


def _gather_batch(cache, axes, index):
  leaves, tree = jax.tree.flatten(cache)
  return tree.unflatten([x if ax is None else jnp.take(x, index, axis=ax) for x, ax in zip(leaves, axes)])


def _reorder_beams(cache, batch_axes, slot_axes, index, filled):
  """`cache` with row `index[r]` copied to row r, for beams that only ever take a parent in their own row.

  Only leaves with decoder slots change. A block of a self-attention cache (`cached_attention.split`: an
  element of a tuple) is gathered only if it holds one of the `filled` written slots: slots after those are
  never read. The slots' positions and segment ids (small) are always gathered. The other leaves hold what
  every beam of a row shares (the source's cross-attention keys and values, its segment ids): gathering
  them within a row would copy them for nothing at every step.
  """
  if cached_attention.DENSE_REFERENCE:
    return _gather_batch(cache, batch_axes, index)
  leaves, tree = jax.tree_util.tree_flatten_with_path(cache)
  blocks = [_block_index(path) for path, _ in leaves]
  # The longest block is `block_size` long (all but the last are): block j starts at j times that.
  size = max((x.shape[ax] for (_, x), ax, j in zip(leaves, slot_axes, blocks) if j is not None), default=0)
  out = []
  for (_, x), batch_axis, slot_axis, j in zip(leaves, batch_axes, slot_axes, blocks):
    gather = lambda x, axis=batch_axis: jnp.take(x, index, axis=axis)
    if slot_axis is None:
      out.append(x)
    elif not j:  # the first block, or positions and segment ids
      out.append(gather(x))
    else:
      out.append(jax.lax.cond(j * size < filled, gather, lambda x: x, x))
  return tree.unflatten(out)


@functools.partial(jax.jit, static_argnames=('model', 'beam_size', 'max_len'))
def _beam_search(model, params, inputs, prompts, lengths, alpha, *, beam_size, max_len):
  model, params = _unrolled(model, params)
  batch, beams = lengths.shape[0], beam_size
  cache, logits, step = _prefill(model, params, inputs, prompts, batch, max_len)
  vocab = logits.shape[-1]
  axes, slot_axes = _cache_axes(model, cache, 0), _cache_axes(model, cache, 1)
  # Every beam starts as a copy of its row's prefill; only beam 0 is alive so the copies never compete.
  cache = _gather_batch(cache, axes, jnp.repeat(jnp.arange(batch), beams))
  prefilled = 1 + (0 if prompts is None else prompts.shape[1])  # BOS and the prompt
  logits = jnp.repeat(logits, beams, axis=0)
  rows = jnp.arange(batch)[:, None]
  best_possible_penalty = length_penalty(lengths, alpha)

  def select(i, cache, alive, alive_logp, finished, scores, done, logits):
    logp = _no_pad(jax.nn.log_softmax(logits)).reshape(batch, beams, vocab)
    candidates = (alive_logp[:, :, None] + logp).reshape(batch, beams * vocab)
    # At most `beams` of the top 2 * beams candidates end in EOS, so `beams` of them can stay alive.
    top_logp, top = jax.lax.top_k(candidates, 2 * beams)
    parent, token = top // vocab, (top % vocab).astype(jnp.int32)
    seqs = alive[rows, parent].at[:, :, i].set(token)
    at_limit = (i + 1 >= lengths)[:, None]
    ends = (token == EOS_ID) | at_limit

    # Only the `beams` best candidates may finish (so a beam of one is greedy search); the rest of the
    # top 2 * beams are there to refill the alive beams.
    finishes = ends & (jnp.arange(2 * beams) < beams) & ~done[:, None]
    new_scores = jnp.where(finishes, top_logp / length_penalty(i + 1, alpha), -jnp.inf)
    scores, keep = jax.lax.top_k(jnp.concatenate([scores, new_scores], axis=1), beams)
    finished = jnp.concatenate([finished, seqs], axis=1)[rows, keep]

    alive_logp, keep = jax.lax.top_k(jnp.where(ends, -jnp.inf, top_logp), beams)
    alive = seqs[rows, keep]
    # Log-probs only fall and, with alpha >= 0, the penalty only helps longer hypotheses: the best
    # alive one can at most reach its current log-prob over the penalty of the row's length limit.
    bound = alive_logp[:, 0] / best_possible_penalty
    done = done | at_limit[:, 0] | (bound <= scores[:, -1])
    parents = (rows * beams + parent[rows, keep]).reshape(-1)
    cache = _reorder_beams(cache, axes, slot_axes, parents, prefilled + i)  # i tokens fed after the prefill
    return i + 1, cache, alive, alive_logp, finished, scores, done

  def body(state):
    i, cache, alive = state[:3]
    logits, cache = step(cache, alive[:, :, i - 1].reshape(-1), i - 1)
    return select(i, cache, *state[2:], logits)

  empty = jnp.zeros((batch, beams, max_len), jnp.int32)
  alive_logp = jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf) * jnp.ones((batch, 1))
  no_scores = jnp.full((batch, beams), -jnp.inf)
  state = select(0, cache, empty, alive_logp, empty, no_scores, jnp.zeros((batch,), bool), logits)
  state = jax.lax.while_loop(lambda s: (s[0] < max_len) & ~s[-1].all(), body, state)
  return state[4], state[5], state[0]  # and the number of steps taken (early stopping, for tests)
