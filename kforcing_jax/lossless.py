"""Lossless k-token decoding: the student drafts, the AR teacher verifies with the same noise.

The AR teacher's sample is a deterministic function of its uniforms: token j of row b is
InverseCDF(p_AR(. | x_<j), u[b, j]) with u[b, j] = decode.position_uniforms(key, j)[b]. The
student was distilled to reproduce exactly that map, so its draft can be checked token by token
against the teacher's own choice for the same u. One iteration, for a row whose first n tokens
are final (prompt included):

  draft    student window [tokens n-k-1..n-1 | k hints for u[n..n+k-1]] -> d_0..d_{k-1}
           (argmax of the hint slots: hint i predicts position n+i)
  verify   teacher window [token n-1 | d_0..d_{k-1}] at positions n-1..n+k-1, one pass ->
           own_i = InverseCDF(p_AR(. | x_<n, d_<i), u[n+i], temperature, cdf_order), i = 0..k
  accept   a = the length of the agreeing prefix (d_i == own_i for all i < a), in 0..k; the
           row gets d_0..d_{a-1} and then own_a (the teacher's correction, or a bonus token
           when all k agree): a + 1 tokens, each the teacher's sample for its position's u
           given a prefix that is the teacher's sample. So the output is the AR decoder's,
           token for token, whatever the student does; the student only sets the speed.

Rows accept different counts, so every row has its own length (kforcing_jax/ragged.py), and
prompts of different lengths share one call. Cache invariants at the top of an iteration, row
length n: the teacher's cache holds positions < n-1 (the verify window starts at the last final
token; the K/V it writes for accepted drafts are exact, being computed from final tokens, and
the rest lies beyond the next visible length); the student's cache holds positions < n-k-1
(its window re-feeds the last k+1 final tokens, so after accepting a <= k drafts - which it
saw only as hints - its next window still starts at or before the first token it has no K/V
for, and rewrites the ones it had). Hence prompts need k+1 tokens.

The whole generation is one lax.while_loop inside one jit per (batch, prompt width, gen_len, k)
shape: no host round trip per step. k = 0 is the AR teacher alone on ragged prompts
(`ragged_ar_loop`). Adaptive k: a row proposes (lossless) or keeps (lossy,
`adaptive_pflm_loop`, no teacher) only the leading draft slots whose top-1 minus top-2 logit
margin reaches a threshold, so k varies per row and step. The frequency penalty and EOS
stopping of decode.py are not applied in the loop: a penalty would only change the draft (the
lossless output is the teacher's either way); `complete_ids` pads after EOS on the host.
"""

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import decode, ragged, sampling
from kforcing_jax.models import FunctionalModel


def accept_length(draft: jax.Array, own: jax.Array, offset: int = 0) -> jax.Array:
  """(B,) number of leading draft tokens (B, k) equal to the teacher's own tokens (B, k+1).

  `offset` exists only so tests can prove that a rule one position off breaks exactness
  (tests/test_lossless.py); decoding always uses 0."""
  k = draft.shape[1]
  # the first disagreeing slot (k when none): a min, where a cumprod lowers to a scan
  first_miss = jnp.min(jnp.where(draft != own[:, :k], jnp.arange(k), k), axis=1, initial=k)
  return jnp.clip(first_miss + offset, 0, k)


def check_prompt_lengths(prompt_lens, prompt_width: int, gen_len: int, k: int) -> None:
  """Fail before tracing on lengths a user can get wrong (host values only)."""
  lens = np.asarray(prompt_lens)
  if lens.ndim != 1:
    raise ValueError(f'prompt_lens must be (batch,), got shape {lens.shape}.')
  if gen_len <= prompt_width:
    raise ValueError(f'gen_len={gen_len} must exceed the padded prompt width {prompt_width}.')
  if lens.size and (lens.min() < k + 1 or lens.max() > prompt_width):
    raise ValueError(f'prompt lengths {lens.tolist()}: each must be in [k+1, {prompt_width}] = '
                     f'[{k + 1}, {prompt_width}] (k={k}: the student re-feeds the last k+1 '
                     'tokens every iteration; use longer prompts or a smaller k).')


def confident_prefix(slot_logits: jax.Array, threshold) -> jax.Array:
  """(B,) how many leading draft slots (B, k, V) have a top-1 minus top-2 logit margin of at
  least `threshold`: the student's own estimate of how far its draft can be trusted.

  Top-2 as two max reductions (the runner-up: the max with the first maximal entry set to
  -inf, so a tie gives margin 0, as lax.top_k would): XLA:CPU lowers lax.top_k to a sort-like
  custom call that cost ~20 AR steps per iteration at V = 8192."""
  best = jnp.max(slot_logits, axis=-1)
  first = sampling.first_argmax(slot_logits)
  ids = jnp.arange(slot_logits.shape[-1], dtype=jnp.int32)
  runner_up = jnp.max(jnp.where(ids == first[..., None], -jnp.inf, slot_logits), axis=-1)
  k = slot_logits.shape[1]
  unsure = best - runner_up < threshold
  return jnp.min(jnp.where(unsure, jnp.arange(k), k), axis=1, initial=k)


def _ragged_loop(teacher, teacher_params, student, student_params, prompts, prompt_lens, key,
                 temperature, margin_threshold, *, gen_len: int, k: int, verify: bool,
                 accept_offset: int, return_drafts: bool) -> dict:
  """The one loop behind lossless (verify=True) and adaptive lossy (verify=False) decoding."""
  if k > 0 and student is None:
    raise ValueError('k > 0 needs a student to draft; k = 0 is the AR teacher alone.')
  if k > 0 and k > student.k_max:
    raise ValueError(f'k={k} is larger than this student supports (k_max={student.k_max}).')
  if verify and k > 0 and student.cfg.cdf_order != teacher.cfg.cdf_order:
    raise ValueError(f'the student learned cdf_order={student.cfg.cdf_order!r} but the teacher '
                     f'samples with {teacher.cfg.cdf_order!r}: its drafts would rarely be '
                     'accepted. Pair models of one cdf_order.')
  if not isinstance(prompt_lens, jax.core.Tracer):
    check_prompt_lengths(prompt_lens, prompts.shape[1], gen_len, k)
  batch, width = prompts.shape
  # the furthest a still-generating row reads or writes: length n <= gen_len - 1 + k + 1
  # after its last iteration, then (frozen) writes k+1 tokens from there
  buf = gen_len + 2 * k + 1
  prompt_lens = jnp.asarray(prompt_lens, jnp.int32)
  temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))
  all_u = decode.position_uniforms(key, jnp.arange(buf), batch)
  if verify:
    tb = teacher.module(teacher_params)
    t_cache = ragged.prefill(tb, ragged.init_cache(tb.cfg, batch, buf), prompts)
  else:
    t_cache = []
  if k:
    sm = student.module(student_params)
    sb = sm.backbone
    s_cache = ragged.prefill(sb, ragged.init_cache(sb.cfg, batch, buf), prompts)
    # every hint of the run in one batched call: the noise of a position does not depend on
    # the tokens, and each row reads the k hints after its own length
    all_hints = sm.hint_states(all_u, temperature[:, None])
  else:
    s_cache = []
  mask_id = (tb if verify else sb).cfg.mask_id
  tokens = jnp.full((batch, buf), mask_id, jnp.int32).at[:, :width].set(prompts)

  def body(state):
    n, tokens, t_cache, s_cache, histogram, iterations, drafts, draft_starts = state
    active = n < gen_len
    last = ragged.read_rows(tokens, n - 1, 1)
    if k:
      s_start = n - k - 1
      slots = jnp.concatenate([sb.embed_tokens(ragged.read_rows(tokens, s_start, k + 1)),
                               ragged.read_rows(all_hints, n, k)], axis=1)
      # only the hints' final states are read: the token slots stop at their K/V
      hidden, s_cache = ragged.window_pass(sb, s_cache, slots, s_start, k + 1, outputs_from=k + 1)
      draft_u = ragged.read_rows(all_u, n, k)
      # the token slots are cached now: a feedback block sees them as context
      slot_logits, draft = sm.slot_readout(
          hidden[:, None], (s_start + k + 1)[:, None, None] + jnp.arange(k), s_cache[-1],
          (s_start + k + 1)[:, None],
          lambda j, logits: sampling.student_tokens(sb.cfg, logits, draft_u[:, None, j]))
      slot_logits, draft = slot_logits[:, 0], draft[:, 0]
      trusted = (jnp.full((batch,), k, jnp.int32) if margin_threshold is None
                 else confident_prefix(slot_logits, margin_threshold))
    else:
      draft = jnp.zeros((batch, 0), jnp.int32)
    if verify:
      window = jnp.concatenate([last, draft], axis=1)
      hidden, t_cache = ragged.window_pass(tb, t_cache, tb.embed_tokens(window), n - 1, k + 1)
      own = sampling.inverse_cdf_sample(tb.logits(hidden), ragged.read_rows(all_u, n, k + 1),
                                        temperature[:, None], tb.cfg.cdf_order)
      accepted = accept_length(draft, own, accept_offset)
      if k:  # an untrusted slot is not proposed: the teacher's token replaces it
        accepted = jnp.minimum(accepted, trusted)
      slot = jnp.arange(k + 1)[None]
      # the accepted drafts, then the teacher's own token; slots after it are overwritten later
      emitted = jnp.where(slot < accepted[:, None], jnp.pad(draft, ((0, 0), (0, 1))), own)
      gained = accepted + 1
    else:
      # lossy: keep the confident prefix, at least one token so every iteration progresses;
      # the dropped slots are redrafted next iteration conditioned on the kept ones
      accepted = jnp.maximum(trusted, 1)
      emitted, gained = draft, accepted
    tokens = ragged.write_rows(tokens, emitted, n)
    if return_drafts:
      # a later iteration starts at most at the first unfixed position and redrafts the k
      # after it, so what survives at j is the draft of the iteration that fixed j
      drafts = ragged.write_rows(drafts, draft, n)
      draft_starts = ragged.write_rows(draft_starts, jnp.broadcast_to(n[:, None], draft.shape), n)
    histogram = histogram + jnp.sum(
        jax.nn.one_hot(accepted, k + 1, dtype=jnp.int32) * active[:, None], axis=0)
    n = jnp.where(active, n + gained, n)
    return n, tokens, t_cache, s_cache, histogram, iterations + 1, drafts, draft_starts

  def cond(state):
    return jnp.any(state[0] < gen_len)

  no_drafts = jnp.full((batch, buf if return_drafts else 0), -1, jnp.int32)
  state = (prompt_lens, tokens, t_cache, s_cache, jnp.zeros((k + 1,), jnp.int32),
           jnp.zeros((), jnp.int32), no_drafts, no_drafts)
  _, tokens, _, _, histogram, iterations, drafts, draft_starts = jax.lax.while_loop(
      cond, body, state)
  pairs = jnp.maximum(jnp.sum(histogram), 1)
  gains = jnp.arange(k + 1) + (1 if verify else 0)
  mean_tokens = jnp.sum(histogram * gains) / pairs
  result = {'tokens': tokens[:, :gen_len], 'accepted_histogram': histogram,
            'iterations': iterations, 'mean_tokens_per_iteration': mean_tokens}
  if return_drafts:
    result.update(drafts=drafts[:, :gen_len], draft_starts=draft_starts[:, :gen_len])
  return result


def verify_loop(teacher: FunctionalModel, teacher_params, student: FunctionalModel | None,
                student_params, prompts, prompt_lens, key, temperature=1.0,
                margin_threshold=None, *, gen_len: int, k: int, accept_offset: int = 0,
                return_drafts: bool = False) -> dict:
  """Lossless decoding of ragged prompts (B, P), row b's first prompt_lens[b] tokens real.

  Returns {'tokens': (B, gen_len), prompt included, every generated position the AR teacher's
  shared-noise sample; 'accepted_histogram': (k+1,) how many (row, iteration) pairs accepted
  a = 0..k drafts, rows still generating only; 'iterations': loop iterations run;
  'mean_tokens_per_iteration': tokens a row gains per iteration (a + 1), averaged over those
  pairs}. The student decodes at tau = temperature. k = 0: no student, the AR teacher alone.
  margin_threshold (adaptive k): a row proposes only its leading draft slots whose logit margin
  reaches it (`confident_prefix`), so acceptance is capped per row and step; the output is the
  teacher's either way. With fixed-shape buffers every iteration costs the same, so this only
  pays where a shorter proposal is cheaper (it is the hook for that, not a speed-up here).
  return_drafts (for tests of the student's cache) adds 'drafts' and 'draft_starts' (B, gen_len):
  for each generated position j, the draft made for it in the iteration that fixed j and that
  iteration's start n (the draft came from the student's context < n and hints n..j); -1 where
  no draft was made (a bonus token).
  """
  return _ragged_loop(teacher, teacher_params, student, student_params, prompts, prompt_lens,
                      key, temperature, margin_threshold, gen_len=gen_len, k=k, verify=True,
                      accept_offset=accept_offset, return_drafts=return_drafts)


def adaptive_pflm_loop(student: FunctionalModel, params, prompts, prompt_lens, key, tau=1.0,
                       margin_threshold=0.0, *, gen_len: int, k: int,
                       return_drafts: bool = False) -> dict:
  """Lossy k-token decoding with adaptive k: each row keeps, per step, the leading draft slots
  whose top-1 minus top-2 logit margin reaches `margin_threshold` (at least one) and redrafts
  the rest next step. Threshold 0 keeps all k: decode.pflm_decode_loop without its frequency
  penalty, on ragged prompts. Same outputs as `verify_loop`, with 'accepted_histogram' over
  the kept count 1..k (bin 0 unused) and mean_tokens_per_iteration = the mean kept count."""
  return _ragged_loop(None, None, student, params, prompts, prompt_lens, key, tau,
                      margin_threshold, gen_len=gen_len, k=k, verify=False, accept_offset=0,
                      return_drafts=return_drafts)


generate_lossless = jax.jit(verify_loop, static_argnames=('teacher', 'student', 'gen_len', 'k',
                                                          'accept_offset', 'return_drafts'))
generate_adaptive = jax.jit(adaptive_pflm_loop,
                            static_argnames=('student', 'gen_len', 'k', 'return_drafts'))


def ragged_ar_loop(teacher: FunctionalModel, params, prompts, prompt_lens, key,
                   temperature=1.0, *, gen_len: int) -> jax.Array:
  """AR shared-noise sampling of ragged prompts (B, P) -> (B, gen_len): row b is exactly what
  decode's AR loop gives row b's prompt alone in a batch of B (same per-position noise)."""
  return verify_loop(teacher, params, None, None, prompts, prompt_lens, key, temperature,
                     gen_len=gen_len, k=0)['tokens']


generate_ragged_ar = jax.jit(ragged_ar_loop, static_argnames=('teacher', 'gen_len'))


def complete_ids(teacher: FunctionalModel, teacher_params, student: FunctionalModel,
                 student_params, encoded: list[list[int]], key, *, gen_len: int, k: int,
                 temperature: float = 1.0, eos_id: int | None = None):
  """Lossless completions of token-id prompts -> (rows (gen_len,) each, mean tokens per
  teacher pass over all prompts).

  Prompt i decodes as a batch of one with the noise key fold_in(key, i), as
  decode.decode_prompts does, so each row is token for token what the AR teacher's own decoder
  gives that prompt (this loop does not stop at EOS: after the first generated EOS the row is
  padded with the mask id here, as the teacher's decoder pads it). Prompts are padded to one
  width, so they share one compiled loop."""
  check_prompt_lengths([len(ids) for ids in encoded], max(map(len, encoded)), gen_len, k)
  width = max(map(len, encoded))
  runs = []
  for i, ids in enumerate(encoded):
    padded = np.full((1, width), teacher.cfg.mask_id, np.int32)
    padded[0, :len(ids)] = ids
    runs.append((len(ids), generate_lossless(
        teacher, teacher_params, student, student_params, padded,
        np.asarray([len(ids)], np.int32), jax.random.fold_in(key, i), temperature,
        gen_len=gen_len, k=k)))
  rows, histogram = [], np.zeros(k + 1, np.int64)
  for length, out in runs:
    row = np.asarray(out['tokens'])[0]
    if eos_id is not None:
      hits = np.flatnonzero(row[length:] == eos_id)
      if hits.size:
        row[length + hits[0] + 1:] = teacher.cfg.mask_id
    rows.append(row)
    histogram += np.asarray(out['accepted_histogram'])
  mean = float(np.sum(histogram * (np.arange(k + 1) + 1)) / max(np.sum(histogram), 1))
  return rows, mean
