"""Orbax checkpoints: full training state for resume, params-only exports for inference.

Restores always target abstract arrays that carry the *current* mesh's shardings, so a
checkpoint written on one mesh (or number of hosts) restores on any other, including one CPU.

Multi-host: every process calls save, restore, export_params and import_params (orbax
writes each process's shards and synchronises the commit); never call them from process 0
only, or the others wait at orbax's barrier forever. Paths may be local or gs://.
"""

import os

import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
  """Keep-last-N, asynchronous saves of {'state': pytree, 'meta': json} under `directory`."""

  def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
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

  def save(self, step: int, state, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

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
    self._manager.wait_until_finished()
    self._manager.close()


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
