"""Paper scale, OpenWebText: 12 layers, d 768, 12 heads, GPT-2 vocabulary (+ mask 50257), seq 1024.

Needs the OpenWebText files prepared by the `owt` TFDS builder from data.manual_dir, and the
GPT-2 encoder.json + vocab.bpe in data.tokenizer_path.
"""

from configs import common


def get_config():
  c = common.base_config()
  c.data.name = 'owt'
  c.data.seq_len = 1024
  c.data.packing = False
  c.data.tokenizer = 'gpt2'
  c.data.tokenizer_path = 'vocab/gpt2'
  c.model.vocab_size = 50258
  c.model.pad_vocab_to_multiple_of = 128
  c.model.mask_id = 50257
  c.model.d_model = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.dtype = 'bfloat16'
  c.train.batch_size = 512
  c.train.steps = 1_000_000
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2500
  c.train.weight_decay = 0.0
  c.train.eval_every = 10_000
  c.train.eval_batches = 64
  c.train.checkpoint_every = 10_000
  c.decode.gen_len = 1024
  return c
