"""A roofline model of one decode step: AR (1 token per forward) vs k-token PFLM steps.

Per-step cost, two independent counts:
  * analytic (`analytic_step_cost`, used for the prediction): matmul FLOPs of every slot through
    every layer (a k-token step's token slots only to their K/V in the last layer), attention
    over the whole preallocated cache, the output head per logit row,
    the noise encoder per hint; bytes = every weight once + the KV cache read + new K/V, logits
    and penalty counts written and read. Exactly affine in the batch B (weights are read once
    per step, everything else scales with B), so `affine_cost` fits it from B = 1 and 2.
  * XLA (`xla_step_cost`): `jax.jit(step).lower(...).compile().cost_analysis()` of ONE decode
    step, the body of decode.generate_ar / generate_pflm rebuilt here from decode's own building
    blocks - not of the whole generate function, because XLA's cost analysis counts a
    while_loop body once. Its FLOPs agree with the analytic count within ~15% (it also counts
    elementwise work; the analytic count also holds the noise encoder's amortised share); its bytes sum the operands and results of every unfused op, an
    upper bound on memory traffic (tests compare the two).

The device side is measured in-process: peak matmul FLOP/s (a large square matmul in the
model's compute dtype) and memory bandwidth (the faster of a large reduction and a large
elementwise copy). A step then takes max(flops / peak, bytes / bandwidth), and the predicted
speed-up of a k-token student over the AR teacher at batch B is
    steps_ar * t_ar(B) / (steps_k * t_k(B)),
with steps = ceil(new tokens / k) (k = 1 for AR). In the memory-bound regime (small B: the weights
dominate the bytes and both steps read them once) t_k ~ t_ar and the speed-up approaches k;
in the compute-bound regime the k-token step processes 2k slots (k tokens + k hints) to emit
k tokens, so per token it costs ~2x the AR step (less the shared output-head work) and the
speed-up falls below 1. METHOD.md s.5.

`analyse` puts it together for evaluate: device peaks, each decoder's step costs, predicted vs
measured speed-ups per batch and the crossover batch. `memory_of` / `flops_of` read a compiled
program's memory and cost analysis (the one peak-memory formula; launch/compile_tpu.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import decode, progress, sampling
from kforcing_jax.models import FunctionalModel
from kforcing_jax.timing import best_seconds, decode_steps


# ----------------------------------------------------------------------------- compiled programs

def _cost_dict(compiled) -> dict:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def flops_of(compiled) -> float:
  """FLOPs of a compiled program by XLA's cost analysis (a while_loop body counted once)."""
  return float(_cost_dict(compiled).get('flops', 0.0))


def memory_of(compiled) -> dict:
  """XLA's per-device memory analysis in bytes, plus the one peak formula: arguments + outputs
  - aliased (donated) outputs + temporaries + generated code (an upper bound of what the
  program holds at once)."""
  m = compiled.memory_analysis()
  out = {name: int(getattr(m, f'{name}_size_in_bytes')) for name in
         ('argument', 'output', 'alias', 'temp', 'generated_code')}
  out['peak'] = (out['argument'] + out['output'] - out['alias'] + out['temp']
                 + out['generated_code'])
  return out


# ----------------------------------------------------------------------------- device

def measure_peak_flops(dtype='float32', size: int | None = None, repeats: int = 5) -> dict:
  """FLOP/s of one large (size x size) @ (size x size) matmul in `dtype`, best of `repeats`."""
  size = size or (2048 if jax.devices()[0].platform == 'cpu' else 8192)
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (size, size), jnp.float32).astype(dtype)
  seconds = best_seconds(jax.jit(jnp.matmul), a, b, repeats=repeats)
  return {'flops_per_s': 2 * size ** 3 / seconds, 'matmul_size': size, 'dtype': str(dtype)}


def measure_bandwidth(num_bytes: int | None = None, repeats: int = 5) -> dict:
  """Bytes/s of a float32 reduction (reads N) and of an elementwise scale (reads + writes N)."""
  num_bytes = num_bytes or (256 << 20 if jax.devices()[0].platform == 'cpu' else 2 << 30)
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  reduce_s = best_seconds(jax.jit(jnp.sum), x, repeats=repeats)
  copy_s = best_seconds(jax.jit(lambda v: v * 1.5), x, repeats=repeats)
  read, copy = num_bytes / reduce_s, 2 * num_bytes / copy_s
  return {'bytes_per_s': max(read, copy), 'reduce_bytes_per_s': read, 'copy_bytes_per_s': copy,
          'array_bytes': num_bytes}


def measure_read_bandwidth(num_bytes: int, total_bytes: int = 1 << 31, repeats: int = 3) -> float:
  """Bytes/s at which a one-row matmul reads a float32 (512, N) weight matrix of `num_bytes`
  (a jitted loop of them, ~total_bytes in all, fastest of `repeats`): what a batch-1 decode
  step gets reading its weights from wherever weights that size live - caches for a small
  model, main memory for a large one. A matrix-vector product, not a reduction: XLA:CPU runs
  the dot on every core and a plain reduction on one (here 100-155 vs 45-55 GB/s from the
  caches). Each product feeds the next, so XLA cannot hoist the read out of the loop."""
  rows = 512
  w = jnp.ones((rows, max(128, num_bytes // (4 * rows))), jnp.float32)
  passes = max(2, total_bytes // w.nbytes)

  @jax.jit
  def read(x, w):
    return jax.lax.fori_loop(0, passes, lambda i, x: x + 1e-9 * (x @ w)[:, :rows], x)

  return passes * w.nbytes / best_seconds(read, jnp.ones((1, rows), jnp.float32), w,
                                          repeats=repeats)


# ----------------------------------------------------------------------------- one step

def _ar_step(model: FunctionalModel, temperature: float):
  """decode.ar_step over explicit parameters: one token in, one token out, cache updated."""
  def step(params, cache, token, pos, u):
    tokens, _, cache = decode.ar_step(model.module(params), cache, token, pos, u, temperature)
    return tokens, cache
  return step


def _pflm_step(model: FunctionalModel, k: int, freq_penalty: float):
  """decode.pflm_step over explicit parameters (hint states are computed before the loop)."""
  def step(params, cache, pending, start, hints, u, counts):
    student = model.module(params)
    return decode.pflm_step(student.backbone, cache, pending, start, hints, u, counts,
                            freq_penalty, jnp.ones(pending.shape, bool), student=student)
  return step


def xla_step_cost(model: FunctionalModel, k: int, batch: int, gen_len: int, *,
                  temperature: float = 1.0, freq_penalty: float = 0.0, device=None) -> dict:
  """{'flops', 'bytes'} of one compiled decode step at `batch`: the AR step for an AR model
  (k = 1), else the k-token step of the student.

  Lowered on abstract shapes only: no parameters or device memory are needed. `device`
  (default: the default backend's) may be an abstract one, e.g. a TPU from
  jax.experimental.topologies, to cost the step for that chip."""
  cfg = model.cfg
  ar = model.kind == 'ar'
  cache_len = gen_len if ar else gen_len + k  # as the decode loops allocate
  cache = jax.eval_shape(lambda: decode.init_cache(cfg, batch, cache_len))
  pos = jax.ShapeDtypeStruct((), jnp.int32)
  if ar:
    step = _ar_step(model, temperature)
    args = (model.param_shapes, cache, jax.ShapeDtypeStruct((batch, 1), jnp.int32), pos,
            jax.ShapeDtypeStruct((batch,), jnp.float32))
  else:
    step = _pflm_step(model, k, freq_penalty)
    args = (model.param_shapes, cache, jax.ShapeDtypeStruct((batch, k), jnp.int32), pos,
            jax.ShapeDtypeStruct((batch, k, cfg.d_model), cfg.compute_dtype),
            jax.ShapeDtypeStruct((batch, k), jnp.float32),
            jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.float32))
  if device is not None:
    place = jax.sharding.SingleDeviceSharding(device)
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place), args)
  cost = _cost_dict(jax.jit(step, donate_argnums=(1,)).lower(*args).compile())
  return {'flops': float(cost.get('flops', 0.0)), 'bytes': float(cost.get('bytes accessed', 0.0))}


def analytic_step_cost(model: FunctionalModel, k: int, batch: int, gen_len: int) -> dict:
  """Hand-counted {'flops', 'bytes'} of one decode step (the AR step for an AR model, else the
  student's k-token step).

  FLOPs: matmuls (2 per multiply-add) of every slot through every layer (the k-token step's
  token slots only to their K/V in the last layer), attention against
  the whole preallocated cache (the decode loops mask, they do not shorten it), the output
  head for every logit row, the noise encoder for every hint (computed before the loop: this
  is its amortised share), the AR sampler's blockwise CDF. Bytes: every weight once
  (float32; the embedding table only for the gathered rows), the K/V cache read, the new K/V
  written, logits written and read back (and the penalty counts for k-token steps).
  The same totals also come split by kind: matmul_flops (weights, head, noise encoder, CDF) +
  attention_flops = flops; weight_bytes + activation_bytes (cache, logits, counts) = bytes.
  """
  cfg = model.cfg
  d, f, v, layers = cfg.d_model, cfg.mlp_ratio * cfg.d_model, cfg.vocab_size, cfg.num_layers
  dkv = cfg.kv_heads * cfg.head_dim  # K/V width: d, or less under grouped-query attention
  act = jnp.dtype(cfg.compute_dtype).itemsize
  ar = model.kind == 'ar'
  if ar:
    slots, new_tokens, rows, hints, cache_len = 1, 1, 1, 0, gen_len
  else:
    slots, new_tokens, rows, hints, cache_len = 2 * k, k, k, k, gen_len + k
  # weight matmuls (projections, MLP, output head, noise encoder) vs attention over the cache;
  # the k-token step's last layer gives its k token slots K/V only (decode.pflm_step): no
  # output projection, MLP or attention for them there
  kv_only = 0 if ar else k
  matmul_row = (layers * slots * (4 * d * (d + dkv) + 4 * d * f) + rows * 2 * d * v
                + hints * 20 * d * d - kv_only * (2 * d * d + 4 * d * f))
  attention_row = (layers * slots - kv_only) * 4 * d * (cache_len + slots)
  feedback = not ar and k > 1 and 'feedback' in model.param_shapes
  if feedback:
    # token feedback (PushForwardLM.slot_readout): row 0's projections (q computed, unused),
    # then pass j = 1..k-1 runs one block over row j (fed a token: a d x d projection)
    # against the cache and rows 0..j
    matmul_row += 2 * d * (d + 2 * dkv) + (k - 1) * (4 * d * (d + dkv) + 4 * d * f + 2 * d * d)
    attention_row += sum(4 * d * (cache_len + j + 1) for j in range(1, k))
  if ar:  # the sampler's blockwise CDF (sampling.normalized_cdf): two matmuls
    blocks = -(-v // sampling.CDF_BLOCK)
    matmul_row += 2 * blocks * sampling.CDF_BLOCK ** 2 + 2 * blocks * blocks
  weights = sum(math.prod(x.shape) for x in jax.tree.leaves(model.param_shapes))
  weights -= v * d  # the embedding table: only the gathered rows are read
  bytes_row = (layers * 2 * dkv * act * (cache_len + new_tokens) + new_tokens * d * 4
               + 2 * rows * v * 4 + (0 if ar else 2 * k * v * 4))
  if feedback:
    # sequential reads: the block's weights once per pass, its projections once more for row
    # 0, the output head once per slot, the last layer's cache once per pass
    weights += ((k - 2) * sum(math.prod(x.shape) for x in jax.tree.leaves(
        {'feedback': model.param_shapes['feedback'], 'in': model.param_shapes['feedback_in']}))
        + d * (d + 2 * dkv) + (k - 1) * (d + 1) * v)
    bytes_row += (k - 1) * 2 * dkv * act * cache_len
  weight_bytes = 4 * weights  # parameters stay float32 (cast to the compute dtype in use)
  return {'flops': float(batch * (matmul_row + attention_row)),
          'bytes': float(weight_bytes + batch * bytes_row),
          # the same totals split by kind of work (speed_model prices each kind apart)
          'matmul_flops': float(batch * matmul_row),
          'attention_flops': float(batch * attention_row),
          'weight_bytes': float(weight_bytes), 'activation_bytes': float(batch * bytes_row)}


def affine_cost(cost_fn, batch_lo: int = 1, batch_hi: int = 2) -> dict:
  """Fit cost(B) = const + per_row * B for flops and bytes from two batch sizes."""
  lo, hi = cost_fn(batch_lo), cost_fn(batch_hi)
  out = {}
  for name in ('flops', 'bytes'):
    per_row = (hi[name] - lo[name]) / (batch_hi - batch_lo)
    out[name] = {'const': lo[name] - per_row * batch_lo, 'per_row': per_row}
  return out


def cost_at(affine: dict, batch: float) -> tuple[float, float]:
  return (affine['flops']['const'] + affine['flops']['per_row'] * batch,
          affine['bytes']['const'] + affine['bytes']['per_row'] * batch)


def step_seconds(affine: dict, batch: float, peak_flops: float, bandwidth: float) -> float:
  flops, nbytes = cost_at(affine, batch)
  return max(flops / peak_flops, nbytes / bandwidth)


def predicted_speedup(ar: dict, student: dict, batch: float, peak_flops: float,
                      bandwidth: float) -> float:
  """ar / student: {'affine': ..., 'steps': int}."""
  t_ar = ar['steps'] * step_seconds(ar['affine'], batch, peak_flops, bandwidth)
  t_k = student['steps'] * step_seconds(student['affine'], batch, peak_flops, bandwidth)
  return t_ar / t_k


def crossover(speedup_at, lo: float = 1.0, hi: float = float(1 << 20)) -> float | None:
  """Smallest batch in [lo, hi] where speedup_at(B) falls from >= 1 to < 1 (log-linear
  interpolation on a fine geometric grid); None when it never crosses there."""
  grid = np.geomspace(lo, hi, 16 * int(math.log2(hi / lo)) + 1)
  values = np.array([speedup_at(b) for b in grid])
  for i in range(len(grid) - 1):
    if values[i] >= 1.0 > values[i + 1]:
      return interpolate_crossing(grid[i], values[i], grid[i + 1], values[i + 1])
  return None


def interpolate_crossing(b0, s0, b1, s1) -> float:
  """Batch where the segment (log b0, s0) -> (log b1, s1) meets speed-up 1."""
  frac = (s0 - 1.0) / (s0 - s1)
  return float(math.exp(math.log(b0) + frac * (math.log(b1) - math.log(b0))))


def measured_crossover(batches, speedups) -> float | None:
  """First crossing of 1 (from above) between measured batch sizes, log-linear; else None."""
  pairs = sorted(zip(batches, speedups))
  for (b0, s0), (b1, s1) in zip(pairs, pairs[1:]):
    if s0 >= 1.0 > s1:
      return interpolate_crossing(b0, s0, b1, s1)
  return None


def compute_bound_from(affine: dict, peak_flops: float, bandwidth: float) -> float | None:
  """The batch from which the step is compute-bound (flops/peak >= bytes/bw); None if never."""
  f0, f1 = affine['flops']['const'] / peak_flops, affine['flops']['per_row'] / peak_flops
  m0, m1 = affine['bytes']['const'] / bandwidth, affine['bytes']['per_row'] / bandwidth
  if f0 >= m0:
    return 0.0 if f1 >= m1 else None
  if f1 <= m1:
    return None
  return (m0 - f0) / (f1 - m1)


def regime(affine: dict, batch: float, peak_flops: float, bandwidth: float) -> str:
  flops, nbytes = cost_at(affine, batch)
  return 'compute' if flops / peak_flops >= nbytes / bandwidth else 'memory'


# ----------------------------------------------------------------------------- analysis

COST_SOURCE = ('analytic per-step FLOPs/bytes (roofline.analytic_step_cost) for the prediction; '
               'the XLA cost_analysis of ONE compiled decode step (not the while_loop, whose '
               'body it counts once) at the largest batch reported beside it as a cross-check')


def _step_costs(decoder, model: FunctionalModel, batch: int, prefix_len: int,
                gen_len: int) -> dict:
  """The analytic affine cost of a decoder's step and XLA's count at `batch` beside it."""
  k = decoder.k
  analytic = affine_cost(lambda b: analytic_step_cost(model, k, b, gen_len), 1, 2)
  settings = ({'temperature': decoder.settings['temperature']} if decoder.kind == 'ar' else
              {'freq_penalty': decoder.settings['freq_penalty']})
  xla = xla_step_cost(model, k, batch, gen_len, **settings)
  flops, nbytes = cost_at(analytic, batch)
  return {'name': decoder.name, 'kind': decoder.kind, 'k': k,
          'steps': decode_steps(prefix_len, gen_len, k), 'analytic': analytic,
          'xla': dict(xla, batch=batch, flops_vs_analytic=xla['flops'] / flops,
                      bytes_vs_analytic=xla['bytes'] / nbytes)}


def _compare(ar: dict, entry: dict, measured: dict, batch_sizes, p: float, bw: float) -> dict:
  """One model's per-batch prediction beside the measurement, its curve and crossovers."""
  def predict(batch):
    return predicted_speedup({'affine': ar['analytic'], 'steps': ar['steps']},
                             {'affine': entry['analytic'], 'steps': entry['steps']}, batch, p, bw)

  rows = measured[entry['name']]
  per_batch = []
  for b in batch_sizes:
    flops, nbytes = cost_at(entry['analytic'], b)
    per_batch.append({
        'batch': int(b), 'flops': flops, 'bytes': nbytes,
        'intensity_flops_per_byte': flops / nbytes,
        'regime': regime(entry['analytic'], b, p, bw),
        'predicted_step_s': step_seconds(entry['analytic'], b, p, bw),
        'measured_step_s': rows[b]['seconds'] / entry['steps'],
        'predicted_speedup_vs_ar': predict(b),
        # one step of this decoder over one AR step: the number that sets the speed-up
        # (speed-up = AR steps / steps / ratio)
        'measured_step_ratio_vs_ar': (rows[b]['seconds'] / entry['steps']) / (
            measured[ar['name']][b]['seconds'] / ar['steps']),
        'predicted_step_ratio_vs_ar': (step_seconds(entry['analytic'], b, p, bw)
                                       / step_seconds(ar['analytic'], b, p, bw))})
  speedups = [rows[b]['tokens_per_s'] / measured[ar['name']][b]['tokens_per_s']
              for b in batch_sizes]
  is_student = entry is not ar
  curve = np.geomspace(min(batch_sizes), max(4 * max(batch_sizes), 2), 33)
  return dict(
      entry, per_batch=per_batch,
      compute_bound_from_batch=compute_bound_from(entry['analytic'], p, bw),
      predicted_curve=[[float(b), predict(b)] for b in curve],
      predicted_crossover_batch=crossover(predict) if is_student else None,
      measured_crossover_batch=(measured_crossover(list(batch_sizes), speedups)
                                if is_student else None),
      predicted_speedup_batch_1=predict(1), predicted_speedup_large_batch=predict(1 << 20))


def analyse(decoders, throughput: dict, batch_sizes, prefix_len: int, gen_len: int,
            dtype: str) -> dict:
  """Per-step costs, device peaks, predicted vs measured speed-ups and their crossovers.

  decoders: [(decode.Decoder, its models.FunctionalModel)], the AR teacher first;
  throughput: timing.measure_throughput's rows of the same decoders at `batch_sizes`."""
  peak = measure_peak_flops(dtype)
  bandwidth = measure_bandwidth()
  p, bw = peak['flops_per_s'], bandwidth['bytes_per_s']
  progress.log(f'[roofline] peak {p / 1e9:.1f} GFLOP/s ({dtype} matmul), bandwidth '
               f'{bw / 1e9:.1f} GB/s')
  largest = max(batch_sizes)
  entries = [_step_costs(d, model, largest, prefix_len, gen_len) for d, model in decoders]
  progress.log(f'[roofline] analytic step costs, and XLA cost analysis of one step at batch '
               f'{largest}')
  measured = {name: {row['batch']: row for row in rows} for name, rows in throughput.items()}
  return {'cost_source': COST_SOURCE, 'peak_flops_per_s': p, 'bandwidth_bytes_per_s': bw,
          'ridge_flops_per_byte': p / bw, 'peak_measurement': peak,
          'bandwidth_measurement': bandwidth,
          'models': [_compare(entries[0], e, measured, batch_sizes, p, bw) for e in entries]}
