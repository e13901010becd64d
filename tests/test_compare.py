"""The comparison harness (kforcing_jax/compare.py): budgets, settings, passes per token, the
table and plot, and every method's decoder on tiny models against its own loop."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import shakespeare_tiny, test_tiny
from kforcing_jax import compare, distill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_budgets_give_each_baseline_the_distillations_tokens():
  c = shakespeare_tiny.get_config()
  # 250 + 150 + 150 distillation steps of 16 rows x 64 windows
  assert compare.distill_tokens(c) == 550 * 16 * 64
  assert compare.teacher_tokens(c) == 400 * 32 * 128
  plan = compare.budgets(c)
  assert plan['draft']['steps'] == 550 * 16 * 64 // (8 * 128)       # = 550
  assert plan['heads']['steps'] == 550                               # 16 x 64 rows, as distill
  mdlm_tokens = 400 * 32 * 128 + 550 * 16 * 64
  assert plan['mdlm']['steps'] == -(-mdlm_tokens // (32 * 128))      # ceil: 538
  for b in plan.values():
    assert b['tokens'] >= compare.distill_tokens(c)
  c.compare.heads.steps = 7
  assert compare.budgets(c)['heads'] == {'steps': 7, 'tokens': 7 * 16 * 64,
                                         'rule': 'configured steps'}


def test_draft_config_is_the_teacher_config_at_the_draft_size():
  c = shakespeare_tiny.get_config()
  d = compare.draft_config(c)
  assert (d.model.d_model, d.model.num_layers, d.model.num_heads) == (64, 2, 2)
  assert d.seed == c.compare.draft.seed != c.seed != c.eval.evaluator.seed
  assert d.train.steps == compare.budgets(c)['draft']['steps']
  assert d.train.batch_size == 8 and d.data == c.data
  assert (c.model.d_model, c.train.steps) == (128, 400)  # the run's config is untouched


def test_methods_cover_every_family_and_clip_denoising_steps():
  c = test_tiny.get_config()
  c.compare.mdlm.denoising_steps = (4, 200, 300)
  names = [m.name for m in compare.methods(c, [1, 2, 4], new_tokens=18)]
  assert names == ['ar', 'kforcing_k2', 'kforcing_lossless_k2', 'kforcing_k4',
                   'kforcing_lossless_k4', 'speculative_k2_rejection', 'speculative_k2_coupled',
                   'speculative_k4_rejection', 'speculative_k4_coupled', 'heads_k2',
                   'heads_verified_k2', 'heads_k4', 'heads_verified_k4', 'mdlm_T4', 'mdlm_T18']
  with pytest.raises(ValueError, match='unknown method family'):
    compare.Method('medusa')


@pytest.mark.parametrize('method, output, want', [
    (compare.Method('ar'), None, (120, 1.0, 0.0)),
    (compare.Method('kforcing', 4), None, (30, 0.25, 0.0)),
    (compare.Method('heads', 2), None, (60, 0.5, 0.0)),
    (compare.Method('kforcing_lossless', 4), {'iterations': np.int32(48)}, (48, 0.8, 0.0)),
    (compare.Method('speculative', 4, 'coupled'), {'iterations': 40}, (40, 1 / 3, 4 / 3)),
    (compare.Method('heads_verified', 2), {'iterations': 90}, (90, 0.75, 0.0)),
    (compare.Method('mdlm', 0, steps=30), None, (30, 0.25, 0.0)),
])
def test_passes_per_token(method, output, want):
  p = compare.passes_per_token(method, 120, output)
  assert (p['iterations'], p['full'], p['small']) == pytest.approx(want)


def _fake_result():
  def row(method, speed, ppl, entropy):
    q = {'gen_ppl_teacher': ppl, 'gen_ppl_teacher_ci': [ppl * 0.9, ppl * 1.1],
         'gen_ppl_evaluator': ppl * 2, 'gen_ppl_evaluator_ci': [ppl * 1.8, ppl * 2.2],
         'entropy': entropy, 'entropy_ci': [entropy - 0.1, entropy + 0.1], 'distinct_2': 0.8,
         'distinct_2_ci': [0.7, 0.9], 'distinct_4': 0.9, 'rows': 4, 'rows_identical_to_ar': 0,
         'ar': {}}
    return dict(name=method.name, label=method.label, lossless=method.lossless,
                family=method.family, k=method.k, variant=method.variant, steps=method.steps,
                quality=q, passes_per_token={'iterations': 1, 'full': 0.5, 'small': 1.5},
                speed=[{'batch': b, 'speedup_vs_ar': s} for b, s in zip((1, 16), speed)])
  return {'device': 'cpu', 'jax_version': 'x', 'workdir': 'w', 'config': 'c', 'prefix_len': 6,
          'gen_len': 24, 'quality_rows': 4, 'batch_sizes': [1, 16],
          'training': {'speculative': 'draft 5 steps'},
          'methods': [row(compare.Method('ar'), (1.0, 1.0), 100.0, 4.0),
                      row(compare.Method('speculative', 2, 'rejection'), (1.3, 0.7), 101.0, 4.1),
                      row(compare.Method('mdlm', 0, steps=8), (0.2, 0.1), 300.0, 3.5)]}


def test_markdown_and_plot(tmp_path):
  result = _fake_result()
  text = compare.markdown(result)
  assert '| speculative k=2 (rejection) | yes | 0.50 + 1.50 draft | 1.30x | 0.70x | 202.0 ' in text
  assert '| MDLM T=8 | no |' in text and 'draft 5 steps' in text
  compare.plot(tmp_path / 'compare.png', result)
  assert (tmp_path / 'compare.png').stat().st_size > 10_000


def test_distill_token_rule_uses_the_stage_windows():
  c = test_tiny.get_config()
  c.distill.seq_len = 16
  assert compare.distill_tokens(c) == 60 * 8 * distill.stage_seq_len(c) == 60 * 8 * 16


@pytest.mark.slow
def test_make_compare_end_to_end(tmp_path, tiny_data_config):
  """The command on the tiny config, from nothing: the run, every baseline, the measurement.
  The lossless-by-construction methods decode exactly the AR teacher's rows; a second call
  reuses everything (trained models, measured batch sizes)."""
  workdir, output = tmp_path / 'run', tmp_path / 'out'
  args = ['kforcing_jax.main.compare', '--config=configs/test_tiny.py',
          f'--config.data.data_dir={tiny_data_config.data.data_dir}', f'--workdir={workdir}',
          f'--output={output}', '--config.eval.evaluator.steps=10',
          '--config.compare.batch_sizes=(1, 2)', '--config.compare.prompts=2',
          '--config.compare.draft.ks=(2,)', '--config.compare.heads.ks=(2,)',
          '--config.compare.heads.pool_samples=32', '--config.compare.mdlm.denoising_steps=(4,)',
          '--repeats=1,1']
  out = subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True,
                       check=False, cwd=ROOT, timeout=900)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  result = json.loads((output / 'compare.json').read_text())
  names = [r['name'] for r in result['methods']]
  assert names == ['ar', 'kforcing_k2', 'kforcing_lossless_k2', 'kforcing_k4',
                   'kforcing_lossless_k4', 'speculative_k2_rejection', 'speculative_k2_coupled',
                   'heads_k2', 'heads_verified_k2', 'mdlm_T4']
  by_name = {r['name']: r for r in result['methods']}
  for name in ('ar', 'kforcing_lossless_k2', 'kforcing_lossless_k4', 'speculative_k2_coupled',
               'heads_verified_k2'):
    assert by_name[name]['quality']['rows_identical_to_ar'] == 2, name
  for r in result['methods']:
    assert [s['batch'] for s in r['speed']] == [1, 2]
    assert all(s['speedup_vs_ar'] > 0 for s in r['speed'])
  assert by_name['mdlm_T4']['passes_per_token']['full'] == pytest.approx(4 / 18)
  assert by_name['speculative_k2_coupled']['passes_per_token']['small'] > 0
  for f in ('COMPARE.md', 'compare.png', 'methods/mdlm_T4.json'):
    assert (output / f).exists(), f
  assert '| MDLM T=4 | no |' in (output / 'COMPARE.md').read_text()
  # the measurement's resume state lives with the run, keyed by the models it measured: batch
  # 2's saved entry now claims other heads, so it is measured again and batch 1 is reused
  partial = workdir / 'compare_partial' / 'batch_2.json'
  saved = json.loads(partial.read_text())
  assert set(saved['models']) == {'teacher', 'student_k1', 'student_k2', 'student_k4', 'draft',
                                  'heads_k2', 'mdlm'}
  saved['models']['heads_k2'] = '0' * 16
  partial.write_text(json.dumps(saved))
  again = subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True,
                         check=False, cwd=ROOT, timeout=600)
  assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
  log = again.stdout + again.stderr
  assert 'already trained' in log
  assert 'batch 1: measured before' in log and 'batch 2: measured before' not in log
  assert 'measuring again' in log
  assert json.loads(partial.read_text())['models']['heads_k2'] != '0' * 16
