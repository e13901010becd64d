"""Evaluation results as typed records, and what is written from them: results.json, REPORT.md
(quality and speed tables, the roofline section, decoded samples) and the plots.

results.json is `Results.to_json()` (schema_version 4); `Results.from_json` reads it back and
is the schema check: every field present with its type (floats finite; null only where a
field is Optional), model names "ar" / "pflm_k{k}" / "pflm_k{k}_nopen" (the same student
decoded without the frequency penalty) / "lossless_k{k}" (the student drafting k tokens, the
AR teacher verifying: kind 'lossless') matching their kind and k, unique, the AR teacher first.
Keys a reader does not know are ignored. The AR teacher is kind 'ar', k = 1.

Schema 3 added the bootstrap intervals (`*_ci`), the agreement with the AR teacher's own
noise -> token map (`agreement_vs_ar`, agreement.py), `mode_seeking` and the `_nopen` rows;
schema 4 the lossless rows (`lossless`: acceptance, exactness, iteration cost) and
frontier.png (`frontier_points`, `pareto_front`).
"""

import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any

from etils import epath

from kforcing_jax import metrics, progress

SCHEMA_VERSION = 4
MODEL_NAME = re.compile(r'^(ar|(pflm|lossless)_k([1-9][0-9]*)(_nopen)?)$')
NO_PENALTY_SUFFIX = '_nopen'


@dataclasses.dataclass(frozen=True)
class Throughput:
  """One decoder at one batch size: the median of the interleaved rounds (timing.py)."""
  batch: int
  tokens_per_s: float
  forwards_per_token: float
  speedup_vs_ar: float
  seconds: float
  seconds_all: list[float]
  decode_steps: int


@dataclasses.dataclass(frozen=True)
class Sample:
  prompt: str
  generated: str


@dataclasses.dataclass(frozen=True)
class Interval:
  """A 95% bootstrap interval over the completions (metrics.bootstrap_ratio_interval)."""
  lo: float
  hi: float


@dataclasses.dataclass(frozen=True)
class EntropyBin:
  """Windows whose AR distribution has entropy in [lo, hi) nats (hi None: open). Rates are
  None for an empty bin. mode_reference: E[max p], the slot-1 agreement of a student that
  ignores the noise and always emits the teacher's mode."""
  lo: float
  hi: float | None
  windows: int
  agreement_1: float | None
  acc_total: float | None
  mode_reference: float | None


@dataclasses.dataclass(frozen=True)
class Agreement:
  """A student against the AR teacher's own noise -> token map on held-out windows
  (agreement.py): slot[i] = token i+1 equal, prefix[i] = tokens 1..i+1 all equal (prefix[-1]
  is acc_total against the AR map)."""
  windows: int
  slot: list[float]
  prefix: list[float]
  by_entropy: list[EntropyBin]


@dataclasses.dataclass(frozen=True)
class LosslessCost:
  """A lossless row at one batch size, from the timed generation (median round) and the AR
  teacher's interleaved with it. iterations: loop iterations of the whole batch (each one
  student draft pass + one teacher verify pass; the slowest row sets the count);
  tokens_per_iteration: new tokens per row / iterations; iteration_in_ar_steps: one
  iteration's time over one AR step's (AR seconds / AR decode steps). Lossless is faster than
  AR exactly when tokens_per_iteration exceeds iteration_in_ar_steps, so that is the break-even
  tokens per iteration; break_even_acceptance: the per-draft acceptance rate that yields it
  (evaluate.break_even_acceptance), 0 when one token per iteration already pays, None when
  even k+1 tokens would not."""
  batch: int
  iterations: int
  tokens_per_iteration: float
  iteration_in_ar_steps: float
  break_even_acceptance: float | None


@dataclasses.dataclass(frozen=True)
class LosslessStats:
  """What a lossless row measured beside quality: over its `samples` quality completions, the
  rows equal token for token to the AR teacher's decode of the same prompts and noise, and the
  gen. ppl under the teacher of those AR samples (its reference: the AR row is over all
  prompts); the mean tokens a row gains per iteration (accepted drafts + 1) and the histogram
  of accepted drafts a = 0..k per (row, iteration); and its cost per timed batch size."""
  samples: int
  rows_identical_to_ar: int
  ar_gen_ppl_teacher: float
  mean_tokens_per_iteration: float
  accepted_histogram: list[int]
  cost: list[LosslessCost]


@dataclasses.dataclass(frozen=True)
class ModelResult:
  """One model's quality, speed and decode settings. k: tokens per decode step (AR: 1;
  lossless: draft length). throughput is empty for the `_nopen` rows (not timed), and holds
  eval.lossless_batch_sizes for the lossless rows (speed-up against the AR teacher timed in the
  same rounds; forwards_per_token and decode_steps count loop iterations); agreement_vs_ar and
  mode_seeking are None for the AR teacher, and agreement_vs_ar for a `_nopen` row (the penalty
  does not enter the all-windows forward: it is the penalised row's) and a lossless row.
  lossless: set on the lossless rows only."""
  name: str
  kind: str
  k: int
  gen_ppl_teacher: float
  gen_ppl_evaluator: float | None
  entropy: float
  distinct_2: float
  distinct_4: float
  acc_total: float | None
  throughput: list[Throughput]
  samples: list[Sample]
  gen_ppl_teacher_ci: Interval
  gen_ppl_evaluator_ci: Interval | None
  entropy_ci: Interval
  distinct_2_ci: Interval
  agreement_vs_ar: Agreement | None
  mode_seeking: bool | None
  temperature: float | None = None  # AR sampling (and the lossless rows' teacher)
  tau: float | None = None  # students
  freq_penalty: float | None = None
  lossless: LosslessStats | None = None

  def __post_init__(self):
    match = MODEL_NAME.match(self.name)
    expected = None
    if match is not None and match.group(2) is None:
      expected = ('ar', 1)
    elif match is not None and not (match.group(2) == 'lossless' and match.group(4)):
      expected = (match.group(2), int(match.group(3)))
    if expected != (self.kind, self.k):
      raise ValueError(f'results: model name {self.name!r} with kind={self.kind!r}, k={self.k}: '
                       'expected "ar" (kind ar, k 1), "pflm_k<k>[_nopen]" (kind pflm) or '
                       '"lossless_k<k>" (kind lossless).')
    if (self.kind == 'lossless') != (self.lossless is not None):
      raise ValueError(f'results: {self.name} has lossless={self.lossless!r:.40}: the lossless '
                       'statistics belong to the lossless rows, and only to them.')
    if self.without_penalty and self.freq_penalty:
      raise ValueError(f'results: {self.name} is decoded without the frequency penalty but has '
                       f'freq_penalty={self.freq_penalty}.')

  @property
  def without_penalty(self) -> bool:
    return self.name.endswith(NO_PENALTY_SUFFIX)


@dataclasses.dataclass(frozen=True)
class Results:
  """Everything one evaluation measured (REPORT.md is written from it)."""
  device: str
  jax_version: str
  config: str
  prefix_len: int
  gen_len: int
  eval_split: str
  num_samples: int
  batch_sizes: list[int]
  repeats: int
  seed: int
  evaluator_workdir: str | None
  evaluator: str | None  # the evaluator's architecture and training, in words
  bootstrap_resamples: int
  bootstrap_seed: int
  agreement_rows: int  # held-out rows of the agreement measurement
  speed_prompts: str
  models: list[ModelResult]
  roofline: dict
  config_values: dict
  seconds: float
  schema_version: int = SCHEMA_VERSION

  def __post_init__(self):
    names = [m.name for m in self.models]
    if not names:
      raise ValueError('results: models is empty.')
    if len(set(names)) != len(names):
      raise ValueError(f'results: duplicate model names {names}.')
    if names[0] != 'ar':
      raise ValueError(f'results: the first model must be "ar" (the reference), got '
                       f'{names[0]!r}.')

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, obj) -> 'Results':
    """The Results in a results.json object; ValueError naming the first problem."""
    if isinstance(obj, dict) and obj.get('schema_version') != SCHEMA_VERSION:
      raise ValueError(f'results.json has schema_version {obj.get("schema_version")}, this '
                       f'code reads {SCHEMA_VERSION}: re-run the evaluation (--force).')
    return _build(cls, obj, 'top level')


# ----------------------------------------------------------------------------- type checks

def _parse(value, hint, where: str) -> Any:
  """`value` checked against the type annotation `hint` (dataclasses built recursively)."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    options = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
      return None  # every union here is `X | None`
    hint = options[0]
  if dataclasses.is_dataclass(hint):
    return _build(hint, value, where)
  if typing.get_origin(hint) is list:
    if isinstance(value, list):
      return [_parse(v, typing.get_args(hint)[0], f'{where}[{i}]') for i, v in enumerate(value)]
  if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    if not math.isfinite(value):
      raise ValueError(f'results.json: {where} = {value} is not a finite number.')
    return float(value)
  if hint is int and isinstance(value, int) and not isinstance(value, bool):
    return value
  if hint is bool and isinstance(value, bool):
    return value
  if hint in (str, dict) and isinstance(value, hint):
    return value
  expected = 'list' if typing.get_origin(hint) is list else hint.__name__
  raise ValueError(f'results.json: {where} should be {expected}, got {type(value).__name__} '
                   f'{value!r:.80}.')


def _build(cls, obj, where: str):
  if not isinstance(obj, dict):
    raise ValueError(f'results.json: {where} should be an object, got {type(obj).__name__}.')
  fields = dataclasses.fields(cls)
  missing = [f.name for f in fields
             if f.name not in obj and f.default is dataclasses.MISSING]
  if missing:
    raise ValueError(f'results.json: {where} is missing keys {missing}.')
  hints = typing.get_type_hints(cls)
  return cls(**{f.name: _parse(obj[f.name], hints[f.name], f'{where}.{f.name}')
                for f in fields if f.name in obj})


# ----------------------------------------------------------------------------- files

def results_path(report_dir: str) -> str:
  return str(epath.Path(report_dir) / 'results.json')


def read(report_dir: str) -> Results | None:
  """The Results in <report_dir>/results.json; None when there is none, or when it was written
  in another schema version (an older evaluation: it is then redone, and the log says so)."""
  obj = progress.read_json(results_path(report_dir))
  if obj is None:
    return None
  if isinstance(obj, dict) and obj.get('schema_version') != SCHEMA_VERSION:
    progress.log(f'[report] {results_path(report_dir)} has schema_version '
                 f'{obj.get("schema_version")}, this code writes {SCHEMA_VERSION}: evaluating '
                 'again')
    return None
  return Results.from_json(obj)


def write(report_dir: str, results: Results) -> None:
  """results.json (checked: it must read back), REPORT.md, speedup.png, quality.png and
  frontier.png (when some batch size has a speed for every setting)."""
  obj = results.to_json()
  Results.from_json(obj)
  directory = epath.Path(report_dir)
  progress.write_json(directory / 'results.json', obj)
  (directory / 'REPORT.md').write_text(markdown(results))
  plot(directory / 'speedup.png', functools.partial(_draw_speedup, results))
  plot(directory / 'quality.png', functools.partial(_draw_quality, results), ncols=2,
       figsize=(8, 3.5))
  batches = frontier_batches(frontier_points(results))
  if batches:
    plot(directory / 'frontier.png', functools.partial(_draw_frontier, results), ncols=len(batches),
         figsize=(5.5 * len(batches), 4.5))


def plot(path, draw, *, ncols: int = 1, figsize=(6, 4)) -> None:
  """One row of `ncols` axes drawn by draw(axes), saved as a PNG at `path` (any epath)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, ncols, figsize=figsize)
  try:
    draw(axes)
    fig.tight_layout()
    with epath.Path(path).open('wb') as f:
      fig.savefig(f, format='png', dpi=120)
  finally:
    plt.close(fig)


def timed(models: list[ModelResult]) -> list[ModelResult]:
  """The models of the speed table: the AR teacher and every student with its penalty (the
  lossless rows are timed at their own batch sizes: lossless_markdown)."""
  return [m for m in models if m.throughput and m.kind != 'lossless']


def lossless_models(models: list[ModelResult]) -> list[ModelResult]:
  return [m for m in models if m.kind == 'lossless']


# ----------------------------------------------------------------------------- the frontier

@dataclasses.dataclass(frozen=True)
class FrontierPoint:
  """One decode setting on the speed-quality plane: `name` is its model row, `speedup` its
  tokens/s over the AR teacher's per batch size, from the row `timed_as` (a `_nopen` row is not
  timed: it has its penalised row's speed, which does the same work plus the penalty's).
  reference: the gen. ppl of the AR samples it is compared with: the AR row's, or for a
  lossless row (fewer prompts) the AR decoder's samples of the same prompts."""
  name: str
  label: str
  gen_ppl: float
  gen_ppl_ci: Interval
  speedup: dict
  timed_as: str
  reference: float

  @property
  def distance(self) -> float:
    return quality_distance(self.gen_ppl, self.reference)


def _label(m: ModelResult) -> str:
  if m.kind == 'ar':
    return 'AR'
  if m.kind == 'lossless':
    return f'k={m.k} lossless'
  return f'k={m.k} lossy, lambda {m.freq_penalty:g}'


def frontier_points(results: Results) -> list[FrontierPoint]:
  """Every setting with a speed: AR, each student with its penalty and without (a `_nopen`
  row whose penalised row has penalty 0 is the same samples and is left out), each lossless
  row."""
  by_name = {m.name: m for m in results.models}
  points = []
  for m in results.models:
    timed_row = by_name[m.name.removesuffix(NO_PENALTY_SUFFIX)]
    if not timed_row.throughput or (m.without_penalty and not timed_row.freq_penalty):
      continue
    reference = (m.lossless.ar_gen_ppl_teacher if m.lossless is not None
                 else results.models[0].gen_ppl_teacher)
    points.append(FrontierPoint(m.name, _label(m), m.gen_ppl_teacher, m.gen_ppl_teacher_ci,
                                {r.batch: r.speedup_vs_ar for r in timed_row.throughput},
                                timed_row.name, reference))
  return points


def frontier_batches(points: list[FrontierPoint]) -> list[int]:
  """The batch sizes at which every point has a speed (lossless rows are timed at fewer)."""
  if not points:
    return []
  return sorted(set.intersection(*(set(p.speedup) for p in points)))


def quality_distance(gen_ppl: float, reference: float) -> float:
  """|ln(gen_ppl / reference)|: how far a setting's gen. ppl under the teacher is from the AR
  samples'. A lower perplexity than the AR samples' is not better quality here: it is the
  mode-seeking failure (metrics.is_mode_seeking), so the frontier ranks by distance."""
  return abs(math.log(gen_ppl / reference))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
  """Indices of the (speed-up, distance) pairs that no other pair dominates (as fast or faster
  and as close or closer, strictly better in one), in increasing speed-up."""
  front = [i for i, (speed, dist) in enumerate(points)
           if not any(s >= speed and d <= dist and (s > speed or d < dist) for s, d in points)]
  return sorted(front, key=lambda i: points[i][0])


def front_at(points: list[FrontierPoint], batch: int) -> list[int]:
  """pareto_front of `points` at one batch size, quality by each point's distance."""
  return pareto_front([(p.speedup[batch], p.distance) for p in points])


_FRONTIER_STYLE = {'ar': ('k', 's'), 'pflm': ('tab:blue', 'o'), 'pflm_nopen': ('tab:orange', '^'),
                   'lossless': ('tab:green', 'D')}


def _draw_frontier(results: Results, axes) -> None:
  points = frontier_points(results)
  kinds = {m.name: m.kind + ('_nopen' if m.without_penalty else '') for m in results.models}
  draw_frontier(axes, points, frontier_batches(points),
                lambda p: _FRONTIER_STYLE[kinds[p.name]], results.models[0].gen_ppl_teacher,
                'AR samples (all prompts)',
                lambda batch: f'batch {batch}: front = fastest at each distance from the AR '
                'samples\' gen. ppl\n(lossless: fewer prompts, compared with the AR samples of '
                'the same)')


def draw_frontier(axes, points: list[FrontierPoint], batches: list[int], style_of,
                  reference: float, reference_label: str, title_of) -> None:
  """One panel per batch size (axes: one or an array of them): every point's gen. ppl (x, log,
  with its interval) against its speed-up at that batch, labelled, and the Pareto front
  (front_at) as a line. style_of(point) -> (colour, marker); reference: the AR samples' gen.
  ppl (a dashed line, `reference_label` in the legend); title_of(batch) -> the panel title."""
  axes = list(axes) if isinstance(axes, (list, tuple)) or hasattr(axes, 'shape') else [axes]
  for ax, batch in zip(axes, batches):
    front = front_at(points, batch)
    for i, p in enumerate(points):
      color, marker = style_of(p)
      y = p.speedup[batch]
      ax.errorbar([p.gen_ppl], [y], xerr=[[p.gen_ppl - p.gen_ppl_ci.lo],
                                          [p.gen_ppl_ci.hi - p.gen_ppl]],
                  fmt=marker, color=color, capsize=2, markersize=5)
      # neighbouring settings often sit close: stagger the labels vertically
      ax.annotate(p.label, (p.gen_ppl, y), textcoords='offset points',
                  xytext=(4, 4 - 9 * (i % 3)), fontsize=6)
    ax.plot([points[i].gen_ppl for i in front], [points[i].speedup[batch] for i in front], '-',
            color='tab:red', alpha=0.6, linewidth=1.5, label='Pareto front')
    ax.axvline(reference, color='gray', linestyle='--', linewidth=1, label=reference_label)
    ax.axhline(1.0, color='black', linewidth=0.8)
    ax.set_xscale('log')
    ax.set_xlabel('gen. ppl under the AR teacher (log; 95% interval)')
    ax.set_ylabel('speed-up vs AR (tokens/s, same process)')
    ax.set_title(title_of(batch), fontsize=8)
    ax.legend(fontsize=7)


def _draw_speedup(results: Results, ax) -> None:
  predicted = {m['name']: m for m in results.roofline['models']}
  for model in timed(results.models)[1:]:
    line, = ax.plot([r.batch for r in model.throughput],
                    [r.speedup_vs_ar for r in model.throughput], 'o-', label=f'k={model.k} measured')
    curve = predicted[model.name]['predicted_curve']
    ax.plot([c[0] for c in curve], [c[1] for c in curve], '--', color=line.get_color(),
            alpha=0.7, label=f'k={model.k} roofline')
  ax.axhline(1.0, color='black', linewidth=1)
  ax.set_xscale('log', base=2)
  ax.set_xlabel('batch size')
  ax.set_ylabel('speed-up vs AR (tokens/s)')
  ax.set_title(f'K-Forcing decode speed-up on {results.device}', fontsize=9)
  ax.legend(fontsize=7)


def _draw_quality(results: Results, axes) -> None:
  ar = results.models[0]
  students = [m for m in results.models if m.kind == 'pflm' and not m.without_penalty]
  plain = [m for m in results.models if m.kind == 'pflm' and m.without_penalty]
  ks = [m.k for m in students]
  for ax, key, label in ((axes[0], 'gen_ppl_teacher', 'generative perplexity'),
                         (axes[1], 'entropy', 'unigram entropy (nats)')):
    ax.errorbar(ks, [getattr(m, key) for m in students], yerr=_error_bars(students, key),
                fmt='o-', capsize=3,
                label='student' + (' (under the teacher)' if key == 'gen_ppl_teacher' else ''))
    if plain:
      ax.errorbar([m.k for m in plain], [getattr(m, key) for m in plain],
                  yerr=_error_bars(plain, key), fmt='^:', capsize=3,
                  label='student, no frequency penalty')
    ax.axhline(getattr(ar, key), color='black', linestyle='--', label='AR teacher samples')
    if key == 'gen_ppl_teacher' and ar.gen_ppl_evaluator is not None:
      ax.plot(ks, [m.gen_ppl_evaluator for m in students], 's-',
              label='student (under the evaluator)')
      ax.axhline(ar.gen_ppl_evaluator, color='gray', linestyle=':',
                 label='AR samples (evaluator)')
    ax.set_xlabel('k (tokens per forward)')
    ax.set_ylabel(label)
    if ks:
      ax.set_xticks(ks)
    ax.legend(fontsize=7)


def _error_bars(models: list[ModelResult], key: str) -> list[list[float]]:
  """Matplotlib's asymmetric yerr from each model's `{key}_ci`."""
  cis = [(getattr(m, key), getattr(m, f'{key}_ci')) for m in models]
  return [[value - ci.lo for value, ci in cis], [ci.hi - value for value, ci in cis]]


# ----------------------------------------------------------------------------- REPORT.md

def _fmt(value, spec: str = '.2f') -> str:
  return 'n/a' if value is None else format(value, spec)


def _with_ci(value, ci: Interval | None, spec: str) -> str:
  """'215.5 [201.3, 230.9]' (or 'n/a')."""
  if value is None:
    return 'n/a'
  text = format(value, spec)
  return text if ci is None else f'{text} [{ci.lo:{spec}}, {ci.hi:{spec}}]'


def _yes_no(flag: bool | None) -> str:
  return 'n/a' if flag is None else 'yes' if flag else 'no'


def mode_seeking_prose(models: list[ModelResult]) -> list[str]:
  """One plain sentence per student: mode-seeking or not, with its two ratios to the AR's."""
  ar = models[0]
  lines = []
  for m in models[1:]:
    if m.kind == 'lossless':
      continue  # in the lossless section's table
    verdict = ('**is mode-seeking**' if m.mode_seeking else 'is not mode-seeking')
    lines.append(f'- {m.name} {verdict}: gen. ppl (teacher) '
                 f'{m.gen_ppl_teacher / ar.gen_ppl_teacher:.2f}x the AR samples\', entropy '
                 f'{m.entropy / ar.entropy:.3f}x.')
  return lines


def _bin_name(b: EntropyBin) -> str:
  return f'[{b.lo:g}, {"inf" if b.hi is None else format(b.hi, "g")})'


def agreement_markdown(results: Results) -> list[str]:
  """Per-slot agreement of every student with the AR map, then per student by entropy bin."""
  students = [m for m in results.models if m.agreement_vs_ar is not None]
  if not students:
    return []
  k_max = max(m.k for m in students)
  lines = [
      '## Agreement with the AR teacher\'s own sampling map', '',
      f'{results.agreement_rows} held-out rows; every window t draws uniforms u_1..u_k and the '
      'AR teacher samples token i from p_AR(. | x<=t, tokens <i) with u_i at tau = 1 (its '
      'own sampling map - the inverse CDF, or the Gumbel-max coupling under model.cdf_order = '
      'gumbel - conditioned on its own previous samples); the student emits its readout (the '
      'argmax of its logits, or its own sample with u_i for a distributional student) for the '
      'same u (no frequency penalty). slot i: token i equal; prefix i: '
      'tokens 1..i all equal (prefix k = acc_total against the AR map). Unlike the stage '
      'acc_total (against the previous stage) this shows errors compounding through stages.', '',
      '| model | windows | ' + ' | '.join(f'slot {i}' for i in range(1, k_max + 1)) + ' | '
      + ' | '.join(f'prefix {i}' for i in range(1, k_max + 1)) + ' |',
      '|---|---|' + '---|' * (2 * k_max)]
  for m in students:
    a = m.agreement_vs_ar
    pad = [''] * (k_max - m.k)
    lines.append(f'| {m.name} | {a.windows} | '
                 + ' | '.join([f'{x:.3f}' for x in a.slot] + pad) + ' | '
                 + ' | '.join([f'{x:.3f}' for x in a.prefix] + pad) + ' |')
  lines += ['', '### By the AR teacher\'s entropy', '',
            'Windows binned by the entropy (nats) of p_AR(. | x<=t) at tau = 1. E[max p]: the '
            'slot-1 agreement of a student that ignores the noise and always emits the '
            'teacher\'s mode. Where the teacher is confident E[max p] is near 1 and agreeing is '
            'easy; the bins of higher entropy show whether a student follows the noise '
            '(agreement above E[max p]) or mostly emits the mode.', '',
            '| model | entropy bin | windows | E[max p] | slot-1 agreement | acc_total vs AR map |',
            '|---|---|---|---|---|---|']
  for m in students:
    for b in m.agreement_vs_ar.by_entropy:
      lines.append(f'| {m.name} | {_bin_name(b)} | {b.windows} | '
                   f'{_fmt(b.mode_reference, ".3f")} | {_fmt(b.agreement_1, ".3f")} | '
                   f'{_fmt(b.acc_total, ".3f")} |')
  return lines + ['']


def markdown(results: Results) -> str:
  models = results.models
  speed = timed(models)
  lines = [
      '# K-Forcing evaluation', '',
      f'Device: {results.device}; JAX {results.jax_version}; config `{results.config}`.', '',
      f'{results.num_samples} prompts of {results.prefix_len} tokens from the '
      f'`{results.eval_split}` split, decoded to {results.gen_len} tokens (fixed length, no '
      'EOS stop) with one shared noise key. Metrics use the generated tokens only. AR: '
      f'ancestral sampling at temperature {models[0].temperature}; students: their own k, '
      'tau = 1, frequency penalty lambda.', '',
      '## Quality', '',
      'Point estimates with 95% bootstrap intervals over the completions '
      f'({results.bootstrap_resamples} resamples with replacement, numpy seed '
      f'{results.bootstrap_seed}; gen. ppl pools the NLL of every generated token of a resample; '
      'distinct-2 resamples each completion\'s share of the unique bigrams). '
      f'Evaluator: {results.evaluator or "none"}. `_nopen` rows: the same student decoded '
      'with the same noises and no frequency penalty.', '',
      '| model | k | lambda | gen. ppl (teacher) | gen. ppl (evaluator) | entropy | '
      'distinct-2 | distinct-4 | acc_total (stage) | acc_total vs AR map | mode-seeking |',
      '|---|---|---|---|---|---|---|---|---|---|---|']
  by_name = {m.name: m for m in models}
  for m in models:
    if m.kind == 'lossless':
      continue  # fewer samples: the lossless section
    # a _nopen row is the penalised row's student: the all-windows forward has no penalty
    agreement = by_name[m.name.removesuffix(NO_PENALTY_SUFFIX)].agreement_vs_ar
    lines.append(
        f'| {m.name} | {m.k} | {_fmt(m.freq_penalty)} | '
        f'{_with_ci(m.gen_ppl_teacher, m.gen_ppl_teacher_ci, ".1f")} | '
        f'{_with_ci(m.gen_ppl_evaluator, m.gen_ppl_evaluator_ci, ".1f")} | '
        f'{_with_ci(m.entropy, m.entropy_ci, ".3f")} | '
        f'{_with_ci(m.distinct_2, m.distinct_2_ci, ".3f")} | {m.distinct_4:.3f} | '
        f'{_fmt(m.acc_total, ".3f")} | '
        f'{_fmt(None if agreement is None else agreement.prefix[-1], ".3f")} | '
        f'{_yes_no(m.mode_seeking)} |')
  lines += ['', 'acc_total (stage): the stage\'s held-out agreement with its own teacher (the '
            'previous stage) under shared noise, all k tokens of a window right (from the '
            'stage\'s eval.json). acc_total vs AR map: the same against the AR teacher\'s own '
            'sampling map (below).', '',
            f'Mode-seeking: {metrics.MODE_SEEKING_RULE}. A student that samples the teacher\'s '
            'distribution matches the AR samples on both; lower perplexity with less variety '
            'means it collapsed toward the teacher\'s mode, which is a failure, not a win.', '']
  lines += mode_seeking_prose(models) + [''] + agreement_markdown(results)
  lines += ['## Speed', '',
            f'Tokens/s of the whole generation (median of {results.repeats} interleaved rounds '
            'after a warm-up; speed-up vs AR in parentheses).', '',
            '| batch | ' + ' | '.join(m.name for m in speed) + ' |',
            '|---|' + '---|' * len(speed)]
  for i, row in enumerate(speed[0].throughput):
    cells = [f'{r.tokens_per_s:.0f} ({r.speedup_vs_ar:.2f}x)'
             for r in (m.throughput[i] for m in speed)]
    lines.append(f'| {row.batch} | ' + ' | '.join(cells) + ' |')
  lines.append('| forwards / token | ' + ' | '.join(
      f'{m.throughput[0].forwards_per_token:.3f}' for m in speed) + ' |')
  lines += step_ratio_markdown(results)
  lines += ['', '![speed-up](speedup.png)', '', '![quality](quality.png)', '']
  lines += lossless_markdown(results) + frontier_markdown(results)
  lines += roofline_markdown(results) + roofline_prose(results.roofline)
  lines += ['', '## Samples', '']
  for m in models:
    lines += [f'### {m.name}', '']
    for sample in m.samples:
      lines += ['```text', f'[prompt] {sample.prompt}', f'[generated] {sample.generated}',
                '```']
    lines.append('')
  return '\n'.join(lines)


def lossless_markdown(results: Results) -> list[str]:
  """The lossless rows: quality beside the AR row, acceptance, exactness; speed and the
  break-even per timed batch size."""
  rows = lossless_models(results.models)
  if not rows:
    return []
  ar = results.models[0]
  lines = [
      '## Lossless decoding', '',
      'Each student drafts k tokens from the noises of their positions; the AR teacher scores '
      'the draft in one pass, recomputes its own token for each position\'s noise (the same '
      'sampling map as its decoder), '
      'keeps the agreeing prefix and emits its own token at the first mismatch (or a bonus '
      'token after k agreements): the output is the AR teacher\'s own sample for the same '
      f'noise (kforcing_jax/lossless.py). Quality over the first {rows[0].lossless.samples} '
      f'prompts (the AR row: all {results.num_samples}); identical rows: equal token for token '
      'to the AR decoder on the same prompts, batches and noise keys.', '',
      '| model | samples | rows identical to AR | gen. ppl (teacher) | AR samples\' gen. ppl, '
      'same prompts | gen. ppl (evaluator) | entropy | distinct-2 | mode-seeking | tokens per '
      'iteration | accepted drafts a = 0..k |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
      f'| ar | {results.num_samples} | - | '
      f'{_with_ci(ar.gen_ppl_teacher, ar.gen_ppl_teacher_ci, ".1f")} | - | '
      f'{_with_ci(ar.gen_ppl_evaluator, ar.gen_ppl_evaluator_ci, ".1f")} | '
      f'{_with_ci(ar.entropy, ar.entropy_ci, ".3f")} | '
      f'{_with_ci(ar.distinct_2, ar.distinct_2_ci, ".3f")} | - | 1 | - |']
  for m in rows:
    s = m.lossless
    lines.append(
        f'| {m.name} | {s.samples} | {s.rows_identical_to_ar} / {s.samples} | '
        f'{_with_ci(m.gen_ppl_teacher, m.gen_ppl_teacher_ci, ".1f")} | '
        f'{s.ar_gen_ppl_teacher:.1f} | '
        f'{_with_ci(m.gen_ppl_evaluator, m.gen_ppl_evaluator_ci, ".1f")} | '
        f'{_with_ci(m.entropy, m.entropy_ci, ".3f")} | '
        f'{_with_ci(m.distinct_2, m.distinct_2_ci, ".3f")} | {_yes_no(m.mode_seeking)} | '
        f'{s.mean_tokens_per_iteration:.2f} | {" / ".join(map(str, s.accepted_histogram))} |')
  lines += ['', 'Tokens per iteration: accepted drafts + 1, averaged over (row, iteration) '
            'pairs of rows still generating.', '']
  if not any(m.throughput for m in rows):
    return lines
  lines += [
      f'Speed (median of {results.repeats} rounds, each lossless row interleaved with the AR '
      'teacher in the same rounds). One iteration = one student draft pass + one teacher '
      'verify pass; its cost in AR steps is the break-even: lossless is faster than AR exactly '
      'when a row gains more tokens per iteration than that. Break-even acceptance: the '
      'per-draft acceptance rate alpha with 1 + alpha + .. + alpha^k = that many tokens (none: '
      'more than k + 1 tokens, out of reach).', '',
      '| batch | model | AR tok/s | lossless tok/s | speed-up | iterations | tokens / iteration '
      '| one iteration in AR steps = break-even tokens / iteration | break-even acceptance |',
      '|---|---|---|---|---|---|---|---|---|']
  for m in rows:
    for r, c in zip(m.throughput, m.lossless.cost):
      lines.append(f'| {r.batch} | {m.name} | {r.tokens_per_s / r.speedup_vs_ar:.0f} | '
                   f'{r.tokens_per_s:.0f} | {r.speedup_vs_ar:.2f}x | {c.iterations} | '
                   f'{c.tokens_per_iteration:.2f} | {c.iteration_in_ar_steps:.2f} | '
                   f'{_fmt(c.break_even_acceptance, ".3f")} |')
  return lines + ['']


def frontier_markdown(results: Results) -> list[str]:
  """The frontier table: every setting's gen. ppl and speed-up, Pareto-front members marked."""
  points = frontier_points(results)
  batches = frontier_batches(points)
  if not batches:
    return []
  fronts = {b: set(front_at(points, b)) for b in batches}
  lines = [
      '## Speed-quality frontier', '',
      'One point per decode setting; speed-up: tokens/s over the AR teacher\'s in the same '
      'rounds (a student without penalty is not timed: it has its penalised row\'s speed, an '
      'upper bound on its time). Quality: gen. ppl under the teacher, ranked by its distance '
      'from the AR samples\' |ln(ppl / ppl_AR)| (lower perplexity than the AR samples is '
      'mode-seeking, not better); a lossless row is compared with the AR decoder\'s samples '
      'of its own (fewer) prompts. * = on the Pareto front at that batch size (no setting is as '
      'fast and as close, and better in one). Plot: frontier.png.', '',
      '| setting | row | gen. ppl (teacher) | AR reference | distance | '
      + ' | '.join(f'speed-up B={b}' for b in batches) + ' |',
      '|---|---|---|---|---|' + '---|' * len(batches)]
  for i, p in enumerate(points):
    cells = [f'{p.speedup[b]:.2f}x' + (' *' if i in fronts[b] else '') for b in batches]
    lines.append(f'| {p.label} | {p.name} | {_with_ci(p.gen_ppl, p.gen_ppl_ci, ".1f")} | '
                 f'{p.reference:.1f} | {p.distance:.3f} | ' + ' | '.join(cells) + ' |')
  return lines + ['', '![frontier](frontier.png)', '']


def step_ratio_markdown(results: Results) -> list[str]:
  """Per batch, the time of one k-token step over one AR step, measured (from the speed
  table's median rounds: seconds / decode steps, prefill inside both) beside the roofline's
  prediction: a k-token student beats AR while its ratio is below k."""
  models = results.roofline.get('models', [])[1:]
  if not models or 'measured_step_ratio_vs_ar' not in models[0]['per_batch'][0]:
    return []  # results written before the ratio was recorded
  lines = ['', 'Time of one decode step over one AR step (measured / roofline prediction); a '
           'k-token student is faster than AR while its ratio is below k.', '',
           '| batch | ' + ' | '.join(f'{m["name"]} step / AR step' for m in models) + ' |',
           '|---|' + '---|' * len(models)]
  for i, row in enumerate(models[0]['per_batch']):
    cells = [f'{m["per_batch"][i]["measured_step_ratio_vs_ar"]:.2f} / '
             f'{m["per_batch"][i]["predicted_step_ratio_vs_ar"]:.2f}' for m in models]
    lines.append(f'| {row["batch"]} | ' + ' | '.join(cells) + ' |')
  return lines


def roofline_markdown(results: Results) -> list[str]:
  """The roofline section's tables: step costs, and predicted vs measured speed-up per batch."""
  rf = results.roofline
  p, bw = rf['peak_flops_per_s'], rf['bandwidth_bytes_per_s']
  lines = [
      '## Roofline', '',
      f'Measured on this device: peak {p / 1e9:.1f} GFLOP/s ({rf["peak_measurement"]["dtype"]} '
      f'{rf["peak_measurement"]["matmul_size"]}^2 matmul), memory bandwidth {bw / 1e9:.1f} GB/s '
      f'(best of a {rf["bandwidth_measurement"]["array_bytes"] >> 20} MiB reduction and copy), '
      f'ridge point {rf["ridge_flops_per_byte"]:.1f} FLOP/byte.', '',
      f'Per-step cost: {rf["cost_source"]}. Both are affine in the batch B: cost = const + '
      'per_row * B (weights are read once per step whatever B is). Predicted step time = '
      'max(FLOPs / peak, bytes / bandwidth); predicted speed-up = steps_AR * t_AR / '
      '(steps_k * t_k).', '',
      f'| model | steps | FLOPs/step const | FLOPs/step per row | bytes/step const | '
      f'bytes/step per row | XLA / analytic FLOPs at B={rf["models"][0]["xla"]["batch"]} | '
      'XLA / analytic bytes |',
      '|---|---|---|---|---|---|---|---|']
  for m in rf['models']:
    a, x = m['analytic'], m['xla']
    lines.append(f'| {m["name"]} | {m["steps"]} | {a["flops"]["const"]:.3g} | '
                 f'{a["flops"]["per_row"]:.3g} | {a["bytes"]["const"]:.3g} | '
                 f'{a["bytes"]["per_row"]:.3g} | {x["flops_vs_analytic"]:.2f} | '
                 f'{x["bytes_vs_analytic"]:.2f} |')
  lines += ['', 'XLA counts the operands and results of every unfused op, so its bytes are an '
            'upper bound on memory traffic; the analytic bytes are the minimum (weights, KV '
            'cache, logits once).']
  ar, students = rf['models'][0], rf['models'][1:]
  lines += ['', '| batch | AR regime | ' + ' | '.join(
      f'{m["name"]} predicted / measured' for m in students) + ' |',
      '|---|---|' + '---|' * len(students)]
  measured = {m.name: m for m in results.models}
  for i, row in enumerate(ar['per_batch']):
    cells = [f'{m["per_batch"][i]["predicted_speedup_vs_ar"]:.2f} / '
             f'{measured[m["name"]].throughput[i].speedup_vs_ar:.2f} '
             f'({m["per_batch"][i]["regime"]})' for m in students]
    lines.append(f'| {row["batch"]} | {row["regime"]} | ' + ' | '.join(cells) + ' |')
  return lines + ['']


def _from_batch(value) -> str:
  return 'never' if value is None else f'from B ~ {max(value, 1):.0f}'


def roofline_prose(rf: dict) -> list[str]:
  """Per student: predicted speed-ups and crossovers; then why, from the AR step's intensity."""
  ar, students = rf['models'][0], rf['models'][1:]
  lines = []
  for m in students:
    pred, meas = m['predicted_crossover_batch'], m['measured_crossover_batch']
    lines.append(
        f'- {m["name"]}: predicted speed-up {m["predicted_speedup_batch_1"]:.2f}x at B=1, '
        f'{m["predicted_speedup_large_batch"]:.2f}x as B grows without bound (steps ratio '
        f'{ar["steps"] / m["steps"]:.2f}); crosses 1 at B = '
        + (f'{pred:.0f}' if pred else 'never (in 1..2^20)') + ' predicted, '
        + (f'{meas:.0f}' if meas else 'not between the measured batch sizes') + ' measured. '
        f'Each step runs 2k = {2 * m["k"]} slots and k = {m["k"]} output-head rows.')
  small, large = ar['per_batch'][0], ar['per_batch'][-1]
  return lines + [
      '', f'Why: the AR step\'s arithmetic intensity is {small["intensity_flops_per_byte"]:.2f} '
      f'FLOP/byte at B={small["batch"]} and {large["intensity_flops_per_byte"]:.2f} at '
      f'B={large["batch"]}, against a ridge point of {rf["ridge_flops_per_byte"]:.1f}; it is '
      f'compute-bound {_from_batch(ar["compute_bound_from_batch"])}, the k-token steps '
      + ', '.join(f'{m["name"]} {_from_batch(m["compute_bound_from_batch"])}'
                  for m in students) + '. '
      'While a step is memory-bound its time is set by the bytes, dominated at small batch by '
      'the weights every step streams once whatever its width, so a k-token step costs about '
      'as much as an AR step and the student wins by needing k times fewer steps. FLOPs grow '
      'with B times the slots per step, and a k-token step runs 2k slots (k tokens + k hints) '
      'to emit k tokens, so it turns compute-bound at a smaller batch than the AR step; once '
      'both are, it does about twice the work per emitted token (the output head, k rows for k '
      'tokens, is the shared part) and the speed-up falls below 1. KV-cache reads grow with B '
      'too and keep large batches partly memory-bound. The roofline ignores fixed per-step '
      'costs (kernel launches, while-loop iterations, host dispatch), which dominate small '
      'models at small batch and favour the student (fewer steps): compare predicted and '
      'measured step times in results.json (roofline.models[*].per_batch).']
