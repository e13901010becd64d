"""Tiny model and schedule for unit tests: a 2-layer d=64 model that steps in ~20 ms."""

from configs import common


def get_config():
  c = common.base_config()
  c.data.seq_len = 32
  c.data.vocab_size = 256
  c.model.vocab_size = 256
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.train.batch_size = 8
  c.train.steps = 40
  c.train.warmup_steps = 5
  c.train.learning_rate = 3e-3
  c.train.log_every = 5
  c.train.eval_every = 20
  c.train.eval_batches = 2
  c.train.checkpoint_every = 10
  c.distill.stages = ((1, 20), (2, 20), (4, 20))
  c.distill.batch_size = 8
  c.distill.warmup_steps = 2
  c.distill.log_every = 5
  c.distill.eval_every = 20
  c.distill.eval_batches = 1
  c.distill.checkpoint_every = 10
  c.decode.gen_len = 24
  return c
