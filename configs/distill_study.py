"""The distillation-recipe study (kforcing_jax/study.py) on the default corpus and teacher.

Base: the paper-recipe demo config (configs/shakespeare_tiny.py; the arms add the recipe) with
held-out evaluation every 50 steps for learning curves. Each arm is (name, {dotted config field:
value}, why); every arm runs for every seed with the same step budget.
results/distill_study/SUMMARY.md is made from it by
  python -m kforcing_jax.main.distill_study --config=configs/distill_study.py --workdir=runs/demo
"""

import ml_collections

from configs import shakespeare_tiny

K1 = {'distill.stages': ((1, 250),)}
FULL = {'distill.stages': ((1, 250), (2, 150), (4, 150))}
# the demo's recipe, the winner of phases 1-3
DEMO_RECIPE = {'distill.learning_rate': 3e-3, 'distill.target_smoothing': 0.2}
# stage k=2 alone over the 500-step k=1 students of the demo recipe (phase 6)
K2_SCREEN = dict(DEMO_RECIPE, **{'distill.stages': ((1, 500), (2, 100))})
# the inverse-CDF readout (sampling.READOUTS) with the CDF in descending-probability order
INVCDF_SORTED = {'model.readout': 'inverse_cdf', 'model.cdf_order': 'sorted',
                 'distill.learning_rate': 3e-3}
INVCDF_GUMBEL = dict(INVCDF_SORTED, **{'model.cdf_order': 'gumbel'})
AUTHORS_OPTIMIZER = {'distill.learning_rate': 1e-4, 'distill.b2': 0.999, 'distill.eps': 1e-6,
                     'distill.weight_decay': 0.0, 'distill.end_learning_rate_ratio': 1.0,
                     'distill.grad_clip': 1.0, 'distill.tau_range': (1.0, 1.0)}


def get_config():
  c = shakespeare_tiny.get_config()
  # the base arm is the demo recipe before the study (the demo now uses its winner)
  c.distill.learning_rate = 1e-3
  c.distill.target_smoothing = 0.0
  c.distill.eval_every = 50
  c.study = ml_collections.ConfigDict()
  c.study.seeds = (0, 1)
  c.study.header = ('# Distillation-recipe study (configs/distill_study.py)\n\n'
                    'Held-out acc_total: mean [min, max] over seeds; baseline = ignore-the-noise '
                    '(k=1: E[max p] of the teacher; k>1: the AR greedy continuation).')
  c.study.arms = (
      ('k1_base', K1, 'the demo recipe before the study: id order, phi(u), AdamW lr 1e-3 cosine'),
      ('k1_sorted', dict(K1, **{'model.cdf_order': 'sorted'}),
       'CDF in descending-probability order'),
      ('k1_scale100', dict(K1, **{'model.noise_scale': 100.0}), 'noise encoder reads phi(100 u)'),
      ('k1_scale1000', dict(K1, **{'model.noise_scale': 1000.0}),
       'noise encoder reads phi(1000 u)'),
      ('k1_authors_opt', dict(K1, **AUTHORS_OPTIMIZER),
       "the authors' stage optimizer: Adam (0.9, 0.999), eps 1e-6, wd 0, constant lr 1e-4"),
      # phase 2 (noise_scale and the sorted order did not beat the base at 250 steps)
      ('k1_lr3e-3', dict(K1, **{'distill.learning_rate': 3e-3}), 'peak lr 3e-3 (cosine to 0.1x)'),
      ('k1_lr3e-3_const', dict(K1, **{'distill.learning_rate': 3e-3,
                                      'distill.end_learning_rate_ratio': 1.0}),
       'lr schedule: constant 3e-3 after warm-up'),
      ('k1_data0.1', dict(K1, **{'distill.data_weight': 0.1}),
       'noise-inversion data term (real continuations mapped back to noises), weight 0.1'),
      ('k1_tau0.5-1.5', dict(K1, **{'distill.tau_range': (0.5, 1.5)}),
       'tau ~ U[0.5, 1.5] per sequence (evaluated at tau = 1)'),
      # phase 3: soft noise-neighbourhood targets (distill.soft_ar_targets), our addition
      ('k1_soft0.05', dict(K1, **{'distill.target_smoothing': 0.05}),
       'soft targets: teacher mass in [u-h, u+h], h 0.05 -> 0 over 80% of the stage'),
      ('k1_soft0.2', dict(K1, **{'distill.target_smoothing': 0.2}),
       'soft targets, h 0.2 -> 0 over 80% of the stage'),
      ('k1_lr3e-3_soft0.2', dict(K1, **{'distill.learning_rate': 3e-3,
                                        'distill.target_smoothing': 0.2}),
       'the two arms that beat the base, combined'),
      # phase 4: the whole k=1 -> 2 -> 4 schedule; stage k=1 is linked from the k=1 arm of the
      # same settings and seed (4th field). Equal CPU budget: the demo's 250/150/150 steps cost
      # ~627 s at 0.65/1.3/1.8 s per k=1/2/4 step; 500/100/100 ~635 s
      ('full_base', dict(FULL), 'the demo schedule, base recipe', 'k1_base'),
      ('full_lr3e-3_soft0.2', dict(FULL, **{'distill.learning_rate': 3e-3,
                                            'distill.target_smoothing': 0.2}),
       'the best k=1 recipe through the demo schedule (lr 3e-3 in every stage)',
       'k1_lr3e-3_soft0.2'),
      # phase 4b: the budget, on the demo recipe (lr 3e-3, soft targets 0.2)
      ('k1_lr3e-3_soft0.2_steps500', dict(DEMO_RECIPE, **{'distill.stages': ((1, 500),)}),
       'the demo recipe, twice the k=1 steps'),
      ('k1_lr3e-3_soft0.2_steps1000', dict(DEMO_RECIPE, **{'distill.stages': ((1, 1000),)}),
       'the demo recipe, four times the k=1 steps'),
      ('full_lr3e-3_soft0.2_k1heavy',
       dict(DEMO_RECIPE, **{'distill.stages': ((1, 500), (2, 100), (4, 100))}),
       'budget split 500 / 100 / 100 (about the CPU time of 250 / 150 / 150), the demo recipe',
       'k1_lr3e-3_soft0.2_steps500'),
      # phase 5: the inverse-CDF readout (our extension, sampling.READOUTS): each slot predicts
      # a distribution and samples it with its own noise; distilled by per-slot KL to the
      # teacher's distributions along its shared-noise rollout (distill.distribution_loss)
      ('k1_invcdf', dict(K1, **{'model.readout': 'inverse_cdf', 'distill.learning_rate': 3e-3}),
       'inverse-CDF readout, per-slot KL, lr 3e-3'),
      ('k1_invcdf_steps500', dict(K1, **{'model.readout': 'inverse_cdf',
                                         'distill.learning_rate': 3e-3,
                                         'distill.stages': ((1, 500),)}),
       'inverse-CDF readout, twice the k=1 steps'),
      ('full_invcdf', dict(FULL, **{'model.readout': 'inverse_cdf',
                                    'distill.learning_rate': 3e-3}),
       'the inverse-CDF readout through the demo schedule (lr 3e-3 in every stage)',
       'k1_invcdf'),
      # phase 6: the stages k >= 2. In the demo schedule slot 1 of the k=2 student starts
      # exactly equal to its teacher (it is initialised from it) and ends at 0.68 agreement:
      # learning slot 2 at lr 3e-3 wrecks the inherited slot. Screened at k=2 (100 steps) over
      # the 500-step k=1 students; k2_base is the baseline (the same stage as
      # full_lr3e-3_soft0.2_k1heavy's k=2)
      ('k2_base', dict(K2_SCREEN),
       'stage k=2 of the demo recipe alone (the baseline of this phase; the same stage as '
       'full_lr3e-3_soft0.2_k1heavy\'s k=2)', 'k1_lr3e-3_soft0.2_steps500'),
      ('k2_later_lr1e-3', dict(K2_SCREEN, **{'distill.later_learning_rate': 1e-3}),
       'stage k=2 at peak lr 1e-3 (k=1 at 3e-3)', 'k1_lr3e-3_soft0.2_steps500'),
      ('k2_match1', dict(K2_SCREEN, **{'distill.logit_matching': 1.0}),
       'stage k=2 matches the teacher\'s softmax along its rollout (no hard targets)',
       'k1_lr3e-3_soft0.2_steps500'),
      ('k2_match0.5', dict(K2_SCREEN, **{'distill.logit_matching': 0.5}),
       'stage k=2: half hard targets, half the teacher\'s softmax', 'k1_lr3e-3_soft0.2_steps500'),
      ('k2_match1_lr1e-3', dict(K2_SCREEN, **{'distill.logit_matching': 1.0,
                                              'distill.later_learning_rate': 1e-3}),
       'stage k=2: the teacher\'s softmax at peak lr 1e-3', 'k1_lr3e-3_soft0.2_steps500'),
      ('k2_inherit4', dict(K2_SCREEN, **{'distill.inherited_slot_weight': 4.0}),
       'stage k=2: the inherited slot 1 weighs 4x slot 2 in the loss',
       'k1_lr3e-3_soft0.2_steps500'),
      # phase 7: an exponential moving average of the student's parameters (train_state.
      # param_average), evaluated and exported instead of the last ones; on the demo recipe
      ('k1_lr3e-3_soft0.2_ema0.99', dict(K1, **DEMO_RECIPE, **{'distill.ema_decay': 0.99}),
       'the demo recipe at k=1 (250 steps), parameter EMA decay 0.99'),
      ('k1_lr3e-3_soft0.2_ema0.95', dict(K1, **DEMO_RECIPE, **{'distill.ema_decay': 0.95}),
       'the demo recipe at k=1 (250 steps), parameter EMA decay 0.95'),
      # phase 8: the k=1 map is a coarse staircase of ~18 tokens per context where the teacher
      # has ~148 (benchmarks/noise_map.py); phi(u) has at most one period on [0, 1). Finer
      # noise features on the demo recipe (phase 1 tried them at lr 1e-3 with hard targets)
      ('k1_lr3e-3_soft0.2_scale10', dict(K1, **DEMO_RECIPE, **{'model.noise_scale': 10.0}),
       'the demo recipe at k=1 (250 steps), noise encoder reads phi(10 u)'),
      ('k1_lr3e-3_soft0.2_scale100', dict(K1, **DEMO_RECIPE, **{'model.noise_scale': 100.0}),
       'the demo recipe at k=1 (250 steps), noise encoder reads phi(100 u)'),
      ('k1_lr6e-3_soft0.2', dict(K1, **dict(DEMO_RECIPE, **{'distill.learning_rate': 6e-3})),
       'the demo recipe at k=1 (250 steps) with peak lr 6e-3 (resolution grows with updates)'),
      ('k1_lr3e-3_soft0.2_batch32', dict(K1, **DEMO_RECIPE, **{'distill.batch_size': 32}),
       'the demo recipe at k=1 (250 steps) with twice the rows per step (is it updates or '
       'samples that the map\'s resolution needs? compare k1_lr3e-3_soft0.2_steps500)'),
      # phase 9: the inverse-CDF readout in descending-probability order. In id order two
      # nearly equal distributions still disagree wherever their CDFs drift apart by more than
      # a token's width (every interval moves with the mass before it); in sorted order the
      # likeliest tokens sit at the start of [0, 1) in both, so agreement degrades with the
      # distributions' distance rather than with the id-order CDF's, and a later slot can read
      # the earlier slot's token from a threshold on its noise (u < p_top: the top token)
      ('k1_invcdf_sorted', dict(K1, **INVCDF_SORTED),
       'inverse-CDF readout, per-slot KL, lr 3e-3, CDF in descending-probability order'),
      # and with the Gumbel-max coupling (kforcing_jax/gumbel.py) in place of a CDF: the
      # sorted student above has KL 0.024 nats / TV 0.074 to its teacher yet agrees on 0.25 of
      # windows; the same two distributions agree on ~0.90 of noises under this coupling
      ('k1_invcdf_gumbel', dict(K1, **INVCDF_GUMBEL),
       'inverse-CDF readout, per-slot KL, lr 3e-3, the Gumbel-max coupling for every noise'),
      ('full_invcdf_gumbel', dict(FULL, **INVCDF_GUMBEL),
       'the Gumbel-coupled distributional readout through the demo schedule (lr 3e-3)',
       'k1_invcdf_gumbel'),
      # the stages see the first 64 tokens of each row, generation runs to 128: past position 64
      # the k=1 student above is 10x further from its teacher (KL 0.24 vs 0.024 nats)
      # phase 10: under the Gumbel-max coupling a later slot cannot compute the earlier slots'
      # tokens from their noises (full_invcdf_gumbel's slot 2 agrees 0.46 - a mixture over slot
      # 1's tokens); token feedback gives slots 2..k those tokens through one more block
      ('full_invcdf_gumbel_feedback',
       dict(FULL, **INVCDF_GUMBEL, **{'model.token_feedback': True}),
       'full_invcdf_gumbel with token feedback (model.token_feedback): slot j >= 2 reads slot '
       "j-1's token (teacher-forced in training, its own when evaluated and decoded)",
       'k1_invcdf_gumbel'),
      ('full_invcdf_gumbel_feedback_long',
       dict(FULL, **INVCDF_GUMBEL, **{'model.token_feedback': True,
                                       'distill.stages': ((1, 250), (2, 300), (4, 300))}),
       'full_invcdf_gumbel_feedback with twice the steps at k=2 and k=4 (its curves were still '
       'rising at 150)', 'k1_invcdf_gumbel'),
      ('k1_invcdf_gumbel_rows128', dict(K1, **INVCDF_GUMBEL, **{'distill.seq_len': 128,
                                                                 'distill.batch_size': 8}),
       'the Gumbel-coupled readout at k=1 on whole 128-token rows (8 rows: the same windows '
       'per step)'),
  )
  return c
