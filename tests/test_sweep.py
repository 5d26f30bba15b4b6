"""Sweeps: expanding override sets, every ablation file against its base, the process runner (failures,
signals) with stand-in children, and a real 2-variant x 2-seed sweep: a failure, a resume, re-aggregation."""

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from transformer.config import ConfigError  # noqa: E402
from transformer.experiment import overrides, results, sweep  # noqa: E402

BASE = 'experiments/synthetic.py:reverse'


def test_product_zip_variant_and_group_name_and_expand():
  assert sweep.product(norm_position=['post', 'pre'], dropout_rate=[0.0, 0.1]) == [
    {'name': 'norm_position=post,dropout_rate=0.0', 'overrides': {'norm_position': 'post', 'dropout_rate': 0.0}},
    {'name': 'norm_position=post,dropout_rate=0.1', 'overrides': {'norm_position': 'post', 'dropout_rate': 0.1}},
    {'name': 'norm_position=pre,dropout_rate=0.0', 'overrides': {'norm_position': 'pre', 'dropout_rate': 0.0}},
    {'name': 'norm_position=pre,dropout_rate=0.1', 'overrides': {'norm_position': 'pre', 'dropout_rate': 0.1}},
  ]
  assert sweep.zip_(num_heads=[1, 4], **{'model.d_k': [128, 32]}) == [
    {'name': 'num_heads=1,d_k=128', 'overrides': {'num_heads': 1, 'model.d_k': 128}},
    {'name': 'num_heads=4,d_k=32', 'overrides': {'num_heads': 4, 'model.d_k': 32}},
  ]
  assert sweep.group('E', sweep.variant(tie_embeddings=False) + sweep.variant('mine', d_model=8)) == [
    {'name': 'E:tie_embeddings=false', 'overrides': {'tie_embeddings': False}},
    {'name': 'E:mine', 'overrides': {'d_model': 8}},
  ]
  with pytest.raises(ConfigError, match='equally long'):
    sweep.zip_(num_heads=[1, 2], d_k=[1])


def test_sweep_config_resolves_short_keys_and_checks_values():
  config = sweep.sweep_config(BASE, sweep.product(dropout_rate=[0, 0.1]), seeds=[3, 4], overrides={'num_steps': 7})
  assert config.sweep.variants[0]['overrides'] == {'model.dropout_rate': 0.0}  # int -> float, as config_flags does
  assert isinstance(config.sweep.variants[0]['overrides']['model.dropout_rate'], float)
  assert config.sweep.overrides == (('train.num_steps', 7),) and config.train.num_steps == 7
  assert config.sweep.seeds == (3, 4) and config.sweep.higher_is_better is False
  assert sweep.sweep_config(BASE, sweep.variant('a'), metric='eval/accuracy').sweep.higher_is_better is True
  for variants, message in [
    (sweep.product(d_modle=[8]), "No config key is named 'd_modle'. Did you mean 'd_model' (config.model.d_model)?"),
    (
      sweep.product(vocab_size=[8]),
      "'vocab_size' is ambiguous: it could be config.data.vocab_size or config.model.vocab_size",
    ),
    (sweep.product(**{'model.d_modle': [8]}), 'Did you mean config.model.d_model?'),
    (sweep.product(num_heads=['4']), "config.model.num_heads='4' must be an int"),
    (sweep.variant('a') + sweep.variant('a'), 'Two variants share a name: a'),
  ]:
    with pytest.raises(ConfigError) as error:
      sweep.sweep_config(BASE, variants)
    assert message in str(error.value)


ABLATIONS = sorted(
  p for p in glob.glob(os.path.join(ROOT, 'experiments', 'ablations', '*.py')) if not p.endswith('__init__.py')
)


def test_there_are_ablation_files():
  assert [os.path.basename(p) for p in ABLATIONS] == ['attention.py', 'norm.py', 'positional.py', 'vaswani_table3.py']


@pytest.mark.parametrize('path', ABLATIONS, ids=os.path.basename)
def test_ablation_file_expands_into_runs_with_valid_overrides(path, tmp_path):
  config = overrides.load_config(path)
  runs = sweep.plan(config, str(tmp_path))  # also builds every variant's ModelConfig
  assert len(runs) == len(config.sweep.variants) * len(config.sweep.seeds) >= 2
  base = overrides.load_config(config.sweep.base)
  for v in config.sweep.variants:
    for key, value in v['overrides'].items():  # each flag a child gets parses back to the variant's value
      parsed = overrides.parse_text(key, overrides.lookup(base, key), overrides.render(value))
      assert parsed == value
  assert len({run.directory for run in runs}) == len(runs)


def test_ablation_files_have_the_papers_rows():
  table3 = overrides.load_config(os.path.join(ROOT, 'experiments/ablations/vaswani_table3.py:base'))
  rows = {v['name']: v['overrides'] for v in table3.sweep.variants}
  assert rows['A:num_heads=1,d_k=512,d_v=512'] == {'model.num_heads': 1, 'model.d_k': 512, 'model.d_v': 512}
  assert rows['A:num_heads=32,d_k=16,d_v=16'] == {'model.num_heads': 32, 'model.d_k': 16, 'model.d_v': 16}
  assert [n for n in rows if n.startswith('B:')] == ['B:d_k=16', 'B:d_k=32']
  assert rows['D:label_smoothing=0.2'] == {'train.label_smoothing': 0.2}
  assert rows['E:positional=learned'] == {'model.positional': 'learned'}
  assert table3.sweep.base == 'experiments/translation.py:base' and table3.sweep.metric == 'eval/bleu'


def test_a_sweep_base_resolves_from_the_sweep_file_in_any_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # 'experiments/text.py' does not exist here: found from the sweep file's folder
  config = overrides.load_config(os.path.join(ROOT, 'experiments', 'ablations', 'norm.py'))
  assert config.sweep.base == 'experiments/text.py:tiny'
  assert config.sweep.base_file == os.path.join(ROOT, 'experiments', 'text.py') + ':tiny'
  with pytest.raises(ConfigError, match='does not exist'):
    sweep.sweep_config('experiments/no_such_file.py', sweep.product(d_model=[32]))


def test_command_line_may_not_set_what_the_sweep_varies(tmp_path):
  config = sweep.sweep_config(BASE, sweep.product(d_model=[32, 64]))
  with pytest.raises(ConfigError, match='--config.sweep.seeds'):
    sweep.plan(config, str(tmp_path), ('--config.train.seed=3',))
  with pytest.raises(ConfigError, match='which the sweep varies'):
    sweep.plan(config, str(tmp_path), ('--config.model.d_model=16',))
  runs = sweep.plan(config, str(tmp_path), ('--config.sweep.parallel=4', '--config.train.num_steps=5'))
  base = os.path.join(ROOT, 'experiments', 'synthetic.py') + ':reverse'
  assert runs[1].command == [
    sys.executable,
    '-m',
    'transformer.experiment',
    '--config',
    base,
    '--config.model.d_model=64',
    '--config.train.num_steps=5',
    '--config.train.seed=0',
    '--workdir',
    str(tmp_path / 'd_model=64' / 'seed0'),
  ]


# --- the process runner, with stand-in children (fast, no JAX)


def fake_run(tmp_path, name, script, num_steps=5):
  directory = str(tmp_path / name / 'seed0')
  return sweep.Run(name, 0, directory, [sys.executable, '-c', script, directory, str(num_steps)], num_steps)


FINISH = 'import os, sys; os.makedirs(os.path.join(sys.argv[1], "checkpoints", sys.argv[2])); print("trained")'
CRASH = 'import sys; print("step 1"); raise ValueError("boom at step 2")'
STOPS_EARLY = 'print("Stopped by a signal at step 3; checkpoint saved.")'


def test_runner_records_done_failed_and_stopped_runs(tmp_path):
  runs = [fake_run(tmp_path, 'ok', FINISH), fake_run(tmp_path, 'bad', CRASH), fake_run(tmp_path, 'early', STOPS_EARLY)]
  assert sweep.execute(runs, parallel=2, poll_seconds=0.01) is None
  statuses = [run.status() for run in runs]
  assert [s['status'] for s in statuses] == ['done', 'failed', 'stopped']
  assert statuses[1]['error'] == 'ValueError: boom at step 2' and statuses[1]['returncode'] == 1
  assert 'trained' in open(os.path.join(runs[0].directory, 'log.txt')).read()
  assert runs[0].finished() and not runs[1].finished() and not runs[2].finished()
  first_wall = statuses[2]['wall_s']
  sweep.execute([runs[2]], poll_seconds=0.01)  # a retry adds to the wall time and counts the attempt
  again = runs[2].status()
  assert again['attempts'] == 2 and again['wall_s'] > first_wall
  assert open(os.path.join(runs[2].directory, 'log.txt')).read().count('\n=== ') == 2  # appended, per attempt


WAITS_FOR_SIGNAL = """
import os, signal, sys, time
def stop(signum, frame):
  open(os.path.join(sys.argv[1], "got_" + signal.Signals(signum).name), "w").close()
  sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(sys.argv[1], "ready"), "w").close()
time.sleep(60)
"""


def test_sigterm_to_the_sweep_is_forwarded_and_stops_new_launches(tmp_path):
  runs = [fake_run(tmp_path, f'v{i}', WAITS_FOR_SIGNAL) for i in range(3)]

  def terminate_when_ready():
    deadline = time.time() + 30
    while time.time() < deadline and not all(os.path.exists(os.path.join(r.directory, 'ready')) for r in runs[:2]):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM)
  threading.Thread(target=terminate_when_ready, daemon=True).start()
  start = time.time()
  assert sweep.execute(runs, parallel=2, poll_seconds=0.01) == signal.SIGTERM
  assert time.time() - start < 30  # the children stopped when told, not after their 60 s sleep
  for run in runs[:2]:
    assert os.path.exists(os.path.join(run.directory, 'got_SIGTERM'))
    assert run.status()['status'] == 'stopped'
  assert not os.path.exists(runs[2].directory)  # never started
  assert signal.getsignal(signal.SIGTERM) == before  # the sweep's handler is gone again


def test_log_tail_finds_the_error_after_usage_text_and_log_lines(tmp_path):
  path = tmp_path / 'log.txt'
  path.write_text(
    '\n=== old attempt\nValueError: old\n\n=== 2024 launch.py\nRun an experiment.\n\nflags:\n  --x: y\n\n'
    'Cannot resume runs/a with this config:\n  config.model.d_model: 32 -> 64\nUse a new --workdir.\n'
    'I1122 04:48:06.882807 1405 checkpoint.py:459] Closing\n\n'
  )
  assert results.log_tail(str(path)) == (
    'Cannot resume runs/a with this config:\n  config.model.d_model: 32 -> 64\nUse a new --workdir.'
  )


# --- a real sweep, end to end

SWEEP_FILE = """
from transformer.experiment import sweep

def get_config(arg=None):
  return sweep.sweep_config(
      base='experiments/synthetic.py:reverse',
      variants=sweep.product(min_len=[4, 6]),  # data only: every run compiles the same programs
      seeds=(0, 1), parallel=2,
      overrides=dict(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                     eval_every=10, log_every=5, checkpoint_every=10, batch_size=8, num_eval=16,
                     seq_len=12, num_samples=0, **{'data.max_len': 8}))
"""


def launch_sweep(sweep_file, workdir):
  # num_steps from the command line: it applies to every variant
  return subprocess.run(
    [
      sys.executable,
      'launch.py',
      '--config',
      sweep_file,
      '--mode',
      'sweep',
      '--workdir',
      workdir,
      '--config.train.num_steps=20',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )


def final_losses(directory):
  return [r['eval/loss'] for r in map(json.loads, open(os.path.join(directory, 'metrics.jsonl'))) if 'eval/loss' in r]


def test_sweep_end_to_end_with_a_failure_a_resume_and_re_aggregation(tmp_path):
  sweep_file, workdir = str(tmp_path / 'tiny_sweep.py'), str(tmp_path / 'sweep')
  with open(sweep_file, 'w') as f:
    f.write(SWEEP_FILE)
  # One run's workdir holds another model's checkpoint: that run is refused, the others finish.
  broken = os.path.join(workdir, 'min_len=6', 'seed1')
  os.makedirs(os.path.join(broken, 'checkpoints', '10'))
  other = overrides.load_config(sweep_file).to_dict()
  other.pop('sweep')
  other['model']['d_model'], other['train']['num_steps'] = 64, 20
  other['data']['min_len'], other['train']['seed'] = 6, 1
  with open(os.path.join(broken, 'config.json'), 'w') as f:
    json.dump(other, f)
  first = launch_sweep(sweep_file, workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  rows = list(csv.DictReader(open(os.path.join(workdir, 'results.csv'))))
  assert [(r['variant'], r['seed'], r['status']) for r in rows] == [
    ('min_len=4', '0', 'done'),
    ('min_len=4', '1', 'done'),
    ('min_len=6', '0', 'done'),
    ('min_len=6', '1', 'failed'),
    ('min_len=4', 'mean', '2/2 done'),
    ('min_len=4', 'std', '2/2 done'),
    ('min_len=6', 'mean', '1/2 done'),
    ('min_len=6', 'std', '1/2 done'),
  ]
  assert rows[3]['error'].startswith(f'Cannot resume {broken} with this config')
  assert ' / config.model.d_model: 64 -> 32 / Use a new --workdir' in rows[3]['error'].replace('  ', '')
  per_seed = [final_losses(os.path.join(workdir, 'min_len=4', f'seed{s}'))[-1] for s in (0, 1)]
  assert [float(r['final eval/loss']) for r in rows[:2]] == per_seed
  assert float(rows[4]['final eval/loss']) == pytest.approx(np.mean(per_seed), rel=1e-12)
  assert float(rows[5]['final eval/loss']) == pytest.approx(np.std(per_seed, ddof=1), rel=1e-12)
  assert float(rows[4]['best eval/loss']) == pytest.approx(
    np.mean([min(final_losses(os.path.join(workdir, 'min_len=4', f'seed{s}'))) for s in (0, 1)]), rel=1e-12
  )
  assert rows[0]['steps'] == '20.0' and float(rows[0]['params']) > 0 and float(rows[0]['tokens/s']) > 0
  assert float(rows[0]['wall s']) > 0
  assert os.path.getsize(os.path.join(workdir, 'results.png')) > 10_000
  assert 'min_len=6 | 1/2' in open(os.path.join(workdir, 'results.md')).read()

  # Re-run after removing the stale workdir: only the failed run runs again.
  finished = [os.path.join(workdir, v, f'seed{s}') for v, s in [('min_len=4', 0), ('min_len=4', 1), ('min_len=6', 0)]]
  stamps = {
    d: [os.path.getmtime(os.path.join(d, f)) for f in ('metrics.jsonl', 'status.json', 'log.txt')] for d in finished
  }
  for name in ('checkpoints', 'config.json', 'status.json', 'log.txt'):
    path = os.path.join(broken, name)
    os.rmdir(os.path.join(path, '10')) if name == 'checkpoints' else os.remove(path)
  second = launch_sweep(sweep_file, workdir)
  assert second.returncode == 0, second.stderr[-3000:]
  assert '4 runs, 3 finished, 1 to run' in second.stdout
  assert second.stdout.count('[sweep] started') == 1 and '[sweep] started min_len=6/seed1' in second.stdout
  assert {
    d: [os.path.getmtime(os.path.join(d, f)) for f in ('metrics.jsonl', 'status.json', 'log.txt')] for d in finished
  } == stamps
  rows = list(csv.DictReader(open(os.path.join(workdir, 'results.csv'))))
  assert [r['status'] for r in rows[:4]] == ['done'] * 4 and rows[6]['status'] == '2/2 done'

  # A finished sweep only re-aggregates: nothing starts, the table is written again.
  results_time = os.path.getmtime(os.path.join(workdir, 'results.csv'))
  third = launch_sweep(sweep_file, workdir)
  assert third.returncode == 0, third.stderr[-3000:]
  assert 'all 4 runs finished: aggregating only' in third.stdout and '[sweep] started' not in third.stdout
  assert os.path.getmtime(os.path.join(workdir, 'results.csv')) > results_time
  assert all(json.load(open(os.path.join(d, 'status.json')))['attempts'] == 1 for d in finished)
