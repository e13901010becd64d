"""The model-size sweep's bookkeeping (kforcing_jax/sizes.py): size configs, parameter counts,
where a speed-up curve crosses 1, and the table built from each size's results.json."""

import math

import pytest

from configs import sizes as sizes_config
from kforcing_jax import progress, rundir, sizes


def test_sizes_config_spans_eight_times_the_parameters():
  config = sizes_config.get_config()
  names = sizes.names(config)
  counts = {n: sizes.parameter_counts(sizes.size_config(config, n, 'ev')) for n in names}
  smallest = min(c['all'] for c in counts.values())
  largest = max(c['all'] for c in counts.values())
  assert largest / smallest >= 8
  # d 64, 2 layers, untied 8192-token embedding and head (+ head bias): the vocabulary part is
  # 2 * 8192 * 64 + 8192, the rest the two blocks and the final norm
  assert counts['small']['all'] - counts['small']['non_vocab'] == 2 * 8192 * 64 + 8192
  # multi-query attention keeps the query projection and shrinks K and V to one head
  mha, mqa = counts['middle']['non_vocab'], counts['middle_mqa']['non_vocab']
  head_dim = 128 // 4
  assert mha - mqa == 4 * 2 * 128 * (4 - 1) * head_dim


def test_size_config_overrides_the_model_only():
  config = sizes_config.get_config()
  sized = sizes.size_config(config, 'large', '/somewhere/evaluator')
  assert (sized.model.d_model, sized.model.num_layers, sized.model.num_heads) == (256, 8, 8)
  assert sized.eval.evaluator_workdir == '/somewhere/evaluator'
  assert sized.distill.stages == config.distill.stages
  assert 'sizes' not in sized and 'sizes' in config
  assert config.model.d_model == 128  # the sweep's config is not modified


def test_names_rejects_unknown_and_keeps_config_order():
  config = sizes_config.get_config()
  assert sizes.names(config, ['large', 'small']) == ['small', 'large']
  with pytest.raises(ValueError, match='unknown size'):
    sizes.names(config, ['huge'])
  config.sizes.names = ('small', 'missing')
  with pytest.raises(ValueError, match="no 'missing' block"):
    sizes.names(config)


def test_size_config_rejects_a_field_the_model_lacks():
  config = sizes_config.get_config()
  config.sizes.small.depth = 3
  with pytest.raises(ValueError, match='no field'):
    sizes.size_config(config, 'small', '')


@pytest.mark.parametrize('curve, expected', [
    ({1: 2.0, 16: 1.5, 256: 1.1}, None),           # above 1 everywhere measured
    ({1: 0.9, 16: 1.2}, 0.0),                       # at or below 1 from the smallest batch
    ({1: 2.0, 4: 1.5, 16: 0.5}, math.exp(math.log(4) + 0.5 * math.log(4))),  # halfway: 8
    ({1: 1.5, 4: 1.0, 16: 0.8}, 4.0),               # exactly 1 at a measured batch
    ({}, None),
])
def test_crossover_batch(curve, expected):
  got = sizes.crossover_batch(curve)
  if expected is None:
    assert got is None
  else:
    assert got == pytest.approx(expected)


def _model(name, kind, k, ppl, entropy, distinct, speeds, slots=None, penalty=None):
  ci = {'lo': ppl * 0.9, 'hi': ppl * 1.1}
  return dict(
      name=name, kind=kind, k=k, gen_ppl_teacher=ppl / 2, gen_ppl_evaluator=ppl,
      gen_ppl_teacher_ci=ci, gen_ppl_evaluator_ci=ci, entropy=entropy, distinct_2=distinct,
      acc_total=None if kind == 'ar' else 0.3, mode_seeking=kind == 'pflm' and ppl < 400,
      freq_penalty=penalty,
      agreement_vs_ar=None if slots is None else {'slot': slots, 'prefix': slots},
      throughput=[dict(batch=b, tokens_per_s=100.0 * s, speedup_vs_ar=s) for b, s in speeds])


def test_collect_and_markdown_from_results(tmp_path):
  config = sizes_config.get_config()
  config.sizes.names = ('small', 'large')
  workdir = str(tmp_path)
  for name, slow in (('small', 1.0), ('large', 2.0)):
    directory = rundir.size_workdir(workdir, name)
    results = dict(device='cpu', evaluator='ev', models=[
        _model('ar', 'ar', 1, 500.0, 4.0, 0.8, [(1, 1.0), (16, 1.0), (256, 1.0)]),
        _model('pflm_k4', 'pflm', 4, 600.0, 3.8, 0.6,
               [(1, 2.0 * slow), (16, 1.5), (256, 0.5)], slots=[0.5, 0.3, 0.2, 0.1], penalty=0.5),
        _model('pflm_k4_nopen', 'pflm', 4, 300.0, 3.0, 0.3, []),  # quality-only: not a row
    ])
    progress.write_json(rundir.report_dir(directory) + '/results.json', results)
    progress.write_json(rundir.eval_path(rundir.teacher_dir(directory)),
                        dict(val_ppl=100.0 / slow, train_steps=200, seconds=60.0))
    progress.write_json(rundir.eval_path(rundir.stage_dir(directory, 4)),
                        dict(steps=75, seconds=30.0))
  result = sizes.collect(config, workdir, ['small', 'large'])
  rows = {r['name']: r for r in result['sizes']}
  assert [s['k'] for s in rows['small']['students']] == [4]
  student = rows['large']['students'][0]
  assert student['gen_ppl_evaluator_vs_ar'] == pytest.approx(1.2)
  assert student['entropy_vs_ar'] == pytest.approx(0.95)
  assert student['speedup_vs_ar'] == {'1': 4.0, '16': 1.5, '256': 0.5}
  # 1.5 at 16, 0.5 at 256: 1 is reached halfway in log(batch), at 64
  assert student['crossover_batch'] == pytest.approx(64.0)
  assert student['distill_steps'] == 75
  assert rows['large']['ar_teacher']['val_ppl'] == 50.0
  assert rows['large']['params']['all'] > 8 * rows['small']['params']['all']
  text = sizes.markdown(result)
  assert '0.500 / 0.300 / 0.200 / 0.100' in text
  assert '4.00x' in text and '~64' in text
  sizes.plot(tmp_path / 'sizes.png', result)
  assert (tmp_path / 'sizes.png').stat().st_size > 10_000


def test_collect_says_which_size_is_missing(tmp_path):
  config = sizes_config.get_config()
  with pytest.raises(FileNotFoundError, match="size 'small'"):
    sizes.collect(config, str(tmp_path), ['small'])
