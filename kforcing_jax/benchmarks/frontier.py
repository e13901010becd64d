"""The speed-quality frontier of a trained run (issue 14): every decode setting's quality and
speed against the AR teacher, measured in one process, plus its predicted speed-up on TPU.

  python -m kforcing_jax.benchmarks.frontier --config=configs/shakespeare_tiny.py \
      --workdir=runs/paper_recipe --output=results/frontier

Settings (kforcing_jax/frontier.py): AR; each student stage lossy with its default frequency
penalty and none, the widest stage also at --extra_penalties; the widest stage with adaptive k
at each --thresholds (lossy) and --lossless_thresholds (lossless); each stage lossless.

Speed: for each --batch_sizes (with its --repeats) every setting is compiled and warmed up,
then timed in interleaved rounds (timing.measure_throughput: median round; prompts: the first
max(batch_sizes) held-out document prefixes, the first B of them at batch B; one noise key).
Quality: the first --quality_rows rows of the largest batch's own output (so no extra
decoding; the adaptive settings, timed at --adaptive_batch_sizes only, are scored on theirs): gen. ppl under the teacher and the run's evaluator, entropy, distinct-2, 95%
bootstrap intervals (evaluate.quality). The ragged loops' outputs give their iterations and
mean tokens per iteration per batch. Predicted TPU speed-ups: frontier.predict with the
calibrated speed model of --speed_model.

Writes <output>/frontier.json, FRONTIER.md and frontier.png. --repredict measures nothing: it
redoes the predicted speed-ups of an existing <output>/frontier.json with --speed_model (after
a refit) and rewrites the three files.
"""

import os
import time

import jax
import numpy as np
from absl import flags

from kforcing_jax import cli, data, decode, evaluate, frontier, metrics, models, progress
from kforcing_jax import sharding, timing

_OUTPUT = flags.DEFINE_string('output', 'results/frontier', 'Output directory.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '16', '256'], 'Batch sizes to time.')
_REPEATS = flags.DEFINE_list('repeats', ['3', '3', '1'],
                             'Timed rounds per batch size (one per --batch_sizes entry).')
_QUALITY_ROWS = flags.DEFINE_integer('quality_rows', 128,
                                     'Rows of the largest batch scored for quality.')
_EXTRA_PENALTIES = flags.DEFINE_list('extra_penalties', ['0.25', '1.0'],
                                     'Further penalties for the widest stage, lossy.')
_THRESHOLDS = flags.DEFINE_list('thresholds', ['0.5', '1', '2'],
                                'Slot-logit margin thresholds of adaptive k, lossy.')
_LOSSLESS_THRESHOLDS = flags.DEFINE_list('lossless_thresholds', ['1'],
                                         'Margin thresholds of adaptive k, lossless.')
_ADAPTIVE_BATCH_SIZES = flags.DEFINE_list(
    'adaptive_batch_sizes', ['1', '16', '256'], 'The batch sizes of --batch_sizes the '
    'adaptive settings are timed at.')
_SPEED_MODEL = flags.DEFINE_string('speed_model', 'results/speed_table/speed_model.json',
                                   'speed_model_fit result the TPU predictions use.')
_DEVICES = flags.DEFINE_list('devices', ['tpu_v5e', 'tpu_v5p'], 'Devices to predict for.')
_REPREDICT = flags.DEFINE_bool(
    'repredict', False, 'Measure nothing: redo the predicted speed-ups of <output>/frontier.json '
    'with --speed_model (e.g. after a refit) and rewrite its files.')


def measure(config, workdir: str, batch_sizes: list[int], repeats: list[int], quality_rows: int,
            extra_penalties: list[float], thresholds: list[float],
            lossless_thresholds: list[float], adaptive_batches: list[int],
            speed_model_path: str, devices: list[str]) -> dict:
  t_start = time.time()
  if len(repeats) != len(batch_sizes):
    raise ValueError(f'--repeats {repeats}: give one count per batch size {batch_sizes}.')
  order = np.argsort(batch_sizes)
  batch_sizes = [int(batch_sizes[i]) for i in order]
  repeats = [int(repeats[i]) for i in order]
  largest = batch_sizes[-1]
  if not 0 < quality_rows <= largest:
    raise ValueError(f'--quality_rows={quality_rows}: must be in 1..{largest} (the largest '
                     'batch size, whose output is scored).')
  device_models = frontier.device_models(progress.read_json(speed_model_path), devices)
  layout = sharding.layout_from_config(config)
  tokenizer = data.load_tokenizer(config)
  data.check_vocab(config, tokenizer)
  loaded = evaluate.load_decoders(config, workdir, layout, tokenizer)
  teacher = loaded[0][1]
  students = {export.k: export for _, export in loaded[1:]}
  if not students:
    raise FileNotFoundError(f'{workdir} has no student stage: run the pipeline first.')
  evaluator = evaluate.load_evaluator(config, layout, tokenizer, workdir)
  dc = config.decode
  prefix_len, gen_len = int(dc.prefix_len), int(dc.gen_len)
  new_tokens = gen_len - prefix_len
  settings = frontier.settings(sorted(students),
                               {k: decode.freq_penalty(config, k) for k in students},
                               extra_penalties, thresholds, lossless_thresholds)
  progress.log(f'[frontier] {len(settings)} settings: ' + ', '.join(s.name for s in settings))
  decoders = [frontier.decoder(s, teacher, students, layout, gen_len=gen_len,
                               temperature=float(dc.temperature)) for s in settings]
  prompts = np.asarray(data.document_prefixes(config, config.eval.split, largest, prefix_len,
                                              tokenizer=tokenizer), np.int32)
  key = jax.random.key(config.seed)
  speed = {d.name: [] for d in decoders}
  for batch, count in zip(batch_sizes, repeats):
    t0 = time.time()
    timed = [d for d in decoders
             if not d.setting.family.startswith('adaptive') or batch in adaptive_batches]
    for name, rows in timing.measure_throughput(timed, prompts, key, [batch], count,
                                                prefix_len, gen_len).items():
      speed[name] += rows
    progress.log(f'[frontier] batch {batch}: {time.time() - t0:.0f}s')
  records, ar_ppl = [], {}
  for dec in decoders:
    s = dec.setting
    export = teacher if s.family == 'ar' else students[s.stage]
    scored = max(dec.outputs)  # the largest batch it was timed at
    rows = min(quality_rows, scored)
    samples = frontier.tokens_of(dec.outputs[scored])[:rows]
    ar_tokens = frontier.tokens_of(decoders[0].outputs[scored])[:rows]
    quality = evaluate.quality(dec, export, samples, teacher, evaluator, prefix_len, tokenizer)
    ragged = {b: out for b, out in dec.outputs.items() if isinstance(out, dict)}
    measured = {b: int(out['iterations']) for b, out in ragged.items()}
    mean_tokens = {b: float(out['mean_tokens_per_iteration']) for b, out in ragged.items()}
    speed_rows = frontier.speed_rows(s, speed[s.name], speed['ar'], measured, mean_tokens,
                                     new_tokens)
    student_model = None if s.family == 'ar' else export.model
    predicted = {device: {str(b): frontier.predict(s, teacher.model, student_model, b,
                                                   prefix_len, gen_len, measured.get(b), dm)
                          for b in sorted(dec.outputs)}
                 for device, dm in device_models.items()}
    identical = int(np.all(samples == ar_tokens, axis=1).sum())
    if (scored, rows) not in ar_ppl:  # the reference: the AR samples of the same rows
      ar_ppl[scored, rows] = metrics.pooled_perplexity(*metrics.sample_nll(
          teacher.model, teacher.params, ar_tokens, prefix_len))
    records.append(frontier.record(s, quality, speed_rows, predicted, rows, identical,
                                   ar_ppl[scored, rows]))
    progress.log(f'[frontier] {s.name}: gen ppl {quality["gen_ppl_teacher"]:.1f}, speed-up '
                 + ' '.join(f'B={r["batch"]} {r["speedup_vs_ar"]:.2f}x' for r in speed_rows)
                 + (f', {mean_tokens[scored]:.2f} tokens per iteration' if mean_tokens else '')
                 + f', {identical}/{rows} rows identical to AR')
  return {'device': timing.device_name(), 'jax_version': jax.__version__,
          'config': cli.config_file(), 'workdir': workdir, 'seed': int(config.seed),
          'prefix_len': prefix_len, 'gen_len': gen_len, 'temperature': float(dc.temperature),
          'num_prompts': largest, 'quality_rows': quality_rows, 'batch_sizes': batch_sizes,
          'repeats': {str(b): r for b, r in zip(batch_sizes, repeats)},
          'evaluator': evaluate.describe_evaluator(evaluator, teacher),
          'prediction': frontier.prediction_source(progress.read_json(speed_model_path),
                                                   speed_model_path, devices),
          'settings': records, 'seconds': time.time() - t_start}


def repredict(config, output: str, speed_model_path: str, devices: list[str]) -> dict:
  """<output>/frontier.json with its predictions redone by the speed model at
  speed_model_path (frontier.repredict); the models' shapes come from `config`."""
  path = os.path.join(output, 'frontier.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'--repredict: {path} does not exist; run the frontier first.')
  result = progress.read_json(path)
  fitted = progress.read_json(speed_model_path)
  stages = {r['stage'] for r in result['settings'] if r['family'] != 'ar'}
  return frontier.repredict(result, models.teacher(config),
                            {k: models.student(config, k) for k in stages},
                            frontier.device_models(fitted, devices),
                            frontier.prediction_source(fitted, speed_model_path, devices))


def run(config, workdir: str) -> dict:
  if _REPREDICT.value:
    result = repredict(config, _OUTPUT.value, _SPEED_MODEL.value, _DEVICES.value)
  else:
    result = measure_all(config, workdir)
  output = _OUTPUT.value
  if progress.is_main_process():
    progress.write_json(os.path.join(output, 'frontier.json'), result)
    with open(os.path.join(output, 'FRONTIER.md'), 'w') as f:
      f.write(frontier.markdown(result))
    frontier.plot(os.path.join(output, 'frontier.png'), result)
  progress.log(f'[frontier] {result["seconds"]:.0f}s -> {output}/frontier.json, FRONTIER.md, '
               'frontier.png')
  return result


def measure_all(config, workdir: str) -> dict:
  result = measure(config, workdir, [int(b) for b in _BATCH_SIZES.value],
                   [int(r) for r in _REPEATS.value], _QUALITY_ROWS.value,
                   [float(p) for p in _EXTRA_PENALTIES.value],
                   [float(m) for m in _THRESHOLDS.value],
                   [float(m) for m in _LOSSLESS_THRESHOLDS.value],
                   [int(b) for b in _ADAPTIVE_BATCH_SIZES.value], _SPEED_MODEL.value,
                   _DEVICES.value)
  result['pareto_front'] = frontier.pareto_fronts(result)
  return result


if __name__ == '__main__':
  cli.main(run)
