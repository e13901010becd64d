"""Which way of turning a noise into a token lets a distributional student agree with its
teacher (library: kforcing_jax/coupling.py).

For a run whose stage k=1 student reads out a distribution (model.readout=inverse_cdf), on
held-out whole rows: KL both ways and TV between the AR teacher's and the student's next-token
distributions, and how often the two pick the same token for the same noise under the id-order
inverse CDF, the sorted one and the Gumbel-max coupling, with the maximal coupling's 1 - TV;
windows inside the stage's trained length and beyond it reported apart.

  python -m kforcing_jax.benchmarks.coupling --config=configs/distill_study.py \
      --arm=k1_invcdf_gumbel --seed=0 --workdir=results/distill_study/runs/k1_invcdf_gumbel/seed0 \
      --label=k1_invcdf_gumbel_seed0 --output=results/distill_study/coupling.json

Each call adds (or replaces) its label in the JSON and rewrites the table (.md) from all labels.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from kforcing_jax import coupling, progress
from kforcing_jax.study import finished_k1_run

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/distill_study.py', 'run config')
_WORKDIR = flags.DEFINE_string('workdir', None, 'a run with teacher/ and student_k1/')
_ARM = flags.DEFINE_string('arm', '', 'apply this config.study arm\'s overrides (and --seed)')
_SEED = flags.DEFINE_integer('seed', 0, 'the seed set with --arm')
_LABEL = flags.DEFINE_string('label', None, 'the row name in the output')
_BATCHES = flags.DEFINE_integer('batches', 2, 'held-out batches of distill.batch_size rows')
_NOISES = flags.DEFINE_integer('noises', 64, 'noises per window for the Gumbel-max estimate')
_SPLIT_AT = flags.DEFINE_integer('split_at', 0, 'report windows before / from this position apart '
                                 '(0: the stage\'s trained length, distill.seq_len)')
_OUTPUT = flags.DEFINE_string('output', 'results/distill_study/coupling.json', 'JSON path')
flags.mark_flags_as_required(['workdir', 'label'])


def main(_):
  try:
    config = finished_k1_run(_CONFIG.value, _WORKDIR.value, _ARM.value, _SEED.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if config.model.get('readout', 'argmax') != 'inverse_cdf':
    raise app.UsageError('--config/--arm: the student must read out a distribution '
                         '(model.readout=inverse_cdf).')
  results = {}
  if os.path.exists(_OUTPUT.value):
    with open(_OUTPUT.value) as f:
      results = json.load(f)
  progress.log(f'[coupling] {_LABEL.value}: {_WORKDIR.value}')
  results[_LABEL.value] = coupling.measure(config, _WORKDIR.value, _BATCHES.value, _NOISES.value,
                                             _SPLIT_AT.value or None)
  for part in ('trained', 'beyond'):
    m = results[_LABEL.value].get(part)
    if m:
      progress.log(f'[coupling] {_LABEL.value} {part}: KL {m["kl_teacher_student"]:.3f}, TV '
                   f'{m["tv"]:.3f}; agreement id {m["id"]:.3f}, sorted {m["sorted"]:.3f}, '
                   f'gumbel {m["gumbel"]:.3f}, maximal {m["maximal"]:.3f}')
  with open(_OUTPUT.value, 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.splitext(_OUTPUT.value)[0] + '.md', 'w') as f:
    f.write(coupling.markdown(results))
  progress.log(f'[coupling] wrote {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
