"""The model-size sweep (`make sizes`, kforcing_jax/sizes.py): the demo's pipeline and recipe
at three sizes spanning 9x in parameters (64x outside the 8192-token embedding and head), plus
multi-query attention at the middle size.

Every size gets the demo's corpus, tokenizer, optimizer and distillation recipe at half the
demo's steps (teacher 200, stages 125 / 75 / 75), so that the four pipelines fit about 70
minutes of the 2-vCPU machine (the large teacher steps at ~2.9 s against the demo's ~1.4 s).
One independent evaluator (the demo's: d 64, 2 layers, seed 1) scores every size. Speed is
timed at five batch sizes, to find where each size's speed-up crosses 1.
"""

import ml_collections

from configs import shakespeare_tiny


def _size(d_model, num_layers, num_heads, num_kv_heads=0):
  return ml_collections.ConfigDict(dict(d_model=d_model, num_layers=num_layers,
                                        num_heads=num_heads, num_kv_heads=num_kv_heads))


def get_config():
  c = shakespeare_tiny.get_config()
  c.train.steps = 200
  c.train.eval_every = 100
  c.train.checkpoint_every = 50
  c.distill.stages = ((1, 125), (2, 75), (4, 75))
  c.distill.eval_every = 75
  c.distill.checkpoint_every = 25
  c.eval.batch_sizes = (1, 4, 16, 64, 256)
  # the agreement with the AR teacher's map measures what a lossless decoder would accept;
  # the lossless rows themselves (minutes per size) are the lossless issue's, not this sweep's
  c.eval.lossless_samples = 0

  c.sizes = ml_collections.ConfigDict()
  c.sizes.names = ('small', 'middle', 'middle_mqa', 'large')
  # the model block each size overrides (num_kv_heads 1: one K/V head for all query heads)
  c.sizes.small = _size(64, 2, 2)
  c.sizes.middle = _size(128, 4, 4)          # the demo's model
  c.sizes.middle_mqa = _size(128, 4, 4, num_kv_heads=1)
  c.sizes.large = _size(256, 8, 8)
  return c
