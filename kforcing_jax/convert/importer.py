"""One conversion: read, check, map, export, and write the run directory's config."""

import os

import jax
import jax.numpy as jnp
import ml_collections

from kforcing_jax import checkpoints, data, provenance, rundir
from kforcing_jax.convert import errors, layout, mapping, reader, run_dir, validate
from kforcing_jax.models import FunctionalModel, backbone_config


def model_settings(config, config_file: str, dims: layout.Dims) -> dict:
  """run_dir.MODEL_FIELDS of the converted model: the vocabulary, mask id and padding from the
  base config (its vocabulary checked against the checkpoint's), the widths from the shapes."""
  m = config.model
  if m.vocab_size != dims.vocab_size:
    raise errors.ConversionError(
        f'the checkpoint has a {dims.vocab_size}-token vocabulary ({layout.EMBEDDING} rows) but '
        f'--config={config_file} has model.vocab_size={m.vocab_size}: name the config of the '
        "checkpoint's dataset (configs/lm1b_ar.py: bert, 30522; configs/owt_ar.py: GPT-2 + "
        f'mask, 50258), or set --config.model.vocab_size={dims.vocab_size} and '
        '--config.model.mask_id=<its mask id>.')
  if not 0 <= m.mask_id < dims.vocab_size:
    raise errors.ConversionError(f'--config.model.mask_id={m.mask_id} is outside the '
                                 f'vocabulary [0, {dims.vocab_size}).')
  if m.get('cdf_order', 'id') != 'id' or float(m.get('noise_scale', 1.0)) != 1.0:
    raise errors.ConversionError(
        f'--config={config_file} has model.cdf_order={m.get("cdf_order")!r} and '
        f'model.noise_scale={m.get("noise_scale")}: the authors\' checkpoints sample in token-id '
        "order with phi(u): use --config.model.cdf_order=id --config.model.noise_scale=1.")
  if m.get('readout', 'argmax') != 'argmax':
    raise errors.ConversionError(
        f'--config={config_file} has model.readout={m.get("readout")!r}: the authors\' students '
        'emit the argmax of each slot: use --config.model.readout=argmax.')
  if m.pad_vocab_to_multiple_of < 1:
    raise errors.ConversionError('--config.model.pad_vocab_to_multiple_of='
                                 f'{m.pad_vocab_to_multiple_of} must be >= 1.')
  values = (dims.vocab_size, m.mask_id, m.pad_vocab_to_multiple_of, dims.d_model,
            dims.num_layers, dims.num_heads)
  return dict(zip(run_dir.MODEL_FIELDS, values))


def tokenizer_fingerprint(config, dims: layout.Dims) -> str | None:
  """provenance.tokenizer_fingerprint of the base config's tokenizer when it is at hand and
  fits the checkpoint (size and mask id), so loads with another tokenizer of the same size are
  refused; None when it is not (the converter needs no tokenizer: loads then check the size
  and mask id only)."""
  try:
    tokenizer = data.load_tokenizer(config)
  except (FileNotFoundError, ValueError):
    return None
  if (tokenizer.vocab_size, tokenizer.mask_id) != (dims.vocab_size, config.model.mask_id):
    return None
  return provenance.tokenizer_fingerprint(tokenizer)


def check_window(kind: str, k: int) -> None:
  # distillation stages double from k = 1, so only powers of two fit a stage schedule
  if kind == 'pflm' and (k < 1 or k & (k - 1)):
    raise errors.ConversionError(f'--k={k}: a student\'s k must be a power of two (1, 2, 4, 8, '
                                 '...), the window it was distilled for.')


def our_model(model: dict, kind: str, k: int) -> FunctionalModel:
  """The converted model as the conversion check runs it: in rundir.CONVERTED_DTYPE, which the
  export's meta and DST/config.py record, so every later command computes the same tokens."""
  cfg = backbone_config(ml_collections.ConfigDict(dict(model, mlp_ratio=4,
                                                       dtype=rundir.CONVERTED_DTYPE)))
  return FunctionalModel(cfg, kind, k_max=k)


def convert_checkpoint(src: str, dst: str, config, config_file: str, kind: str | None = None,
                       k: int = 4, log=print) -> dict:
  """Convert one authors' checkpoint into the run directory `dst`.

  config: the base config (a ConfigDict; its model.vocab_size must be the checkpoint's, and its
  mask_id and pad_vocab_to_multiple_of are used); config_file: where it was read from, which
  DST/config.py loads. Returns the export's meta (with 'params' = trained values and 'path' =
  where it went)."""
  state = reader.read_state_dict(src)
  kind, dims = validate.check_state_dict(state, kind)
  check_window(kind, k)
  model = model_settings(config, config_file, dims)
  k = k if kind == 'pflm' else 1  # the AR model decodes one token per step
  path = run_dir.export_path(dst, kind, k)
  relative = os.path.relpath(path, dst)
  manifest = run_dir.check_destination(dst, relative, model, config_file)

  target = our_model(model, kind, k)
  params = mapping.to_params(state, kind, dims, target.cfg.vocab_size)
  # the mapping must land on exactly the tree our model builds; a mismatch is a converter bug
  produced = jax.tree.map(lambda x: tuple(x.shape), params)
  if produced != jax.tree.map(lambda x: tuple(x.shape), target.param_shapes):
    raise AssertionError(f'converter bug: parameter tree {produced} does not match the model')
  params = jax.tree.map(jnp.asarray, params)
  meta = dict(model, kind=kind, k=k, source=os.path.abspath(src), converted=True,
              padded_vocab_size=target.cfg.vocab_size, dtype=target.cfg.dtype,
              params=layout.parameter_count(layout.expected_shapes(kind, dims)),
              **{provenance.PARAMS_KEY: provenance.params_fingerprint(params)})
  fingerprint = tokenizer_fingerprint(config, dims)
  if fingerprint is not None:
    meta[provenance.TOKENIZER_KEY] = fingerprint
  checkpoints.export_params(path, params, meta)
  manifest['exports'][relative] = {'kind': kind, 'k': k, 'source': meta['source']}
  run_dir.write_manifest(dst, manifest)
  config_path = run_dir.write_config(dst, manifest, config)
  log(f'{src}: {kind}, V={dims.vocab_size} (padded to {target.cfg.vocab_size}, mask id '
      f'{model["mask_id"]}), D={dims.d_model}, L={dims.num_layers}, H={dims.num_heads}, '
      f'{meta["params"]:,} params')
  log(f'  -> {path}' + (f' (k={k})' if kind == 'pflm' else ''))
  log(f'  -> {config_path} (use --config={config_path} --workdir={dst})')
  return dict(meta, path=path)
