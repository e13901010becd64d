"""Models as (graphdef, parameter pytree) pairs.

`FunctionalModel` splits an NNX module once. Everything downstream (training steps, decode
loops, checkpoints) handles a plain nested dict of arrays, and rebuilds the module inside jit
with `module(params)`, which costs nothing at run time.
"""

import dataclasses
import math

import jax
from flax import nnx

from kforcing_jax.models.backbone import REMAT_POLICIES, Backbone, BackboneConfig
from kforcing_jax.models.student import PushForwardLM

KINDS = ('ar', 'pflm')


def backbone_config(model_cfg) -> BackboneConfig:
  """BackboneConfig from a config's `model` block, padding the vocabulary for sharding."""
  multiple = int(model_cfg.get('pad_vocab_to_multiple_of', 1))
  padded = int(math.ceil(model_cfg.vocab_size / multiple) * multiple)
  if model_cfg.d_model % model_cfg.num_heads:
    raise ValueError(f'model.d_model={model_cfg.d_model} is not divisible by '
                     f'model.num_heads={model_cfg.num_heads}.')
  if (model_cfg.d_model // model_cfg.num_heads) % 2:
    raise ValueError('RoPE needs an even head dim: choose d_model / num_heads even.')
  if not 0 <= model_cfg.mask_id < model_cfg.vocab_size:
    raise ValueError(f'model.mask_id={model_cfg.mask_id} is outside the vocabulary '
                     f'(vocab_size={model_cfg.vocab_size}).')
  remat = model_cfg.get('remat', 'none')
  if remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat={remat!r}; expected one of {tuple(REMAT_POLICIES)}.')
  return BackboneConfig(vocab_size=padded, num_real_tokens=model_cfg.vocab_size,
                        mask_id=model_cfg.mask_id, d_model=model_cfg.d_model,
                        num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
                        mlp_ratio=model_cfg.get('mlp_ratio', 4), dtype=model_cfg.dtype,
                        remat=remat)


@dataclasses.dataclass(frozen=True)
class FunctionalModel:
  """An NNX model split once: static graphdef, parameter shapes and logical axis names."""
  cfg: BackboneConfig
  kind: str = 'ar'
  k_max: int = 1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'unknown model kind {self.kind!r}; expected one of {KINDS}.')
    abstract = nnx.eval_shape(lambda: self._construct(nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    logical = jax.tree.map(lambda v: v.get_metadata()['logical_axes'], state,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
    object.__setattr__(self, 'graphdef', graphdef)
    object.__setattr__(self, 'param_shapes', nnx.to_pure_dict(state))
    object.__setattr__(self, 'logical_axes', nnx.to_pure_dict(logical))

  def _construct(self, rngs):
    if self.kind == 'ar':
      return Backbone(self.cfg, rngs)
    return PushForwardLM(self.cfg, self.k_max, rngs)

  def init(self, rng: jax.Array) -> dict:
    """Fresh float32 parameters (a pure function of `rng`; jit it with out_shardings)."""
    _, state = nnx.split(self._construct(nnx.Rngs(params=rng)))
    return nnx.to_pure_dict(state)

  def module(self, params: dict):
    """The NNX module bound to `params`; call only inside the pure function being traced."""
    return nnx.merge(self.graphdef, params)

  def num_params(self) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(self.param_shapes))
