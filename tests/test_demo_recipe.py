"""`make demo`'s recipe (configs/shakespeare_gumbel.py: Gumbel-coupled inverse-CDF students with
token feedback at k >= 2, hard targets, no frequency penalty) through the pipeline's parts on the
fixture corpus: teacher -> k=1 -> k=2 -> independent evaluator -> evaluation.

What must hold is what the demo relies on: the recipe's fields reach every stage (the k=2 export
carries the feedback block, k=1 none), the k=1 student follows the teacher's noise-to-token map
far above the ignore-the-noise baseline, stage k=2's loss falls, and the evaluation's lossless
rows equal the AR teacher's samples whatever the drafts.
"""

import json
import os

import pytest

from configs import shakespeare_gumbel
from kforcing_jax import data, distill, evaluate, rundir, sharding, teacher
from tests.test_evaluate import tiny_config


@pytest.mark.slow
def test_the_demo_recipe_through_the_pipeline(tiny_data_config, tmp_path):
  config = shakespeare_gumbel.with_gumbel_recipe(tiny_config(tiny_data_config))
  assert config.distill.seq_len == 128   # the recipe's whole demo rows; the fixture's are 32
  config.distill.seq_len = config.data.seq_len
  config.train.steps = 40
  config.distill.stages = ((1, 60), (2, 30))
  config.distill.eval_every = 30
  config.eval.evaluator.steps = 10
  workdir = str(tmp_path / 'run')

  teacher.run(config, workdir)
  distill.run(config, workdir)
  evaluate.train_evaluator(config, workdir)
  results = evaluate.run(config, workdir, config_name='shakespeare_gumbel.py')

  layout = sharding.layout_from_config(config)
  tokenizer = data.load_tokenizer(config)
  k1, k2 = (rundir.load_export(rundir.stage_dir(workdir, k), layout, config=config,
                                tokenizer=tokenizer) for k in (1, 2))
  # a k=1 student has no later slot to feed: the block exists from stage k=2 on
  assert 'feedback' in k2.params and 'feedback' not in k1.params
  assert (k2.model.cfg.readout, k2.model.cfg.cdf_order) == ('inverse_cdf', 'gumbel')

  with open(rundir.eval_path(rundir.stage_dir(workdir, 1))) as f:
    stage1 = json.load(f)
  assert stage1['acc_total'] > stage1['baseline_acc_total'] + 0.2, stage1
  rows = [json.loads(line) for line in
          open(os.path.join(rundir.stage_dir(workdir, 2), 'metrics.jsonl'))]
  losses = [r['loss_2'] for r in rows if 'loss_2' in r]
  assert losses[-1] < losses[0], losses

  by_name = {m.name: m for m in results.models}
  assert by_name['pflm_k2'].freq_penalty == 0.0    # a distributional student: no penalty
  assert len(by_name['pflm_k2'].agreement_vs_ar.slot) == 2
  for k in (1, 2):
    stats = by_name[f'lossless_k{k}'].lossless
    assert stats.rows_identical_to_ar == stats.samples == 2
