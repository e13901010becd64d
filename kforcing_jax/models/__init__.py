"""Models as (graphdef, parameter pytree) pairs, and the one place that builds them.

`FunctionalModel` splits an NNX module once. Everything downstream (training steps, decode
loops, checkpoints) handles a plain nested dict of arrays, and rebuilds the module inside jit
with `module(params)`, which costs nothing at run time.

Factories: `teacher(config)` (the AR model, kind 'ar', k_max 1), `student(config, k)` (a PFLM
with k_max = k) and `from_shapes(shapes, ...)` (the architecture of a stored export).
"""

import dataclasses
import math

import jax
from flax import nnx

from kforcing_jax.models.backbone import REMAT_POLICIES, Backbone, BackboneConfig
from kforcing_jax.models.pflm import PushForwardLM
from kforcing_jax.sampling import CDF_ORDERS, READOUTS

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
  kv_heads = int(model_cfg.get('num_kv_heads', 0))
  if kv_heads < 0 or (kv_heads and model_cfg.num_heads % kv_heads):
    raise ValueError(f'model.num_kv_heads={kv_heads} must divide model.num_heads='
                     f'{model_cfg.num_heads} (0 = num_heads: multi-head attention).')
  cdf_order = model_cfg.get('cdf_order', 'id')
  if cdf_order not in CDF_ORDERS:
    raise ValueError(f'model.cdf_order={cdf_order!r}; expected one of {CDF_ORDERS}.')
  noise_scale = float(model_cfg.get('noise_scale', 1.0))
  if not noise_scale > 0:
    raise ValueError(f'model.noise_scale={noise_scale} must be positive.')
  readout = model_cfg.get('readout', 'argmax')
  if readout not in READOUTS:
    raise ValueError(f'model.readout={readout!r}; expected one of {READOUTS}.')
  remat = model_cfg.get('remat', 'none')
  if remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat={remat!r}; expected one of {tuple(REMAT_POLICIES)}.')
  return BackboneConfig(vocab_size=padded, num_real_tokens=model_cfg.vocab_size,
                        mask_id=model_cfg.mask_id, d_model=model_cfg.d_model,
                        num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
                        mlp_ratio=model_cfg.get('mlp_ratio', 4),
                        num_kv_heads=0 if kv_heads == model_cfg.num_heads else kv_heads,
                        dtype=model_cfg.dtype,
                        remat=remat, cdf_order=cdf_order, noise_scale=noise_scale,
                        readout=readout,
                        token_feedback=bool(model_cfg.get('token_feedback', False)))


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


def teacher(config) -> FunctionalModel:
  """The AR teacher of a config (its `model` block)."""
  return FunctionalModel(backbone_config(config.model), 'ar')


def student(config, k: int) -> FunctionalModel:
  """The push-forward student of a config that decodes up to k tokens per step."""
  return FunctionalModel(backbone_config(config.model), 'pflm', k_max=k)


def kind_of_shapes(shapes: dict) -> str | None:
  """'ar' or 'pflm' from a parameter tree's top-level names, None for neither."""
  if 'backbone' in shapes and 'noise_encoder' in shapes:
    return 'pflm'
  if 'embed' in shapes and 'blocks' in shapes:
    return 'ar'
  return None


def config_from_shapes(shapes: dict, vocab_size: int, mask_id: int, dtype: str = 'float32',
                       **recorded) -> BackboneConfig:
  """The backbone architecture of a stored AR parameter tree (or a student's 'backbone').

  vocab_size / mask_id are the tokenizer's (the stored embedding may have padding rows);
  `recorded`: settings the shapes cannot tell (cdf_order, noise_scale, readout), as the model recorded."""
  try:
    rows, d_model = shapes['embed']
    blocks = shapes['blocks']
    if 'qkv' in blocks['0']:
      _, _, heads, _ = blocks['0']['qkv']
      kv_heads = 0
    else:  # grouped-query attention
      _, heads, _ = blocks['0']['q']
      _, _, kv_heads, _ = blocks['0']['kv']
    mlp = blocks['0']['mlp_in'][1]
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'not a backbone parameter tree of this project (missing or odd tensor '
                     f'{e}).') from e
  if rows < vocab_size:
    raise ValueError(f'the stored model has a {rows}-token vocabulary but the tokenizer has '
                     f'{vocab_size} ids: it was trained with another tokenizer.')
  return BackboneConfig(vocab_size=rows, num_real_tokens=vocab_size, mask_id=mask_id,
                        d_model=d_model, num_layers=len(blocks), num_heads=heads,
                        num_kv_heads=kv_heads,
                        mlp_ratio=mlp // d_model, dtype=dtype, **recorded)


def from_shapes(shapes: dict, *, vocab_size: int, mask_id: int, dtype: str = 'float32',
                k_max: int = 1, **recorded) -> FunctionalModel:
  """The model whose parameters have exactly `shapes` (an AR or a PFLM tree)."""
  kind = kind_of_shapes(shapes)
  if kind is None:
    raise ValueError(f'not a model of this project: top-level tensors {sorted(shapes)}.')
  backbone = shapes['backbone'] if kind == 'pflm' else shapes
  if kind == 'pflm':  # the feedback block's tensors say whether the student has one
    recorded = {**recorded, 'token_feedback': 'feedback' in shapes}
  cfg = config_from_shapes(backbone, vocab_size, mask_id, dtype, **recorded)
  model = FunctionalModel(cfg, kind, k_max=k_max)
  difference = shape_difference(model.param_shapes, shapes)
  if difference:
    raise ValueError(f'the stored tensors do not form a {kind} model of this project: '
                     f'{difference}.')
  return model


def flat_shapes(tree) -> dict:
  """{'blocks/0/qkv': shape, ...}: list indices and string keys compare equal."""
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, tuple) or hasattr(x, 'shape'))
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path):
          tuple(getattr(leaf, 'shape', leaf)) for path, leaf in leaves}


def shape_difference(expected, stored) -> str | None:
  """A sentence naming the first tensor that differs between two shape trees, or None."""
  want, have = flat_shapes(expected), flat_shapes(stored)
  for name in sorted(set(want) | set(have)):
    if name not in have:
      return f'tensor {name} {want[name]} is missing'
    if name not in want:
      return f'unexpected tensor {name} {have[name]}'
    if want[name] != have[name]:
      return f'tensor {name} has shape {have[name]}, expected {want[name]}'
  return None
