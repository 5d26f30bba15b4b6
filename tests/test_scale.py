"""Scale correctness end to end, through the real `launch.py`: every parallel path trains on the same
examples and computes the same numbers as one device, resumes exactly after a process is killed, and
restores onto other topologies and layer layouts.

The model combines what users combine: a packed text LM (the real pipeline from text files, a trained
SentencePiece vocabulary), dropout and attention dropout, AdamW with weight decay, gradient clipping,
gradient accumulation, scanned and rematerialised layers.
"""

import json
import os
import random
import shutil

import launching
import numpy as np
import pytest

TEXT = 'experiments/text.py:tiny'
TRANSLATION = 'experiments/translation.py:tiny'
STEPS = 6
_WORDS = (
  'the of and to in that he shall unto for his a lord they be is him not them it with all thou was '
  'which my me said but ye their have will thee from as are when this out were by upon man king'
).split()


def _sentence(rng):
  return ' '.join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) + '.'


def _write_corpus(directory):
  directory.mkdir()
  rng = random.Random(0)
  for name, count in (('train', 400), ('eval', 40)):
    docs = [' '.join(_sentence(rng) for _ in range(rng.randint(1, 6))) for _ in range(count)]
    (directory / f'{name}.txt').write_text('\n'.join(docs) + '\n')
    pairs = [(s, ' '.join(reversed(s[:-1].split())) + '.') for s in (_sentence(rng) for _ in range(count))]
    (directory / f'{name}.tsv').write_text(''.join(f'{s}\t{t}\n' for s, t in pairs))


@pytest.fixture(scope='module')
def corpus(shared):
  """Documents (one per line) for the text LM and tab-separated pairs for translation; one folder per session,
  so that the reference run (which names its files) is shared too."""
  return shared('scale_corpus', 0, _write_corpus)


def _text(corpus, *extra):
  """The tiny text LM, shrunk to compile in seconds; `extra` overrides come last and win."""
  return (
    '--config.data.corpus=files',
    f'--config.data.train_files={corpus}/train.txt',
    f'--config.data.eval_files={corpus}/eval.txt',
    '--config.data.vocab_size=128',
    '--config.data.seq_len=32',
    '--config.model.d_model=32',
    '--config.model.d_ff=64',
    '--config.model.num_heads=4',
    '--config.model.num_decoder_layers=2',
    '--config.model.dropout_rate=0.1',
    '--config.model.attention_dropout_rate=0.1',
    '--config.train.batch_size=16',
    f'--config.train.num_steps={STEPS}',
    '--config.train.log_every=1',
    f'--config.train.eval_every={STEPS}',
    '--config.train.checkpoint_every=3',
    '--config.train.num_samples=0',
    '--config.train.warmup_steps=1',
    '--config.train.log_batch_digests=True',
    *extra,
  )


SCALED = ('--config.model.scan_layers=True', '--config.model.remat=full', '--config.train.grad_accum_steps=2')


def _mesh(data, fsdp, tensor):
  return (
    f'--config.train.mesh.data={data}',
    f'--config.train.mesh.fsdp={fsdp}',
    f'--config.train.mesh.tensor={tensor}',
  )


# name -> (overrides, devices per process, processes). The reference: 1 device, unrolled, no accumulation.
# Mixed meshes: (2,2,2) on 2 processes in the two-host test below; (2,2,2) and (1,2,4) on one process of 8
# devices, with scanned rematerialised layers, accumulation and dropout, in test_parallel.py (the Runner
# launch.py drives; the same feeding of one process's rows as data8 and tensor8 here).
LAYOUTS = {
  'data8': (SCALED + _mesh(8, 1, 1), 8, 1),
  'tensor8': (SCALED + _mesh(1, 1, 8), 8, 1),
  'pmap8': (SCALED + ('--config.train.parallelism=pmap',), 8, 1),
  'pmap_hosts2x4': (SCALED + ('--config.train.parallelism=pmap',), 4, 2),
}
HOSTS = (SCALED + _mesh(2, 2, 2), 4, 2)  # 2 processes: see the fault test


def _unrolled(params: dict) -> dict:
  """Scanned parameters (`.../layers/...` with a leading layer axis) under their unrolled names."""
  out = {}
  for name, value in params.items():
    parts = name.split('/')
    if 'layers' not in parts:
      out[name] = value
      continue
    at = parts.index('layers')
    for i, layer in enumerate(value):
      out['/'.join(parts[:at] + [f'layer_{i}'] + parts[at + 1 :])] = layer
  return out


def _assert_same_run(workdir, reference, steps=range(1, STEPS + 1)):
  want, got = launching.losses(reference), launching.losses(workdir)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5)
  digests, reference_digests = launching.batch_digests(workdir), launching.batch_digests(reference)
  for step in steps:  # the same examples, in the same rows, at every step
    assert digests[step] == reference_digests[step], step
  last_want, last_got = launching.metrics(reference)[STEPS], launching.metrics(workdir)[STEPS]
  np.testing.assert_allclose(last_got['eval/loss'], last_want['eval/loss'], rtol=1e-5)
  params, reference_params = (_unrolled(launching.checkpoint_params(w, STEPS)) for w in (workdir, reference))
  assert params.keys() == reference_params.keys()
  outside = 0
  for name, value in reference_params.items():
    # Adam's m / sqrt(v) turns float32 summation-order noise in a near-zero gradient into an update of
    # up to a few % of the learning rate: a rare element moves by ~1e-7..1e-6, anything wrong moves most.
    np.testing.assert_allclose(params[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    outside += int(np.sum(~np.isclose(params[name], value, rtol=1e-5, atol=1e-7)))
  assert outside <= 1e-3 * sum(v.size for v in reference_params.values()), outside


@pytest.fixture(scope='module')
def reference(corpus, shared):
  """The run on one device, made once per session."""
  args = _text(corpus)
  workdir = shared('scale_reference', (TEXT, args), lambda path: launching.run(TEXT, path, *args))
  losses = launching.losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
  return workdir


@pytest.mark.slow(20)
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_every_layout_matches_one_device(layout, corpus, reference, tmp_path):
  overrides, devices, processes = LAYOUTS[layout]
  workdir = tmp_path / layout
  launching.run(TEXT, workdir, *_text(corpus, *overrides), devices=devices, processes=processes)
  _assert_same_run(workdir, reference)
  if processes > 1:
    _assert_each_process_fed_half(workdir)


def _assert_each_process_fed_half(workdir):
  rows = {name: open(workdir / 'batches' / name).readline() for name in os.listdir(workdir / 'batches')}
  assert sorted(rows) == ['process_0.jsonl', 'process_1.jsonl']
  assert '"rows": [0, 8]' in rows['process_0.jsonl'] and '"rows": [8, 16]' in rows['process_1.jsonl']


@pytest.mark.slow(86)
def test_two_hosts_match_one_device_resume_exactly_when_killed_and_restore_elsewhere(corpus, reference, tmp_path):
  """2 processes x 4 devices (mesh (2,2,2)) match one device. Rerun with process 1 SIGKILLed after step 5
  (the step-4 checkpoint may still be in flight), both restart from the newest complete checkpoint: every
  step equals the uninterrupted run bitwise, and each process fed the rows it would have fed. Then the
  step-2 checkpoint those processes wrote continues on 1 process x 8 devices (FSDP) and on 1 device with
  unrolled layers and no accumulation, with the uninterrupted run's examples and losses."""
  overrides, devices, processes = HOSTS
  args = _text(corpus, *overrides, '--config.train.checkpoint_every=2')
  uninterrupted = tmp_path / 'uninterrupted'
  launching.run(TEXT, uninterrupted, *args, devices=devices, processes=processes)
  _assert_same_run(uninterrupted, reference)
  _assert_each_process_fed_half(uninterrupted)

  workdir = tmp_path / 'killed'
  killed = launching.start(
    TEXT, workdir, *args, devices=devices, processes=processes, env={'TRANSFORMER_TEST_KILL_AT': '5:1'}
  )
  killed[1].wait(timeout=600)
  assert killed[1].returncode == -9, launching.log_tail(workdir, 1)
  launching.kill(killed)  # process 0 waits in a collective for its dead peer
  launching.run(TEXT, workdir, *args, devices=devices, processes=processes)
  assert launching.losses(workdir) == launching.losses(uninterrupted)  # bitwise
  assert launching.batch_digests(workdir) == launching.batch_digests(uninterrupted)

  for name, extra, devices in (
    ('fsdp8', _mesh(1, 8, 1), 8),
    (
      'one_device_unrolled',
      _mesh(1, 1, 1) + ('--config.model.scan_layers=False', '--config.train.grad_accum_steps=1'),
      1,
    ),
  ):
    moved = tmp_path / name
    shutil.copytree(uninterrupted / 'checkpoints' / '2', moved / 'checkpoints' / '2')
    shutil.copy(uninterrupted / 'config.json', moved / 'config.json')
    launching.run(TEXT, moved, *_text(corpus, *overrides, *extra, '--config.train.checkpoint_every=2'), devices=devices)
    assert min(launching.losses(moved)) == 3  # resumed after step 2
    _assert_same_run(moved, reference, steps=range(3, STEPS + 1))


def _translation(corpus, *extra):
  return (
    '--config.data.corpus=files',
    f'--config.data.train_files={corpus}/train.tsv',
    f'--config.data.eval_files={corpus}/eval.tsv',
    '--config.data.vocab_size=128',
    '--config.data.seq_len=32',
    '--config.data.bleu_examples=16',
    '--config.data.beam_size=2',
    '--config.data.extra_decode_len=8',
    '--config.data.decode_batch_size=8',
    '--config.model.d_model=32',
    '--config.model.d_ff=64',
    '--config.model.num_heads=4',
    '--config.model.num_encoder_layers=1',
    '--config.model.num_decoder_layers=2',
    '--config.model.scan_layers=True',  # stacked parameters, sharded; decoding unstacks them
    '--config.train.batch_size=8',
    '--config.train.num_steps=4',
    '--config.train.warmup_steps=1',
    '--config.train.learning_rate=1e-2',
    '--config.train.log_every=1',
    '--config.train.eval_every=2',
    '--config.train.checkpoint_every=2',
    '--config.train.num_samples=4',
    *extra,
  )


@pytest.mark.slow(68)
def test_two_hosts_train_evaluate_decode_and_checkpoint_like_one(corpus, tmp_path):
  """Translation with scanned layers on 2 processes x 2 devices: training with periodic evals that decode
  (BLEU, chrF and beam-search samples) and checkpoints. Evaluating and decoding its checkpoint on one process gives the
  same metrics and the same translations, and `--mode decode` on 2 processes writes those translations."""
  workdir = tmp_path / 'translation'
  mesh = _mesh(1, 2, 2)
  launching.run(TRANSLATION, workdir, *_translation(corpus, *mesh), devices=2, processes=2)
  trained = launching.metrics(workdir)
  assert {'eval/bleu', 'eval/chrf', 'eval/loss'} <= trained[2].keys() and trained[4]['eval/chrf'] > 0
  samples = [line for line in (workdir / 'samples.jsonl').read_text().splitlines() if '"step": 4' in line]
  assert len(samples) == 4

  launching.run(TRANSLATION, workdir, *_translation(corpus), mode='eval')  # one process, one device
  evaluated = launching.metrics(workdir)[4]
  for key in ('eval/bleu', 'eval/chrf'):
    assert evaluated[key] == trained[4][key], key
  np.testing.assert_allclose(evaluated['eval/loss'], trained[4]['eval/loss'], rtol=1e-5)
  again = [line for line in (workdir / 'samples.jsonl').read_text().splitlines() if '"step": 4' in line]
  assert again[4:] == samples  # the eval appended the same 4 translations

  launching.run(TRANSLATION, workdir, *_translation(corpus, *mesh), devices=2, processes=2, mode='decode')
  decoded = [json.loads(line) for line in (workdir / 'decode' / 'step_4.jsonl').read_text().splitlines()]
  assert len(decoded) == 32
  assert [json.dumps(d, ensure_ascii=False) for d in decoded[:4]] == [
    json.dumps({k: v for k, v in json.loads(line).items() if k != 'step'}, ensure_ascii=False) for line in again[4:]
  ]
