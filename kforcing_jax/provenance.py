"""What produced a run: the resolved config, package versions, git commit, devices, and the
identity of the parameters and tokenizer a model was made from.

  run_record(config)                 that record as a JSON-able dict (made once per run)
  write_run_config(directory, rec)   <directory>/config.json (process 0; loop.run calls it)
  read_run_config(directory)         the record back, or None when there is none
  hparams(record)                    the config flattened to 'train.learning_rate' -> scalar,
                                     for TensorBoard's HParams dashboard
  params_fingerprint(params)         a 16-hex-digit identity of a params pytree's exact bits
  tokenizer_fingerprint(tokenizer)   a 16-hex-digit identity of a tokenizer's vocabulary

The training loop writes config.json into each model directory (teacher/, student_k*/) when
it starts from step 0, and on resume when the file is missing. Every export (params/ meta)
records its own PARAMS_KEY and TOKENIZER_KEY, and a stage's also TEACHER_KEY (the params
fingerprint of the model it was distilled from) and TEACHER_DIR_KEY (that model's directory
name): see `rundir.stage_provenance`, which decides whether a stage is stale.
"""

import hashlib

import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
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


# ----------------------------------------------------------------------------- fingerprints

# keys of an export's meta (checkpoints.export_params) and of a stage's checkpoint meta
PARAMS_KEY = 'params_fingerprint'
TOKENIZER_KEY = 'tokenizer_fingerprint'
TEACHER_KEY = 'teacher_fingerprint'
TEACHER_DIR_KEY = 'teacher_directory'

# two lanes of a murmur3-style mix of (bits, flat index); odd multipliers keep each step a
# bijection of the 32-bit value
_LANES = ((0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D), (0x27D4EB2F, 0x165667B1, 0xD3A2646D))


def _leaf_bits(x) -> jax.Array:
  """The leaf's bit patterns as uint32 (8- and 16-bit types widened, 64-bit ones as two words)."""
  width = jnp.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if width == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2): both halves count
  return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
                                      ).astype(jnp.uint32)


def _flat_index(shape) -> jax.Array:
  """Row-major position of every element (mod 2^32), built from iotas so that XLA computes it
  shard-locally under any sharding."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(
        stride % 2 ** 32)
    stride *= shape[axis]
  return index


def _leaf_sums(x) -> jax.Array:
  """(2,) uint32: per lane, the wrap-around sum over elements of mix(bits, index)."""
  bits = _leaf_bits(x)
  index = _flat_index(bits.shape)
  sums = []
  for c1, c2, c3 in _LANES:
    h = bits * jnp.uint32(c1) + index * jnp.uint32(c2)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(c3)
    h = h ^ (h >> 13)
    sums.append(jnp.sum(h, dtype=jnp.uint32))
  return jnp.stack(sums)


_leaf_sums_jit = jax.jit(lambda leaves: [_leaf_sums(x) for x in leaves])


def params_fingerprint(params) -> str:
  """16 hex digits identifying a params pytree bit for bit: its structure, shapes and dtypes,
  and for every leaf two 32-bit sums over its elements of a bijective mix of (element bits,
  flat index), hashed together with SHA-256.

  Why this construction: the sums are integer additions mod 2^32, which are associative and
  commutative, so the value is the same whatever the reduction order: on one CPU or any mesh,
  sharding or number of hosts (each process gets the replicated sums; no array is gathered to
  one host). A change of any one element, even by one ulp, always changes its leaf's sums (the
  mix is a bijection of the bits, so that element's term changes and no other does); several
  changes cancel in both lanes only by a 1 in 2^64 coincidence. Float rounding never enters:
  the bits are hashed, not the values, so -0.0 and 0.0 differ and a bf16 copy of float32
  params is another fingerprint."""
  leaves, treedef = jax.tree.flatten(params)
  sums = _leaf_sums_jit(leaves)
  digest = hashlib.sha256(str(treedef).encode())
  for leaf, lane_sums in zip(leaves, sums):
    # a reduction's result is normally replicated: read this host's copy, no transfer; were
    # XLA to split the two lanes over devices, gather them from every host instead
    if lane_sums.is_fully_replicated:
      host = np.asarray(lane_sums.addressable_data(0), np.uint32)
    else:
      host = np.asarray(multihost_utils.process_allgather(lane_sums, tiled=True), np.uint32)
    digest.update(f'{tuple(leaf.shape)}{jnp.dtype(leaf.dtype).name}'.encode())
    digest.update(host.astype('<u4').tobytes())
  return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
  """16 hex digits identifying what a tokenizer's ids mean: every (id, token string) of its
  vocabulary (added tokens included) and its special ids. The vocabulary, not the file's bytes
  or the library's serialisation, so a re-saved or re-downloaded copy and another `tokenizers`
  version give the same value; BPE merge rules are not part of it (they change how text is
  cut into tokens, not what a token id stands for)."""
  vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
  digest = hashlib.sha256(json.dumps(
      {'vocab_size': tokenizer.vocab_size, 'mask_id': tokenizer.mask_id,
       'eos_id': tokenizer.eos_id, 'bos_id': tokenizer.bos_id}, sort_keys=True).encode())
  for token, i in sorted(vocab.items(), key=lambda item: item[1]):
    digest.update(f'{i}\t{token}\n'.encode())
  return digest.hexdigest()[:16]
