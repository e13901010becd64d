"""The quality preset (configs/shakespeare_quality.py: teacher 3x, stages 2000 / 800 / 800 steps)
with the Gumbel-coupled distributional students of `make gumbel` (configs/shakespeare_gumbel.py):
`make quality-gumbel`, runs/quality_gumbel/. The recipe includes token feedback since phase 10;
results/quality_gumbel/ was made before it (--config.model.token_feedback=False reproduces
that run)."""

from configs import shakespeare_gumbel, shakespeare_quality


def get_config():
  return shakespeare_gumbel.with_gumbel_recipe(shakespeare_quality.get_config())
