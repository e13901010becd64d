"""config.decode.mode through the real mains (each in its own process: two absl mains must not
define their flags in one): generate decodes losslessly when the config says so and --mode
overrides it; the config check refuses a lossless prompt too short for the widest stage."""

import os
import subprocess
import sys

import pytest

from kforcing_jax import checkpoints, models, rundir
from tests.helpers import params as params_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args):
  out = subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True,
                       check=False, cwd=ROOT, timeout=300)
  return out.returncode, out.stdout + out.stderr


def test_lossless_mode_needs_prompts_of_k_max_plus_one_tokens(tmp_path):
  rc, output = run_main('kforcing_jax.main.generate', '--config=configs/test_tiny.py',
                        f'--workdir={tmp_path / "run"}', '--config.decode.mode=lossless',
                        '--config.decode.prefix_len=4')
  assert rc == 2 and 'error: config.decode.prefix_len=4' in output, output[-2000:]
  assert 'k+1 = 5 for the widest stage k=4 in decode.mode=lossless' in output
  rc, output = run_main('kforcing_jax.main.evaluate', '--config=configs/test_tiny.py',
                        f'--workdir={tmp_path / "run"}', '--mode=exact')
  assert rc == 2 and "value should be one of <lossy|lossless>" in output, output[-2000:]


@pytest.mark.slow
def test_generate_mode_defaults_from_the_config(tmp_path, tiny_data_config):
  """A random teacher and k=2 student: decode.mode=lossless makes --student=2 draft for the
  teacher (the log reports tokens per teacher pass); --mode=lossy overrides it back."""
  config = tiny_data_config
  workdir = str(tmp_path / 'run')
  checkpoints.export_params(rundir.params_dir(rundir.teacher_dir(workdir)),
                            params_lib.random_params(models.teacher(config), 0), {'kind': 'ar'})
  checkpoints.export_params(rundir.params_dir(rundir.stage_dir(workdir, 2)),
                            params_lib.random_params(models.student(config, 2), 1),
                            {'kind': 'pflm', 'k': 2})
  common = ['kforcing_jax.main.generate', '--config=configs/test_tiny.py',
            f'--config.data.data_dir={config.data.data_dir}', f'--workdir={workdir}',
            '--student=2', '--prompt=To be, or not to be', '--config.decode.mode=lossless']
  rc, output = run_main(*common)
  assert rc == 0, output[-2000:]
  assert 'lossless, ar verifying pflm_k2' in output and 'tokens per teacher pass' in output
  rc, output = run_main(*common, '--mode=lossy')
  assert rc == 0, output[-2000:]
  assert '--- pflm_k2 | prompt' in output and 'teacher pass' not in output
