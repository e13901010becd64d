"""The quality preset (`make quality`, runs/quality): configs/shakespeare_quality.py's schedule
(teacher 3x, stages 2000 / 800 / 800 steps) with the demo's recipe (configs/shakespeare_gumbel.py).
The recipe includes token feedback since phase 10; results/quality_gumbel/ was made before it
(--config.model.token_feedback=False reproduces that run)."""

from configs import shakespeare_gumbel, shakespeare_quality


def get_config():
  return shakespeare_gumbel.with_gumbel_recipe(shakespeare_quality.get_config())
