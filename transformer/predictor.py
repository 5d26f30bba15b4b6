"""A model bound to its parameters for decoding: what a task's metrics and samples call."""

import jax

from transformer import decoding


class Predictor:
  """`generate` / `beam_search` of `transformer.decoding` with the model and parameters filled in.

  Sampling keys come from `fold_in(seed, step)`, so samples logged at a step are reproducible.
  """

  def __init__(self, model, params, step: int = 0, seed: int = 0):
    self.model, self.params, self.step = model, params, step
    self._rng = jax.random.fold_in(jax.random.key(seed), step)

  def generate(self, rng=None, **kwargs):
    if kwargs.get('method', 'greedy') == 'sample' and rng is None:
      self._rng, rng = jax.random.split(self._rng)
    return decoding.generate(self.model, self.params, rng=rng, **kwargs)

  def beam_search(self, **kwargs):
    return decoding.beam_search(self.model, self.params, **kwargs)
