"""Random model parameters for tests, built on the host (tracing model.init costs seconds)."""

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.models import FunctionalModel


def random_params(model: FunctionalModel, seed: int, head_scale: float | None = None) -> dict:
  """LayerNorm scales 1, biases 0, every matrix N(0, 1/fan_in) - the output head included
  (model.init zeroes it, which would make every logit equal). `head_scale` overrides the
  head's standard deviation."""
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    name = str(path[-1].key)
    if name.startswith('norm') and not name.endswith('bias'):
      return jnp.ones(shape.shape)
    if name.endswith('bias'):
      return jnp.zeros(shape.shape)
    fan_in = np.prod(shape.shape[:-1]) if name == 'attn_out' else shape.shape[0]
    std = head_scale if name == 'head' and head_scale is not None else fan_in ** -0.5
    return jnp.asarray(std * rng.standard_normal(shape.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, model.param_shapes)
