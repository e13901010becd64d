"""Speculative decoding: a small AR draft model proposes k tokens, the AR target verifies them.

The baseline K-Forcing's lossless mode is compared with (issue 15): the same verify pass, but
the k drafts come from k cheap autoregressive steps of a smaller AR model instead of one pass
of a push-forward student. One iteration, for a row whose first n tokens are final:

  draft    k cached draft steps: the first re-feeds tokens n-2, n-1 (a 2-slot window at n-2),
           each later one feeds the previous draft token; step i's logits -> q_i over position
           n+i, and d_i is sampled from q_i
  verify   target window [token n-1 | d_0..d_{k-1}] at positions n-1..n+k-1, one pass ->
           p_0..p_k (p_i over position n+i given x_<n and d_<i)
  accept   a = number of drafts kept (0..k); the row gets d_0..d_{a-1} and one more token from
           the target side, a + 1 tokens in all

Two acceptance rules (`ACCEPTANCE_RULES`):
  'rejection'  standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023): keep d_i
               with probability min(1, p_i(d_i) / q_i(d_i)), in order; at the first rejection
               sample from normalize(max(p_i - q_i, 0)), after k acceptances a bonus token from
               p_k. Each emitted token is then distributed as p given its prefix: lossless in
               distribution. Fresh randomness per iteration: fold_in(key, iteration).
  'coupled'    shared noise, K-Forcing's lossless rule (kforcing_jax/lossless.py): position j's
               uniform u[b, j] = decode.position_uniforms(key, j); d_i is the inverse CDF of q_i
               at u[n+i], the target's own token the inverse CDF of p_i at the same u; keep the
               agreeing prefix, then the target's own token. Token for token the AR target's
               shared-noise sample (lossless.generate_ragged_ar), whatever the draft does.

Caches, for a row of length n at the top of an iteration: the target's holds positions < n-1
(as in lossless.py: its window starts at the last final token and rewrites everything after);
the draft's holds positions < n-2. The draft's first step re-feeds the last two final tokens
because after a = k acceptances the last accepted draft d_{k-1} was sampled but never fed, so
the draft has no K/V for position n+k-1 = n'-2 of the next iteration (n' = n+k+1); re-feeding
two tokens covers it, and every other case (a < k) re-feeds tokens it already cached, which is
harmless. Hence prompts need at least 2 tokens.

Rows accept different counts, so every row keeps its own length (kforcing_jax/ragged.py) and
ragged prompts share one call. The generation is one lax.while_loop in one jit per shape: no
host round trip per step.
"""

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import decode, lossless, ragged, sampling
from kforcing_jax.models import FunctionalModel

ACCEPTANCE_RULES = ('rejection', 'coupled')
MIN_PROMPT_LEN = 2   # the draft's first step re-feeds the last two final tokens


def check_models(target: FunctionalModel, draft: FunctionalModel, acceptance: str) -> None:
  """Fail before tracing on a pair of models that cannot share tokens (or noise)."""
  if acceptance not in ACCEPTANCE_RULES:
    raise ValueError(f'acceptance={acceptance!r}; expected one of {ACCEPTANCE_RULES}.')
  for name, model in (('target', target), ('draft', draft)):
    if model.kind != 'ar':
      raise ValueError(f'the {name} model is a {model.kind!r} model; speculative decoding '
                       'pairs two plain AR models (kind "ar").')
  t, d = target.cfg, draft.cfg
  if (t.vocab_size, t.num_real_tokens, t.mask_id) != (d.vocab_size, d.num_real_tokens, d.mask_id):
    raise ValueError(f'the draft model has vocabulary {d.num_real_tokens} (padded {d.vocab_size},'
                     f' mask id {d.mask_id}) but the target has {t.num_real_tokens} (padded '
                     f'{t.vocab_size}, mask id {t.mask_id}): they must share one tokenizer.')
  if acceptance == 'coupled' and t.cdf_order != d.cdf_order:
    raise ValueError(f"acceptance='coupled' maps shared noise to tokens with each model's "
                     f'cdf_order, but the draft uses {d.cdf_order!r} and the target '
                     f'{t.cdf_order!r}: its drafts would rarely agree. Pair models of one '
                     "cdf_order, or use acceptance='rejection'.")


def check_prompt_lengths(prompt_lens, prompt_width: int, gen_len: int, k: int) -> None:
  """Fail before tracing on lengths a user can get wrong (host values only)."""
  if k < 1:
    raise ValueError(f'k={k}: speculative decoding drafts at least one token per iteration.')
  lens = np.asarray(prompt_lens)
  if lens.ndim != 1:
    raise ValueError(f'prompt_lens must be (batch,), got shape {lens.shape}.')
  if gen_len <= prompt_width:
    raise ValueError(f'gen_len={gen_len} must exceed the padded prompt width {prompt_width}.')
  if lens.size and (lens.min() < MIN_PROMPT_LEN or lens.max() > prompt_width):
    raise ValueError(f'prompt lengths {lens.tolist()}: each must be in [{MIN_PROMPT_LEN}, '
                     f'{prompt_width}] (the draft model re-feeds the last {MIN_PROMPT_LEN} tokens '
                     'every iteration; prepend a BOS token to one-token prompts).')


def rejection_accept(draft_tokens, q, p, key):
  """Speculative sampling's accept step. draft_tokens (B, k) ~ q (B, k, V); p (B, k+1, V).

  Returns (a (B,) drafts kept, emitted (B, k+1): the kept drafts, then the token sampled from
  the residual max(p_a - q_a, 0) (or from p_k when a = k); slots after it are don't-care)."""
  batch, k = draft_tokens.shape
  accept_key, final_key = jax.random.split(key)
  take = lambda x, ids: jnp.take_along_axis(x, ids[..., None], axis=-1)[..., 0]  # noqa: E731
  p_d, q_d = take(p[:, :k], draft_tokens), take(q, draft_tokens)
  # r < p/q written without the division; q_d > 0 since d was sampled from q
  kept = jax.random.uniform(accept_key, (batch, k)) * q_d < p_d
  a = jnp.min(jnp.where(kept, k, jnp.arange(k)), axis=1, initial=k)
  residual = jnp.concatenate([jnp.maximum(p[:, :k] - q, 0.0), p[:, k:]], axis=1)
  residual = jnp.take_along_axis(residual, a[:, None, None], axis=1)[:, 0]
  # p == q leaves no residual mass, but then no rejection can happen either (p/q = 1 > r);
  # only rounding reaches here, where p itself is the right fallback
  p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]
  residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_a)
  final = sampling.inverse_cdf_from_probs(residual, jax.random.uniform(final_key, (batch,)))
  emitted = jnp.where(jnp.arange(k + 1)[None] < a[:, None],
                      jnp.pad(draft_tokens, ((0, 0), (0, 1))), final[:, None])
  return a, emitted


def coupled_accept(draft_tokens, own):
  """Shared-noise accept step: keep the drafts (B, k) agreeing with the target's own tokens
  (B, k+1) for the same uniforms, then the target's own token. Returns (a, emitted)."""
  a = lossless.accept_length(draft_tokens, own)
  emitted = jnp.where(jnp.arange(own.shape[1])[None] < a[:, None],
                      jnp.pad(draft_tokens, ((0, 0), (0, 1))), own)
  return a, emitted


def _loop(target, target_params, draft, draft_params, prompts, prompt_lens, key, temperature,
          *, gen_len: int, k: int, acceptance: str, accept_rule=None) -> dict:
  """`speculative_loop`; accept_rule (tests only) replaces the rejection rule's accept step
  (same signature as `rejection_accept`) to show that a wrong rule is detected."""
  check_models(target, draft, acceptance)
  if not isinstance(prompt_lens, jax.core.Tracer):
    check_prompt_lengths(prompt_lens, prompts.shape[1], gen_len, k)
  accept_rule = accept_rule or rejection_accept
  batch, width = prompts.shape
  # a still-generating row has n <= gen_len - 1, so after its last iteration n <= gen_len + k;
  # frozen rows keep running the body and write k+1 tokens from there
  buf = gen_len + 2 * k + 1
  prompt_lens = jnp.asarray(prompt_lens, jnp.int32)
  temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))[:, None]
  coupled = acceptance == 'coupled'
  all_u = decode.position_uniforms(key, jnp.arange(buf), batch) if coupled else None
  tb, db = target.module(target_params), draft.module(draft_params)
  t_cache = ragged.prefill(tb, ragged.init_cache(tb.cfg, batch, buf), prompts)
  d_cache = ragged.prefill(db, ragged.init_cache(db.cfg, batch, buf), prompts)
  tokens = jnp.full((batch, buf), tb.cfg.mask_id, jnp.int32).at[:, :width].set(prompts)

  def propose(d_cache, tokens, n, draft_u):
    """k draft tokens (B, k), their distributions q (B, k, V) and the draft cache."""
    start = n - MIN_PROMPT_LEN
    window = db.embed_tokens(ragged.read_rows(tokens, start, MIN_PROMPT_LEN))
    hidden, d_cache = ragged.window_pass(db, d_cache, window, start, MIN_PROMPT_LEN)
    drafted, qs = [], []
    for i in range(k):  # unrolled: k is small and static
      if i:
        hidden, d_cache = ragged.window_pass(db, d_cache, db.embed_tokens(drafted[-1][:, None]),
                                             n + i - 1, 1)
      q = sampling.probabilities(db.logits(hidden[:, -1]), temperature[:, 0])
      drafted.append(sampling.inverse_cdf_from_probs(q, draft_u[:, i], db.cfg.cdf_order))
      qs.append(q)
    return jnp.stack(drafted, axis=1), jnp.stack(qs, axis=1), d_cache

  def body(state):
    n, tokens, t_cache, d_cache, histogram, iterations = state
    active = n < gen_len
    if coupled:
      draft_u = ragged.read_rows(all_u, n, k)
    else:
      step_key = jax.random.fold_in(key, iterations)
      draft_key, accept_key = jax.random.split(step_key)
      draft_u = jax.random.uniform(draft_key, (batch, k))
    drafted, q, d_cache = propose(d_cache, tokens, n, draft_u)
    window = jnp.concatenate([ragged.read_rows(tokens, n - 1, 1), drafted], axis=1)
    hidden, t_cache = ragged.window_pass(tb, t_cache, tb.embed_tokens(window), n - 1, k + 1)
    if coupled:
      own = sampling.inverse_cdf_sample(tb.logits(hidden), ragged.read_rows(all_u, n, k + 1),
                                        temperature, tb.cfg.cdf_order)
      accepted, emitted = coupled_accept(drafted, own)
    else:
      p = sampling.probabilities(tb.logits(hidden), temperature)
      accepted, emitted = accept_rule(drafted, q, p, accept_key)
    # slots after a row's last emitted token are overwritten by its next iteration
    tokens = ragged.write_rows(tokens, emitted, n)
    histogram = histogram + jnp.sum(
        jax.nn.one_hot(accepted, k + 1, dtype=jnp.int32) * active[:, None], axis=0)
    n = jnp.where(active, n + accepted + 1, n)
    return n, tokens, t_cache, d_cache, histogram, iterations + 1

  def cond(state):
    return jnp.any(state[0] < gen_len)

  state = (prompt_lens, tokens, t_cache, d_cache, jnp.zeros((k + 1,), jnp.int32),
           jnp.zeros((), jnp.int32))
  _, tokens, _, _, histogram, iterations = jax.lax.while_loop(cond, body, state)
  pairs = jnp.maximum(jnp.sum(histogram), 1)
  mean_tokens = jnp.sum(histogram * (jnp.arange(k + 1) + 1)) / pairs
  return {'tokens': tokens[:, :gen_len], 'accepted_histogram': histogram,
          'iterations': iterations, 'mean_tokens_per_iteration': mean_tokens}


def speculative_loop(target: FunctionalModel, target_params, draft: FunctionalModel,
                     draft_params, prompts, prompt_lens, key, temperature=1.0, *, gen_len: int,
                     k: int, acceptance: str = 'rejection') -> dict:
  """Speculative decoding of ragged prompts (B, P) padded with the mask id, row b's first
  prompt_lens[b] (>= 2) tokens real, with a draft AR model proposing k tokens per iteration.

  Returns {'tokens': (B, gen_len), prompt included; 'accepted_histogram': (k+1,) how many
  (row, iteration) pairs accepted a = 0..k drafts, rows still generating only; 'iterations':
  loop iterations run; 'mean_tokens_per_iteration': the mean of a + 1 over those pairs}.
  acceptance 'rejection': every row is a sample of the target at `temperature` (lossless in
  distribution); 'coupled': token for token the target's shared-noise AR sample
  (lossless.generate_ragged_ar with the same key). Both models decode at `temperature`.
  """
  return _loop(target, target_params, draft, draft_params, prompts, prompt_lens, key,
               temperature, gen_len=gen_len, k=k, acceptance=acceptance)


generate_speculative = jax.jit(speculative_loop,
                               static_argnames=('target', 'draft', 'gen_len', 'k', 'acceptance'))
