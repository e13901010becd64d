"""Evaluation metrics on constructed samples, the results records (report.Results), and
`evaluate.run` end to end on a tiny workdir built here (random teacher and students exported
where the pipeline puts them).
"""

import copy
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test_tiny
from kforcing_jax import checkpoints, config_checks, data, decode, evaluate, metrics, models, report
from kforcing_jax import roofline, rundir, sharding, timing
from tests.helpers import params as params_lib


class IdTokenizer:
  """Stand-in for the data tokenizer: ids as text (test_tiny's 256-token vocabulary)."""
  name, vocab_size, mask_id = 'ids', 256, 0

  def decode(self, ids):
    return ' '.join(str(i) for i in ids)


def tiny_config(config=None, **eval_overrides):
  config = test_tiny.get_config() if config is None else config
  config.decode.gen_len = 16
  config.decode.prefix_len = 4
  config.eval.num_samples = 2
  config.eval.batch_sizes = (1, 2)
  config.eval.repeats = 1
  config.eval.agreement_batches = 2
  config.eval.lossless_samples = 2
  config.eval.lossless_batch_sizes = (1, 2)
  for key, value in eval_overrides.items():
    config.eval[key] = value
  return config


random_params = params_lib.random_params


# ----------------------------------------------------------------------------- metrics

def test_unigram_entropy_hand_computed():
  # row 0: two tokens with p = 1/2 each -> ln 2; row 1: one token -> 0; mean ln(2) / 2
  assert metrics.unigram_entropy([[5, 5, 7, 7], [3, 3, 3, 3]]) == pytest.approx(math.log(2) / 2)
  # p = (1/2, 1/4, 1/4) -> 1.5 ln 2
  assert metrics.unigram_entropy([[1, 1, 2, 3]]) == pytest.approx(1.5 * math.log(2))


def test_distinct_n_pooled_and_within_rows():
  rows = [[1, 2, 1, 2], [1, 2, 3, 4]]
  # bigrams (1,2) (2,1) (1,2) | (1,2) (2,3) (3,4): 4 unique of 6
  assert metrics.distinct_n(rows, 2) == pytest.approx(4 / 6)
  # 4-grams (1,2,1,2) | (1,2,3,4): 2 of 2
  assert metrics.distinct_n(rows, 4) == pytest.approx(1.0)
  # n-grams never span two rows: 2 + 2 bigrams, not 5
  assert metrics.distinct_n([[1, 2, 3], [1, 2, 3]], 2) == pytest.approx(2 / 4)
  with pytest.raises(ValueError, match='4-grams'):
    metrics.distinct_n([[1, 2, 3]], 4)


def test_perplexity_from_constructed_logits_counts_generated_tokens_only():
  prefix_len = 2
  tokens = np.array([[3, 0, 1, 3]])
  logits = np.zeros((1, 4, 4), np.float32)
  logits[0, 0] = np.log([0.97, 0.01, 0.01, 0.01])   # predicts token 1 (a prompt token): ignored
  logits[0, 1] = np.log([0.5, 0.25, 0.125, 0.125])  # token 2 = 1: p = 0.25
  logits[0, 2] = np.log([0.1, 0.2, 0.3, 0.4])       # token 3 = 3: p = 0.4
  logits[0, 3] = np.log([0.97, 0.01, 0.01, 0.01])   # predicts past the end: ignored
  expected = math.exp(-(math.log(0.25) + math.log(0.4)) / 2)
  assert metrics.perplexity_from_logits(logits, tokens, prefix_len) == pytest.approx(
      expected, rel=1e-5)


def test_generative_perplexity_chunked_equals_one_forward(monkeypatch):
  config = tiny_config()
  model = models.teacher(config)
  params = random_params(model, 0)
  samples = np.asarray(jax.random.randint(jax.random.key(2), (5, 16), 1, 256), np.int32)
  logits, _ = jax.jit(lambda p, t: model.module(p)(t))(params, samples)
  expected = metrics.perplexity_from_logits(logits, samples, 4)
  # 2 rows per chunk: 3 chunks, the last one padded with masked rows
  monkeypatch.setattr(metrics, 'NLL_CHUNK_ELEMENTS', 2 * 16 * 256)
  assert metrics.generative_perplexity(model, params, samples, 4) == pytest.approx(
      expected, rel=1e-5)
  assert expected > 1.0


# ----------------------------------------------------------------------------- results

def valid_results():
  row = {'batch': 1, 'tokens_per_s': 100.0, 'forwards_per_token': 1.0, 'speedup_vs_ar': 1.0,
         'seconds': 1.0, 'seconds_all': [1.0], 'decode_steps': 12}
  ar = {'name': 'ar', 'kind': 'ar', 'k': 1, 'gen_ppl_teacher': 10.0, 'gen_ppl_evaluator': None,
        'entropy': 3.0, 'distinct_2': 0.9, 'distinct_4': 1.0, 'acc_total': None,
        'throughput': [row], 'samples': [{'prompt': 'a', 'generated': 'b'}],
        'gen_ppl_teacher_ci': {'lo': 9.0, 'hi': 11.5}, 'gen_ppl_evaluator_ci': None,
        'entropy_ci': {'lo': 2.9, 'hi': 3.1}, 'distinct_2_ci': {'lo': 0.85, 'hi': 0.95},
        'agreement_vs_ar': None, 'mode_seeking': None,
        'temperature': 1.0, 'tau': None, 'freq_penalty': None, 'lossless': None}
  bins = [{'lo': 0.0, 'hi': 1.0, 'windows': 30, 'agreement_1': 0.9, 'acc_total': 0.8,
           'mode_reference': 0.85},
          {'lo': 1.0, 'hi': None, 'windows': 0, 'agreement_1': None, 'acc_total': None,
           'mode_reference': None}]
  student = dict(ar, name='pflm_k2', kind='pflm', k=2, acc_total=0.5, gen_ppl_evaluator=12.0,
                 gen_ppl_evaluator_ci={'lo': 11.0, 'hi': 13.0}, mode_seeking=True,
                 agreement_vs_ar={'windows': 30, 'slot': [0.9, 0.7], 'prefix': [0.9, 0.6],
                                  'by_entropy': bins},
                 temperature=None, tau=1.0, freq_penalty=0.2,
                 throughput=[dict(row, forwards_per_token=0.5, speedup_vs_ar=1.8,
                                  decode_steps=6)])
  plain = dict(student, name='pflm_k2_nopen', freq_penalty=0.0, throughput=[],
               agreement_vs_ar=None, mode_seeking=False)
  return {'schema_version': 4, 'device': 'cpu', 'jax_version': jax.__version__,
          'config': 'x.py', 'prefix_len': 6, 'gen_len': 128, 'eval_split': 'validation',
          'num_samples': 2, 'batch_sizes': [1], 'repeats': 1, 'seed': 0,
          'evaluator_workdir': None, 'evaluator': None, 'bootstrap_resamples': 1000,
          'bootstrap_seed': 0, 'agreement_rows': 8, 'speed_prompts': 'tiled',
          'models': [ar, student, plain], 'roofline': {}, 'config_values': {}, 'seconds': 1.0,
          'extra_key': {'allowed': True}}


def test_results_round_trip_through_json():
  results = report.Results.from_json(valid_results())
  assert isinstance(results.models[1].throughput[0], report.Throughput)
  assert (results.models[0].kind, results.models[0].k) == ('ar', 1)
  assert results.models[1].samples[0] == report.Sample('a', 'b')
  assert results.models[1].gen_ppl_teacher_ci == report.Interval(9.0, 11.5)
  assert results.models[1].agreement_vs_ar.by_entropy[1].hi is None
  assert results.models[1].mode_seeking is True and results.models[2].without_penalty
  again = report.Results.from_json(json.loads(json.dumps(results.to_json())))
  assert again == results
  expected = valid_results()
  del expected['extra_key']  # unknown keys are ignored on reading
  assert results.to_json() == expected


@pytest.mark.parametrize('mutate, message', [
    (lambda r: r.pop('device'), 'missing keys'),
    (lambda r: r['models'][0].pop('entropy'), 'missing keys'),
    (lambda r: r['models'][1]['throughput'][0].pop('speedup_vs_ar'), 'missing keys'),
    (lambda r: r.__setitem__('prefix_len', 6.0), 'prefix_len should be int'),
    (lambda r: r['models'][1].__setitem__('k', True), 'k should be int'),
    (lambda r: r['models'][0].__setitem__('gen_ppl_teacher', None), 'gen_ppl_teacher'),
    (lambda r: r['models'][0].__setitem__('gen_ppl_teacher', float('nan')), 'finite'),
    (lambda r: r['models'][1].__setitem__('acc_total', '0.5'), 'acc_total'),
    (lambda r: r['models'][1]['throughput'][0].__setitem__('seconds_all', [1.0, 'x']),
     r'seconds_all\[1\]'),
    (lambda r: r['models'][1].__setitem__('name', 'student_k2'), 'name'),
    (lambda r: r['models'][1].__setitem__('name', 'pflm_k3'), 'name'),
    (lambda r: r['models'][0].__setitem__('k', 0), 'name'),
    (lambda r: r['models'][1].__setitem__('name', 'ar'), 'name'),
    (lambda r: r['models'].__setitem__(1, dict(r['models'][0])), 'duplicate'),
    (lambda r: r['models'].reverse(), 'first model'),
    (lambda r: r.__setitem__('models', []), 'empty'),
    (lambda r: r['models'][0]['throughput'].__setitem__(0, [1, 2]), 'object'),
    (lambda r: r.__setitem__('schema_version', 3), 'schema_version'),
    (lambda r: r['models'][1].pop('entropy_ci'), 'missing keys'),
    (lambda r: r['models'][1].__setitem__('gen_ppl_teacher_ci', None), 'gen_ppl_teacher_ci'),
    (lambda r: r['models'][1].__setitem__('mode_seeking', 1), 'mode_seeking should be bool'),
    (lambda r: r['models'][1]['agreement_vs_ar'].__setitem__('slot', [0.9, None]),
     r'slot\[1\]'),
    (lambda r: r['models'][1]['agreement_vs_ar']['by_entropy'][0].pop('windows'),
     'missing keys'),
    (lambda r: r['models'][2].__setitem__('freq_penalty', 0.2), 'without the frequency'),
    (lambda r: r['models'][2].__setitem__('name', 'pflm_k2_nopenalty'), 'name'),
    (lambda r: r.pop('schema_version'), 'schema_version'),
])
def test_results_reject_wrong_schema(mutate, message):
  results = valid_results()
  mutate(results)
  with pytest.raises(ValueError, match=message):
    report.Results.from_json(results)


def test_results_of_an_older_schema_are_evaluated_again(tmp_path):
  old = valid_results()
  old['schema_version'] = 3
  with open(tmp_path / 'results.json', 'w') as f:
    json.dump(old, f)
  assert report.read(str(tmp_path)) is None
  with open(tmp_path / 'results.json', 'w') as f:
    json.dump(valid_results(), f)
  assert report.read(str(tmp_path)) == report.Results.from_json(valid_results())


def test_report_tables_show_intervals_agreement_and_the_mode_seeking_verdict():
  results = report.Results.from_json(valid_results())
  lines = report.mode_seeking_prose(results.models)
  assert lines[0].startswith('- pflm_k2 **is mode-seeking**: gen. ppl (teacher) 1.00x')
  assert lines[1].startswith('- pflm_k2_nopen is not mode-seeking')
  assert report._with_ci(215.46, report.Interval(201.31, 230.94), '.1f') == (
      '215.5 [201.3, 230.9]')
  agreement_table = '\n'.join(report.agreement_markdown(results))
  assert '| pflm_k2 | 30 | 0.900 | 0.700 | 0.900 | 0.600 |' in agreement_table
  assert '| pflm_k2 | [0, 1) | 30 | 0.850 | 0.900 | 0.800 |' in agreement_table
  assert '| pflm_k2 | [1, inf) | 0 | n/a | n/a | n/a |' in agreement_table
  assert 'pflm_k2_nopen' not in agreement_table
  assert [m.name for m in report.timed(results.models)] == ['ar', 'pflm_k2']


# ----------------------------------------------------------------------------- roofline

@pytest.mark.parametrize('kind, k', [('ar', 1), ('pflm', 2)])
def test_analytic_step_flops_match_xla_cost_analysis(kind, k):
  """Two independent counts of one decode step: by hand and by XLA (which also counts the
  softmax / sampling / penalty elementwise work the analytic count leaves out)."""
  config = tiny_config()
  model = models.teacher(config) if kind == 'ar' else models.student(config, k)
  xla = roofline.xla_step_cost(model, k, 8, 16, freq_penalty=0.5)
  analytic = roofline.analytic_step_cost(model, k, 8, 16)
  # the noise encoder runs before the loop: its amortised share (20 d^2 per hint) is in the
  # analytic count only
  hints = 0 if kind == 'ar' else k
  encoder = 8 * hints * 20 * config.model.d_model ** 2
  assert analytic['flops'] - encoder == pytest.approx(xla['flops'], rel=0.15)
  assert xla['bytes'] >= 0.9 * analytic['bytes']  # analytic = the minimal traffic


def test_last_layer_saving_matches_what_xla_no_longer_computes(monkeypatch):
  """The k-token step's pending tokens stop at their K/V in the last layer: the FLOPs XLA's
  cost analysis loses against the untrimmed step (the whole window through every layer, the
  token slots' outputs dropped after) are the analytic count's subtraction."""
  config = tiny_config()
  k, batch, gen_len = 2, 8, 16
  model = models.student(config, k)
  trimmed = roofline.xla_step_cost(model, k, batch, gen_len, freq_penalty=0.5)['flops']

  def untrimmed_step(backbone, cache, pending, start, hints, u, counts, freq_penalty, active,
                     later_slot_temperature=1.0, student=None):  # no token feedback here
    slots = jnp.concatenate([backbone.embed_tokens(pending), hints], axis=1)
    hidden, cache = decode.window_step(backbone, cache, start, slots,
                                       start + jnp.arange(2 * k), k)
    tokens, counts = decode.penalized_readout(backbone.logits(hidden[:, k:]), counts,
                                              freq_penalty, active, u)
    return tokens, counts, cache

  monkeypatch.setattr(decode, 'pflm_step', untrimmed_step)
  full = roofline.xla_step_cost(model, k, batch, gen_len, freq_penalty=0.5)['flops']
  d, f = config.model.d_model, config.model.mlp_ratio * config.model.d_model
  cache_len, slots = gen_len + k, 2 * k
  analytic = batch * k * (2 * d * d + 4 * d * f + 4 * d * (cache_len + slots))
  assert full - trimmed == pytest.approx(analytic, rel=0.1)


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
  teacher = models.teacher(config)
  checkpoints.export_params(rundir.params_dir(rundir.teacher_dir(root)),
                            random_params(teacher, seed), {'kind': 'ar'})
  for k in stages:
    student = models.student(config, k)
    checkpoints.export_params(rundir.params_dir(rundir.stage_dir(root, k)),
                              random_params(student, seed + 10 * k), {'kind': 'pflm', 'k': k})
    with open(rundir.eval_path(rundir.stage_dir(root, k)), 'w') as f:
      json.dump({'k': k, 'acc_total': 0.5 / k}, f)


def test_evaluator_architecture_is_read_from_the_checkpoint(tmp_path):
  config = tiny_config()
  other = copy.deepcopy(config)
  other.model.d_model = 32
  other.model.num_layers = 1
  other.model.num_heads = 2
  evaluator = models.teacher(other)
  params = random_params(evaluator, 5)
  eval_run = str(tmp_path / 'eval_run')
  checkpoints.export_params(rundir.params_dir(rundir.teacher_dir(eval_run)), params, {})
  config.eval.evaluator_workdir = eval_run
  layout = sharding.single_device_layout()
  loaded = evaluate.load_evaluator(config, layout, IdTokenizer())
  assert loaded.model == evaluator
  np.testing.assert_array_equal(np.asarray(loaded.params['head']), np.asarray(params['head']))
  config.eval.evaluator_workdir = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='evaluator_workdir'):
    evaluate.load_evaluator(config, layout, IdTokenizer())
  config.eval.evaluator_workdir = ''
  assert evaluate.load_evaluator(config, layout, IdTokenizer()) is None


def test_pipeline_evaluator_is_found_and_an_explicit_one_wins(tmp_path):
  config = tiny_config()
  spec = config.eval.evaluator
  derived = evaluate.evaluator_config(config)
  assert (derived.seed, derived.model.d_model, derived.model.num_layers,
          derived.model.num_heads, derived.train.steps) == (
              spec.seed, spec.d_model, spec.num_layers, spec.num_heads, spec.steps)
  assert derived.seed != config.seed and derived.model.d_model != 0
  assert derived.data == config.data and config.train.steps == 40  # the run's config untouched
  workdir, other = str(tmp_path / 'run'), str(tmp_path / 'other')
  layout = sharding.single_device_layout()
  assert evaluate.load_evaluator(config, layout, IdTokenizer(), workdir) is None
  small = models.teacher(derived)
  checkpoints.export_params(
      rundir.params_dir(rundir.teacher_dir(rundir.evaluator_workdir(workdir))),
      random_params(small, 3), {'kind': 'ar'})
  found = evaluate.load_evaluator(config, layout, IdTokenizer(), workdir)
  assert found.model == small
  assert evaluate.evaluator_workdir(config, workdir) == rundir.evaluator_workdir(workdir)
  build_workdir(other, config, stages=())
  config.eval.evaluator_workdir = other
  assert evaluate.load_evaluator(config, layout, IdTokenizer(), workdir).model == (
      models.teacher(config))


def test_time_batches_folds_the_key_per_batch_and_times_each():
  rows = np.arange(10).reshape(5, 2)
  calls = []

  def decode_fn(prompts, key):
    calls.append(int(jax.random.key_data(key)[-1]))
    return prompts * 2

  tokens, seconds = timing.time_batches(decode_fn, rows, 2, jax.random.key(3), n_warmup=1)
  np.testing.assert_array_equal(tokens, rows * 2)
  assert len(seconds) == 3 and all(s >= 0 for s in seconds)
  folded = [int(jax.random.key_data(jax.random.fold_in(jax.random.key(3), b))[-1])
            for b in range(3)]
  assert calls == [folded[0]] + folded  # the warm-up decodes batch 0 with its key


@pytest.mark.slow
def test_run_writes_a_valid_report(tmp_path, tiny_data_config):
  workdir = str(tmp_path / 'run')
  config = tiny_config(tiny_data_config)
  tokenizer = data.load_tokenizer(config)
  build_workdir(workdir, config)
  # the pipeline's evaluator holds this run's teacher (loaded through the evaluator path,
  # architecture read from the checkpoint): its perplexities must equal the teacher's
  checkpoints.export_params(
      rundir.params_dir(rundir.teacher_dir(rundir.evaluator_workdir(workdir))),
      random_params(models.teacher(config), 0), {'kind': 'ar'})
  prompts = np.asarray(jax.random.randint(jax.random.key(7), (2, 4), 1, 256), np.int32)

  results = evaluate.run(config, workdir, prompts=prompts, tokenizer=tokenizer,
                         config_name='tiny.py')

  out = rundir.report_dir(workdir)
  with open(os.path.join(out, 'results.json')) as f:
    on_disk = json.load(f)
  assert report.Results.from_json(on_disk) == results
  assert (on_disk['schema_version'], on_disk['config']) == (4, 'tiny.py')
  assert on_disk['evaluator_workdir'] == rundir.evaluator_workdir(workdir)
  assert 'd_model 64, 2 layers' in on_disk['evaluator']
  for name in ('REPORT.md', 'speedup.png', 'quality.png', 'frontier.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0
  by_name = {m['name']: m for m in on_disk['models']}
  assert list(by_name) == ['ar', 'pflm_k1', 'pflm_k1_nopen', 'pflm_k2', 'pflm_k2_nopen',
                           'lossless_k1', 'lossless_k2']
  # lossless: the AR teacher's samples (same prompts, same chunks of 2, same noise), so the
  # same metrics to the last digit, whatever the random students draft
  for name, k in (('lossless_k1', 1), ('lossless_k2', 2)):
    row, stats = by_name[name], by_name[name]['lossless']
    assert (row['kind'], row['k'], stats['samples'], stats['rows_identical_to_ar']) == (
        'lossless', k, 2, 2)
    for key in ('gen_ppl_teacher', 'gen_ppl_evaluator', 'entropy', 'distinct_2', 'distinct_4'):
      assert row[key] == by_name['ar'][key], (name, key)
    assert stats['ar_gen_ppl_teacher'] == pytest.approx(row['gen_ppl_teacher'])
    assert row['mode_seeking'] is False and row['agreement_vs_ar'] is None
    assert len(stats['accepted_histogram']) == k + 1
    assert stats['mean_tokens_per_iteration'] == pytest.approx(
        evaluate.mean_tokens_per_iteration(stats['accepted_histogram']))
    assert [r['batch'] for r in row['throughput']] == [c['batch'] for c in stats['cost']] == [1, 2]
    for r, c in zip(row['throughput'], stats['cost']):
      # 12 new tokens per row, at most k + 1 per iteration, at least 1
      assert math.ceil(12 / (k + 1)) <= c['iterations'] <= 12
      assert r['decode_steps'] == c['iterations']
      assert c['tokens_per_iteration'] == pytest.approx(12 / c['iterations'])
      assert r['forwards_per_token'] == pytest.approx(c['iterations'] / 12)
  assert (by_name['ar']['kind'], by_name['ar']['k']) == ('ar', 1)
  assert (by_name['pflm_k2']['kind'], by_name['pflm_k2']['k']) == ('pflm', 2)
  assert by_name['ar']['acc_total'] is None
  assert by_name['pflm_k2']['acc_total'] == pytest.approx(0.25)
  assert (by_name['pflm_k2']['freq_penalty'], by_name['pflm_k2_nopen']['freq_penalty']) == (
      0.2, 0.0)
  # k=1's penalty is 0: its _nopen row is the same samples
  assert by_name['pflm_k1_nopen']['gen_ppl_teacher'] == by_name['pflm_k1']['gen_ppl_teacher']
  for m in on_disk['models']:
    assert m['gen_ppl_evaluator'] == pytest.approx(m['gen_ppl_teacher'], rel=1e-5)
    assert [r['batch'] for r in m['throughput']] == ([] if m['name'].endswith('_nopen')
                                                      else [1, 2])
    for key in ('gen_ppl_teacher', 'entropy', 'distinct_2'):
      assert m[f'{key}_ci']['lo'] <= m[key] <= m[f'{key}_ci']['hi']
    assert (m['mode_seeking'] is None) == (m['kind'] == 'ar')
  # agreement with the AR map: 2 held-out batches of 8 rows of 32 tokens, t + k < 32
  assert on_disk['agreement_rows'] == 16
  for name, k in (('pflm_k1', 1), ('pflm_k2', 2)):
    agreement = by_name[name]['agreement_vs_ar']
    assert agreement['windows'] == 16 * (32 - k)
    assert len(agreement['slot']) == len(agreement['prefix']) == k
    assert sum(b['windows'] for b in agreement['by_entropy']) == agreement['windows']
    assert by_name[f'{name}_nopen']['agreement_vs_ar'] is None
  # 12 new tokens: AR 12 forwards, k=2 6 forwards
  assert by_name['ar']['throughput'][0]['forwards_per_token'] == 1.0
  assert by_name['pflm_k2']['throughput'][1]['forwards_per_token'] == pytest.approx(0.5)
  assert by_name['ar']['throughput'][1]['speedup_vs_ar'] == 1.0
  assert on_disk['roofline']['models'][2]['steps'] == 6
  text = open(os.path.join(out, 'REPORT.md')).read()
  assert '## Roofline' in text and 'pflm_k2' in text
  assert '## Lossless decoding' in text and '| lossless_k2 | 2 | 2 / 2 |' in text
  assert '## Speed-quality frontier' in text and '| k=2 lossless | lossless_k2 |' in text
  assert '## Agreement with the AR teacher' in text and 'mode-seeking' in text
  assert results.models[0].samples[0].prompt == tokenizer.decode(prompts[0].tolist())

  # a second run finds results.json and skips
  stamp = os.path.getmtime(os.path.join(out, 'results.json'))
  again = evaluate.run(config, workdir, prompts=prompts, tokenizer=tokenizer)
  assert os.path.getmtime(os.path.join(out, 'results.json')) == stamp
  assert again.models[1].gen_ppl_teacher == on_disk['models'][1]['gen_ppl_teacher']


def test_mains_parse_their_flags():
  for main in ('evaluate', 'generate'):
    out = subprocess.run([sys.executable, '-m', f'kforcing_jax.main.{main}', '--helpfull'],
                         capture_output=True, text=True, check=False,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert '--config' in out.stdout, out.stderr[-2000:]
    assert ('--force' if main == 'evaluate' else '--student') in out.stdout
    assert '--mode: <lossy|lossless>' in out.stdout


def test_decode_speed_benchmark_writes_speedups(tmp_path):
  # run as its command: a main defines absl flags, which must not meet another main's in-process
  output = str(tmp_path / 'bench' / 'speed.json')
  out = subprocess.run(
      [sys.executable, '-m', 'kforcing_jax.benchmarks.decode_speed',
       '--config=configs/test_tiny.py', '--config.decode.gen_len=16',
       '--config.decode.prefix_len=4', '--config.eval.batch_sizes=(2,)', '--ks=2',
       '--repeats=1', f'--output={output}'],
      capture_output=True, text=True, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-2000:]
  with open(output) as f:
    result = json.load(f)
  assert set(result['speedup_vs_ar']) == {'ar', 'pflm_k2'}
  assert result['speedup_vs_ar']['ar'] == {'2': 1.0}
  assert result['throughput']['pflm_k2'][0]['decode_steps'] == 6  # 12 new tokens, 2 per step


# ----------------------------------------------------------------------------- lossless rows

def test_break_even_acceptance_solves_the_expected_tokens_per_iteration():
  # 1 + a = 1.5 (k = 1) and 1 + a + a^2 = 1.75 (k = 2): a = 0.5
  assert evaluate.break_even_acceptance(1.5, 1) == pytest.approx(0.5)
  assert evaluate.break_even_acceptance(1.75, 2) == pytest.approx(0.5)
  alpha = evaluate.break_even_acceptance(4.0, 4)
  assert sum(alpha ** i for i in range(5)) == pytest.approx(4.0)
  assert evaluate.break_even_acceptance(0.8, 4) == 0.0  # one token per iteration already pays
  assert evaluate.break_even_acceptance(5.0, 4) == pytest.approx(1.0)
  assert evaluate.break_even_acceptance(5.01, 4) is None  # more than k + 1 tokens


def test_lossless_cost_in_ar_steps_and_its_break_even():
  # AR: 1.0 s for 100 steps (10 ms a step); lossless: 2.0 s for 50 iterations (40 ms each)
  ar_row = {'batch': 16, 'seconds': 1.0, 'decode_steps': 100}
  row = {'batch': 16, 'seconds': 2.0, 'decode_steps': 25}  # measure_throughput's k-step count
  cost = evaluate.lossless_cost(row, ar_row, iterations=50, new_tokens=100, k=4)
  assert (cost.batch, cost.iterations) == (16, 50)
  assert cost.iteration_in_ar_steps == pytest.approx(4.0)
  assert cost.tokens_per_iteration == pytest.approx(2.0)
  # speed-up = tokens per iteration / iteration cost = AR time / lossless time
  assert cost.tokens_per_iteration / cost.iteration_in_ar_steps == pytest.approx(1.0 / 2.0)
  assert sum(cost.break_even_acceptance ** i for i in range(5)) == pytest.approx(4.0)
  assert evaluate.lossless_cost(dict(row, seconds=12.0), ar_row, 50, 100, 4).break_even_acceptance \
      is None  # 24 AR steps an iteration: out of reach at k = 4
  assert evaluate.mean_tokens_per_iteration([3, 1]) == pytest.approx((3 * 1 + 1 * 2) / 4)
  assert evaluate.mean_tokens_per_iteration([0, 0, 0]) == 0.0


def test_pareto_front_on_constructed_points():
  # (speed-up, distance from the AR samples' gen. ppl)
  points = [(1.0, 0.0),    # AR: on the front (nothing is as close and faster)
            (0.3, 0.0),    # lossless: as close as AR, slower: dominated
            (1.2, 0.5),    # on the front
            (1.1, 0.6),    # dominated by (1.2, 0.5)
            (1.5, 1.2),    # the fastest: on the front
            (1.5, 1.3)]    # as fast, further: dominated
  assert report.pareto_front(points) == [0, 2, 4]
  assert report.pareto_front([(1.0, 0.1), (1.0, 0.1)]) == [0, 1]  # ties dominate neither
  assert report.quality_distance(100.0, 200.0) == pytest.approx(math.log(2.0))
  assert report.quality_distance(400.0, 200.0) == pytest.approx(math.log(2.0))


def with_lossless_row(results: dict, speedup: float = 0.25, gen_ppl: float = 10.0,
                      ar_same_prompts: float = 10.0) -> dict:
  """valid_results plus a lossless_k2 row timed at batch 1."""
  ar = results['models'][0]
  cost = {'batch': 1, 'iterations': 10, 'tokens_per_iteration': 1.2,
          'iteration_in_ar_steps': 4.8, 'break_even_acceptance': None}
  row = dict(ar, name='lossless_k2', kind='lossless', k=2, gen_ppl_teacher=gen_ppl,
             mode_seeking=False, tau=1.0,
             throughput=[dict(ar['throughput'][0], speedup_vs_ar=speedup, decode_steps=10)],
             lossless={'samples': 2, 'rows_identical_to_ar': 2,
                       'ar_gen_ppl_teacher': ar_same_prompts, 'mean_tokens_per_iteration': 1.2,
                       'accepted_histogram': [8, 2, 0], 'cost': [cost]})
  results['models'].append(row)
  return results


def test_lossless_rows_in_results_and_the_report():
  results = report.Results.from_json(with_lossless_row(valid_results()))
  row = results.models[-1]
  assert isinstance(row.lossless.cost[0], report.LosslessCost) and row.lossless.samples == 2
  assert report.Results.from_json(json.loads(json.dumps(results.to_json()))) == results
  assert [m.name for m in report.timed(results.models)] == ['ar', 'pflm_k2']
  lines = report.lossless_markdown(results)
  assert '| lossless_k2 | 2 | 2 / 2 | 10.0 [9.0, 11.5] | 10.0 |' in '\n'.join(lines)
  assert '| 1 | lossless_k2 | 400 | 100 | 0.25x | 10 | 1.20 | 4.80 | n/a |' in lines
  # fewer samples: the lossless section has its mode-seeking verdict
  assert not any('lossless' in line for line in report.mode_seeking_prose(results.models))
  for mutate, message in (
      (lambda r: r['models'][-1].__setitem__('lossless', None), 'lossless statistics'),
      (lambda r: r['models'][1].__setitem__('lossless', r['models'][-1]['lossless']),
       'lossless statistics'),
      (lambda r: r['models'][-1].__setitem__('name', 'lossless_k2_nopen'), 'name'),
      (lambda r: r['models'][-1].__setitem__('kind', 'pflm'), 'name')):
    broken = with_lossless_row(valid_results())
    mutate(broken)
    with pytest.raises(ValueError, match=message):
      report.Results.from_json(broken)


def test_frontier_points_and_table():
  # AR 1.0x at distance 0; pflm_k2 1.8x at distance 0; pflm_k2_nopen (untimed: its penalised
  # row's speed) ln 2 away; lossless 0.25x, gen ppl 12 over its prompts, where the AR samples
  # of the same prompts have 12 too: distance 0 (not ln 1.2 from the AR row's 10)
  raw = with_lossless_row(valid_results(), gen_ppl=12.0, ar_same_prompts=12.0)
  raw['models'][2]['gen_ppl_teacher'] = 5.0
  results = report.Results.from_json(raw)
  points = report.frontier_points(results)
  assert [(p.name, p.timed_as, p.speedup) for p in points] == [
      ('ar', 'ar', {1: 1.0}), ('pflm_k2', 'pflm_k2', {1: 1.8}),
      ('pflm_k2_nopen', 'pflm_k2', {1: 1.8}), ('lossless_k2', 'lossless_k2', {1: 0.25})]
  assert [p.label for p in points] == ['AR', 'k=2 lossy, lambda 0.2', 'k=2 lossy, lambda 0',
                                       'k=2 lossless']
  assert report.frontier_batches(points) == [1]
  assert [p.distance for p in points] == pytest.approx([0.0, 0.0, math.log(2.0), 0.0])
  # pflm_k2 has AR's gen ppl and is faster: it alone is on the front
  assert report.front_at(points, 1) == [1]
  table = report.frontier_markdown(results)
  assert '| k=2 lossy, lambda 0.2 | pflm_k2 | 10.0 [9.0, 11.5] | 10.0 | 0.000 | 1.80x * |' in table
  assert '| k=2 lossy, lambda 0 | pflm_k2_nopen | 5.0 [9.0, 11.5] | 10.0 | 0.693 | 1.80x |' in table
  assert '| k=2 lossless | lossless_k2 | 12.0 [9.0, 11.5] | 12.0 | 0.000 | 0.25x |' in table
  # a _nopen row whose penalised row has no penalty is the same samples: one point
  raw = valid_results()
  raw['models'][1]['freq_penalty'] = 0.0
  assert [p.name for p in report.frontier_points(report.Results.from_json(raw))] == [
      'ar', 'pflm_k2']


def test_frontier_png_is_written(tmp_path):
  results = report.Results.from_json(with_lossless_row(valid_results()))
  report.plot(tmp_path / 'frontier.png', lambda ax: report._draw_frontier(results, ax))
  with open(tmp_path / 'frontier.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('field, value, words', [
    ('decode.mode', 'exact', "is not one of ('lossy', 'lossless')"),
    ('decode.prefix_len', 4, 'k+1 = 5 for the widest stage k=4 in decode.mode=lossless'),
    ('eval.lossless_samples', -1, 'must be an integer >= 0'),
    ('eval.lossless_batch_sizes', (1, 0), 'must be a tuple of integers >= 1'),
])
def test_decode_mode_and_lossless_config_checks(field, value, words):
  config = test_tiny.get_config()
  config.decode.mode = 'lossless'
  block, name = field.split('.')
  config[block][name] = value
  with pytest.raises(ValueError) as excinfo:
    config_checks.check(config, num_devices=1)
  assert words in str(excinfo.value) and f'config.{field}=' in str(excinfo.value)
  lossy = test_tiny.get_config()
  lossy.decode.prefix_len = 4
  config_checks.check(lossy, num_devices=1)  # lossy decoding needs k_max prompt tokens only


def test_with_mode_overrides_a_copy():
  config = test_tiny.get_config()
  assert config.decode.mode == 'lossy' and evaluate.with_mode(config, None) is config
  lossless_config = evaluate.with_mode(config, 'lossless')
  assert lossless_config.decode.mode == 'lossless' and config.decode.mode == 'lossy'


def test_a_report_of_another_decode_mode_is_redone():
  done = report.Results.from_json(dict(valid_results(),
                                       config_values={'decode': {'mode': 'lossy'}}))
  config = test_tiny.get_config()
  assert evaluate._mode_changed(done, config) is None
  assert 'decode.mode lossy, this run asks for lossless' in evaluate._mode_changed(
      done, evaluate.with_mode(config, 'lossless'))
