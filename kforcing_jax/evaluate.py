"""Evaluate the AR teacher and every distilled student: quality, speed, roofline (METHOD.md s.5).

`python -m kforcing_jax.evaluate --config=configs/<name>.py --workdir=DIR [--force]` (and
`run(config, workdir)`, which the pipeline calls) writes <workdir>/report/:
  results.json  the schema `validate_results` checks (extra keys: roofline, samples, settings)
  REPORT.md     quality and speed tables, the roofline section, decoded samples
  speedup.png   measured and roofline-predicted speed-up over AR vs batch size, per k
  quality.png   generative perplexity and unigram entropy vs k, the AR teacher as a reference
It is skipped when results.json exists (--force re-runs it).

Models: "ar" (the teacher; k = 0 in results.json as in `generate --k=0`, decode_k = 1) and
"pflm_k{k}" for every student stage found as <workdir>/student_k{k}/params, decoded with its
own k, tau = 1 and the frequency penalty config.decode.freq_penalty[str(k)]; AR samples at
config.decode.temperature.

Quality: every model decodes the same prompts (the first config.decode.prefix_len tokens of
config.eval.num_samples held-out documents) with the same noise key, so position j draws the
same u in every model, to the fixed length config.decode.gen_len with no EOS stop (the paper's
fixed-length protocol). Metrics use the generated part only (positions >= prefix_len):
  gen_ppl_*   exp(pooled mean NLL of the generated tokens) under the AR teacher, and under an
              independent AR evaluator (<config.eval.evaluator_workdir>/teacher/params, its
              architecture read from the checkpoint; it must share the tokenizer) or null;
  entropy     mean over samples of the entropy (nats) of the sample's token frequencies;
  distinct_n  unique n-grams / all n-grams, pooled over samples (n-grams never cross samples);
  acc_total   the stage's held-out agreement with its teacher under shared noise, from
              <workdir>/student_k{k}/eval.json (null for AR).

Speed: the whole fixed-length generation (prefill included, eos_id=None) timed with
block_until_ready after a compile + warm-up run, at every config.eval.batch_sizes, all models in
this process, interleaved (for each batch size, config.eval.repeats rounds of AR, k1, k2, ...),
the median round reported. tokens_per_s counts generated tokens: batch * (gen_len - prefix_len).
forwards_per_token = decode steps / generated tokens (AR 1; k-token ceil(new / k) / new), prefill
excluded. Speed prompts: the quality prompts tiled to the batch size, the same for every model.

Roofline: see kforcing_jax/roofline.py; the prediction uses the analytic per-step cost with the
device's measured peak matmul FLOP/s and memory bandwidth, and the XLA cost analysis of one
compiled step is reported beside it.
"""

import dataclasses
import functools
import glob
import json
import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from kforcing_jax import checkpoints, cli, data, decode, distill, distributed, generate
from kforcing_jax import progress
from kforcing_jax import roofline, sharding, train, train_state
from kforcing_jax.models import BackboneConfig, FunctionalModel

_FORCE = flags.DEFINE_bool('force', False, 'Re-run even if report/results.json exists.')

NUM_REPORT_SAMPLES = 3
NLL_CHUNK_ELEMENTS = 1 << 27  # logits per NLL chunk (rows * length * vocab), 512 MiB in f32

RESULT_KEYS = {'device': str, 'jax_version': str, 'config': str, 'prefix_len': int,
               'gen_len': int, 'models': list}
MODEL_KEYS = {'name': str, 'k': int, 'decode_k': int, 'gen_ppl_teacher': float,
              'gen_ppl_evaluator': (float, None), 'entropy': float, 'distinct_2': float,
              'distinct_4': float, 'acc_total': (float, None), 'throughput': list}
THROUGHPUT_KEYS = {'batch': int, 'tokens_per_s': float, 'forwards_per_token': float,
                   'speedup_vs_ar': float}
MODEL_NAME = re.compile(r'^(ar|pflm_k[1-9][0-9]*)$')


# ----------------------------------------------------------------------------- metrics

def unigram_entropy(generated) -> float:
  """Mean over rows of the entropy (nats) of each row's token frequency distribution."""
  entropies = []
  for row in np.asarray(generated):
    _, counts = np.unique(row, return_counts=True)
    p = counts / counts.sum()
    entropies.append(float(-(p * np.log(p)).sum()))
  return float(np.mean(entropies))


def distinct_n(generated, n: int) -> float:
  """Unique n-grams / total n-grams, pooled over rows; n-grams stay inside a row."""
  grams = [tuple(row[i:i + n]) for row in np.asarray(generated).tolist()
           for i in range(len(row) - n + 1)]
  if not grams:
    raise ValueError(f'no {n}-grams: generated parts are shorter than {n} tokens.')
  return len(set(grams)) / len(grams)


def generated_mask(batch: int, length: int, prefix_len: int):
  """(B, N) mask selecting the generated positions j >= prefix_len."""
  return jnp.broadcast_to(jnp.arange(length) >= prefix_len, (batch, length))


def perplexity_from_logits(logits, tokens, prefix_len: int) -> float:
  """exp(mean NLL of tokens[:, j], j >= prefix_len, under the distribution logits[:, j-1])."""
  nll, count = train.next_token_nll(jnp.asarray(logits), jnp.asarray(tokens),
                                    generated_mask(*tokens.shape, prefix_len))
  return float(np.exp(float(nll) / float(count)))


@functools.partial(jax.jit, static_argnames=('model',))
def _chunk_nll(model: FunctionalModel, params, tokens, mask):
  logits, _ = model.module(params)(tokens)
  return train.next_token_nll(logits, tokens, mask)


def generative_perplexity(model: FunctionalModel, params, samples, prefix_len: int) -> float:
  """Perplexity of the generated parts of `samples` (B, N) under the AR `model` (pooled).

  Runs in fixed-size row chunks (one compiled shape; padded rows are masked out) so the
  (rows, N, V) logits stay under NLL_CHUNK_ELEMENTS."""
  samples = np.asarray(samples, np.int32)
  num, length = samples.shape
  chunk = max(1, min(num, NLL_CHUNK_ELEMENTS // (length * model.cfg.vocab_size)))
  total = math.ceil(num / chunk) * chunk
  tokens = np.zeros((total, length), np.int32)
  tokens[:num] = samples
  mask = np.zeros((total, length), np.float32)
  mask[:num, prefix_len:] = 1.0
  nll, count = 0.0, 0.0
  for start in range(0, total, chunk):
    n, c = jax.device_get(_chunk_nll(model, params, tokens[start:start + chunk],
                                     mask[start:start + chunk]))
    nll, count = nll + float(n), count + float(c)
  return float(np.exp(nll / count))


# ----------------------------------------------------------------------------- models

@dataclasses.dataclass
class Candidate:
  """One model under evaluation and how it decodes."""
  name: str
  k: int                  # 0 = the AR teacher
  decode_k: int
  model: FunctionalModel
  params: Any
  settings: dict          # temperature / tau / freq_penalty, reported as is
  acc_total: float | None
  decode: Callable = dataclasses.field(repr=False, default=None)


def student_stages(workdir: str) -> list[int]:
  """k of every exported student stage in `workdir` (student_k{k}/params), ascending."""
  ks = []
  for path in glob.glob(os.path.join(workdir, 'student_k*', 'params')):
    match = re.fullmatch(r'student_k([0-9]+)', os.path.basename(os.path.dirname(path)))
    if match and checkpoints.has_params(path):
      ks.append(int(match.group(1)))
  return sorted(ks)


def _stage_acc_total(workdir: str, k: int) -> float | None:
  path = os.path.join(distill.stage_dir(workdir, k), 'eval.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    value = json.load(f).get('acc_total')
  return None if value is None else float(value)


def freq_penalty_for(config, k: int, log) -> float:
  table = config.decode.freq_penalty
  if str(k) not in table:
    log(f'config.decode.freq_penalty has no entry for k={k}; decoding it with penalty 0 '
        f'(set --config.decode.freq_penalty to add "{k}").')
    return 0.0
  return float(table[str(k)])


def load_candidates(config, workdir: str, mesh, rules, log) -> list[Candidate]:
  """The AR teacher followed by every student stage in the workdir."""
  dc = config.decode
  model, params = generate.load_model(config, workdir, 0, mesh, rules)
  temperature = float(dc.temperature)
  out = [Candidate('ar', 0, 1, model, params, {'temperature': temperature}, None)]
  out[0].decode = _ar_decoder(model, params, temperature, dc.gen_len, mesh, rules)
  for k in student_stages(workdir):
    if dc.prefix_len < k:
      raise ValueError(f'student_k{k} decodes k={k} tokens per step but '
                       f'config.decode.prefix_len={dc.prefix_len} < k: its first step feeds the '
                       f'last k prompt tokens. Set --config.decode.prefix_len={k} or more.')
    model, params = generate.load_model(config, workdir, k, mesh, rules)
    penalty = freq_penalty_for(config, k, log)
    cand = Candidate(f'pflm_k{k}', k, k, model, params, {'tau': 1.0, 'freq_penalty': penalty},
                     _stage_acc_total(workdir, k))
    cand.decode = _pflm_decoder(model, params, k, penalty, dc.gen_len, mesh, rules)
    out.append(cand)
  return out


def _ar_decoder(model, params, temperature, gen_len, mesh, rules):
  run = decode.sharded_decoder(model, mesh, rules, 'ar', gen_len=gen_len, eos_id=None)
  return lambda prompts, key: run(params, prompts, key, temperature)


def _pflm_decoder(model, params, k, penalty, gen_len, mesh, rules):
  run = decode.sharded_decoder(model, mesh, rules, 'pflm', gen_len=gen_len, k=k,
                               freq_penalty=penalty, eos_id=None)
  return lambda prompts, key: run(params, prompts, key, 1.0)


def stored_param_shapes(directory: str) -> dict:
  """Nested dict of parameter shapes in a params-only export, read without loading arrays."""
  ckpt = checkpoints.Checkpointer(directory, keep=1, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f'no parameters exported under {directory}.')
  return ckpt.state_shapes(step)


def _flat_shapes(tree) -> dict:
  """{'blocks/0/qkv': shape, ...}: list indices and string keys compare equal."""
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, tuple) or hasattr(x, 'shape'))
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path):
          tuple(getattr(leaf, 'shape', leaf)) for path, leaf in leaves}


def evaluator_config(config, shapes: dict, directory: str) -> BackboneConfig:
  """The AR architecture of an exported teacher, from its parameter shapes."""
  try:
    vocab, d_model = shapes['embed']
    blocks = shapes['blocks']
    _, _, heads, _ = blocks['0']['qkv']
    mlp = blocks['0']['mlp_in'][1]
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{directory} is not an AR teacher export of this project (missing or '
                     f'odd tensor {e}); config.eval.evaluator_workdir must be a run directory '
                     'whose teacher/params an evaluator was trained into.') from e
  if vocab < config.model.vocab_size:
    raise ValueError(f'the evaluator at {directory} has a {vocab}-token vocabulary but this '
                     f'config has {config.model.vocab_size}: it must use the same tokenizer.')
  return BackboneConfig(vocab_size=vocab, num_real_tokens=config.model.vocab_size,
                        mask_id=config.model.mask_id, d_model=d_model, num_layers=len(blocks),
                        num_heads=heads, mlp_ratio=mlp // d_model, dtype=config.model.dtype)


def load_evaluator(config, mesh, rules):
  """(model, params) of the independent evaluator, or None when none is configured."""
  workdir = config.eval.evaluator_workdir
  if not workdir:
    return None
  directory = os.path.join(workdir, 'teacher', 'params')
  if not checkpoints.has_params(directory):
    raise FileNotFoundError(f'config.eval.evaluator_workdir={workdir!r} has no {directory}; '
                            "train an evaluator there or set --config.eval.evaluator_workdir=''.")
  shapes = stored_param_shapes(directory)
  model = FunctionalModel(evaluator_config(config, shapes, directory), 'ar')
  if _flat_shapes(model.param_shapes) != _flat_shapes(shapes):
    raise ValueError(f'the evaluator at {directory} does not have the AR backbone layout this '
                     'project writes (tensor names or shapes differ).')
  params, _ = checkpoints.import_params(directory, checkpoints.abstract_like(
      model.param_shapes, train_state.param_shardings(model, mesh, rules)))
  return model, params


# ----------------------------------------------------------------------------- decoding

def decode_samples(cand: Candidate, prompts: np.ndarray, key, batch_sizes) -> np.ndarray:
  """Decode all prompts in fixed-size chunks (the last one padded by repeating rows), of the
  largest speed batch size that fits, so the speed runs reuse the compiled loop. Chunk s gets
  the noise key fold_in(key, s), the same for every model."""
  num = prompts.shape[0]
  fitting = [b for b in batch_sizes if b <= num]
  chunk = max(fitting) if fitting else num
  total = math.ceil(num / chunk) * chunk
  padded = np.resize(prompts, (total, prompts.shape[1])).astype(np.int32)
  rows = [decode.to_host(cand.decode(padded[s:s + chunk], jax.random.fold_in(key, s)))
          for s in range(0, total, chunk)]
  return np.concatenate(rows, axis=0)[:num]


def measure_throughput(cands: list[Candidate], prompts: np.ndarray, key, batch_sizes,
                       repeats: int, prefix_len: int, gen_len: int, log) -> dict:
  """{name: [{'batch', 'tokens_per_s', 'forwards_per_token', 'seconds', ...}]} (no speed-up)."""
  new_tokens = gen_len - prefix_len
  out = {c.name: [] for c in cands}
  for batch in batch_sizes:
    batch_prompts = jnp.asarray(np.resize(prompts, (batch, prefix_len)).astype(np.int32))
    t0 = time.perf_counter()
    for c in cands:
      jax.block_until_ready(c.decode(batch_prompts, key))
    log(f'speed batch {batch}: compiled + warmed up {len(cands)} models in '
        f'{time.perf_counter() - t0:.1f}s')
    seconds = {c.name: [] for c in cands}
    for r in range(repeats):
      for c in cands:
        t0 = time.perf_counter()
        jax.block_until_ready(c.decode(batch_prompts, key))
        seconds[c.name].append(time.perf_counter() - t0)
      log(f'speed batch {batch} round {r + 1}/{repeats}: ' + '  '.join(
          f'{c.name} {batch * new_tokens / seconds[c.name][-1]:.0f} tok/s' for c in cands))
    for c in cands:
      median = float(np.median(seconds[c.name]))
      steps = roofline.decode_steps(prefix_len, gen_len, c.decode_k)
      out[c.name].append({'batch': int(batch), 'tokens_per_s': batch * new_tokens / median,
                          'forwards_per_token': steps / new_tokens, 'seconds': median,
                          'seconds_all': seconds[c.name], 'decode_steps': steps})
  return out


# ----------------------------------------------------------------------------- roofline

def roofline_analysis(cands: list[Candidate], throughput: dict, batch_sizes, prefix_len: int,
                      gen_len: int, dtype: str, log) -> dict:
  """Per-step costs, device peaks, predicted vs measured speed-ups and their crossover."""
  peak = roofline.measure_peak_flops(dtype)
  bandwidth = roofline.measure_bandwidth()
  p, bw = peak['flops_per_s'], bandwidth['bytes_per_s']
  log(f'roofline: peak {p / 1e9:.1f} GFLOP/s ({dtype} matmul), bandwidth {bw / 1e9:.1f} GB/s')
  largest = max(batch_sizes)
  entries = []
  for c in cands:
    decode_k = 0 if c.k == 0 else c.decode_k  # the cost functions' "0 = AR step"
    analytic = roofline.affine_cost(
        lambda b: roofline.analytic_step_cost(c.model, decode_k, b, gen_len), 1, 2)
    xla = roofline.xla_step_cost(c.model, decode_k, largest, gen_len, **_step_settings(c))
    flops, nbytes = roofline.cost_at(analytic, largest)
    entries.append({'name': c.name, 'decode_k': c.decode_k,
                    'steps': roofline.decode_steps(prefix_len, gen_len, c.decode_k),
                    'analytic': analytic,
                    'xla': dict(xla, batch=largest, flops_vs_analytic=xla['flops'] / flops,
                                bytes_vs_analytic=xla['bytes'] / nbytes)})
  log(f'roofline: analytic step costs, and XLA cost analysis of one step at batch {largest}')
  ar = entries[0]
  measured = {name: {row['batch']: row for row in rows} for name, rows in throughput.items()}
  models = []
  for e in entries:
    per_batch = []
    for b in batch_sizes:
      flops, nbytes = roofline.cost_at(e['analytic'], b)
      per_batch.append({
          'batch': int(b), 'flops': flops, 'bytes': nbytes,
          'intensity_flops_per_byte': flops / nbytes,
          'regime': roofline.regime(e['analytic'], b, p, bw),
          'predicted_step_s': roofline.step_seconds(e['analytic'], b, p, bw),
          'measured_step_s': measured[e['name']][b]['seconds'] / e['steps'],
          'predicted_speedup_vs_ar': _predict(ar, e, b, p, bw)})
    speedups = [measured[e['name']][b]['tokens_per_s'] / measured['ar'][b]['tokens_per_s']
                for b in batch_sizes]
    is_student = e is not ar
    curve = np.geomspace(min(batch_sizes), max(4 * max(batch_sizes), 2), 33)
    models.append(dict(
        e, per_batch=per_batch,
        compute_bound_from_batch=roofline.compute_bound_from(e['analytic'], p, bw),
        predicted_curve=[[float(b), _predict(ar, e, b, p, bw)] for b in curve],
        predicted_crossover_batch=(roofline.crossover(
            lambda b: _predict(ar, e, b, p, bw)) if is_student else None),
        measured_crossover_batch=(roofline.measured_crossover(list(batch_sizes), speedups)
                                  if is_student else None),
        predicted_speedup_batch_1=_predict(ar, e, 1, p, bw),
        predicted_speedup_large_batch=_predict(ar, e, 1 << 20, p, bw)))
  return {'cost_source': 'analytic per-step FLOPs/bytes (roofline.analytic_step_cost) for the '
                         'prediction; the XLA cost_analysis of ONE compiled decode step (not '
                         'the while_loop, whose body it counts once) at the largest batch '
                         'reported beside it as a cross-check',
          'peak_flops_per_s': p, 'bandwidth_bytes_per_s': bw, 'ridge_flops_per_byte': p / bw,
          'peak_measurement': peak, 'bandwidth_measurement': bandwidth, 'models': models}


def _step_settings(c: Candidate) -> dict:
  if c.k == 0:
    return {'temperature': c.settings['temperature']}
  return {'freq_penalty': c.settings['freq_penalty']}


def _predict(ar, e, batch, p, bw) -> float:
  return roofline.predicted_speedup({'affine': ar['analytic'], 'steps': ar['steps']},
                                    {'affine': e['analytic'], 'steps': e['steps']}, batch, p, bw)


# ----------------------------------------------------------------------------- schema

def _check_type(value, expected, where: str):
  allowed = expected if isinstance(expected, tuple) else (expected,)
  for t in allowed:
    if t is None and value is None:
      return
    if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
      if not math.isfinite(value):
        raise ValueError(f'results.json: {where} = {value} is not a finite number.')
      return
    if t is int and isinstance(value, int) and not isinstance(value, bool):
      return
    if t in (str, list) and isinstance(value, t):
      return
  names = ' or '.join('null' if t is None else t.__name__ for t in allowed)
  raise ValueError(f'results.json: {where} should be {names}, got {type(value).__name__} '
                   f'{value!r:.80}.')


def _check_keys(obj, required: dict, where: str):
  if not isinstance(obj, dict):
    raise ValueError(f'results.json: {where} should be an object, got {type(obj).__name__}.')
  missing = sorted(set(required) - set(obj))
  if missing:
    raise ValueError(f'results.json: {where} is missing keys {missing}.')
  for key, expected in required.items():
    _check_type(obj[key], expected, f'{where}.{key}')


def validate_results(obj) -> None:
  """Raise ValueError naming the first problem if `obj` does not follow the results schema.

  Required keys and types are RESULT_KEYS / MODEL_KEYS / THROUGHPUT_KEYS (extra keys are
  allowed); model names are "ar" or "pflm_k{k}" and unique; the first model is "ar"."""
  _check_keys(obj, RESULT_KEYS, 'top level')
  if not obj['models']:
    raise ValueError('results.json: models is empty.')
  names = []
  for i, model in enumerate(obj['models']):
    _check_keys(model, MODEL_KEYS, f'models[{i}]')
    if not MODEL_NAME.match(model['name']):
      raise ValueError(f'results.json: models[{i}].name={model["name"]!r}: expected "ar" or '
                       '"pflm_k<k>".')
    names.append(model['name'])
    for j, row in enumerate(model['throughput']):
      _check_keys(row, THROUGHPUT_KEYS, f'models[{i}].throughput[{j}]')
  if len(set(names)) != len(names):
    raise ValueError(f'results.json: duplicate model names {names}.')
  if names[0] != 'ar':
    raise ValueError(f'results.json: the first model must be "ar" (the reference), got '
                     f'{names[0]!r}.')


# ----------------------------------------------------------------------------- report

def _fmt(value, spec: str = '.2f') -> str:
  return 'n/a' if value is None else format(value, spec)


def plot_speedup(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  predicted = {m['name']: m for m in results['roofline']['models']}
  for model in results['models'][1:]:
    batches = [r['batch'] for r in model['throughput']]
    line, = ax.plot(batches, [r['speedup_vs_ar'] for r in model['throughput']], 'o-',
                    label=f'k={model["decode_k"]} measured')
    curve = np.asarray(predicted[model['name']]['predicted_curve'])
    ax.plot(curve[:, 0], curve[:, 1], '--', color=line.get_color(), alpha=0.7,
            label=f'k={model["decode_k"]} roofline')
  ax.axhline(1.0, color='black', linewidth=1)
  ax.set_xscale('log', base=2)
  ax.set_xlabel('batch size')
  ax.set_ylabel('speed-up vs AR (tokens/s)')
  ax.set_title(f'K-Forcing decode speed-up on {results["device"]}', fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_quality(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  ar, students = results['models'][0], results['models'][1:]
  ks = [m['k'] for m in students]
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
  for ax, key, label in ((axes[0], 'gen_ppl_teacher', 'generative perplexity'),
                         (axes[1], 'entropy', 'unigram entropy (nats)')):
    ax.plot(ks, [m[key] for m in students], 'o-',
            label='student' + (' (under the teacher)' if key == 'gen_ppl_teacher' else ''))
    ax.axhline(ar[key], color='black', linestyle='--', label='AR teacher samples')
    if key == 'gen_ppl_teacher' and ar['gen_ppl_evaluator'] is not None:
      ax.plot(ks, [m['gen_ppl_evaluator'] for m in students], 's-',
              label='student (under the evaluator)')
      ax.axhline(ar['gen_ppl_evaluator'], color='gray', linestyle=':',
                 label='AR samples (evaluator)')
    ax.set_xlabel('k (tokens per forward)')
    ax.set_ylabel(label)
    if ks:
      ax.set_xticks(ks)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report_markdown(results: dict) -> str:
  models = results['models']
  rf = results['roofline']
  lines = [
      '# K-Forcing evaluation', '',
      f'Device: {results["device"]}; JAX {results["jax_version"]}; config '
      f'`{results["config"]}`.', '',
      f'{results["num_samples"]} prompts of {results["prefix_len"]} tokens from the '
      f'`{results["eval_split"]}` split, decoded to {results["gen_len"]} tokens (fixed length, no '
      'EOS stop) with one shared noise key. Metrics use the generated tokens only. AR: '
      'ancestral sampling at temperature '
      f'{models[0]["temperature"]}; students: their own k, tau = 1, frequency penalty lambda.', '',
      '## Quality', '',
      '| model | k | decode k | lambda | gen. ppl (teacher) | gen. ppl (evaluator) | entropy | '
      'distinct-2 | distinct-4 | acc_total |',
      '|---|---|---|---|---|---|---|---|---|---|']
  for m in models:
    lines.append(f'| {m["name"]} | {m["k"]} | {m["decode_k"]} | {_fmt(m.get("freq_penalty"))} | '
                 f'{m["gen_ppl_teacher"]:.2f} | {_fmt(m["gen_ppl_evaluator"])} | '
                 f'{m["entropy"]:.3f} | {m["distinct_2"]:.3f} | {m["distinct_4"]:.3f} | '
                 f'{_fmt(m["acc_total"], ".3f")} |')
  lines += ['', 'acc_total: the stage\'s held-out agreement with its teacher under shared noise '
            '(all k tokens of a window right; from student_k*/eval.json).', '',
            '## Speed', '',
            f'Tokens/s of the whole generation (median of {results["repeats"]} interleaved rounds '
            'after a warm-up; speed-up vs AR in parentheses).', '',
            '| batch | ' + ' | '.join(m['name'] for m in models) + ' |',
            '|---|' + '---|' * len(models)]
  for i, row in enumerate(models[0]['throughput']):
    cells = [f'{r["tokens_per_s"]:.0f} ({r["speedup_vs_ar"]:.2f}x)'
             for r in (m['throughput'][i] for m in models)]
    lines.append(f'| {row["batch"]} | ' + ' | '.join(cells) + ' |')
  lines.append('| forwards / token | ' + ' | '.join(
      f'{m["throughput"][0]["forwards_per_token"]:.3f}' for m in models) + ' |')
  lines += ['', '![speed-up](speedup.png)', '', '![quality](quality.png)', '']
  lines += roofline_markdown(results, rf)
  lines += ['', '## Samples', '']
  for m in models:
    lines.append(f'### {m["name"]}')
    lines.append('')
    for sample in m['samples']:
      lines += ['```text', f'[prompt] {sample["prompt"]}', f'[generated] {sample["generated"]}',
                '```']
    lines.append('')
  return '\n'.join(lines)


def roofline_markdown(results: dict, rf: dict) -> list[str]:
  ar = rf['models'][0]
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
  students = rf['models'][1:]
  lines += ['', '| batch | AR regime | ' + ' | '.join(
      f'{m["name"]} predicted / measured' for m in students) + ' |',
      '|---|---|' + '---|' * len(students)]
  measured = {m['name']: m for m in results['models']}
  for i, row in enumerate(ar['per_batch']):
    cells = [f'{m["per_batch"][i]["predicted_speedup_vs_ar"]:.2f} / '
             f'{measured[m["name"]]["throughput"][i]["speedup_vs_ar"]:.2f} '
             f'({m["per_batch"][i]["regime"]})' for m in students]
    lines.append(f'| {row["batch"]} | {row["regime"]} | ' + ' | '.join(cells) + ' |')
  lines.append('')
  for m in students:
    k = m['decode_k']
    pred, meas = m['predicted_crossover_batch'], m['measured_crossover_batch']
    lines.append(
        f'- {m["name"]}: predicted speed-up {m["predicted_speedup_batch_1"]:.2f}x at B=1, '
        f'{m["predicted_speedup_large_batch"]:.2f}x as B grows without bound (steps ratio '
        f'{ar["steps"] / m["steps"]:.2f}); crosses 1 at B = '
        + (f'{pred:.0f}' if pred else 'never (in 1..2^20)') + ' predicted, '
        + (f'{meas:.0f}' if meas else 'not between the measured batch sizes') + ' measured. '
        f'Each step runs 2k = {2 * k} slots and k = {k} output-head rows.')
  small, large = ar['per_batch'][0], ar['per_batch'][-1]
  ridge = rf['ridge_flops_per_byte']
  ar_cb = ar['compute_bound_from_batch']
  k_cb = {m['name']: m['compute_bound_from_batch'] for m in students}

  def where(value):
    return 'never' if value is None else f'from B ~ {max(value, 1):.0f}'

  lines += [
      '', f'Why: the AR step\'s arithmetic intensity is {small["intensity_flops_per_byte"]:.2f} '
      f'FLOP/byte at B={small["batch"]} and {large["intensity_flops_per_byte"]:.2f} at '
      f'B={large["batch"]}, against a ridge point of {ridge:.1f}; it is compute-bound '
      f'{where(ar_cb)}, the k-token steps '
      + ', '.join(f'{n} {where(v)}' for n, v in k_cb.items()) + '. '
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
  return lines


def write_report(report_dir: str, results: dict) -> None:
  validate_results(results)
  os.makedirs(report_dir, exist_ok=True)
  with open(os.path.join(report_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(report_dir, 'REPORT.md'), 'w') as f:
    f.write(report_markdown(results))
  plot_speedup(results, os.path.join(report_dir, 'speedup.png'))
  plot_quality(results, os.path.join(report_dir, 'quality.png'))


# ----------------------------------------------------------------------------- run

def _config_name(config) -> str:
  """The --config file when a main parsed one, else a marker (the values are stored too)."""
  if flags.FLAGS.is_parsed() and 'config' in flags.FLAGS:
    try:
      return config_flags.get_config_filename(flags.FLAGS['config'])
    except (AttributeError, TypeError):
      pass
  return '<in-memory config>'


def _device_name() -> str:
  dev = jax.devices()[0]
  return f'{dev.device_kind} ({dev.platform}) x{jax.device_count()}'


def run(config, workdir: str, *, force: bool = False, prompts=None, tokenizer=None) -> dict:
  """Evaluate every model in `workdir` and write <workdir>/report/. Returns the results.

  `prompts` ((num, prefix_len) int array) and `tokenizer` (anything with .decode(ids)) default
  to the held-out split's document prefixes and the config's tokenizer (tests pass their own).
  """
  report_dir = os.path.join(workdir, 'report')
  results_path = os.path.join(report_dir, 'results.json')
  main = progress.is_main_process()
  if os.path.exists(results_path) and not force:
    if main:
      print(f'[evaluate] already done ({results_path}); skipping (use --force to redo)',
            flush=True)
    with open(results_path) as f:
      return json.load(f)
  t_start = time.time()

  def log(msg: str) -> None:
    if main:
      print(f'[evaluate {progress.format_duration(time.time() - t_start)}] {msg}', flush=True)

  dc, ec = config.decode, config.eval
  prefix_len, gen_len = int(dc.prefix_len), int(dc.gen_len)
  if gen_len <= prefix_len:
    raise ValueError(f'config.decode.gen_len={gen_len} must exceed config.decode.prefix_len='
                     f'{prefix_len}.')
  mesh = sharding.mesh_from_config(config)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  if tokenizer is None:
    tokenizer = data.load_tokenizer(config)
    data.check_vocab(config, tokenizer)
  if prompts is None:
    prompts = data.document_prefixes(config, ec.split, ec.num_samples, prefix_len,
                                      tokenizer=tokenizer)
  prompts = np.asarray(prompts, np.int32)
  if prompts.ndim != 2 or prompts.shape[1] != prefix_len:
    raise ValueError(f'prompts have shape {prompts.shape}; expected (num, {prefix_len}).')
  batch_sizes = [int(b) for b in ec.batch_sizes]

  cands = load_candidates(config, workdir, mesh, rules, log)
  log('models: ' + ', '.join(c.name for c in cands))
  teacher = cands[0]
  evaluator = load_evaluator(config, mesh, rules)
  key = jax.random.key(config.seed)

  entries = []
  for c in cands:
    t0 = time.time()
    samples = decode_samples(c, prompts, key, batch_sizes)
    generated = samples[:, prefix_len:]
    entry = {
        'name': c.name, 'k': c.k, 'decode_k': c.decode_k,
        'gen_ppl_teacher': generative_perplexity(teacher.model, teacher.params, samples,
                                                 prefix_len),
        'gen_ppl_evaluator': (None if evaluator is None else
                              generative_perplexity(*evaluator, samples, prefix_len)),
        'entropy': unigram_entropy(generated), 'distinct_2': distinct_n(generated, 2),
        'distinct_4': distinct_n(generated, 4), 'acc_total': c.acc_total,
        **c.settings,
        'samples': [{'prompt': tokenizer.decode(row[:prefix_len].tolist()),
                     'generated': tokenizer.decode(row[prefix_len:].tolist())}
                    for row in samples[:NUM_REPORT_SAMPLES]]}
    entries.append(entry)
    log(f'quality {c.name}: {len(samples)} samples in {time.time() - t0:.1f}s, gen ppl '
        f'(teacher) {entry["gen_ppl_teacher"]:.2f}, entropy {entry["entropy"]:.3f}')

  speed = measure_throughput(cands, prompts, key, batch_sizes, int(ec.repeats), prefix_len,
                             gen_len, log)
  ar_rate = {row['batch']: row['tokens_per_s'] for row in speed['ar']}
  for entry in entries:
    entry['throughput'] = [dict(row, speedup_vs_ar=row['tokens_per_s'] / ar_rate[row['batch']])
                           for row in speed[entry['name']]]
  rf = roofline_analysis(cands, speed, batch_sizes, prefix_len, gen_len, config.model.dtype,
                         log)

  results = {
      'device': _device_name(), 'jax_version': jax.__version__, 'config': _config_name(config),
      'prefix_len': prefix_len, 'gen_len': gen_len, 'models': entries,
      'eval_split': ec.split, 'num_samples': int(prompts.shape[0]), 'batch_sizes': batch_sizes,
      'repeats': int(ec.repeats), 'seed': int(config.seed),
      'evaluator_workdir': ec.evaluator_workdir or None,
      'ar_k_convention': 'the AR teacher is reported with k = 0 and decode_k = 1',
      'speed_prompts': 'the quality prompts tiled to the batch size, identical for every model',
      'roofline': rf, 'config_values': json.loads(config.to_json_best_effort()),
      'seconds': time.time() - t_start}
  if main:
    write_report(report_dir, results)
  else:
    validate_results(results)
  log(f'wrote {report_dir}/results.json, REPORT.md, speedup.png, quality.png')
  return results


def main(argv):
  del argv
  distributed.initialize()
  run(cli.CONFIG.value, cli.WORKDIR.value, force=_FORCE.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)
