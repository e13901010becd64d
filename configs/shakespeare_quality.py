"""The quality schedule with the paper's recipe (`make quality-paper-recipe`): the demo's corpus
and model with configs/shakespeare_tiny.py's argmax students, trained longer. `make quality` runs
this schedule with our recipe (configs/shakespeare_quality_gumbel.py).

The demo size (configs/shakespeare_tiny.py) is sized to finish in 30 minutes on the 2-vCPU machine;
this preset gives the teacher 3x and the distillation stages 5-8x its steps, sized for at most
three hours on the same machine. Measured (2026-12-04, README "The quality preset"): 1 h 29 min
end to end (teacher 26 min, stages 22 / 13 / 20 min, evaluator and evaluation ~9 min).
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
