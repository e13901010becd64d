"""What produced a run: the resolved config, package versions, git commit, devices.

  run_record(config)                 that record as a JSON-able dict (made once per run)
  write_run_config(directory, rec)   <directory>/config.json (process 0; loop.run calls it)
  read_run_config(directory)         the record back, or None when there is none
  hparams(record)                    the config flattened to 'train.learning_rate' -> scalar,
                                     for TensorBoard's HParams dashboard

The training loop writes config.json into each model directory (teacher/, student_k*/) when
it starts from step 0, and on resume when the file is missing.
"""

import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import traverse_util

from kforcing_jax import progress

CONFIG_FILENAME = 'config.json'
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'tensorflow-datasets',
            'grain', 'tokenizers', 'ml_collections', 'tensorboardX')
REPO_ROOT = Path(__file__).resolve().parents[1]


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
  """Installed version of each package (None where it is not installed)."""
  versions = {}
  for name in packages:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def _git(*args: str) -> str | None:
  try:
    result = subprocess.run(['git', *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):  # no git, not a checkout, or too slow
    return None
  return result.stdout.strip()


def git_state() -> dict[str, Any]:
  """{'commit': HEAD of this code's checkout, 'dirty': tracked files changed since it}, both
  None when the code does not run from its own git checkout (an installed copy inside some
  other repository does not count)."""
  toplevel = _git('rev-parse', '--show-toplevel')
  if toplevel is None or Path(toplevel).resolve() != REPO_ROOT:
    return {'commit': None, 'dirty': None}
  status = _git('status', '--porcelain', '--untracked-files=no')
  return {'commit': _git('rev-parse', 'HEAD'), 'dirty': None if status is None else bool(status)}


def device_info() -> dict[str, Any]:
  devices = jax.devices()
  return {'platform': devices[0].platform, 'device_kind': devices[0].device_kind,
          'device_count': len(devices), 'process_count': jax.process_count()}


def run_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The full resolved config (tuples as lists) and what ran it; plain JSON data."""
  return progress.json_safe({
      'config': config.to_dict(),
      'versions': package_versions(),
      'git': git_state(),
      'devices': device_info(),
      'python': platform.python_version(),
      'command': list(sys.argv),
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  })


def config_path(directory: str | epath.PathLike) -> epath.Path:
  return epath.Path(directory) / CONFIG_FILENAME


def write_run_config(directory: str | epath.PathLike, record: dict[str, Any]) -> None:
  """Writes `record` to <directory>/config.json (process 0 only; local or gs://)."""
  if progress.is_main_process():
    progress.write_json(config_path(directory), record)


def read_run_config(directory: str | epath.PathLike) -> dict[str, Any] | None:
  """The record `write_run_config` stored in `directory`, or None when it has none."""
  return progress.read_json(config_path(directory))


def hparams(record: dict[str, Any]) -> dict[str, bool | int | float | str]:
  """The record's config flattened with '.' (the names --config.<name>= overrides use), each
  value a bool, number or string: lists and None become their JSON text."""
  flat = traverse_util.flatten_dict(record['config'], sep='.')
  return {name: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
          for name, value in sorted(flat.items())}
