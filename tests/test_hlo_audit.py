"""The compiled train step communicates what its layout needs and splits its work evenly.

`hlo_audit` reads collectives and matmul FLOPs from compiled HLO, while loops counted by their trip
counts. The 8-device cases compile (never run) the step in one subprocess: `bench.audit_train_step`
on data (8,1,1), FSDP (1,8,1) and tensor (1,1,8) meshes, with and without gradient accumulation.
"""

import json
import os
import subprocess
import sys

import pytest

from transformer import hlo_audit

# A while loop (4 trips) around a call with a dot and a tuple all-reduce; an all-gather and a
# reduce-scatter outside it. Shapes as XLA prints them (layouts, /*index*/ comments, metadata).
HLO = """HloModule jit_step, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_dot (param_0: f32[8,16], param_1: f32[16,32]) -> f32[8,32] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %param_1 = f32[16,32]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,32]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p: (s32[], f32[8,16], f32[16,32])) -> (s32[], f32[8,16], f32[16,32]) {
  %p = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,32]{1,0} get-tuple-element(%p), index=2
  %y = f32[8,32]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %ar = (f32[8,32]{1,0}, /*index=1*/f32[16,32]{1,0}) all-reduce(%y, %w), channel_id=1, replica_groups=[1,8]<=[8], to_apply=%add, metadata={op_name="jit(step)/while/body/dot_general"}
  ROOT %t = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) tuple(%i, %x, %w)
}

%cond (p: (s32[], f32[8,16], f32[16,32])) -> pred[] {
  %p = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8,16], w: f32[2,32]) -> f32[16,32] {
  %x = f32[8,16]{1,0} parameter(0)
  %ws = f32[2,32]{1,0} parameter(1)
  %w = f32[16,32]{1,0} all-gather(%ws), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) tuple(%zero, %x, %w)
  %loop = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %out = f32[16,32]{1,0} get-tuple-element(%loop), index=2
  ROOT %rs = f32[2,32]{1,0} reduce-scatter(%out), channel_id=3, replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%add
}
"""


def test_collectives_and_flops_count_each_loop_trip():
  found = {c.kind: c for c in hlo_audit.collectives(HLO)}
  # Inside the loop: 4 runs of a tuple all-reduce of 8*32 + 16*32 floats. Outside: once each, sized
  # by the whole buffer (the all-gather's result, the reduce-scatter's operand), not the shard.
  assert (found['all-reduce'].runs, found['all-reduce'].bytes) == (4, 4 * (8 * 32 + 16 * 32))
  assert found['all-reduce'].op_name == 'jit(step)/while/body/dot_general'
  assert (found['all-gather'].runs, found['all-gather'].bytes) == (1, 4 * 16 * 32)
  assert (found['reduce-scatter'].runs, found['reduce-scatter'].bytes) == (1, 4 * 16 * 32)
  assert hlo_audit.summary(hlo_audit.collectives(HLO))['all-reduce'] == {'count': 4, 'bytes': 4 * 4 * 768}
  assert hlo_audit.dot_flops(HLO) == 4 * 2 * 8 * 32 * 16  # the fused dot, once per trip
  with pytest.raises(ValueError, match='known trip count'):
    hlo_audit.collectives(HLO.replace(', backend_config={"known_trip_count":{"n":"4"}}', ''))


# heads, kv heads, d_ff, vocabulary and the batch all divide by 8.
MODEL = dict(
  kind='decoder_only',
  vocab_size=64,
  num_decoder_layers=1,
  d_model=64,
  d_ff=128,
  num_heads=8,
  num_kv_heads=8,
  dropout_rate=0.1,
  max_len=16,
  norm_position='pre',
)
MESHES = {'data': (8, 1, 1), 'fsdp': (1, 8, 1), 'tensor': (1, 1, 8)}


def _audit_all():
  """Subprocess body: the audit of every layout x accumulation, as JSON on stdout."""
  from experiments import bench as bench_configs
  from transformer.experiment import bench

  out, single = {}, None  # the one-device step's matmul FLOPs: the same with or without accumulation
  for layout, mesh in MESHES.items():
    for accum in (1, 4):
      config = bench_configs.get_config('tiny')
      config.model.update(MODEL)
      config.data.seq_len = 16
      config.train.update(batch_size=32, grad_accum_steps=accum)
      config.train.mesh.update(dict(zip(('data', 'fsdp', 'tensor'), mesh)))
      out[f'{layout}/{accum}'] = bench.audit_train_step(config, single)
      single = out[f'{layout}/{accum}']['single_dot_flops']
  print(json.dumps(out))


@pytest.mark.slow(21)
def test_compiled_step_communicates_what_its_layout_needs():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    PYTHONPATH=root,
    XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8',
  )
  proc = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert 'rematerializ' not in proc.stderr, proc.stderr[-5000:]  # no layout reshards by replicating
  audits = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, audit in audits.items():
    layout = name.split('/')[0]
    assert audit['layout'] == layout
    collectives, expected = audit['collectives'], audit['expected']
    # Every kind present is expected, and within 1.1x of its analytic bytes (never below them: that
    # would mean the expectation, or the parse, misses traffic). Data: one all-reduce of the
    # gradients per step, accumulating or not. FSDP: parameters gathered once, gradients reduced
    # once. Tensor: the activation all-reduces of every micro-batch.
    assert set(collectives) == set(expected), name
    for kind, want in expected.items():
      assert want <= collectives[kind]['bytes'] <= 1.1 * want, (name, kind, collectives[kind], want)
    if layout == 'data':
      assert collectives['all-reduce']['count'] == 1, name
    # No all-gather of batch activations: only FSDP gathers, and only the parameters' bytes.
    assert layout == 'fsdp' or not audit['all_gathers'], name
    # Each device does 1/8 of the single-device step's matmuls: no micro-batch repeated on every
    # device, no replicated layer.
    assert 0.99 <= audit['dot_flops_ratio'] <= 1.1, (name, audit['dot_flops_ratio'])
  # Accumulation changes the number of micro-batches, not the traffic per step.
  for layout in MESHES:
    total = lambda accum: sum(row['bytes'] for row in audits[f'{layout}/{accum}']['collectives'].values())
    assert total(4) == pytest.approx(total(1), rel=0.01), layout


if __name__ == '__main__':
  _audit_all()
