"""`config.train.eval_lengths`: the eval set cut into windows of other lengths, each loss exactly the token-weighted
mean of a direct forward pass; lengths a model cannot take are a null with a note, tasks that cannot are refused
before anything is built, and the setting may change on resume."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the experiments package
from conftest import PEAK_FLOPS

from experiments import music as music_experiment  # noqa: E402
from experiments import synthetic as synthetic_experiment  # noqa: E402
from experiments import text as text_experiment  # noqa: E402
from experiments import translation as translation_experiment  # noqa: E402
from transformer import loop, setup, tasks, workdir  # noqa: E402
from transformer.config import ConfigError, TrainConfig  # noqa: E402
from transformer.experiment import run  # noqa: E402
from transformer.tasks import text  # noqa: E402
from transformer.tokens import BOS_ID  # noqa: E402

_WORDS = 'the a cat dog sees runs big small red green house tree'.split()
SEQ_LEN = 16


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """Documents of 30-60 words (longer than every eval length in tokens), as training and eval files."""
  folder = tmp_path_factory.mktemp('corpus')
  rng = np.random.default_rng(0)
  docs = [' '.join(rng.choice(_WORDS, rng.integers(30, 60))) for _ in range(48)]
  (folder / 'train.txt').write_text('\n'.join(docs[:40]) + '\n')
  (folder / 'dev.txt').write_text('\n'.join(docs[40:]) + '\n')
  os.environ['TRANSFORMER_CACHE'] = str(folder / 'cache')  # the tokenizer of this corpus
  return folder


def text_config(corpus, eval_lengths, **model):
  config = text_experiment.get_config('tiny')
  config.model.update(num_decoder_layers=1, d_model=32, d_ff=48, num_heads=2, dropout_rate=0.0, **model)
  config.data.update(
    corpus='files',
    train_files=str(corpus / 'train.txt'),
    eval_files=str(corpus / 'dev.txt'),
    vocab_size=40,
    seq_len=SEQ_LEN,
    sample_len=4,
  )
  config.train.update(
    num_steps=2,
    batch_size=4,
    log_every=2,
    eval_every=2,
    checkpoint_every=2,
    num_samples=0,
    peak_flops=PEAK_FLOPS,  # no matmul timed for MFU
    eval_lengths=eval_lengths,
  )
  return config


def eval_rows(path):
  with open(path / 'metrics.jsonl') as f:
    return [row for row in map(json.loads, f) if 'eval/loss' in row]


def direct_loss(model, params, windows, length):
  """Token-weighted mean cross-entropy (float64, numpy) over `windows` from one `model.apply` on all of them:
  each row is BOS then its window's tokens but the last (the targets), then PAD up to `length`. Causal attention
  keeps that padding out of every real position's logits, and only real positions are summed."""
  inputs = np.zeros((len(windows), length), np.int32)
  for row, window in enumerate(windows):
    inputs[row, : len(window)] = np.concatenate([[BOS_ID], window[:-1]])
  forward = jax.jit(lambda params, inputs: model.apply({'params': params}, inputs, deterministic=True))
  logits = np.asarray(forward(params, jnp.asarray(inputs)), np.float64)
  total = 0.0
  for row, window in enumerate(windows):
    real = logits[row, : len(window)]
    top = real.max(-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(real - top).sum(-1))
    total += float(np.sum(log_z - real[np.arange(len(window)), window]))
  count = sum(map(len, windows))
  return total / count, count


@pytest.mark.slow(6)  # measured in the whole suite (pytest -n 2); 45 s once at a load average of 10
def test_each_length_is_the_token_weighted_loss_of_a_direct_forward_pass(corpus, tmp_path):
  config = text_config(corpus, (SEQ_LEN, 40), positional='rope')
  loop.train_and_evaluate(config, str(tmp_path))
  (row,) = eval_rows(tmp_path)
  assert row['eval/loss@16'] == pytest.approx(row['eval/loss'], rel=1e-6)  # the training length: the same eval

  built, _, ckpts, state, step = loop._prepare_latest(config, str(tmp_path), 'check')
  ckpts.close()
  assert step == row['step'] == 2
  params = state.params
  eval_ids = built.task.tokenizer.encode_batch(open(corpus / 'dev.txt').read().splitlines())
  every_token = sum(len(ids) + 1 for ids in eval_ids)  # each document's tokens and its EOS
  for length in (SEQ_LEN, 40):
    windows = [w['targets'] for ids in eval_ids for w in text.windows(ids, length)]
    assert max(map(len, windows)) == length and len(windows) > len(eval_ids)  # documents really are cut
    loss, count = direct_loss(built.model, params, windows, length)
    assert row[f'eval/tokens@{length}'] == count == every_token  # no token twice (overlap), none left out
    assert row[f'eval/loss@{length}'] == pytest.approx(loss, rel=1e-5)
  assert row['eval/loss@16'] != pytest.approx(row['eval/loss@40'], rel=1e-3)  # the lengths differ in their losses
  assert 'eval/notes' not in row


@pytest.mark.slow(5)  # measured in the whole suite; 30 s once at a load average of 10
def test_learned_positions_past_max_len_are_null_with_a_note(corpus, tmp_path, capsys):
  config = text_config(corpus, (SEQ_LEN, 32, 64), positional='learned', max_len=SEQ_LEN)
  loop.train_and_evaluate(config, str(tmp_path))
  (row,) = eval_rows(tmp_path)
  assert row['eval/loss@16'] == pytest.approx(row['eval/loss'], rel=1e-6)
  assert row['eval/loss@32'] is None and row['eval/loss@64'] is None  # JSON null
  assert 'eval/tokens@32' not in row and 'eval/tokens@64' not in row
  note = 'learned positions end at config.model.max_len=16'
  assert row['eval/notes'] == f'loss@32: {note}; loss@64: {note}'
  out = capsys.readouterr().out
  assert 'loss@32 n/a  loss@64 n/a' in out and 'Training finished: step 2 of 2.' in out

  # --mode eval on its checkpoint: the same row (the same windows, state and eval step).
  results = loop.evaluate_checkpoint(config, str(tmp_path))
  assert {k: results[k] for k in row if k.startswith('eval/loss')} == {k: v for k, v in row.items() if 'loss' in k}
  assert results['eval/notes'] == row['eval/notes']


@pytest.mark.parametrize(
  'get_config, task, why',
  [
    (lambda: translation_experiment.get_config('tiny'), 'translation', 'its examples are sentence pairs'),
    (lambda: synthetic_experiment.get_config('copy'), 'copy', 'its examples are generated sequences'),
  ],
)
def test_a_task_that_cannot_is_refused_at_dry_run(get_config, task, why):
  config = get_config()
  run.dry_run(config)  # builds without eval_lengths
  config.train.eval_lengths = (64, 128)
  with pytest.raises(ConfigError) as error:
    run.dry_run(config)  # the --dry_run path: nothing trained or built
  assert str(error.value) == (
    f"config.train.eval_lengths=(64, 128): config.task='{task}' cannot be evaluated at other lengths ({why}, not "
    'windows cut from documents). Tasks that can: text, music. Set config.train.eval_lengths=() for this task.'
  )
  with pytest.raises(ConfigError, match='cannot be evaluated at other lengths'):
    setup.build(config)  # and training, before the task is built


def test_music_windows_at_each_length_as_training_cuts_them():
  config = music_experiment.get_config('toy')
  config.data.update(num_pieces=4, num_eval_pieces=6, seq_len=32)
  config.train.eval_lengths = (32, 12)
  setup.resolve(config)
  task = tasks.get_task(config)
  at_training = task.eval_windows(32)
  assert [w['targets'].tolist() for w in at_training] == [w['targets'].tolist() for w in task.eval_examples]
  short = task.eval_windows(12)
  assert max(len(w['targets']) for w in short) <= 12 and len(short) > len(at_training)
  # No note lost or repeated by the shorter windows (each window restarts at time 0: compare the rest of each note).
  notes = lambda windows: sorted(
    (n.voice, n.pitch, n.duration) for w in windows for n in task.vocab.decode(w['targets'])
  )
  assert notes(short) == notes(at_training) and len(notes(short)) > 0
  batch = next(iter(task.eval_batches(4, seq_len=12)))
  assert batch['targets'].shape == (4, 12)  # the same rows per batch at every length
  config.train.eval_lengths = (4,)
  with pytest.raises(ConfigError, match=r"config.train.eval_lengths=\(4,\): config.task='music' needs lengths of at"):
    setup.resolve(config)


@pytest.mark.parametrize('value', [(0,), (64, -5), ('abc',), 'abc', (64.0,), (True,)])
def test_invalid_eval_lengths_are_refused(value):
  with pytest.raises(ConfigError) as error:
    TrainConfig.from_config({'eval_lengths': value})
  assert str(error.value) == (
    f'config.train.eval_lengths={value!r} must be a tuple of positive whole numbers of tokens, e.g. '
    "--config.train.eval_lengths='(64,128,256)' (or () for none)."
  )


def test_a_length_named_twice_is_refused():
  with pytest.raises(ConfigError) as error:
    TrainConfig.from_config({'eval_lengths': (64, 128, 64)})
  assert str(error.value) == 'config.train.eval_lengths=(64, 128, 64) names a length twice: list each length once.'


def test_eval_lengths_read_back_from_config_json_lists():
  assert TrainConfig.from_config({'eval_lengths': [64, 128]}).eval_lengths == (64, 128)


def test_resuming_with_other_eval_lengths_is_allowed(tmp_path):
  folder = tmp_path / 'run'
  (folder / 'checkpoints' / '5').mkdir(parents=True)
  old = text_experiment.get_config('tiny')
  old.train.eval_lengths = (64, 128)
  (folder / 'config.json').write_text(json.dumps(old.to_dict()))
  assert workdir.has_checkpoints(str(folder))
  for lengths in ((256, 512), ()):
    new = text_experiment.get_config('tiny')
    new.train.eval_lengths = lengths
    workdir.check_resume(new, str(folder))
  new.model.max_len = 128  # this check does compare the configs: a change outside RESUMABLE is refused
  with pytest.raises(ConfigError, match='model.max_len'):
    workdir.check_resume(new, str(folder))
