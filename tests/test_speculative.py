"""Speculative decoding with a small AR draft model (kforcing_jax/baselines/speculative.py).

Claims under test:
  * 'coupled' acceptance is token for token the target's shared-noise AR sample
    (lossless.generate_ragged_ar) for ragged prompts, k = 1, 2, 4, whatever the draft;
  * 'rejection' acceptance samples the target's distribution exactly: the empirical joint of 3
    generated tokens over many rows matches the target's exact probabilities (full forwards
    over every continuation) by a chi-square test, while the same statistic rejects a wrong
    accept rule;
  * a draft equal to the target is always accepted (both rules), the histogram and iteration
    counts are consistent, and user errors fail early with a clear message.

Models are tiny random AR backbones (vocabulary 6-16, d 16-32), the target and the draft of
different sizes and seeds, so they disagree often.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from kforcing_jax import lossless, sampling
from kforcing_jax.baselines import speculative
from kforcing_jax.models import FunctionalModel
from kforcing_jax.models.backbone import BackboneConfig
from tests.helpers import params as params_lib


def tiny_model(vocab: int, d_model: int, layers: int, order: str = 'id',
               mask_id: int | None = None) -> FunctionalModel:
  cfg = BackboneConfig(vocab_size=vocab, num_real_tokens=vocab,
                       mask_id=vocab - 1 if mask_id is None else mask_id, d_model=d_model,
                       num_layers=layers, num_heads=2, cdf_order=order)
  return FunctionalModel(cfg, 'ar')


def model_pair(vocab: int, order: str = 'id'):
  """A target (d 32) and a smaller draft (d 16), random, logits of std ~1.5: one layer each,
  which is all the caches need (compiles are the cost of these tests)."""
  target, draft = tiny_model(vocab, 32, 1, order), tiny_model(vocab, 16, 1, order)
  t_params = params_lib.random_params(target, 0, head_scale=1.5 / 32 ** 0.5)
  d_params = params_lib.random_params(draft, 1, head_scale=1.5 / 16 ** 0.5)
  return target, t_params, draft, d_params


def ragged_prompts(vocab: int, lens, seed: int = 0):
  """(B, max(lens)) prompts of real tokens (the mask id, vocab-1, excluded), padded with it."""
  rng = np.random.default_rng(seed)
  lens = np.asarray(lens, np.int32)
  prompts = np.full((lens.size, lens.max()), vocab - 1, np.int32)
  for b, length in enumerate(lens):
    prompts[b, :length] = rng.integers(0, vocab - 1, length)
  return prompts, lens


def check_counts(out, prompts, lens, gen_len: int, k: int, mask_id: int):
  """The histogram, iteration count and mean of a run agree with each other and with the
  lengths; prompts are kept and no mask id is generated."""
  tokens, histogram = np.asarray(out['tokens']), np.asarray(out['accepted_histogram'])
  iterations = int(out['iterations'])
  gained = histogram @ (np.arange(k + 1) + 1)
  need = gen_len - np.asarray(lens)
  # each row gains a+1 per iteration until it reaches gen_len, overshooting by at most k
  assert need.sum() <= gained <= need.sum() + k * len(lens)
  assert float(out['mean_tokens_per_iteration']) == pytest.approx(gained / histogram.sum())
  # the loop runs until its slowest row is done: at least that row's iterations, each of
  # which gains at least 1 token and at most k+1; a row is counted once per iteration at most
  assert -(-need.max() // (k + 1)) <= iterations <= need.max()
  assert histogram.sum() <= iterations * len(lens)
  in_prompt = np.arange(gen_len)[None] < np.asarray(lens)[:, None]
  padded = np.pad(prompts, ((0, 0), (0, gen_len - prompts.shape[1])))
  np.testing.assert_array_equal(np.where(in_prompt, tokens, -1), np.where(in_prompt, padded, -1))
  assert not np.any((tokens == mask_id) & ~in_prompt), 'the mask id was generated'


# ---------------------------------------------------------------------------------- coupled

COUPLED_VOCAB, COUPLED_GEN = 16, 20
COUPLED_LENS = (2, 5, 3, 4, 2, 5)


@pytest.mark.parametrize('k', [1, 2, 4])
def test_coupled_is_the_targets_shared_noise_sample(k):
  target, t_params, draft, d_params = model_pair(COUPLED_VOCAB)
  prompts, lens = ragged_prompts(COUPLED_VOCAB, COUPLED_LENS)
  key, temperature = jax.random.key(3), 0.9
  reference = np.asarray(lossless.generate_ragged_ar(target, t_params, prompts, lens, key,
                                                     temperature, gen_len=COUPLED_GEN))
  out = speculative.generate_speculative(target, t_params, draft, d_params, prompts, lens, key,
                                         temperature, gen_len=COUPLED_GEN, k=k,
                                         acceptance='coupled')
  np.testing.assert_array_equal(np.asarray(out['tokens']), reference)
  check_counts(out, prompts, lens, COUPLED_GEN, k, COUPLED_VOCAB - 1)
  histogram = np.asarray(out['accepted_histogram'])
  # the draft is a different model: it is sometimes wrong (else this tests nothing) and,
  # sharing the noise, sometimes right
  assert histogram[0] > 0 and histogram[1:].sum() > 0, histogram


@pytest.mark.parametrize('acceptance', speculative.ACCEPTANCE_RULES)
def test_draft_equal_to_target_is_always_accepted(acceptance):
  k = 3
  target, t_params, _, _ = model_pair(COUPLED_VOCAB)
  prompts, lens = ragged_prompts(COUPLED_VOCAB, COUPLED_LENS)
  out = speculative.generate_speculative(target, t_params, target, t_params, prompts, lens,
                                         jax.random.key(5), 1.0, gen_len=COUPLED_GEN, k=k,
                                         acceptance=acceptance)
  histogram = np.asarray(out['accepted_histogram'])
  assert histogram[:k].sum() == 0 and histogram[k] > 0, histogram
  check_counts(out, prompts, lens, COUPLED_GEN, k, COUPLED_VOCAB - 1)
  assert float(out['mean_tokens_per_iteration']) == k + 1
  # every row gains k+1 per iteration: the longest run is ceil((gen_len - 2) / (k+1))
  assert int(out['iterations']) == -(-(COUPLED_GEN - min(COUPLED_LENS)) // (k + 1))


# ------------------------------------------------------------------------------- rejection
# Two prompts (lengths 2 and 3, so the rows are ragged) replicated over ROWS rows each; the
# first GENERATED tokens after each prompt are compared with the target's exact joint.

DIST_VOCAB = 6          # 5 real tokens (id 5 is the mask): 125 joint cells per prompt
DIST_PROMPTS = ((2, 4), (1, 0, 3))
GENERATED, DIST_GEN_LEN, DIST_K = 3, 6, 2
ROWS = 8192
TEMPERATURE = 0.8


def exact_joint(model, params, prompt, temperature):
  """(V-1,)*GENERATED probabilities of every continuation of `prompt`, by full forwards."""
  real = DIST_VOCAB - 1
  grid = np.stack(np.meshgrid(*[np.arange(real)] * GENERATED, indexing='ij'), -1)
  grid = grid.reshape(-1, GENERATED)
  seqs = np.concatenate([np.tile(prompt, (len(grid), 1)), grid], axis=1).astype(np.int32)
  logits, _ = jax.jit(lambda p, x: model.module(p)(x))(params, jnp.asarray(seqs))
  probs = np.asarray(sampling.probabilities(logits, temperature), np.float64)
  start = len(prompt)
  joint = np.ones(len(grid))
  for i in range(GENERATED):  # logits at position start-1+i predict token start+i
    joint *= probs[np.arange(len(grid)), start - 1 + i, grid[:, i]]
  return joint / joint.sum()


def chi_square_p(rows: np.ndarray, joint: np.ndarray) -> float:
  """p-value of the counts of rows (N, GENERATED) against `joint`, cells with expected count
  below 5 pooled into one."""
  real = DIST_VOCAB - 1
  assert rows.min() >= 0 and rows.max() < real, 'a generated token outside the real vocabulary'
  cells = np.ravel_multi_index(tuple(rows.T), (real,) * GENERATED)
  observed = np.bincount(cells, minlength=joint.size).astype(np.float64)
  expected = joint * len(rows)
  small = expected < 5
  observed = np.append(observed[~small], observed[small].sum())
  expected = np.append(expected[~small], expected[small].sum())
  return float(stats.chisquare(observed, expected).pvalue)


@functools.lru_cache(maxsize=None)
def dist_setup():
  target, t_params, draft, d_params = model_pair(DIST_VOCAB)
  width = max(map(len, DIST_PROMPTS))
  prompts = np.full((2 * ROWS, width), DIST_VOCAB - 1, np.int32)
  lens = np.zeros(2 * ROWS, np.int32)
  for i, prompt in enumerate(DIST_PROMPTS):
    prompts[i * ROWS:(i + 1) * ROWS, :len(prompt)] = prompt
    lens[i * ROWS:(i + 1) * ROWS] = len(prompt)
  joints = [exact_joint(target, t_params, np.asarray(p), TEMPERATURE) for p in DIST_PROMPTS]
  return target, t_params, draft, d_params, prompts, lens, joints


def p_values(tokens):
  *_, joints = dist_setup()
  values = []
  for i, prompt in enumerate(DIST_PROMPTS):
    rows = tokens[i * ROWS:(i + 1) * ROWS, len(prompt):len(prompt) + GENERATED]
    values.append(chi_square_p(rows, joints[i]))
  return values


def always_accept(draft_tokens, q, p, key):
  """A wrong rule: every draft kept, then a bonus token from p_k (rows follow the draft)."""
  batch, k = draft_tokens.shape
  bonus = sampling.inverse_cdf_from_probs(p[:, k], jax.random.uniform(key, (batch,)))
  return jnp.full((batch,), k, jnp.int32), jnp.concatenate([draft_tokens, bonus[:, None]], 1)


def resample_from_p(draft_tokens, q, p, key):
  """A subtler wrong rule: the right accept test, but a rejection resamples from p_a instead
  of the residual max(p_a - q_a, 0) (biased toward the draft's tokens)."""
  a, emitted = speculative.rejection_accept(draft_tokens, q, p, key)
  p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]
  u = jax.random.uniform(jax.random.fold_in(key, 1), a.shape)
  own = sampling.inverse_cdf_from_probs(p_a, u)
  return a, jnp.where(jnp.arange(p.shape[1])[None] < a[:, None], emitted, own[:, None])


@functools.partial(jax.jit, static_argnames=('target', 'draft', 'accept_rule'))
def run_with_rule(target, t_params, draft, d_params, prompts, lens, key, *, accept_rule):
  return speculative._loop(target, t_params, draft, d_params, prompts, lens, key, TEMPERATURE,
                           gen_len=DIST_GEN_LEN, k=DIST_K, acceptance='rejection',
                           accept_rule=accept_rule)


def test_rejection_sampling_is_exact_in_distribution():
  target, t_params, draft, d_params, prompts, lens, _ = dist_setup()
  out = speculative.generate_speculative(target, t_params, draft, d_params, prompts, lens,
                                         jax.random.key(11), TEMPERATURE, gen_len=DIST_GEN_LEN,
                                         k=DIST_K, acceptance='rejection')
  histogram = np.asarray(out['accepted_histogram'])
  # the draft is far from the target: rejections happen and must do real work
  assert histogram[:DIST_K].sum() > 0.3 * histogram.sum(), histogram
  assert histogram[DIST_K] > 0, histogram
  check_counts(out, prompts, lens, DIST_GEN_LEN, DIST_K, DIST_VOCAB - 1)
  values = p_values(np.asarray(out['tokens']))
  assert min(values) > 1e-3, values


@pytest.mark.parametrize('rule', [always_accept, resample_from_p])
def test_the_distribution_test_rejects_a_wrong_rule(rule):
  target, t_params, draft, d_params, prompts, lens, *_ = dist_setup()
  out = run_with_rule(target, t_params, draft, d_params, prompts, lens, jax.random.key(11),
                      accept_rule=rule)
  values = p_values(np.asarray(out['tokens']))
  assert max(values) < 1e-6, values


# ---------------------------------------------------------------------------------- errors

def test_errors_name_the_problem():
  target, t_params, draft, d_params = model_pair(COUPLED_VOCAB)
  prompts, lens = ragged_prompts(COUPLED_VOCAB, (2, 3))
  run = functools.partial(speculative.speculative_loop, target, t_params)
  key = jax.random.key(0)
  other_vocab = tiny_model(COUPLED_VOCAB + 2, 16, 1)
  with pytest.raises(ValueError, match='share one tokenizer'):
    run(other_vocab, None, prompts, lens, key, gen_len=8, k=2)
  other_mask = tiny_model(COUPLED_VOCAB, 16, 1, mask_id=0)
  with pytest.raises(ValueError, match='share one tokenizer'):
    run(other_mask, None, prompts, lens, key, gen_len=8, k=2)
  sorted_draft = tiny_model(COUPLED_VOCAB, 16, 1, order='sorted')
  with pytest.raises(ValueError, match='cdf_order'):
    run(sorted_draft, None, prompts, lens, key, gen_len=8, k=2, acceptance='coupled')
  speculative.check_models(target, sorted_draft, 'rejection')  # any exact sampler will do
  with pytest.raises(ValueError, match='acceptance='):
    run(draft, d_params, prompts, lens, key, gen_len=8, k=2, acceptance='greedy')
  with pytest.raises(ValueError, match=r'each must be in \[2, 3\]'):
    run(draft, d_params, prompts, np.asarray([1, 3]), key, gen_len=8, k=2)
  with pytest.raises(ValueError, match='at least one token'):
    run(draft, d_params, prompts, lens, key, gen_len=8, k=0)
  with pytest.raises(ValueError, match='must exceed'):
    run(draft, d_params, prompts, lens, key, gen_len=3, k=2)
