"""The training loop end to end on the synthetic task: logs, exact resume, preemption, divergence."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import synthetic  # noqa: E402
from transformer import loop  # noqa: E402


def small_config(num_steps, **train):
  config = synthetic.get_config('reverse')
  config.model.d_model, config.model.d_ff, config.model.num_heads = 32, 64, 2
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1
  config.model.dropout_rate = 0.1  # resume must reproduce the dropout masks too
  config.data.num_eval, config.data.max_len, config.data.seq_len = 16, 8, 12
  config.train.update(
    {**dict(num_steps=num_steps, batch_size=8, log_every=1, eval_every=10, checkpoint_every=5, warmup_steps=5), **train}
  )
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def losses(workdir):
  return {r['step']: r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r}


def test_resumed_run_is_bitwise_identical(tmp_path):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  loop.train_and_evaluate(small_config(20), straight)
  loop.train_and_evaluate(small_config(20), resumed, stop_at=10)  # stops at 10 as if preempted
  loop.train_and_evaluate(small_config(20), resumed)  # resumes from it
  expected, got = losses(straight), losses(resumed)
  assert sorted(got) == list(range(1, 21))
  assert [got[s] for s in range(1, 21)] == [expected[s] for s in range(1, 21)]  # bitwise, not approx
  records = read_metrics(straight)
  tags = set().union(*records)
  for tag in (
    'train/loss',
    'train/accuracy',
    'train/learning_rate',
    'train/grad_norm',
    'train/param_norm',
    'train/tokens_per_sec',
    'train/step_ms',
    'train/mfu',
    'train/compile_s',
    'eval/loss',
    'eval/perplexity',
    'eval/accuracy',
  ):
    assert tag in tags, tag
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(straight))
  assert json.load(open(os.path.join(straight, 'config.json')))['train']['num_steps'] == 20
  assert sorted(os.listdir(os.path.join(straight, 'checkpoints'))) == ['10', '15', '20']  # keep 3


def test_diverging_run_stops_naming_the_step_and_keeps_checkpoints(tmp_path):
  workdir = str(tmp_path / 'nan')
  loop.train_and_evaluate(small_config(5), workdir)
  config = small_config(30, learning_rate=1e30, warmup_steps=1)
  with pytest.raises(loop.NonFiniteLoss, match=r'at step \d+'):
    loop.train_and_evaluate(config, workdir)
  assert '5' in os.listdir(os.path.join(workdir, 'checkpoints'))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / 'preempted')
  args = [
    sys.executable,
    'launch.py',
    '--config',
    'experiments/synthetic.py:reverse',
    '--workdir',
    workdir,
    '--config.train.num_steps=100000',
    '--config.train.log_every=1',
    '--config.train.checkpoint_every=100000',
    '--config.train.eval_every=100000',
    '--config.model.d_model=32',
    '--config.model.d_ff=64',
    '--config.model.num_encoder_layers=1',
    '--config.model.num_decoder_layers=1',
  ]
  process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics_file = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.exists(metrics_file) and len(losses(workdir)) >= 3):
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 0, err
  assert 'Stopped by a signal' in out
  last = max(losses(workdir))
  saved = [int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints')) if name.isdigit()]
  assert saved and max(saved) >= last
