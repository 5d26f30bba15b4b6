"""Sweeps: expanding override sets, every ablation file against its base, the process runner (failures,
NaN losses, stalls, signals, what a re-run retries) with stand-in children, the results table's counts, a
real 2-variant x 2-seed sweep (a failure, a resume, re-aggregation) and a real sweep stopped by SIGTERM then
re-run, where one variant crashes, one diverges and one stalls while the others finish."""

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


def test_variants_that_resolve_to_the_same_config_are_an_error():
  for variants, common, message in [
    # A row setting what the base already has (synthetic's dropout is 0) is the baseline again.
    (
      sweep.variant('baseline') + sweep.group('D', sweep.product(dropout_rate=[0.0, 0.2])),
      {},
      "Variants 'baseline', 'D:dropout_rate=0.0' resolve to the same config (config.model.dropout_rate=0.0)",
    ),
    # The same through the common overrides, which change the base every variant starts from.
    (
      sweep.variant('baseline') + sweep.product(dropout_rate=[0.1, 0.2]),
      {'dropout_rate': 0.1},
      "Variants 'baseline', 'dropout_rate=0.1' resolve to the same config (config.model.dropout_rate=0.1)",
    ),
    # Two rows naming one setting differently (short key, full path).
    (
      sweep.variant('a', d_model=32) + sweep.variant('b', **{'model.d_model': 32}) + sweep.variant('c', d_model=16),
      {},
      "Variants 'a', 'b' resolve to the same config (config.model.d_model=32)",
    ),
  ]:
    with pytest.raises(ConfigError) as error:
      sweep.sweep_config(BASE, variants, overrides=common)
    assert message in str(error.value)
  # The same rows on a base with dropout 0.1: every row changes something, so the sweep is valid.
  rows = sweep.variant('baseline') + sweep.group('D', sweep.product(dropout_rate=[0.0, 0.2]))
  config = sweep.sweep_config(BASE, rows, overrides={'dropout_rate': 0.1})
  assert [v['name'] for v in config.sweep.variants] == ['baseline', 'D:dropout_rate=0.0', 'D:dropout_rate=0.2']


def test_every_row_of_every_ablation_file_changes_its_base():
  specs = [*ABLATIONS, os.path.join(ROOT, 'experiments/ablations/vaswani_table3.py:base')]
  for spec in specs:
    config = overrides.load_config(spec)  # sweep_config rejects coinciding variants
    unchanged = [
      v['name']
      for v in config.sweep.variants
      if all(overrides.lookup(config, p) == value for p, value in v['overrides'].items())
    ]
    # One row may be the base itself (Table 3's 'baseline'; norm.py's product includes the base's pre + rmsnorm).
    assert len(unchanged) <= 1, f'{spec}: {unchanged} all equal the base'
    if 'vaswani_table3' in spec:
      assert unchanged == ['baseline']
  # Table 3's tiny base takes the paper's P_drop and label smoothing, so (D)'s 0.0 rows are changes.
  table3 = overrides.load_config(os.path.join(ROOT, 'experiments/ablations/vaswani_table3.py'))
  assert (table3.model.dropout_rate, table3.train.label_smoothing) == (0.1, 0.1)
  assert [v['name'] for v in table3.sweep.variants if v['name'].startswith('D:')] == [
    'D:dropout_rate=0.0',
    'D:dropout_rate=0.2',
    'D:label_smoothing=0.0',
    'D:label_smoothing=0.2',
  ]


ABLATIONS = sorted(
  p for p in glob.glob(os.path.join(ROOT, 'experiments', 'ablations', '*.py')) if not p.endswith('__init__.py')
)


def test_there_are_ablation_files():
  assert [os.path.basename(p) for p in ABLATIONS] == [
    'attention.py',
    'gated_ffn.py',
    'gqa.py',
    'length.py',
    'norm.py',
    'positional.py',
    'sparse.py',
    'vaswani_table3.py',
    'warmup_norm.py',
  ]


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


# What a run whose loss became NaN prints last (transformer.loop.NonFiniteLoss through Python's traceback).
DIVERGES = """
import sys
print('step 1/20  loss 9.1')
sys.exit('Traceback (most recent call last):\\n  File "loop.py", line 1, in <module>\\n'
         'transformer.loop.NonFiniteLoss: The training loss became nan at step 3: lower config.train.learning_rate.')
"""
# Logs a step, then hangs with its output still going (as a run retrying a lost connection would).
HANGS = """
import os, sys, time
open(os.path.join(sys.argv[1], 'metrics.jsonl'), 'a').write('{"step": 7, "train/loss": 2.5}\\n')
while True:
  print('W1201 waiting for the coordinator', flush=True)
  time.sleep(0.2)
"""
# Logs a step every 0.25 s for 3 s (longer than the stall timeout of the test, shorter between steps): finishes.
SLOW_STEPS = """
import os, sys, time
for step in range(12):
  open(os.path.join(sys.argv[1], 'metrics.jsonl'), 'a').write('{"step": %d}\\n' % step)
  time.sleep(0.25)
os.makedirs(os.path.join(sys.argv[1], 'checkpoints', sys.argv[2]))
"""


def test_runner_records_finished_failed_interrupted_diverged_and_stalled_runs(tmp_path):
  names_scripts = [
    ('ok', FINISH),
    ('bad', CRASH),
    ('early', STOPS_EARLY),
    ('nan', DIVERGES),
    ('hangs', HANGS),
    ('slow', SLOW_STEPS),
  ]
  runs = [fake_run(tmp_path, name, script) for name, script in names_scripts]
  start = time.time()
  assert sweep.execute(runs, parallel=6, poll_seconds=0.01, stall_timeout=2) is None
  assert time.time() - start < 30  # the hung run was killed, not waited for
  statuses = [run.status() for run in runs]
  assert [s['status'] for s in statuses] == ['finished', 'failed', 'interrupted', 'diverged', 'stalled', 'finished']
  assert statuses[1]['error'] == 'ValueError: boom at step 2' and statuses[1]['returncode'] == 1
  assert statuses[3]['error'].startswith('transformer.loop.NonFiniteLoss: The training loss became nan at step 3')
  assert statuses[4]['returncode'] == -signal.SIGKILL
  assert statuses[4]['error'].startswith(
    'No new step or checkpoint for 2 s (after step 7): killed as stalled. If a step, an eval or the start can '
    'take that long, raise config.sweep.stall_timeout (0 disables the check).\nLast lines of its log:\n'
  )
  assert statuses[4]['error'].endswith('W1201 waiting for the coordinator')  # the raw log, absl lines included
  assert 'killed as stalled' in open(os.path.join(runs[4].directory, 'log.txt')).read()
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
    assert run.status()['status'] == 'interrupted'
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
                     seq_len=12, num_samples=0, peak_flops=1e12, **{'data.max_len': 8}))
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


@pytest.mark.slow(47)
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
    ('min_len=4', '0', 'finished'),
    ('min_len=4', '1', 'finished'),
    ('min_len=6', '0', 'finished'),
    ('min_len=6', '1', 'failed'),
    ('min_len=4', 'mean', '2/2'),
    ('min_len=4', 'std', '2/2'),
    ('min_len=6', 'mean', '1/2 (1 failed)'),
    ('min_len=6', 'std', '1/2 (1 failed)'),
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
  assert 'min_len=6 | 1/2 (1 failed)' in open(os.path.join(workdir, 'results.md')).read()

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
  assert [r['status'] for r in rows[:4]] == ['finished'] * 4 and rows[6]['status'] == '2/2'

  # A finished sweep only re-aggregates: nothing starts, the table is written again.
  results_time = os.path.getmtime(os.path.join(workdir, 'results.csv'))
  third = launch_sweep(sweep_file, workdir)
  assert third.returncode == 0, third.stderr[-3000:]
  assert 'all 4 runs finished: aggregating only' in third.stdout and '[sweep] started' not in third.stdout
  assert os.path.getmtime(os.path.join(workdir, 'results.csv')) > results_time
  assert all(json.load(open(os.path.join(d, 'status.json')))['attempts'] == 1 for d in finished)


def test_a_re_run_resumes_and_retries_failed_and_stalled_runs_and_diverged_ones_when_asked(tmp_path):
  runs = [fake_run(tmp_path, name, FINISH) for name in sweep.results.STATUSES]
  for run in runs:
    if run.variant != 'queued':  # a queued run has no status.json yet
      os.makedirs(run.directory)
      run.write_status(status=run.variant, num_steps=run.num_steps)

  def to_run(retry):
    return [run.variant for run in runs if run.to_run(sweep.check_retry(retry))]

  assert sweep.results.STATUSES == ('finished', 'interrupted', 'failed', 'stalled', 'diverged', 'running', 'queued')
  assert to_run('failed,stalled') == ['interrupted', 'failed', 'stalled', 'running', 'queued']  # the default
  assert to_run('all') == ['interrupted', 'failed', 'stalled', 'diverged', 'running', 'queued']
  assert to_run(' diverged ') == ['interrupted', 'diverged', 'running', 'queued']
  assert to_run('') == ['interrupted', 'running', 'queued']
  runs[0].write_status(status='finished', num_steps=runs[0].num_steps + 10)  # --config.train.num_steps raised
  assert to_run('')[0] == 'finished'
  with pytest.raises(ConfigError) as error:
    sweep.check_retry('failed,diverge')
  assert str(error.value) == (
    "config.sweep.retry='failed,diverge': 'diverge' (did you mean 'diverged'?) is not an outcome to retry; "
    'name some of failed, stalled, diverged (comma-separated), or all.'
  )
  config = sweep.sweep_config(BASE, sweep.variant('a'))
  assert (config.sweep.stall_timeout, config.sweep.retry) == (1800.0, 'failed,stalled')
  config.sweep.retry = 'finished'  # as --config.sweep.retry=finished would: refused before anything starts
  with pytest.raises(ConfigError, match="config.sweep.retry='finished': 'finished' is not an outcome to retry"):
    sweep.plan(config, str(tmp_path))
  config.sweep.retry, config.sweep.stall_timeout = 'all', -1.0
  with pytest.raises(ConfigError, match=r'config.sweep.stall_timeout=-1 must be >= 0 seconds \(0: never\)'):
    sweep.plan(config, str(tmp_path))


def test_a_re_run_leaves_diverged_runs_alone_and_says_how_to_retry_them(tmp_path, capsys):
  config = sweep.sweep_config(BASE, sweep.product(min_len=[4, 6]))
  runs = sweep.plan(config, str(tmp_path))
  for run, status in zip(runs, ('finished', 'diverged')):
    os.makedirs(run.directory)
    run.write_status(status=status, num_steps=run.num_steps)
  rows = sweep.run_sweep(config, str(tmp_path))
  out = capsys.readouterr().out
  assert (
    "[sweep] not retried (config.sweep.retry='failed,stalled'): min_len=6/seed0 (diverged); "
    '--config.sweep.retry=failed,stalled,diverged retries them.\n[sweep] nothing to run (1 finished): aggregating only.'
  ) in out
  assert '[sweep] started' not in out and [row['status'] for row in rows] == ['finished', 'diverged']


def fake_finished_run(tmp_path, variant, seed, status, losses):
  run = sweep.Run(variant, seed, str(tmp_path / variant / f'seed{seed}'), [], 20)
  os.makedirs(run.directory)
  run.write_status(status=status, num_steps=20, wall_s=10.0 + seed)
  with open(os.path.join(run.directory, 'metrics.jsonl'), 'w') as f:
    for step, loss in zip((10, 20), losses):
      f.write(json.dumps({'step': step, 'eval/loss': loss}) + '\n')
  return run


def test_results_count_unfinished_runs_beside_means_over_the_finished_ones(tmp_path):
  nan = float('nan')
  runs = [
    fake_finished_run(tmp_path, 'a', 0, 'finished', [3.0, 1.0]),
    fake_finished_run(tmp_path, 'a', 1, 'finished', [4.0, 3.0]),
    fake_finished_run(tmp_path, 'a', 2, 'diverged', [5.0, nan]),  # averaged in, the mean would be NaN
    fake_finished_run(tmp_path, 'b', 0, 'finished', [2.0, 0.5]),
    fake_finished_run(tmp_path, 'b', 1, 'stalled', [1.0]),  # averaged in, the best would be 0.75
    fake_finished_run(tmp_path, 'b', 2, 'failed', []),
    fake_finished_run(tmp_path, 'c', 0, 'interrupted', [9.0]),
  ]
  rows = results.write_results(str(tmp_path), runs, 'eval/loss', higher_is_better=False)
  assert [row['status'] for row in rows] == ['finished'] * 2 + ['diverged', 'finished', 'stalled', 'failed'] + [
    'interrupted'
  ]
  table = list(csv.DictReader(open(tmp_path / 'results.csv')))
  summary = {(r['variant'], r['seed']): r for r in table[len(runs) :]}
  assert [(key, r['status']) for key, r in summary.items()] == [
    (('a', 'mean'), '2/3 (1 diverged)'),
    (('a', 'std'), '2/3 (1 diverged)'),
    (('b', 'mean'), '1/3 (1 failed, 1 stalled)'),
    (('b', 'std'), '1/3 (1 failed, 1 stalled)'),
    (('c', 'mean'), '0/1 (1 interrupted)'),
    (('c', 'std'), '0/1 (1 interrupted)'),
  ]
  assert float(summary['a', 'mean']['final eval/loss']) == np.mean([1.0, 3.0])
  assert float(summary['a', 'std']['final eval/loss']) == np.std([1.0, 3.0], ddof=1)
  assert float(summary['a', 'mean']['wall s']) == np.mean([10.0, 11.0])
  assert float(summary['b', 'mean']['final eval/loss']) == 0.5 and float(summary['b', 'mean']['best eval/loss']) == 0.5
  assert summary['c', 'mean']['final eval/loss'] == ''  # no finished run: no number
  markdown = open(tmp_path / 'results.md').read()
  assert '| a | 2/3 (1 diverged) | 2 ± 1.414 | 2 ± 1.414 |' in markdown
  assert '| b | 1/3 (1 failed, 1 stalled) | **0.5** | 0.5 |' in markdown
  assert '| c | 0/1 (1 interrupted) | - | - |' in markdown


# --- a real sweep with faults, stopped by SIGTERM and resumed

FAULTS_SWEEP_FILE = """
from transformer.experiment import sweep

def get_config(arg=None):
  return sweep.sweep_config(
      base='experiments/synthetic.py:reverse',
      # The test freezes 'stalls' at its start; retried, it is the uninterrupted twin of 'resumed' (it only
      # saves at other steps). Two at a time: 'stalls' hangs while the others run one after another.
      variants=(sweep.variant('stalls', checkpoint_every=20)
                + sweep.variant('crashes', grad_accum_steps=3)  # batch_size 8: refused when the run starts
                + sweep.variant('diverges', learning_rate=1e9)
                + sweep.variant('resumed')),
      parallel=2, stall_timeout=STALL_TIMEOUT,
      overrides=dict(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                     eval_every=10, log_every=5, checkpoint_every=10, batch_size=8, num_eval=16,
                     seq_len=12, num_samples=0, peak_flops=1e12, num_steps=20, **{'data.max_len': 8}))
"""
# Longer than a healthy tiny run's longest silence (its start: imports and the first compile) on a loaded CI
# machine; the frozen run costs this much idle time.
STALL_TIMEOUT = 40


def wait_for(condition, what, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, f'timed out waiting for {what}'
    time.sleep(0.02)


def sweep_table(workdir):
  rows = list(csv.DictReader(open(os.path.join(workdir, 'results.csv'))))
  errors = {r['variant']: r['error'] for r in rows if r['seed'].isdigit()}
  return [(r['variant'], r['seed'], r['status']) for r in rows], errors


@pytest.mark.slow(69)
def test_sweep_survives_sigterm_crash_nan_and_stall_and_resumes_to_the_uninterrupted_losses(tmp_path):
  sweep_file, workdir = str(tmp_path / 'faults.py'), str(tmp_path / 'sweep')
  with open(sweep_file, 'w') as f:
    f.write(FAULTS_SWEEP_FILE.replace('STALL_TIMEOUT', str(STALL_TIMEOUT)))
  command = [sys.executable, 'launch.py', '--config', sweep_file, '--mode', 'sweep', '--workdir', workdir]
  run_dirs = {name: os.path.join(workdir, name, 'seed0') for name in ('stalls', 'crashes', 'diverges', 'resumed')}
  stalls, resumed = run_dirs['stalls'], run_dirs['resumed']

  # 1. 'stalls' hangs from its start (the test freezes it); 'crashes' and 'diverges' end; once 'resumed' has
  # logged a step, SIGTERM the sweep: 'resumed' saves and exits (its eval at step 10 holds it long enough for
  # the signal to land before its end); 'stalls', deaf to the forwarded signal, is killed when its time is up.
  first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
  status_file, metrics = os.path.join(stalls, 'status.json'), os.path.join(resumed, 'metrics.jsonl')
  wait_for(lambda: os.path.exists(status_file) and 'pid' in json.load(open(status_file)), 'the run to freeze')
  frozen = json.load(open(status_file))['pid']
  try:
    os.kill(frozen, signal.SIGSTOP)
    wait_for(lambda: os.path.exists(metrics) and 'train/loss' in open(metrics).read(), 'a logged step')
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=600)
  finally:
    try:  # never leave a stopped process behind, whatever failed
      os.kill(frozen, signal.SIGKILL)
    except ProcessLookupError:
      pass
  assert first.returncode == 0, out
  assert out.rstrip().endswith('[sweep] stopped by SIGTERM: re-run the same command to resume.')
  table, errors = sweep_table(workdir)
  assert table == [
    ('stalls', '0', 'stalled'),
    ('crashes', '0', 'failed'),
    ('diverges', '0', 'diverged'),
    ('resumed', '0', 'interrupted'),
    *[('stalls', stat, '0/1 (1 stalled)') for stat in ('mean', 'std')],
    *[('crashes', stat, '0/1 (1 failed)') for stat in ('mean', 'std')],
    *[('diverges', stat, '0/1 (1 diverged)') for stat in ('mean', 'std')],
    *[('resumed', stat, '0/1 (1 interrupted)') for stat in ('mean', 'std')],
  ]
  assert errors['stalls'].startswith(f'No new step or checkpoint for {STALL_TIMEOUT} s (before its first step)')
  assert errors['crashes'].startswith('config.train.batch_size=8 must be divisible by')
  assert errors['diverges'].startswith('transformer.loop.NonFiniteLoss: The training loss became nan at step')
  assert '| diverges | 0/1 (1 diverged) |' in open(os.path.join(workdir, 'results.md')).read()
  saved = [int(step) for step in os.listdir(os.path.join(resumed, 'checkpoints')) if step.isdigit()]
  assert saved and max(saved) < 20  # it saved where it stopped
  assert not glob.glob(os.path.join(stalls, 'checkpoints', '[0-9]*'))  # none saved: its retry is uninterrupted

  # 2. The same command again: 'resumed' resumes, 'stalls' and 'crashes' are retried, 'diverges' is not.
  second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stdout + second.stderr[-3000:]
  assert '--config.sweep.retry=failed,stalled,diverged retries them.' in second.stdout
  table, errors = sweep_table(workdir)
  assert [row[2] for row in table] == ['finished', 'failed', 'diverged', 'finished'] + [
    status for status in ('1/1', '0/1 (1 failed)', '0/1 (1 diverged)', '1/1') for _ in ('mean', 'std')
  ]
  attempts = {name: json.load(open(os.path.join(d, 'status.json')))['attempts'] for name, d in run_dirs.items()}
  assert attempts == {'stalls': 2, 'crashes': 2, 'diverges': 1, 'resumed': 2}
  evals = [
    {step: v['eval/loss'] for step, v in results.read_metrics(d).items() if 'eval/loss' in v} for d in (stalls, resumed)
  ]
  assert list(evals[0]) == [10, 20] and evals[1] == evals[0]


def test_a_variant_that_changes_a_referenced_value_changes_what_refers_to_it():
  # text.py's model.vocab_size refers to data.vocab_size: the run's process (config_flags on the live config)
  # sees the change in both, and so must the sweep's own view of the variant (its plan, checks and benches).
  config = sweep.sweep_config('experiments/text.py:tiny', sweep.product(**{'data.vocab_size': [500, 1000]}))
  sizes = [sweep.variant_config(config, v).model.vocab_size for v in config.sweep.variants]
  assert sizes == [500, 1000]
