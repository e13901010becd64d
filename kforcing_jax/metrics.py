"""Quality metrics of language-model outputs: next-token NLL, generative perplexity, unigram
entropy and distinct-n, their bootstrap intervals over completions, and the mode-seeking rule."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def next_token_nll(logits, tokens, mask):
  """Summed next-token NLL and target count: position t predicts t+1 where mask[t+1] = 1."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  weights = mask[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


NLL_CHUNK_ELEMENTS = 1 << 27  # logits per NLL chunk (rows * length * vocab), 512 MiB in f32


def generated_mask(batch: int, length: int, prefix_len: int):
  """(B, N) mask selecting the generated positions j >= prefix_len."""
  return jnp.broadcast_to(jnp.arange(length) >= prefix_len, (batch, length))


def perplexity_from_logits(logits, tokens, prefix_len: int) -> float:
  """exp(mean NLL of tokens[:, j], j >= prefix_len, under the distribution logits[:, j-1])."""
  nll, count = next_token_nll(jnp.asarray(logits), jnp.asarray(tokens),
                              generated_mask(*tokens.shape, prefix_len))
  return float(np.exp(float(nll) / float(count)))


@functools.partial(jax.jit, static_argnames=('model',))
def _chunk_row_nll(model, params, tokens, mask):
  """Per-row summed next-token NLL and target count, (rows,) each."""
  logits, _ = model.module(params)(tokens)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  weights = mask[:, 1:]
  return jnp.sum(nll * weights, axis=1), jnp.sum(weights, axis=1)


def sample_nll(model, params, samples, prefix_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(NLL sums, token counts), one per row of `samples` (B, N), of the generated parts
  (positions >= prefix_len) under the AR `model` (a models.FunctionalModel).

  Runs in fixed-size row chunks (one compiled shape; padded rows are masked out) so the
  (rows, N, V) logits stay under NLL_CHUNK_ELEMENTS."""
  samples = np.asarray(samples, np.int32)
  num, length = samples.shape
  chunk = max(1, min(num, NLL_CHUNK_ELEMENTS // (length * model.cfg.vocab_size)))
  total = math.ceil(num / chunk) * chunk
  tokens = np.zeros((total, length), np.int32)
  tokens[:num] = samples
  mask = np.zeros((total, length), np.float32)
  mask[:num, prefix_len:] = 1.0
  nll, count = [], []
  for start in range(0, total, chunk):
    n, c = jax.device_get(_chunk_row_nll(model, params, tokens[start:start + chunk],
                                         mask[start:start + chunk]))
    nll.append(n)
    count.append(c)
  return (np.concatenate(nll)[:num].astype(np.float64),
          np.concatenate(count)[:num].astype(np.float64))


def pooled_perplexity(nll, count) -> float:
  """exp(sum NLL / sum count): every generated token weighs the same."""
  return float(np.exp(np.sum(nll) / np.sum(count)))


def generative_perplexity(model, params, samples, prefix_len: int) -> float:
  """Perplexity of the generated parts of `samples` (B, N) under the AR `model`, pooled over
  every generated token (see sample_nll)."""
  return pooled_perplexity(*sample_nll(model, params, samples, prefix_len))


def row_entropies(generated) -> np.ndarray:
  """(B,): the entropy (nats) of each row's token frequency distribution."""
  entropies = []
  for row in np.asarray(generated):
    _, counts = np.unique(row, return_counts=True)
    p = counts / counts.sum()
    entropies.append(float(-(p * np.log(p)).sum()))
  return np.asarray(entropies)


def unigram_entropy(generated) -> float:
  """Mean over rows of the entropy (nats) of each row's token frequency distribution."""
  return float(np.mean(row_entropies(generated)))


def distinct_n(generated, n: int) -> float:
  """Unique n-grams / total n-grams, pooled over rows; n-grams stay inside a row."""
  grams = [tuple(row[i:i + n]) for row in np.asarray(generated).tolist()
           for i in range(len(row) - n + 1)]
  if not grams:
    raise ValueError(f'no {n}-grams: generated parts are shorter than {n} tokens.')
  return len(set(grams)) / len(grams)


def distinct_shares(generated, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(shares, counts), one per row: a row's n-gram occurrences each weighted 1 / (how often
  that n-gram occurs in the whole pool), and its number of n-grams. sum(shares) / sum(counts)
  is distinct_n: every unique n-gram contributes exactly 1 spread over its occurrences."""
  generated = np.asarray(generated)
  rows, length = generated.shape
  if length < n:
    raise ValueError(f'no {n}-grams: generated parts are shorter than {n} tokens.')
  grams = np.stack([generated[:, i:length - n + 1 + i] for i in range(n)], axis=-1)
  _, ids, pool_counts = np.unique(grams.reshape(-1, n), axis=0, return_inverse=True,
                                  return_counts=True)
  weights = (1.0 / pool_counts[ids.reshape(-1)]).reshape(rows, -1)
  return weights.sum(axis=1), np.full(rows, float(length - n + 1))


BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95


def bootstrap_ratio_interval(numerators, denominators, *, transform=None,
                             resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                             level: float = BOOTSTRAP_LEVEL) -> tuple[float, float]:
  """Percentile bootstrap interval of transform(sum(num) / sum(den)) over rows resampled with
  replacement (a fixed numpy seed, so a report is reproducible). Per-row sums are computed once
  and resampled as weights: resampling the completions of a pooled statistic."""
  numerators = np.asarray(numerators, np.float64)
  denominators = np.asarray(denominators, np.float64)
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(numerators), size=(resamples, len(numerators)))
  ratios = numerators[picks].sum(axis=1) / denominators[picks].sum(axis=1)
  values = ratios if transform is None else transform(ratios)
  tail = 100 * (1 - level) / 2
  lo, hi = np.percentile(values, [tail, 100 - tail])
  return float(lo), float(hi)


def perplexity_interval(nll, count, **kwargs) -> tuple[float, float]:
  """Bootstrap interval of the pooled generative perplexity (see sample_nll)."""
  return bootstrap_ratio_interval(nll, count, transform=np.exp, **kwargs)


def entropy_interval(generated, **kwargs) -> tuple[float, float]:
  """Bootstrap interval of unigram_entropy (a mean over rows)."""
  entropies = row_entropies(generated)
  return bootstrap_ratio_interval(entropies, np.ones_like(entropies), **kwargs)


def distinct_interval(generated, n: int, **kwargs) -> tuple[float, float]:
  """Bootstrap interval of distinct_n over rows, each row carrying its fixed share of the
  pool's unique n-grams (distinct_shares). Resampling whole rows and recounting would count a
  row drawn twice as repeating itself and bias every resample far below the estimate."""
  return bootstrap_ratio_interval(*distinct_shares(generated, n), **kwargs)


# a student is mode-seeking when its samples are both more likely under the teacher and less
# varied than the teacher's own samples: it collapsed toward the mode instead of sampling
MODE_SEEKING_PPL_RATIO = 0.9
MODE_SEEKING_ENTROPY_RATIO = 0.97
MODE_SEEKING_RULE = (f'gen. ppl under the teacher below {MODE_SEEKING_PPL_RATIO}x the AR '
                     f'samples\' and unigram entropy below {MODE_SEEKING_ENTROPY_RATIO}x the '
                     'AR samples\'')


def is_mode_seeking(gen_ppl_teacher: float, entropy: float, ar_gen_ppl_teacher: float,
                    ar_entropy: float) -> bool:
  """MODE_SEEKING_RULE: lower perplexity than the AR samples is a failure here, not a win."""
  return bool(gen_ppl_teacher < MODE_SEEKING_PPL_RATIO * ar_gen_ppl_teacher
              and entropy < MODE_SEEKING_ENTROPY_RATIO * ar_entropy)
