"""Independent heads on the frozen teacher (kforcing_jax/baselines/heads.py).

Random tiny teachers (tests/helpers/params.py). The decoders' teacher is "peaked" (as in
tests/test_lossless.py): its head bias gives one token about half the mass, so heads near their
zero init (the teacher's next-token head) draft from a distribution close to the teacher's
and, with the shared noise, are often accepted: acceptance lengths vary over 0..k-1. The
training test's teacher has a larger head (context-dependent samples with structure to learn).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test_tiny
from kforcing_jax import decode, lossless, models, rundir, sharding, teacher as teacher_lib
from kforcing_jax import train_state
from kforcing_jax.baselines import heads as heads_lib
from tests.helpers import params as params_lib

BATCH = 4
GEN_LEN = 40
PROMPT_LENS = (3, 6, 9, 6)
PEAK_TOKEN, PEAK_BIAS, HEAD_SCALE = 1, 6.0, 0.1
HEADS_SCALE = 0.2            # random heads: std HEADS_SCALE / sqrt(D) per weight


def tiny_config():
  c = test_tiny.get_config()
  c.compare.heads.batch_size = 8
  c.compare.heads.seq_len = 24
  c.compare.heads.learning_rate = 1e-2
  c.compare.heads.warmup_steps = 2
  return c


@pytest.fixture(scope='module')
def teacher():
  model = models.teacher(tiny_config())
  params = params_lib.random_params(model, 0, head_scale=HEAD_SCALE)
  params['head_bias'] = params['head_bias'].at[PEAK_TOKEN].set(PEAK_BIAS)
  return model, params


@pytest.fixture(scope='module')
def sampler():
  model = models.teacher(tiny_config())
  return model, params_lib.random_params(model, 0, head_scale=0.5)


def random_heads(model, num_heads: int, seed: int = 1, scale: float = HEADS_SCALE):
  heads = heads_lib.HeadsModel(model.cfg, num_heads)
  rng = np.random.default_rng(seed)
  d = model.cfg.d_model
  return heads, {'w': jnp.asarray(scale * rng.standard_normal((num_heads, d, d)) / np.sqrt(d),
                                  jnp.float32),
                 'b': jnp.zeros((num_heads, d), jnp.float32)}


def ragged_prompts(seed: int = 0):
  rng = np.random.default_rng(seed)
  lens = np.asarray(PROMPT_LENS, np.int32)
  return rng.integers(2, 256, (BATCH, max(PROMPT_LENS))).astype(np.int32), lens


def test_heads_logits_shapes_and_zero_init_is_the_teachers_head(teacher):
  model, params = teacher
  heads = heads_lib.HeadsModel(model.cfg, 3)
  zero = heads.init(jax.random.key(0))
  assert jax.tree.map(jnp.shape, zero) == {'w': (3, 64, 64), 'b': (3, 64)}
  assert heads.num_params() == 3 * 64 * 64 + 3 * 64
  abstract = sharding.single_device_layout().abstract_params(heads)
  assert abstract['w'].shape == (3, 64, 64)
  tokens = jnp.asarray(np.random.default_rng(0).integers(2, 256, (2, 10)), jnp.int32)
  backbone = model.module(params)
  hidden = heads_lib.teacher_hidden(backbone, tokens)
  logits = heads_lib.heads_logits(backbone, zero, hidden)
  assert logits.shape == (2, 10, 3, model.cfg.vocab_size)
  own, _ = backbone(tokens)
  for i in range(3):
    np.testing.assert_allclose(logits[:, :, i], own, atol=1e-4)
  # non-zero heads differ from the teacher's head
  _, rand = random_heads(model, 3, scale=1.0)
  assert not np.allclose(heads_lib.heads_logits(backbone, rand, hidden)[:, :, 0], own, atol=1e-2)


def test_target_weights_cover_generated_targets_only():
  w = np.asarray(heads_lib.target_weights(seq_len=8, num_heads=2, prompt_len=3))
  # head i at t targets t+1+i: head 1 -> t+2 in [3, 8): t in 1..5; head 2 -> t+3: t in 0..4
  np.testing.assert_array_equal(w[:, 0], [0, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(w[:, 1], [1, 1, 1, 1, 1, 0, 0, 0])


def test_training_lowers_the_heads_loss(sampler):
  model, params = sampler
  config = tiny_config()
  hc = config.compare.heads
  layout = sharding.single_device_layout()
  prompts = jnp.asarray(np.random.default_rng(1).integers(2, 256, (64, 6)), jnp.int32)
  pool = np.asarray(decode.generate_ar(model, params, prompts, jax.random.key(2), 1.0,
                                       gen_len=hc.seq_len))
  steps = 40
  program = heads_lib.train_program(config, layout, model, 3, steps)
  state = train_state.make_init_state(program.model, program.optimizer,
                                      program.abstract_state)(jax.random.key(0))
  batch_at = heads_lib.pool_batches(pool, hc.batch_size, hc.seed)
  evaluate = heads_lib.make_eval_fn(model, params, layout, pool, 32, config.decode.prefix_len)
  before = evaluate(state)
  losses = []
  for step in range(steps):
    state, metrics = program.step(state, layout.global_batch(batch_at(step)), params)
    losses.append(float(metrics['loss']))
  after = evaluate(state)
  print(f'\nheads loss {before["val_loss"]:.3f} -> {after["val_loss"]:.3f}; per head acc '
        f'{before["val_acc_1"]:.3f},{before["val_acc_2"]:.3f} -> '
        f'{after["val_acc_1"]:.3f},{after["val_acc_2"]:.3f}')
  assert np.isfinite(losses).all()
  assert after['val_loss'] < 0.85 * before['val_loss']
  assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])
  assert set(metrics) >= {'loss_1', 'loss_2', 'acc_1', 'acc_2', 'tokens', 'grad_norm'}
  # the data order is a pure function of the step (resume), and covers the rows
  np.testing.assert_array_equal(batch_at(7)['tokens'], batch_at(7)['tokens'])
  seen = np.concatenate([batch_at(s)['tokens'] for s in range(8)])
  assert len({r.tobytes() for r in seen}) == 64


def test_unverified_decoding_k1_is_the_ar_decoder(teacher):
  model, params = teacher
  heads, hp = random_heads(model, 3)
  prompts = jnp.asarray(np.random.default_rng(3).integers(2, 256, (BATCH, 6)), jnp.int32)
  key = jax.random.key(5)
  ref = decode.generate_ar(model, params, prompts, key, 1.0, gen_len=GEN_LEN)
  out = heads_lib.generate_heads(model, params, heads, hp, prompts, key, 1.0, gen_len=GEN_LEN,
                                 k=1)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  for k in (2, 4):
    out = np.asarray(heads_lib.generate_heads(model, params, heads, hp, prompts, key, 1.0,
                                              gen_len=GEN_LEN, k=k))
    assert out.shape == (BATCH, GEN_LEN)
    np.testing.assert_array_equal(out[:, :6], np.asarray(prompts))
    assert not np.any(out == model.cfg.mask_id)
    assert np.all((out >= 0) & (out < model.cfg.num_real_tokens))
    # slot 0 of the first pass is the teacher's own sample for the same noise
    np.testing.assert_array_equal(out[:, 6], np.asarray(ref)[:, 6])
  with pytest.raises(ValueError, match='tokens per pass'):
    heads_lib.heads_decode_loop(model, params, heads, hp, prompts, key, gen_len=GEN_LEN, k=5)


@pytest.mark.parametrize('k', [2, 4])
def test_verified_decoding_is_the_ragged_ar_sample(teacher, k):
  model, params = teacher
  heads, hp = random_heads(model, 3)
  prompts, lens = ragged_prompts(k)
  key = jax.random.key(10 + k)
  ref = np.asarray(lossless.generate_ragged_ar(model, params, prompts, lens, key, 1.0,
                                               gen_len=GEN_LEN))
  out = heads_lib.generate_heads_verified(model, params, heads, hp, prompts, lens, key, 1.0,
                                          gen_len=GEN_LEN, k=k)
  tokens, hist = np.asarray(out['tokens']), np.asarray(out['accepted_histogram'])
  print(f'\nk={k}: histogram {hist}, passes {int(out["iterations"])}, mean tokens/pass '
        f'{float(out["mean_tokens_per_iteration"]):.2f}')
  # exact, as in tests/test_lossless.py a different window width could only flip a token
  # whose u lies within float rounding of a CDF edge (never seen at this size)
  np.testing.assert_array_equal(tokens, ref)
  assert hist.shape == (k,)
  # every (row, pass) pair gains a + 1 tokens: the histogram accounts for every generated token
  gained = int(np.sum(hist * (np.arange(k) + 1)))
  needed = int(np.sum(GEN_LEN - lens))
  assert needed <= gained < needed + BATCH * k
  assert float(out['mean_tokens_per_iteration']) == pytest.approx(gained / hist.sum(), rel=1e-6)
  assert int(out['iterations']) >= hist.sum() / BATCH
  assert np.all(hist > 0), f'some accepted length 0..{k - 1} never happened: {hist}'
  assert float(out['mean_tokens_per_iteration']) > 1.3


@pytest.mark.slow
def test_run_end_to_end_and_load(tiny_data_config, tmp_path):
  config = tiny_data_config
  config.train.steps = 4
  config.train.eval_every = 4
  config.train.checkpoint_every = 4
  hc = config.compare.heads
  hc.steps = 6
  hc.pool_samples = 16
  hc.seq_len = 16
  hc.batch_size = 4
  config.distill.log_every = 2
  config.distill.eval_every = 3
  config.distill.checkpoint_every = 3
  workdir = str(tmp_path)
  teacher_lib.run(config, workdir)
  result = heads_lib.run(config, workdir, 2)
  directory = rundir.baseline_dir(workdir, 'heads_k2')
  assert (tmp_path / 'baselines' / 'heads_k2' / 'eval.json').exists()
  assert (tmp_path / 'baselines' / 'heads_k2' / heads_lib.POOL_FILE).exists()
  assert result['steps'] == 6 and result['k'] == 2 and result['held_out'] == 2
  assert result['tokens'] == 6 * 4 * 16
  assert 0.0 <= result['val_acc_1'] <= 1.0
  layout = sharding.single_device_layout()
  heads, params = heads_lib.load(config, workdir, 2, layout)
  assert heads.num_heads == 1 and params['w'].shape == (1, 64, 64)
  assert float(jnp.abs(params['w']).sum()) > 0  # trained, not the zero init
  assert rundir.export_meta(directory)['kind'] == 'heads'
  again = heads_lib.run(config, workdir, 2)  # skips: eval.json exists
  assert again == result
  # the saved pool is reused, and refused for another teacher
  teacher = rundir.load_export(rundir.teacher_dir(workdir), layout, kind='ar', config=config)
  pool = heads_lib.load_or_sample_pool(config, directory, teacher.model, teacher.params, layout,
                                       None)
  assert pool.shape == (16, 16)
  np.testing.assert_array_equal(heads_lib.read_pool(directory)[0], pool)
  other = jax.tree.map(lambda x: x + 1.0, teacher.params)
  with pytest.raises(ValueError, match='different teacher'):
    heads_lib.load_or_sample_pool(config, directory, teacher.model, other, layout, None)
  # a smaller pool is the prefix of a larger one (benchmarks/baseline_settings scores every
  # pool size on the largest pool's held-out rows, outside all of their training rows)
  pools = {}
  for n in (heads_lib.POOL_CHUNK + 3, 2 * heads_lib.POOL_CHUNK + 5):
    hc.pool_samples = n
    pools[n] = heads_lib.sample_pool(config, teacher.model, teacher.params, layout)
  small, large = sorted(pools)
  np.testing.assert_array_equal(pools[large][:small], pools[small])
  chunk = heads_lib.POOL_CHUNK  # each chunk its own prompts and noise: no repeated samples
  assert not np.array_equal(pools[large][chunk:2 * chunk], pools[large][:chunk])
