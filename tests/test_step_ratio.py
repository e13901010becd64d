"""The step-time ratio (one k-token step over one AR step) in results.json and REPORT.md."""

import pytest

from kforcing_jax import report, roofline, timing
from tests.test_evaluate import valid_results


def _affine(flops_const, flops_row, bytes_const, bytes_row):
  return {'flops': {'const': flops_const, 'per_row': flops_row},
          'bytes': {'const': bytes_const, 'per_row': bytes_row}}


def _rows(name, seconds, steps):
  return [{'batch': b, 'tokens_per_s': 122 * b / s, 'seconds': s, 'decode_steps': steps}
          for b, s in zip((1, 16), seconds)]


def _analysis():
  ar = {'name': 'ar', 'steps': 122, 'analytic': _affine(0.0, 1e6, 4e6, 1e4)}
  k4 = {'name': 'pflm_k4', 'steps': 31, 'analytic': _affine(0.0, 8e6, 4e6, 5e4)}
  throughput = {'ar': _rows('ar', (1.22, 3.66), 122), 'pflm_k4': _rows('k4', (0.62, 2.48), 31)}
  measured = {name: {r['batch']: r for r in rows} for name, rows in throughput.items()}
  return [roofline._compare(ar, e, measured, (1, 16), 1e9, 1e8) for e in (ar, k4)]


def test_measured_ratio_is_the_per_step_time_over_the_ar_per_step_time():
  ar, k4 = _analysis()
  assert [r['measured_step_ratio_vs_ar'] for r in ar['per_batch']] == [1.0, 1.0]
  # 0.62 s / 31 steps = 20 ms against 1.22 s / 122 = 10 ms; 80 ms against 30 ms
  assert [r['measured_step_ratio_vs_ar'] for r in k4['per_batch']] == pytest.approx(
      [2.0, 80 / 30])
  # the same timings give the speed-up: AR steps / k steps / step ratio
  for r, ar_row, k_row in zip(k4['per_batch'], _rows('ar', (1.22, 3.66), 122),
                              _rows('k4', (0.62, 2.48), 31)):
    assert k_row['tokens_per_s'] / ar_row['tokens_per_s'] == pytest.approx(
        122 / 31 / r['measured_step_ratio_vs_ar'])


def test_predicted_ratio_is_the_roofline_step_time_ratio():
  _, k4 = _analysis()
  # batch 1: both memory-bound, 4.05e6 / 4.01e6 bytes; batch 16: k4 compute-bound 1.28e8
  # FLOPs (0.128 s) against AR's 4.16e6 bytes (0.0416 s)
  assert [r['predicted_step_ratio_vs_ar'] for r in k4['per_batch']] == pytest.approx(
      [4.05e6 / 4.01e6, 0.128 / 0.0416])
  for r in k4['per_batch']:
    assert r['predicted_speedup_vs_ar'] == pytest.approx(122 / 31 / r['predicted_step_ratio_vs_ar'])


def test_ratio_table_shows_measured_beside_predicted():
  obj = valid_results()
  obj['roofline'] = {'models': _analysis()}
  lines = report.step_ratio_markdown(report.Results.from_json(obj))
  assert lines[-2:] == ['| 1 | 2.00 / 1.01 |', '| 16 | 2.67 / 3.08 |']
  obj['roofline'] = {'models': [{'name': 'ar', 'per_batch': [{'batch': 1}]},
                                {'name': 'pflm_k4', 'per_batch': [{'batch': 1}]}]}
  assert report.step_ratio_markdown(report.Results.from_json(obj)) == []  # older results


def test_speed_table_rows_derive_ratio_and_speed_up_from_the_stored_timings():
  ar = [dict(r, forwards_per_token=1.0) for r in _rows('ar', (1.22, 3.66), 122)]
  k4 = [dict(r, forwards_per_token=31 / 122) for r in _rows('k4', (0.62, 2.48), 31)]
  rows = timing.speed_table_rows({'throughput': {'ar': ar, 'pflm_k4': k4}}, 'pflm_k4')
  assert [r['step_time_ratio_vs_ar'] for r in rows] == pytest.approx([2.0, 80 / 30])
  assert [r['speedup_vs_ar'] for r in rows] == pytest.approx([1.22 / 0.62, 3.66 / 2.48])
  assert rows[0]['k_forwards_per_token'] == pytest.approx(31 / 122)
