"""Defaults shared by every experiment config. Each configs/<name>.py overrides what differs."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # (data, fsdp, tensor); one -1 fills the remaining devices. One CPU is (1, 1, 1).
  c.mesh_shape = (-1, 1, 1)
  # logical axis name -> mesh axes (kforcing_jax/sharding.py explains the rules table)
  c.sharding_rules = (
      ('batch', ('data', 'fsdp')),
      ('vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('mlp', 'tensor'),
      ('head_dim', None),
      ('length', None),
      ('cache_length', None),
  )

  c.data = ml_collections.ConfigDict()
  c.data.name = 'shakespeare'        # shakespeare | lm1b | text_files (owt: its old name)
  c.data.data_dir = 'data'           # TFDS data_dir (local path or gs://...)
  c.data.manual_dir = ''             # text_files: the folder of *.txt / *.jsonl documents
  c.data.seq_len = 128
  c.data.packing = True              # True: concatenate documents with EOS and cut rows;
                                     # False: one document per row, padded, loss-masked
  c.data.tokenizer = 'bpe'           # bpe (trained on the train split) | bert | gpt2
  c.data.tokenizer_path = ''         # bert: vocab.txt; gpt2: dir with encoder.json + vocab.bpe
  c.data.vocab_size = 8192           # bpe: size to train

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 8192          # must equal the tokenizer's size (checked at start-up)
  c.model.pad_vocab_to_multiple_of = 1
  c.model.mask_id = 0
  c.model.d_model = 256
  c.model.num_layers = 4
  c.model.num_heads = 4
  # grouped-query attention: K/V heads shared by num_heads / num_kv_heads query heads each
  # (0 = num_heads: multi-head attention, the paper's)
  c.model.num_kv_heads = 0
  c.model.mlp_ratio = 4
  c.model.dtype = 'float32'          # compute dtype: float32 | bfloat16 (params stay float32)
  c.model.remat = 'none'             # training forwards: none | full | dots (models/backbone.py)
  # the noise -> token map shared by AR decoding, distillation targets, noise inversion and the
  # agreement metrics: id (the authors') | sorted (descending probability); sampling.py
  c.model.cdf_order = 'id'
  c.model.noise_scale = 1.0          # student noise encoder reads phi(noise_scale * u)
  # a student's slot logits -> token: argmax (the paper's; the released checkpoints) |
  # inverse_cdf (sample the slot's distribution with its own noise; sampling.READOUTS)
  c.model.readout = 'argmax'
  # slots 2..k read the earlier slots' tokens through one more block (models/pflm.py; ours,
  # not the paper's student: the released checkpoints have no such block)
  c.model.token_feedback = False

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32            # global batch
  c.train.microbatches = 1           # gradient accumulation: slices of the batch per step
  c.train.steps = 1000
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 50
  c.train.end_learning_rate_ratio = 0.1
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.grad_clip = 1.0
  c.train.log_every = 10
  c.train.eval_every = 200
  c.train.eval_batches = 8
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 2
  c.train.profile_steps = 0          # > 0: profiler trace of that many steps after the first

  c.distill = ml_collections.ConfigDict()
  c.distill.stages = ((1, 300), (2, 300), (4, 300))  # (k, steps): each stage doubles k
  c.distill.batch_size = 32
  c.distill.microbatches = 1
  c.distill.seq_len = 0              # windows per row: the first seq_len tokens (0 = data.seq_len)
  c.distill.learning_rate = 1e-3
  c.distill.warmup_steps = 20
  c.distill.end_learning_rate_ratio = 0.1
  c.distill.weight_decay = 0.0
  c.distill.b1 = 0.9
  c.distill.b2 = 0.95
  c.distill.eps = 1e-8
  c.distill.grad_clip = 1.0
  c.distill.tau_range = (1.0, 1.0)   # tau ~ U[lo, hi] per sequence; (1, 1) = fixed 1.0
  c.distill.data_weight = 0.0        # weight of the noise-inversion data term (0 = off)
  # stage k=1 soft targets: the teacher's mass in [u - h, u + h], h falling linearly from
  # target_smoothing to 0 at smoothing_decay of the stage (distill.soft_ar_targets); 0 = hard
  c.distill.target_smoothing = 0.0
  c.distill.smoothing_decay = 0.8
  # stages k >= 2: weight of the cross-entropy to the frozen teacher's softmax along its
  # rollout, mixed with the hard-target loss (distill.distill_loss; 0 = hard targets only)
  c.distill.logit_matching = 0.0
  c.distill.later_learning_rate = 0.0  # peak lr of stages k >= 2 (0 = distill.learning_rate)
  # stages k >= 2: loss weight of the k/2 slots inherited from the previous stage vs 1 for the
  # new ones (distill.slot_weights; 1 = plain mean over slots)
  c.distill.inherited_slot_weight = 1.0
  # decay of the students' parameter EMA (train_state.param_average), which each stage then
  # evaluates and exports instead of its last parameters (0 = off: the last parameters)
  c.distill.ema_decay = 0.0
  c.distill.log_every = 10
  c.distill.eval_every = 100
  c.distill.eval_batches = 4
  c.distill.checkpoint_every = 100
  c.distill.keep_checkpoints = 2
  c.distill.profile_steps = 0        # per stage, into <stage dir>/profile

  c.decode = ml_collections.ConfigDict()
  c.decode.prefix_len = 6
  c.decode.gen_len = 128             # total length, prefix included
  c.decode.temperature = 1.0
  # frequency penalty lambda per decode k (METHOD.md s.3); keys are strings for ml_collections
  c.decode.freq_penalty = {'1': 0.0, '2': 0.2, '3': 0.4, '4': 0.5}
  # how a student decodes in generate and reproduce (each has --mode to override it):
  # lossy (its own k-token decoding) | lossless (it drafts, the AR teacher verifies with the
  # same noise: the output is the teacher's sample; kforcing_jax/lossless.py). evaluate reports
  # both; lossless gives its rows all eval.num_samples prompts (README "Lossless decoding")
  c.decode.mode = 'lossy'

  c.eval = ml_collections.ConfigDict()
  c.eval.split = 'test'              # held-out split the prompts come from
  c.eval.num_samples = 32            # completions per model for the quality metrics
  c.eval.batch_sizes = (1, 4, 16, 64, 256)
  c.eval.repeats = 3                 # timed repeats per (model, batch); the median is reported
  # a second AR model's run dir (its teacher/params), or '' for the pipeline's own evaluator
  # (<workdir>/evaluator, trained from config.eval.evaluator) when there is one
  c.eval.evaluator_workdir = ''
  # the independent evaluator the pipeline trains: the run's data and config.train, another
  # seed, a smaller model and its own step count (steps = 0: none). Sized for the demo machine.
  c.eval.evaluator = ml_collections.ConfigDict()
  c.eval.evaluator.seed = 1
  c.eval.evaluator.d_model = 64
  c.eval.evaluator.num_layers = 2
  c.eval.evaluator.num_heads = 2
  c.eval.evaluator.steps = 150       # ~2 min on the 2-vCPU demo machine (8192-token head)
  # held-out batches (distill.batch_size rows of distill.seq_len) of the agreement with the AR
  # teacher's own noise -> token map (agreement.py)
  c.eval.agreement_batches = 8
  # lossless rows of evaluate (decode.mode lossy): quality over this many of the prompts
  # (0 = no lossless rows), speed vs AR at these batch sizes (the speed-quality frontier is
  # drawn at those also in eval.batch_sizes)
  c.eval.lossless_samples = 32
  c.eval.lossless_batch_sizes = (1, 16, 256)

  # `make compare` (kforcing_jax/compare.py): the decoding accelerators K-Forcing is compared
  # with, each trained in <workdir>/baselines/<name>/ (rundir.baseline_dir). Budgets are in
  # tokens seen: steps = 0 means "the same as the K-Forcing distillation" (sum of the stages'
  # steps x distill.batch_size x distill.seq_len), converted to this block's batch and length.
  c.compare = ml_collections.ConfigDict()
  c.compare.prompts = 64             # completions per method and setting (quality)
  c.compare.batch_sizes = (1, 16, 256)
  # speculative decoding's draft: a smaller AR model (kforcing_jax/baselines/speculative.py)
  # trained like the teacher on the corpus (config.train's optimizer), its own seed
  c.compare.draft = ml_collections.ConfigDict()
  c.compare.draft.seed = 2
  c.compare.draft.d_model = 64
  c.compare.draft.num_layers = 2
  c.compare.draft.num_heads = 2
  c.compare.draft.batch_size = 8
  c.compare.draft.steps = 0
  c.compare.draft.ks = (2, 4)        # draft lengths decoded
  # independent heads (Medusa style, kforcing_jax/baselines/heads.py): k-1 extra heads on the
  # frozen teacher, head i predicting token t+1+i from the hidden state at t, trained on the
  # teacher's own samples (a pool of AR completions of corpus prompts, sampled once)
  c.compare.heads = ml_collections.ConfigDict()
  c.compare.heads.seed = 3
  c.compare.heads.ks = (2, 4)        # tokens per pass: the teacher's head + k-1 extra heads
  c.compare.heads.batch_size = 16
  c.compare.heads.seq_len = 64
  c.compare.heads.steps = 0
  c.compare.heads.learning_rate = 1e-3
  c.compare.heads.warmup_steps = 20
  c.compare.heads.pool_samples = 512  # teacher completions sampled for training
  # masked diffusion LM (absorbing state, MDLM-style; kforcing_jax/baselines/mdlm.py): the
  # teacher's architecture with bidirectional attention, trained on the corpus
  c.compare.mdlm = ml_collections.ConfigDict()
  c.compare.mdlm.seed = 4
  # scratch | from_teacher (start from the AR teacher's weights): from the teacher reaches a
  # held-out ELBO ppl bound of 214 against 381 from scratch at the same budget
  # (results/compare/mdlm_init.md)
  c.compare.mdlm.init = 'from_teacher'
  c.compare.mdlm.batch_size = 32
  c.compare.mdlm.learning_rate = 3e-3
  c.compare.mdlm.warmup_steps = 30
  # 0: the teacher's + the distillation's tokens (train.steps x train.batch_size x
  # data.seq_len + the distillation's), at mdlm.batch_size rows of data.seq_len
  c.compare.mdlm.steps = 0
  c.compare.mdlm.denoising_steps = (32, 64, 122)  # T swept at decode (clipped to gen tokens)
  return c


def paper_scale(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper's backbone (MDLM's AR baseline: 12 layers, d 768, 12 heads) and a TPU-pod
  training schedule; the dataset-specific configs set data, vocabulary and lengths."""
  c.model.pad_vocab_to_multiple_of = 128
  c.model.d_model = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.dtype = 'bfloat16'
  # the authors' sampler and noise encoder: what their released checkpoints learned
  c.model.cdf_order = 'id'
  c.model.noise_scale = 1.0
  c.train.batch_size = 512
  c.train.steps = 1_000_000
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2500
  c.train.weight_decay = 0.0
  c.train.eval_every = 10_000
  c.train.eval_batches = 64
  c.train.checkpoint_every = 10_000
  # distillation: not published; a schedule in the spirit of the paper, to be measured
  c.distill.stages = ((1, 50_000), (2, 50_000), (4, 50_000))
  c.distill.batch_size = 256
  c.distill.learning_rate = 1e-4
  c.distill.warmup_steps = 1000
  c.distill.eval_every = 5000
  c.distill.eval_batches = 32
  c.distill.checkpoint_every = 5000
  c.distill.log_every = 100
  c.train.log_every = 100
  c.eval.num_samples = 256
  # an independent evaluator at this scale is its own training run: point
  # eval.evaluator_workdir at it (the pipeline trains none here)
  c.eval.evaluator.steps = 0
  return c
