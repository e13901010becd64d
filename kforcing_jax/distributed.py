"""Multi-host start-up: every absl main calls `initialize()` before any other JAX call.

Single-host runs are unaffected. On a Cloud TPU pod slice (TPU_WORKER_HOSTNAMES lists more
than one worker) JAX discovers the cluster itself; elsewhere pass the coordinator explicitly
with --coordinator_address/--num_processes/--process_id (GPU nodes, local tests).
"""

import os

import jax
from absl import flags

_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Total processes (multi-host).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (multi-host).')

_initialized = False


def _on_tpu_pod() -> bool:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1


def initialize() -> None:
  global _initialized
  if _initialized:
    return
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _on_tpu_pod():
    jax.distributed.initialize()
  _initialized = True
