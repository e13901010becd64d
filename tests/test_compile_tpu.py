"""launch/compile_tpu.py's compile-and-report path on the CPU backend (no libtpu needed).

One subprocess run of the real main on configs/test_tiny.py (two stages, two batch sizes),
with the per-device memory set below every program's peak: it must write the full report and
exit with status 1. Nothing here is compiled for a TPU.
"""

import json
import os
import subprocess
import sys

import pytest

from configs import test_tiny
from kforcing_jax import models
from launch import compile_tpu

pytestmark = pytest.mark.slow  # compiles every program of a config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_HBM_GIB = 1e-6  # ~1 KiB: below the peak of any program


@pytest.fixture(scope='module')
def failed_fit_run(tmp_path_factory):
  output = tmp_path_factory.mktemp('compile') / 'report.json'
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'launch.compile_tpu', '--config=configs/test_tiny.py',
       '--topology=cpu', f'--hbm_gib={TINY_HBM_GIB}', f'--output={output}',
       '--config.distill.stages=((1, 1), (2, 1))', '--config.eval.batch_sizes=(1, 2)'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  with open(output) as f:
    return proc, json.load(f)


def test_memory_above_hbm_fails_with_status_1(failed_fit_run):
  proc, report = failed_fit_run
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'do not fit' in proc.stdout
  assert not report['all_fit'] and not any(p['fits'] for p in report['programs'])
  assert report['compiled_for'] == 'CPU'  # never reported as TPU-proven


def test_report_has_every_program_with_memory_and_flops(failed_fit_run):
  _, report = failed_fit_run
  names = [p['name'] for p in report['programs']]
  assert names == ['teacher_step', 'distill_k1_step', 'distill_k2_step', 'decode_ar',
                   'decode_pflm_k1', 'decode_pflm_k2']
  # the AR teacher decodes one token per step: kind 'ar', k = 1 (no k = 0)
  assert [(p['kind'], p['k']) for p in report['programs'][3:]] == [('ar', 1), ('pflm', 1),
                                                                  ('pflm', 2)]
  for p in report['programs']:
    m = p['memory']
    assert m['peak'] == m['argument'] + m['output'] - m['alias'] + m['temp'] + m['generated_code']
    assert m['peak'] > TINY_HBM_GIB * compile_tpu.GIB
    assert p['flops_per_device'] > 0
  # the teacher step: forward + backward ~ 6 FLOPs per weight (the embedding gather is free)
  # per token, plus attention and the optimizer
  config = test_tiny.get_config()
  cfg = models.teacher(config).cfg
  weights = models.teacher(config).num_params() - cfg.vocab_size * cfg.d_model
  six_nd = 6 * weights * config.train.batch_size * config.data.seq_len
  assert 1.0 <= report['programs'][0]['flops_per_device'] / six_nd < 2.0


def test_fit_check_passes_exactly_at_the_peak(failed_fit_run):
  _, report = failed_fit_run
  programs = report['programs']
  largest = max(p['memory']['peak'] for p in programs)
  assert compile_tpu.fit_check(programs, largest)
  assert not compile_tpu.fit_check(programs, largest - 1)
  assert [p['fits'] for p in programs] == [p['memory']['peak'] < largest for p in programs]


def test_speed_model_per_decoder_and_batch(failed_fit_run):
  _, report = failed_fit_run
  model = report['decode_speed_model']
  assert 'MODEL' in model['what']
  assert set(model['per_decoder']) == {'ar', 'pflm_k1', 'pflm_k2'}
  for name, rows in model['per_decoder'].items():
    assert [r['batch'] for r in rows] == [1, 2]
    for r in rows:
      step_s = max(r['step_flops'] / model['peak_flops_per_s'],
                   r['step_bytes'] / model['bytes_per_s'])
      assert r['step_seconds'] == pytest.approx(step_s)
      new_tokens = model['gen_len'] - model['prefix_len']
      assert r['tokens_per_s'] == pytest.approx(r['batch'] * new_tokens /
                                                (r['decode_steps'] * step_s))
  # a k = 2 step emits 2 tokens: it needs half the steps of k = 1
  assert model['per_decoder']['pflm_k2'][0]['decode_steps'] == pytest.approx(
      model['per_decoder']['pflm_k1'][0]['decode_steps'] / 2, abs=1)
  assert set(model['predicted_speedup_vs_ar']) == {'pflm_k1', 'pflm_k2'}
