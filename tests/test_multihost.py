"""Two processes x 4 CPU devices == one process x 8 devices, through the real CLI.

`python -m kforcing_jax.main.distill` runs a short k=1 stage from an exported random AR teacher,
once as a single 8-device process and once as two processes joined by jax.distributed on
127.0.0.1 (gloo collectives), on the same (4, 2, 1) mesh. The two-process run reads half the
batch rows per process, all-reduces over gloo, restores the teacher export and saves
checkpoints and the student export collectively through orbax, and only process 0 writes
metrics.jsonl and eval.json. Its logged metrics must equal the single-process ones.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import test_tiny
from kforcing_jax import checkpoints, models
from tests.helpers import params as params_lib

pytestmark = pytest.mark.slow  # two processes with jax.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TIMEOUT_S = 420
# the same program on the same mesh; only the all-reduce implementation differs (gloo across
# processes vs in-process), so float32 sums may differ in the last bits: measured agreement
# is ~3e-7 relative, a wrong batch split or a dropped shard changes the loss at 1e-2.
RTOL = 1e-5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def distill_command(workdir: str, data_dir: str) -> list[str]:
  return [sys.executable, '-m', 'kforcing_jax.main.distill', '--config=configs/test_tiny.py',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          f'--config.distill.stages=((1,{STEPS}),)', '--config.mesh_shape=(4,2,1)',
          '--config.distill.log_every=1']


def run_together(runs: list[tuple[list[str], int]], log_dir, timeout: float = TIMEOUT_S):
  """Start every (command, devices) at once, each in its own process group; wait for all.

  On a failure or the timeout every group still running is killed (a peer of a dead process
  would wait in a collective forever) and the stderr tails are part of the assertion."""
  log_dir.mkdir(exist_ok=True)
  procs, logs = [], []
  for i, (command, devices) in enumerate(runs):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', KFORCING_TRACEBACK='1',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    out, err = open(log_dir / f'{i}.out', 'w'), open(log_dir / f'{i}.err', 'w')
    logs.append((out, err))
    procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err,
                                  start_new_session=True))
  deadline = time.monotonic() + timeout
  failed = None
  while failed is None and any(p.poll() is None for p in procs):
    if time.monotonic() > deadline:
      failed = f'timed out after {timeout:.0f}s'
    elif any(p.poll() not in (None, 0) for p in procs):
      failed = 'a process failed'
    else:
      time.sleep(0.5)
  if failed is None and any(p.returncode for p in procs):
    failed = 'a process failed'
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  for out, err in logs:
    out.close()
    err.close()
  if failed:
    tails = '\n'.join(f'--- process {i} (exit {p.returncode}) stderr tail:\n'
                      + (log_dir / f'{i}.err').read_text()[-3000:] for i, p in enumerate(procs))
    pytest.fail(f'{failed}\n{tails}')


def read_metrics(path) -> list[dict]:
  with open(path) as f:
    return [{k: v for k, v in json.loads(line).items() if k != 'time'} for line in f]


@pytest.fixture(scope='module')
def runs(tiny_data_dir, tmp_path_factory):
  """workdirs of the single-process and the two-process run, each with the same teacher."""
  root = tmp_path_factory.mktemp('multihost')
  config = test_tiny.get_config()
  teacher = models.teacher(config)
  checkpoints.export_params(str(root / 'teacher_params'),
                            params_lib.random_params(teacher, 0, head_scale=0.1), {'kind': 'ar'})
  workdirs = {}
  for name in ('single', 'two_processes'):
    workdirs[name] = root / name
    shutil.copytree(root / 'teacher_params', workdirs[name] / 'teacher' / 'params')
  run_together([(distill_command(str(workdirs['single']), tiny_data_dir), 8)],
               root / 'single_logs')
  port = free_port()
  multi = [(distill_command(str(workdirs['two_processes']), tiny_data_dir) + [
      f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'], 4)
      for i in range(2)]
  run_together(multi, root / 'two_processes_logs')
  return workdirs


def test_two_processes_log_the_same_losses_as_one(runs):
  single = read_metrics(runs['single'] / 'student_k1' / 'metrics.jsonl')
  multi = read_metrics(runs['two_processes'] / 'student_k1' / 'metrics.jsonl')
  # one row per step plus the final validation row, written once (by process 0 only)
  assert [row['step'] for row in multi] == [row['step'] for row in single] == [
      *range(1, STEPS + 1), STEPS]
  for a, b in zip(single, multi):
    assert a.keys() == b.keys()
    np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=RTOL)
  losses = [row['loss'] for row in single if 'loss' in row]
  assert len(set(losses)) == STEPS  # the steps really trained on different batches


def test_two_processes_write_the_same_outputs(runs):
  for name in ('single', 'two_processes'):
    stage = runs[name] / 'student_k1'
    assert checkpoints.has_params(str(stage / 'params'))
    assert (stage / 'checkpoints' / str(STEPS)).is_dir()
  with open(runs['single'] / 'student_k1' / 'eval.json') as f:
    single = json.load(f)
  with open(runs['two_processes'] / 'student_k1' / 'eval.json') as f:
    multi = json.load(f)
  for key in ('acc_total', 'baseline_acc_total', 'validation_windows'):
    np.testing.assert_allclose(multi[key], single[key], rtol=RTOL)
