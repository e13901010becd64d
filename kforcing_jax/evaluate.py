"""Evaluate the AR teacher and every distilled student of a run: quality, speed, roofline
(METHOD.md s.5). `run(config, workdir)` writes the run's report directory (rundir.report_dir):
results.json (report.Results), REPORT.md, speedup.png, quality.png and models.json (the params
fingerprint of every model evaluated); it is skipped when results.json exists and models.json
matches the exports (force=True re-runs it). Stale student stages (rundir.stage_provenance)
are refused unless allow_stale.

Models: "ar" (the teacher, kind 'ar', k = 1) sampled at config.decode.temperature, and
"pflm_k{k}" for every exported student stage (rundir.exports), decoded with its own k, tau = 1
and the frequency penalty decode.freq_penalty(config, k); "pflm_k{k}_nopen" is the same student
with the same noise key and no penalty (its samples are pflm_k{k}'s when that penalty is 0).

Quality (metrics.py): every model decodes the same prompts (the first config.decode.prefix_len
tokens of config.eval.num_samples held-out documents) with the same noise key, so position j
draws the same u in every model, to the fixed length config.decode.gen_len with no EOS stop
(the paper's fixed-length protocol). Metrics use the generated part only (positions >=
prefix_len):
  gen_ppl_*   exp(pooled mean NLL of the generated tokens) under the AR teacher, and under an
              independent AR evaluator or null: the teacher export of
              config.eval.evaluator_workdir, or else of the pipeline's own evaluator
              (rundir.evaluator_workdir, trained from config.eval.evaluator: another seed and
              size); its architecture is read from the checkpoint, its tokenizer must be ours;
  entropy     mean over samples of the entropy (nats) of the sample's token frequencies;
  distinct_n  unique n-grams / all n-grams, pooled over samples (n-grams never cross samples);
  *_ci        95% bootstrap intervals over the samples (metrics.bootstrap_ratio_interval);
  acc_total   the stage's held-out agreement with its teacher under shared noise, from the
              stage's eval.json (null for AR);
  agreement_vs_ar  every student against the AR teacher's own noise -> token map on
              config.eval.agreement_batches held-out batches, per slot and by the teacher's
              entropy (agreement.py);
  mode_seeking     metrics.is_mode_seeking against the AR samples (null for AR).

Speed (timing.measure_throughput): the whole fixed-length generation (prefill included,
eos_id=None) at every config.eval.batch_sizes, all models in this process, interleaved, the
median of config.eval.repeats rounds. Speed prompts: the quality prompts tiled to the batch
size, the same for every model. Roofline: roofline.analyse.

Lossless rows "lossless_k{k}" (report.LosslessStats), for every student stage k with k+1 <=
prefix_len: the student drafts k tokens, the AR teacher verifies (lossless.verify_loop), so
the samples are the teacher's. Quality over the first config.eval.lossless_samples prompts
(all of them in decode.mode lossless; 0: no lossless rows), decoded in chunks of the largest
eval.lossless_batch_sizes that fits (so the timing reuses the compiled loop); the AR teacher
decodes the same chunks to count the identical rows. Speed at eval.lossless_batch_sizes, each
lossless row interleaved with the AR teacher (a measure_throughput of its own); the timed
runs' own outputs give the loop iterations, hence one iteration's cost in AR steps and the
break-even acceptance (break_even_acceptance). report.frontier_points puts every setting on
the speed-quality plane (frontier.png).
"""

import dataclasses
import json
import math
import time
from typing import Callable

import jax
import numpy as np
from etils import epath

from kforcing_jax import agreement, checkpoints, data, decode, distill, lossless, metrics
from kforcing_jax import progress, provenance, report, roofline, rundir, sharding, timing
from kforcing_jax import teacher as ar_training  # `teacher` names the loaded teacher here

NUM_REPORT_SAMPLES = 3
SPEED_PROMPTS = 'the quality prompts tiled to the batch size, identical for every model'


def check_provenance(workdir: str, allow_stale: bool = False) -> None:
  """Refuses (ValueError) a student stage of `workdir` that is stale (rundir.stage_provenance:
  distilled from a teacher or previous stage that has changed since, or from a stale stage),
  unless `allow_stale`, which evaluates it with a warning; stages of unknown provenance
  (exports from before fingerprints were recorded) are evaluated with a warning."""
  stale = set()
  for k in rundir.student_stages(workdir):
    origin = rundir.stage_provenance(rundir.stage_dir(workdir, k))
    problem = None
    if origin.status == 'stale':
      problem = origin.describe()
    elif origin.teacher in stale:  # current against a teacher that is itself stale
      problem = f'{origin.stage} was distilled from {origin.teacher}, which is stale'
    if problem is not None:
      stale.add(origin.stage)
      if not allow_stale:
        raise ValueError(f'{problem}: it is stale and its results would not describe this run. '
                         'Fix: re-run distillation (python -m kforcing_jax.main.distill or the '
                         'pipeline), which rebuilds it, or pass --allow_stale to evaluate it '
                         'anyway.')
      progress.log(f'[evaluate] warning: {problem}; evaluated anyway (--allow_stale)')
    elif origin.status == 'unknown':
      progress.log(f'[evaluate] warning: {origin.describe()}')


def load_decoders(config, workdir: str, layout, tokenizer) -> list[tuple]:
  """[(decode.Decoder, rundir.Export)] of the teacher, then every student stage."""
  dc = config.decode
  exports = [rundir.load_export(d, layout, config=config, tokenizer=tokenizer)
             for d in rundir.exports(workdir)]
  if not exports or exports[0].kind != 'ar':
    raise FileNotFoundError(f'{workdir} has no exported AR teacher: train it first (`python -m '
                            'kforcing_jax.main.pipeline` or `kforcing_jax.main.train`).')
  out = []
  for export in exports:
    if export.kind == 'pflm' and dc.prefix_len < export.k:
      raise ValueError(f'{export.name} decodes k={export.k} tokens per step but '
                       f'config.decode.prefix_len={dc.prefix_len} < k: its first step feeds the '
                       f'last k prompt tokens. Set --config.decode.prefix_len={export.k} or more.')
    dec = decode.decoder(export, layout, gen_len=dc.gen_len, eos_id=None,
                         penalty=decode.freq_penalty(config, export.k),
                         temperature=dc.temperature)
    out.append((dec, export))
  return out


def without_penalty(dec: decode.Decoder, export, layout, gen_len: int) -> decode.Decoder:
  """The student decoder `dec` with frequency penalty 0, named '<name>_nopen'."""
  plain = decode.decoder(export, layout, gen_len=gen_len, eos_id=None, penalty=0.0)
  return dataclasses.replace(plain, name=dec.name + report.NO_PENALTY_SUFFIX)


def small_ar_config(config, spec, steps: int):
  """The run's config for a second AR model trained like the teacher (its data, tokenizer and
  config.train optimizer) with `spec`'s seed and size (d_model, num_layers, num_heads;
  multi-head attention) for `steps` steps: the evaluator, speculative decoding's draft."""
  out = config.copy_and_resolve_references()
  out.seed = int(spec.seed)
  out.model.d_model = int(spec.d_model)
  out.model.num_layers = int(spec.num_layers)
  out.model.num_heads = int(spec.num_heads)
  out.model.num_kv_heads = 0
  out.train.steps = int(steps)
  out.train.warmup_steps = min(int(config.train.warmup_steps), int(steps) // 10)
  return out


def evaluator_config(config):
  """The config the pipeline trains the independent evaluator with: the run's data, tokenizer
  and config.train, but config.eval.evaluator's seed, size and steps."""
  return small_ar_config(config, config.eval.evaluator, config.eval.evaluator.steps)


def evaluator_workdir(config, workdir: str | None) -> str | None:
  """config.eval.evaluator_workdir when set; else the pipeline's evaluator of `workdir` when
  it exported one; else None."""
  if config.eval.evaluator_workdir:
    return config.eval.evaluator_workdir
  if workdir is not None:
    own = rundir.evaluator_workdir(workdir)
    if checkpoints.has_params(rundir.params_dir(rundir.teacher_dir(own))):
      return own
  return None


def train_evaluator(config, workdir: str) -> None:
  """The AR evaluator of config.eval.evaluator (another seed, another size) in its own run
  directory, trained like the teacher and skipped when done; not when config.eval.
  evaluator_workdir names one or config.eval.evaluator.steps is 0."""
  if config.eval.evaluator_workdir:
    progress.log(f'[evaluator] using config.eval.evaluator_workdir='
                 f'{config.eval.evaluator_workdir}')
  elif config.eval.evaluator.steps <= 0:
    progress.log('[evaluator] config.eval.evaluator.steps=0: no independent evaluator')
  else:
    ar_training.run(evaluator_config(config), rundir.evaluator_workdir(workdir))


def load_evaluator(config, layout, tokenizer, workdir: str | None = None) -> rundir.Export | None:
  """The independent AR evaluator (see evaluator_workdir), or None."""
  directory = evaluator_workdir(config, workdir)
  if directory is None:
    return None
  try:
    # in its own dtype (recorded by its training or its conversion), as it was checked
    return rundir.load_export(rundir.teacher_dir(directory), layout, kind='ar',
                              tokenizer=tokenizer)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'config.eval.evaluator_workdir={directory!r}: {e} Or set '
                            "--config.eval.evaluator_workdir=''.") from e


def describe_evaluator(evaluator: rundir.Export | None, teacher: rundir.Export) -> str | None:
  """The evaluator in words: where, its size, its training (from its eval.json)."""
  if evaluator is None:
    return None
  cfg = evaluator.model.cfg
  trained = progress.read_json(rundir.eval_path(evaluator.directory)) or {}
  text = (f'{evaluator.directory}: d_model {cfg.d_model}, {cfg.num_layers} layers, '
          f'{cfg.num_heads} heads, {evaluator.model.num_params():,} parameters')
  if 'train_steps' in trained:
    text += f', {trained["train_steps"]} steps'
  if 'val_ppl' in trained:
    text += f', validation ppl {trained["val_ppl"]:.2f}'
  if evaluator.directory == teacher.directory:
    text += ' (the teacher itself: not independent)'
  return text


def sample_chunks(prompts: np.ndarray, key, batch_sizes) -> list[tuple[np.ndarray, object]]:
  """[(prompts chunk, noise key)]: all prompts in fixed-size chunks (the last one padded by
  repeating rows) of the largest speed batch size that fits, so the speed runs reuse the
  compiled loop. Chunk s gets the noise key fold_in(key, s), the same for every model."""
  num = prompts.shape[0]
  fitting = [b for b in batch_sizes if b <= num]
  chunk = max(fitting) if fitting else num
  total = math.ceil(num / chunk) * chunk
  padded = np.resize(prompts, (total, prompts.shape[1])).astype(np.int32)
  return [(padded[s:s + chunk], jax.random.fold_in(key, s)) for s in range(0, total, chunk)]


def decode_samples(dec, prompts: np.ndarray, key, batch_sizes) -> np.ndarray:
  """`dec`'s tokens (num, gen_len) for all prompts, decoded in sample_chunks."""
  rows = [decode.to_host(dec(chunk, chunk_key))
          for chunk, chunk_key in sample_chunks(prompts, key, batch_sizes)]
  return np.concatenate(rows, axis=0)[:prompts.shape[0]]


# ----------------------------------------------------------------------------- lossless rows

@dataclasses.dataclass
class LosslessDecoder:
  """A student drafting k tokens for the AR teacher (lossless.generate_lossless), called like
  a decode.Decoder: `dec(prompts, key)` -> verify_loop's output dict. The last output per
  batch size is kept in `outputs`, so the timed runs also give their loop iterations."""
  name: str
  k: int
  settings: dict
  run: Callable = dataclasses.field(repr=False)
  outputs: dict = dataclasses.field(default_factory=dict, repr=False)
  kind: str = 'lossless'

  def __call__(self, prompts, key):
    out = self.run(prompts, key)
    self.outputs[int(prompts.shape[0])] = out
    return out


def lossless_decoder(teacher: rundir.Export, student: rundir.Export, *, gen_len: int,
                     temperature: float, k: int | None = None,
                     margin_threshold: float | None = None) -> LosslessDecoder:
  """`student` drafting k (default its own k_max) tokens for `teacher`; every prompt row is
  full length. margin_threshold: adaptive k (lossless.verify_loop; the name stays
  'lossless_k{k}')."""
  k = student.k if k is None else int(k)

  def run(prompts, key):
    lens = np.full(prompts.shape[0], prompts.shape[1], np.int32)
    return lossless.generate_lossless(teacher.model, teacher.params, student.model,
                                      student.params, prompts, lens, key, temperature,
                                      margin_threshold, gen_len=gen_len, k=k)

  return LosslessDecoder(f'lossless_k{k}', k,
                         {'temperature': float(temperature), 'tau': float(temperature)}, run)


def lossless_decoders(loaded, *, prefix_len: int, gen_len: int,
                      temperature: float) -> list[LosslessDecoder]:
  """One LosslessDecoder per student stage that can draft from the prompts (k+1 <= prefix_len:
  the student re-feeds its last k+1 tokens) and samples the teacher's noise -> token map."""
  teacher = loaded[0][1]
  out = []
  for _, export in loaded[1:]:
    if export.k + 1 > prefix_len:
      progress.log(f'[evaluate] no lossless row for {export.name}: it drafts from the last '
                   f'k+1 = {export.k + 1} tokens, the prompts have {prefix_len}')
    elif export.model.cfg.cdf_order != teacher.model.cfg.cdf_order:
      progress.log(f'[evaluate] no lossless row for {export.name}: it learned cdf_order='
                   f'{export.model.cfg.cdf_order!r}, the teacher samples with '
                   f'{teacher.model.cfg.cdf_order!r}')
    else:
      out.append(lossless_decoder(teacher, export, gen_len=gen_len, temperature=temperature))
  return out


def decode_lossless(dec: LosslessDecoder, prompts: np.ndarray, key,
                    batch_sizes) -> tuple[np.ndarray, np.ndarray]:
  """(tokens (num, gen_len), accepted-draft histogram (k+1,) summed over the chunks; the
  padding rows of a last partial chunk included) of `dec` in sample_chunks."""
  outs = [dec(chunk, chunk_key) for chunk, chunk_key in sample_chunks(prompts, key, batch_sizes)]
  tokens = np.concatenate([np.asarray(o['tokens']) for o in outs], axis=0)[:prompts.shape[0]]
  return tokens, np.sum([np.asarray(o['accepted_histogram']) for o in outs], axis=0)


def mean_tokens_per_iteration(histogram) -> float:
  """Tokens a row gains per iteration, accepted drafts a + 1, averaged over the histogram's
  (row, iteration) pairs."""
  histogram = np.asarray(histogram)
  return float(np.sum(histogram * (np.arange(len(histogram)) + 1)) / max(histogram.sum(), 1))


def break_even_acceptance(tokens_per_iteration: float, k: int) -> float | None:
  """The per-draft acceptance rate alpha at which an iteration of k drafts gains
  `tokens_per_iteration` tokens on average, each draft accepted with probability alpha once
  the ones before it were: 1 + alpha + .. + alpha^k. 0 when one token (the teacher's own)
  already reaches it; None when even k + 1 tokens (every draft accepted) do not."""
  if tokens_per_iteration <= 1:
    return 0.0
  if tokens_per_iteration > k + 1:
    return None
  lo, hi = 0.0, 1.0
  for _ in range(60):  # the sum increases with alpha on [0, 1]: bisection
    mid = (lo + hi) / 2
    if sum(mid ** i for i in range(k + 1)) < tokens_per_iteration:
      lo = mid
    else:
      hi = mid
  return (lo + hi) / 2


def lossless_cost(row: dict, ar_row: dict, iterations: int, new_tokens: int,
                  k: int) -> report.LosslessCost:
  """The cost of one lossless iteration at one batch size, from measure_throughput rows (the
  lossless row's and the AR teacher's of the same rounds) and the timed run's iterations."""
  in_ar_steps = (row['seconds'] / iterations) / (ar_row['seconds'] / ar_row['decode_steps'])
  return report.LosslessCost(batch=row['batch'], iterations=iterations,
                             tokens_per_iteration=new_tokens / iterations,
                             iteration_in_ar_steps=in_ar_steps,
                             break_even_acceptance=break_even_acceptance(in_ar_steps, k))


def lossless_entries(decoders: list[LosslessDecoder], ar_dec, prompts: np.ndarray, key,
                     batch_sizes, teacher, evaluator, prefix_len: int, tokenizer) -> list[dict]:
  """The quality entries of the lossless rows, each with 'lossless' = (samples, rows identical
  to the AR decoder's for the same chunks, the gen. ppl of those AR samples, mean tokens per
  iteration, histogram); its cost is added with the speed (with_lossless_speed)."""
  if not decoders:
    return []
  ar_samples = _decode_logged(ar_dec, prompts, key, batch_sizes)
  ar_ppl = metrics.pooled_perplexity(*metrics.sample_nll(teacher.model, teacher.params,
                                                         ar_samples, prefix_len))
  entries = []
  for dec in decoders:
    t0 = time.time()
    samples, histogram = decode_lossless(dec, prompts, key, batch_sizes)
    identical = int(np.all(samples == ar_samples, axis=1).sum())
    entry = dict(quality(dec, teacher, samples, teacher, evaluator, prefix_len, tokenizer),
                 acc_total=None)
    entry['lossless'] = dict(samples=len(samples), rows_identical_to_ar=identical,
                             ar_gen_ppl_teacher=ar_ppl,
                             mean_tokens_per_iteration=mean_tokens_per_iteration(histogram),
                             accepted_histogram=[int(h) for h in histogram])
    entries.append(entry)
    progress.log(f'[evaluate] decoded {dec.name}: {len(samples)} samples in '
                 f'{time.time() - t0:.1f}s, {identical} rows identical to AR, '
                 f'{entry["lossless"]["mean_tokens_per_iteration"]:.2f} tokens per iteration '
                 f'(accepted drafts {entry["lossless"]["accepted_histogram"]})')
    _log_quality(entry)
  return entries


def with_lossless_speed(entry: dict, rows: list, ar_rows: list, dec: LosslessDecoder,
                        new_tokens: int) -> dict:
  """A lossless quality entry with its throughput rows (speed-up against `ar_rows`, the AR
  teacher of the same rounds; decode_steps and forwards_per_token count loop iterations) and
  its cost per batch size (lossless_cost)."""
  ar_by_batch = {r['batch']: r for r in ar_rows}
  throughput, cost = [], []
  for row in rows:
    iterations = int(dec.outputs[row['batch']]['iterations'])
    throughput.append(report.Throughput(**dict(
        row, decode_steps=iterations, forwards_per_token=iterations / new_tokens,
        speedup_vs_ar=row['tokens_per_s'] / ar_by_batch[row['batch']]['tokens_per_s'])))
    cost.append(lossless_cost(row, ar_by_batch[row['batch']], iterations, new_tokens, dec.k))
  stats = report.LosslessStats(**entry['lossless'], cost=cost)
  return dict(entry, lossless=stats, throughput=throughput)


def _interval(bounds) -> report.Interval:
  return report.Interval(*bounds)


def quality(dec, export, samples, teacher, evaluator, prefix_len: int, tokenizer) -> dict:
  """The quality fields of one model's report.ModelResult (no throughput, agreement or
  mode-seeking verdict yet)."""
  generated = samples[:, prefix_len:]
  acc = (progress.read_json(rundir.eval_path(export.directory)) or {}).get('acc_total')
  nll = metrics.sample_nll(teacher.model, teacher.params, samples, prefix_len)
  out = dict(
      name=dec.name, kind=dec.kind, k=dec.k,
      gen_ppl_teacher=metrics.pooled_perplexity(*nll),
      gen_ppl_teacher_ci=_interval(metrics.perplexity_interval(*nll)),
      gen_ppl_evaluator=None, gen_ppl_evaluator_ci=None,
      entropy=metrics.unigram_entropy(generated),
      entropy_ci=_interval(metrics.entropy_interval(generated)),
      distinct_2=metrics.distinct_n(generated, 2),
      distinct_2_ci=_interval(metrics.distinct_interval(generated, 2)),
      distinct_4=metrics.distinct_n(generated, 4),
      acc_total=None if dec.kind == 'ar' or acc is None else float(acc),
      samples=[report.Sample(tokenizer.decode(row[:prefix_len].tolist()),
                             tokenizer.decode(row[prefix_len:].tolist()))
               for row in samples[:NUM_REPORT_SAMPLES]],
      **dec.settings)
  if evaluator is not None:
    nll = metrics.sample_nll(evaluator.model, evaluator.params, samples, prefix_len)
    out.update(gen_ppl_evaluator=metrics.pooled_perplexity(*nll),
               gen_ppl_evaluator_ci=_interval(metrics.perplexity_interval(*nll)))
  return out


def measure_agreement(config, layout, loaded, tokenizer) -> tuple[dict, int]:
  """({student name: report.Agreement}, held-out rows) of every student against the AR
  teacher's own noise -> token map (agreement.py), on config.eval.agreement_batches held-out
  batches of the widest stage's validation (its rows, its noises)."""
  teacher = loaded[0][1]
  students = [(dec.name, export) for dec, export in loaded if export.kind == 'pflm']
  num_batches = int(config.eval.agreement_batches)
  if not students or num_batches <= 0:
    return {}, 0
  k_max = max(export.k for _, export in students)
  batch_at = distill.stage_batches(config, layout, k_max, 'validation', False,
                                   distill.VALIDATION_SEED_OFFSET, tokenizer)
  summaries = agreement.measure(teacher, [export for _, export in students], layout,
                                (batch_at(i) for i in range(num_batches)))
  records = {name: report.Agreement(**dict(
      summary, by_entropy=[report.EntropyBin(**b) for b in summary['by_entropy']]))
      for (name, _), summary in zip(students, summaries)}
  return records, num_batches * int(config.distill.batch_size)


def _verdicts(entries: list[dict], agreements: dict) -> list[dict]:
  """Each entry with agreement_vs_ar (its student's, penalised rows only) and mode_seeking."""
  ar = entries[0]
  return [dict(e, agreement_vs_ar=agreements.get(e['name']),
               mode_seeking=None if e['kind'] == 'ar' else metrics.is_mode_seeking(
                   e['gen_ppl_teacher'], e['entropy'], ar['gen_ppl_teacher'], ar['entropy']))
          for e in entries]


def _decode_logged(dec, prompts, key, batch_sizes) -> np.ndarray:
  t0 = time.time()
  samples = decode_samples(dec, prompts, key, batch_sizes)
  progress.log(f'[evaluate] decoded {dec.name}: {len(samples)} samples in '
               f'{time.time() - t0:.1f}s')
  return samples


def _log_quality(entry: dict) -> None:
  ci = entry['gen_ppl_teacher_ci']
  progress.log(f'[evaluate] quality {entry["name"]}: gen ppl (teacher) '
               f'{entry["gen_ppl_teacher"]:.2f} [{ci.lo:.2f}, {ci.hi:.2f}], entropy '
               f'{entry["entropy"]:.3f}, distinct-2 {entry["distinct_2"]:.3f}')


def _prompts(config, prompts, tokenizer) -> np.ndarray:
  prefix_len = int(config.decode.prefix_len)
  if prompts is None:
    prompts = data.document_prefixes(config, config.eval.split, config.eval.num_samples,
                                      prefix_len, tokenizer=tokenizer)
  prompts = np.asarray(prompts, np.int32)
  if prompts.ndim != 2 or prompts.shape[1] != prefix_len:
    raise ValueError(f'prompts have shape {prompts.shape}; expected (num, {prefix_len}).')
  return prompts


def _with_speed(entry: dict, rows: list, ar_rows: list) -> report.ModelResult:
  """The ModelResult of a quality entry and its speed rows ([] for an untimed model)."""
  ar_rate = {row['batch']: row['tokens_per_s'] for row in ar_rows}
  return report.ModelResult(**entry, throughput=[
      report.Throughput(**row, speedup_vs_ar=row['tokens_per_s'] / ar_rate[row['batch']])
      for row in rows])


MODELS_FILE = 'models.json'


def model_fingerprints(workdir: str) -> dict[str, str | None]:
  """{model directory name: its export's params fingerprint (None where it records none)}."""
  return {epath.Path(d).name: (rundir.export_meta(d) or {}).get(provenance.PARAMS_KEY)
          for d in rundir.exports(workdir)}


def report_outdated(workdir: str) -> str | None:
  """Why the report of `workdir` no longer describes its models (their fingerprints then and
  now differ, or models came or went), or None: current, or written before the report
  recorded them (report/models.json)."""
  then = progress.read_json(epath.Path(rundir.report_dir(workdir)) / MODELS_FILE)
  if then is None:
    return None
  now = model_fingerprints(workdir)
  changed = sorted(name for name in set(then) | set(now) if then.get(name) != now.get(name))
  return f'{", ".join(changed)} changed since it was written' if changed else None


def with_mode(config, mode: str | None):
  """`config` with decode.mode = `mode` (a --mode flag), or `config` itself when None."""
  if mode is None or mode == config.decode.mode:
    return config
  config = config.copy_and_resolve_references()
  config.decode.mode = mode
  return config


def _mode_changed(done: report.Results, config) -> str | None:
  then = done.config_values.get('decode', {}).get('mode', 'lossy')
  if then != config.decode.mode:
    return f'it was written in decode.mode {then}, this run asks for {config.decode.mode}'
  return None


def run(config, workdir: str, *, force: bool = False, prompts=None, tokenizer=None,
        config_name: str | None = None, allow_stale: bool = False,
        mode: str | None = None) -> report.Results:
  """Evaluate every model in `workdir` and write its report directory. Returns the results.

  `prompts` ((num, prefix_len) int array) and `tokenizer` default to the held-out split's
  document prefixes and the config's tokenizer (tests pass their own). `config_name`: the
  config file, for the report (the values are stored too). A stale student stage is an error
  unless `allow_stale` (check_provenance). A report whose models have changed since it was
  written (report_outdated), or written in another decode.mode, is redone. `mode` overrides
  config.decode.mode (lossless: the lossless rows get every prompt, not
  eval.lossless_samples)."""
  config = with_mode(config, mode)
  out_dir = rundir.report_dir(workdir)
  done = None if force else report.read(out_dir)
  outdated = None if done is None else (report_outdated(workdir) or _mode_changed(done, config))
  if outdated is not None:
    progress.log(f'[evaluate] the report in {out_dir} is out of date ({outdated}); '
                 're-evaluating')
    done = None
  if done is not None:
    progress.log(f'[evaluate] already done ({report.results_path(out_dir)}); skipping (use '
                 '--force to redo)')
    return done
  t_start = time.time()
  check_provenance(workdir, allow_stale)  # before any data or model is loaded
  dc, ec = config.decode, config.eval
  prefix_len, gen_len = int(dc.prefix_len), int(dc.gen_len)
  if gen_len <= prefix_len:
    raise ValueError(f'config.decode.gen_len={gen_len} must exceed config.decode.prefix_len='
                     f'{prefix_len}.')
  layout = sharding.layout_from_config(config)
  if tokenizer is None:
    tokenizer = data.load_tokenizer(config)
    data.check_vocab(config, tokenizer)
  prompts = _prompts(config, prompts, tokenizer)
  batch_sizes = [int(b) for b in ec.batch_sizes]
  loaded = load_decoders(config, workdir, layout, tokenizer)
  progress.log('[evaluate] models: ' + ', '.join(d.name for d, _ in loaded))
  teacher = loaded[0][1]
  evaluator = load_evaluator(config, layout, tokenizer, workdir)
  key = jax.random.key(config.seed)
  entries = []
  for dec, export in loaded:
    samples = _decode_logged(dec, prompts, key, batch_sizes)
    entries.append(quality(dec, export, samples, teacher, evaluator, prefix_len, tokenizer))
    _log_quality(entries[-1])
    if export.kind == 'pflm':
      plain = without_penalty(dec, export, layout, gen_len)
      if dec.settings['freq_penalty'] != 0:
        samples = _decode_logged(plain, prompts, key, batch_sizes)
      entries.append(quality(plain, export, samples, teacher, evaluator, prefix_len, tokenizer))
      _log_quality(entries[-1])
  t_lossless = time.time()
  num_lossless = prompts.shape[0] if dc.mode == 'lossless' else min(int(ec.lossless_samples),
                                                                     prompts.shape[0])
  lossless_batch_sizes = [int(b) for b in ec.lossless_batch_sizes]
  drafters = lossless_decoders(loaded, prefix_len=prefix_len, gen_len=gen_len,
                               temperature=float(dc.temperature)) if num_lossless else []
  entries += lossless_entries(drafters, loaded[0][0], prompts[:num_lossless], key,
                              lossless_batch_sizes or batch_sizes, teacher, evaluator,
                              prefix_len, tokenizer)
  t_lossless = time.time() - t_lossless
  t0 = time.time()
  agreements, agreement_rows = measure_agreement(config, layout, loaded, tokenizer)
  for name, a in agreements.items():
    progress.log(f'[evaluate] {name} vs the AR map ({a.windows} windows, '
                 f'{time.time() - t0:.1f}s): slots ' + ' '.join(f'{x:.3f}' for x in a.slot)
                 + ', acc_total ' + f'{a.prefix[-1]:.3f}')
  entries = _verdicts(entries, agreements)
  decoders = [dec for dec, _ in loaded]
  speed = timing.measure_throughput(decoders, prompts, key, batch_sizes, int(ec.repeats),
                                    prefix_len, gen_len)
  t0 = time.time()
  lossless_speed = (timing.measure_throughput([loaded[0][0]] + drafters, prompts, key,
                                              lossless_batch_sizes, int(ec.repeats), prefix_len,
                                              gen_len)
                    if drafters and lossless_batch_sizes else {})
  by_drafter = {dec.name: dec for dec in drafters}
  entries = [with_lossless_speed(e, lossless_speed.get(e['name'], []),
                                 lossless_speed.get('ar', []), by_drafter[e['name']],
                                 gen_len - prefix_len) if e['kind'] == 'lossless' else e
             for e in entries]
  if drafters:
    progress.log(f'[evaluate] lossless rows: {t_lossless + time.time() - t0:.1f}s '
                 f'(quality {t_lossless:.1f}s, speed {time.time() - t0:.1f}s)')
  rf = roofline.analyse([(dec, export.model) for dec, export in loaded], speed, batch_sizes,
                        prefix_len, gen_len, config.model.dtype)
  results = report.Results(
      device=timing.device_name(), jax_version=jax.__version__,
      config=config_name or '<in-memory config>', prefix_len=prefix_len, gen_len=gen_len,
      eval_split=ec.split, num_samples=int(prompts.shape[0]), batch_sizes=batch_sizes,
      repeats=int(ec.repeats), seed=int(config.seed),
      evaluator_workdir=None if evaluator is None else evaluator_workdir(config, workdir),
      evaluator=describe_evaluator(evaluator, teacher),
      bootstrap_resamples=metrics.BOOTSTRAP_RESAMPLES, bootstrap_seed=metrics.BOOTSTRAP_SEED,
      agreement_rows=agreement_rows, speed_prompts=SPEED_PROMPTS,
      models=[report.ModelResult(**e) if e['kind'] == 'lossless'
              else _with_speed(e, speed.get(e['name'], []), speed['ar']) for e in entries],
      roofline=rf,
      config_values=json.loads(config.to_json_best_effort()), seconds=time.time() - t_start)
  if progress.is_main_process():
    report.write(out_dir, results)
    progress.write_json(epath.Path(out_dir) / MODELS_FILE, model_fingerprints(workdir))
  else:
    report.Results.from_json(results.to_json())
  progress.log(f'[evaluate] wrote {out_dir}: results.json, REPORT.md, speedup.png, quality.png'
               + (', frontier.png' if report.frontier_batches(report.frontier_points(results))
                  else ''))
  return results
