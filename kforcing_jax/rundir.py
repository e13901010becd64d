"""The run directory: the one module that knows where a run keeps what, and loads its models.

    <workdir>/teacher/         the AR teacher: checkpoints/, params/, metrics.jsonl, eval.json,
                               config.json, TensorBoard events
    <workdir>/student_k{K}/    the distillation stage with window k = K (same files)
    <workdir>/student_k{K}.stale-<UTC time>/   a stage set aside by distill because its teacher
                               changed since it was made (see Provenance below; never loaded)
    <workdir>/report/          evaluate's results.json, REPORT.md and plots
    <workdir>/evaluator/       the independent AR evaluator's own run directory (its teacher/)
    <workdir>/baselines/<name>/  a method K-Forcing is compared with (`make compare`): draft/
                               (speculative decoding's AR draft: its own teacher/ inside),
                               heads_k{K}/, mdlm/ (same files as a model directory)
    <workdir>/sizes/<name>/    one size of the model-size sweep (`make sizes`): a whole run
                               directory of its own (teacher/, student_k{K}/, report/); the
                               sweep's shared evaluator is <workdir>/evaluator/

A *model directory* is teacher/ or one student_k{K}/; its params/ is a params-only export and
its config.json the run record training wrote (provenance.py). `load_export` is the one loader
every tool uses: the architecture comes from the stored shapes (or from the config, when one is
given, and is then checked against them and against the recorded model settings), vocabulary
and compute dtype come from the tokenizer / caller or else from the record, the vocabulary is
checked against the tokenizer (its size, mask id and, where the export records one, its
fingerprint: provenance.tokenizer_fingerprint), and the parameters land on the layout's
shardings. A converted export (the converter's, meta 'converted') computes in the dtype of its
conversion check (CONVERTED_DTYPE): a config asking for another is refused, since distillation
compiles its step from the config and would silently compute something else.

Provenance: `stage_provenance` says whether a stage is current, stale (its recorded teacher
fingerprint is not its teacher export's fingerprint now: the teacher was retrained or the
previous stage re-run), or of unknown provenance (exports written before fingerprints were
recorded: such runs keep working, with a warning).
"""

import dataclasses
import re
from typing import Any

from etils import epath

from kforcing_jax import checkpoints, models, progress, provenance, sharding

TEACHER = 'teacher'
EVALUATOR = 'evaluator'
BASELINES = 'baselines'
COMPARE_PARTIAL = 'compare_partial'
SIZES = 'sizes'
STUDENT_PREFIX = 'student_k'
_STUDENT_NAME = re.compile(rf'^{STUDENT_PREFIX}([1-9][0-9]*)$')


def _join(*parts) -> str:
  return str(epath.Path(parts[0]).joinpath(*parts[1:]))


def teacher_dir(workdir: str) -> str:
  return _join(workdir, TEACHER)


def stage_dir(workdir: str, k: int) -> str:
  return _join(workdir, f'{STUDENT_PREFIX}{int(k)}')


def model_dir(workdir: str, kind: str, k: int | None = None) -> str:
  """teacher/ for kind 'ar'; student_k{k}/ for kind 'pflm' (the widest stage when k is None)."""
  if kind == 'ar':
    return teacher_dir(workdir)
  if kind != 'pflm':
    raise ValueError(f'unknown model kind {kind!r}; expected "ar" or "pflm".')
  if k is None:
    stages = student_stages(workdir)
    if not stages:
      raise FileNotFoundError(f'{workdir} has no student export ({STUDENT_PREFIX}<K>/params).')
    k = stages[-1]
  return stage_dir(workdir, k)


def params_dir(directory: str) -> str:
  return _join(directory, 'params')


def eval_path(directory: str) -> str:
  return _join(directory, 'eval.json')


def trained(directory: str, name: str) -> dict | None:
  """The eval.json of a model directory whose training finished (logged as skipped), or None:
  what lets every trainer skip itself when rerun."""
  done = progress.read_json(eval_path(directory))
  if done is not None:
    progress.log(f'[{name}] already trained ({eval_path(directory)}); skipping')
  return done


def report_dir(workdir: str) -> str:
  return _join(workdir, 'report')


def evaluator_workdir(workdir: str) -> str:
  """The run directory of the pipeline's independent AR evaluator (its own teacher/ inside)."""
  return _join(workdir, EVALUATOR)


def baseline_dir(workdir: str, name: str) -> str:
  """<workdir>/baselines/<name>: the model directory (or, for the draft, the run directory) of
  one compared method (kforcing_jax/compare.py)."""
  return _join(workdir, BASELINES, name)


def compare_partial_path(workdir: str, batch: int) -> str:
  """<workdir>/compare_partial/batch_<B>.json: one batch size of a comparison's measurement,
  kept with the run it measured so that a stopped `make compare` resumes there."""
  return _join(workdir, COMPARE_PARTIAL, f'batch_{batch}.json')


def size_workdir(workdir: str, name: str) -> str:
  """<workdir>/sizes/<name>: the run directory of one size of the sweep (kforcing_jax/sizes.py)."""
  return _join(workdir, SIZES, name)


def stage_k(directory: str) -> int | None:
  """K of a student_k{K} directory, None for any other name."""
  match = _STUDENT_NAME.match(epath.Path(directory).name)
  return int(match.group(1)) if match else None


def student_stages(workdir: str) -> list[int]:
  """k of every exported student stage in `workdir` (student_k{k}/params), ascending."""
  root = epath.Path(workdir)
  if not root.is_dir():
    return []
  ks = [stage_k(str(p)) for p in root.iterdir()]
  return sorted(k for k in ks if k is not None
                and checkpoints.has_params(params_dir(stage_dir(workdir, k))))


def exports(workdir: str) -> list[str]:
  """Model directories of `workdir` with a params export: the teacher, then every stage."""
  out = [teacher_dir(workdir)] if checkpoints.has_params(params_dir(teacher_dir(workdir))) else []
  return out + [stage_dir(workdir, k) for k in student_stages(workdir)]


@dataclasses.dataclass(frozen=True)
class Export:
  """A loaded model: architecture, parameters (on a layout) and the meta saved with them."""
  model: models.FunctionalModel
  params: Any
  meta: dict
  directory: str

  @property
  def kind(self) -> str:
    return self.model.kind

  @property
  def k(self) -> int:
    """The widest window the model decodes (1 for the AR teacher)."""
    return self.model.k_max

  @property
  def name(self) -> str:
    return 'ar' if self.kind == 'ar' else f'pflm_k{self.k}'


# the dtype the converter checks a conversion in (convert/importer.py); conversions written
# before the dtype was recorded in their meta were checked in it too
CONVERTED_DTYPE = 'float32'

# model settings that change what the parameters mean without changing their shapes
RECORDED_MODEL_KEYS = ('vocab_size', 'mask_id')
# ... and what a student learned: its noise -> token map, its noise encoder's input scale and
# how its slot logits become tokens
RECORDED_STUDENT_KEYS = ('cdf_order', 'noise_scale', 'readout')
# a key a run recorded before it existed had this value (models/backbone.py's default)
RECORDED_DEFAULTS = {'readout': 'argmax'}


def recorded_model(directory: str) -> dict:
  """The `model` block of the config that trained this model (config.json), or {}."""
  record = provenance.read_run_config(directory) or {}
  return dict(record.get('config', {}).get('model', {}))


def _vocabulary(tokenizer, recorded: dict, meta: dict, where: str) -> tuple[int, int]:
  if tokenizer is not None:
    return tokenizer.vocab_size, tokenizer.mask_id
  for source in (recorded, meta):
    if 'vocab_size' in source and 'mask_id' in source:
      return int(source['vocab_size']), int(source['mask_id'])
  raise ValueError(f'{where} records no vocabulary: pass the tokenizer or the config it was '
                   'trained with.')


def _check_recorded(config, recorded: dict, directory: str, keys) -> None:
  if recorded:  # a recorded config lacking a key newer than the run used its default
    recorded = {**{k: v for k, v in RECORDED_DEFAULTS.items() if k in keys}, **recorded}
  given = lambda key: config.model.get(key, RECORDED_DEFAULTS.get(key))  # noqa: E731
  differ = [f'model.{key}={recorded[key]!r} (given {given(key)!r})'
            for key in keys if key in recorded and given(key) != recorded[key]]
  if differ:
    raise ValueError(f'{directory} was trained with {", ".join(differ)} '
                     f'({provenance.config_path(directory)}); use the config it was trained with, '
                     'or give this config a --workdir of its own.')


def check_finished_stage(config, directory: str) -> None:
  """A finished stage is reused only by a config of its recipe: its recorded student fields
  (noise -> token map, noise scale, readout) must be config.model's. Stops a run before it builds
  on students of another recipe (a run directory made by `make demo` before the demo's recipe
  changed, say) instead of failing at evaluation."""
  _check_recorded(config, recorded_model(directory), directory, RECORDED_STUDENT_KEYS)


def _check_tokenizer(tokenizer, meta: dict, rows: int, where: str) -> None:
  if rows < tokenizer.vocab_size:
    raise ValueError(f'{where} has a {rows}-token vocabulary but the {tokenizer.name} tokenizer '
                     f'has {tokenizer.vocab_size} ids; use the tokenizer it was trained with.')
  # converted exports record the real vocabulary; our own training's do not
  recorded = (meta.get('vocab_size', tokenizer.vocab_size), meta.get('mask_id', tokenizer.mask_id))
  if recorded != (tokenizer.vocab_size, tokenizer.mask_id):
    raise ValueError(f'{where} was made for a {recorded[0]}-token vocabulary with mask id '
                     f'{recorded[1]}, but the {tokenizer.name} tokenizer has '
                     f'{tokenizer.vocab_size} ids and mask id {tokenizer.mask_id}; use the '
                     'tokenizer it was trained with.')
  fingerprint = meta.get(provenance.TOKENIZER_KEY)
  if fingerprint is not None and fingerprint != provenance.tokenizer_fingerprint(tokenizer):
    raise ValueError(f'{where} was trained with a different tokenizer (same size, different '
                     f'content): it records tokenizer fingerprint {fingerprint}, the '
                     f'{tokenizer.name} tokenizer given has '
                     f'{provenance.tokenizer_fingerprint(tokenizer)}; use the tokenizer it was '
                     'trained with.')


def converted_dtype(meta: dict) -> str | None:
  """The compute dtype of a converted export (its conversion check's), None for our own."""
  if not meta.get('converted'):
    return None
  return str(meta.get('dtype', CONVERTED_DTYPE))


def load_export(directory: str, layout: sharding.Layout, *, kind: str | None = None,
                config=None, tokenizer=None, dtype: str | None = None) -> Export:
  """Load the params export of a model directory (teacher/ or student_k{K}/) onto `layout`.

  kind: the kind the caller needs ('ar' / 'pflm'); a different stored kind is an error.
  config: build the model from config.model (remat, vocabulary padding and dtype included)
    and check the stored shapes equal it; without it the architecture comes from the shapes.
  tokenizer: the stored vocabulary must hold its ids (and equal a recorded one), and its
    fingerprint must equal a recorded one (exports without one, older or converted without a
    tokenizer at hand, are checked on size and mask id only).
  dtype: compute dtype without a config (default: a converted export's conversion dtype, else
    the recorded model.dtype, else float32). With a config, config.model.dtype; a converted
    export refuses one other than its conversion dtype.
  """
  where = params_dir(directory)
  try:
    reader = checkpoints.ExportReader(where) if epath.Path(where).is_dir() else None
  except FileNotFoundError:
    reader = None
  if reader is None:
    raise FileNotFoundError(f'no exported model at {where}: train it first (`python -m '
                            'kforcing_jax.main.pipeline`, or the train / distill commands).')
  with reader:
    shapes, meta = reader.shapes(), reader.meta()
    model = _model_for(directory, shapes, meta, kind, config, tokenizer, dtype)
    params, meta = reader.import_params(layout.abstract_params(model))
  return Export(model, params, meta, str(directory))


def load_teacher_and_stage(config, workdir: str, k: int, layout: sharding.Layout, tokenizer):
  """(the AR teacher, the stage-k student) of a run, each checked against `config`."""
  return (load_export(teacher_dir(workdir), layout, kind='ar', config=config,
                      tokenizer=tokenizer),
          load_export(stage_dir(workdir, k), layout, kind='pflm', config=config,
                      tokenizer=tokenizer))


def load_tree(directory: str, abstract_params) -> tuple[Any, dict]:
  """The params export of a model directory whose tree is not a backbone (a baseline's extra
  heads) onto `abstract_params` (shapes and shardings): (params, meta). Shapes are checked."""
  where = params_dir(directory)
  if not epath.Path(where).is_dir():
    raise FileNotFoundError(f'no exported model at {where}: train it first (`make compare`).')
  with checkpoints.ExportReader(where) as reader:
    difference = models.shape_difference(abstract_params, reader.shapes())
    if difference:
      raise ValueError(f'{where} does not match the model asked for: {difference}.')
    return reader.import_params(abstract_params)


def _model_for(directory: str, shapes: dict, meta: dict, kind: str | None, config, tokenizer,
               dtype: str | None) -> models.FunctionalModel:
  """The model a stored export describes, checked against what the caller needs and gave."""
  where = params_dir(directory)
  stored_kind = models.kind_of_shapes(shapes)
  if stored_kind is None:
    raise ValueError(f'{where} is not a model export of this project (top-level tensors '
                     f'{sorted(shapes)}).')
  if kind is not None and kind != stored_kind:
    what = {'ar': 'an AR model', 'pflm': 'a PFLM student'}
    raise ValueError(f'{where} holds {what[stored_kind]}, but {what.get(kind, kind)} is needed '
                     'here.')
  k = 1 if stored_kind == 'ar' else int(meta.get('k') or stage_k(directory) or 0)
  if k < 1:
    raise ValueError(f'{where} is a student export without its window k (meta or '
                     f'{STUDENT_PREFIX}<K> directory name).')
  backbone_shapes = shapes['backbone'] if stored_kind == 'pflm' else shapes
  if tokenizer is not None:
    _check_tokenizer(tokenizer, meta, backbone_shapes['embed'][0], where)
  recorded = recorded_model(directory)
  if config is not None:
    _check_recorded(config, recorded, directory,
                    RECORDED_MODEL_KEYS + (RECORDED_STUDENT_KEYS if stored_kind == 'pflm' else ()))
    converted = converted_dtype(meta)
    if converted is not None and config.model.dtype != converted:
      raise ValueError(f'{where} is a converted checkpoint, checked by the converter in '
                       f'{converted}, but config.model.dtype={config.model.dtype!r}: its tokens '
                       'would differ from the conversion check. Use --config.model.dtype='
                       f'{converted} (the converted directory\'s config.py sets it).')
    model = models.teacher(config) if stored_kind == 'ar' else models.student(config, k)
    difference = models.shape_difference(model.param_shapes, shapes)
    if difference:
      raise ValueError(f'{where} does not match config.model: {difference}. Use the config '
                       'the model was trained with.')
  else:
    vocab_size, mask_id = _vocabulary(tokenizer, recorded, meta, where)
    dtype = (dtype or converted_dtype(meta) or recorded.get('dtype')
             or meta.get('dtype', 'float32'))
    try:
      model = models.from_shapes(shapes, vocab_size=vocab_size, mask_id=mask_id, dtype=dtype,
                                 k_max=k, cdf_order=recorded.get('cdf_order', 'id'),
                                 noise_scale=float(recorded.get('noise_scale', 1.0)),
                                 readout=recorded.get('readout', RECORDED_DEFAULTS['readout']))
    except ValueError as e:
      raise ValueError(f'{where}: {e}') from e
  return model



# ----------------------------------------------------------------------------- provenance

def export_meta(directory: str) -> dict | None:
  """The meta saved with a model directory's params export (no arrays read), None without one."""
  where = params_dir(directory)
  if not epath.Path(where).is_dir():
    return None
  try:
    with checkpoints.ExportReader(where) as reader:
      return reader.meta()
  except FileNotFoundError:
    return None


def teacher_name(k: int) -> str:
  """Directory name of the model stage k is distilled from: the AR teacher for k = 1, else
  the stage of half its window (stages double)."""
  return TEACHER if k == 1 else f'{STUDENT_PREFIX}{k // 2}'


@dataclasses.dataclass(frozen=True)
class StageProvenance:
  """Whether a stage was made from its teacher as that teacher is now.

  status: 'current'  the recorded teacher fingerprint is the teacher export's;
          'stale'    it is not (the teacher was retrained, or the previous stage re-run);
          'unknown'  either side records none (made before fingerprints were recorded) or the
                     teacher has no export: nothing can be said, the stage is used as it is;
          'converted' a converted checkpoint: it was not made here, it has no teacher."""
  stage: str
  teacher: str
  status: str
  recorded: str | None
  current: str | None

  def describe(self) -> str:
    if self.status == 'stale':
      return (f'{self.stage} was distilled from a different {self.teacher} (fingerprint '
              f'{self.recorded} != {self.current})')
    if self.status == 'unknown':
      missing = ('its teacher has no export' if self.recorded is not None else
                 'it records no teacher fingerprint (made before provenance was recorded)')
      return f'{self.stage} has unknown provenance: {missing}'
    return f'{self.stage} is {self.status}'


def stage_provenance(directory: str, meta: dict | None = None) -> StageProvenance:
  """The provenance of the stage in `directory` (a student_k{K} of a run directory), from
  `meta` (default: its export's meta; the distiller passes a checkpoint's) against the export
  meta of its teacher, the sibling directory the meta names (default `teacher_name(K)`)."""
  meta = export_meta(directory) if meta is None else meta
  meta = meta or {}
  stage = epath.Path(directory).name
  k = stage_k(directory) or int(meta.get('k', 1))
  teacher = str(meta.get(provenance.TEACHER_DIR_KEY) or teacher_name(k))
  if meta.get('converted'):
    return StageProvenance(stage, teacher, 'converted', None, None)
  recorded = meta.get(provenance.TEACHER_KEY)
  teacher_meta = export_meta(_join(str(epath.Path(directory).parent), teacher)) or {}
  current = teacher_meta.get(provenance.PARAMS_KEY)
  if recorded is None or current is None:
    status = 'unknown'
  else:
    status = 'current' if recorded == current else 'stale'
  return StageProvenance(stage, teacher, status, recorded, current)
