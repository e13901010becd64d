"""Paper scale, OpenWebText: 12 layers, d 768, 12 heads, GPT-2 vocabulary (+ mask 50257), seq 1024.

OpenWebText is read as a `text_files` folder: the downloaded *.txt (or *.jsonl) files in
data.manual_dir (kforcing_jax/data/text_files.py says how to lay them out), with the GPT-2
encoder.json + vocab.bpe in data.tokenizer_path. The same file carries the distillation
schedule (config.distill) used by `kforcing_jax.main.distill`.
"""

from configs import common, paper_protocol


def get_config():
  c = common.paper_scale(common.base_config())
  c.data.name = 'text_files'
  c.data.seq_len = 1024
  c.data.packing = False
  c.data.tokenizer = 'gpt2'
  c.data.tokenizer_path = 'vocab/gpt2'
  c.model.vocab_size = 50258
  c.model.mask_id = 50257
  c.decode.gen_len = 1024
  c.decode.freq_penalty = {'1': 0.0, '2': 0.3, '3': 0.5, '4': 0.5}
  # fits a v5p-8 (4 devices x 95.74 GiB; launch/compile_tpu.py): without remat a k=4 step holds
  # ~20 GB per 1024-token row, so every layer is recomputed in the backward pass and the batch
  # goes through in 8 accumulated microbatches (8 rows per device at a time): peak 20.6 GiB
  c.model.remat = 'full'
  c.train.microbatches = 8
  c.distill.microbatches = 8
  c.reproduce = paper_protocol.reproduce_settings('owt')
  return c
