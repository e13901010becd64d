"""Quality metrics of language-model outputs: next-token NLL, generative perplexity, unigram
entropy and distinct-n."""

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
def _chunk_nll(model, params, tokens, mask):
  logits, _ = model.module(params)(tokens)
  return next_token_nll(logits, tokens, mask)


def generative_perplexity(model, params, samples, prefix_len: int) -> float:
  """Perplexity of the generated parts of `samples` (B, N) under the AR `model` (a
  models.FunctionalModel), pooled over every generated token.

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
  nll, count = 0.0, 0.0
  for start in range(0, total, chunk):
    n, c = jax.device_get(_chunk_nll(model, params, tokens[start:start + chunk],
                                     mask[start:start + chunk]))
    nll, count = nll + float(n), count + float(c)
  return float(np.exp(nll / count))


def unigram_entropy(generated) -> float:
  """Mean over rows of the entropy (nats) of each row's token frequency distribution."""
  entropies = []
  for row in np.asarray(generated):
    _, counts = np.unique(row, return_counts=True)
    p = counts / counts.sum()
    entropies.append(float(-(p * np.log(p)).sum()))
  return float(np.mean(entropies))


def distinct_n(generated, n: int) -> float:
  """Unique n-grams / total n-grams, pooled over rows; n-grams stay inside a row."""
  grams = [tuple(row[i:i + n]) for row in np.asarray(generated).tolist()
           for i in range(len(row) - n + 1)]
  if not grams:
    raise ValueError(f'no {n}-grams: generated parts are shorter than {n} tokens.')
  return len(set(grams)) / len(grams)
