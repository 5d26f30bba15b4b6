"""`--mode bench --config.bench.profile=True`: the op categories of a traced train step."""

import json
import os

import pytest
from conftest import PEAK_FLOPS

from transformer import hlo_audit
from transformer.experiment import bench, overrides, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**model):
  config = overrides.load_config(os.path.join(ROOT, 'experiments/bench.py:tiny'))
  config.model.update(model)
  config.bench.update(dict(steps=1, warmup=0, data_batches=0))
  return config


@pytest.mark.slow(5)
def test_each_matmul_is_counted_once_in_its_category():
  """The matmul FLOPs found from the trace's op runs equal those of the compiled module counted through
  its loops' trip counts (hlo_audit: scanned layers run in a loop), and split into categories exactly as
  the model's analytic count."""
  b = bench.TrainBench(_config(scan_layers=True))
  b.times(1)
  result = profile.profile_train(b, steps=2)
  assert result['unmatched'] == 0
  compiled = b.runner.lower_train_step(b.batch).compile().as_text()
  assert result['dot_gflop'] * 1e9 == pytest.approx(hlo_audit.dot_flops(compiled), rel=1e-9)

  cfg, tokens = b.model_config, b.tokens_per_step
  layers, d, ff, heads = cfg.num_decoder_layers, cfg.d_model, cfg.d_ff, cfg.num_heads
  # Forward, and two matmuls backward (the input's and the weight's gradient) for each one.
  projections = (
    3 * layers * (2 * tokens * d * heads * cfg.head_dim_qk * 3 + 2 * tokens * d * d + 2 * 2 * tokens * d * ff)
  )
  logits = 3 * 2 * tokens * d * cfg.vocab_size
  # Scores and weighted values: forward 2, backward 4.
  attention = layers * 6 * 2 * tokens * b.seq_len * heads * cfg.head_dim_qk
  gflop = lambda name: result['categories'][name]['gflop'] * 1e9
  assert gflop('vocabulary matmuls') == pytest.approx(logits, rel=1e-9)
  assert gflop('matmuls') == pytest.approx(projections, rel=1e-9)
  # The attention category also holds its softmax's elementwise work (one FLOP per element).
  assert attention <= gflop('attention') < attention * 1.5
  for name in ('norms & elementwise', 'optimizer', 'vocabulary softmax/loss'):
    assert result['categories'][name]['ms'] > 0, name


def test_an_async_matmul_spans_to_its_end_event_and_overlapping_ops_share_the_wall_time():
  """XLA CPU's trace of an Eigen matmul: its thunk returns after 1 us, its `end:` event comes at 100 us,
  while a fusion runs 10-60 us beside it (the fusion's own end event comes late, at 90 us). The matmul
  gets 100 us of span; the 50 us the two share are split between them, so the shares sum to the 100 us of
  wall time that some op ran (not 150, and not the 51 us the op events alone hold)."""
  us = 1000
  events = [
    ('dot.1', 0, 1 * us, 'dot.1'),
    ('fusion.2', 10 * us, 50 * us, 'fusion.2'),
    ('end: fusion.2', 90 * us, 0, None),  # a synchronous op's end event, late: its own event counts
    ('ThreadpoolListener::StartRegion', 2 * us, 0, None),
    ('end: dot.1', 100 * us, 0, None),
    ('copy.3', 150 * us, 5 * us, 'copy.3'),  # no end event: its own duration
  ]
  found = profile.spans(events, {'dot.1'})
  assert sorted(found) == [(0, 100 * us, 'dot.1'), (10 * us, 60 * us, 'fusion.2'), (150 * us, 155 * us, 'copy.3')]
  times = profile.wall_shares(found)
  assert times == {'dot.1': [75 * us, 1], 'fusion.2': [25 * us, 1], 'copy.3': [5 * us, 1]}
  # A while loop's event holds its body's ops: they keep their time, the loop gets only the gaps.
  loop = profile.spans(events + [('while.4', 140 * us, 30 * us, 'while.4')], {'dot.1'})
  shares = profile.wall_shares(loop, {'while.4'})
  assert shares['copy.3'] == [5 * us, 1] and shares['while.4'] == [25 * us, 1]
  # Two runs of one op (two steps) add up, each matched with its own end event.
  later = [(name, start + 200 * us, duration, op) for name, start, duration, op in events]
  twice = profile.spans(events + later, {'dot.1'})
  assert profile.wall_shares(twice)['dot.1'] == [150 * us, 2]


@pytest.mark.slow(5)
def test_bench_prints_the_profile_table(capsys, tmp_path):
  config = _config()
  config.bench.update(dict(profile=True, profile_dir=str(tmp_path)))
  config.train.peak_flops = PEAK_FLOPS  # no matmul timed for MFU
  bench.run_bench(config)
  out = capsys.readouterr().out
  assert '| category | ms / step | share | GFLOP / step | GFLOP/s |' in out
  result = json.loads(out.strip().splitlines()[-1])
  assert result['profile']['trace_dir'] == str(tmp_path) and list(tmp_path.rglob('*.xplane.pb'))
  assert sum(row['share'] for row in result['profile']['categories'].values()) == pytest.approx(1.0)
