"""The training loop end to end on the synthetic task: logs, exact resume, preemption, divergence."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import PEAK_FLOPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import synthetic  # noqa: E402
from transformer import loop, summary  # noqa: E402


def small_config(num_steps, **train):
  config = synthetic.get_config('reverse')
  config.model.d_model, config.model.d_ff, config.model.num_heads = 32, 64, 2
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1
  config.model.dropout_rate = 0.1  # resume must reproduce the dropout masks too
  config.data.num_eval, config.data.max_len, config.data.seq_len = 16, 8, 12
  config.train.update(
    {
      **dict(
        num_steps=num_steps,
        batch_size=8,
        log_every=1,
        eval_every=10,
        checkpoint_every=5,
        warmup_steps=5,
        peak_flops=PEAK_FLOPS,
      ),
      **train,
    }
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
    '--config.train.eval_every=2',  # one eval before the signal: its line is on stdout
    '--config.train.num_samples=0',
    '--config.data.num_eval=8',
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
  # What a newcomer sees: the eval's metrics on one line, the summary, and no library INFO logs.
  evals = [row for row in read_metrics(workdir) if 'eval/loss' in row]
  assert evals[0]['step'] == 2 and summary.eval_line(2, evals[0]) in out.splitlines()
  assert f'Training stopped at step {max(losses(workdir))} of 100000.' in out
  assert 'checkpoint_manager.py' not in err and not re.search(r'^I\d{4} ', out + err, re.MULTILINE)  # absl INFO
  last = max(losses(workdir))
  saved = [int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints')) if name.isdigit()]
  assert saved and max(saved) >= last


def test_eval_line_shows_each_metric_readably():
  results = {
    'eval/loss': 3.4912,
    'eval/perplexity': 32.82,
    'eval/accuracy': 0.33912,
    'eval/tokens': 12345.0,
    'eval/bleu': 5.06,
    'eval/chrf': 25.31,
    'eval/novel': 0.123456,
  }
  assert (
    summary.eval_line(500, results) == 'eval step 500: loss 3.49  accuracy 33.9%  bleu 5.1  chrf 25.3  novel 0.1235'
  )
  assert summary.eval_line(7, {'eval/exact_match': 0.5, 'eval/loss': 0.01234, 'eval/bits_per_byte': 1.23456}) == (
    'eval step 7: loss 0.0123  exact_match 50.0%  bits_per_byte 1.235'
  )


def test_run_summary_names_the_best_eval_and_every_output(tmp_path):
  workdir = str(tmp_path)
  (tmp_path / 'samples.jsonl').write_text('{}\n')
  evals = [
    {'step': 200, 'eval/loss': 4.07, 'eval/accuracy': 0.2, 'eval/bleu': 1.8},
    {'step': 400, 'eval/loss': 3.49, 'eval/accuracy': 0.339, 'eval/bleu': 5.1},
    {'step': 600, 'eval/loss': 3.6, 'eval/accuracy': 0.33, 'eval/bleu': 5.3},
  ]
  assert summary.run_summary(workdir, 600, 600, evals, tensorboard=True) == '\n'.join(
    [
      'Training finished: step 600 of 600.',
      'Best eval (lowest loss) at step 400: loss 3.49  accuracy 33.9%  bleu 5.1',
      f'  metrics      {workdir}/metrics.jsonl',
      f'  samples      {workdir}/samples.jsonl',
      f'  TensorBoard  tensorboard --logdir {workdir}',
      f'  checkpoints  {workdir}/checkpoints',
    ]
  )
  assert summary.run_summary(workdir, 10, 600, [], tensorboard=False) == '\n'.join(
    [
      'Training stopped at step 10 of 600.',
      f'  metrics      {workdir}/metrics.jsonl',
      f'  samples      {workdir}/samples.jsonl',
      f'  checkpoints  {workdir}/checkpoints',
    ]
  )
