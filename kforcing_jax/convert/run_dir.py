"""The converted run directory: exactly what our CLIs read from a trained one.

  DST/<AR model dir>/params       AR checkpoint (rundir.teacher_dir: where training writes it)
  DST/<stage K dir>/params        PFLM checkpoint, k_max K (rundir.stage_dir(DST, K))
  DST/config.py                   --config=DST/config.py for train / distill / evaluate / ...
  DST/converted.json              the base config, the model settings and what came from where

DST/config.py is the base config the user named (--config=configs/lm1b_ar.py, loaded from
that path, relative to the directory the commands run from) with the converted model's
settings, the compute dtype of the conversion check (rundir.CONVERTED_DTYPE, also in each
export's meta with the params' fingerprint) and a distillation schedule that reaches one stage past the widest converted student.
An AR and a PFLM checkpoint may be converted into the same DST (that is what distilling a
wider stage from a released student needs); their base config and model settings must agree.
"""

import os

from etils import epath

from kforcing_jax import progress, rundir
from kforcing_jax.convert import errors

# config.model fields that rebuild a converted architecture (see models.backbone_config)
MODEL_FIELDS = ('vocab_size', 'mask_id', 'pad_vocab_to_multiple_of', 'd_model', 'num_layers',
                'num_heads')
MANIFEST = 'converted.json'
CONFIG = 'config.py'


def export_path(dst: str, kind: str, k: int) -> str:
  """params/ of the AR model directory (kind 'ar') or of stage k (kind 'pflm')."""
  return rundir.params_dir(rundir.model_dir(dst, kind, k if kind == 'pflm' else None))


def read_manifest(dst: str) -> dict | None:
  return progress.read_json(epath.Path(dst) / MANIFEST)


def check_destination(dst: str, relative_export: str, model: dict, base_config: str) -> dict:
  """The manifest to extend; raises DestinationError when writing would clobber or contradict."""
  root = epath.Path(dst)
  manifest = read_manifest(dst)
  if manifest is None:
    if (root / CONFIG).exists():
      raise errors.DestinationError(f'{dst} already has a {CONFIG} that this converter did not '
                                    'write; convert into a new --dst.')
    manifest = {'base_config': base_config, 'model': model, 'exports': {}}
  elif (os.path.abspath(manifest.setdefault('base_config', base_config))  # older manifests: none
        != os.path.abspath(base_config)):
    raise errors.DestinationError(f'{dst} holds a conversion based on --config='
                                  f'{manifest["base_config"]}; convert with that config or into '
                                  'another --dst.')
  elif manifest['model'] != model:
    diff = ', '.join(f'{key} {manifest["model"].get(key)} vs {value}'
                     for key, value in model.items() if manifest['model'].get(key) != value)
    raise errors.DestinationError(f'{dst} holds a conversion with different model settings '
                                  f'({diff}); use another --dst.')
  if (root / relative_export).exists():
    raise errors.DestinationError(f'{root / relative_export} already exists; delete it or '
                                  'choose another --dst.')
  return manifest


def write_manifest(dst: str, manifest: dict) -> None:
  progress.write_json(epath.Path(dst) / MANIFEST, manifest)


def distill_stages(base_stages, student_ks) -> tuple:
  """The base schedule, extended by doubling until it holds one stage beyond the widest
  converted student: with a k = 4 student converted, `distill --stage=8` starts from it."""
  stages = [tuple(int(x) for x in stage) for stage in base_stages]
  target = 2 * max(student_ks, default=0)
  while stages[-1][0] < target:
    stages.append((2 * stages[-1][0], stages[-1][1]))
  return tuple(stages)


def config_source(manifest: dict, config) -> str:
  """Python source of DST/config.py: the base config file with the converted model's settings
  (`config` is the base as the converter got it: its schedule and tokenizer kind are used)."""
  model, base = manifest['model'], manifest['base_config']
  student_ks = [entry['k'] for entry in manifest['exports'].values() if entry['kind'] == 'pflm']
  lines = [
      '"""Config for the checkpoints converted into this directory by kforcing_jax.main.convert.',
      '',
      f'Base: {base} (the --config given to the converter), with the converted model\'s',
      'settings. Use it as --config=<this file> --workdir=<this directory> with train / distill /',
      'evaluate / generate / reproduce. Written by the converter: edits are overwritten by the',
      'next conversion here.',
      '"""',
      '',
      'import importlib.util',
      '',
      f'BASE = {base!r}  # relative paths: from the directory the commands run in',
      '',
      '',
      'def get_config():',
      "  spec = importlib.util.spec_from_file_location('converted_base_config', BASE)",
      '  base = importlib.util.module_from_spec(spec)',
      '  spec.loader.exec_module(base)',
      '  c = base.get_config()',
  ]
  if config.data.tokenizer == 'bpe':
    lines.append(f'  c.data.vocab_size = {model["vocab_size"]}  # the bpe tokenizer must match')
  lines += [f'  c.model.{key} = {model[key]!r}' for key in MODEL_FIELDS]
  # the dtype of the conversion check: another one gives other tokens (loads refuse it)
  lines.append(f'  c.model.dtype = {rundir.CONVERTED_DTYPE!r}')
  lines.append(f'  c.distill.stages = {distill_stages(config.distill.stages, student_ks)!r}')
  lines += ['  return c', '']
  return '\n'.join(lines)


def write_config(dst: str, manifest: dict, config) -> str:
  path = epath.Path(dst) / CONFIG
  path.write_text(config_source(manifest, config))
  return str(path)
