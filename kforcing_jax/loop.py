"""The training loop shared by teacher training and every distillation stage.

What it owns: resume-by-default from the newest checkpoint, exact data order (the batch for
step s is `batch_at(s)`, a pure function), asynchronous keep-last-N checkpoints, metrics
written one step late so the host never blocks on the device (metrics.jsonl and TensorBoard),
periodic validation, progress, the run's config.json, and an optional profiler trace.
"""

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from etils import epath

from kforcing_jax import checkpoints, progress, provenance


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
  # when missing), and its config as TensorBoard hparams at step 0. None: neither.
  config_record: dict | None = None


def run(loop: Loop):
  """Runs (or resumes) the loop to `total_steps`. Returns (final state, last eval metrics)."""
  ckpt = checkpoints.Checkpointer(str(epath.Path(loop.workdir) / 'checkpoints'),
                                  keep=loop.keep_checkpoints)
  start = ckpt.latest_step()
  if start is None:
    state, start = loop.init_state(), 0
  else:
    state, _ = ckpt.restore(start, loop.abstract_state)
    progress.log(f'[{loop.name}] resumed from step {start} ({ckpt.directory})')
  writer = progress.MetricsWriter(loop.workdir)
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
      if done % loop.checkpoint_every == 0 or done == loop.total_steps:
        ckpt.save(done, state, dict(loop.meta, step=done))
      if done % loop.eval_every == 0 or done == loop.total_steps:
        flush(pending)
        pending = None
        eval_metrics = loop.evaluate(state)
        writer.write(done, {f'val_{k}' if not k.startswith('val') else k: v
                            for k, v in eval_metrics.items()})
        shown = '  '.join(f'{k} {v:.4g}' for k, v in eval_metrics.items())
        progress.log(f'[{loop.name}] eval at step {done}: {shown}')
    if pending is not None:
      flush(pending)
  finally:
    profile.stop()
    writer.close()
  if not eval_metrics:  # resumed at the end: evaluate the final state once more
    eval_metrics = loop.evaluate(state)
  ckpt.close()
  return state, eval_metrics


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
