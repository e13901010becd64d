"""Paper scale, LM1B: 12 layers, d 768, 12 heads, bert-base-uncased vocabulary, seq 128.

Needs TFDS lm1b under data.data_dir (e.g. gs://bucket/tensorflow_datasets) and the bert
vocab.txt at data.tokenizer_path. Runs where the hardware and data exist (a TPU slice).
"""

from configs import common


def get_config():
  c = common.base_config()
  c.data.name = 'lm1b'
  c.data.seq_len = 128
  c.data.packing = False
  c.data.tokenizer = 'bert'
  c.data.tokenizer_path = 'vocab/bert-base-uncased/vocab.txt'
  c.model.vocab_size = 30522
  c.model.pad_vocab_to_multiple_of = 128
  c.model.mask_id = 103
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
  c.decode.gen_len = 128
  return c
