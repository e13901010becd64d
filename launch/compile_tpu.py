"""Ahead-of-time compilation of a config's programs for a named TPU topology, from a CPU machine.

  .venv-tpu/bin/python -m launch.compile_tpu --config=configs/owt_ar.py --topology=v5p-8 \
      --output=runs/compile_tpu/owt_v5p-8.json

Needs jax[tpu] (libtpu) installed - `make compile-tpu` builds .venv-tpu for it - but no TPU:
`jax.experimental.topologies.get_topology_desc` gives abstract devices of the topology, and
every program is lowered from ShapeDtypeStructs carrying NamedShardings and compiled by the
real TPU compiler. Nothing runs; no parameters or data exist.

Programs, built with the same functions the real runs use:
  * the teacher train step (train_state.make_train_step + train.lm_loss, train.microbatches);
  * one distillation step per stage of config.distill.stages (distill.distill_loss; teacher =
    the AR model for k = 1, else the previous stage's student; distill.microbatches);
  * the decode loops (decode.generate_ar / generate_pflm - the loop bodies that
    decode.sharded_decoder jits - traced under the mesh rules, at decode.gen_len and the
    largest of eval.batch_sizes, with batch-sharded prompts and rule-sharded parameters);
  * one decode STEP (roofline.xla_step_cost: decode.ar_step / pflm_step) per batch size in
    eval.batch_sizes on ONE device, for the speed model.

Per program it prints XLA's per-device memory analysis and compares the peak with the
device's HBM; the exit status is 1 when any program does not fit. Peak per device =
arguments + outputs - aliased (donated) outputs + temporaries + generated code: XLA's own
buffer assignment, an upper bound of what the program holds at once.

The decode-speed figures are a MODEL, not a measurement: each compiled step's own
cost_analysis() (FLOPs, bytes accessed) against the chip's published peak bf16 FLOP/s and HBM
bandwidth, step time = max(flops / peak, bytes / bandwidth) (roofline.py), prefill and host
overheads ignored. `--topology=cpu` applies the same method to this machine's CPU (peak and
bandwidth measured by roofline.py) so it can be checked against measured decode speed.
"""

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
from absl import flags

from kforcing_jax import cli, decode, distill, roofline, sharding, train, train_state

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Target:
  """A TPU slice: how libtpu names its topology, usable HBM per device, published chip peaks."""
  topology_name: str
  chip_config_name: str
  hbm_bytes: float            # usable per device, as libtpu 0.0.42.1 reports it on this machine
  peak_bf16_flops: float      # per device (a v4/v5p megacore device is one whole chip)
  hbm_bytes_per_s: float
  source: str
  chips_per_host_bounds: tuple[int, int, int] | None = None


# Published per-chip figures (Cloud TPU system-architecture pages, "peak compute per chip
# (bf16)" and "HBM bandwidth"): https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e
TARGETS = {
    'v4-8': Target('v4:2x2x1', 'megacore', 30.75 * GIB, 275e12, 1200e9,
                   'cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 1200 GB/s HBM2'),
    'v5e-16': Target('v5e:4x4', 'default', 15.75 * GIB, 197e12, 819e9,
                     'cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 819 GB/s HBM2',
                     chips_per_host_bounds=(2, 2, 1)),
    'v5p-8': Target('v5:2x2x1', 'megacore', 95.74 * GIB, 459e12, 2765e9,
                    'cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 2765 GB/s HBM2e'),
    'v6e-8': Target('v6e:2x4', 'default', 31.25 * GIB, 918e12, 1640e9,
                    'cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 1640 GB/s HBM'),
}

_TOPOLOGY = flags.DEFINE_enum('topology', 'v5p-8', sorted(TARGETS) + ['cpu'],
                              'TPU slice to compile for; "cpu" = this machine\'s CPU devices '
                              '(tests, and the check of the speed model against measurement).')
_OUTPUT = flags.DEFINE_string('output', None, 'JSON report path.')
_HBM_GIB = flags.DEFINE_float('hbm_gib', None, 'Override the usable memory per device (GiB).')
_MEMORY = flags.DEFINE_bool('memory', True, 'Compile the train steps and decode loops and check '
                            'their memory (--nomemory: only the speed model).')
_SPEED = flags.DEFINE_bool('speed', True, 'Compile the single decode steps and predict speed.')
_MEASURED = flags.DEFINE_string('measured_speed', None, 'A benchmarks/decode_speed.py JSON to '
                                'put side by side with the prediction (same device only).')


# ----------------------------------------------------------------------------- devices

def target_devices(name: str):
  """The abstract devices of a named TPU slice (needs libtpu), or the local CPU devices."""
  if name == 'cpu':
    return jax.devices('cpu')
  from jax.experimental import topologies  # noqa: PLC0415 - only the TPU path needs it
  t = TARGETS[name]
  kwargs = {'chip_config_name': t.chip_config_name, 'num_slices': 1}
  if t.chips_per_host_bounds:
    kwargs['chips_per_host_bounds'] = t.chips_per_host_bounds
  return topologies.get_topology_desc(t.topology_name, 'tpu', **kwargs).devices


def cpu_target(hbm_bytes: float) -> dict:
  """The speed model's figures for this CPU, measured by roofline.py in the compute dtype."""
  return {'hbm_bytes': hbm_bytes, 'peak_flops': None, 'bytes_per_s': None,
          'source': 'measured in-process by roofline.measure_peak_flops / measure_bandwidth'}


# ----------------------------------------------------------------------------- programs

def memory_of(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {name: int(getattr(m, f'{name}_size_in_bytes')) for name in
         ('argument', 'output', 'alias', 'temp', 'generated_code')}
  out['peak'] = (out['argument'] + out['output'] - out['alias'] + out['temp']
                 + out['generated_code'])
  return out


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0))


def abstract(shapes, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


def compile_program(name: str, lower, log) -> tuple:
  t0 = time.perf_counter()
  compiled = lower().compile()
  seconds = time.perf_counter() - t0
  log(f'  compiled {name} in {seconds:.0f}s')
  return compiled, seconds


def train_programs(config, mesh, rules, log) -> list[dict]:
  """The teacher step and every distillation stage's step, compiled on the mesh."""
  def batch_of(shapes):
    return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(
        mesh, len(shape), rules)) for key, (shape, dtype) in shapes.items()}

  programs = []
  tc = config.train
  n = config.data.seq_len
  ar = train.teacher_model(config)
  opt = train_state.make_optimizer(tc, tc.steps)
  state = train_state.abstract_train_state(ar, opt, mesh, rules)
  batch = batch_of({'tokens': ((tc.batch_size, n), jnp.int32),
                    'mask': ((tc.batch_size, n), jnp.float32)})
  step = train_state.make_train_step(
      lambda p, b: train.lm_loss(ar, p, b), opt, state,
      jax.tree.map(lambda x: x.sharding, batch), mesh, rules,
      microbatches=tc.microbatches, weight_key='tokens')
  compiled, seconds = compile_program('teacher step', lambda: step.lower(state, batch), log)
  programs.append(program_entry('teacher_step', compiled, seconds, batch=tc.batch_size,
                                seq_len=n, microbatches=tc.microbatches))

  dc = config.distill
  n = dc.seq_len or config.data.seq_len
  prev_k = None
  for k, _ in distill.validate_schedule(dc.stages):
    student = distill.student_model(config, k)
    teacher = ar if prev_k is None else distill.student_model(config, prev_k)
    opt = train_state.make_optimizer(dc, 10)
    state = train_state.abstract_train_state(student, opt, mesh, rules)
    b = dc.batch_size
    batch = batch_of({'tokens': ((b, n), jnp.int32), 'mask': ((b, n), jnp.float32),
                      'u': ((b, n, k), jnp.float32), 'tau': ((b,), jnp.float32),
                      'r': ((b, n, k), jnp.float32)})
    t_sh = train_state.param_shardings(teacher, mesh, rules)
    uses_data = dc.data_weight > 0
    ar_sh = train_state.param_shardings(ar, mesh, rules) if uses_data else None
    ar_abstract = abstract(ar.param_shapes, ar_sh) if uses_data else None
    step = train_state.make_train_step(
        lambda p, x, tp, ap, s=student, t=teacher: distill.distill_loss(s, t, dc, p, x, tp,
                                                                        (ar, ap)),
        opt, state, jax.tree.map(lambda x: x.sharding, batch), mesh, rules,
        extra_args_shardings=(t_sh, ar_sh), microbatches=dc.microbatches, weight_key='windows')
    t_abstract = abstract(teacher.param_shapes, t_sh)
    compiled, seconds = compile_program(
        f'distill k={k} step', lambda: step.lower(state, batch, t_abstract, ar_abstract), log)
    programs.append(program_entry(f'distill_k{k}_step', compiled, seconds, batch=b, seq_len=n,
                                  microbatches=dc.microbatches, k=k))
    prev_k = k
  return programs


def decode_programs(config, mesh, rules, log) -> list[dict]:
  """AR and every stage's k-token decode loop at the largest eval batch, batch-sharded."""
  gen_len, prefix_len = config.decode.gen_len, config.decode.prefix_len
  batch = max(int(b) for b in config.eval.batch_sizes)
  rows = sharding.batch_sharding(mesh, 2, rules)
  replicated = sharding.replicated(mesh)
  prompts = jax.ShapeDtypeStruct((batch, prefix_len), jnp.int32, sharding=rows)
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=replicated)
  models = [('ar', 0, train.teacher_model(config))]
  models += [(f'pflm_k{k}', k, distill.student_model(config, k))
             for k, _ in distill.validate_schedule(config.distill.stages)]
  programs = []
  for name, k, model in models:
    params = abstract(model.param_shapes, train_state.param_shardings(model, mesh, rules))

    def lower(model=model, k=k, params=params):
      # traced under the rules, so the loops' sharding constraints (batch-sharded activations
      # and caches) apply on this mesh
      with sharding.use_mesh_rules(mesh, rules):
        if k == 0:
          return decode.generate_ar.lower(model, params, prompts, key, gen_len=gen_len)
        return decode.generate_pflm.lower(
            model, params, prompts, key, gen_len=gen_len, k=k,
            freq_penalty=float(config.decode.freq_penalty.get(str(k), 0.0)))

    compiled, seconds = compile_program(f'decode {name} B={batch}', lower, log)
    programs.append(program_entry(f'decode_{name}', compiled, seconds, batch=batch,
                                  gen_len=gen_len, k=k, loop=True))
  return programs


def program_entry(name, compiled, seconds, microbatches=1, loop=False, **shape) -> dict:
  """Memory and FLOPs per device. cost_analysis counts a scan / while body once: the train
  steps' FLOPs are multiplied by the microbatch count (the optimizer update outside the scan,
  under 1% of a step, is then over-counted); a decode loop's FLOPs are one iteration's."""
  flops = flops_of(compiled)
  return dict(name=name, compile_seconds=round(seconds, 1), memory=memory_of(compiled),
              flops_per_device=flops if loop else flops * microbatches,
              flops_note='one loop iteration' if loop else 'whole step',
              microbatches=microbatches, **shape)


# ----------------------------------------------------------------------------- speed model

def speed_model(config, device, peak_flops: float, bytes_per_s: float, log) -> dict:
  """Predicted tokens/s per (decoder, batch) on one device, and each student's speed-up."""
  gen_len, prefix_len = config.decode.gen_len, config.decode.prefix_len
  new_tokens = gen_len - prefix_len
  batches = [int(b) for b in config.eval.batch_sizes]
  decoders = [('ar', 0, train.teacher_model(config))]
  decoders += [(f'pflm_k{k}', k, distill.student_model(config, k))
               for k, _ in distill.validate_schedule(config.distill.stages)]
  rows = {}
  for name, k, model in decoders:
    rows[name] = []
    steps = roofline.decode_steps(prefix_len, gen_len, k)
    penalty = float(config.decode.freq_penalty.get(str(k), 0.0)) if k else 0.0
    for batch in batches:
      t0 = time.perf_counter()
      cost = roofline.xla_step_cost(model, k, batch, gen_len, freq_penalty=penalty,
                                    device=device)
      compute_s, memory_s = cost['flops'] / peak_flops, cost['bytes'] / bytes_per_s
      step_s = max(compute_s, memory_s)
      rows[name].append(dict(batch=batch, decode_steps=steps, step_flops=cost['flops'],
                             step_bytes=cost['bytes'], step_seconds=step_s,
                             bound='compute' if compute_s >= memory_s else 'memory',
                             tokens_per_s=batch * new_tokens / (steps * step_s)))
      log(f'  decode step {name} B={batch}: {cost["flops"] / 1e9:.2f} GFLOP, '
          f'{cost["bytes"] / 1e6:.1f} MB -> {rows[name][-1]["tokens_per_s"]:,.0f} tok/s '
          f'({rows[name][-1]["bound"]}-bound; compiled in {time.perf_counter() - t0:.0f}s)')
  ar_rate = {r['batch']: r['tokens_per_s'] for r in rows['ar']}
  speedup = {name: {str(r['batch']): r['tokens_per_s'] / ar_rate[r['batch']] for r in rs}
             for name, rs in rows.items() if name != 'ar'}
  return {'what': 'a roofline MODEL, not a measurement: per decode step max(flops / peak, '
                  'bytes accessed / bandwidth) from the compiled step\'s cost_analysis, one '
                  'device, prefill and host overheads ignored',
          'peak_flops_per_s': peak_flops, 'bytes_per_s': bytes_per_s,
          'prefix_len': prefix_len, 'gen_len': gen_len, 'per_decoder': rows,
          'predicted_speedup_vs_ar': speedup}


def measured_side_by_side(model: dict, measured: dict) -> dict:
  """Predicted vs measured speed-up per (student, batch) from a decode_speed.py result."""
  out = {}
  for name, predicted in model['predicted_speedup_vs_ar'].items():
    got = measured['speedup_vs_ar'].get(name, {})
    out[name] = {b: {'predicted': s, 'measured': got.get(b)} for b, s in predicted.items()
                 if b in got}
  return out


# ----------------------------------------------------------------------------- report

def fit_check(programs: list[dict], hbm_bytes: float) -> bool:
  """Marks every program fits yes/no against `hbm_bytes` per device; True when all fit."""
  for p in programs:
    p['fits'] = p['memory']['peak'] <= hbm_bytes
  return all(p['fits'] for p in programs)


def print_table(programs: list[dict], hbm_bytes: float, num_devices: int):
  print(f'{"program":<20s} {"batch":>5s} {"micro":>5s} {"arg GiB":>8s} {"out GiB":>8s} '
        f'{"temp GiB":>8s} {"peak GiB":>8s} {"HBM GiB":>8s} {"fits":>4s} {"TFLOP/dev":>10s} '
        f'{"TFLOP all":>10s}')
  for p in programs:
    m = p['memory']
    print(f'{p["name"]:<20s} {p["batch"]:>5d} {p["microbatches"]:>5d} '
          f'{m["argument"] / GIB:>8.2f} {m["output"] / GIB:>8.2f} {m["temp"] / GIB:>8.2f} '
          f'{m["peak"] / GIB:>8.2f} {hbm_bytes / GIB:>8.2f} {"yes" if p["fits"] else "NO":>4s} '
          f'{p["flops_per_device"] / 1e12:>10.3f} '
          f'{p["flops_per_device"] * num_devices / 1e12:>10.2f}'
          + ('  (one loop iteration)' if p['flops_note'] != 'whole step' else ''))
  print('peak = arguments + outputs - donated (aliased) outputs + temporaries + generated code, '
        'per device, from XLA\'s memory_analysis()', flush=True)


def log_line(message: str):
  print(message, flush=True)


def run(config, topology: str, hbm_bytes: float | None = None, memory: bool = True,
        speed: bool = True, log=log_line) -> dict:
  """Compile every program of `config` for `topology`; returns the report (see module doc)."""
  devices = target_devices(topology)
  if topology == 'cpu':
    target = cpu_target(hbm_bytes or float(os.sysconf('SC_PAGE_SIZE') *
                                           os.sysconf('SC_PHYS_PAGES')))
  else:
    t = TARGETS[topology]
    target = {'hbm_bytes': hbm_bytes or t.hbm_bytes, 'peak_flops': t.peak_bf16_flops,
              'bytes_per_s': t.hbm_bytes_per_s, 'source': t.source}
  mesh = sharding.make_mesh(tuple(config.mesh_shape), devices)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  log(f'[compile_tpu] {topology}: {len(devices)} devices ({devices[0].device_kind}), mesh '
      f'{dict(mesh.shape)}, {target["hbm_bytes"] / GIB:.2f} GiB per device')
  programs = []
  if memory:
    programs = (train_programs(config, mesh, rules, log)
                + decode_programs(config, mesh, rules, log))
  fits = fit_check(programs, target['hbm_bytes'])
  report = {'topology': topology, 'device_kind': devices[0].device_kind,
            'num_devices': len(devices), 'mesh': dict(mesh.shape),
            'compiled_for': 'TPU (libtpu ahead-of-time)' if topology != 'cpu' else 'CPU',
            'hbm_bytes_per_device': target['hbm_bytes'], 'chip_figures': target['source'],
            'model': config.model.to_dict(), 'programs': programs, 'all_fit': fits}
  if speed:
    peak, bandwidth = target['peak_flops'], target['bytes_per_s']
    if topology == 'cpu':
      peak = roofline.measure_peak_flops(config.model.dtype)['flops_per_s']
      bandwidth = roofline.measure_bandwidth()['bytes_per_s']
    report['decode_speed_model'] = speed_model(config, devices[0], peak, bandwidth, log)
  return report


def main(argv):
  del argv
  cli.quiet_libraries()
  config = cli.CONFIG.value
  hbm = _HBM_GIB.value * GIB if _HBM_GIB.value else None
  report = run(config, _TOPOLOGY.value, hbm, _MEMORY.value, _SPEED.value)
  print_table(report['programs'], report['hbm_bytes_per_device'], report['num_devices'])
  if 'decode_speed_model' in report:
    model = report['decode_speed_model']
    print('predicted decode speed-up vs AR (a roofline MODEL, not a measurement):')
    for name, row in model['predicted_speedup_vs_ar'].items():
      print(f'  {name:>8s} ' + '  '.join(f'B={b}: {s:.2f}x' for b, s in row.items()))
    if _MEASURED.value:
      with open(_MEASURED.value) as f:
        report['predicted_vs_measured'] = measured_side_by_side(model, json.load(f))
      for name, row in report['predicted_vs_measured'].items():
        print(f'  {name:>8s} predicted/measured ' + '  '.join(
            f'B={b}: {v["predicted"]:.2f}/{v["measured"]:.2f}' for b, v in row.items()))
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'-> {_OUTPUT.value}')
  if not report['all_fit']:
    print('error: ' + ', '.join(p['name'] for p in report['programs'] if not p['fits'])
          + ' do not fit the per-device memory', flush=True)
    raise SystemExit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)
