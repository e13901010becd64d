"""Evaluation metrics on constructed samples, the results schema, and `evaluate.run` end to end
on a tiny workdir built here (random teacher and students exported where the pipeline puts them).
"""

import copy
import json
import math
import os

import jax
import numpy as np
import pytest

from configs import test_tiny
from kforcing_jax import checkpoints, distill, evaluate, roofline, sharding, train
from tests.helpers import params as params_lib


class IdTokenizer:
  """Stand-in for the data tokenizer: ids as text."""

  def decode(self, ids):
    return ' '.join(str(i) for i in ids)


def tiny_config(**eval_overrides):
  config = test_tiny.get_config()
  config.decode.gen_len = 16
  config.decode.prefix_len = 4
  config.eval.num_samples = 2
  config.eval.batch_sizes = (1, 2)
  config.eval.repeats = 1
  for key, value in eval_overrides.items():
    config.eval[key] = value
  return config


random_params = params_lib.random_params


# ----------------------------------------------------------------------------- metrics

def test_unigram_entropy_hand_computed():
  # row 0: two tokens with p = 1/2 each -> ln 2; row 1: one token -> 0; mean ln(2) / 2
  assert evaluate.unigram_entropy([[5, 5, 7, 7], [3, 3, 3, 3]]) == pytest.approx(math.log(2) / 2)
  # p = (1/2, 1/4, 1/4) -> 1.5 ln 2
  assert evaluate.unigram_entropy([[1, 1, 2, 3]]) == pytest.approx(1.5 * math.log(2))


def test_distinct_n_pooled_and_within_rows():
  rows = [[1, 2, 1, 2], [1, 2, 3, 4]]
  # bigrams (1,2) (2,1) (1,2) | (1,2) (2,3) (3,4): 4 unique of 6
  assert evaluate.distinct_n(rows, 2) == pytest.approx(4 / 6)
  # 4-grams (1,2,1,2) | (1,2,3,4): 2 of 2
  assert evaluate.distinct_n(rows, 4) == pytest.approx(1.0)
  # n-grams never span two rows: 2 + 2 bigrams, not 5
  assert evaluate.distinct_n([[1, 2, 3], [1, 2, 3]], 2) == pytest.approx(2 / 4)
  with pytest.raises(ValueError, match='4-grams'):
    evaluate.distinct_n([[1, 2, 3]], 4)


def test_perplexity_from_constructed_logits_counts_generated_tokens_only():
  prefix_len = 2
  tokens = np.array([[3, 0, 1, 3]])
  logits = np.zeros((1, 4, 4), np.float32)
  logits[0, 0] = np.log([0.97, 0.01, 0.01, 0.01])   # predicts token 1 (a prompt token): ignored
  logits[0, 1] = np.log([0.5, 0.25, 0.125, 0.125])  # token 2 = 1: p = 0.25
  logits[0, 2] = np.log([0.1, 0.2, 0.3, 0.4])       # token 3 = 3: p = 0.4
  logits[0, 3] = np.log([0.97, 0.01, 0.01, 0.01])   # predicts past the end: ignored
  expected = math.exp(-(math.log(0.25) + math.log(0.4)) / 2)
  assert evaluate.perplexity_from_logits(logits, tokens, prefix_len) == pytest.approx(
      expected, rel=1e-5)


def test_generative_perplexity_chunked_equals_one_forward(monkeypatch):
  config = tiny_config()
  model = train.teacher_model(config)
  params = random_params(model, 0)
  samples = np.asarray(jax.random.randint(jax.random.key(2), (5, 16), 1, 256), np.int32)
  logits, _ = jax.jit(lambda p, t: model.module(p)(t))(params, samples)
  expected = evaluate.perplexity_from_logits(logits, samples, 4)
  # 2 rows per chunk: 3 chunks, the last one padded with masked rows
  monkeypatch.setattr(evaluate, 'NLL_CHUNK_ELEMENTS', 2 * 16 * 256)
  assert evaluate.generative_perplexity(model, params, samples, 4) == pytest.approx(
      expected, rel=1e-5)
  assert expected > 1.0


# ----------------------------------------------------------------------------- schema

def valid_results():
  row = {'batch': 1, 'tokens_per_s': 100.0, 'forwards_per_token': 1.0, 'speedup_vs_ar': 1.0}
  ar = {'name': 'ar', 'k': 0, 'decode_k': 1, 'gen_ppl_teacher': 10.0, 'gen_ppl_evaluator': None,
        'entropy': 3.0, 'distinct_2': 0.9, 'distinct_4': 1.0, 'acc_total': None,
        'throughput': [row]}
  student = dict(ar, name='pflm_k2', k=2, decode_k=2, acc_total=0.5, gen_ppl_evaluator=12.0,
                 throughput=[dict(row, forwards_per_token=0.5, speedup_vs_ar=1.8)])
  return {'device': 'cpu', 'jax_version': jax.__version__, 'config': 'x.py', 'prefix_len': 6,
          'gen_len': 128, 'models': [ar, student], 'extra_key': {'allowed': True}}


def test_validate_results_accepts_the_schema():
  evaluate.validate_results(valid_results())


@pytest.mark.parametrize('mutate, message', [
    (lambda r: r.pop('device'), 'missing keys'),
    (lambda r: r['models'][0].pop('entropy'), 'missing keys'),
    (lambda r: r['models'][1]['throughput'][0].pop('speedup_vs_ar'), 'missing keys'),
    (lambda r: r.__setitem__('prefix_len', 6.0), 'prefix_len should be int'),
    (lambda r: r['models'][1].__setitem__('k', True), 'k should be int'),
    (lambda r: r['models'][0].__setitem__('gen_ppl_teacher', None), 'gen_ppl_teacher'),
    (lambda r: r['models'][0].__setitem__('gen_ppl_teacher', float('nan')), 'finite'),
    (lambda r: r['models'][1].__setitem__('acc_total', '0.5'), 'acc_total'),
    (lambda r: r['models'][1].__setitem__('name', 'student_k2'), 'name'),
    (lambda r: r['models'][1].__setitem__('name', 'ar'), 'duplicate'),
    (lambda r: r['models'].reverse(), 'first model'),
    (lambda r: r.__setitem__('models', []), 'empty'),
    (lambda r: r['models'][0]['throughput'].__setitem__(0, [1, 2]), 'object'),
])
def test_validate_results_rejects_wrong_schema(mutate, message):
  results = valid_results()
  mutate(results)
  with pytest.raises(ValueError, match=message):
    evaluate.validate_results(results)


# ----------------------------------------------------------------------------- roofline

@pytest.mark.parametrize('decode_k', [0, 2])
def test_analytic_step_flops_match_xla_cost_analysis(decode_k):
  """Two independent counts of one decode step: by hand and by XLA (which also counts the
  softmax / sampling / penalty elementwise work the analytic count leaves out)."""
  config = tiny_config()
  model = train.teacher_model(config) if decode_k == 0 else distill.student_model(config, 2)
  xla = roofline.xla_step_cost(model, decode_k, 8, 16, freq_penalty=0.5)
  analytic = roofline.analytic_step_cost(model, decode_k, 8, 16)
  assert analytic['flops'] == pytest.approx(xla['flops'], rel=0.15)
  assert xla['bytes'] >= 0.9 * analytic['bytes']  # analytic = the minimal traffic


def test_predicted_speedup_limits_and_crossover():
  """Memory-bound: speed-up = steps ratio; compute-bound: steps ratio * flops ratio < 1."""
  ar = {'affine': {'flops': {'const': 0.0, 'per_row': 10.0},
                   'bytes': {'const': 1000.0, 'per_row': 1.0}}, 'steps': 8}
  k2 = {'affine': {'flops': {'const': 0.0, 'per_row': 40.0},
                   'bytes': {'const': 1000.0, 'per_row': 1.0}}, 'steps': 4}
  peak, bandwidth = 10.0, 1.0
  # B = 1: both memory-bound at 1001 bytes -> 8 / 4
  assert roofline.predicted_speedup(ar, k2, 1, peak, bandwidth) == pytest.approx(2.0)
  # huge B: compute-bound; 8 * 10 / (4 * 40) = 0.5
  assert roofline.predicted_speedup(ar, k2, 1e9, peak, bandwidth) == pytest.approx(0.5, rel=1e-3)
  # crossing: k2 step time 4B (compute) vs AR 1000 + B (memory): 8 (1000 + B) = 4 * 4B -> B = 1000
  cross = roofline.crossover(lambda b: roofline.predicted_speedup(ar, k2, b, peak, bandwidth))
  assert cross == pytest.approx(1000.0, rel=0.02)
  assert roofline.measured_crossover([1, 4, 16], [2.0, 1.5, 0.5]) == pytest.approx(8.0)
  assert roofline.measured_crossover([1, 4], [0.9, 0.8]) is None


# ----------------------------------------------------------------------------- end to end

def build_workdir(root, config, stages=(1, 2), seed=0):
  teacher = train.teacher_model(config)
  checkpoints.export_params(os.path.join(root, 'teacher', 'params'),
                            random_params(teacher, seed), {'kind': 'ar'})
  for k in stages:
    student = distill.student_model(config, k)
    checkpoints.export_params(os.path.join(distill.stage_dir(root, k), 'params'),
                              random_params(student, seed + 10 * k), {'kind': 'pflm', 'k': k})
    with open(os.path.join(distill.stage_dir(root, k), 'eval.json'), 'w') as f:
      json.dump({'k': k, 'acc_total': 0.5 / k}, f)


def test_evaluator_architecture_is_read_from_the_checkpoint(tmp_path):
  config = tiny_config()
  other = copy.deepcopy(config)
  other.model.d_model = 32
  other.model.num_layers = 1
  other.model.num_heads = 2
  evaluator = train.teacher_model(other)
  params = random_params(evaluator, 5)
  checkpoints.export_params(str(tmp_path / 'eval_run' / 'teacher' / 'params'), params, {})
  config.eval.evaluator_workdir = str(tmp_path / 'eval_run')
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  model, loaded = evaluate.load_evaluator(config, mesh, config.sharding_rules)
  assert model == evaluator
  np.testing.assert_array_equal(np.asarray(loaded['head']), np.asarray(params['head']))
  config.eval.evaluator_workdir = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='evaluator_workdir'):
    evaluate.load_evaluator(config, mesh, config.sharding_rules)


def test_run_writes_a_valid_report(tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_config()
  build_workdir(workdir, config)
  # the evaluator is this run's own teacher (loaded through the evaluator path, architecture
  # read from the checkpoint): its perplexities must equal the teacher's
  config.eval.evaluator_workdir = workdir
  prompts = np.asarray(jax.random.randint(jax.random.key(7), (2, 4), 1, 256), np.int32)

  results = evaluate.run(config, workdir, prompts=prompts, tokenizer=IdTokenizer())

  report = os.path.join(workdir, 'report')
  with open(os.path.join(report, 'results.json')) as f:
    on_disk = json.load(f)
  evaluate.validate_results(on_disk)
  for name in ('REPORT.md', 'speedup.png', 'quality.png'):
    assert os.path.getsize(os.path.join(report, name)) > 0
  models = {m['name']: m for m in on_disk['models']}
  assert list(models) == ['ar', 'pflm_k1', 'pflm_k2']
  assert (models['ar']['k'], models['ar']['decode_k']) == (0, 1)
  assert models['ar']['acc_total'] is None
  assert models['pflm_k2']['acc_total'] == pytest.approx(0.25)
  for m in on_disk['models']:
    assert m['gen_ppl_evaluator'] == pytest.approx(m['gen_ppl_teacher'], rel=1e-5)
    assert [r['batch'] for r in m['throughput']] == [1, 2]
  # 12 new tokens: AR 12 forwards, k=2 6 forwards
  assert models['ar']['throughput'][0]['forwards_per_token'] == 1.0
  assert models['pflm_k2']['throughput'][1]['forwards_per_token'] == pytest.approx(0.5)
  assert models['ar']['throughput'][1]['speedup_vs_ar'] == 1.0
  assert on_disk['roofline']['models'][2]['steps'] == 6
  text = open(os.path.join(report, 'REPORT.md')).read()
  assert '## Roofline' in text and 'pflm_k2' in text
  assert results['models'][0]['samples'][0]['prompt'] == ' '.join(map(str, prompts[0]))

  # a second run finds results.json and skips
  stamp = os.path.getmtime(os.path.join(report, 'results.json'))
  again = evaluate.run(config, workdir, prompts=prompts, tokenizer=IdTokenizer())
  assert os.path.getmtime(os.path.join(report, 'results.json')) == stamp
  assert again['models'][1]['gen_ppl_teacher'] == on_disk['models'][1]['gen_ppl_teacher']
