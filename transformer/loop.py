"""The training loop: `setup.build(config)` -> runner -> steps, logs, evals and checkpoints."""

import hashlib
import json
import math
import os
import signal
import time

import jax
import numpy as np
from absl import logging

from transformer import checkpoint, layout, metrics, parallel, setup, summary
from transformer import workdir as workdir_lib
from transformer.config import ConfigError


class NonFiniteLoss(FloatingPointError):
  """Training diverged; the message names the step. Checkpoints before it are kept."""


def evaluate(runner, task, state, batch_size, stop=None, seq_len=None):
  """Token-weighted eval loss (no smoothing), perplexity and accuracy over the whole eval set (cut into windows
  of `seq_len` tokens when given). `stop`, called on every process before each batch, ends the eval early when
  it returns True: the result is then None."""
  totals = None
  where = (jax.process_index(), jax.process_count())
  batches = task.eval_batches(batch_size, *where) if seq_len is None else task.eval_batches(batch_size, *where, seq_len)
  for batch in batches:
    if stop is not None and stop():
      return None
    sums = runner.eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  tokens = max(float(totals['tokens']), 1.0)
  loss = float(totals['loss']) / tokens
  return {
    'eval/loss': loss,
    'eval/perplexity': math.exp(min(loss, 50.0)),
    'eval/accuracy': float(totals['correct']) / tokens,
    'eval/tokens': tokens,
  }


def evaluate_lengths(runner, built: setup.Setup, state, batch_size, stop=None):
  """`eval/loss@L` and `eval/tokens@L` for each L of `config.train.eval_lengths`: `evaluate` on the eval set cut
  into windows of L tokens, with the same rows per batch at every L. A length the model cannot take (learned
  positions end at max_len) gets None and a reason in `eval/notes`. None when `stop` ended the eval early."""
  results, notes = {}, []
  for length in built.train_config.eval_lengths:
    reason = _unreachable(built.model_config, length)
    if reason:
      results[f'eval/loss@{length}'] = None
      notes.append(f'loss@{length}: {reason}')
      continue
    losses = evaluate(runner, built.task, state, batch_size, stop, seq_len=length)
    if losses is None:
      return None
    results[f'eval/loss@{length}'] = losses['eval/loss']
    results[f'eval/tokens@{length}'] = losses['eval/tokens']
  if notes:
    results['eval/notes'] = '; '.join(notes)
  return results


def _unreachable(model_config, length: int) -> str:
  """Why the model cannot be evaluated on windows of `length` tokens; '' when it can."""
  if model_config.positional == 'learned' and length > model_config.max_len:
    return f'learned positions end at config.model.max_len={model_config.max_len}'
  return ''


def predictor(runner, model, state, step, seed):
  """The model with this state's parameters (one copy, not per device), for decoding."""
  from transformer.predictor import Predictor  # decoding compiles only when a task decodes

  return Predictor(model, runner.to_checkpoint(state).params, step=step, seed=seed)


def evaluate_all(runner, built: setup.Setup, state, step, workdir, stop=None, writer=None):
  """Loss metrics, the task's own metrics (BLEU, bits per byte, ...) and decoded samples.

  Samples are printed, and appended to `<workdir>/samples.jsonl` so a reader can judge them later (and given
  to `writer`'s trackers as a table). `stop` as in `evaluate`: None when it ended the eval early.
  """
  _test_signal_in_eval(step)
  task = built.task
  results = evaluate(runner, task, state, runner.local_batch_size(), stop)
  lengths = evaluate_lengths(runner, built, state, runner.local_batch_size(), stop) if results is not None else None
  if lengths is None or (stop is not None and stop()):
    return None
  results.update(lengths)
  pred = predictor(runner, built.model, state, step, built.train_config.seed)
  results.update(task.eval_metrics(pred, results))
  num = built.train_config.num_samples
  samples = task.samples(pred, num, workdir) if num else []
  if samples and jax.process_index() == 0:
    _write_samples(layout.samples_file(workdir), [{'step': step, **s} for s in samples], 'a')
    if writer is not None:
      writer.samples(step, [{'step': step, **s} for s in samples])
    for sample in samples[:2]:
      print(f'\n[step {step}] {_line(sample)}', flush=True)
  return results


def _line(sample: dict) -> str:
  return ' | '.join(f'{k}: {v}' for k, v in sample.items())


def _write_samples(path: str, samples, mode: str):
  """Decoded samples as JSON lines (text unescaped, so a reader sees the words)."""
  with open(path, mode) as f:
    f.writelines(json.dumps(sample, ensure_ascii=False) + '\n' for sample in samples)


def _prepare(config, workdir):
  """What training and evaluation share: the built setup (task, typed configs, model, optimizer), the
  runner and the workdir's checkpoints."""
  built = setup.build(config)
  train = built.train_config
  runner = parallel.make_runner(train, built.model, built.optimizer, built.schedule)
  ckpts = checkpoint.Checkpoints(layout.checkpoints_dir(workdir), keep=train.keep_checkpoints)
  return built, runner, ckpts


def _restore(ckpts, runner):
  """`(state in the runner's layout, data iterator state, step)` from the latest checkpoint."""
  try:
    state, data_state = ckpts.restore(runner.abstract_state())
  except ValueError as error:  # a checkpoint of another model shape: the user's config, not a bug
    raise ConfigError(str(error)) from None
  return runner.from_checkpoint(state), data_state, ckpts.latest_step()


def _init_from(runner, state, model_config, init_from: str, primary: bool):
  """`state` with its parameters replaced by those of `init_from` (transformer/interop/init.py); the optimizer's
  fresh state does not depend on the parameters' values."""
  from transformer.interop import init

  params, source = init.load(init_from, model_config)
  if primary:
    print(f'Parameters initialised from {source}.', flush=True)
  return state.replace(params=init.place(params, state.params))


def _check_finite(step, values):
  loss = float(values['loss'])
  if not math.isfinite(loss):
    raise NonFiniteLoss(
      f'The training loss became {loss} at step {step}: lower config.train.learning_rate, '
      'set config.train.grad_clip, or check the data. Checkpoints before this step are kept.'
    )


def train_and_evaluate(config, workdir: str, stop_at: int | None = None):
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the last eval metrics.

  `stop_at` stops after that step as a preemption would (checkpoint, clean exit): for tests and for
  splitting a run into jobs of bounded length. While it runs, a second run on `workdir` is refused.
  """
  with workdir_lib.locked(workdir, primary=jax.process_index() == 0):  # before anything is written
    return _train(config, workdir, stop_at)


def _train(config, workdir: str, stop_at: int | None):
  built, runner, ckpts = _prepare(config, workdir)
  task, model, train = built.task, built.model, built.train_config
  primary = jax.process_index() == 0
  rows = runner.local_rows()
  train_iter = task.train_iter(train.batch_size, rows)
  digests = BatchDigests(workdir, rows) if train.log_batch_digests else None
  workdir_lib.check_writable(workdir, checkpoint.size_bytes(runner.abstract_state()))  # not at the first save
  # before restoring: refuses a config the checkpoints do not fit
  workdir_lib.save_config(config, workdir, model.config, write=primary)
  if ckpts.latest_step() is not None:
    state, data_state, start_step = _restore(ckpts, runner)
    if data_state is not None:
      train_iter.set_state(data_state)
  else:
    state, start_step = runner.init_state(train.seed), 0
    if train.init_from:  # fine-tuning: step 0's parameters from elsewhere (a resumed run ignores it)
      state = _init_from(runner, state, built.model_config, train.init_from, primary)

  writer = metrics.MetricsWriter(workdir, enabled=primary, loggers=train.loggers)
  progress = metrics.Progress(train.num_steps, enabled=primary)
  model_flops = metrics.flops_per_token(model.config, task.seq_len)
  peak_per_device, mfu_basis = metrics.peak_flops_basis(train.peak_flops)
  peak = peak_per_device * jax.device_count()
  if primary:  # once: train/mfu means little without what it divides by
    print(f'MFU against {mfu_basis}: {peak_per_device / 1e9:,.1f} GFLOP/s per device', flush=True)

  def save(step):
    ckpts.save(step, runner.to_checkpoint(state), train_iter.get_state(), config.to_dict())

  eval_metrics = {}
  pending = None  # (step, device metrics) of the last dispatched step, fetched one step later
  window = []  # host metrics since the last log
  window_start = time.perf_counter()
  data_wait = 0.0  # seconds the loop waited for input batches in this window
  compile_s = None
  step = start_step
  closers = [progress.close, *([digests.close] if digests is not None else []), ckpts.wait, ckpts.close, writer.close]
  try:
    with checkpoint.PreemptionGuard() as guard:
      for step in range(start_step + 1, train.num_steps + 1):
        wait_start = time.perf_counter()
        batch = next(train_iter)
        step_start = time.perf_counter()
        data_wait += step_start - wait_start
        if digests is not None:
          digests.write(step, batch)
        state, step_metrics = runner.train_step(state, batch)
        if compile_s is None:  # the first step compiles; time it apart and restart the clock
          jax.block_until_ready(step_metrics)
          compile_s = time.perf_counter() - step_start
          window_start, data_wait = time.perf_counter(), 0.0
          writer.write(step, {'train/compile_s': compile_s})
        if pending is not None:  # fetching the previous step's metrics does not stall this step's dispatch
          window.append(jax.device_get(pending[1]))
          _check_finite(pending[0], window[-1])
        pending = (step, step_metrics)

        last = step == train.num_steps
        if step % train.log_every == 0 or last:
          window.append(jax.device_get(step_metrics))
          _check_finite(step, window[-1])
          pending = None
          elapsed = time.perf_counter() - window_start
          tokens = sum(float(m['tokens']) for m in window)
          step_time = elapsed / len(window)
          scalars = {
            f'train/{k}': float(np.mean([float(m[k]) for m in window]))
            for k in ('loss', 'accuracy', 'grad_norm', 'param_norm', 'learning_rate')
          }
          scalars.update(
            {
              'train/tokens_per_sec': tokens / elapsed,
              'train/step_ms': 1000 * step_time,
              'train/mfu': tokens / elapsed * model_flops / peak,
              'train/data_wait_frac': data_wait / elapsed,
            }
          )
          writer.write(step, scalars)
          progress.update(step, scalars['train/loss'], scalars['train/tokens_per_sec'], step_time)
          window, window_start, data_wait = [], time.perf_counter(), 0.0
        evaluated = step % train.eval_every == 0 or last
        if evaluated:  # a signal during the eval is kept: the checkpoint below follows right after it
          eval_metrics = evaluate_all(runner, built, state, step, workdir, writer=writer)
          writer.write(step, eval_metrics)
          if primary:
            print(summary.eval_line(step, eval_metrics), flush=True)
          window_start, data_wait = time.perf_counter(), 0.0  # eval time is not step time
        stop = guard.should_stop(step, sync=evaluated) or step == stop_at
        if step % train.checkpoint_every == 0 or last or stop:
          if pending is not None:  # never checkpoint a state whose loss was not checked
            _check_finite(step, jax.device_get(pending[1]))
          save(step)
        _test_kill(step)
        if stop:
          if primary and guard.requested:
            print(f'\nStopped by a signal at step {step}; checkpoint saved. Re-run to resume.', flush=True)
          break
  except BaseException:
    _close_all(True, *closers)  # a failing run still finishes the saves it started
    raise
  _close_all(False, *closers)
  if primary:
    print(summary.run_summary(workdir, step, train.num_steps, _evals(workdir), writer.tensorboard), flush=True)
  return eval_metrics


def _evals(workdir: str) -> list[dict]:
  """The eval rows of `<workdir>/metrics.jsonl`, those of earlier (resumed) runs included."""
  path = layout.metrics_file(workdir)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [row for row in map(json.loads, f) if 'eval/loss' in row]


def _close_all(failing: bool, *closers) -> None:
  """Calls each of `closers` (wait for the checkpoints, close files). When the run is `failing`, an error on the way
  (a full disk that also stops the metrics writer) is logged, not raised: it must not hide the run's own
  error, which says what happened. Otherwise the first such error is raised, after closing the rest."""
  errors = []
  for close in closers:
    try:
      close()
    except Exception as error:  # noqa: BLE001 -- reported below, after the rest is closed
      errors.append(error)
  if errors and failing:
    for error in errors:
      logging.warning('While stopping after an error: %s', error)
  elif errors:
    raise errors[0]


def _test_signal_in_eval(step: int) -> None:
  """Tests of fault tolerance: `TRANSFORMER_TEST_SIGTERM_IN_EVAL=<step>` sends this process SIGTERM as the
  eval of that step starts, as a preemption notice arriving during a long eval would."""
  if os.environ.get('TRANSFORMER_TEST_SIGTERM_IN_EVAL') == str(step):
    os.kill(os.getpid(), signal.SIGTERM)


def _test_kill(step: int) -> None:
  """Tests of fault tolerance: `TRANSFORMER_TEST_KILL_AT=<step>:<process>` SIGKILLs that process after
  that step (a checkpoint saved at it may still be in flight), as a lost machine would be."""
  target = os.environ.get('TRANSFORMER_TEST_KILL_AT')
  if target and target == f'{step}:{jax.process_index()}':
    os.kill(os.getpid(), signal.SIGKILL)


class BatchDigests:
  """`config.train.log_batch_digests`: each process appends, per step, a short hash of every row it fed
  to `<workdir>/batches/process_<i>.jsonl`, so a test (or a researcher chasing a data bug) can check
  which examples each process trained on at each step, across restarts and topologies."""

  def __init__(self, workdir: str, rows: tuple[int, int]):
    os.makedirs(os.path.join(workdir, layout.BATCHES_DIR), exist_ok=True)
    self.rows = list(rows)
    self._file = open(os.path.join(workdir, layout.BATCHES_DIR, f'process_{jax.process_index()}.jsonl'), 'a')

  def write(self, step: int, batch: dict):
    count = len(next(iter(batch.values())))
    row_hashes = [
      hashlib.blake2b(
        b''.join(np.ascontiguousarray(batch[k][i]).tobytes() for k in sorted(batch)), digest_size=6
      ).hexdigest()
      for i in range(count)
    ]
    self._file.write(json.dumps({'step': step, 'rows': self.rows, 'digests': row_hashes}) + '\n')
    self._file.flush()

  def close(self):
    self._file.close()


def _prepare_latest(config, workdir, what):
  built, runner, ckpts = _prepare(config, workdir)
  if ckpts.latest_step() is None:
    raise ConfigError(f'No checkpoint in {workdir}/checkpoints to {what}: train first (--mode train).')
  state, _, step = _restore(ckpts, runner)
  return built, runner, ckpts, state, step


def decode_checkpoint(config, workdir: str):
  """Decodes `config.train.decode_examples` eval examples with the latest checkpoint into
  `<workdir>/decode/step_<N>.jsonl` (source, reference and output, or prompt and continuation)."""
  built, runner, ckpts, state, step = _prepare_latest(config, workdir, 'decode')
  ckpts.close()
  pred = predictor(runner, built.model, state, step, built.train_config.seed)
  samples = built.task.samples(pred, built.train_config.decode_examples, workdir)
  if jax.process_index() == 0:
    path = os.path.join(workdir, layout.DECODE_DIR, f'step_{step}.jsonl')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_samples(path, samples, 'w')
    for sample in samples[:5]:
      print(_line(sample))
    print(f'{len(samples)} decoded examples written to {path}')
  return samples


def evaluate_checkpoint(config, workdir: str):
  """Evaluates the latest checkpoint in `workdir` on the task's eval set and logs it."""
  built, runner, ckpts, state, step = _prepare_latest(config, workdir, 'evaluate')
  with checkpoint.PreemptionGuard() as guard:  # a signal ends the eval between batches, writing nothing
    results = evaluate_all(runner, built, state, step, workdir, stop=lambda: guard.should_stop(sync=True))
  if results is None:
    ckpts.close()
    if jax.process_index() == 0:
      print(f'Stopped by a signal during the eval of step {step}: nothing written. Re-run to evaluate it.', flush=True)
    return {}
  writer = metrics.MetricsWriter(workdir, enabled=jax.process_index() == 0, loggers=built.train_config.loggers)
  writer.write(step, results)
  writer.close()
  ckpts.close()
  if jax.process_index() == 0:
    print(json.dumps({'step': step, **results}))
  return results
