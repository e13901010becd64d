"""The training loop shared by teacher training and every distillation stage.

What it owns: resume-by-default from the newest checkpoint, exact data order (the batch for
step s is `batch_at(s)`, a pure function), asynchronous keep-last-N checkpoints, metrics
written one step late so the host never blocks on the device, periodic validation, progress.
"""

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np

from kforcing_jax import checkpoints, progress


@dataclasses.dataclass
class Loop:
  name: str
  workdir: str                                   # checkpoints/ and metrics.jsonl go here
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


def run(loop: Loop):
  """Runs (or resumes) the loop to `total_steps`. Returns (final state, last eval metrics)."""
  ckpt = checkpoints.Checkpointer(os.path.join(loop.workdir, 'checkpoints'),
                                  keep=loop.keep_checkpoints)
  writer = progress.MetricsWriter(loop.workdir)
  start = ckpt.latest_step()
  if start is None:
    state, start = loop.init_state(), 0
  else:
    state, _ = ckpt.restore(start, loop.abstract_state)
    if progress.is_main_process():
      print(f'[{loop.name}] resumed from step {start} ({ckpt.directory})', flush=True)
  bar = progress.Progress(loop.name, loop.total_steps, start)
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

  for step in range(start, loop.total_steps):
    state, metrics = loop.train_step(state, loop.batch_at(step))
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
      if progress.is_main_process():
        shown = '  '.join(f'{k} {v:.4g}' for k, v in eval_metrics.items())
        print(f'[{loop.name}] eval at step {done}: {shown}', flush=True)
  if pending is not None:
    flush(pending)
  if not eval_metrics:  # resumed at the end: evaluate the final state once more
    eval_metrics = loop.evaluate(state)
  ckpt.close()
  return state, eval_metrics
