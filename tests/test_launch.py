"""launch/*.sh: the command a user types reaches every worker's python intact.

A fake `gcloud` on PATH stands in for Cloud TPU: `tpu-vm ssh --command=C` runs C with bash in
a fake worker home (as sshd would), and a fake `.venv/bin/python` there records its argv and
environment. So these tests check the real quoting and wiring, not strings that look right.
"""

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_GCLOUD = r'''#!/usr/bin/env bash
printf '%s\n' "$@" > "$FAKE_LOG/gcloud_args.$$"
for arg in "$@"; do
  case "$arg" in --command=*) cd "$FAKE_HOME" && bash -c "${arg#--command=}" ;; esac
done
'''

FAKE_PYTHON = r'''#!/usr/bin/env python3
import json, os, sys
with open(os.environ['FAKE_LOG'] + '/python_call.json', 'w') as f:
  json.dump({'argv': sys.argv[1:], 'distributed': os.environ.get('KFORCING_DISTRIBUTED'),
             'cwd': os.getcwd()}, f)
'''


def _executable(path: Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_cloud(tmp_path):
  home, log, bin_dir = tmp_path / 'worker', tmp_path / 'log', tmp_path / 'bin'
  log.mkdir()
  _executable(bin_dir / 'gcloud', FAKE_GCLOUD)
  _executable(home / 'kforcing_jax' / '.venv' / 'bin' / 'python', FAKE_PYTHON)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_HOME=str(home),
             FAKE_LOG=str(log), TPU_NAME='kf-test', ZONE='us-west4-a')
  env.pop('DRY_RUN', None)
  return env, home, log


def _gcloud_calls(log: Path) -> list[list[str]]:
  return [p.read_text().splitlines() for p in sorted(log.glob('gcloud_args.*'))]


def _wait_for(path: Path, seconds: float = 20.0) -> dict:
  deadline = time.time() + seconds
  while not path.exists() and time.time() < deadline:
    time.sleep(0.1)
  time.sleep(0.1)  # let the writer close the file
  return json.loads(path.read_text())


USER_ARGS = ['-m', 'kforcing_jax.main.train', '--config=configs/lm1b_ar.py',
             '--workdir=gs://bucket/runs/a b', "--config.train.steps=10; echo 'pwned'"]


def test_tpu_run_reaches_all_workers_with_argv_intact(fake_cloud):
  env, home, log = fake_cloud
  proc = subprocess.run(['bash', str(ROOT / 'launch/tpu_pod.sh'), 'run', 'python', *USER_ARGS],
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  (call,) = _gcloud_calls(log)
  assert call[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'kf-test']
  assert '--worker=all' in call and '--zone=us-west4-a' in call
  seen = json.loads((log / 'python_call.json').read_text())
  assert seen['argv'] == USER_ARGS
  assert seen['distributed'] == '1'
  assert seen['cwd'] == str(home / 'kforcing_jax')


def test_tpu_start_detaches_and_logs(fake_cloud):
  env, _, log = fake_cloud
  proc = subprocess.run(['bash', str(ROOT / 'launch/tpu_pod.sh'), 'start', 'python', *USER_ARGS],
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  seen = _wait_for(log / 'python_call.json')
  assert seen['argv'] == USER_ARGS and seen['distributed'] == '1'


def test_tpu_script_names_missing_settings(fake_cloud):
  env, _, log = fake_cloud
  del env['ZONE']
  proc = subprocess.run(['bash', str(ROOT / 'launch/tpu_pod.sh'), 'create'], env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and 'set ZONE' in proc.stderr
  assert not _gcloud_calls(log)


def test_tpu_create_passes_accelerator_and_spot(fake_cloud):
  env, _, log = fake_cloud
  env.update(ACCELERATOR='v5p-8', RUNTIME_VERSION='v2-alpha-tpuv5', SPOT='1', PROJECT='p')
  proc = subprocess.run(['bash', str(ROOT / 'launch/tpu_pod.sh'), 'create'], env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  (call,) = _gcloud_calls(log)
  assert call[:5] == ['compute', 'tpus', 'tpu-vm', 'create', 'kf-test']
  for flag in ('--accelerator-type=v5p-8', '--version=v2-alpha-tpuv5', '--spot', '--project=p'):
    assert flag in call


def test_gpu_multinode_appends_distributed_flags(tmp_path):
  env = dict(os.environ, DRY_RUN='1', NUM_NODES='2', NODE_RANK='1', COORDINATOR='node0:12355')
  proc = subprocess.run(['bash', str(ROOT / 'launch/gpu_node.sh'), 'run', 'python', '-m',
                         'kforcing_jax.main.train', '--config=configs/owt_ar.py'],
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ['.venv/bin/python', '-m', 'kforcing_jax.main.train',
                                 '--config=configs/owt_ar.py', '--coordinator_address=node0:12355',
                                 '--num_processes=2', '--process_id=1']
  del env['NODE_RANK']
  proc = subprocess.run(['bash', str(ROOT / 'launch/gpu_node.sh'), 'run', 'python', '-m', 'x'],
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and 'NODE_RANK' in proc.stderr


@pytest.fixture
def fresh_distributed(monkeypatch):
  """kforcing_jax.distributed with its once-only guard reset and jax.distributed.initialize
  recorded instead of called; flags parsed with no arguments."""
  from absl import flags
  from kforcing_jax import distributed
  calls = []
  monkeypatch.setattr(distributed, '_initialized', False)
  monkeypatch.setattr(distributed.jax.distributed, 'initialize',
                      lambda **kwargs: calls.append(kwargs))
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  monkeypatch.delenv('KFORCING_DISTRIBUTED', raising=False)
  monkeypatch.delenv('TPU_WORKER_HOSTNAMES', raising=False)
  return distributed, calls


def test_launch_switch_turns_on_cluster_auto_detection(fresh_distributed, monkeypatch):
  distributed, calls = fresh_distributed
  distributed.initialize()
  assert calls == []  # a plain single-host run never starts the distributed client
  monkeypatch.setattr(distributed, '_initialized', False)
  monkeypatch.setenv('KFORCING_DISTRIBUTED', '1')  # what tpu_pod.sh run/start set remotely
  distributed.initialize()
  assert calls == [{}]  # no arguments: JAX discovers the slice itself
