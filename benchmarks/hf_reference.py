"""The reference for cached greedy decoding: HF transformers' GPT-2 `generate`, built with our LM's shape.

GPT-2 is our decoder-only LM with `positional='learned'`, `activation='gelu'` (tanh form), pre-LN
LayerNorm and tied embeddings, except that its attention projections have biases (4 d_model per layer
more parameters; zero biases make it compute our function, see `copy_ours`). The weights are random:
only the speed is compared. `generate` runs as a user runs it: KV cache on, greedy, PyTorch's default
threads, SDPA attention; `eos_token_id=None`, so every row decodes the full length, as ours does with
`bench.never_eos`.
"""

import math
import time

import numpy as np
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

torch.set_flush_denormal(True)

PAD_ID, BOS_ID = 0, 1  # transformer.tokens, without importing the library


def check_supported(cfg) -> None:
  """Raises ValueError for a `ModelConfig` GPT-2 cannot mirror."""
  wanted = dict(
    kind='decoder_only',
    norm_position='pre',
    norm_type='layernorm',
    positional='learned',
    activation='gelu',
    tie_embeddings=True,
  )
  for key, value in wanted.items():
    if getattr(cfg, key) != value:
      raise ValueError(f'the GPT-2 reference needs model.{key}={value!r}, not {getattr(cfg, key)!r}')
  if cfg.kv_heads != cfg.num_heads or cfg.head_dim_qk * cfg.num_heads != cfg.d_model or cfg.attention_window:
    raise ValueError('the GPT-2 reference needs num_kv_heads=0, d_k = d_v = d_model / num_heads and full attention')


def gpt2_config(cfg) -> GPT2Config:
  check_supported(cfg)
  return GPT2Config(
    vocab_size=cfg.vocab_size,
    n_positions=cfg.max_len,
    n_embd=cfg.d_model,
    n_layer=cfg.num_decoder_layers,
    n_head=cfg.num_heads,
    n_inner=cfg.d_ff,
    activation_function='gelu_new',
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    layer_norm_epsilon=cfg.norm_epsilon,
    tie_word_embeddings=True,
    bos_token_id=BOS_ID,
    eos_token_id=None,
    pad_token_id=PAD_ID,
    attn_implementation='sdpa',
  )


def build(cfg, seed: int = 0) -> GPT2LMHeadModel:
  torch.manual_seed(seed)
  return GPT2LMHeadModel(gpt2_config(cfg)).eval()


def count_params(model) -> int:
  return sum(p.numel() for p in model.parameters())


def copy_ours(model: GPT2LMHeadModel, params, cfg) -> None:
  """Loads our decoder-only parameters (a nested dict of arrays, unscanned layers) into `model`.

  Ours scales the token embedding by sqrt(d_model) and ties the unscaled table to the logits; GPT-2
  scales neither. So the table goes in scaled, and the final norm's scale and bias divided by the same
  factor: the logits `final_norm(h) @ E^T` come out unchanged. The projections' biases are zero.
  """
  d, root = cfg.d_model, math.sqrt(cfg.d_model)
  t = lambda x: torch.from_numpy(np.asarray(x, np.float32).copy())
  stack = params['decoder']['stack']
  gpt = model.transformer
  with torch.no_grad():
    gpt.wte.weight.copy_(t(params['embedding']['embedding']) * root)
    gpt.wpe.weight.copy_(t(params['decoder']['embedder']['position_embedding']['embedding']))
    for i, block in enumerate(gpt.h):
      layer = stack[f'layer_{i}']
      attention = layer['self_attention']
      # GPT-2's Conv1D stores [in, out], the layout of our kernels.
      qkv = [np.asarray(attention[name]['kernel']).reshape(d, -1) for name in ('query', 'key', 'value')]
      block.attn.c_attn.weight.copy_(t(np.concatenate(qkv, axis=1)))
      block.attn.c_attn.bias.zero_()
      block.attn.c_proj.weight.copy_(t(np.asarray(attention['out']['kernel']).reshape(-1, d)))
      block.attn.c_proj.bias.zero_()
      for name, norm in (('self_attention_norm', block.ln_1), ('ffn_norm', block.ln_2)):
        norm.weight.copy_(t(layer[name]['scale']))
        norm.bias.copy_(t(layer[name]['bias']))
      for ours, theirs in (('wi', block.mlp.c_fc), ('wo', block.mlp.c_proj)):
        theirs.weight.copy_(t(layer['ffn'][ours]['kernel']))
        theirs.bias.copy_(t(layer['ffn'][ours]['bias']))
    gpt.ln_f.weight.copy_(t(stack['final_norm']['scale']) / root)
    gpt.ln_f.bias.copy_(t(stack['final_norm']['bias']) / root)


class GenerateBench:
  """`model.generate` of `decode_len` greedy tokens after `batch` random prompts of `prompt_len` tokens."""

  def __init__(self, cfg, batch: int, prompt_len: int, decode_len: int, seed: int = 0):
    self.model = build(cfg, seed)
    generator = torch.Generator().manual_seed(seed)
    self.prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=generator)
    self.config = GenerationConfig(
      max_new_tokens=decode_len,
      do_sample=False,
      num_beams=1,
      use_cache=True,
      eos_token_id=None,
      pad_token_id=PAD_ID,
    )
    self.tokens = batch * decode_len

  def call(self):
    with torch.inference_mode():
      return self.model.generate(
        self.prompts, attention_mask=torch.ones_like(self.prompts), generation_config=self.config
      )

  def timed(self) -> float:
    start = time.perf_counter()
    out = self.call()
    seconds = time.perf_counter() - start
    assert out.shape[1] == self.prompts.shape[1] + self.tokens // self.prompts.shape[0], out.shape
    return seconds
