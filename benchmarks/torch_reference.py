"""The benchmark's decoder-only LM and AdamW step in PyTorch eager, written as fast as PyTorch allows
on a CPU, as the reference our JAX train step is measured against.

It mirrors `transformer.models.DecoderOnly` for the shapes `experiments/bench.py` uses (pre-LN,
LayerNorm, ReLU or GELU, sinusoidal or learned positions, tied embeddings, no dropout): the same parameters
(counts checked by tests), the same initial scales, the same loss, metrics and optimizer
(AdamW with decay on matrices only and global-norm clipping).

Speed choices: `F.scaled_dot_product_attention(is_causal=True)` (the fused kernel), fused QKV
projection, `set_flush_denormal(True)` (without it, denormal numbers that appear after a few updates
slow the CPU kernels several-fold, which would flatter the comparison), the fused (else foreach)
AdamW, gradients set to None rather than zeroed.
"""

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

torch.set_flush_denormal(True)

PAD_ID, BOS_ID = 0, 1


def check_supported(cfg) -> None:
  """Raises ValueError for a `ModelConfig` this reference does not mirror."""
  wanted = dict(kind='decoder_only', norm_position='pre', norm_type='layernorm', tie_embeddings=True)
  for key, value in wanted.items():
    if getattr(cfg, key) != value:
      raise ValueError(f'the PyTorch reference needs model.{key}={value!r}, not {getattr(cfg, key)!r}')
  if cfg.positional not in ('sinusoidal', 'learned'):
    raise ValueError(f'the PyTorch reference needs model.positional sinusoidal or learned, not {cfg.positional!r}')
  if cfg.activation not in ('relu', 'gelu') or cfg.kv_heads != cfg.num_heads or cfg.dropout_rate:
    raise ValueError('the PyTorch reference needs activation relu/gelu, num_kv_heads=0 and no dropout')
  if cfg.attention_window:
    raise ValueError('the PyTorch reference has no sliding-window attention')


def sinusoidal(length: int, d_model: int) -> torch.Tensor:
  """The paper's encoding, interleaved sin/cos exactly as `transformer.layers.sinusoidal`."""
  dims = torch.arange(0, d_model, 2, dtype=torch.float32)
  angles = torch.arange(length, dtype=torch.float32)[:, None] / (10000.0 ** (dims / d_model))
  return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(length, -1)[:, :d_model]


class Block(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    d, h, dk, dv = cfg.d_model, cfg.num_heads, cfg.head_dim_qk, cfg.head_dim_v
    self.heads, self.dk, self.dv = h, dk, dv
    self.attention_norm = nn.LayerNorm(d, eps=cfg.norm_epsilon)
    # One matmul for q, k and v; initialised per projection (each its own Glorot fan) as in Flax.
    self.qkv = nn.Linear(d, h * (2 * dk + dv), bias=False)
    self.out = nn.Linear(h * dv, d, bias=False)
    self.ffn_norm = nn.LayerNorm(d, eps=cfg.norm_epsilon)
    self.wi = nn.Linear(d, cfg.d_ff)
    self.wo = nn.Linear(cfg.d_ff, d)
    self.activation = F.relu if cfg.activation == 'relu' else (lambda x: F.gelu(x, approximate='tanh'))
    with torch.no_grad():
      for part in self.qkv.weight.split([h * dk, h * dk, h * dv]):
        nn.init.xavier_uniform_(part)
      for layer in (self.out, self.wi, self.wo):
        nn.init.xavier_uniform_(layer.weight)
      nn.init.zeros_(self.wi.bias)
      nn.init.zeros_(self.wo.bias)

  def forward(self, x):
    batch, length, _ = x.shape
    q, k, v = self.qkv(self.attention_norm(x)).split(
      [self.heads * self.dk, self.heads * self.dk, self.heads * self.dv], dim=-1
    )
    heads = lambda t, size: t.view(batch, length, self.heads, size).transpose(1, 2)
    attended = F.scaled_dot_product_attention(heads(q, self.dk), heads(k, self.dk), heads(v, self.dv), is_causal=True)
    x = x + self.out(attended.transpose(1, 2).reshape(batch, length, -1))
    return x + self.wo(self.activation(self.wi(self.ffn_norm(x))))


class TorchLM(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    check_supported(cfg)
    self.d_model = cfg.d_model
    self.embedding = nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * cfg.d_model**-0.5)
    self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_decoder_layers))
    self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_epsilon)
    if cfg.positional == 'learned':  # std 0.02 as `transformer.layers.LearnedPositions`
      self.positions = nn.Parameter(torch.randn(cfg.max_len, cfg.d_model) * 0.02)
    else:
      self.register_buffer('positions', sinusoidal(cfg.max_len, cfg.d_model), persistent=False)

  def forward(self, tokens):
    x = F.embedding(tokens, self.embedding) * math.sqrt(self.d_model) + self.positions[: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.final_norm(x) @ self.embedding.t()


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def shift_right(targets):
  return F.pad(targets, (1, 0), value=BOS_ID)[:, :-1]


def make_optimizer(model, train_config):
  """AdamW as `transformer.optim` builds it: betas (0.9, 0.95), eps 1e-8, decay on matrices only."""
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  groups = [
    {'params': decay, 'weight_decay': float(train_config.weight_decay)},
    {'params': no_decay, 'weight_decay': 0.0},
  ]
  kwargs = dict(lr=float(train_config.learning_rate), betas=(0.9, 0.95), eps=1e-8)
  try:
    return torch.optim.AdamW(groups, fused=True, **kwargs), 'fused'
  except (RuntimeError, TypeError, ValueError):  # no fused CPU kernel in this build
    return torch.optim.AdamW(groups, foreach=True, **kwargs), 'foreach'


class TorchTrainBench:
  """One train step (forward, loss, backward, clip, AdamW, the same metrics as ours), timed per step."""

  def __init__(self, model_config, train_config, batch_size: int, seq_len: int, compile: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    self.model = TorchLM(model_config)
    self.params = count_params(self.model)
    self.optimizer, self.optimizer_kind = make_optimizer(self.model, train_config)
    self.clip = float(train_config.grad_clip)
    generator = torch.Generator().manual_seed(seed)
    self.targets = torch.randint(3, model_config.vocab_size, (batch_size, seq_len), generator=generator)
    self.inputs = shift_right(self.targets)
    self.forward = torch.compile(self.model) if compile else self.model
    self.compile_s = None
    self.last_loss = None

  def _step(self):
    logits = self.forward(self.inputs)
    flat_logits, flat_targets = logits.view(-1, logits.shape[-1]), self.targets.view(-1)
    loss = F.cross_entropy(flat_logits, flat_targets)
    loss.backward()
    grad_norm = (
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True) if self.clip > 0 else None
    )
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
      accuracy = (flat_logits.argmax(-1) == flat_targets).float().mean()
      param_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(self.model.parameters()))))
    return loss.detach(), accuracy, grad_norm, param_norm

  def step(self) -> float:
    start = time.perf_counter()
    loss, *_ = self._step()
    self.last_loss = float(loss)  # eager CPU ops are synchronous: nothing is left running
    seconds = time.perf_counter() - start
    if self.compile_s is None:
      self.compile_s = seconds
    return seconds

  def times(self, count: int) -> list[float]:
    return [self.step() for _ in range(count)]


def measure_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
  """Best-of-`repeats` float32 matmul rate (MKL / oneDNN): the same measurement as ours, in PyTorch."""
  a = torch.ones(size, size)
  a @ a
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best
