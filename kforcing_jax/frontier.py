"""The speed-quality frontier of decode settings (issue 14): which settings, the loop that
decodes each, what one of its iterations costs, its predicted speed-up on another device, and
the frontier's table and plot. The measurement is kforcing_jax/benchmarks/frontier.py.

Settings (`Setting.family`):
  ar                 the AR teacher, one token per step (decode.ar_decode_loop);
  lossy              a student stage decoding its own k tokens per step with frequency penalty
                     lambda (decode.pflm_decode_loop);
  adaptive           lossy with adaptive k: the student drafts k, each row keeps the leading
                     slots whose top-1 minus top-2 logit margin reaches the threshold (at least
                     one) and redrafts the rest (lossless.adaptive_pflm_loop; no penalty);
  lossless           the student drafts k, the AR teacher verifies (lossless.verify_loop): the
                     output is the teacher's own sample;
  adaptive_lossless  lossless, each row proposing only its confident prefix (the margin).

Predicted speed-up on another device (a model, not a measurement). A decode of n new tokens
per row runs `iterations` loop iterations: AR n; lossy ceil(n / k); adaptive and lossless the
count measured in the timed run at that batch (the slowest row sets it; it does not depend on
the device). Each iteration is a fixed set of passes, whose times the calibrated speed model
(speed_model.py: fitted on this CPU's step times, applied at the device's published peaks, no
per-step overhead) predicts from their analytic costs:

    speed-up = n * t_AR / (iterations * t_iteration) = (n / iterations) * t_AR / t_iteration

with t_iteration the k-token step for lossy (roofline.analytic_step_cost), the student's draft
pass for adaptive, and draft + the teacher's verify pass over k+1 positions for lossless
(`pass_cost`); n / iterations is the batch's tokens per iteration (at most the mean tokens a
row gains per iteration, accepted drafts + 1, since the slowest row sets the count). For a
fixed k this is speed_model_fit's steps_AR t_AR / (steps_k t_k).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import decode, evaluate, lossless, report, roofline, sampling, speed_model
from kforcing_jax import timing
from kforcing_jax.timing import decode_steps

FAMILIES = ('ar', 'lossy', 'adaptive', 'lossless', 'adaptive_lossless')
VERIFIED = ('lossless', 'adaptive_lossless')  # the AR teacher checks every token
RAGGED = ('adaptive',) + VERIFIED  # lossless.py's loop: iterations are measured, not ceil(n/k)


@dataclasses.dataclass(frozen=True)
class Setting:
  """One decode setting. stage: the student stage (its k_max) that drafts or decodes, 0 for
  AR; k: tokens drafted or decoded per iteration; freq_penalty: lossy only;
  margin_threshold: the adaptive families only."""
  family: str
  k: int
  stage: int = 0
  freq_penalty: float | None = None
  margin_threshold: float | None = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f'unknown setting family {self.family!r}; expected one of {FAMILIES}.')
    if (self.margin_threshold is not None) != self.family.startswith('adaptive'):
      raise ValueError(f'{self.family}: margin_threshold={self.margin_threshold} is set for '
                       'the adaptive families, and only for them.')

  @property
  def name(self) -> str:
    if self.family == 'ar':
      return 'ar'
    name = f'{self.family}_k{self.k}'
    if self.stage != self.k:
      name += f'_s{self.stage}'
    if self.family == 'lossy':
      name += f'_pen{self.freq_penalty:g}'
    if self.margin_threshold is not None:
      name += f'_m{self.margin_threshold:g}'
    return name

  @property
  def label(self) -> str:
    if self.family == 'ar':
      return 'AR'
    if self.family == 'lossy':
      text = f'k={self.k} lossy, lambda {self.freq_penalty:g}'
    elif self.family == 'lossless':
      text = f'k={self.k} lossless'
    else:
      text = (f'k<={self.k} {self.family.replace("adaptive_", "adaptive ")}'
              f'{" lossy" if self.family == "adaptive" else ""}, margin '
              f'{self.margin_threshold:g}')
    return text + (f' (student k{self.stage})' if self.stage != self.k else '')


def settings(stages: list[int], default_penalties: dict, extra_penalties: list[float],
             thresholds: list[float], lossless_thresholds: list[float]) -> list[Setting]:
  """The frontier's settings for a run with these student stages: AR; every stage lossy with
  its default penalty (default_penalties[k]) and with none, the widest stage also at each of
  `extra_penalties`; the widest stage adaptive at each threshold; every stage lossless; the
  widest stage adaptive lossless at each lossless threshold."""
  widest = max(stages)
  out = [Setting('ar', 1)]
  for k in sorted(stages):
    penalties = {0.0, float(default_penalties[k])}
    if k == widest:
      penalties |= {float(p) for p in extra_penalties}
    out += [Setting('lossy', k, k, p) for p in sorted(penalties)]
  out += [Setting('adaptive', widest, widest, margin_threshold=float(m)) for m in thresholds]
  out += [Setting('lossless', k, k) for k in sorted(stages)]
  out += [Setting('adaptive_lossless', widest, widest, margin_threshold=float(m))
          for m in lossless_thresholds]
  return out


# ----------------------------------------------------------------------------- decoding

@dataclasses.dataclass
class SettingDecoder:
  """A setting bound to its loaded models, called like a decode.Decoder: `dec(prompts, key)`
  -> tokens (B, gen_len) (ar, lossy) or the ragged loop's dict (lossless.verify_loop's keys).
  The last output per batch size is kept in `outputs`, so the timed runs give the samples and
  loop iterations too."""
  setting: Setting
  run: object = dataclasses.field(repr=False)
  outputs: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def name(self) -> str:
    return self.setting.name

  @property
  def k(self) -> int:
    return self.setting.k

  @property
  def kind(self) -> str:  # what evaluate.quality reads beside name and k
    return self.setting.family

  @property
  def settings(self) -> dict:  # evaluate.quality spreads these into its entry: none here
    return {}

  def __call__(self, prompts, key):
    out = self.run(prompts, key)
    self.outputs[int(prompts.shape[0])] = out
    return out


def decoder(setting: Setting, teacher, students: dict, layout, *, gen_len: int,
            temperature: float) -> SettingDecoder:
  """The SettingDecoder of `setting` with the loaded exports (rundir.Export: the AR teacher,
  students by stage). The AR teacher samples at `temperature` (as do lossless drafts); a
  student decodes at tau = 1, as evaluate decodes them. Every prompt row is full length."""
  s = setting
  if s.family == 'ar':
    run = decode.decoder(teacher, layout, gen_len=gen_len, eos_id=None, temperature=temperature)
  elif s.family == 'lossy':
    run = decode.decoder(students[s.stage], layout, gen_len=gen_len, k=s.k, eos_id=None,
                         penalty=s.freq_penalty)
  elif s.family == 'adaptive':
    student = students[s.stage]

    def run(prompts, key):
      lens = np.full(prompts.shape[0], prompts.shape[1], np.int32)
      return lossless.generate_adaptive(student.model, student.params, prompts, lens, key, 1.0,
                                        s.margin_threshold, gen_len=gen_len, k=s.k)
  else:
    run = evaluate.lossless_decoder(teacher, students[s.stage], gen_len=gen_len,
                                    temperature=temperature, k=s.k,
                                    margin_threshold=s.margin_threshold).run
  return SettingDecoder(s, run)


def tokens_of(output) -> np.ndarray:
  """The (B, gen_len) tokens of a SettingDecoder output."""
  return decode.to_host(output['tokens'] if isinstance(output, dict) else output)


# ----------------------------------------------------------------------------- cost model

def pass_cost(model, batch: int, *, slots: int, tokens: int, logit_rows: int, hints: int,
              cache_len: int, sampled_rows: int = 0, penalty_rows: int = 0,
              kv_only_rows: int = 0, feedback_slots: int = 0) -> dict:
  """Hand-counted {'flops', 'bytes'} of one forward pass of `model` over `slots` positions per
  row (`tokens` of them token embeddings, whose K/V are written; the rest hint states),
  attending over a `cache_len` buffer, with `logit_rows` output-head rows, `hints` noise
  encodings, `sampled_rows` rows through the AR sampler's blockwise CDF and `penalty_rows`
  rows of frequency-penalty counts; `kv_only_rows` slots stop at their K/V in the last layer;
  `feedback_slots` slots are read through a student's token-feedback block (one row per pass).
  The counting rules of roofline.analytic_step_cost (tests:
  with the AR step's and the k-token step's numbers it gives exactly that), for the passes of
  lossless.py's loop, which it does not cover."""
  cfg = model.cfg
  d, f, v, layers = cfg.d_model, cfg.mlp_ratio * cfg.d_model, cfg.vocab_size, cfg.num_layers
  dkv = cfg.kv_heads * cfg.head_dim  # K/V width: d, or less under grouped-query attention
  act = jnp.dtype(cfg.compute_dtype).itemsize
  blocks = -(-v // sampling.CDF_BLOCK)
  matmul_row = (layers * slots * (4 * d * (d + dkv) + 4 * d * f) + logit_rows * 2 * d * v
                + hints * 20 * d * d
                + sampled_rows * (2 * blocks * sampling.CDF_BLOCK ** 2 + 2 * blocks * blocks)
                - kv_only_rows * (2 * d * d + 4 * d * f))
  attention_row = (layers * slots - kv_only_rows) * 4 * d * (cache_len + slots)
  weights = sum(math.prod(x.shape) for x in jax.tree.leaves(model.param_shapes)) - v * d
  bytes_row = (layers * 2 * dkv * act * (cache_len + tokens) + tokens * d * 4
               + 2 * logit_rows * v * 4 + penalty_rows * 2 * v * 4)
  passes = max(feedback_slots - 1, 0)
  if passes:  # row 0's projections, then one block row per pass against the cache
    matmul_row += 2 * d * (d + 2 * dkv) + passes * (4 * d * (d + dkv) + 4 * d * f + 2 * d * d)
    attention_row += sum(4 * d * (cache_len + j + 1) for j in range(1, feedback_slots))
    block = sum(math.prod(x.shape) for x in jax.tree.leaves(
        (model.param_shapes['feedback'], model.param_shapes['feedback_in'])))
    weights += (passes - 1) * block + d * (d + 2 * dkv) + passes * (d + 1) * v
    bytes_row += passes * 2 * dkv * act * cache_len
  return {'flops': float(batch * (matmul_row + attention_row)),
          'bytes': float(4 * weights + batch * bytes_row),
          'matmul_flops': float(batch * matmul_row),
          'attention_flops': float(batch * attention_row),
          'weight_bytes': float(4 * weights), 'activation_bytes': float(batch * bytes_row)}


def draft_cost(student, k: int, batch: int, gen_len: int) -> dict:
  """The student's pass in lossless.py's loop: the last k+1 final tokens (K/V only in the
  last layer) and k hints, over the loop's gen_len + 2k + 1 buffer, k slot logits (argmax: no
  sampler; the margin's top-2 of the adaptive families is not counted)."""
  return pass_cost(student, batch, slots=2 * k + 1, tokens=k + 1, logit_rows=k, hints=k,
                   cache_len=gen_len + 2 * k + 1, kv_only_rows=k + 1,
                   feedback_slots=k if 'feedback' in student.param_shapes else 0)


def verify_cost(teacher, k: int, batch: int, gen_len: int) -> dict:
  """The AR teacher's verify pass: the last final token and k drafts (k+1 positions), each
  position's logits through the sampler."""
  return pass_cost(teacher, batch, slots=k + 1, tokens=k + 1, logit_rows=k + 1, hints=0,
                   cache_len=gen_len + 2 * k + 1, sampled_rows=k + 1)


def iteration_costs(setting: Setting, teacher, student, batch: int, gen_len: int) -> list[dict]:
  """The analytic cost of every pass of one loop iteration of `setting` (models.
  FunctionalModel: the AR teacher, and the stage's student or None for AR)."""
  if setting.family == 'ar':
    return [roofline.analytic_step_cost(teacher, 1, batch, gen_len)]
  if setting.family == 'lossy':
    return [roofline.analytic_step_cost(student, setting.k, batch, gen_len)]
  draft = draft_cost(student, setting.k, batch, gen_len)
  if setting.family == 'adaptive':
    return [draft]
  return [draft, verify_cost(teacher, setting.k, batch, gen_len)]


def iterations(setting: Setting, prefix_len: int, gen_len: int, measured: int | None) -> int:
  """Loop iterations of one decode: AR and lossy by their fixed step count; the ragged
  families as `measured` in the timed run."""
  if setting.family in RAGGED:
    if measured is None:
      raise ValueError(f'{setting.name}: the ragged loop\'s iterations must be measured.')
    return int(measured)
  return decode_steps(prefix_len, gen_len, setting.k)


def predicted_speedup(new_tokens: int, iteration_count: int, t_ar: float,
                      t_iteration: float) -> float:
  """new_tokens AR steps against iteration_count iterations: n t_AR / (iterations t_iter)."""
  return new_tokens * t_ar / (iteration_count * t_iteration)


def predicted_seconds(device_model: dict, costs: list[dict]) -> float:
  """speed_model's predicted time of passes run one after the other."""
  return float(sum(speed_model.predict(device_model, c) for c in costs))


def device_models(speed_model_result: dict, devices: list[str]) -> dict:
  """{device: speed model} from a speed_model_fit result (results/speed_table/
  speed_model.json): the fractions of peak of the fit it predicts the paper configs with,
  applied at each device's published peaks, no per-step overhead (as speed_model_fit)."""
  eff = speed_model_result[speed_model_result['paper_predictions_from']]['efficiencies']
  out = {}
  for name in devices:
    if name not in speed_model_result['devices']:
      raise ValueError(f'device {name!r}: the speed model knows '
                       f'{sorted(speed_model_result["devices"])}.')
    spec = speed_model_result['devices'][name]
    out[name] = speed_model.for_device(eff, spec['peak_flops_per_s'],
                                       spec['bandwidth_bytes_per_s'], overhead_s=0.0)
  return out


def prediction_source(speed_model_result: dict, path: str, devices: list[str]) -> dict:
  """What the predictions rest on, for the result JSON and the note above the table."""
  fit = speed_model_result['paper_predictions_from']
  return {'speed_model': path, 'fit': fit,
          'efficiencies': speed_model_result[fit]['efficiencies'],
          'check': {key: speed_model_result[key] for key in
                    ('held_out_worst_speedup_error', 'target_error', 'passes_check')},
          'devices': {d: speed_model_result['devices'][d] for d in devices},
          'formula': 'speed-up = new_tokens * t_AR / (iterations * t_iteration)'}


def _fractions_text(eff: dict) -> str:
  """The fitted fractions in words ('-' for a term the fit did not need)."""
  f = {key: '-' if value is None else f'{value:.2f}' for key, value in eff.items()}
  return (f'{f["matmul_fraction_of_peak"]} / {f["attention_fraction_of_peak"]} of peak '
          f'FLOP/s in weight matmuls / attention, {f["weights_fraction_of_bandwidth"]} / '
          f'{f["activations_fraction_of_bandwidth"]} of bandwidth reading weights / activations')


def _check_text(source: dict) -> str:
  check = source.get('check')
  if check is None:
    return ''
  verdict = 'passes' if check['passes_check'] else 'fails'
  return (f'; on the CPU shapes it was not fitted on its worst speed-up error is '
          f'{100 * check["held_out_worst_speedup_error"]:.0f}%: it {verdict} its '
          f'{100 * check["target_error"]:.0f}% check')


def prediction_note(source: dict) -> str:
  eff = source['efficiencies']
  specs = '; '.join(f'{name} {spec["peak_flops_per_s"] / 1e12:.0f} TFLOP/s, '
                    f'{spec["bandwidth_bytes_per_s"] / 1e9:.0f} GB/s'
                    for name, spec in source['devices'].items())
  return (f'The same demo models on one chip of each device ({specs}: published peaks), step '
          f'times from the calibrated speed model ({source["speed_model"]}, fit '
          f'{source["fit"]}: {_fractions_text(eff)}, no per-step overhead - it assumes the '
          f'chip reaches the fractions this CPU did{_check_text(source)}). speed-up = n * '
          't_AR / (iterations * t_iteration): n new tokens per row; iterations: AR n, lossy '
          'ceil(n / k), adaptive and lossless '
          'the loop iterations measured at that batch here; t_iteration: the k-token step '
          '(lossy), the student\'s draft pass (2k+1 slots: the last k+1 tokens and k hints; '
          'adaptive), draft + the teacher\'s verify pass over k+1 positions (lossless) - '
          'kforcing_jax/frontier.py.')


def predict(setting: Setting, teacher, student, batch: int, prefix_len: int, gen_len: int,
            measured_iterations: int | None, device_model: dict) -> dict:
  """The predicted step times and speed-up of `setting` at `batch` on one device model."""
  t_ar = predicted_seconds(device_model, iteration_costs(Setting('ar', 1), teacher, None, batch,
                                                         gen_len))
  t_iteration = predicted_seconds(device_model,
                                  iteration_costs(setting, teacher, student, batch, gen_len))
  count = iterations(setting, prefix_len, gen_len, measured_iterations)
  return {'batch': batch, 'iterations': count, 'ar_step_s': t_ar, 'iteration_s': t_iteration,
          'iteration_in_ar_steps': t_iteration / t_ar,
          'speedup_vs_ar': predicted_speedup(gen_len - prefix_len, count, t_ar, t_iteration)}


def repredict(result: dict, teacher, students: dict, device_models: dict,
              source: dict) -> dict:
  """A copy of a frontier result (benchmarks/frontier.py's JSON) whose predicted speed-ups
  come from other device models (e.g. a refitted speed model, `source` its
  prediction_source), at the batch sizes each setting was timed at and with the loop
  iterations it measured there; measured speed and quality are left as they were.
  students: {stage: FunctionalModel}."""
  out = {**result, 'prediction': source, 'settings': []}
  for rec in result['settings']:
    setting = Setting(rec['family'], rec['k'], rec['stage'], rec['freq_penalty'],
                      rec['margin_threshold'])
    student = None if setting.family == 'ar' else students[setting.stage]
    measured = {row['batch']: row['iterations'] for row in rec['speed']}
    predicted = {device: {str(b): predict(setting, teacher, student, b, result['prefix_len'],
                                          result['gen_len'], measured[b], model)
                          for b in sorted(measured)}
                 for device, model in device_models.items()}
    out['settings'].append({**rec, 'predicted': predicted})
  return out


# ----------------------------------------------------------------------------- measured rows

def speed_rows(setting: Setting, rows: list[dict], ar_rows: list[dict], measured: dict,
               mean_tokens: dict, new_tokens: int) -> list[dict]:
  """Per batch: a timing.measure_throughput row of `setting` against the AR teacher's of the
  same rounds, with its loop iterations (`measured[batch]` for the ragged families), one
  iteration's cost in AR steps = the break-even tokens per iteration (evaluate.lossless_cost),
  the break-even per-draft acceptance (verified families only) and the mean tokens a row gains
  per iteration (`mean_tokens[batch]`, the loop's own average; ragged families)."""
  ar_by_batch = {r['batch']: r for r in ar_rows}
  out = []
  for row, timed in zip(rows, timing.with_speedup(rows, ar_rows)):
    batch = row['batch']
    count = iterations(setting, 0, new_tokens, measured.get(batch))
    cost = evaluate.lossless_cost(row, ar_by_batch[batch], count, new_tokens, setting.k)
    out.append(dict(
        timed, iterations=count, tokens_per_iteration=cost.tokens_per_iteration,
        mean_tokens_per_iteration=mean_tokens.get(batch),
        iteration_in_ar_steps=cost.iteration_in_ar_steps,
        break_even_acceptance=(cost.break_even_acceptance if setting.family in VERIFIED
                               else None)))
  return out


def interval(ci) -> list[float]:
  return [float(ci.lo), float(ci.hi)]


def record(setting: Setting, quality: dict, speed: list[dict], predicted: dict, rows: int,
           rows_identical_to_ar: int, ar_gen_ppl_teacher: float) -> dict:
  """One setting's JSON record: its description, quality (evaluate.quality's metrics over
  `rows` completions, the intervals as [lo, hi]; ar_gen_ppl_teacher: the AR samples' of the
  same rows, its reference), measured speed per batch and predicted speed per device."""
  keys = ('gen_ppl_teacher', 'gen_ppl_evaluator', 'entropy', 'distinct_2', 'distinct_4')
  q = {key: quality[key] for key in keys}
  for key in ('gen_ppl_teacher_ci', 'gen_ppl_evaluator_ci', 'entropy_ci', 'distinct_2_ci'):
    q[key] = None if quality[key] is None else interval(quality[key])
  return dict(name=setting.name, label=setting.label, **dataclasses.asdict(setting),
              quality=dict(q, rows=rows, rows_identical_to_ar=rows_identical_to_ar,
                           ar_gen_ppl_teacher=ar_gen_ppl_teacher), speed=speed,
              predicted=predicted)


# ----------------------------------------------------------------------------- the frontier

def points(result: dict) -> list[report.FrontierPoint]:
  """Every setting of a benchmark result as a report.FrontierPoint (measured speed-ups;
  quality against the AR teacher's samples of the same rows)."""
  return [report.FrontierPoint(r['name'], r['label'], r['quality']['gen_ppl_teacher'],
                               report.Interval(*r['quality']['gen_ppl_teacher_ci']),
                               {s['batch']: s['speedup_vs_ar'] for s in r['speed']}, r['name'],
                               r['quality']['ar_gen_ppl_teacher'])
          for r in result['settings']]


def timed_at(pts: list[report.FrontierPoint], batch: int) -> list[report.FrontierPoint]:
  """The points with a speed at `batch` (a setting may be timed at fewer batch sizes)."""
  return [p for p in pts if batch in p.speedup]


def pareto_fronts(result: dict) -> dict:
  """{batch: [setting names on the Pareto front, by speed-up]} (report.front_at over the
  settings timed at that batch)."""
  pts = points(result)
  return {b: [timed_at(pts, b)[i].name for i in report.front_at(timed_at(pts, b), b)]
          for b in result['batch_sizes']}


def _ci(value, ci, fmt: str) -> str:
  if value is None:
    return '-'
  return f'{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]'


def _opt(value, fmt: str) -> str:
  return '-' if value is None else f'{value:{fmt}}'


def markdown(result: dict) -> str:
  """FRONTIER.md: the measured frontier table, the ragged families' iteration costs, and the
  predicted speed-ups (labelled as predictions)."""
  batches = result['batch_sizes']
  pts = points(result)
  fronts = pareto_fronts(result)
  lines = [
      '# Speed-quality frontier (kforcing_jax/benchmarks/frontier.py)', '',
      f'{result["device"]}, jax {result["jax_version"]}; run {result["workdir"]} '
      f'({result["config"]}); {result["num_prompts"]} held-out prompts of '
      f'{result["prefix_len"]} tokens decoded to {result["gen_len"]} (no EOS stop), one noise '
      f'key for every setting. Quality over the first {result["quality_rows"]} rows of the '
      f'batch-{max(batches)} run, or of the largest batch a setting was timed at (its rows = '
      'AR count says how many; 95% bootstrap intervals); distance = |ln(ppl / ppl_AR)| '
      'from the AR samples\' gen. ppl on the same rows (lower than AR is mode-seeking, not better). Speed: '
      'tokens/s over the AR teacher\'s in the same interleaved rounds (median of '
      + ', '.join(f'{result["repeats"][str(b)]} at B={b}' for b in batches) + ' rounds after a '
      'warm-up). * = on the Pareto front at that batch size.', '',
      '| setting | gen. ppl (teacher) | gen. ppl (evaluator) | entropy | distinct-2 | '
      'rows = AR | distance | tokens / iteration | '
      + ' | '.join(f'speed-up B={b}' for b in batches) + ' |',
      '|---|---|---|---|---|---|---|---|' + '---|' * len(batches)]
  for r, p in zip(result['settings'], pts):
    q = r['quality']
    tpi = r['speed'][-1]['mean_tokens_per_iteration']  # at its largest timed batch
    cells = ['-' if b not in p.speedup else
             f'{p.speedup[b]:.2f}x' + (' *' if p.name in fronts[b] else '') for b in batches]
    lines.append(
        f'| {r["label"]} | {_ci(q["gen_ppl_teacher"], q["gen_ppl_teacher_ci"], ".1f")} | '
        f'{_ci(q["gen_ppl_evaluator"], q["gen_ppl_evaluator_ci"], ".1f")} | '
        f'{_ci(q["entropy"], q["entropy_ci"], ".3f")} | '
        f'{_ci(q["distinct_2"], q["distinct_2_ci"], ".3f")} | '
        f'{q["rows_identical_to_ar"]}/{q["rows"]} | {p.distance:.3f} | '
        f'{_opt(tpi, ".2f")} | ' + ' | '.join(cells) + ' |')
  lines += ['', 'rows = AR: scored rows equal token for token to the AR teacher\'s. Tokens / '
            f'iteration: the mean tokens a row gains per loop iteration at B={max(batches)} '
            '(lossless: accepted drafts + 1; adaptive: slots kept), ragged settings only.', '',
            '![frontier](frontier.png)', '',
            '## Iteration cost (adaptive and lossless)', '',
            'One iteration of lossless.py\'s loop: a student draft pass (adaptive), plus the AR '
            'teacher\'s verify pass (lossless). It beats AR exactly when a batch gains more '
            'tokens per iteration (new tokens / iterations; the slowest row sets the count) '
            'than one iteration costs AR steps; break-even acceptance: the per-draft '
            'acceptance alpha with 1 + alpha + .. + alpha^k = that (- : out of reach, or no '
            'verifier).', '',
            '| setting | batch | iterations | tokens / iteration (batch) | mean tokens / '
            'iteration (rows) | one iteration in AR steps | break-even acceptance | speed-up |',
            '|---|---|---|---|---|---|---|---|']
  for r in result['settings']:
    if r['family'] not in RAGGED:
      continue
    for s in r['speed']:
      lines.append(f'| {r["label"]} | {s["batch"]} | {s["iterations"]} | '
                   f'{s["tokens_per_iteration"]:.2f} | '
                   f'{_opt(s["mean_tokens_per_iteration"], ".2f")} | '
                   f'{s["iteration_in_ar_steps"]:.2f} | '
                   f'{_opt(s["break_even_acceptance"], ".3f")} | {s["speedup_vs_ar"]:.2f}x |')
  devices = list(result['prediction']['devices'])
  lines += ['', '## PREDICTED speed-up on TPU (a model, not a measurement)', '',
            prediction_note(result['prediction']), '',
            '| setting | ' + ' | '.join(f'{d} B={b}' for d in devices for b in batches)
            + ' | measured on this CPU, B=' + '/'.join(map(str, batches)) + ' |',
            '|---|' + '---|' * (len(devices) * len(batches) + 1)]
  for r in result['settings']:
    cells = [f'{r["predicted"][d][str(b)]["speedup_vs_ar"]:.2f}x' if str(b) in r['predicted'][d]
             else '-' for d in devices for b in batches]
    by_batch = {s['batch']: s['speedup_vs_ar'] for s in r['speed']}
    measured = ' / '.join(f'{by_batch[b]:.2f}x' if b in by_batch else '-' for b in batches)
    lines.append(f'| {r["label"]} | ' + ' | '.join(cells) + f' | {measured} |')
  return '\n'.join(lines) + '\n'


_STYLE = {'ar': ('k', 's'), 'lossy': ('tab:blue', 'o'), 'adaptive': ('tab:purple', 'v'),
          'lossless': ('tab:green', 'D'), 'adaptive_lossless': ('tab:olive', 'P')}


def plot(path, result: dict) -> None:
  """frontier.png: one panel per batch size, measured speed-up against gen. ppl under the
  teacher, the Pareto front drawn (report.draw_frontier)."""
  pts = points(result)
  family = {r['name']: r['family'] for r in result['settings']}
  batches = result['batch_sizes']

  def draw(axes):
    for ax, b in zip(np.atleast_1d(axes), batches):
      report.draw_frontier(
          ax, timed_at(pts, b), [b], lambda p: _STYLE[family[p.name]], pts[0].gen_ppl,
          'AR samples', lambda b: f'batch {b}, measured on {result["device"]}: front = fastest '
          'at each distance\nfrom the AR samples\' gen. ppl')

  report.plot(path, draw, ncols=len(batches), figsize=(5.5 * len(batches), 4.5))
