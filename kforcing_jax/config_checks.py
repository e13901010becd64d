"""Every config field with a range or a set of values, checked before anything loads or compiles.

`check(config)` raises ValueError with one line naming the first bad field, its value and the
fix; every main calls it right after start-up (cli.main's entry, and the mains of reproduce and
convert). A bad value found here would otherwise surface minutes later - after the teacher has
trained, or deep inside XLA - or not at all (steps=0 trains nothing and exits 0).

What needs the devices is checked against `num_devices` (default: jax.device_count()): the mesh
shape's product, and that every global batch divides over the mesh's batch shards. Facts that
need files (the tokenizer's size, a checkpoint's k_max) are checked where those files load.

Decoding temperature must be > 0: the AR teacher samples by inverse CDF of softmax(logits / T),
which has no T = 0 limit to compute; a nearly greedy decode is a small T such as 1e-3.

`parse_flags(argv)` is the flags parser of every main (cli.run): an unknown flag, a value of the
wrong type, an unknown or unparsable `--config.x` override and a missing or broken `--config`
file each become one `error:` line (exit 2) instead of a traceback or absl's exit 1.
"""

import math
import os
import sys

from absl import flags
from ml_collections import config_flags

from kforcing_jax import distill, models, sharding
from kforcing_jax.data import documents

DTYPES = ('float32', 'bfloat16')
TOKENIZERS = ('bpe', 'bert', 'gpt2')
SPLITS = ('train', 'validation', 'test')
DECODE_MODES = ('lossy', 'lossless')


def _fail(field: str, value, rule: str, fix: str):
  raise ValueError(f'config.{field}={value!r} {rule}. Fix: {fix}.')


def _get(config, field: str):
  node = config
  for part in field.split('.'):
    node = node[part]
  return node


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(config, field: str, low: int, why: str = '') -> int:
  value = _get(config, field)
  if not _is_int(value) or value < low:
    _fail(field, value, f'must be an integer >= {low}{why}',
          f'--config.{field}=<an integer >= {low}>')
  return value


def _number(config, field: str, low: float, *, strict: bool, high: float | None = None,
             high_strict: bool = False) -> float:
  """A finite number in [low, high] (strict: low excluded; high_strict: high excluded)."""
  value = _get(config, field)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > low if strict else value >= low)
  if ok and high is not None:
    ok = value < high if high_strict else value <= high
  if not ok:
    low_side = f'> {low}' if strict else f'>= {low}'
    rule = low_side if high is None else f'{low_side} and {"<" if high_strict else "<="} {high}'
    _fail(field, value, f'must be a finite number {rule}', f'--config.{field}=<a number {rule}>')
  return float(value)


def _one_of(config, field: str, allowed) -> str:
  value = _get(config, field)
  if value not in allowed:
    _fail(field, value, f'is not one of {tuple(allowed)}', f'--config.{field}={allowed[0]}')
  return value


def _mesh(config, num_devices: int) -> dict:
  """{axis: size} of the resolved mesh."""
  shape = config.mesh_shape
  fix = '--config.mesh_shape="(-1, 1, 1)" (data, fsdp, tensor; one -1 fills the devices)'
  if (not isinstance(shape, (tuple, list)) or len(shape) != len(sharding.MESH_AXES)
      or not all(_is_int(s) and (s >= 1 or s == -1) for s in shape)
      or list(shape).count(-1) > 1):
    _fail('mesh_shape', shape, f'must be {len(sharding.MESH_AXES)} sizes '
          f'{sharding.MESH_AXES}, each >= 1 or one of them -1', fix)
  try:
    resolved = sharding.resolve_mesh_shape(shape, num_devices)
  except ValueError as e:
    _fail('mesh_shape', tuple(shape), f'does not fit the {num_devices} devices ({e})', fix)
  return dict(zip(sharding.MESH_AXES, resolved))


def _batch_shards(config, mesh: dict) -> int:
  """How many ways a global batch is split: the mesh axes the 'batch' rule names."""
  rules = dict(config.sharding_rules)
  axes = rules.get('batch') or ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  unknown = [a for a in axes if a not in mesh]
  if unknown:
    _fail('sharding_rules', tuple(config.sharding_rules), f'maps "batch" to unknown mesh axes '
          f'{unknown}', f'use mesh axes from {sharding.MESH_AXES}')
  return math.prod(mesh[a] for a in axes)


def _optimizer(config, block: str, shards: int) -> None:
  """The fields train and distill share: batch, schedule, optimizer, intervals."""
  batch = _int_at_least(config, f'{block}.batch_size', 1)
  micro = _int_at_least(config, f'{block}.microbatches', 1)
  if batch % micro:
    _fail(f'{block}.microbatches', micro, f'does not divide {block}.batch_size={batch}',
          f'--config.{block}.microbatches=<a divisor of {batch}>')
  if batch % shards:
    _fail(f'{block}.batch_size', batch, f'does not divide over the {shards} batch shards of '
          f'config.mesh_shape', f'--config.{block}.batch_size=<a multiple of {shards}>')
  _number(config, f'{block}.learning_rate', 0.0, strict=True)
  _int_at_least(config, f'{block}.warmup_steps', 0)
  _number(config, f'{block}.end_learning_rate_ratio', 0.0, strict=False)
  _number(config, f'{block}.weight_decay', 0.0, strict=False)
  _number(config, f'{block}.b1', 0.0, strict=False, high=1.0, high_strict=True)
  _number(config, f'{block}.b2', 0.0, strict=False, high=1.0, high_strict=True)
  _number(config, f'{block}.eps', 0.0, strict=True)
  _number(config, f'{block}.grad_clip', 0.0, strict=True)
  for field in ('log_every', 'eval_every', 'checkpoint_every', 'eval_batches'):
    _int_at_least(config, f'{block}.{field}', 1)
  _int_at_least(config, f'{block}.keep_checkpoints', 1, ' (0 would delete every checkpoint '
                'as it is written)')
  _int_at_least(config, f'{block}.profile_steps', 0)


def _data(config) -> None:
  name = config.data.name
  if name not in documents.DATASETS and name not in documents.ALIASES:
    names = tuple(sorted([*documents.DATASETS, *documents.ALIASES]))
    _fail('data.name', name, f'is not one of {names}', '--config.data.name=shakespeare')
  _one_of(config, 'data.tokenizer', TOKENIZERS)
  _int_at_least(config, 'data.seq_len', 2, ' (a row predicts its tokens 1..seq_len-1)')
  if config.data.tokenizer == 'bpe':
    _int_at_least(config, 'data.vocab_size', 3, ' ([MASK], <|endoftext|> and one byte)')


def _model(config) -> None:
  _one_of(config, 'model.dtype', DTYPES)
  for field in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'mlp_ratio',
                'pad_vocab_to_multiple_of'):
    _int_at_least(config, f'model.{field}', 1)
  _int_at_least(config, 'model.mask_id', 0)
  _int_at_least(config, 'model.num_kv_heads', 0, ' (0 = num_heads)')
  # the architecture's own rules (heads divide d_model, even head dim, mask id, cdf_order,
  # remat, noise_scale): the one place that builds models states them
  models.backbone_config(config.model)


def _distill(config, shards: int) -> None:
  dc = config.distill
  stages = dc.stages
  if (not isinstance(stages, (tuple, list)) or not stages
      or not all(isinstance(s, (tuple, list)) and len(s) == 2 and all(map(_is_int, s))
                 for s in stages)):
    _fail('distill.stages', stages, 'must be a non-empty sequence of (k, steps) integer pairs',
          '--config.distill.stages="((1, 300), (2, 300), (4, 300))"')
  distill.validate_schedule(stages)
  for k, steps in stages:
    if steps < 1:
      _fail('distill.stages', tuple(map(tuple, stages)), f'gives stage k={k} {steps} steps',
            'give every stage >= 1 steps')
  _optimizer(config, 'distill', shards)
  seq_len = _int_at_least(config, 'distill.seq_len', 0, ' (0 = data.seq_len)')
  if seq_len > config.data.seq_len:
    _fail('distill.seq_len', seq_len, f'exceeds data.seq_len={config.data.seq_len}',
          f'--config.distill.seq_len=<at most {config.data.seq_len}, or 0 for all of it>')
  k_max = max(k for k, _ in stages)
  windows = seq_len or config.data.seq_len
  if windows <= k_max:
    _fail('distill.seq_len' if seq_len else 'data.seq_len', windows,
          f'leaves no window for stage k={k_max} (a window needs its k next tokens)',
          f'a length of at least {k_max + 1}')
  tau = dc.tau_range
  if (not isinstance(tau, (tuple, list)) or len(tau) != 2
      or not all(isinstance(t, (int, float)) and math.isfinite(t) for t in tau)
      or not 0 < tau[0] <= tau[1]):
    _fail('distill.tau_range', tau, 'must be (lo, hi) with 0 < lo <= hi',
          '--config.distill.tau_range="(1.0, 1.0)"')
  data_weight = _number(config, 'distill.data_weight', 0.0, strict=False)
  if data_weight > 0 and config.model.cdf_order == 'gumbel':
    _fail('distill.data_weight', data_weight, 'needs a CDF order (noise inversion draws u inside '
          'the real token\'s CDF interval; under model.cdf_order=gumbel its noises are no '
          'interval)', 'set distill.data_weight=0 or model.cdf_order=id')
  if data_weight > 0 and dc.microbatches > 1:
    _fail('distill.data_weight', data_weight, f'with distill.microbatches={dc.microbatches} is '
          'not supported', 'set distill.microbatches=1 or distill.data_weight=0')
  smoothing = _number(config, 'distill.target_smoothing', 0.0, strict=False, high=1.0)
  if smoothing > 0 and config.model.cdf_order != 'id':
    _fail('distill.target_smoothing', smoothing, f'needs model.cdf_order=id (it is '
          f'{config.model.cdf_order!r})', 'set one of them: target_smoothing=0 or cdf_order=id')
  _number(config, 'distill.logit_matching', 0.0, strict=False, high=1.0)
  _number(config, 'distill.later_learning_rate', 0.0, strict=False)
  _number(config, 'distill.inherited_slot_weight', 0.0, strict=True)
  _number(config, 'distill.ema_decay', 0.0, strict=False, high=1.0, high_strict=True)
  if config.model.get('readout', 'argmax') == 'inverse_cdf':
    # an inverse-CDF student is distilled on the teacher's distributions (per-slot KL): the
    # soft targets, the data term, logit matching and slot weights are argmax-readout losses
    for field, value in distill.argmax_only_settings(dc).items():
      off = distill.ARGMAX_ONLY_FIELDS[field]
      _fail(f'distill.{field}', value, 'belongs to the argmax readout (model.readout='
            'inverse_cdf is distilled by per-slot KL)', f'set distill.{field}={off:g} or '
            'model.readout=argmax')
  _number(config, 'distill.smoothing_decay', 0.0, strict=True)


def _decode(config) -> None:
  prefix_len = _int_at_least(config, 'decode.prefix_len', 1)
  k_max = max(k for k, _ in config.distill.stages)
  if prefix_len < k_max:
    _fail('decode.prefix_len', prefix_len, f'is shorter than the widest stage k={k_max} (its '
          'first step feeds the last k prompt tokens)', f'--config.decode.prefix_len={k_max}')
  gen_len = _int_at_least(config, 'decode.gen_len', 2)
  if gen_len <= prefix_len:
    _fail('decode.gen_len', gen_len, f'must exceed decode.prefix_len={prefix_len} (it is the '
          'total length, prompt included)', f'--config.decode.gen_len={prefix_len + 1} or more')
  _number(config, 'decode.temperature', 0.0, strict=True)
  check_penalties(dict(config.decode.freq_penalty), 'decode.freq_penalty')
  if _one_of(config, 'decode.mode', DECODE_MODES) == 'lossless' and prefix_len < k_max + 1:
    _fail('decode.prefix_len', prefix_len, f'is shorter than k+1 = {k_max + 1} for the widest '
          f'stage k={k_max} in decode.mode=lossless (the drafting student re-feeds the last k+1 '
          'tokens every iteration)', f'--config.decode.prefix_len={k_max + 1}')


def check_penalties(table: dict, field: str) -> None:
  """A frequency-penalty table {str(k): lambda >= 0}."""
  for key, value in table.items():
    if not str(key).isdigit() or int(key) < 1:
      _fail(field, table, f'has key {key!r}; keys are decode k values "1", "2", ...',
            f'--config.{field}="{{\'1\': 0.0, \'2\': 0.2}}"')
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
        or not math.isfinite(value) or value < 0):
      _fail(field, table, f'has lambda {value!r} for k={key}; a penalty must be a finite '
            'number >= 0', 'use 0 for no penalty')


def _eval(config) -> None:
  _one_of(config, 'eval.split', SPLITS)
  _int_at_least(config, 'eval.num_samples', 1)
  sizes = config.eval.batch_sizes
  if (not isinstance(sizes, (tuple, list)) or not sizes
      or not all(_is_int(b) and b >= 1 for b in sizes)):
    _fail('eval.batch_sizes', sizes, 'must be a non-empty tuple of integers >= 1',
          '--config.eval.batch_sizes="(1, 4, 16)"')
  _int_at_least(config, 'eval.repeats', 1)
  _int_at_least(config, 'eval.agreement_batches', 0, ' (0 = off)')
  _int_at_least(config, 'eval.lossless_samples', 0, ' (0 = no lossless rows)')
  lossless_sizes = config.eval.lossless_batch_sizes
  if (not isinstance(lossless_sizes, (tuple, list))
      or not all(_is_int(b) and b >= 1 for b in lossless_sizes)):
    _fail('eval.lossless_batch_sizes', lossless_sizes, 'must be a tuple of integers >= 1 (() = '
          'no lossless timing)', '--config.eval.lossless_batch_sizes="(1, 16)"')
  _int_at_least(config, 'eval.evaluator.seed', 0)
  if _int_at_least(config, 'eval.evaluator.steps', 0, ' (0 = no evaluator)'):
    for field in ('d_model', 'num_layers', 'num_heads'):
      _int_at_least(config, f'eval.evaluator.{field}', 1)
    evaluator = config.model.copy_and_resolve_references()
    for field in ('d_model', 'num_layers', 'num_heads'):
      evaluator[field] = config.eval.evaluator[field]
    try:
      models.backbone_config(evaluator)
    except ValueError as e:
      raise ValueError(f'config.eval.evaluator: {e}') from None


def check_reproduce(config) -> None:
  """config.reproduce (configs/paper_protocol.py): the protocol's own settings."""
  for field in ('prefix_tokens', 'batch_size', 'n_per_prefix'):
    _int_at_least(config, f'reproduce.{field}', 1)
  for field in ('max_new_tokens', 'n_warmup_batches', 'max_prefixes', 'seed'):
    _int_at_least(config, f'reproduce.{field}', 0)
  ks = config.reproduce.ks
  if (not isinstance(ks, (tuple, list)) or not ks or not all(_is_int(k) and k >= 1 for k in ks)
      or len(set(ks)) < len(ks)):
    _fail('reproduce.ks', ks, 'must be distinct integers >= 1', '--config.reproduce.ks="(1, 2, 4)"')
  _one_of(config, 'reproduce.dtype', DTYPES)
  penalties = config.reproduce.freq_penalty
  if len(penalties) not in (0, 1, len(ks)):
    _fail('reproduce.freq_penalty', penalties, f'has {len(penalties)} values for {len(ks)} '
          'values of reproduce.ks', 'give one per K, one for all, or () for the table')
  check_penalties({str(k): v for k, v in zip(ks, list(penalties) * len(ks))},
                  'reproduce.freq_penalty')


def check(config, num_devices: int | None = None) -> None:
  """Raises ValueError (one line: field, value, fix) on the first config field out of range.

  num_devices: the devices the mesh spans (default: jax.device_count())."""
  if num_devices is None:
    import jax  # only here: the checks above need no backend
    num_devices = jax.device_count()
  _int_at_least(config, 'seed', 0)
  shards = _batch_shards(config, _mesh(config, num_devices))
  _data(config)
  _model(config)
  _int_at_least(config, 'train.steps', 1)
  _optimizer(config, 'train', shards)
  _distill(config, shards)
  _decode(config)
  _eval(config)
  if 'reproduce' in config:
    check_reproduce(config)


def _one_line(error: BaseException) -> str:
  """ml_collections' message without its quoting and line breaks."""
  text = str(error)
  while len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
    text = text[1:-1].encode().decode('unicode_escape')
  return ' '.join(part.strip() for part in text.splitlines() if part.strip())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, every error one `error:` line with exit 2: an unknown flag or a value
  of the wrong type (absl's own message), an unknown `--config.a.b` field, and a --config file
  that cannot be loaded (ml_collections reports that one lazily, at first use: forced here)."""
  try:
    rest = flags.FLAGS(argv)
    config = flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
    if config is not None:
      config.keys()  # a file that failed to load raises here, on first use, not mid-run
  except flags.Error as e:
    _exit(f'{e} (--helpfull lists the flags)')
  except (AttributeError, KeyError) as e:
    if os.environ.get('KFORCING_TRACEBACK'):
      raise
    overrides = [a for a in argv[1:] if a.startswith('--config.')]
    _exit(f'no such config field {_one_line(e)} (overrides given: {" ".join(overrides)}). '
          'Fix: spell the field as in the config file.')
  except (ValueError, TypeError) as e:  # an override path ml_collections cannot parse
    if os.environ.get('KFORCING_TRACEBACK'):
      raise
    _exit(f'bad --config override: {_one_line(e)}. Fix: --config.<block>.<field>=<value>, '
          'with the field spelled as in the config file.')
  except SyntaxError as e:
    _exit(f'--config={e.filename} line {e.lineno}: {e.msg}. Fix: correct the config file.')
  except OSError as e:
    if os.environ.get('KFORCING_TRACEBACK'):
      raise
    path = config_flags.get_config_filename(flags.FLAGS['config'])
    if not os.path.isfile(path):
      _exit(f'--config={path} is not a file. Fix: give a config file, e.g. '
            '--config=configs/shakespeare_tiny.py.')
    _exit(f'--config={path} did not load: '
          f'{_one_line(e).split("an earlier failure to load: ")[-1]}')
  return rest


def _exit(message: str):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)
