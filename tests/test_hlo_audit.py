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
  # The TPU compiler writes no trip count: the condition's `i < 4` gives it; with no constant bound, an error.
  untold = HLO.replace(', backend_config={"known_trip_count":{"n":"4"}}', '')
  assert hlo_audit.collectives(untold) == hlo_audit.collectives(HLO)
  with pytest.raises(ValueError, match='known trip count'):
    hlo_audit.collectives(untold.replace('%n = s32[] constant(4)', '%n = s32[] get-tuple-element(%p), index=0'))


# As the TPU compiler prints them: a batched matmul as a convolution whose window slides over the batch
# (padded so one tap lands on data), a matmul as a 1x1 convolution, an early-exit loop (decoding) and
# replica groups in its mesh form.
TPU_HLO = """HloModule jit_step, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%body (p: (s32[], bf16[256,512,1], bf16[8,64,512], pred[])) -> (s32[], bf16[256,512,1], bf16[8,64,512], pred[]) {
  %p = (s32[]{:T(128)}, bf16[256,512,1]{1,0,2:T(8,128)(2,1)}, bf16[8,64,512]{2,1,0:T(8,128)(2,1)}, pred[]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %x = bf16[256,512,1]{1,0,2:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %w = bf16[8,64,512]{2,1,0:T(8,128)(2,1)} get-tuple-element(%p), index=2
  %q = bf16[256,8,64]{0,2,1:T(8,128)(2,1)} convolution(%x, %w), window={size=8 pad=7_7 rhs_reversal=1}, dim_labels=bf0_0oi->b0f
  %m = bf16[256,512]{1,0:T(8,128)(2,1)} reshape(%q)
  %k = bf16[512,512]{1,0:T(8,128)(2,1)} constant({...})
  %y = bf16[256,512]{1,0:T(8,128)(2,1)} convolution(%m, %k), dim_labels=bf_io->bf
  %r = bf16[256,512]{1,0:T(8,128)(2,1)} all-reduce(%y), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  %d = pred[] get-tuple-element(%p), index=3
  ROOT %t = (s32[], bf16[256,512,1], bf16[8,64,512], pred[]) tuple(%i, %x, %w, %d)
}

%cond (p: (s32[], bf16[256,512,1], bf16[8,64,512], pred[])) -> pred[] {
  %p = (s32[]{:T(128)}, bf16[256,512,1]{1,0,2:T(8,128)(2,1)}, bf16[8,64,512]{2,1,0:T(8,128)(2,1)}, pred[]) parameter(0)
  %one = s32[]{:T(128)} constant(1)
  %max = s32[]{:T(128)} constant(6)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %next = s32[]{:T(128)S(6)} add(%i, %one)
  %lt = pred[]{:T(512)S(6)} compare(%next, %max), direction=LT
  %done = pred[] get-tuple-element(%p), index=3
  %going = pred[] not(%done)
  ROOT %and = pred[]{:T(512)} and(%lt, %going)
}

ENTRY %main (x: bf16[256,512,1], w: bf16[8,64,512]) -> bf16[8,64,512] {
  %x = bf16[256,512,1]{1,0,2:T(8,128)(2,1)} parameter(0)
  %w = bf16[8,64,512]{2,1,0:T(8,128)(2,1)} parameter(1)
  %zero = s32[] constant(0)
  %no = pred[] constant(false)
  %init = (s32[], bf16[256,512,1], bf16[8,64,512], pred[]) tuple(%zero, %x, %w, %no)
  %loop = (s32[], bf16[256,512,1], bf16[8,64,512], pred[]) while(%init), condition=%cond, body=%body
  ROOT %out = bf16[8,64,512]{2,1,0:T(8,128)(2,1)} get-tuple-element(%loop), index=2
}
"""


def test_the_tpu_compilers_forms_are_read():
  """Per trip: the batched convolution is 256 x 8 heads x 64 outputs of 512-long dot products (one of its
  8 taps reads data), the 1x1 one a [256, 512] x [512, 512] matmul; the loop runs at most 6 trips (its
  early exit cannot be known); the all-reduce's groups are the mesh's second axis, 4 devices."""
  assert hlo_audit.dot_flops(TPU_HLO) == 6 * (2 * 256 * 8 * 64 * 512 + 2 * 256 * 512 * 512)
  (reduce,) = hlo_audit.collectives(TPU_HLO)
  assert (reduce.runs, reduce.bytes, reduce.group) == (6, 2 * 256 * 512, 4)


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
