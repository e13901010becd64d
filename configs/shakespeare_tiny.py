"""The default: the Shakespeare + Milton corpus on a 2-vCPU laptop-class machine.

Sized so that data preparation plus teacher training finish in under 10 minutes there.
"""

from configs import common


def get_config():
  c = common.base_config()
  c.data.seq_len = 128
  c.model.d_model = 256
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.train.batch_size = 32
  c.train.steps = 300
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 30
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  return c
