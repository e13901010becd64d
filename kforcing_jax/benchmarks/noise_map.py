"""How finely a k=1 student resolves its teacher's noise -> token map (library: resolution.py).

For held-out windows of a run (its teacher/ and student_k1/), u sweeps U evenly spaced points of
[0, 1) (midpoints); at each the AR teacher's token (inverse CDF in the model's order) and the
student's (its readout) are computed for every window at once. Per window: the agreement over the
sweep (the student's acc_1 for that context, integrated over u instead of sampled), the number of
distinct tokens and of constant runs ("segments") along u, for the teacher and the student, the
teacher's entropy, and the most agreement any map with the student's number of distinct tokens
could reach there (the teacher's mass on its that-many likeliest tokens: a student that knows
only S tokens of a context agrees at most that often). Rows are grouped by the teacher's entropy
(agreement.ENTROPY_EDGES). A plot shows the two maps for a few example windows: for every u,
where the teacher's and the student's tokens lie in the teacher's CDF (the midpoint of the
token's interval: the teacher's own map is a fine staircase on the diagonal).

  python -m kforcing_jax.benchmarks.noise_map --config=configs/shakespeare_tiny.py \
      --workdir=runs/paper_recipe --label=demo --output=results/distill_study/noise_map.json

--arm=NAME takes the config overrides of that arm of config.study (configs/distill_study.py).
Each call adds (or replaces) its label in the JSON, then writes the table (.md) and the plot
(.png) of every label in it.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from kforcing_jax import progress
from kforcing_jax.resolution import markdown, plot, sweep
from kforcing_jax.study import finished_k1_run

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/shakespeare_tiny.py', 'run config')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/paper_recipe', 'a run with teacher/ and student_k1/')
_ARM = flags.DEFINE_string('arm', '', 'apply this config.study arm\'s overrides (and --seed)')
_SEED = flags.DEFINE_integer('seed', 0, 'the seed set with --arm')
_LABEL = flags.DEFINE_string('label', 'demo', 'the row name in the output')
_POINTS = flags.DEFINE_integer('points', 256, 'u values in the sweep')
_BATCHES = flags.DEFINE_integer('batches', 2, 'held-out batches of distill.batch_size rows')
_OUTPUT = flags.DEFINE_string('output', 'results/distill_study/noise_map.json', 'JSON path')


def main(_):
  try:
    config = finished_k1_run(_CONFIG.value, _WORKDIR.value, _ARM.value, _SEED.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  results = {}
  if os.path.exists(_OUTPUT.value):
    with open(_OUTPUT.value) as f:
      results = json.load(f)
  progress.log(f'[noise_map] {_LABEL.value}: {_WORKDIR.value}, {_POINTS.value} u points')
  results[_LABEL.value] = sweep(config, _WORKDIR.value, _POINTS.value, _BATCHES.value)
  o = results[_LABEL.value]['overall']
  progress.log(f'[noise_map] {_LABEL.value}: agreement {o["agreement"]:.3f}, segments teacher '
               f'{o["teacher_segments"]:.1f} / student {o["student_segments"]:.1f}')
  with open(_OUTPUT.value, 'w') as f:
    json.dump(results, f, indent=1)
  stem = os.path.splitext(_OUTPUT.value)[0]
  with open(stem + '.md', 'w') as f:
    f.write(markdown(results))
  plot(results, stem + '.png')
  progress.log(f'[noise_map] wrote {_OUTPUT.value}, {stem}.md, {stem}.png')


if __name__ == '__main__':
  app.run(main)
