"""Run a tests.helpers module in a subprocess with 8 fake CPU devices; return its JSON.

The device count is fixed when JAX starts, so multi-device checks run their helper module in
a fresh interpreter (XLA_FLAGS=--xla_force_host_platform_device_count=8) that prints one JSON
line last.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_json(module: str, *args: str, timeout: int = 600):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
