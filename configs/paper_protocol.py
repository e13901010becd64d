"""The paper's decoding protocol (config.reproduce), shared by the paper configs.

`python -m kforcing_jax.main.reproduce --config=configs/lm1b_ar.py ...` reads it; override any
field with --config.reproduce.<field>=... The task-level facts (tokenizer, total length
decode.gen_len, the authors' penalties decode.freq_penalty) stay in the dataset config.
"""

import ml_collections


def reproduce_settings(task: str) -> ml_collections.ConfigDict:
  r = ml_collections.ConfigDict()
  r.task = task                  # the authors' task name in throughput.json: lm1b | owt
  r.prefix_tokens = 6            # each prefix is cut to its first 6 tokens; shorter ones dropped
  r.prepend_bos = False          # True: [CLS] / <|endoftext|> before them (the authors: no BOS)
  r.ks = (1, 2, 3, 4)            # student K values to decode (each <= the student's k_max)
  r.batch_size = 32              # sequences per decode batch
  r.n_per_prefix = 1             # samples per prefix
  r.max_new_tokens = 0           # 0: decode.gen_len minus the prompt (LM1B 122, OWT 1018)
  r.n_warmup_batches = 2         # untimed batches before timing
  r.max_prefixes = 0             # 0: every usable prefix; N: the first N
  r.evaluator = ''               # run dir whose teacher scores gen ppl; '': the --ar model
  r.freq_penalty = ()            # (): decode.freq_penalty; else one lambda per K, or one for all
  r.seed = 0                     # batch b draws its noise from fold_in(key(seed), b)
  r.dtype = 'float32'            # compute dtype of the loaded models: float32 | bfloat16
  return r
