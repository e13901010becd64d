"""The masked diffusion LM baseline (kforcing_jax/baselines/mdlm.py): a bidirectional denoiser
on the teacher's parameters, its ELBO loss, training that learns, and the T-step decoder."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test_tiny
from kforcing_jax import data, decode, loop, models, rundir, sampling, sharding, teacher
from kforcing_jax import train_state
from kforcing_jax.baselines import mdlm
from tests.helpers.params import random_params


def tiny_model():
  config = test_tiny.get_config()
  return config, models.teacher(config)


def test_denoiser_is_bidirectional_and_the_teacher_is_not():
  _, model = tiny_model()
  params = random_params(model, 0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 256, (2, 10)), jnp.int32)
  changed = tokens.at[:, 7].set(jnp.where(tokens[:, 7] == 5, 6, 5))
  before = mdlm.denoiser_logits(model, params, tokens)
  after = mdlm.denoiser_logits(model, params, changed)
  assert before.shape == (2, 10, model.cfg.vocab_size)
  # every earlier position sees the later change
  assert np.all(np.abs(np.asarray(after - before))[:, :7].max(-1) > 1e-4)
  causal = lambda t: model.module(params)(t)[0]  # noqa: E731
  np.testing.assert_array_equal(np.asarray(causal(tokens))[:, :7],
                                np.asarray(causal(changed))[:, :7])
  assert np.abs(np.asarray(causal(tokens) - causal(changed))[:, 7:]).max() > 1e-4


def test_padding_keys_are_invisible():
  """Data padding (mask 0) is hidden from every query: its tokens change no real logit."""
  _, model = tiny_model()
  params = random_params(model, 1)
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 256, (1, 8)), jnp.int32)
  real = jnp.arange(8)[None] < 5
  a = mdlm.denoiser_logits(model, params, tokens, real)
  b = mdlm.denoiser_logits(model, params, tokens.at[:, 6].set(3), real)
  np.testing.assert_allclose(np.asarray(a)[:, :5], np.asarray(b)[:, :5], atol=1e-6)


def test_loss_is_the_weighted_masked_cross_entropy():
  """mdlm_loss = sum over masked real tokens of CE / t, over the real-token count (numpy)."""
  _, model = tiny_model()
  params = random_params(model, 2, head_scale=0.1)
  rng = np.random.default_rng(2)
  tokens = rng.integers(1, 256, (3, 8)).astype(np.int32)
  mask = np.ones((3, 8), np.float32)
  mask[2, 5:] = 0.0  # a padded row: its tail is never masked, never counted
  batch = {'tokens': jnp.asarray(tokens), 'mask': jnp.asarray(mask),
           't': jnp.asarray([0.3, 0.6, 0.9], jnp.float32),
           'r': jnp.asarray(rng.random((3, 8)), jnp.float32)}
  loss, metrics = mdlm.mdlm_loss(model, params, batch)
  masked = (np.asarray(batch['r']) < np.asarray(batch['t'])[:, None]) & (mask > 0)
  noisy = np.where(masked, model.cfg.mask_id, tokens)
  logits = np.asarray(mdlm.denoiser_logits(model, params, jnp.asarray(noisy),
                                           jnp.asarray(mask > 0)), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  expected = np.sum(nll * masked / np.asarray(batch['t'])[:, None]) / mask.sum()
  assert masked.sum() > 0 and float(metrics['tokens']) == mask.sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_stratified_times_and_step_budget():
  t = mdlm.stratified_times(np.random.default_rng(0), 8)
  assert np.all((t >= mdlm.T_EPS) & (t < 1.0))
  # one t in each 1/8th of [eps, 1)
  bins = np.floor((t - mdlm.T_EPS) / (1 - mdlm.T_EPS) * 8).astype(int)
  assert sorted(bins) == list(range(8))
  config = test_tiny.get_config()
  # (40 x 8 x 32 teacher + 60 x 8 x 32 distillation tokens) / (32 x 32) = 25
  assert mdlm.training_steps(config) == 25
  config.compare.mdlm.batch_size = 7
  assert mdlm.training_steps(config) == int(np.ceil(25600 / (7 * 32)))
  config.compare.mdlm.steps = 9
  assert mdlm.training_steps(config) == 9


def synthetic_rows(rng, rows: int, length: int) -> dict:
  """Rows repeating one random token of 1..20: every masked token is any visible one of its
  row (only a bidirectional model sees those after it), while the most frequent token is
  about 1/20 of them."""
  tokens = np.broadcast_to(rng.integers(1, 21, (rows, 1)), (rows, length))
  return {'tokens': tokens.astype(np.int32), 'mask': np.ones((rows, length), np.float32)}


def test_brief_training_reconstructs_masked_tokens():
  config, _ = tiny_model()
  config.compare.mdlm.batch_size = 16
  config.compare.mdlm.warmup_steps = 5
  config.data.seq_len = 16
  steps = 60
  layout = sharding.single_device_layout()
  program = mdlm.train_program(config, layout, steps)
  state = train_state_from(program, config.compare.mdlm.seed)
  rng = np.random.default_rng(0)
  losses = []
  for step in range(steps):
    batch = dict(synthetic_rows(rng, 16, 16), **mdlm.masking_noise(0, step, 16, 16))
    state, metrics = program.step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    losses.append(float(metrics['loss']))
  assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
  held_out = synthetic_rows(np.random.default_rng(1), 64, 16)
  held_out['r'] = np.random.default_rng(2).random((64, 16)).astype(np.float32)
  _, masked, hits = mdlm.masked_nll(program.model, state['params'],
                                    {k: jnp.asarray(v) for k, v in held_out.items()}, 0.5)
  masked, hits = np.asarray(masked), np.asarray(hits)
  accuracy = hits[masked].mean()
  most_frequent = np.bincount(held_out['tokens'][masked]).max() / masked.sum()
  assert accuracy > most_frequent + 0.3, (accuracy, most_frequent)


def train_state_from(program, seed: int):
  init = train_state.make_init_state(program.model, program.optimizer, program.abstract_state)
  return init(jax.random.key(seed))


def test_one_token_per_step_equals_a_step_by_step_reference():
  _, model = tiny_model()
  params = random_params(model, 3, head_scale=0.3)
  prompts = jnp.asarray(np.random.default_rng(3).integers(1, 256, (3, 4)), jnp.int32)
  key, gen_len, temperature = jax.random.key(5), 12, 0.8
  length = gen_len - prompts.shape[1]
  tokens, trace = mdlm.generate_mdlm(model, params, prompts, key, temperature,
                                     gen_len=gen_len, steps=length, return_trace=True)
  np.testing.assert_array_equal(np.asarray(trace), np.ones((3, length)))
  # the reference: a Python loop, one position per step, in the same random order
  order_key, sample_key = jax.random.split(key)
  ranks = np.asarray(mdlm.unmask_ranks(order_key, 3, length))
  for row in ranks:
    assert sorted(row) == list(range(length))
  assert len({tuple(row) for row in ranks}) > 1  # each row has its own order
  u = np.asarray(decode.position_uniforms(sample_key, jnp.arange(gen_len), 3))
  logits_fn = jax.jit(mdlm.denoiser_logits, static_argnums=0)
  ref = np.full((3, gen_len), model.cfg.mask_id, np.int32)
  ref[:, :4] = np.asarray(prompts)
  for step in range(length):
    logits = logits_fn(model, params, jnp.asarray(ref))
    for b in range(3):
      pos = 4 + int(np.flatnonzero(ranks[b] == step)[0])
      ref[b, pos] = int(sampling.inverse_cdf_sample(logits[b, pos], u[b, pos], temperature,
                                                    model.cfg.cdf_order))
  np.testing.assert_array_equal(np.asarray(tokens), ref)


def test_fewer_steps_fill_every_position_on_the_schedule():
  _, model = tiny_model()
  params = random_params(model, 4)
  prompts = jnp.asarray(np.random.default_rng(4).integers(1, 256, (4, 4)), jnp.int32)
  tokens, trace = mdlm.generate_mdlm(model, params, prompts, jax.random.key(1), 1.0,
                                     gen_len=12, steps=3, return_trace=True)
  # L = 8 over T = 3: floor(8(s+1)/3) - floor(8s/3) = 2, 3, 3
  np.testing.assert_array_equal(np.asarray(trace), np.tile([2, 3, 3], (4, 1)))
  tokens = np.asarray(tokens)
  np.testing.assert_array_equal(tokens[:, :4], np.asarray(prompts))
  assert np.all(tokens[:, 4:] != model.cfg.mask_id)
  assert np.all(tokens < model.cfg.num_real_tokens)
  one = mdlm.generate_mdlm(model, params, prompts, jax.random.key(1), 1.0, gen_len=12, steps=1)
  assert np.all(np.asarray(one)[:, 4:] != model.cfg.mask_id)
  for bad in (0, 9):
    with pytest.raises(ValueError, match='steps'):
      mdlm.mdlm_decode_loop(model, params, prompts, jax.random.key(1), gen_len=12, steps=bad)


@pytest.mark.slow
def test_run_from_the_teacher_end_to_end(tiny_data_config, tmp_path, monkeypatch):
  config = tiny_data_config
  config.train.steps = 10
  config.train.eval_every = 10
  config.train.checkpoint_every = 5
  config.compare.mdlm.init = 'from_teacher'
  config.compare.mdlm.steps = 8
  config.compare.mdlm.batch_size = 8
  workdir = str(tmp_path)
  teacher.run(config, workdir)
  result = mdlm.run(config, workdir)
  out_dir = rundir.baseline_dir(workdir, 'mdlm')
  stored = json.loads(open(rundir.eval_path(out_dir)).read())
  assert stored['train_steps'] == 8 and stored['init'] == 'from_teacher'
  assert stored['train_tokens'] == 8 * 8 * config.data.seq_len
  for key in ('val_elbo_nll', 'val_ppl_bound', 'val_masked_acc_0.15', 'val_masked_acc_0.5',
              'val_masked_acc_0.9', 'seconds'):
    assert np.isfinite(stored[key]), key
  layout = sharding.single_device_layout()
  tokenizer = data.load_tokenizer(config)
  export = rundir.load_export(out_dir, layout, kind='ar', tokenizer=tokenizer)
  assert export.meta['kind'] == 'mdlm' and export.meta['init'] == 'from_teacher'
  ar = rundir.load_export(rundir.teacher_dir(workdir), layout, kind='ar')
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
             for a, b in zip(jax.tree.leaves(export.params), jax.tree.leaves(ar.params)))
  prompts = jnp.full((2, 4), tokenizer.eos_id, jnp.int32)
  tokens = mdlm.generate_mdlm(export.model, export.params, prompts, jax.random.key(0),
                              gen_len=12, steps=4)
  assert np.all(np.asarray(tokens)[:, 4:] != export.model.cfg.mask_id)
  # from scratch: needs no teacher (a fresh workdir), seeded by compare.mdlm.seed
  config.compare.mdlm.init = 'scratch'
  config.compare.mdlm.steps = 2
  scratch = mdlm.run(config, str(tmp_path / 'scratch'))
  assert scratch['init'] == 'scratch' and scratch['train_steps'] == 2
  # done: a second call reads eval.json and trains nothing
  monkeypatch.setattr(loop, 'run', lambda *a, **k: pytest.fail('retrained'))
  config.compare.mdlm.init = 'from_teacher'
  config.compare.mdlm.steps = 8
  assert mdlm.run(config, workdir) == result
