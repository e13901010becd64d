"""Quality metrics of language-model outputs: next-token NLL, generative perplexity, unigram
entropy and distinct-n."""

import jax
import jax.numpy as jnp


def next_token_nll(logits, tokens, mask):
  """Summed next-token NLL and target count: position t predicts t+1 where mask[t+1] = 1."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  weights = mask[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)
