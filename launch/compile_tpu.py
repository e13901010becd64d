"""Ahead-of-time compilation of a config's programs for a named TPU topology, from a CPU machine.

  .venv-tpu/bin/python -m launch.compile_tpu --config=configs/owt_ar.py --topology=v5p-8 \
      --output=runs/compile_tpu/owt_v5p-8.json

Needs jax[tpu] (libtpu; `make compile-tpu` builds .venv-tpu) but no TPU: the abstract devices of
the topology (jax.experimental.topologies) and the real TPU compiler; nothing runs, no parameters
or data exist. `--topology=cpu` compiles for this machine's CPU devices instead (e.g. the train
steps' memory for one sequence: `--config.train.batch_size=1 --config.distill.batch_size=1`).

Programs, from the builders the runs use: the teacher step (teacher.train_program), one step per
distillation stage (distill.stage_program), and the AR / k-token decode loops (decode.generate_ar
/ generate_pflm traced under the mesh rules, at decode.gen_len and the largest eval batch). Per
program: XLA's per-device memory (roofline.memory_of; peak = arguments + outputs - donated +
temporaries + generated code) against the device's HBM - exit status 1 when any does not fit -
and FLOPs. Then a decode-speed MODEL, not a measurement: one compiled decode step per batch
(roofline.xla_step_cost), step time = max(flops / peak, bytes / bandwidth) from the chip's
published peaks (with --topology=cpu: this CPU's, measured by roofline.py).
"""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
from absl import flags

from kforcing_jax import cli, decode, distill, models, progress, roofline, sharding, teacher
from kforcing_jax import timing

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
                              'TPU slice to compile for; "cpu" = this machine\'s CPU devices.')
_OUTPUT = flags.DEFINE_string('output', None, 'JSON report path.')
_HBM_GIB = flags.DEFINE_float('hbm_gib', None, 'Override the usable memory per device (GiB).')
_MEMORY = flags.DEFINE_bool('memory', True, 'Compile the train steps and decode loops and check '
                            'their memory (--nomemory: only the speed model).')
_SPEED = flags.DEFINE_bool('speed', True, 'Compile the single decode steps and predict speed.')
_MEASURED = flags.DEFINE_string('measured_speed', None, 'A benchmarks/decode_speed.py JSON to '
                                'put side by side with the prediction (same device only).')


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


def target_figures(topology: str, hbm_bytes: float | None) -> dict:
  """Usable memory per device and the speed model's peaks (None: measured on this CPU)."""
  if topology == 'cpu':
    return {'hbm_bytes': hbm_bytes or float(os.sysconf('SC_PAGE_SIZE') *
                                            os.sysconf('SC_PHYS_PAGES')),
            'peak_flops': None, 'bytes_per_s': None,
            'source': 'measured in-process by roofline.measure_peak_flops / measure_bandwidth'}
  t = TARGETS[topology]
  return {'hbm_bytes': hbm_bytes or t.hbm_bytes, 'peak_flops': t.peak_bf16_flops,
          'bytes_per_s': t.hbm_bytes_per_s, 'source': t.source}


# ----------------------------------------------------------------------------- programs

def compile_entry(name: str, lower, microbatches: int = 1, loop: bool = False, **shape) -> dict:
  """Compiles `lower()`; its memory and FLOPs per device. cost_analysis counts a scan / while
  body once: the train steps' FLOPs are multiplied by the microbatch count (the optimizer
  update outside the scan, under 1% of a step, is then over-counted); a decode loop's FLOPs
  are one iteration's."""
  t0 = time.perf_counter()
  compiled = lower().compile()
  seconds = time.perf_counter() - t0
  progress.log(f'  compiled {name} in {seconds:.0f}s')
  flops = roofline.flops_of(compiled)
  return dict(name=name, compile_seconds=round(seconds, 1), memory=roofline.memory_of(compiled),
              flops_per_device=flops if loop else flops * microbatches,
              flops_note='one loop iteration' if loop else 'whole step',
              microbatches=microbatches, **shape)


def train_programs(config, layout: sharding.Layout) -> list[dict]:
  """The teacher step and every distillation stage's step, compiled on the layout."""
  tc, dc = config.train, config.distill
  programs = [compile_entry('teacher_step', teacher.train_program(config, layout).lower,
                            tc.microbatches, batch=tc.batch_size, seq_len=config.data.seq_len)]
  prev_k = None
  for k, _ in distill.validate_schedule(dc.stages):
    program = distill.stage_program(config, layout, k, prev_k)
    programs.append(compile_entry(f'distill_k{k}_step', program.lower, dc.microbatches,
                                  batch=dc.batch_size, seq_len=distill.stage_seq_len(config),
                                  k=k))
    prev_k = k
  return programs


def decoders(config) -> list[tuple[str, str, int, models.FunctionalModel]]:
  """(name, kind, k, model): the AR teacher (k = 1) and every stage's student."""
  out = [('ar', 'ar', 1, models.teacher(config))]
  return out + [(f'pflm_k{k}', 'pflm', k, models.student(config, k))
                for k, _ in distill.validate_schedule(config.distill.stages)]


def decode_programs(config, layout: sharding.Layout) -> list[dict]:
  """AR and every stage's k-token decode loop at the largest eval batch, batch-sharded."""
  gen_len = config.decode.gen_len
  batch = max(int(b) for b in config.eval.batch_sizes)
  prompts = jax.ShapeDtypeStruct((batch, config.decode.prefix_len), jnp.int32,
                                 sharding=layout.batch(2))
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=sharding.replicated(layout.mesh))
  programs = []
  for name, kind, k, model in decoders(config):
    params = layout.abstract_params(model)

    def lower(model=model, kind=kind, k=k, params=params):
      # traced under the rules, so the loops' sharding constraints (batch-sharded activations
      # and caches) apply on this mesh
      with sharding.use_mesh_rules(layout.mesh, layout.rules):
        if kind == 'ar':
          return decode.generate_ar.lower(model, params, prompts, key, gen_len=gen_len)
        return decode.generate_pflm.lower(model, params, prompts, key, gen_len=gen_len, k=k,
                                          freq_penalty=decode.freq_penalty(config, k))

    programs.append(compile_entry(f'decode_{name}', lower, loop=True, batch=batch,
                                  gen_len=gen_len, kind=kind, k=k))
  return programs


# ----------------------------------------------------------------------------- speed model

def speed_model(config, device, peak_flops: float, bytes_per_s: float) -> dict:
  """Predicted tokens/s per (decoder, batch) on one device, and each student's speed-up."""
  gen_len, prefix_len = config.decode.gen_len, config.decode.prefix_len
  rows = {}
  for name, kind, k, model in decoders(config):
    steps = timing.decode_steps(prefix_len, gen_len, k)
    penalty = decode.freq_penalty(config, k) if kind == 'pflm' else 0.0
    rows[name] = []
    for batch in [int(b) for b in config.eval.batch_sizes]:
      t0 = time.perf_counter()
      cost = roofline.xla_step_cost(model, k, batch, gen_len, freq_penalty=penalty,
                                    device=device)
      compute_s, memory_s = cost['flops'] / peak_flops, cost['bytes'] / bytes_per_s
      step_s = max(compute_s, memory_s)
      rows[name].append(dict(batch=batch, decode_steps=steps, step_flops=cost['flops'],
                             step_bytes=cost['bytes'], step_seconds=step_s,
                             bound='compute' if compute_s >= memory_s else 'memory',
                             tokens_per_s=batch * (gen_len - prefix_len) / (steps * step_s)))
      progress.log(f'  decode step {name} B={batch}: {cost["flops"] / 1e9:.2f} GFLOP, '
                   f'{cost["bytes"] / 1e6:.1f} MB -> {rows[name][-1]["tokens_per_s"]:,.0f} '
                   f'tok/s ({rows[name][-1]["bound"]}-bound; compiled in '
                   f'{time.perf_counter() - t0:.0f}s)')
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


def print_speed(model: dict, side_by_side: dict | None):
  print('predicted decode speed-up vs AR (a roofline MODEL, not a measurement):')
  for name, row in model['predicted_speedup_vs_ar'].items():
    print(f'  {name:>8s} ' + '  '.join(f'B={b}: {s:.2f}x' for b, s in row.items()))
  for name, row in (side_by_side or {}).items():
    print(f'  {name:>8s} predicted/measured ' + '  '.join(
        f'B={b}: {v["predicted"]:.2f}/{v["measured"]:.2f}' for b, v in row.items()))


def run(config, topology: str, hbm_bytes: float | None = None, memory: bool = True,
        speed: bool = True) -> dict:
  """Compile every program of `config` for `topology`; returns the report (see module doc)."""
  devices = target_devices(topology)
  target = target_figures(topology, hbm_bytes)
  layout = sharding.layout_from_config(config, devices)
  mesh = dict(layout.mesh.shape)
  progress.log(f'[compile_tpu] {topology}: {len(devices)} devices ({devices[0].device_kind}), '
               f'mesh {mesh}, {target["hbm_bytes"] / GIB:.2f} GiB per device')
  programs = train_programs(config, layout) + decode_programs(config, layout) if memory else []
  fits = fit_check(programs, target['hbm_bytes'])
  report = {'topology': topology, 'device_kind': devices[0].device_kind,
            'num_devices': len(devices), 'mesh': mesh,
            'compiled_for': 'TPU (libtpu ahead-of-time)' if topology != 'cpu' else 'CPU',
            'hbm_bytes_per_device': target['hbm_bytes'], 'chip_figures': target['source'],
            'model': config.model.to_dict(), 'programs': programs, 'all_fit': fits}
  if speed:
    peak, bandwidth = target['peak_flops'], target['bytes_per_s']
    if topology == 'cpu':
      peak = roofline.measure_peak_flops(config.model.dtype)['flops_per_s']
      bandwidth = roofline.measure_bandwidth()['bytes_per_s']
    report['decode_speed_model'] = speed_model(config, devices[0], peak, bandwidth)
  return report


def main(argv):
  del argv
  cli.start()
  hbm = _HBM_GIB.value * GIB if _HBM_GIB.value else None
  report = run(cli.CONFIG.value, _TOPOLOGY.value, hbm, _MEMORY.value, _SPEED.value)
  print_table(report['programs'], report['hbm_bytes_per_device'], report['num_devices'])
  if 'decode_speed_model' in report:
    if _MEASURED.value:
      measured = progress.read_json(_MEASURED.value)
      if measured is None:
        raise FileNotFoundError(f'--measured_speed={_MEASURED.value} does not exist.')
      report['predicted_vs_measured'] = measured_side_by_side(report['decode_speed_model'],
                                                              measured)
    print_speed(report['decode_speed_model'], report.get('predicted_vs_measured'))
  if _OUTPUT.value:
    progress.write_json(_OUTPUT.value, report)
    print(f'-> {_OUTPUT.value}')
  if not report['all_fit']:
    print('error: ' + ', '.join(p['name'] for p in report['programs'] if not p['fits'])
          + ' do not fit the per-device memory', flush=True)
    raise SystemExit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)
