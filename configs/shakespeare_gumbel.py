"""The demo (`make demo`, runs/demo): configs/shakespeare_tiny.py's corpus, teacher and schedule
with our distillation recipe, the recipe study's winner (results/distill_study/, phases 9-10).

Every student predicts a distribution per slot (model.readout=inverse_cdf, distilled by per-slot
KL to its teacher's distributions) and every noise picks its token by the Gumbel-max coupling
(model.cdf_order=gumbel, kforcing_jax/gumbel.py): the AR teacher's samples, the stage targets,
the students' tokens and the lossless verification. In the recipe study (results/distill_study/,
phase 9) this turns agreement with the teacher from 0.28 to 0.90 at k = 1 and raises it at
k = 2 and 4, and a lossless draft gains 1.8-2.2 tokens per teacher pass instead of 1.2-1.3. A
slot after the first cannot read the earlier slots' tokens off their noises under this coupling
(without help its samples are incoherent: gen-ppl 5-10x the AR samples'), so every student
with k >= 2 has token feedback (model.token_feedback, phase 10): slots 2..k read the earlier
slots' tokens through one more block (k=2 acc_total 0.42 -> 0.69, k=4 0.26 -> 0.59 in the
study).

Stages see whole 128-token rows (8 per step, the same 1,024 windows per step as the paper
recipe's 16 rows of 64): generation runs to 128 tokens, and a k = 1 student trained on 64 is 10x
further from its teacher beyond position 64 (results/distill_study/coupling.md).
"""

from configs import shakespeare_tiny


def get_config():
  c = with_gumbel_recipe(shakespeare_tiny.get_config())
  # the budget split (README "Results of the default pipeline"): stage k=2 400 steps instead of
  # 150. The k=4 student's samples inherit stage k=2's error (gen-ppl 1.30x / 1.38x the AR
  # samples' with 150, 1.11x / 1.17x with 400, seeds 0 / 1: results/demo_split/), for ~4.4 more
  # minutes of the demo's 30
  c.distill.stages = ((1, 250), (2, 400), (4, 150))
  return c


def with_gumbel_recipe(c):
  """`c` with this preset's recipe (also the quality preset's: shakespeare_quality_gumbel.py)."""
  c.model.readout = 'inverse_cdf'
  c.model.cdf_order = 'gumbel'
  c.model.token_feedback = True             # slots 2..k read the earlier slots' tokens
  c.distill.target_smoothing = 0.0          # an argmax-readout loss
  c.distill.seq_len = 128
  c.distill.batch_size = 8
  # a distributional student samples its own distribution: no frequency penalty
  c.decode.freq_penalty = {'1': 0.0, '2': 0.0, '3': 0.0, '4': 0.0}
  return c
