"""Lossless k-token decoding (kforcing_jax/lossless.py) against decode's AR shared-noise sampler.

The claim under test: whatever the student drafts, the output is the AR teacher's inverse-CDF
sample for u = position_uniforms(key, j) at every position j, token for token - for k = 1..4,
several seeds and temperatures, and batch rows with different prompt lengths in one call.

The reference is decode.generate_ar, which moves all rows together and so cannot take ragged
prompts: row b's reference comes from a run of the same batch size in which row b holds its own
prompt (rows of one prompt length share a run). Row b's noise is then the same
uniform(fold_in(key, j))[b] in both decoders.

Rounding: the verify pass computes a position's logits inside a (k+1)-slot window, the AR loop
in a 1-slot step, so their float32 logits may differ in the last bits. A token could then differ
only where u lies within rounding of an edge of the teacher's CDF. The comparison runs up to a
row's first mismatch and requires that mismatch (if any) to sit within EDGE_TOL of an edge;
the count of such positions is reported (none so far).

Students: a random student from a random teacher rarely agrees, which exercises rejection only.
The "peaked" pair makes acceptance vary over 0..k: the teacher's head bias gives one token most
of the mass (how much still depends on the context, through the random head), the student
shares the backbone and so drafts that token almost always; the teacher's u picks it with
probability ~p, so accepted lengths are roughly geometric.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test_tiny
from kforcing_jax import decode, lossless, models, sampling
from tests.helpers import params as params_lib
from tests.test_decode import with_noise_sensitive_hints

BATCH = 6
GEN_LEN = 200
PROMPT_LENS = (5, 9, 13)     # >= k+1 for k <= 4; three lengths in every batch
HEAD_SCALE = 0.1             # logits of std ~1: diverse samples
PEAK_TOKEN, PEAK_BIAS = 1, 6.0
EDGE_TOL = 1e-5              # a mismatch must have u this close to an edge of the teacher CDF
TRACES = collections.Counter()


def tiny_config(order: str = 'id'):
  c = test_tiny.get_config()
  c.model.cdf_order = order
  return c


def make_models(order: str = 'id', peaked: bool = True):
  teacher = models.teacher(tiny_config(order))
  student = models.student(tiny_config(order), 4)
  t_params = params_lib.random_params(teacher, 0, head_scale=HEAD_SCALE)
  if peaked:
    t_params['head_bias'] = t_params['head_bias'].at[PEAK_TOKEN].set(PEAK_BIAS)
  s_params = params_lib.random_params(student, 1, head_scale=HEAD_SCALE)
  if not peaked:  # drafts that follow the noise and the context, so a cache error shows
    s_params = with_noise_sensitive_hints(s_params)
  if peaked:
    s_params['backbone'] = jax.tree.map(jnp.copy, t_params)
  return teacher, t_params, student, s_params


@functools.partial(jax.jit, static_argnames=('teacher', 'student', 'k', 'accept_offset'))
def counted_lossless(teacher, t_params, student, s_params, prompts, prompt_lens, key,
                     temperature, *, k, accept_offset=0):
  """lossless.verify_loop under jit (with the drafts), counting traces per static setting."""
  TRACES[(teacher.cfg.cdf_order, k, accept_offset)] += 1
  return lossless.verify_loop(teacher, t_params, student, s_params, prompts, prompt_lens, key,
                              temperature, gen_len=GEN_LEN, k=k, accept_offset=accept_offset,
                              return_drafts=True)


@functools.partial(jax.jit, static_argnames=('model',))
def student_forward_argmax(model, params, tokens, u, tau):
  logits, _ = model.module(params)(tokens, u, tau)
  return jnp.argmax(logits, axis=-1)


def ragged_prompts(seed: int):
  """(BATCH, max length) prompts, padded with random tokens the loop must ignore, and their
  lengths: every length of PROMPT_LENS present, in a seed-dependent order."""
  rng = np.random.default_rng(seed)
  lens = rng.permutation(np.resize(PROMPT_LENS, BATCH)).astype(np.int32)
  prompts = rng.integers(2, 256, (BATCH, max(PROMPT_LENS))).astype(np.int32)
  return prompts, lens


def ar_reference(teacher, params, prompts, lens, key, temperature):
  """decode.generate_ar per prompt length (row b from a batch in which it has its own prompt)
  -> tokens (B, GEN_LEN) and each position's distance of u to the nearest CDF edge."""
  tokens = np.zeros((BATCH, GEN_LEN), np.int32)
  logits = np.zeros((BATCH, GEN_LEN, teacher.cfg.vocab_size), np.float32)
  for length in np.unique(lens):
    out, rows = decode.generate_ar(teacher, params, jnp.asarray(prompts[:, :length]), key,
                                   temperature, gen_len=GEN_LEN, return_logits=True)
    tokens[lens == length] = np.asarray(out)[lens == length]
    logits[lens == length] = np.asarray(rows)[lens == length]
  u = decode.position_uniforms(key, jnp.arange(GEN_LEN), BATCH)
  probs = sampling.probabilities(jnp.asarray(logits), jnp.full((BATCH, 1), temperature))
  lo, hi = sampling.token_cdf_interval(probs, jnp.asarray(tokens), teacher.cfg.cdf_order)
  edge_distance = np.minimum(np.asarray(u - lo), np.asarray(hi - u))
  return tokens, edge_distance


def compare(out, ref, edge_distance, lens):
  """Per row, compare generated tokens up to the first mismatch. Returns (tokens compared,
  mismatches within EDGE_TOL of a CDF edge, mismatches that rounding cannot explain)."""
  compared, explained, unexplained = 0, 0, 0
  for b in range(BATCH):
    differs = np.flatnonzero(out[b, lens[b]:] != ref[b, lens[b]:])
    if differs.size == 0:
      compared += GEN_LEN - lens[b]
      continue
    j = lens[b] + differs[0]
    compared += j - lens[b]
    if edge_distance[b, j] < EDGE_TOL:
      explained += 1
    else:
      unexplained += 1
  return compared, explained, unexplained


# (k, seed, temperature, peaked student)
RUNS = [(k, seed, temp, True) for k in (1, 2, 3, 4) for seed, temp in ((0, 1.0), (1, 0.8))]
RUNS += [(2, 2, 1.0, False), (4, 3, 1.0, False)]


@pytest.fixture(scope='module')
def results():
  pairs = {peaked: make_models(peaked=peaked) for peaked in (True, False)}
  found = []
  for k, seed, temperature, peaked in RUNS:
    teacher, t_params, student, s_params = pairs[peaked]
    prompts, lens = ragged_prompts(seed)
    key = jax.random.key(100 + seed)
    out = counted_lossless(teacher, t_params, student, s_params, prompts, lens, key,
                           temperature, k=k)
    ref, edge_distance = ar_reference(teacher, t_params, prompts, lens, key, temperature)
    found.append(dict(k=k, seed=seed, peaked=peaked, out=np.asarray(out['tokens']), ref=ref,
                      edge_distance=edge_distance, lens=lens, prompts=prompts,
                      histogram=np.asarray(out['accepted_histogram']),
                      drafts=np.asarray(out['drafts']), starts=np.asarray(out['draft_starts']),
                      key=key, temperature=temperature,
                      iterations=int(out['iterations']),
                      mean_tokens=float(out['mean_tokens_per_iteration'])))
  return found


def test_lossless_equals_ar_shared_noise_sampling(results):
  total, near_edge = 0, 0
  for r in results:
    np.testing.assert_array_equal(r['out'][:, :5], r['prompts'][:, :5])
    compared, explained, unexplained = compare(r['out'], r['ref'], r['edge_distance'], r['lens'])
    assert unexplained == 0, f'k={r["k"]} seed={r["seed"]}: lossless output is not the AR sample'
    total += compared
    near_edge += explained
  print(f'\ncompared {total} tokens; {near_edge} rows ended at a mismatch within {EDGE_TOL} '
        'of a CDF edge')
  assert total >= 10_000
  assert near_edge <= 2  # rounding flips are rare; many would mean the comparison is too lax
  # not vacuous: varied tokens, and noise/rows differ
  generated = np.concatenate([r['ref'][b, r['lens'][b]:] for r in results for b in range(BATCH)])
  assert len(np.unique(generated)) > 100


def test_acceptance_lengths_vary(results):
  by_k = collections.defaultdict(lambda: 0)
  for r in results:
    print(f'k={r["k"]} seed={r["seed"]} peaked={r["peaked"]}: histogram {r["histogram"]} '
          f'iterations {r["iterations"]} mean tokens/iteration {r["mean_tokens"]:.2f}')
    by_k[(r['k'], r['peaked'])] = by_k[(r['k'], r['peaked'])] + r['histogram']
    # every (row, iteration) pair gains a + 1 tokens: the histogram accounts for every token
    gained = np.sum(r['histogram'] * (np.arange(r['k'] + 1) + 1))
    assert gained >= np.sum(GEN_LEN - r['lens'])
    assert gained < np.sum(GEN_LEN - r['lens']) + BATCH * (r['k'] + 1)
    assert r['mean_tokens'] == pytest.approx(gained / np.sum(r['histogram']), rel=1e-6)
  for k in (1, 2, 3, 4):
    hist = by_k[(k, True)]
    assert np.all(hist > 0), f'k={k}: some accepted length 0..{k} never happened: {hist}'
  # the peaked student speeds decoding up; the random one is rejected almost always
  assert all(r['mean_tokens'] > 1.5 for r in results if r['peaked'] and r['k'] >= 2)
  assert all(r['histogram'][0] > 0.9 * r['histogram'].sum() for r in results if not r['peaked'])


def test_drafts_equal_the_students_all_windows_forward(results):
  """The student's ragged cache: after a partial acceptance its next window re-feeds tokens it
  saw only as hints. Every draft must equal the argmax of the student's training forward on
  the final sequence at the window that ends at the iteration's start - a cache missing or
  misplacing a token would change the context."""
  checked = 0
  for r in results:
    if r['peaked']:
      continue  # its drafts are mostly the bias token whatever the context: not informative
    _, _, student, s_params = make_models(peaked=False)
    k = r['k']
    positions = (np.arange(GEN_LEN)[:, None] + np.arange(1, k + 1)[None, :]).reshape(-1)
    u = decode.position_uniforms(r['key'], jnp.asarray(positions), BATCH)
    u = u.reshape(BATCH, GEN_LEN, k)
    predicted = np.asarray(student_forward_argmax(
        student, s_params, jnp.asarray(r['out']), u, jnp.full((BATCH,), r['temperature'])))
    for b in range(BATCH):
      for j in range(r['lens'][b], GEN_LEN):
        start = r['starts'][b, j]
        if r['drafts'][b, j] < 0:
          continue  # a bonus token: no draft
        assert r['drafts'][b, j] == predicted[b, start - 1, j - start], (b, j, start)
        checked += 1
    assert len(np.unique(r['drafts'][r['drafts'] >= 0])) > 20  # context-dependent drafts
  assert checked > 2000


def test_loop_traces_once_per_shape(results):
  # two seeds (other prompts, lengths, keys, temperatures) per k reused one trace
  for k in (1, 2, 3, 4):
    assert TRACES[('id', k, 0)] == 1


@pytest.mark.parametrize('offset', [1, -1])
def test_accept_rule_one_position_off(results, offset):
  """Accepting one draft token past the agreeing prefix breaks exactness (the mismatching draft
  is emitted). One short is still exact - the teacher's token at the last agreeing position is
  the draft itself - but gains fewer tokens per iteration: the rule is the longest prefix."""
  r = next(r for r in results if r['k'] == 2 and r['peaked'])
  teacher, t_params, student, s_params = make_models(peaked=True)
  key = jax.random.key(100 + r['seed'])
  out = counted_lossless(teacher, t_params, student, s_params, r['prompts'], r['lens'], key,
                         1.0, k=2, accept_offset=offset)
  _, _, unexplained = compare(np.asarray(out['tokens']), r['ref'], r['edge_distance'],
                              r['lens'])
  if offset > 0:
    assert unexplained >= BATCH - 1, 'an off-by-one accept rule went unnoticed'
  else:
    assert unexplained == 0
    assert float(out['mean_tokens_per_iteration']) < r['mean_tokens'] - 0.2


def test_ragged_ar_equals_each_prompt_alone(results):
  r = results[0]
  teacher, t_params, _, _ = make_models(peaked=True)
  key = jax.random.key(100 + r['seed'])
  out = lossless.generate_ragged_ar(teacher, t_params, r['prompts'], r['lens'], key, 1.0,
                                    gen_len=GEN_LEN)
  compared, _, unexplained = compare(np.asarray(out), r['ref'], r['edge_distance'], r['lens'])
  assert unexplained == 0 and compared > 0.99 * np.sum(GEN_LEN - r['lens'])


def test_no_host_callbacks_in_the_loop():
  teacher, t_params, student, s_params = make_models()
  prompts, lens = ragged_prompts(0)
  jaxpr = jax.make_jaxpr(functools.partial(lossless.verify_loop, teacher, gen_len=GEN_LEN, k=3,
                                           student=student))(
      t_params, student_params=s_params, prompts=prompts, prompt_lens=lens,
      key=jax.random.key(0), temperature=1.0)
  names = collections.Counter()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      names[eqn.primitive.name] += 1
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (list, tuple)) else [param]):
          if hasattr(sub, 'jaxpr'):
            walk(sub.jaxpr if hasattr(sub.jaxpr, 'eqns') else sub.jaxpr.jaxpr)
          elif hasattr(sub, 'eqns'):
            walk(sub)

  walk(jaxpr.jaxpr)
  assert names['while'] >= 1
  # jax.debug.print appears as 'debug_print', pure/io callbacks as '*_callback'
  host = ('callback', 'debug', 'outside', 'infeed', 'outfeed')
  assert not [n for n in names if any(h in n for h in host)], names


def test_clear_errors():
  teacher, t_params, student, s_params = make_models()
  prompts, lens = ragged_prompts(0)
  with pytest.raises(ValueError, match=r'each must be in \[k\+1, 13\] = \[6, 13\]'):
    lossless.check_prompt_lengths(lens, prompts.shape[1], GEN_LEN, k=5)
  with pytest.raises(ValueError, match=r'must exceed the padded prompt width'):
    lossless.check_prompt_lengths(lens, prompts.shape[1], 13, k=1)
  with pytest.raises(ValueError, match=r'k=4 is larger than this student supports'):
    lossless.verify_loop(teacher, t_params, models.student(tiny_config(), 2), s_params, prompts,
                         lens, jax.random.key(0), gen_len=GEN_LEN, k=4)
  with pytest.raises(ValueError, match=r"learned cdf_order='sorted'"):
    lossless.verify_loop(teacher, t_params, models.student(tiny_config('sorted'), 4), s_params,
                         prompts, lens, jax.random.key(0), gen_len=GEN_LEN, k=2)


# ----------------------------------------------------------------------------- adaptive k

def test_adaptive_lossless_stays_exact(results):
  """A margin threshold caps what each row proposes per step: fewer tokens per iteration, the
  same output."""
  r = next(r for r in results if r['k'] == 3 and r['seed'] == 1)
  teacher, t_params, student, s_params = make_models(peaked=True)
  out = lossless.generate_lossless(teacher, t_params, student, s_params, r['prompts'],
                                   r['lens'], r['key'], r['temperature'], 3.0, gen_len=GEN_LEN,
                                   k=3)
  compared, _, unexplained = compare(np.asarray(out['tokens']), r['ref'], r['edge_distance'],
                                     r['lens'])
  assert unexplained == 0 and compared > 0.99 * np.sum(GEN_LEN - r['lens'])
  assert 1.0 <= float(out['mean_tokens_per_iteration']) < r['mean_tokens'] - 0.2


def test_adaptive_lossy_at_threshold_zero_is_fixed_k_decoding():
  """Threshold 0 keeps every slot: decode's k-token loop (no penalty), rows of one length."""
  _, _, student, s_params = make_models(peaked=False)
  prompts, _ = ragged_prompts(7)
  prompts = prompts[:, :9]
  key = jax.random.key(7)
  out = lossless.generate_adaptive(student, s_params, prompts, np.full(BATCH, 9), key, 1.0, 0.0,
                                   gen_len=GEN_LEN, k=4)
  ref = decode.generate_pflm(student, s_params, jnp.asarray(prompts), key, 1.0,
                             gen_len=GEN_LEN, k=4)
  np.testing.assert_array_equal(np.asarray(out['tokens']), np.asarray(ref))
  assert float(out['mean_tokens_per_iteration']) == 4.0


def test_adaptive_lossy_keeps_the_confident_prefix():
  """With a threshold rows advance by different counts; every kept token is still the student's
  own all-windows prediction at the window its step started from (ragged student cache)."""
  _, _, student, s_params = make_models(peaked=False)
  prompts, lens = ragged_prompts(8)
  key = jax.random.key(8)
  out = lossless.generate_adaptive(student, s_params, prompts, lens, key, 1.0, 0.2,
                                   gen_len=GEN_LEN, k=4, return_drafts=True)
  histogram = np.asarray(out['accepted_histogram'])
  assert histogram[0] == 0 and np.count_nonzero(histogram) >= 3, histogram
  tokens, starts = np.asarray(out['tokens']), np.asarray(out['draft_starts'])
  positions = (np.arange(GEN_LEN)[:, None] + np.arange(1, 5)[None, :]).reshape(-1)
  u = decode.position_uniforms(key, jnp.asarray(positions), BATCH).reshape(BATCH, GEN_LEN, 4)
  predicted = np.asarray(student_forward_argmax(student, s_params, jnp.asarray(tokens), u,
                                                jnp.ones((BATCH,))))
  for b in range(BATCH):
    for j in range(lens[b], GEN_LEN):
      assert tokens[b, j] == predicted[b, starts[b, j] - 1, j - starts[b, j]], (b, j)


def test_complete_ids_gives_the_teachers_decode_of_each_prompt():
  """The generate --mode=lossless path: prompt i as a batch of one with fold_in(key, i), cut
  after EOS - what decode.decode_prompts gets from the AR teacher for the same prompt."""
  teacher, t_params, student, s_params = make_models(peaked=True)
  encoded = [[5, 6, 7, 8, 9], list(range(20, 31)), [40, 41, 42, 43, 44, 45, 46]]
  key, eos = jax.random.key(9), 3
  rows, mean = lossless.complete_ids(teacher, t_params, student, s_params, encoded, key,
                                     gen_len=64, k=3, temperature=1.0, eos_id=eos)
  for i, ids in enumerate(encoded):
    ref = decode.generate_ar(teacher, t_params, jnp.asarray([ids], jnp.int32),
                             jax.random.fold_in(key, i), 1.0, gen_len=64, eos_id=eos)
    np.testing.assert_array_equal(rows[i], np.asarray(ref)[0])
  assert mean > 1.5


@pytest.mark.slow
def test_lossless_in_the_sorted_cdf_order():
  """The verifier samples in the model's cdf_order: with 'sorted' models the output is again
  decode's AR sample (another compile of both loops, hence slow)."""
  teacher, t_params, student, s_params = make_models(order='sorted', peaked=True)
  prompts, lens = ragged_prompts(4)
  key = jax.random.key(104)
  out = counted_lossless(teacher, t_params, student, s_params, prompts, lens, key, 1.0, k=3)
  ref, edge_distance = ar_reference(teacher, t_params, prompts, lens, key, 1.0)
  compared, _, unexplained = compare(np.asarray(out['tokens']), ref, edge_distance, lens)
  assert unexplained == 0 and compared > 0.99 * np.sum(GEN_LEN - lens)
  assert np.count_nonzero(np.asarray(out['accepted_histogram'])) >= 3


@pytest.mark.parametrize('threshold', [0.0, 0.1, 0.5, 1.0])
def test_confident_prefix_equals_the_top_k_margin(threshold):
  """The two-max margin equals lax.top_k's top-1 minus top-2, ties (margin 0) included."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4, 50)).astype(np.float32))
  x = x.at[0, 1].set(1.0)                      # a slot whose every logit ties
  x = x.at[1, 0, 5].set(jnp.max(x[1, 0]))      # two tied maxima
  x = x.at[2].multiply(10.0)                   # wide margins: long confident prefixes
  top2 = jax.lax.top_k(x, 2)[0]
  unsure = top2[..., 0] - top2[..., 1] < threshold
  want = jnp.min(jnp.where(unsure, jnp.arange(4), 4), axis=1, initial=4)
  got = lossless.confident_prefix(x, threshold)
  np.testing.assert_array_equal(got, want)
  if threshold > 0:  # a tie is margin 0: unsure at any positive threshold
    assert got[0] <= 1 and got[1] == 0


@pytest.mark.slow
def test_lossless_under_the_gumbel_coupling():
  """cdf_order='gumbel' with a distributional student (readout inverse_cdf) that copies the
  teacher: the verifier's tokens are decode's AR Gumbel-coupled samples, token for token (a flip
  needs two scores log p + G within rounding: none expected in these ~1,100 tokens), and the
  copied student's drafts are mostly accepted."""
  config = tiny_config('gumbel')
  config.model.readout = 'inverse_cdf'
  teacher, student = models.teacher(config), models.student(config, 4)
  t_params = params_lib.random_params(teacher, 0, head_scale=HEAD_SCALE)
  s_params = params_lib.random_params(student, 1, head_scale=HEAD_SCALE)
  s_params['backbone'] = jax.tree.map(jnp.copy, t_params)
  prompts, lens = ragged_prompts(5)
  key = jax.random.key(105)
  out = counted_lossless(teacher, t_params, student, s_params, prompts, lens, key, 1.0, k=2)
  ref = np.zeros((BATCH, GEN_LEN), np.int32)
  for length in np.unique(lens):
    rows = decode.generate_ar(teacher, t_params, jnp.asarray(prompts[:, :length]), key, 1.0,
                              gen_len=GEN_LEN)
    ref[lens == length] = np.asarray(rows)[lens == length]
  tokens = np.asarray(out['tokens'])
  for b in range(BATCH):
    np.testing.assert_array_equal(tokens[b, lens[b]:], ref[b, lens[b]:])
  histogram = np.asarray(out['accepted_histogram'])
  assert histogram[1:].sum() > histogram[0], histogram
