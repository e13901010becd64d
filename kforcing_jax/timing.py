"""Wall-clock timing of jitted work: the device's name, the best of a few runs, the interleaved
decode-speed protocol of `evaluate` and the per-batch protocol of `reproduce`.

Every timed call ends with `jax.block_until_ready`, so the time covers the device's work, and
runs only after a compile + warm-up call of the same shapes.

measure_throughput: for each batch size, every decoder is compiled and warmed up once, then
`repeats` rounds time each decoder in turn (AR, k1, k2, ... - interleaved, so a slow spell of
the machine hits all of them), and the median round is reported. tokens_per_s counts
generated tokens, batch * (gen_len - prefix_len); forwards_per_token = decode steps / generated
tokens (AR 1; k tokens per step: ceil(new / k) / new), prefill excluded.
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import progress


def device_name() -> str:
  """'<kind> (<platform>) x<count>' of the devices this process sees, e.g. 'cpu (cpu) x1'."""
  dev = jax.devices()[0]
  return f'{dev.device_kind} ({dev.platform}) x{jax.device_count()}'


def seconds(fn, *args):
  """(seconds, result) of one call of fn(*args), waiting until its device work is done."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0, out


def best_seconds(fn, *args, repeats: int) -> float:
  """The fastest of `repeats` timed calls of fn(*args), after one untimed compile + warm-up."""
  jax.block_until_ready(fn(*args))
  return min((seconds(fn, *args)[0] for _ in range(repeats)), default=math.inf)


def decode_steps(prefix_len: int, gen_len: int, k: int) -> int:
  """Forward passes after prefill: one per token for AR (k = 1), one per k tokens for PFLM."""
  return math.ceil((gen_len - prefix_len) / max(k, 1))


def measure_throughput(decoders, prompts, key, batch_sizes, repeats: int, prefix_len: int,
                       gen_len: int) -> dict:
  """{decoder name: [one row per batch size]}: 'batch', 'tokens_per_s', 'forwards_per_token',
  'seconds' (the median round), 'seconds_all', 'decode_steps' (see the module doc).

  decoders: decode.Decoder-like (name, k, called as decoder(prompts, key)). Speed prompts are
  `prompts` tiled to each batch size, the same for every decoder."""
  new_tokens = gen_len - prefix_len
  out = {d.name: [] for d in decoders}
  for batch in batch_sizes:
    batch_prompts = jnp.asarray(np.resize(prompts, (batch, prefix_len)).astype(np.int32))
    t0 = time.perf_counter()
    for d in decoders:
      jax.block_until_ready(d(batch_prompts, key))
    progress.log(f'[timing] batch {batch}: compiled + warmed up {len(decoders)} decoders in '
                 f'{time.perf_counter() - t0:.1f}s')
    times = {d.name: [] for d in decoders}
    for r in range(repeats):
      for d in decoders:
        times[d.name].append(seconds(d, batch_prompts, key)[0])
      progress.log(f'[timing] batch {batch} round {r + 1}/{repeats}: ' + '  '.join(
          f'{d.name} {batch * new_tokens / times[d.name][-1]:.0f} tok/s' for d in decoders))
    for d in decoders:
      median = float(np.median(times[d.name]))
      steps = decode_steps(prefix_len, gen_len, d.k)
      out[d.name].append({'batch': int(batch), 'tokens_per_s': batch * new_tokens / median,
                          'forwards_per_token': steps / new_tokens, 'seconds': median,
                          'seconds_all': times[d.name], 'decode_steps': steps})
  return out


def with_speedup(rows: list[dict], ar_rows: list[dict]) -> list[dict]:
  """measure_throughput rows of one decoder with its speed-up over the AR teacher's row of
  the same batch (timed in the same interleaved rounds)."""
  ar = {r['batch']: r for r in ar_rows}
  return [dict(batch=r['batch'], tokens_per_s=r['tokens_per_s'], seconds=r['seconds'],
               seconds_all=r['seconds_all'],
               speedup_vs_ar=r['tokens_per_s'] / ar[r['batch']]['tokens_per_s'])
          for r in rows]


def time_batches(decode_fn, rows: np.ndarray, batch_size: int, key, n_warmup: int):
  """Run `decode_fn(prompts, key)` over every batch of `rows`; batch b uses fold_in(key, b).

  Returns (tokens (rows, total length), per-batch seconds). The n_warmup untimed runs decode
  batch 0 and are thrown away."""
  batches = [jax.device_put(rows[s:s + batch_size]) for s in range(0, len(rows), batch_size)]
  keys = [jax.random.fold_in(key, b) for b in range(len(batches))]
  for _ in range(n_warmup):
    jax.block_until_ready(decode_fn(batches[0], keys[0]))
  outputs, per_batch = [], []
  for prompts, batch_key in zip(batches, keys):
    took, out = seconds(decode_fn, prompts, batch_key)
    per_batch.append(took)
    outputs.append(out)
  return np.concatenate([np.asarray(o) for o in outputs]), per_batch


def speed_table_rows(result: dict, k_name: str) -> list[dict]:
  """The speed table of a measure_throughput result ({'throughput': {name: rows}}): one row
  per batch with tokens/s of AR and `k_name`, speed-up, step-time ratio, forwards per token."""
  rows = []
  for ar, st in zip(result['throughput']['ar'], result['throughput'][k_name]):
    rows.append({'batch': ar['batch'], 'ar_tokens_per_s': ar['tokens_per_s'],
                 'k_tokens_per_s': st['tokens_per_s'],
                 'speedup_vs_ar': st['tokens_per_s'] / ar['tokens_per_s'],
                 'step_time_ratio_vs_ar': (st['seconds'] / st['decode_steps'])
                 / (ar['seconds'] / ar['decode_steps']),
                 'ar_forwards_per_token': ar['forwards_per_token'],
                 'k_forwards_per_token': st['forwards_per_token']})
  return rows
