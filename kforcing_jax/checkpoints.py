"""Orbax checkpoints: full training state for resume, params-only exports for inference.

Restores always target abstract arrays that carry the *current* mesh's shardings, so a
checkpoint written on one mesh (or number of hosts) restores on any other, including one CPU.

Multi-host: every process calls save, restore, export_params and import_params (orbax
writes each process's shards and synchronises the commit); never call them from process 0
only, or the others wait at orbax's barrier forever. Paths may be local or gs://.

Failures: a save that fails (disk full, permissions; an asynchronous save's error surfaces at
the next save, `check` or `wait`) raises SaveFailed, which stops a run at once. A checkpoint is
usable when orbax restores it and every array in it is finite (`all_finite`);
`restore_newest_usable` falls back from an unreadable newest checkpoint to the next older one.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kforcing_jax import progress


class SaveFailed(Exception):
  """Writing a checkpoint failed; carries the step, the directory and the reason."""
  exit_code = 5


@jax.jit
def _finite_flags(tree):
  return [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.inexact)]


def all_finite(tree) -> bool:
  """True when no floating-point array in `tree` holds a NaN or an infinity."""
  return bool(np.all(jax.device_get(_finite_flags(tree))))


class Checkpointer:
  """Keep-last-N, asynchronous saves of {'state': pytree, 'meta': json} under `directory`."""

  def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
    if keep < 1:  # orbax would delete every checkpoint as soon as it is written
      raise ValueError(f'keep_checkpoints must be >= 1 (got {keep}): a run keeps at least its '
                       'newest checkpoint to resume from.')
    self.directory = os.path.abspath(directory) if '://' not in directory else directory
    # handlers named up front so `state_shapes` can read metadata without a restore target
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def state_shapes(self, step: int):
    """The saved state's structure with a shape tuple per array, read without loading it."""
    tree = self._manager.item_metadata(step)['state'].tree
    return jax.tree.map(lambda m: tuple(m.shape), tree, is_leaf=lambda m: hasattr(m, 'shape'))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    """Starts saving `step` (asynchronously unless async_save=False). Raises SaveFailed, also
    for an earlier asynchronous save that failed meanwhile."""
    self.check()
    try:
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)),
                         force=True)
    except Exception as e:  # noqa: BLE001 - any failure to write is the run's end
      raise SaveFailed(f'saving checkpoint step {step} to {self.directory} failed: '
                       f'{_reason(e)}') from e

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: True on every process when the cluster's preemption notice reached them
    all at `step` (jax's preemption sync point); RuntimeError without that service."""
    return self._manager.reached_preemption(step)

  def check(self) -> None:
    """Raises SaveFailed when an asynchronous save has failed since the last check."""
    try:
      self._manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise SaveFailed(f'saving a checkpoint to {self.directory} failed: {_reason(e)}') from e

  def wait(self) -> None:
    """Blocks until the pending save is on disk; raises SaveFailed when it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise SaveFailed(f'saving a checkpoint to {self.directory} failed: {_reason(e)}') from e
    self.check()

  def restore_newest_usable(self, abstract_state):
    """(state, meta, step) of the newest checkpoint that restores and holds only finite
    values; None when there is no checkpoint. Each newer one that is not usable is reported
    and deleted (a later save of its step would otherwise collide with it); ValueError when
    none is usable."""
    failures = []
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - whatever orbax raises for damaged files
        failures.append((step, _reason(e.__cause__ or e)))
        continue
      if not all_finite(state):
        failures.append((step, 'it holds NaN or infinite values'))
        continue
      for bad, reason in failures:
        progress.log(f'checkpoint step {bad} is unreadable ({reason}); resuming from step '
                     f'{step} (step {bad} deleted)')
        self._manager.delete(bad)
      return state, meta, step
    if not failures:
      return None
    listed = '; '.join(f'step {step}: {reason}' for step, reason in failures)
    raise ValueError(f'no usable checkpoint in {self.directory} ({listed}). Use the config that '
                     'wrote them, or a fresh --workdir (or delete that checkpoints folder) to '
                     'start over.')

  def restore(self, step: int, abstract_state):
    """Returns (state, meta) laid out as `abstract_state`'s shardings say."""
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f'checkpoint {self.directory} step {step} does not match this '
                       f'config\'s model/optimizer ({e}). Use a fresh --workdir or the config '
                       'that wrote it.') from e
    return restored['state'], restored['meta']

  def read_meta(self, step: int) -> dict:
    """The JSON meta saved with `step`, read without the arrays."""
    return dict(self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])

  def close(self) -> None:
    self.wait()
    self._manager.close()


def _reason(error: BaseException) -> str:
  """The first line of an error, with its type when the text alone would be vague."""
  text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ''
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def export_params(directory: str, params, meta: dict) -> None:
  """A params-only checkpoint (synchronous) for inference and stage initialisation.

  Exporting again (a run resumed after its export) writes the next step number and orbax then
  drops the older one, so a valid export exists at every moment."""
  ckpt = Checkpointer(directory, keep=1, async_save=False)
  previous = ckpt.latest_step()
  ckpt.save(0 if previous is None else previous + 1, params, meta)
  ckpt.close()


def has_params(directory: str) -> bool:
  if not epath.Path(directory).is_dir():
    return False
  ckpt = Checkpointer(directory, keep=1, async_save=False)
  try:
    return ckpt.latest_step() is not None
  finally:
    ckpt.close()


class ExportReader:
  """One params-only export opened once: its shapes and meta without the arrays, then the
  arrays onto a restore target. Use as a context manager (closes the orbax manager)."""

  def __init__(self, directory: str):
    self._ckpt = Checkpointer(directory, keep=1, async_save=False)
    self.step = self._ckpt.latest_step()
    if self.step is None:
      self._ckpt.close()
      raise FileNotFoundError(f'no parameters exported under {directory}.')

  def __enter__(self) -> 'ExportReader':
    return self

  def __exit__(self, *exc) -> None:
    self._ckpt.close()

  def shapes(self) -> dict:
    """Nested dict of the parameter shapes, read without the arrays."""
    return self._ckpt.state_shapes(self.step)

  def meta(self) -> dict:
    """The meta dict saved with the export ({'kind', 'k', 'steps', ...})."""
    return self._ckpt.read_meta(self.step)

  def import_params(self, abstract_params):
    """The parameters on `abstract_params`' shardings. Returns (params, meta)."""
    return self._ckpt.restore(self.step, abstract_params)


def import_params(directory: str, abstract_params):
  """Load a params-only export onto `abstract_params`' shardings. Returns (params, meta)."""
  with ExportReader(directory) as reader:
    return reader.import_params(abstract_params)
