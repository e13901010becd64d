"""The converted run directory: exactly what our CLIs read from a trained one.

  DST/teacher/params        AR checkpoint            (train.py writes the same)
  DST/student_k{K}/params   PFLM checkpoint, k_max K (distill.stage_dir(DST, K)/params)
  DST/config.py             --config=DST/config.py for train / distill / evaluate / generate
  DST/converted.json        the model settings and what was converted from where

An AR and a PFLM checkpoint may be converted into the same DST (that is what distilling a
wider stage from a released student needs); their model settings must then agree.
"""

import importlib
import json
import os

from kforcing_jax.convert import errors

# config.model fields that rebuild a converted architecture (see models.backbone_config)
MODEL_FIELDS = ('vocab_size', 'mask_id', 'pad_vocab_to_multiple_of', 'd_model', 'num_layers',
                'num_heads')
MANIFEST = 'converted.json'
CONFIG = 'config.py'
# the dataset configs whose vocabulary the authors' checkpoints use; others start from common
PAPER_CONFIGS = {30522: 'lm1b_ar', 50258: 'owt_ar'}


def export_path(dst: str, kind: str, k: int) -> str:
  return os.path.join(dst, 'teacher' if kind == 'ar' else f'student_k{k}', 'params')


def read_manifest(dst: str) -> dict | None:
  path = os.path.join(dst, MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_destination(dst: str, relative_export: str, model: dict) -> dict:
  """The manifest to extend; raises DestinationError when writing would clobber or contradict."""
  manifest = read_manifest(dst)
  if manifest is None:
    if os.path.exists(os.path.join(dst, CONFIG)):
      raise errors.DestinationError(f'{dst} already has a {CONFIG} that this converter did not '
                                    'write; convert into a new --dst.')
    manifest = {'model': model, 'exports': {}}
  elif manifest['model'] != model:
    diff = ', '.join(f'{key} {manifest["model"].get(key)} vs {value}'
                     for key, value in model.items() if manifest['model'].get(key) != value)
    raise errors.DestinationError(f'{dst} holds a conversion with different model settings '
                                  f'({diff}); use another --dst.')
  if os.path.exists(os.path.join(dst, relative_export)):
    raise errors.DestinationError(f'{os.path.join(dst, relative_export)} already exists; delete '
                                  'it or choose another --dst.')
  return manifest


def write_manifest(dst: str, manifest: dict) -> None:
  with open(os.path.join(dst, MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=2, sort_keys=True)


def distill_stages(base_stages, student_ks) -> tuple:
  """The base schedule, extended by doubling until it holds one stage beyond the widest
  converted student: with student_k4 converted, `distill --stage=8` starts from it."""
  stages = [tuple(int(x) for x in stage) for stage in base_stages]
  target = 2 * max(student_ks, default=0)
  while stages[-1][0] < target:
    stages.append((2 * stages[-1][0], stages[-1][1]))
  return tuple(stages)


def config_source(model: dict, student_ks) -> str:
  """Python source of DST/config.py: the paper config for this vocabulary (or the common
  defaults) with the converted model's settings."""
  base = PAPER_CONFIGS.get(model['vocab_size'], 'common')
  make = 'base_config' if base == 'common' else 'get_config'
  base_stages = getattr(importlib.import_module(f'configs.{base}'), make)().distill.stages
  lines = [
      '"""Config for the checkpoints converted into this directory by kforcing_jax.convert.',
      '',
      f'Base: configs/{base}.py, with the converted model\'s settings. Use it as',
      '--config=<this file> --workdir=<this directory> with train / distill / evaluate /',
      'generate. Written by the converter: edits are overwritten by the next conversion here.',
      '"""',
      '',
      f'from configs import {base}',
      '',
      '',
      'def get_config():',
      f'  c = {base}.{make}()',
  ]
  if base == 'common':
    lines.append(f'  c.data.vocab_size = {model["vocab_size"]}  # the bpe tokenizer must match')
  lines += [f'  c.model.{key} = {model[key]!r}' for key in MODEL_FIELDS]
  lines.append(f'  c.distill.stages = {distill_stages(base_stages, student_ks)!r}')
  lines += ['  return c', '']
  return '\n'.join(lines)


def write_config(dst: str, manifest: dict) -> str:
  student_ks = [entry['k'] for entry in manifest['exports'].values() if entry['kind'] == 'pflm']
  path = os.path.join(dst, CONFIG)
  with open(path, 'w') as f:
    f.write(config_source(manifest['model'], student_ks))
  return path
