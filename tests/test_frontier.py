"""kforcing_jax/frontier.py: the settings, the lossless passes' costs against roofline's step
costs, the predicted speed-up formula, the measured speed rows, and the frontier's table and
plot on constructed numbers (no timing, no decoding)."""

import math

import pytest

from configs import test_tiny
from kforcing_jax import frontier, models, report, roofline, speed_model
from kforcing_jax.frontier import Setting


def _models(k: int = 4, feedback: bool = False):
  config = test_tiny.get_config()
  config.model.token_feedback = feedback
  return models.teacher(config), models.student(config, k)


def test_settings_names_and_order():
  chosen = frontier.settings([1, 2, 4], {1: 0.0, 2: 0.2, 4: 0.5}, [0.25, 1.0], [1.0, 2.0], [1.5])
  assert [s.name for s in chosen] == [
      'ar', 'lossy_k1_pen0', 'lossy_k2_pen0', 'lossy_k2_pen0.2', 'lossy_k4_pen0',
      'lossy_k4_pen0.25', 'lossy_k4_pen0.5', 'lossy_k4_pen1', 'adaptive_k4_m1', 'adaptive_k4_m2',
      'lossless_k1', 'lossless_k2', 'lossless_k4', 'adaptive_lossless_k4_m1.5']
  assert chosen[6].label == 'k=4 lossy, lambda 0.5'
  assert chosen[-1].label == 'k<=4 adaptive lossless, margin 1.5'
  assert Setting('lossless', 3, 4).name == 'lossless_k3_s4'
  with pytest.raises(ValueError, match='margin_threshold'):
    Setting('lossless', 4, 4, margin_threshold=1.0)
  with pytest.raises(ValueError, match='margin_threshold'):
    Setting('adaptive', 4, 4)
  with pytest.raises(ValueError, match='unknown setting family'):
    Setting('speculative', 4, 4)


@pytest.mark.parametrize('k, feedback', [(1, False), (2, False), (4, False), (2, True),
                                         (4, True)])
def test_pass_cost_reproduces_roofline_step_costs(k, feedback):
  """Two independent counts agree: pass_cost with a step's numbers is roofline's count (a
  student with token feedback reads its k slots through the block)."""
  teacher, student = _models(k, feedback)
  for batch in (1, 7):
    assert frontier.pass_cost(teacher, batch, slots=1, tokens=1, logit_rows=1, hints=0,
                              cache_len=40, sampled_rows=1) == \
        roofline.analytic_step_cost(teacher, 1, batch, 40)
    assert frontier.pass_cost(student, batch, slots=2 * k, tokens=k, logit_rows=k, hints=k,
                              cache_len=40 + k, penalty_rows=k, kv_only_rows=k,
                              feedback_slots=k if feedback else 0) == \
        roofline.analytic_step_cost(student, k, batch, 40)


def test_verify_pass_reads_weights_once():
  """k+1 positions in one pass: the weight bytes are an AR step's, only per-row terms grow."""
  teacher, _ = _models()
  one, many = (frontier.verify_cost(teacher, 4, b, 40) for b in (1, 2))
  ar_one, ar_many = (roofline.analytic_step_cost(teacher, 1, b, 40) for b in (1, 2))
  weights = 2 * one['bytes'] - many['bytes']  # the batch-independent part
  assert weights == 2 * ar_one['bytes'] - ar_many['bytes']
  assert many['flops'] == 2 * one['flops'] > 5 * 2 * ar_one['flops']  # 5 positions > 5 AR rows
  # (attention reads the longer buffer of the ragged loop)


def test_predicted_speedup_formula_on_constructed_numbers():
  # 120 new tokens in 96 iterations (1.25 tokens each), an iteration = 2 AR steps
  assert frontier.predicted_speedup(120, 96, 1e-3, 2e-3) == pytest.approx(0.625)
  # k = 4 lossy: 30 steps, each 1.2 AR steps -> 4 / 1.2
  assert frontier.predicted_speedup(120, 30, 1.0, 1.2) == pytest.approx(4 / 1.2)


def test_predict_composes_the_passes_with_the_speed_model():
  teacher, student = _models()
  device = {'overhead_s': 1e-6, 's_per_matmul_flop': 1e-12, 's_per_attention_flop': 3e-12,
            'weight_time_factor': 2.0, 's_per_activation_byte': 1e-10, 'weight_bandwidth': 1e10}
  step = lambda cost: speed_model.predict(device, cost)  # noqa: E731
  prefix, gen, batch = 6, 46, 3
  t_ar = step(roofline.analytic_step_cost(teacher, 1, batch, gen))
  lossless = frontier.predict(Setting('lossless', 4, 4), teacher, student, batch, prefix, gen,
                              16, device)
  t_iter = step(frontier.draft_cost(student, 4, batch, gen)) + step(
      frontier.verify_cost(teacher, 4, batch, gen))
  assert lossless['iterations'] == 16
  assert lossless['iteration_s'] == pytest.approx(t_iter)
  assert lossless['speedup_vs_ar'] == pytest.approx(40 * t_ar / (16 * t_iter))
  lossy = frontier.predict(Setting('lossy', 4, 4, 0.5), teacher, student, batch, prefix, gen,
                           None, device)
  t_k = step(roofline.analytic_step_cost(student, 4, batch, gen))
  assert lossy['iterations'] == 10  # ceil(40 / 4), measured iterations not needed
  assert lossy['speedup_vs_ar'] == pytest.approx(40 * t_ar / (10 * t_k))
  adaptive = frontier.predict(Setting('adaptive', 4, 4, margin_threshold=1.0), teacher, student,
                              batch, prefix, gen, 20, device)
  assert adaptive['speedup_vs_ar'] == pytest.approx(
      40 * t_ar / (20 * step(frontier.draft_cost(student, 4, batch, gen))))
  ar = frontier.predict(Setting('ar', 1), teacher, None, batch, prefix, gen, None, device)
  assert ar['speedup_vs_ar'] == pytest.approx(1.0)
  with pytest.raises(ValueError, match='measured'):
    frontier.predict(Setting('lossless', 4, 4), teacher, student, batch, prefix, gen, None,
                     device)


def test_device_models_apply_the_fitted_fractions():
  fitted = {'paper_predictions_from': 'split_by_batch',
            'split_by_batch': {'efficiencies': {'matmul_fraction_of_peak': 0.5,
                                                'attention_fraction_of_peak': 0.1,
                                                'weights_fraction_of_bandwidth': 0.8,
                                                'activations_fraction_of_bandwidth': 0.25,
                                                'overhead_s': 3e-6}},
            'devices': {'chip': {'peak_flops_per_s': 1e12, 'bandwidth_bytes_per_s': 1e9,
                                 'hbm_bytes': 1}}}
  model = frontier.device_models(fitted, ['chip'])['chip']
  assert model == {'overhead_s': 0.0, 's_per_matmul_flop': pytest.approx(2e-12),
                   's_per_attention_flop': pytest.approx(1e-11),
                   'weight_time_factor': pytest.approx(1.25),
                   's_per_activation_byte': pytest.approx(4e-9), 'weight_bandwidth': 1e9}
  with pytest.raises(ValueError, match='knows'):
    frontier.device_models(fitted, ['tpu_v9'])


def _row(batch, seconds, steps):
  return {'batch': batch, 'tokens_per_s': batch * 120 / seconds, 'seconds': seconds,
          'seconds_all': [seconds], 'decode_steps': steps}


def test_speed_rows_iteration_cost_and_break_even():
  ar = [_row(1, 1.2, 120), _row(16, 2.4, 120)]
  lossless = frontier.speed_rows(Setting('lossless', 4, 4), [_row(1, 4.8, 30), _row(16, 6.0, 30)],
                                 ar, {1: 96, 16: 100}, {1: 1.25, 16: 1.3}, 120)
  assert [r['iterations'] for r in lossless] == [96, 100]  # measured, not ceil(120 / 4)
  assert lossless[0]['tokens_per_iteration'] == pytest.approx(1.25)
  assert lossless[0]['iteration_in_ar_steps'] == pytest.approx((4.8 / 96) / (1.2 / 120))  # 5.0
  assert lossless[0]['speedup_vs_ar'] == pytest.approx(0.25)
  assert lossless[0]['break_even_acceptance'] == pytest.approx(1.0, abs=1e-9)  # 5 = k + 1
  assert lossless[1]['iteration_in_ar_steps'] == pytest.approx(3.0)
  alpha = lossless[1]['break_even_acceptance']
  assert sum(alpha ** i for i in range(5)) == pytest.approx(3.0)
  assert lossless[1]['mean_tokens_per_iteration'] == 1.3
  lossy = frontier.speed_rows(Setting('lossy', 4, 4, 0.5), [_row(1, 0.6, 30)], ar, {}, {}, 120)
  assert lossy[0]['iterations'] == 30
  assert lossy[0]['iteration_in_ar_steps'] == pytest.approx(2.0)
  assert lossy[0]['speedup_vs_ar'] == pytest.approx(2.0)
  assert lossy[0]['break_even_acceptance'] is None  # no acceptance without a verifier


def _result():
  def rec(setting, ppl, speedups, tokens=None):
    quality = {'gen_ppl_teacher': ppl, 'gen_ppl_evaluator': None, 'entropy': 4.0,
               'distinct_2': 0.8, 'distinct_4': 0.99, 'gen_ppl_evaluator_ci': None,
               'gen_ppl_teacher_ci': report.Interval(0.9 * ppl, 1.1 * ppl),
               'entropy_ci': report.Interval(3.9, 4.1), 'distinct_2_ci': report.Interval(.7, .9)}
    speed = [{'batch': b, 'speedup_vs_ar': x, 'iterations': 100, 'tokens_per_iteration': 1.2,
              'mean_tokens_per_iteration': tokens, 'iteration_in_ar_steps': 6.0,
              'break_even_acceptance': None} for b, x in zip((1, 16), speedups)]
    predicted = {'tpu_v5e': {str(b): {'speedup_vs_ar': 2 * x} for b, x in zip((1, 16),
                                                                                speedups)}}
    return frontier.record(setting, quality, speed, predicted, 16, 0, 100.0)

  settings = [rec(Setting('ar', 1), 100.0, (1.0, 1.0)),
              rec(Setting('lossy', 4, 4, 0.5), 150.0, (2.0, 0.8)),
              rec(Setting('lossless', 4, 4), 100.0, (0.3, 0.2), 1.25),
              # timed at batch 1 only
              rec(Setting('adaptive', 4, 4, margin_threshold=1.0), 120.0, (1.5,), 2.5)]
  source = {'speed_model': 'fit.json', 'fit': 'split_by_batch',
            'efficiencies': {'matmul_fraction_of_peak': 0.6, 'attention_fraction_of_peak': None,
                             'weights_fraction_of_bandwidth': 1.4,
                             'activations_fraction_of_bandwidth': 0.3, 'overhead_s': 0.0},
            'check': {'held_out_worst_speedup_error': 0.31, 'target_error': 0.25,
                      'passes_check': False},
            'devices': {'tpu_v5e': {'peak_flops_per_s': 197e12, 'bandwidth_bytes_per_s': 819e9}}}
  return {'device': 'cpu', 'jax_version': 'x', 'workdir': 'w', 'config': 'c', 'num_prompts': 16,
          'prefix_len': 6, 'gen_len': 128, 'quality_rows': 16, 'batch_sizes': [1, 16],
          'repeats': {'1': 3, '16': 1}, 'prediction': source, 'settings': settings}


def test_frontier_points_front_table_and_plot(tmp_path):
  result = _result()
  points = frontier.points(result)
  assert [p.distance for p in points] == pytest.approx([0, math.log(1.5), 0, math.log(1.2)])
  # B=1: lossless (0.3x, same samples as AR) is dominated by AR; AR, adaptive, lossy are not
  # B=16 (adaptive not timed): AR is the fastest and the closest: it alone
  assert frontier.pareto_fronts(result) == {1: ['ar', 'adaptive_k4_m1', 'lossy_k4_pen0.5'],
                                            16: ['ar']}
  text = frontier.markdown(result)
  # the prediction note names the fitted fractions and the model's own held-out check
  assert '0.60 / - of peak FLOP/s in weight matmuls / attention' in text
  assert 'worst speed-up error is 31%: it fails its 25% check' in text
  assert '| k=4 lossless | 100.0 [90.0, 110.0] | - | 4.000 [3.900, 4.100] | 0.800 [0.700, ' \
         '0.900] | 0/16 | 0.000 | 1.25 | 0.30x | 0.20x |' in text
  assert '| k=4 lossy, lambda 0.5 | 150.0 [135.0, 165.0] |' in text
  assert '| 2.00x * | 0.80x |' in text
  assert '## PREDICTED speed-up on TPU' in text
  assert '| 0.182 | 2.50 | 1.50x * | - |' in text
  assert '| k<=4 adaptive lossy, margin 1 | 3.00x | - | 1.50x / - |' in text
  assert '| k=4 lossless | 16 | 100 | 1.20 | 1.25 | 6.00 | - | 0.20x |' in text
  frontier.plot(tmp_path / 'frontier.png', result)
  with open(tmp_path / 'frontier.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_repredict_redoes_predictions_from_the_measured_iterations_only():
  """A refitted speed model redoes every prediction: at the batches a setting was timed at, with
  the loop iterations it measured (ragged) or ceil(n / k) (lossy); measured rows untouched."""
  teacher, student = _models()
  result = _result()
  device = {'overhead_s': 0.0, 's_per_matmul_flop': 1e-12, 's_per_attention_flop': 4e-12,
            'weight_time_factor': 1.0, 's_per_activation_byte': 1e-11, 'weight_bandwidth': 1e9}
  source = {'speed_model': 'refit.json'}
  new = frontier.repredict(result, teacher, {4: student}, {'chip': device}, source)
  assert new['prediction'] == source and result['prediction']['speed_model'] == 'fit.json'
  by_name = {r['name']: r for r in new['settings']}
  lossless = by_name['lossless_k4']['predicted']['chip']
  assert sorted(lossless) == ['1', '16'] and lossless['16']['iterations'] == 100  # measured
  assert lossless['16']['speedup_vs_ar'] == pytest.approx(frontier.predict(
      Setting('lossless', 4, 4), teacher, student, 16, 6, 128, 100, device)['speedup_vs_ar'])
  assert by_name['lossy_k4_pen0.5']['predicted']['chip']['1']['iterations'] == 31  # ceil(122/4)
  assert sorted(by_name['adaptive_k4_m1']['predicted']['chip']) == ['1']  # timed at B=1 only
  assert by_name['ar']['predicted']['chip']['16']['speedup_vs_ar'] == pytest.approx(1.0)
  for old, redone in zip(result['settings'], new['settings']):
    assert redone['speed'] == old['speed'] and redone['quality'] == old['quality']
