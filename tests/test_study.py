"""The distillation-study runner: overrides, curves, the summary table, worker claims, and one
tiny end-to-end arm (a real distill.run over a real teacher)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from configs import distill_study, test_tiny
from kforcing_jax import study


def test_apply_overrides_sets_fields_and_seed_without_touching_the_base():
  base = test_tiny.get_config()
  out = study.apply_overrides(base, {'model.noise_scale': 100.0, 'distill.stages': [[1, 5]],
                                     'distill.tau_range': [0.8, 1.2]}, seed=7)
  assert out.model.noise_scale == 100.0 and out.seed == 7
  assert out.distill.tau_range == (0.8, 1.2) and tuple(out.distill.stages[0]) == (1, 5)
  assert base.model.noise_scale == 1.0 and base.seed == 0


def test_apply_overrides_refuses_an_unknown_field():
  with pytest.raises(KeyError, match='noise_scal'):
    study.apply_overrides(test_tiny.get_config(), {'model.noise_scal': 2.0}, seed=0)


def test_every_study_arm_names_existing_fields():
  config = distill_study.get_config()
  names = [arm[0] for arm in config.study.arms]
  assert len(names) == len(set(names))
  arms = [study.Arm(a[0], dict(a[1]), *a[2:]) for a in config.study.arms]
  for arm in arms:
    study.apply_overrides(config, arm.overrides, seed=0)
    # a reused stage k=1 comes from an arm with the same k=1 settings
    study.check_stage1_source(arm, arms)


def test_arm_config_and_finished_k1_run(tmp_path):
  base = distill_study.get_config()
  config = study.arm_config(base, 'k1_invcdf_gumbel', 1)
  assert (config.model.cdf_order, config.model.readout, config.seed) == ('gumbel', 'inverse_cdf', 1)
  assert base.model.cdf_order == 'id'
  with pytest.raises(ValueError, match="study arm 'nope': the config has .*'k1_base'"):
    study.arm_config(base, 'nope', 0)
  with pytest.raises(ValueError, match='has no finished stage k=1'):
    study.finished_k1_run(base, str(tmp_path), 'k1_base', 0)
  stage = tmp_path / 'student_k1'
  stage.mkdir()
  (stage / 'eval.json').write_text('{}')
  assert study.finished_k1_run(base, str(tmp_path)) is base
  assert study.finished_k1_run(base, str(tmp_path), 'k1_sorted', 0).model.cdf_order == 'sorted'


def test_a_reused_stage1_must_have_the_same_k1_settings():
  base = study.Arm('a', {'distill.stages': ((1, 500),), 'distill.learning_rate': 3e-3})
  later = study.Arm('b', {'distill.stages': ((1, 500), (2, 100)), 'distill.learning_rate': 3e-3,
                          'distill.logit_matching': 0.5}, '', 'a')
  study.check_stage1_source(later, [base, later])  # differs only in stage k >= 2 fields
  other_lr = dataclasses.replace(later, overrides=dict(later.overrides,
                                                       **{'distill.learning_rate': 1e-3}))
  with pytest.raises(ValueError, match='k=1 settings differ'):
    study.check_stage1_source(other_lr, [base, other_lr])
  other_steps = dataclasses.replace(later, overrides=dict(later.overrides, **{
      'distill.stages': ((1, 250), (2, 100))}))
  with pytest.raises(ValueError, match='k=1 settings differ'):
    study.check_stage1_source(other_steps, [base, other_steps])
  with pytest.raises(ValueError, match='not an arm'):
    study.check_stage1_source(dataclasses.replace(later, stage1_from='zzz'), [later])


def test_curves_split_train_and_validation(tmp_path):
  rows = [{'step': 1, 'time': 0.0, 'loss': 5.0, 'acc_1': 0.1},
          {'step': 2, 'time': 1.0, 'loss': 4.0, 'acc_1': 0.2},
          {'step': 2, 'time': 1.0, 'val_acc_total': 0.3, 'val_windows': 10.0}]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in rows) + '\n')
  got = study.curves(str(tmp_path))
  assert got['train']['loss'] == [[1, 5.0], [2, 4.0]]
  assert got['validation']['acc_total'] == [[2, 0.3]]
  assert 'time' not in got['train']


def _record(arm, seed, acc_total, acc):
  return {'arm': arm, 'seed': seed, 'overrides': {'model.noise_scale': 10.0}, 'seconds': 120.0,
          'note': f'arm {arm}',
          'stages': {'2': {'acc': acc, 'acc_total': acc_total, 'baseline_acc_total': 0.1,
                           'steps': 50, 'curves': {'train': {}, 'validation': {}}}}}


def test_summary_table_means_and_ranges_over_seeds():
  table = study.summary_table([_record('a', 0, 0.2, [0.5, 0.3]), _record('a', 1, 0.4, [0.7, 0.5]),
                               _record('b', 0, 0.1, [0.4, 0.2])], ['b', 'a'])
  lines = table.splitlines()
  assert lines[2] == '| b | 2 (50) | 1 | 0.100 | 0.400 / 0.200 | 0.100 | - | 2.0 | arm b |'
  assert lines[3].startswith('| a | 2 (50) | 2 | 0.300 [0.200, 0.400] | 0.600 / 0.400 |')


def test_claim_is_exclusive_between_live_processes(tmp_path):
  assert study.claim(str(tmp_path))
  assert study.claim(str(tmp_path))  # this process again
  other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])
  try:
    (tmp_path / 'worker.pid').write_text(str(other.pid))
    assert not study.claim(str(tmp_path))
  finally:
    other.kill()
    other.wait()
  assert study.claim(str(tmp_path))  # a dead holder's run is taken over


@pytest.mark.slow
def test_a_tiny_study_end_to_end(tiny_data_config, tmp_path):
  """Two arms x one seed over a real teacher: the k=1 arm trains; the full arm links that
  stage k=1 and trains k=2 only; records, SUMMARY.md and plots are written; a re-run trains
  nothing."""
  import ml_collections
  from kforcing_jax import teacher
  config = tiny_data_config
  config.train.steps = 20
  teacher.run(config, str(tmp_path / 'teacher_run'))
  config.distill.eval_every = 5
  config.study = ml_collections.ConfigDict()
  config.study.seeds = (3,)
  config.study.header = '# tiny'
  config.study.arms = (('k1', {'distill.stages': ((1, 10),)}, 'k=1 only'),
                       ('full', {'distill.stages': ((1, 10), (2, 5))}, 'then k=2', 'k1'))
  output = str(tmp_path / 'study')
  study.run(config, str(tmp_path / 'teacher_run'), output=output)
  records = {r['arm']: r for r in study.load_records(output)}
  assert set(records) == {'k1', 'full'} and records['k1']['seed'] == 3
  assert records['full']['stages']['1']['acc_total'] == records['k1']['stages']['1']['acc_total']
  assert os.path.islink(os.path.join(output, 'runs', 'full', 'seed3', 'student_k1'))
  val = records['full']['stages']['2']['curves']['validation']['acc_total']
  assert [step for step, _ in val] == [5]
  assert len(records['k1']['stages']['1']['curves']['train']['loss']) >= 2
  summary = open(os.path.join(output, 'SUMMARY.md')).read()
  assert summary.startswith('# tiny') and '| full | 2 (5) | 1 |' in summary
  slots = records['full']['agreement_vs_ar']['slot']
  assert records['full']['agreement_vs_ar']['k'] == 2 and len(slots) == 2
  assert all(0.0 <= s <= 1.0 for s in slots)
  assert os.path.exists(os.path.join(output, 'curves', 'full.png'))
  before = os.path.getmtime(os.path.join(output, 'k1__seed3.json'))
  study.run(config, str(tmp_path / 'teacher_run'), output=output)
  assert os.path.getmtime(os.path.join(output, 'k1__seed3.json')) == before
