"""Device meshes and logical-axis sharding rules.

Every parameter carries logical axis names (see models/backbone.py); activations are
constrained by name too. A rules table from the config maps each logical name to a mesh
axis (or a tuple of them, or None), so changing how a model is parallelised is a config
edit, never a code edit. A single CPU is simply a 1x1x1 mesh running the same code.
"""

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kforcing_jax import progress

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical name -> mesh axes. The first logical dim that claims a mesh axis keeps it; a later
# dim in the same array that maps to an already-used axis stays unsharded.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('head_dim', None),
    ('length', None),
    ('cache_length', None),
)

_active: list = []  # stack of (mesh, rules) set by `use_mesh_rules`


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replace a single -1 in `shape` by whatever fills the devices; check the product."""
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f'mesh shape {tuple(shape)}: at most one axis may be -1.')
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
      raise ValueError(f'mesh shape {tuple(shape)} does not divide {num_devices} devices.')
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f'mesh shape {tuple(shape)} needs {math.prod(shape)} devices but '
                     f'{num_devices} are available; set config.mesh_shape (use -1 to fill).')
  return tuple(shape)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(shape, len(devices))
  device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], rules=DEFAULT_RULES,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> PartitionSpec:
  """Map logical axis names to a PartitionSpec. With shape+mesh, undividable dims replicate."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    axes = table.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def tree_shardings(logical_tree: Any, shapes: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for a pytree, given matching trees of logical names and shapes."""
  return jax.tree.map(
      lambda names, shp: NamedSharding(mesh, logical_to_spec(names, rules, shp.shape, mesh)),
      logical_tree, shapes, is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Shard dim 0 over the batch axes, replicate the rest."""
  return NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (ndim - 1), rules,
                                             mesh=mesh))


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules=DEFAULT_RULES):
  """Activate `mesh` and `rules` for `constrain` calls made while tracing."""
  _active.append((mesh, tuple(rules)))
  try:
    yield
  finally:
    _active.pop()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `use_mesh_rules` or on 1 device."""
  if not _active:
    return x
  mesh, rules = _active[-1]
  if mesh.size == 1:
    return x
  spec = logical_to_spec(names, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def log_parameter_shardings(logical_tree, shapes, mesh: Mesh, rules=DEFAULT_RULES,
                            large: int = 1 << 20, verbose: bool = True) -> int:
  """Print every parameter's shape and PartitionSpec; fail if a large one is replicated
  while fsdp > 1.

  Returns the parameter count.
  """
  flat_names = jax.tree_util.tree_leaves_with_path(
      logical_tree, is_leaf=lambda x: isinstance(x, tuple))
  flat_shapes = jax.tree.leaves(shapes)
  total = 0
  replicated_large = []
  for (path, names), shp in zip(flat_names, flat_shapes):
    spec = logical_to_spec(names, rules, shp.shape, mesh)
    size = math.prod(shp.shape)
    total += size
    name = jax.tree_util.keystr(path)
    if verbose:
      progress.log(f'  param {name:<40s} {str(shp.shape):<20s} {spec}')
    if size >= large and all(s is None for s in spec):
      replicated_large.append(name)
  progress.log(f'  parameters: {total:,} ({total / 1e6:.2f}M) on mesh {dict(mesh.shape)}')
  if mesh.shape['fsdp'] > 1 and replicated_large:
    raise ValueError(f'fsdp={mesh.shape["fsdp"]} but these large parameters stay fully '
                     f'replicated: {replicated_large}; fix config.sharding_rules.')
  return total


def global_batch(local: dict, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
  """Assemble per-process numpy batches (leading dim = this host's rows) into global arrays."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, rules), v)
          for k, v in local.items()}


def mesh_from_config(config, devices=None) -> Mesh:
  return make_mesh(tuple(config.mesh_shape), devices)


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh and the rules table that maps logical axis names onto it: everything a jitted
  function needs to place parameters, batches and activations."""
  mesh: Mesh
  rules: tuple = DEFAULT_RULES

  def param_shardings(self, model) -> Any:
    """NamedShardings of `model`'s parameters (a models.FunctionalModel)."""
    return tree_shardings(model.logical_axes, model.param_shapes, self.mesh, self.rules)

  def abstract_params(self, model) -> Any:
    """ShapeDtypeStructs of `model`'s parameters with their shardings: a restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        model.param_shapes, self.param_shardings(model))

  def batch(self, ndim: int) -> NamedSharding:
    return batch_sharding(self.mesh, ndim, self.rules)

  def abstract_batch(self, shapes: dict) -> dict:
    """{name: (shape, dtype)} -> batch-sharded ShapeDtypeStructs."""
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch(len(shape)))
            for name, (shape, dtype) in shapes.items()}

  def global_batch(self, local: dict) -> dict:
    return global_batch(local, self.mesh, self.rules)


def layout_from_config(config, devices=None) -> Layout:
  """The config's mesh (config.mesh_shape over `devices`, default all) and rules
  (config.sharding_rules)."""
  return Layout(mesh_from_config(config, devices),
                tuple(tuple(r) for r in config.sharding_rules))


def single_device_layout(device=None) -> Layout:
  """A 1x1x1 mesh on one device (default: this process's first) with the default rules."""
  return Layout(make_mesh((1, 1, 1), [device or jax.local_devices()[0]]), DEFAULT_RULES)
