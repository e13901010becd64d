"""Multi-host start-up: every absl main calls `initialize()` before any other JAX call.

Single-host runs are unaffected. Three ways in:
  - explicit: --coordinator_address/--num_processes/--process_id (GPU nodes, local tests);
  - KFORCING_DISTRIBUTED=1 (set by launch/tpu_pod.sh on every worker): JAX discovers the
    cluster itself - on a Cloud TPU VM slice from the TPU metadata server;
  - a GKE TPU pod (TPU_WORKER_HOSTNAMES lists more than one worker): discovered the same way.
A GCE TPU VM exposes no environment variable that says "pod slice", which is why the launch
script sets one: without it each host would run alone on its local chips.
"""

import os

import jax
from absl import flags

_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Total processes (multi-host).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (multi-host).')

_initialized = False


def _auto_detect_cluster() -> bool:
  if os.environ.get('KFORCING_DISTRIBUTED') == '1':
    return True
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
  elif _auto_detect_cluster():
    jax.distributed.initialize()
  _initialized = True
