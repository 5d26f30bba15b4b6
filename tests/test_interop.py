"""Hugging Face checkpoints in and out (transformer/interop/): tiny randomly initialised `transformers` models of
each family (GPT-2, Llama with GQA and llama3 RoPE scaling, Marian) saved as safetensors, imported, and compared
with PyTorch: logits on padded batches (float32, max |diff| < 1e-4), greedy generations token for token; our
models exported and read back bitwise and by `transformers`. Every weight is randomised (biases and norms too), so a
weight mapped to the wrong place changes the logits. Skips without torch/transformers, fails under CI=true."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import decoding, models
from transformer.config import ConfigError, ModelConfig
from transformer.interop import hf
from transformer.interop import init as init_lib

if os.environ.get('CI') == 'true':  # CI installs the `hf` extra: a missing one must not pass as skipped
  import torch
  import transformers
else:
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
TOLERANCE = 1e-4


def _randomise(model, seed=0):
  """Every parameter moved off its initial value (HF zeroes biases, sets norms to one): a mapping mistake in any
  of them shows in the logits."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'embed_positions' in name:  # Marian's sinusoids: computed, never saved
        continue
      p.add_(0.1 * torch.randn(p.shape, generator=generator))
  return model.eval()


def gpt2(tied=True):
  config = transformers.GPT2Config(
    n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32, tie_word_embeddings=tied, **TOKEN_IDS
  )
  return _randomise(transformers.GPT2LMHeadModel(config))


def llama(tied=False):
  rope = dict(
    rope_type='llama3',
    rope_theta=500.0,
    factor=4.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
  )  # a short original context: the scaled and the smoothed bands both fall among the test's frequencies
  config = transformers.LlamaConfig(
    num_hidden_layers=2,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=tied,
    rope_parameters=rope,
    **TOKEN_IDS,
  )
  return _randomise(transformers.LlamaForCausalLM(config))


def marian():
  config = transformers.MarianConfig(
    encoder_layers=2,
    decoder_layers=2,
    d_model=32,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    vocab_size=100,
    max_position_embeddings=64,
    scale_embedding=True,
    activation_function='gelu',
    decoder_start_token_id=1,
    forced_eos_token_id=None,
    **TOKEN_IDS,
  )
  return _randomise(transformers.MarianMTModel(config))


FAMILIES = {'gpt2': gpt2, 'gpt2_untied': lambda: gpt2(tied=False), 'llama': llama, 'llama_tied': lambda: llama(True)}


def save(model, path, shard=None):
  model.save_pretrained(path, safe_serialization=True, **({'max_shard_size': shard} if shard else {}))
  return str(path)


def batch(seed=0, rows=3, length=12, vocab=100):
  """Right-padded token rows of different lengths (ids >= 3), with their lengths."""
  rng = np.random.default_rng(seed)
  lengths = np.array([length, length - 5, length - 2][:rows])
  tokens = rng.integers(3, vocab, (rows, length))
  tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
  return tokens.astype(np.int32), lengths


def ours_decoder_logits(cfg, params, tokens):
  segments = (tokens != 0).astype(np.int32)
  return np.asarray(models.build_model(cfg).apply({'params': params}, jnp.asarray(tokens), segment_ids=segments))


def torch_logits(model, **inputs):
  with torch.no_grad():
    return model(**{k: torch.as_tensor(np.asarray(v, np.int64)) for k, v in inputs.items()}).logits.numpy()


def assert_close_where(ours, theirs, mask):
  diff = np.abs(ours - theirs)[mask]
  assert diff.max() < TOLERANCE, diff.max()


def compare_decoder_only(model, cfg, params):
  tokens, _ = batch()
  mask = tokens != 0
  theirs = torch_logits(model, input_ids=tokens, attention_mask=mask)
  assert_close_where(ours_decoder_logits(cfg, params, tokens), theirs, mask)


@pytest.mark.parametrize(
  'name,shard', [('gpt2', '20KB'), ('gpt2_untied', None), ('llama', '30KB'), ('llama_tied', None)]
)
def test_decoder_only_import_matches_pytorch_logits_and_greedy_generations(tmp_path, name, shard):
  model = FAMILIES[name]()
  path = save(model, tmp_path, shard)
  if shard:
    assert os.path.exists(os.path.join(path, hf.INDEX_FILE)), os.listdir(path)
  cfg, params = hf.import_checkpoint(path)
  assert cfg.tie_embeddings == model.config.tie_word_embeddings
  compare_decoder_only(model, cfg, params)
  # greedy: ours batched with right-padded prompts, theirs row by row from [BOS, prompt]
  prompts, lengths = batch(seed=1, length=6)
  ours = np.asarray(decoding.generate(models.build_model(cfg), params, prompts=jnp.asarray(prompts), max_len=8))
  for row in range(len(prompts)):
    prompt = torch.as_tensor([[1, *prompts[row, : lengths[row]]]])
    with torch.no_grad():
      out = model.generate(prompt, max_new_tokens=8, do_sample=False, suppress_tokens=[0], eos_token_id=2)
    theirs = out[0, prompt.shape[1] :].tolist()
    mine = ours[row].tolist()
    mine = mine[: mine.index(2) + 1] if 2 in mine else mine
    assert mine == theirs[: len(mine)] and len(mine) == len(theirs), (row, mine, theirs)


def test_llama_import_reads_gqa_rope_base_and_llama3_scaling(tmp_path):
  cfg, _ = hf.import_checkpoint(save(llama(), tmp_path))
  assert (cfg.num_heads, cfg.kv_heads, cfg.rope_base, cfg.rope_scaling) == (4, 2, 500.0, 'llama3')
  assert (cfg.rope_scaling_factor, cfg.rope_original_max_len, cfg.norm_epsilon) == (4.0, 16, 1e-5)


def test_marian_import_matches_pytorch_logits_and_greedy_generations(tmp_path):
  model = marian()
  cfg, params = hf.import_checkpoint(save(model, tmp_path, '40KB'))
  assert (cfg.kind, cfg.sinusoidal_layout, cfg.activation, cfg.scale_embeddings) == (
    'encoder_decoder',
    'split',
    'gelu_exact',
    True,
  )
  source, _ = batch(seed=2)
  targets, _ = batch(seed=3, length=10)
  decoder_inputs = np.asarray(models.shift_right(jnp.asarray(targets)))
  ours = models.build_model(cfg).apply(
    {'params': params},
    jnp.asarray(source),
    jnp.asarray(decoder_inputs),
    inputs_segment_ids=jnp.asarray((source != 0).astype(np.int32)),
    decoder_segment_ids=jnp.asarray((decoder_inputs != 0).astype(np.int32)),
  )
  theirs = torch_logits(
    model,
    input_ids=source,
    attention_mask=source != 0,
    decoder_input_ids=decoder_inputs,
    decoder_attention_mask=decoder_inputs != 0,
  )
  assert_close_where(np.asarray(ours), theirs, decoder_inputs != 0)
  generated = np.asarray(decoding.generate(models.build_model(cfg), params, inputs=jnp.asarray(source), max_len=8))
  with torch.no_grad():
    out = model.generate(
      torch.as_tensor(source, dtype=torch.long),
      attention_mask=torch.as_tensor(source != 0),
      max_new_tokens=8,
      do_sample=False,
      num_beams=1,
      suppress_tokens=[0],
      eos_token_id=2,
      decoder_start_token_id=1,
    )
  for row in range(len(source)):
    mine, theirs = generated[row].tolist(), out[row, 1:].tolist()
    mine = mine[: mine.index(2) + 1] if 2 in mine else mine
    assert mine == theirs[: len(mine)], (row, mine, theirs)


def ours_random(cfg, seed=0):
  """Our model of `cfg` with every parameter random (biases and norm scales too)."""
  params = models.init_params(models.build_model(cfg), jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


EXPORTABLE = {
  'gpt2': dict(
    kind='decoder_only',
    positional='learned',
    norm_position='pre',
    attention_bias=True,
    scale_embeddings=False,
    activation='gelu',
    norm_epsilon=1e-5,
  ),
  'llama': dict(
    kind='decoder_only',
    positional='rope',
    norm_position='pre',
    norm_type='rmsnorm',
    activation='swiglu',
    scale_embeddings=False,
    tie_embeddings=False,
    num_kv_heads=2,
    d_k=16,
    d_v=16,
    rope_scaling='llama3',
    rope_scaling_factor=4.0,
    rope_original_max_len=16,
    rope_base=500.0,
  ),
  'marian': dict(
    kind='encoder_decoder',
    sinusoidal_layout='split',
    attention_bias=True,
    norm_epsilon=1e-5,
    activation='silu',
  ),
}


@pytest.mark.parametrize('name', list(EXPORTABLE))
def test_export_round_trips_bitwise_and_transformers_gives_the_same_logits(tmp_path, name):
  cfg = ModelConfig(
    vocab_size=100,
    num_encoder_layers=2,
    num_decoder_layers=2,
    d_model=32,
    d_ff=64,
    num_heads=4,
    max_len=32,
    dropout_rate=0.0,
    **EXPORTABLE[name],
  )
  params = ours_random(cfg)
  path = hf.export_checkpoint(cfg, params, str(tmp_path / 'hf'))
  back_cfg, back = hf.import_checkpoint(path, dropout_rate=0.0, attention_dropout_rate=0.0)
  assert not init_lib.mismatches(cfg, back_cfg)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, back)
  tokens, _ = batch(seed=4)
  mask = tokens != 0
  if cfg.kind == 'decoder_only':
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert_close_where(
      ours_decoder_logits(cfg, params, tokens), torch_logits(model, input_ids=tokens, attention_mask=mask), mask
    )
  else:
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    decoder_inputs = np.asarray(models.shift_right(jnp.asarray(tokens[:, ::-1].copy())))
    ours = models.build_model(cfg).apply(
      {'params': params},
      jnp.asarray(tokens),
      jnp.asarray(decoder_inputs),
      decoder_segment_ids=jnp.asarray((decoder_inputs != 0).astype(np.int32)),
    )
    theirs = torch_logits(
      model,
      input_ids=tokens,
      attention_mask=mask,
      decoder_input_ids=decoder_inputs,
      decoder_attention_mask=decoder_inputs != 0,
    )
    assert_close_where(np.asarray(ours), theirs, decoder_inputs != 0)


def test_export_round_trips_a_scanned_model(tmp_path):
  cfg = ModelConfig(
    vocab_size=100,
    num_decoder_layers=2,
    d_model=32,
    d_ff=64,
    num_heads=4,
    max_len=32,
    scan_layers=True,
    **EXPORTABLE['llama'],
  )
  params = ours_random(cfg)
  _, back = hf.import_checkpoint(hf.export_checkpoint(cfg, params, str(tmp_path)), scan_layers=True)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, back)


@pytest.mark.parametrize(
  'overrides,named',
  [
    (dict(kind='decoder_only', positional='alibi', norm_position='pre'), 'positional'),
    (dict(kind='decoder_only', positional='rope', norm_position='post'), 'norm_position'),
    (
      dict(kind='decoder_only', positional='rope', norm_position='pre', attention_pattern='strided', pattern_block=4),
      'attention_pattern',
    ),
    (dict(kind='decoder_only', positional='learned', norm_position='pre', attention_window=4), 'attention_window'),
    (dict(EXPORTABLE['gpt2'], num_kv_heads=2), 'num_kv_heads'),
    (dict(EXPORTABLE['llama'], activation='gelu'), 'activation'),
    (dict(EXPORTABLE['marian'], sinusoidal_layout='interleaved'), 'sinusoidal_layout'),
    (dict(EXPORTABLE['marian'], tie_embeddings=False), 'tie_embeddings'),
  ],
)
def test_export_of_a_model_without_hf_equivalent_names_the_setting(tmp_path, overrides, named):
  cfg = ModelConfig(
    vocab_size=100, num_decoder_layers=1, num_encoder_layers=1, d_model=32, d_ff=64, num_heads=4, **overrides
  )
  with pytest.raises(ConfigError, match=f'config.model.{named}='):
    hf.export_checkpoint(cfg, {}, str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def _edit_config(path, **changes):
  file = os.path.join(path, 'config.json')
  with open(file) as f:
    config = json.load(f)
  config.update(changes)
  with open(file, 'w') as f:
    json.dump(config, f)


@pytest.mark.parametrize(
  'family,changes,named',
  [
    ('llama', dict(hidden_act='gelu'), 'hidden_act'),
    ('llama', dict(mlp_bias=True), 'mlp_bias'),
    ('llama', dict(rope_parameters=dict(rope_type='yarn', rope_theta=1e4, factor=2.0)), 'rope_type'),
    ('gpt2', dict(activation_function='quick_gelu'), 'activation_function'),
    ('gpt2', dict(scale_attn_by_inverse_layer_idx=True), 'scale_attn_by_inverse_layer_idx'),
    ('gpt2', dict(model_type='bert'), 'model_type'),
  ],
)
def test_import_of_what_config_model_cannot_express_names_the_hf_setting(tmp_path, family, changes, named):
  path = save(FAMILIES[family](), tmp_path)
  _edit_config(path, **changes)
  with pytest.raises(ConfigError, match=named):
    hf.import_checkpoint(path)


def test_import_refuses_pickle_and_a_nonzero_marian_logits_bias(tmp_path):
  (tmp_path / 'pt').mkdir()
  _ = save(gpt2(), tmp_path / 'pt')
  os.remove(tmp_path / 'pt' / 'model.safetensors')
  (tmp_path / 'pt' / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(ConfigError, match='pickle'):
    hf.import_checkpoint(str(tmp_path / 'pt'))
  model = marian()
  model.final_logits_bias.add_(1.0)
  with pytest.raises(ConfigError, match='final_logits_bias'):
    hf.import_checkpoint(save(model, tmp_path / 'marian'))


def _finetune_config(path, **train):
  from experiments import synthetic

  config = synthetic.get_config('lm_copy')
  config.model.update(hf.model_settings(path))  # the checkpoint's architecture (its dropout rates too)
  config.data.update(num_train=64, num_eval=8)
  config.train.update(
    dict(num_steps=1, batch_size=8, learning_rate=0.0, warmup_steps=0, eval_every=1, checkpoint_every=1),
    num_samples=0,
    init_from=path,
    **train,
  )
  return config


@pytest.mark.slow(15)
def test_init_from_a_hf_directory_then_export_it_back_with_the_cli(tmp_path):
  from transformer import checkpoint, loop

  model = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      num_hidden_layers=2,
      hidden_size=32,
      intermediate_size=64,
      num_attention_heads=4,
      num_key_value_heads=2,
      vocab_size=32,
      max_position_embeddings=64,
      **TOKEN_IDS,
    )
  )
  path = save(_randomise(model), tmp_path / 'hf')
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(_finetune_config(path), workdir)  # learning rate 0: step 1 keeps the step-0 parameters
  with checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'), async_save=False) as ckpts:
    trained, step = ckpts.read_params()
  _, imported = hf.import_checkpoint(path)
  assert step == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), trained, imported)

  # a resumed run continues from its checkpoints: init_from is not read again
  resumed = _finetune_config(path, num_steps=2)
  resumed.train.init_from = str(tmp_path / 'nowhere')
  loop.train_and_evaluate(resumed, workdir)
  # a model that is not the checkpoint's is refused, naming the key
  wrong = _finetune_config(path)
  wrong.model.norm_epsilon = 1e-3
  with pytest.raises(ConfigError, match=r'config.model.norm_epsilon=0.001: the source has 1e-06'):
    loop.train_and_evaluate(wrong, str(tmp_path / 'wrong'))

  # init_from one of our workdirs: its latest step (2; learning rate 0, so still the imported parameters)
  # into a pmap run (one copy per device) with scanned layers: both free to differ from the source
  again = _finetune_config(path, parallelism='pmap')
  again.train.init_from = workdir
  again.model.scan_layers = True
  loop.train_and_evaluate(again, str(tmp_path / 'again'))
  with checkpoint.Checkpoints(str(tmp_path / 'again' / 'checkpoints'), async_save=False) as ckpts:
    scanned = models.stack_layers(imported)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), ckpts.read_params()[0], scanned)

  # --mode export with the workdir only (its config.json), and transformers reads it with the same logits
  subprocess.run(
    [sys.executable, 'launch.py', '--workdir', workdir, '--mode', 'export', '--config.export.format=hf'],
    cwd=ROOT,
    check=True,
    capture_output=True,
    text=True,
    timeout=300,
  )
  exported = os.path.join(workdir, 'export', 'hf')
  back = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
  tokens, _ = batch(seed=5, vocab=32)
  mask = tokens != 0
  assert_close_where(
    torch_logits(back, input_ids=tokens, attention_mask=mask),
    torch_logits(model, input_ids=tokens, attention_mask=mask),
    mask,
  )


def test_init_from_refuses_a_directory_that_is_neither(tmp_path):
  with pytest.raises(ConfigError, match='neither a Hugging Face model directory'):
    init_lib.load(str(tmp_path), ModelConfig())
  with pytest.raises(ConfigError, match='is not a directory'):
    init_lib.load(str(tmp_path / 'missing'), ModelConfig())
