"""The training loop shared by teacher training and every distillation stage.

What it owns: resume-by-default from the newest checkpoint, exact data order (the batch for
step s is `batch_at(s)`, a pure function), asynchronous keep-last-N checkpoints, metrics
written one step late so the host never blocks on the device (metrics.jsonl and TensorBoard),
periodic validation, progress, the run's config.json, and an optional profiler trace.

And what may go wrong (each stops the run with an exception `cli.run` turns into one line and
an exit status of its own):
  - another process already writes this workdir: run_lock.WorkdirLocked;
  - a NaN/inf loss or gradient norm: NonFiniteLoss, within one log interval (at the flush of
    that step's metrics). Every save first checks the saved step's metrics and the state itself,
    so no checkpoint (and hence no export made from the final one) ever holds non-finite values;
  - a save that fails: checkpoints.SaveFailed, at once;
  - SIGTERM / SIGINT (spot VMs, Ctrl-C): Preempted, after saving the state of the step boundary
    that follows. A resume then continues exactly: data order is a pure function of the step
    and metrics.jsonl keeps only the rows up to the restored step;
  - an unreadable newest checkpoint: reported, and the next older one is used;
  - a resume whose config changes the math: ValueError naming the keys (`config_changes`).
"""

import contextlib
import dataclasses
import math
import signal
import threading
from typing import Any, Callable

import jax
import numpy as np
from etils import epath

from kforcing_jax import checkpoints, progress, provenance, run_lock


class NonFiniteLoss(Exception):
  """The loss or the gradient norm (or the state about to be saved) is NaN or infinite."""
  exit_code = 4


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; the state of `step` is saved. Exit status 128 + the signal."""

  def __init__(self, message: str, step: int, signum: int):
    super().__init__(message)
    self.step = step
    self.exit_code = 128 + signum


@dataclasses.dataclass
class Loop:
  name: str
  workdir: str                                   # checkpoints/, metrics.jsonl, TensorBoard
                                                 # events, config.json, profile/ (local or gs://)
  total_steps: int
  init_state: Callable[[], Any]                  # fresh, already-sharded training state
  abstract_state: Any                            # ShapeDtypeStructs with target shardings
  train_step: Callable[[Any, Any], tuple[Any, dict]]
  batch_at: Callable[[int], Any]                 # step -> global batch
  evaluate: Callable[[Any], dict]                # state -> validation metrics
  log_every: int = 10
  eval_every: int = 100
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  meta: dict = dataclasses.field(default_factory=dict)
  # > 0: a jax.profiler trace of this many steps, after the first (which compiles), in
  # <workdir>/profile (open with TensorBoard's profile plugin or Perfetto); process 0 only
  profile_steps: int = 0
  # provenance.run_record(config): written to <workdir>/config.json at step 0 (and on resume
  # when missing), and its config as TensorBoard hparams at step 0; a resume compares its
  # config with config.json's (config_changes). None: none of that.
  config_record: dict | None = None


# Config keys a resume may change: where files are, how often the loop logs, evaluates and
# saves, and how the state is laid out on devices (a checkpoint restores on any mesh). Every
# other key of seed, model, data and the loop's own section changes what the remaining steps
# compute (the learning-rate schedule is built from the step count), so a resume with another
# value would silently continue a different run from this one's state.
RESUME_FREE_KEYS = frozenset({'data.data_dir', 'data.manual_dir', 'data.tokenizer_path'})
RESUME_FREE_FIELDS = frozenset({'log_every', 'eval_every', 'eval_batches', 'checkpoint_every',
                                'keep_checkpoints', 'profile_steps'})
# The config sections a loop's steps read, by its checkpoint meta's kind: the teacher (and the
# evaluator) read train.*, a stage distill.* (its teacher's train.* is checked through the
# teacher's fingerprint instead); the compared methods' loops (baselines/) read compare.* and
# the optimizer fields of distill.* (heads) or train.* (the diffusion LM). A loop of another
# kind is held to train.* and distill.*.
_SECTIONS = {'ar': ('train',), 'pflm': ('distill',), 'heads': ('compare', 'distill'),
             'mdlm': ('compare', 'train')}


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _math_keys(config: dict, meta: dict) -> dict:
  sections = _SECTIONS.get(meta.get('kind'), ('train', 'distill'))
  kept = {}
  for key, value in _flatten(config).items():
    top, _, field = key.partition('.')
    if top == 'seed' or top in ('model', 'data') or top in sections:
      if key not in RESUME_FREE_KEYS and field not in RESUME_FREE_FIELDS:
        kept[key] = value
  if 'k' in meta and 'distill.stages' in kept:
    # a stage reads only its own (k, steps) entry: other stages may be added or changed
    own = [steps for k, steps in kept.pop('distill.stages') if k == meta['k']]
    kept[f'distill.stages k={meta["k"]} steps'] = own[0] if own else None
  return kept


def config_changes(stored: dict, current: dict, meta: dict | None = None) -> list[str]:
  """'key old -> new' for each math-relevant key (see RESUME_FREE_KEYS) that differs between
  two run records' configs. A key only one of them has is skipped: it was added or removed by
  a code change, whose default keeps the old behaviour (a run started before the change must
  still resume)."""
  old, new = _math_keys(stored, meta or {}), _math_keys(current, meta or {})
  return [f'{key} {progress.dumps(old[key])} -> {progress.dumps(new[key])}'
          for key in sorted(set(old) & set(new)) if old[key] != new[key]]


def _check_resume_config(loop: 'Loop') -> None:
  if loop.config_record is None:
    return
  try:
    stored = provenance.read_run_config(loop.workdir)
  except ValueError:  # unreadable config.json: nothing to compare with (it is rewritten)
    return
  if not stored or 'config' not in stored:
    return
  changes = config_changes(stored['config'], loop.config_record['config'], loop.meta)
  if changes:
    raise ValueError(f'resuming {loop.workdir} with a different config: {", ".join(changes)}; '
                     'use the original config or a fresh --workdir')


def _config_section(loop: 'Loop') -> str:
  return {'pflm': 'distill'}.get(loop.meta.get('kind'), 'train')


class _StopRequests:
  """SIGTERM and SIGINT while the loop runs: remembered, and acted on at the next step
  boundary (a save needs the step's state, which only exists between steps). A second SIGINT
  stops at once (KeyboardInterrupt), for a user who does not want to wait for the save.

  Multi-host: every process must save the same step, so the decision is jax's preemption sync
  point (its coordination service catches the signal, orbax asks it); where that service is
  disabled orbax answers False, and there are no preemption saves (a lone process's flag
  would hang the others at the save's barrier)."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict = {}
    self._multihost = jax.process_count() > 1

  def __enter__(self) -> '_StopRequests':
    if not self._multihost and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def requested(self, step: int, ckpt: checkpoints.Checkpointer) -> bool:
    if not self._multihost:
      return self.signum is not None
    if ckpt.reached_preemption(step):
      self.signum = signal.SIGTERM
      return True
    return False


def run(loop: Loop):
  """Runs (or resumes) the loop to `total_steps`. Returns (final state, last eval metrics).

  Holds the workdir's lock meanwhile (run_lock); raises NonFiniteLoss, Preempted,
  checkpoints.SaveFailed or run_lock.WorkdirLocked as the module doc says."""
  if loop.keep_checkpoints < 1:
    raise ValueError(f'{_config_section(loop)}.keep_checkpoints must be >= 1 (got '
                     f'{loop.keep_checkpoints}): with none kept, every checkpoint is deleted as '
                     'it is written and nothing can be resumed.')
  with run_lock.hold(loop.workdir), _StopRequests() as stop:
    return _run(loop, stop)


def _run(loop: Loop, stop: _StopRequests):
  ckpt = checkpoints.Checkpointer(str(epath.Path(loop.workdir) / 'checkpoints'),
                                  keep=loop.keep_checkpoints)
  try:
    state, eval_metrics = _train(loop, stop, ckpt)
  except BaseException:
    # what was saved before the failure must finish on disk; its own error is secondary
    with contextlib.suppress(Exception):
      ckpt.close()
    raise
  ckpt.close()
  return state, eval_metrics


def _train(loop: Loop, stop: _StopRequests, ckpt: checkpoints.Checkpointer):
  resumed = None
  if ckpt.all_steps():
    _check_resume_config(loop)
    resumed = ckpt.restore_newest_usable(loop.abstract_state)
  if resumed is None:
    state, start = loop.init_state(), 0
  else:
    state, _, start = resumed
    progress.log(f'[{loop.name}] resumed from step {start} ({ckpt.directory})')
  writer = progress.MetricsWriter(loop.workdir)
  # rows a stopped run wrote after its last checkpoint are written again by this one
  writer.drop_rows_after(start)
  if loop.config_record is not None:
    if start == 0 or not provenance.config_path(loop.workdir).exists():
      provenance.write_run_config(loop.workdir, loop.config_record)
    if start == 0:
      writer.write_hparams(provenance.hparams(loop.config_record))
  bar = progress.Progress(loop.name, loop.total_steps, start)
  profile = _Profile(loop, start)
  eval_metrics: dict = {}
  pending = None
  window: list[dict] = []

  def flush(item):
    step, metrics = item
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    writer.write(step, metrics)
    bad = {k: v for k, v in metrics.items()
           if (k in ('loss', 'grad_norm') or k.endswith('_loss')) and not math.isfinite(v)}
    if bad:
      _stop_non_finite(loop, ckpt, step, ', '.join(f'{k} {v}' for k, v in bad.items()))
    window.append(metrics)
    if step % loop.log_every == 0 or step == loop.total_steps:
      bar.update(step, {k: float(np.mean([m[k] for m in window])) for k in metrics})
      window.clear()

  try:
    for step in range(start, loop.total_steps):
      profile.before(step)
      state, metrics = loop.train_step(state, loop.batch_at(step))
      profile.after(step, state)
      if pending is not None:
        flush(pending)
      pending = (step + 1, metrics)
      done = step + 1
      # at the last step there is nothing left to resume: finish (and export) instead
      preempted = done < loop.total_steps and stop.requested(done, ckpt)
      # evaluate before saving: once step `done` is saved, a resume (after SIGTERM, Ctrl-C or
      # kill -9) starts after it and never re-runs its evaluation, so its val row must exist
      # by then to match an undisturbed run
      if done % loop.eval_every == 0 or done == loop.total_steps:
        if pending is not None:
          flush(pending)
        pending = None
        eval_metrics = loop.evaluate(state)
        writer.write(done, {f'val_{k}' if not k.startswith('val') else k: v
                            for k, v in eval_metrics.items()})
        shown = '  '.join(f'{k} {v:.4g}' for k, v in eval_metrics.items())
        progress.log(f'[{loop.name}] eval at step {done}: {shown}')
      if done % loop.checkpoint_every == 0 or done == loop.total_steps or preempted:
        # the step's own metrics first (the host waits for this step here, once per save):
        # a NaN step is never saved, so the newest checkpoint always holds a finite run
        if pending is not None:
          flush(pending)
        pending = None
        if not checkpoints.all_finite(state):
          _stop_non_finite(loop, ckpt, done, 'parameters or optimizer state')
        writer.flush()  # rows up to `done` on disk before the checkpoint that a resume trusts
        ckpt.save(done, state, dict(loop.meta, step=done))
      else:
        ckpt.check()  # an asynchronous save that failed stops the run now, not steps later
      if preempted:
        ckpt.wait()
        writer.flush()
        message = (f'[{loop.name}] preempted at step {done}; checkpoint saved; rerun the same '
                   'command to resume')
        progress.log(message)
        raise Preempted(message, done, stop.signum)
    if pending is not None:
      flush(pending)
  finally:
    profile.stop()
    writer.close()
  if not eval_metrics:  # resumed at the end: evaluate the final state once more
    eval_metrics = loop.evaluate(state)
  return state, eval_metrics


def _stop_non_finite(loop: Loop, ckpt: checkpoints.Checkpointer, step: int, what: str):
  newest = ckpt.all_steps()
  kept = f'newest checkpoint: step {newest[-1]}' if newest else 'no checkpoint was saved'
  raise NonFiniteLoss(
      f'[{loop.name}] non-finite {what} at step {step}; stopped ({kept}, nothing non-finite '
      f'saved). Check the data of that step; or try, in a fresh --workdir (a resume keeps the '
      f'config), a lower {_config_section(loop)}.learning_rate or more warmup_steps, or '
      'model.dtype=float32 instead of bfloat16.')


class _Profile:
  """Traces loop steps start+1 .. start+profile_steps (0-based; the first step, which compiles,
  is left out) into <workdir>/profile, on process 0 only."""

  def __init__(self, loop: Loop, start: int):
    last = min(start + loop.profile_steps, loop.total_steps - 1)
    self.steps = range(start + 1, last + 1) if progress.is_main_process() else range(0)
    self.directory = str(epath.Path(loop.workdir) / 'profile')
    self.name = loop.name
    self.tracing = False

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(self.directory)
      self.tracing = True

  def after(self, step: int, state: Any) -> None:
    if self.tracing and step == self.steps[-1]:
      jax.block_until_ready(state)  # the trace must hold the last step's device work
      self.stop()
      progress.log(f'[{self.name}] profile of steps {self.steps[0] + 1}-{step + 1} written '
                   f'to {self.directory}')

  def stop(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False
