"""resolution.sweep (benchmarks/noise_map): agrees with the stage evaluation at its points."""

import numpy as np
import pytest

from kforcing_jax import distill, resolution, rundir, sharding
from tests.helpers.runs import teacher_then_k1_stage


@pytest.mark.slow
def test_sweep_agreement_is_the_stage_evaluation_at_each_point(tiny_data_config, tmp_path):
  """Mean agreement over the sweep = the mean, over its u points, of the stage evaluation's
  acc_1 on the same windows with every noise set to that point (an independent code path);
  the teacher's id-order map is monotone in u, so each of its tokens is one segment."""
  config = tiny_data_config
  teacher_then_k1_stage(config, tmp_path, 4, 6)
  points = 8
  result = resolution.sweep(config, str(tmp_path), points, 1)
  layout = sharding.layout_from_config(config)
  teachers = distill.load_teachers(config, str(tmp_path), layout, None)
  student = rundir.load_export(rundir.stage_dir(str(tmp_path), 1), layout, kind='pflm',
                               config=config)
  batch = distill.stage_batches(config, layout, 1, 'validation', False,
                                distill.VALIDATION_SEED_OFFSET)(0)
  acc = []
  for i in range(points):
    fixed = dict(batch, u=np.full(batch['u'].shape, (i + 0.5) / points, np.float32))
    evaluate = distill.make_stage_eval(student.model, teachers, 1, [fixed])
    acc.append(evaluate({'params': student.params})['acc_1'])
  assert result['windows'] == int(distill.window_mask(batch['mask'], 1).sum())
  assert result['overall']['agreement'] == pytest.approx(np.mean(acc), abs=1e-6)
  assert result['overall']['teacher_segments'] == result['overall']['teacher_distinct']
  assert sum(b['share'] for b in result['by_entropy']) == pytest.approx(1.0)
  assert 0 < result['overall']['student_distinct'] <= points

