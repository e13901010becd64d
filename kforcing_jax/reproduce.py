"""The paper's evaluation protocol (METHOD.md s.5) on exported checkpoints.

  python -m kforcing_jax.main.reproduce --config=configs/lm1b_ar.py|configs/owt_ar.py
      --ar=DIR --pflm=DIR --prefix_file=F.jsonl --out=OUTDIR [--config.reproduce.<field>=...]

The config names the task: tokenizer (config.data), total length (decode.gen_len: LM1B 128,
OWT 1024) and the authors' penalties (config.decode.freq_penalty, read through decode.freq_penalty);
config.reproduce holds the protocol settings (listed in configs/paper_protocol.py). --ar /
--pflm are run directories (ours or the converter's): the AR model and the widest student,
loaded by rundir.load_export (architecture from the stored shapes, vocabulary checked against
the tokenizer); the student decodes every K in reproduce.ks (K <= its k_max).

Prompts: each "prefix" of the JSON-lines file, tokenized without special tokens, cut to its
first prefix_tokens (6) tokens (shorter ones dropped and counted); no BOS unless prepend_bos
(the authors' script: prompt = 6 tokens, max_new_tokens = total - 6, LM1B 122, OWT 1018), each
n_per_prefix times, prefix-major, in batches of batch_size; the last batch is filled by
repeating rows from the start and the filler outputs are dropped. Batch b draws its noise from
fold_in(key(seed), b) for every model. AR: temperature 1, KV cache; student: K tokens per
forward, tau = 1, lambda per K; fixed length (no EOS stop). samples.jsonl: the prefix text and
the completion up to and including the first EOS; metrics use the full outputs.

Timing (timing.time_batches) on one local device per process: n_warmup_batches untimed decodes
of batch 0, then every batch timed to block_until_ready. throughput.json (the authors' fields):
  total_elapsed_sec                  sum of the timed batches' seconds
  throughput_tok_per_sec_total       total_samples * max_new_tokens / total_elapsed_sec
                                     (filler rows of the last batch are not counted)
  throughput_tok_per_sec_avg_batch   batch_size * max_new_tokens / avg_batch_time_sec
  total_nfe                          n_batches * ceil(max_new_tokens / K_per_step); the one
                                     prefill forward per batch is not counted
  nfe_per_token                      ceil(max_new_tokens / K) / max_new_tokens
  freq_penalty                       the student's lambda (0.0 for AR, which has none)
results.json: generative perplexity under an evaluator AR model (reproduce.evaluator; default
the --ar model, which it says), unigram entropy, distinct-2/-4, speed-up over AR. Only
process 0 writes files.

decode.mode lossless (or --mode=lossless): the student rows are "lossless_k{K}", the student
drafting K tokens and the --ar model verifying them with the same noise (kforcing_jax/
lossless.py; both models needed). Their samples are the AR model's, token for token, for the
same batches and keys (results.json: rows_identical_to_ar, counted against the ar row, and
mean_tokens_per_iteration); in throughput.json total_nfe counts loop iterations of the timed
batches, each one student draft pass and one teacher verify pass.
"""

import dataclasses
import json
import math
import time

import jax
import numpy as np
from etils import epath

from kforcing_jax import config_checks, data, decode, evaluate, metrics, progress, rundir
from kforcing_jax import sharding, timing

THROUGHPUT_FIELDS = (
    'model', 'task', 'batch_size', 'n_per_prefix', 'total_samples', 'max_new_tokens',
    'K_per_step', 'prefix_len', 'n_batches', 'n_warmup_batches', 'total_elapsed_sec',
    'avg_batch_time_sec', 'throughput_tok_per_sec_total', 'throughput_tok_per_sec_avg_batch',
    'total_nfe', 'nfe_per_token', 'device', 'freq_penalty')
_SUMMARY = ('throughput_tok_per_sec_total', 'nfe_per_token')  # results.json, beside quality
_PREFIX_LINE = 'expected one object per line like {"prefix": "some text"}.'


# ----------------------------------------------------------------------------- prompts

def load_prefixes(path: str) -> list[str]:
  """The "prefix" string of every JSON line of `path` (blank lines skipped); errors name the
  file and the line."""
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f'--prefix_file={path} does not exist.')
  content = epath.Path(path).read_bytes()
  try:
    text = content.decode('utf-8')
  except UnicodeDecodeError as e:
    line = content[:e.start].count(b'\n') + 1
    raise ValueError(f'--prefix_file={path} line {line} is not UTF-8 ({e.reason} at byte '
                     f'{e.start}); save the file as UTF-8.') from None
  out = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} line {number} is not JSON ({e.msg}); {_PREFIX_LINE}') from None
    if not isinstance(record, dict) or not isinstance(record.get('prefix'), str):
      raise ValueError(f'{path} line {number} has no "prefix" string; {_PREFIX_LINE}')
    out.append(record['prefix'])
  if not out:
    raise ValueError(f'--prefix_file={path} holds no prefixes (it is empty or blank); '
                     f'{_PREFIX_LINE}')
  return out


def cut_prefix(ids: list[int], length: int) -> list[int] | None:
  """The first `length` ids, or None when there are fewer (the prefix is dropped)."""
  return list(ids[:length]) if len(ids) >= length else None


@dataclasses.dataclass(frozen=True)
class Prompts:
  ids: np.ndarray           # (num, prompt_len) int32: [BOS] + the prefix tokens
  prefix_ids: np.ndarray    # (num, prefix_tokens) int32: the prefix tokens alone
  num_lines: int            # prefixes in the file
  dropped_short: int        # prefixes with fewer than prefix_tokens tokens


def make_prompts(texts: list[str], tokenizer: data.Tokenizer, *, prefix_tokens: int,
                 prepend_bos: bool, max_prefixes: int = 0) -> Prompts:
  """Tokenize (no special tokens), cut to prefix_tokens, drop and count the short ones, keep
  the first max_prefixes (0: all), and put the tokenizer's BOS in front when asked."""
  cut = [cut_prefix(ids, prefix_tokens) for ids in tokenizer.encode_batch(texts)]
  kept = [ids for ids in cut if ids is not None]
  if max_prefixes:
    kept = kept[:max_prefixes]
  if not kept:
    raise ValueError(f'no prefix has {prefix_tokens} tokens ({len(texts)} in the file, all '
                     'shorter): nothing to decode.')
  bos = [tokenizer.bos_id] if prepend_bos else []
  return Prompts(np.asarray([bos + row for row in kept], np.int32), np.asarray(kept, np.int32),
                 len(texts), sum(ids is None for ids in cut))


def freq_penalties(config, ks, override=()) -> dict[int, float]:
  """lambda per K: decode.freq_penalty (the authors' table in config.decode.freq_penalty), or
  the override (reproduce.freq_penalty: one value per K, or one for all)."""
  if override:
    if len(override) not in (1, len(ks)):
      raise ValueError(f'reproduce.freq_penalty has {len(override)} values for {len(ks)} values '
                       'of reproduce.ks: give one per K, or one for all.')
    values = list(override) * len(ks) if len(override) == 1 else list(override)
    return {k: float(v) for k, v in zip(ks, values)}
  table = dict(config.decode.freq_penalty)
  unknown = [k for k in ks if str(k) not in table]
  if unknown:
    raise ValueError(f'the authors give no frequency penalty for K={unknown} '
                     f'({config.reproduce.task}: {table}); set --config.reproduce.freq_penalty '
                     'with one value per K.')
  return {k: decode.freq_penalty(config, k) for k in ks}


def sample_rows(prompts: np.ndarray, n_per_prefix: int, batch_size: int):
  """(rows (n_batches * batch_size, P), total_samples): every prompt n_per_prefix times,
  prefix-major, with the last batch filled up by repeating rows from the start."""
  rows = np.repeat(prompts, n_per_prefix, axis=0)
  total = rows.shape[0]
  n_batches = math.ceil(total / batch_size)
  return np.resize(rows, (n_batches * batch_size, rows.shape[1])), total


# ----------------------------------------------------------------------------- records

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


def quality(samples: np.ndarray, prompt_len: int, evaluator: rundir.Export) -> dict:
  """Metrics of the generated parts of `samples` (total_samples, total length)."""
  generated = samples[:, prompt_len:]
  return {'gen_ppl': metrics.generative_perplexity(evaluator.model, evaluator.params, samples,
                                                   prompt_len),
          'entropy': metrics.unigram_entropy(generated),
          'distinct_2': metrics.distinct_n(generated, 2),
          'distinct_4': metrics.distinct_n(generated, 4)}


def format_table(results: dict) -> str:
  header = (f'{"model":<11} {"K":>2} {"lambda":>6} {"tok/s":>10} {"speed-up":>8} '
            f'{"NFE/tok":>7} {"gen ppl":>9} {"entropy":>7} {"dist-2":>6} {"dist-4":>6}')
  lines = [header, '-' * len(header)]
  for m in results['models']:
    speedup = '-' if m['speedup_vs_ar'] is None else f'{m["speedup_vs_ar"]:.2f}x'
    lines.append(f'{m["name"]:<11} {m["K"]:>2} {m["freq_penalty"]:>6.2f} '
                 f'{m["throughput_tok_per_sec_total"]:>10.1f} {speedup:>8} '
                 f'{m["nfe_per_token"]:>7.3f} {m["gen_ppl"]:>9.2f} {m["entropy"]:>7.3f} '
                 f'{m["distinct_2"]:>6.3f} {m["distinct_4"]:>6.3f}')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------- models

def check_settings(config, ar: str | None, pflm: str | None) -> None:
  """Fails on protocol settings (config.reproduce) that cannot run, before anything loads."""
  if not (ar or pflm):
    raise ValueError('nothing to evaluate: pass --ar=DIR and/or --pflm=DIR.')
  if config.decode.mode == 'lossless' and not (ar and pflm):
    raise ValueError('decode.mode lossless: the --pflm student drafts and the --ar model '
                     'verifies; pass both (or --mode=lossy).')
  if not (ar or config.reproduce.evaluator):
    raise ValueError('without --ar there is no default evaluator: set '
                     '--config.reproduce.evaluator=DIR (a run directory with an AR model).')
  config_checks.check_reproduce(config)


def load_models(r, ar: str | None, pflm: str | None, layout, tokenizer, prompt_len: int,
                lossless_mode: bool = False):
  """(AR export or None, student export or None, evaluator export), K checked against the
  student's k_max and the prompt length (lossless_mode: K+1) before anything decodes. Errors
  name the flag."""
  def load(directory: str, flag: str, kind: str) -> rundir.Export:
    try:
      return rundir.load_export(rundir.model_dir(directory, kind), layout, kind=kind,
                                tokenizer=tokenizer, dtype=r.dtype)
    except (FileNotFoundError, ValueError) as e:
      raise type(e)(f'--{flag}={directory}: {e}') from e

  ar_export = load(ar, 'ar', 'ar') if ar else None
  student = load(pflm, 'pflm', 'pflm') if pflm else None
  if student:
    too_wide = [k for k in r.ks if k > student.k]
    if too_wide:
      raise ValueError(f'reproduce.ks has K={too_wide} but the student in {pflm} has '
                       f'k_max={student.k}; use K <= {student.k}.')
    if max(r.ks) > prompt_len:
      raise ValueError(f'K={max(r.ks)} exceeds the prompt length {prompt_len}: the first '
                       'k-token step feeds the last K prompt tokens.')
    if lossless_mode and max(r.ks) + 1 > prompt_len:
      raise ValueError(f'K={max(r.ks)} in decode.mode lossless needs prompts of K+1 = '
                       f'{max(r.ks) + 1} tokens (the drafting student re-feeds the last K+1), '
                       f'these have {prompt_len}: use smaller K or longer prefix_tokens.')
  evaluator = (load(r.evaluator, 'config.reproduce.evaluator', 'ar')
               if r.evaluator and r.evaluator != ar else ar_export)
  return ar_export, student, evaluator


# ----------------------------------------------------------------------------- run

@dataclasses.dataclass(frozen=True)
class _Context:
  """What every model's decode, timing and output share within one run."""
  config: object
  tokenizer: data.Tokenizer
  prompts: Prompts
  max_new: int
  device: str
  out: str

  @property
  def prompt_len(self) -> int:
    return self.prompts.ids.shape[1]


def _write_model(c: _Context, record: dict, samples) -> None:
  directory = epath.Path(c.out) / record['model']
  progress.write_json(directory / 'throughput.json', record)
  texts = [c.tokenizer.decode(ids) for ids in c.prompts.prefix_ids]
  eos = c.tokenizer.eos_id
  lines = [json.dumps({'prefix': texts[i // c.config.reproduce.n_per_prefix],
                       'completion': c.tokenizer.decode(completion_ids(row[c.prompt_len:], eos))})
           + '\n' for i, row in enumerate(samples)]
  (directory / 'samples.jsonl').write_text(''.join(lines), encoding='utf-8')


def _tokens_of(dec: evaluate.LosslessDecoder, outputs: list):
  """`dec` as time_batches calls it: tokens out, every verify_loop output kept in `outputs`."""
  def run(prompts, key):
    out = dec(prompts, key)
    outputs.append(out)
    return out['tokens']
  return run


def lossless_fields(outputs: list, n_warmup: int, max_new_tokens: int, samples: np.ndarray,
                    ar_samples: np.ndarray | None) -> dict:
  """A lossless row's throughput.json NFE (loop iterations of the timed batches, the warm-up
  runs dropped) and results.json extras (tokens per iteration, rows equal to the AR model's)."""
  timed = outputs[n_warmup:]
  total_nfe = int(sum(int(o['iterations']) for o in timed))
  histogram = np.sum([np.asarray(o['accepted_histogram']) for o in timed], axis=0)
  return {'total_nfe': total_nfe, 'nfe_per_token': total_nfe / len(timed) / max_new_tokens,
          'mean_tokens_per_iteration': evaluate.mean_tokens_per_iteration(histogram),
          'rows_identical_to_ar': None if ar_samples is None else
          int(np.all(samples == ar_samples, axis=1).sum())}


def _decode_all(c: _Context, decoders, evaluator, log) -> tuple[list[dict], dict]:
  """Each decoder timed over every batch and scored: (results.json "models", tokens)."""
  r = c.config.reproduce
  rows, total_samples = sample_rows(c.prompts.ids, r.n_per_prefix, r.batch_size)
  models, tokens = [], {}
  for dec in decoders:
    t0 = time.time()
    outputs = []
    run = _tokens_of(dec, outputs) if dec.kind == 'lossless' else dec
    out, seconds = timing.time_batches(run, rows, r.batch_size, jax.random.key(r.seed),
                                       r.n_warmup_batches)
    samples = np.asarray(out)[:total_samples]
    record = throughput_record(
        model=dec.name, task=r.task, batch_size=r.batch_size,
        n_per_prefix=r.n_per_prefix, total_samples=total_samples, max_new_tokens=c.max_new,
        k_per_step=dec.k, prefix_len=c.prompt_len, batch_seconds=seconds,
        n_warmup_batches=r.n_warmup_batches, device=c.device,
        freq_penalty=dec.settings.get('freq_penalty', 0.0))
    extra = {}
    if dec.kind == 'lossless':
      extra = lossless_fields(outputs, r.n_warmup_batches, c.max_new, samples,
                              tokens.get('ar'))
      record.update(total_nfe=extra.pop('total_nfe'), nfe_per_token=extra.pop('nfe_per_token'))
    scores = quality(samples, c.prompt_len, evaluator)
    models.append({'name': dec.name, 'K': dec.k, 'freq_penalty': record['freq_penalty'],
                   **scores, **{key: record[key] for key in _SUMMARY}, **extra})
    tokens[dec.name] = samples
    if progress.is_main_process():
      _write_model(c, record, samples)
    log(f'{dec.name}: {record["throughput_tok_per_sec_total"]:.1f} tok/s over '
        f'{len(seconds)} timed batch(es), gen ppl {scores["gen_ppl"]:.2f} '
        f'({time.time() - t0:.1f}s)')
  ar_rate = models[0]['throughput_tok_per_sec_total'] if decoders[0].kind == 'ar' else None
  for m in models:
    m['speedup_vs_ar'] = None if ar_rate is None else m['throughput_tok_per_sec_total'] / ar_rate
  return models, tokens


def _settings(c: _Context, ar, pflm, prefix_file: str, student, penalties: dict) -> dict:
  """results.json "settings": config.reproduce plus what the run resolved from it."""
  r, d = c.config.reproduce, c.config.data
  return {**r.to_dict(), 'prefix_file': prefix_file, 'out': c.out, 'ar': ar,
          'pflm': pflm, 'evaluator': r.evaluator or None, 'tokenizer': d.tokenizer,
          'tokenizer_path': d.tokenizer_path, 'ks': list(r.ks) if student else [],
          'max_new_tokens': c.max_new, 'bos_id': c.tokenizer.bos_id if r.prepend_bos else None,
          'prompt_len': c.prompt_len, 'total_len': c.prompt_len + c.max_new,
          'pflm_k_max': student.k if student else None,
          'freq_penalty': {str(k): v for k, v in penalties.items()},
          'ar_temperature': 1.0, 'student_tau': 1.0, 'eos_stop': False,
          'total_samples': len(c.prompts.ids) * r.n_per_prefix}


def _context(config, prefix_file: str, out: str, log) -> _Context:
  """Tokenizer, prompts and lengths of a run (before any model loads)."""
  r = config.reproduce
  tokenizer = data.load_tokenizer(config)
  prompts = make_prompts(load_prefixes(prefix_file), tokenizer, prefix_tokens=r.prefix_tokens,
                         prepend_bos=r.prepend_bos, max_prefixes=r.max_prefixes)
  log(f'{len(prompts.ids)} prefixes of {r.prefix_tokens} tokens (+ BOS: {r.prepend_bos}); '
      f'dropped {prompts.dropped_short} of {prompts.num_lines} shorter than {r.prefix_tokens} '
      'tokens')
  max_new = r.max_new_tokens or config.decode.gen_len - prompts.ids.shape[1]
  if max_new < 4:
    raise ValueError(f'max_new_tokens={max_new}: generate at least 4 tokens (distinct-4 needs '
                     'one 4-gram per sample).')
  first = jax.local_devices()[0]
  return _Context(config, tokenizer, prompts, max_new,
                  f'{first.device_kind} ({first.platform})', out)


def _timed_log():
  start = time.time()
  return lambda msg: progress.log(
      f'[reproduce {progress.format_duration(time.time() - start)}] {msg}')


def run(config, *, prefix_file: str, out: str, ar: str | None = None, pflm: str | None = None,
        log=None, mode: str | None = None) -> dict:
  """Decode, time and score every model; write OUTDIR (process 0). Returns results.json's
  content plus, under "tokens", each model's (total_samples, total length) token array.
  `mode` overrides config.decode.mode (lossless: the student rows draft for the AR model)."""
  if 'reproduce' not in config:
    raise ValueError('this config has no `reproduce` block (the protocol settings): use '
                     'configs/lm1b_ar.py or configs/owt_ar.py, or a config built on them.')
  config = evaluate.with_mode(config, mode)
  lossless_mode = config.decode.mode == 'lossless'
  r, log = config.reproduce, log or _timed_log()
  check_settings(config, ar, pflm)
  c = _context(config, prefix_file, out, log)
  layout = sharding.single_device_layout()
  ar_export, student, evaluator = load_models(r, ar, pflm, layout, c.tokenizer, c.prompt_len,
                                              lossless_mode)
  penalties = (freq_penalties(config, tuple(r.ks), tuple(r.freq_penalty))
               if student and not lossless_mode else {})
  gen_len = c.prompt_len + c.max_new
  decoders = [decode.decoder(ar_export, layout, gen_len=gen_len)] if ar_export else []
  if lossless_mode:  # the AR model at temperature 1, the student drafting at tau 1
    decoders += [evaluate.lossless_decoder(ar_export, student, gen_len=gen_len,
                                           temperature=1.0, k=k) for k in r.ks]
  decoders += [decode.decoder(student, layout, gen_len=gen_len, k=k, penalty=penalties[k])
               for k in penalties]
  models, tokens = _decode_all(c, decoders, evaluator, log)
  results = {
      'task': r.task, 'device': c.device, 'jax_version': jax.__version__,
      'models': models,
      'prefixes': {'in_file': c.prompts.num_lines, 'dropped_short': c.prompts.dropped_short,
                   'used': int(len(c.prompts.ids))},
      'evaluator': {'dir': r.evaluator or ar, 'is_the_ar_model': evaluator is ar_export},
      'settings': dict(_settings(c, ar, pflm, prefix_file, student, penalties),
                       mode=config.decode.mode)}
  if progress.is_main_process():
    progress.write_json(epath.Path(out) / 'results.json', results)
  log(f'evaluator: {results["evaluator"]["dir"]}'
      + (' (the --ar model)' if results['evaluator']['is_the_ar_model'] else ''))
  log('\n' + format_table(results))
  return dict(results, tokens=tokens)
