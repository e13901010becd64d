"""The quality preset (`make quality`): the demo's corpus, model and recipe, trained longer.

The demo (configs/shakespeare_tiny.py) is sized to finish in 30 minutes on the 2-vCPU machine;
this preset gives the teacher 3x and the distillation stages 5-8x its steps, sized for about two
hours on the same machine (at the demo's measured step times: teacher ~1.3 s/step, stages
~0.65 / 1.3 / 1.8 s/step for k = 1 / 2 / 4) and at most three.
"""

from configs import shakespeare_tiny


def get_config():
  c = shakespeare_tiny.get_config()
  c.train.steps = 1200
  c.train.eval_every = 400
  c.train.checkpoint_every = 200
  c.distill.stages = ((1, 2000), (2, 800), (4, 800))
  c.distill.eval_every = 400
  c.distill.checkpoint_every = 200
  c.eval.evaluator.steps = 400
  return c
