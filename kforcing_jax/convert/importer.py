"""One conversion: read, check, map, export, and write the run directory's config."""

import os

import jax
import jax.numpy as jnp
import ml_collections

from kforcing_jax import checkpoints
from kforcing_jax.convert import errors, layout, mapping, reader, run_dir, validate
from kforcing_jax.models import FunctionalModel, backbone_config

# the paper vocabularies' reserved mask ids (METHOD.md s.2)
PAPER_MASK_IDS = {30522: 103, 50258: 50257}


def resolve_mask_id(vocab_size: int, mask_id: int | None) -> int:
  if mask_id is None:
    if vocab_size not in PAPER_MASK_IDS:
      raise errors.ConversionError(
          f'vocabulary size {vocab_size} is not a paper vocabulary (30522 bert, 50258 GPT-2 + '
          'mask), so the mask id is unknown: pass --mask_id.')
    return PAPER_MASK_IDS[vocab_size]
  if not 0 <= mask_id < vocab_size:
    raise errors.ConversionError(f'--mask_id={mask_id} is outside the vocabulary '
                                 f'[0, {vocab_size}).')
  return mask_id


def check_window(kind: str, k: int) -> None:
  # distillation stages double from k = 1, so only powers of two fit a stage schedule
  if kind == 'pflm' and (k < 1 or k & (k - 1)):
    raise errors.ConversionError(f'--k={k}: a student\'s k must be a power of two (1, 2, 4, 8, '
                                 '...), the window it was distilled for.')


def model_settings(dims: layout.Dims, mask_id: int, pad_multiple: int) -> dict:
  """run_dir.MODEL_FIELDS of this architecture."""
  values = (dims.vocab_size, mask_id, pad_multiple, dims.d_model, dims.num_layers,
            dims.num_heads)
  return dict(zip(run_dir.MODEL_FIELDS, values))


def our_model(model: dict, kind: str, k: int) -> FunctionalModel:
  cfg = backbone_config(ml_collections.ConfigDict(dict(model, mlp_ratio=4, dtype='float32')))
  return FunctionalModel(cfg, kind, k_max=k if kind == 'pflm' else 1)


def convert_checkpoint(src: str, dst: str, kind: str | None = None, k: int = 4,
                       pad_vocab_to_multiple_of: int = 128, mask_id: int | None = None,
                       log=print) -> dict:
  """Convert one authors' checkpoint into the run directory `dst`. Returns the export's meta
  (with 'params' = trained values and 'path' = where it went)."""
  if pad_vocab_to_multiple_of < 1:
    raise errors.ConversionError(f'--pad_vocab_to_multiple_of={pad_vocab_to_multiple_of} must '
                                 'be >= 1.')
  state = reader.read_state_dict(src)
  kind, dims = validate.check_state_dict(state, kind)
  check_window(kind, k)
  model = model_settings(dims, resolve_mask_id(dims.vocab_size, mask_id),
                         pad_vocab_to_multiple_of)
  k = k if kind == 'pflm' else 0  # 0 = the AR teacher, as in `generate --k=0`
  relative = os.path.relpath(run_dir.export_path(dst, kind, k), dst)
  manifest = run_dir.check_destination(dst, relative, model)

  target = our_model(model, kind, k)
  params = mapping.to_params(state, kind, dims, target.cfg.vocab_size)
  # the mapping must land on exactly the tree our model builds; a mismatch is a converter bug
  produced = jax.tree.map(lambda x: tuple(x.shape), params)
  if produced != jax.tree.map(lambda x: tuple(x.shape), target.param_shapes):
    raise AssertionError(f'converter bug: parameter tree {produced} does not match the model')
  meta = dict(model, kind=kind, k=k, source=os.path.abspath(src), converted=True,
              padded_vocab_size=target.cfg.vocab_size,
              params=layout.parameter_count(layout.expected_shapes(kind, dims)))
  path = os.path.join(dst, relative)
  checkpoints.export_params(path, jax.tree.map(jnp.asarray, params), meta)
  manifest['exports'][relative] = {'kind': kind, 'k': k, 'source': meta['source']}
  run_dir.write_manifest(dst, manifest)
  config_path = run_dir.write_config(dst, manifest)
  log(f'{src}: {kind}, V={dims.vocab_size} (padded to {target.cfg.vocab_size}, mask id '
      f'{model["mask_id"]}), D={dims.d_model}, L={dims.num_layers}, H={dims.num_heads}, '
      f'{meta["params"]:,} params')
  log(f'  -> {path}' + (f' (k={k})' if kind == 'pflm' else ''))
  log(f'  -> {config_path} (use --config={config_path} --workdir={dst})')
  return dict(meta, path=path)

