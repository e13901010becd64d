"""Paper scale, LM1B: 12 layers, d 768, 12 heads, bert-base-uncased vocabulary, seq 128.

Needs TFDS lm1b under data.data_dir (e.g. gs://bucket/tensorflow_datasets) and the bert
vocab.txt at data.tokenizer_path. Runs where the hardware and data exist (a TPU slice). The
same file carries the distillation schedule (config.distill) used by `kforcing_jax.main.distill`.
"""

from configs import common, paper_protocol


def get_config():
  c = common.paper_scale(common.base_config())
  c.data.name = 'lm1b'
  c.data.seq_len = 128
  c.data.packing = False
  c.data.tokenizer = 'bert'
  c.data.tokenizer_path = 'vocab/bert-base-uncased/vocab.txt'
  c.model.vocab_size = 30522
  c.model.mask_id = 103
  c.decode.gen_len = 128
  c.decode.freq_penalty = {'1': 0.0, '2': 0.2, '3': 0.4, '4': 0.5}
  # a v5e-16 device has 15.75 GiB: recomputing each layer in the backward pass keeps the
  # 16-row-per-device k=4 step well inside it without microbatching (launch/compile_tpu.py)
  c.model.remat = 'full'
  c.reproduce = paper_protocol.reproduce_settings('lm1b')
  return c
