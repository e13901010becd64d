"""The quality preset (configs/shakespeare_quality.py: teacher 3x, stages 2000 / 800 / 800 steps)
with the Gumbel-coupled distributional students of `make gumbel` (configs/shakespeare_gumbel.py):
`make quality-gumbel`, runs/quality_gumbel/."""

from configs import shakespeare_gumbel, shakespeare_quality


def get_config():
  c = shakespeare_quality.get_config()
  recipe = shakespeare_gumbel.get_config()
  c.model.readout = recipe.model.readout
  c.model.cdf_order = recipe.model.cdf_order
  c.distill.target_smoothing = recipe.distill.target_smoothing
  c.distill.seq_len = recipe.distill.seq_len
  c.distill.batch_size = recipe.distill.batch_size
  c.decode.freq_penalty = dict(recipe.decode.freq_penalty)
  return c
