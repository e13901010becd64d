"""The comparison the paper left out (`make compare`): K-Forcing, speculative decoding with a
small AR draft, independent heads and a masked diffusion LM, trained on one corpus with one
teacher and measured in one process (kforcing_jax/compare.py says how).

  python -m kforcing_jax.main.compare --config=configs/shakespeare_tiny.py \
      --workdir=runs/paper_recipe --output=results/compare

1. the run's own models, each skipped when done: the teacher, the distillation stages, the
   independent evaluator (what `make paper-recipe` trains, without its evaluation);
2. the baselines in <workdir>/baselines/ (rundir.baseline_dir), each resumable and skipped
   when done: the draft model, the heads of every config.compare.heads.ks, the diffusion LM;
3. the measurement: for each config.compare.batch_sizes (with its --repeats) every method is
   compiled, warmed up and timed in interleaved rounds with the AR teacher (prompts: the first
   B held-out document prefixes); quality over the first config.compare.prompts rows of the
   largest batch's own output. Each finished batch size is saved in
   <workdir>/compare_partial/ with the fingerprints of the models it measured, so a stopped
   measurement resumes at the next batch size (and models changed since are measured again).

Writes <output>/compare.json (everything), <output>/methods/<method>.json (one per method x
setting), COMPARE.md and compare.png. --only=train stops after 2; --only=measure skips 1-2.
"""

import os
import time

import jax
import numpy as np
from absl import flags

from kforcing_jax import checkpoints, cli, compare, data, decode, distill, distributed, evaluate
from kforcing_jax import metrics, progress, rundir, sharding, teacher, timing
from kforcing_jax.baselines import heads, mdlm

_OUTPUT = flags.DEFINE_string('output', 'results/compare', 'Output directory.')
_ONLY = flags.DEFINE_enum('only', 'all', ['all', 'train', 'measure'],
                          'all: train what is missing, then measure; train; measure.')
_REPEATS = flags.DEFINE_list('repeats', ['3', '3', '1'],
                             'Timed rounds per batch size (one per config.compare.batch_sizes).')


def train(config, workdir: str) -> None:
  """Every model the comparison needs, each skipped when done and resumed when stopped."""
  distributed.main_process_first('prepare data', lambda: data.prepare(config))
  progress.log('\n=== compare 1/2: the run (teacher, distillation, evaluator) ===')
  teacher.run(config, workdir)
  distill.run(config, workdir)
  evaluate.train_evaluator(config, workdir)
  plan = compare.budgets(config)
  progress.log('\n=== compare 2/2: the baselines ('
               + '; '.join(f'{name} {b["steps"]} steps = {b["tokens"]:,} tokens ({b["rule"]})'
                           for name, b in plan.items()) + ') ===')
  teacher.run(compare.draft_config(config), rundir.baseline_dir(workdir, 'draft'))
  for k in config.compare.heads.ks:
    heads.run(config, workdir, int(k))
  mdlm.run(config, workdir)


def load_models(config, workdir: str, layout, tokenizer) -> compare.Models:
  loaded = evaluate.load_decoders(config, workdir, layout, tokenizer)
  draft_dir = rundir.teacher_dir(rundir.baseline_dir(workdir, 'draft'))
  return compare.Models(
      teacher=loaded[0][1],
      students={export.k: export for _, export in loaded[1:]},
      draft=rundir.load_export(draft_dir, layout, kind='ar', tokenizer=tokenizer),
      heads={int(k): heads.load(config, workdir, int(k), layout, tokenizer)
             for k in config.compare.heads.ks},
      mdlm=rundir.load_export(rundir.baseline_dir(workdir, 'mdlm'), layout, kind='ar',
                              tokenizer=tokenizer))


def training_summary(config, workdir: str) -> dict:
  """{family: 'steps x batch x length = tokens, wall time'} from each model's eval.json."""
  def line(directory, steps, batch, length):
    done = progress.read_json(rundir.eval_path(directory)) or {}
    seconds = done.get('seconds')
    took = '' if seconds is None else f', {seconds / 60:.1f} min'
    return f'{steps} steps x {batch} x {length} = {steps * batch * length:,} tokens{took}'

  plan = compare.budgets(config)
  dc, cc = config.distill, config.compare
  stages = [(k, s) for k, s in dc.stages]
  kf_seconds = sum((progress.read_json(rundir.eval_path(rundir.stage_dir(workdir, k))) or {})
                   .get('seconds', 0.0) for k, _ in stages)
  kf = (f'distillation {" + ".join(str(s) for _, s in stages)} steps x {dc.batch_size} x '
        f'{distill.stage_seq_len(config)} = {compare.distill_tokens(config):,} tokens, '
        f'{kf_seconds / 60:.1f} min (on the teacher\'s '
        f'{compare.teacher_tokens(config):,})')
  heads_lines = '; '.join(
      f'k={k}: ' + line(rundir.baseline_dir(workdir, f'heads_k{int(k)}'), plan['heads']['steps'],
                        cc.heads.batch_size, cc.heads.seq_len) for k in cc.heads.ks)
  draft_dir = rundir.teacher_dir(rundir.baseline_dir(workdir, 'draft'))
  return {
      'ar': f'{config.train.steps} steps x {config.train.batch_size} x {config.data.seq_len} = '
            f'{compare.teacher_tokens(config):,} tokens',
      'kforcing': kf, 'kforcing_lossless': kf,
      'speculative': 'draft ' + line(draft_dir, plan['draft']['steps'], cc.draft.batch_size,
                                     config.data.seq_len),
      'heads': heads_lines, 'heads_verified': heads_lines,
      'mdlm': f'init {cc.mdlm.init}: ' + line(rundir.baseline_dir(workdir, 'mdlm'),
                                              plan['mdlm']['steps'], cc.mdlm.batch_size,
                                              config.data.seq_len),
  }


def measure(config, workdir: str, repeats: list[int]) -> dict:
  t_start = time.time()
  cc, dc = config.compare, config.decode
  batch_sizes = sorted(int(b) for b in cc.batch_sizes)
  if len(repeats) != len(batch_sizes):
    raise ValueError(f'--repeats {repeats}: give one count per batch size {batch_sizes}.')
  repeats = dict(zip(batch_sizes, repeats))
  largest = batch_sizes[-1]
  rows = int(cc.prompts)
  if not 0 < rows <= largest:
    raise ValueError(f'config.compare.prompts={rows}: must be in 1..{largest} (the largest '
                     'batch size, whose output is scored).')
  layout = sharding.layout_from_config(config)
  tokenizer = data.load_tokenizer(config)
  data.check_vocab(config, tokenizer)
  models = load_models(config, workdir, layout, tokenizer)
  evaluator = evaluate.load_evaluator(config, layout, tokenizer, workdir)
  prefix_len, gen_len = int(dc.prefix_len), int(dc.gen_len)
  new_tokens = gen_len - prefix_len
  method_list = compare.methods(config, sorted(models.students), new_tokens)
  compare.check_methods_loaded(method_list, models)
  progress.log(f'[compare] {len(method_list)} methods: '
               + ', '.join(m.name for m in method_list))
  decoders = [compare.decoder(m, models, layout, gen_len=gen_len,
                              temperature=float(dc.temperature),
                              freq_penalty=decode.freq_penalty(config, m.k)
                              if m.family == 'kforcing' else 0.0) for m in method_list]
  prompts = np.asarray(data.document_prefixes(config, config.eval.split, largest, prefix_len,
                                              tokenizer=tokenizer), np.int32)
  key = jax.random.key(config.seed)
  fingerprints = compare.models_fingerprint(models)
  done = {}
  for batch in batch_sizes:
    partial = rundir.compare_partial_path(workdir, batch)
    saved = progress.read_json(partial)
    if saved is not None and saved.get('models') == fingerprints:
      progress.log(f'[compare] batch {batch}: measured before ({partial})')
      done[batch] = saved
      continue
    if saved is not None:
      progress.log(f'[compare] batch {batch}: {partial} measured other models (retrained or '
                   'another setting since); measuring again')
    t0 = time.time()
    speed = timing.measure_throughput(decoders, prompts, key, [batch], repeats[batch],
                                      prefix_len, gen_len)
    entry = {'models': fingerprints, 'speed': {name: r[0] for name, r in speed.items()},
             'iterations': {d.name: compare.iterations(d.method, new_tokens,
                                                       d.outputs[batch]) for d in decoders}}
    if batch == largest:
      samples = {d.name: compare.tokens_of(d.outputs[batch])[:rows].tolist() for d in decoders}
      entry['samples'] = samples
    progress.write_json(partial, entry)
    done[batch] = entry
    progress.log(f'[compare] batch {batch}: {time.time() - t0:.0f}s')
  samples = {name: np.asarray(s, np.int32) for name, s in done[largest]['samples'].items()}
  ar_samples = samples['ar']
  records = []
  ar_quality = None
  for dec in decoders:
    m = dec.method
    export = models.teacher  # quality metrics read the export only for a stage's acc_total
    quality = evaluate.quality(dec, export, samples[m.name], models.teacher, evaluator,
                               prefix_len, tokenizer)
    if m.family == 'ar':
      ar_quality = quality
    speed_rows = timing.with_speedup([done[b]['speed'][m.name] for b in batch_sizes],
                                      [done[b]['speed']['ar'] for b in batch_sizes])
    iters = done[largest]['iterations'][m.name]
    passes = compare.passes_per_token(m, new_tokens, {'iterations': iters})
    identical = int(np.all(samples[m.name] == ar_samples, axis=1).sum())
    records.append(compare.record(m, quality, speed_rows, passes, rows, identical, ar_quality))
    progress.log(f'[compare] {m.name}: gen ppl (evaluator) '
                 f'{quality["gen_ppl_evaluator"] or float("nan"):.1f} (teacher '
                 f'{quality["gen_ppl_teacher"]:.1f}), entropy {quality["entropy"]:.3f}, speed-up '
                 + ' '.join(f'B={r["batch"]} {r["speedup_vs_ar"]:.2f}x' for r in speed_rows)
                 + f', {passes["full"]:.2f} passes / token, {identical}/{rows} rows = AR')
  ar_nll = metrics.sample_nll(models.teacher.model, models.teacher.params, ar_samples,
                              prefix_len)
  return {'device': timing.device_name(), 'jax_version': jax.__version__,
          'config': cli.config_file(), 'workdir': workdir, 'seed': int(config.seed),
          'prefix_len': prefix_len, 'gen_len': gen_len, 'temperature': float(dc.temperature),
          'quality_rows': rows, 'batch_sizes': batch_sizes,
          'repeats': {str(b): r for b, r in repeats.items()},
          'ar_gen_ppl_teacher': metrics.pooled_perplexity(*ar_nll),
          'evaluator': evaluate.describe_evaluator(evaluator, models.teacher),
          'budgets': compare.budgets(config), 'training': training_summary(config, workdir),
          'methods': records, 'seconds': time.time() - t_start}


def write(result: dict, output: str) -> None:
  progress.write_json(os.path.join(output, 'compare.json'), result)
  for r in result['methods']:
    progress.write_json(os.path.join(output, 'methods', f'{r["name"]}.json'),
                        dict(r, device=result['device'], config=result['config']))
  with open(os.path.join(output, 'COMPARE.md'), 'w') as f:
    f.write(compare.markdown(result))
  compare.plot(os.path.join(output, 'compare.png'), result)


def run(config, workdir: str) -> None:
  if _ONLY.value != 'measure':
    train(config, workdir)
  if _ONLY.value == 'train':
    return
  if not checkpoints.has_params(rundir.params_dir(rundir.teacher_dir(workdir))):
    raise FileNotFoundError(f'{workdir} has no teacher: run without --only=measure first.')
  result = measure(config, workdir, [int(r) for r in _REPEATS.value])
  if progress.is_main_process():
    write(result, _OUTPUT.value)
  progress.log(f'[compare] {result["seconds"]:.0f}s -> {_OUTPUT.value}/compare.json, '
               'COMPARE.md, compare.png, methods/')


if __name__ == '__main__':
  cli.main(run, lock_workdir=True)
