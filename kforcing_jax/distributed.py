"""Multi-host start-up and the few things every host must agree on.

Every absl main calls `initialize(...)` (through `cli.main` / `cli.start`, which own the flags)
before any other JAX call. Single-host runs are
unaffected. Three ways in:
  - explicit: --coordinator_address/--num_processes/--process_id (GPU nodes, local tests);
  - KFORCING_DISTRIBUTED=1 (launch/tpu_pod.sh sets it on every worker): JAX discovers the
    cluster itself - on a Cloud TPU VM slice from the TPU metadata server. A GCE TPU VM has no
    environment variable that says "pod slice", hence the switch: without it each host would
    run alone on its local chips;
  - a GKE TPU pod (TPU_WORKER_HOSTNAMES lists more than one worker): discovered the same way.

After that, the multi-host contract of this code base:
  * each process reads only the batch rows its own devices hold (`local_batch_rows`) and
    global arrays are assembled with jax.make_array_from_process_local_data
    (sharding.global_batch);
  * every process runs every jitted step, checkpoint save/restore and params export (orbax
    coordinates them); only process 0 writes metrics, reports, eval.json and samples;
  * shared preparation (dataset build, tokenizer training) runs on process 0 first
    (`main_process_first`), so hosts sharing a data_dir never build it concurrently.
"""

import math
import os
from typing import Callable, TypeVar

import jax
from jax.experimental import multihost_utils

from kforcing_jax import sharding

_initialized = False
T = TypeVar('T')


def _auto_detect_cluster() -> bool:
  if os.environ.get('KFORCING_DISTRIBUTED') == '1':
    return True
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Join the cluster (explicit coordinator, or auto-detected); a no-op on one host and on
  the second call."""
  global _initialized
  if _initialized:
    return
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError('--coordinator_address needs --num_processes and --process_id too '
                       '(the same --num_processes everywhere, --process_id 0..N-1 per process).')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} is outside [0, '
                       f'--num_processes={num_processes}).')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _auto_detect_cluster():
    jax.distributed.initialize()
  _initialized = True


def main_process_first(name: str, fn: Callable[[], T]) -> T:
  """Run `fn` on process 0, wait for it everywhere, then on the other processes.

  For idempotent preparation (`data.prepare`): process 0 builds, the others find it built on a
  shared filesystem (or build their own copy on a host-local one) instead of racing it."""
  if jax.process_count() == 1:
    return fn()
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f'{name}: process 0 done')
  return result if jax.process_index() == 0 else fn()


def local_batch_rows(mesh, rules, batch_size: int) -> tuple[int, int]:
  """(block, blocks): this process's devices hold rows [block * n, (block + 1) * n),
  n = batch_size / blocks, of a batch laid out by sharding.batch_sharding.

  Usually block = process index and blocks = process count, but not always: with the batch
  axes inside one host (e.g. tensor parallelism across hosts) every process holds every row
  (0, 1). Data sources read exactly this block, so make_array_from_process_local_data gets the
  rows it expects."""
  layout = sharding.batch_sharding(mesh, 1, rules)
  axes = layout.spec[0] or ()
  axes = (axes,) if isinstance(axes, str) else axes
  shards = math.prod(mesh.shape[a] for a in axes)
  if batch_size % shards:
    raise ValueError(f'batch size {batch_size} does not divide over the {shards} batch shards '
                     f'(mesh axes {axes} of {dict(mesh.shape)}); change the batch size or '
                     'config.mesh_shape.')
  held = set()
  for index in layout.addressable_devices_indices_map((batch_size,)).values():
    rows = index[0]
    held.add((rows.start or 0, batch_size if rows.stop is None else rows.stop))
  start, stop = min(r[0] for r in held), max(r[1] for r in held)
  size = stop - start
  if sum(b - a for a, b in held) != size or batch_size % size or start % size:
    raise ValueError(f'the devices of process {jax.process_index()} hold batch rows '
                     f'{sorted(held)} of {batch_size}: not one contiguous block. Order the mesh '
                     'devices by process along the batch axes (sharding.make_mesh does).')
  return start // size, batch_size // size
