"""The model-size sweep (`make sizes`): the pipeline at every size of config.sizes, one shared
independent evaluator, then one table and one plot (kforcing_jax/sizes.py says what is in them).

  python -m kforcing_jax.main.sizes --config=configs/sizes.py --workdir=runs/demo \
      --output=results/sizes

1. the data and the run's independent evaluator (<workdir>/evaluator/: with configs/sizes.py the
   demo's, so `make demo` and the sweep score with the same model; skipped when done);
2. per size, in <workdir>/sizes/<name>/ (rundir.size_workdir): the teacher, the distillation
   stages and evaluate's report, each skipped when done and resumed when stopped, so rerunning
   the command continues where it stopped;
3. <output>/sizes.json (every row), <output>/<name>.json (each size's results.json, as written),
   SIZES.md and sizes.png.
--sizes=small,large runs a subset (the table then holds those).
"""

import os
import shutil
import time

from absl import flags

from kforcing_jax import cli, data, distill, distributed, evaluate, progress, rundir, sizes
from kforcing_jax import teacher

_OUTPUT = flags.DEFINE_string('output', 'results/sizes', 'Output directory.')
_SIZES = flags.DEFINE_list('sizes', [], 'Sizes to run (default: all of config.sizes.names).')


def run(config, workdir: str) -> None:
  t0 = time.time()
  names = sizes.names(config, _SIZES.value)
  distributed.main_process_first('prepare data', lambda: data.prepare(config))
  progress.log('\n=== sizes: the shared independent evaluator ===')
  evaluate.train_evaluator(config, workdir)
  evaluator = config.eval.evaluator_workdir or rundir.evaluator_workdir(workdir)
  for i, name in enumerate(names):
    sized = sizes.size_config(config, name, evaluator)
    directory = rundir.size_workdir(workdir, name)
    params = sizes.parameter_counts(sized)
    progress.log(f'\n=== size {i + 1}/{len(names)}: {name} ({params["all"]:,} parameters, '
                 f'{params["non_vocab"]:,} outside embedding + head) -> {directory} ===')
    teacher.run(sized, directory)
    distill.run(sized, directory)
    evaluate.run(sized, directory, config_name=f'{cli.config_file()} size {name}')
  # per-model wall times are in each row (teacher, stages); a resumed sweep's own duration
  # would not be the pipelines' cost, so it is only logged
  result = sizes.collect(config, workdir, names)
  if progress.is_main_process():
    output = _OUTPUT.value
    progress.write_json(os.path.join(output, 'sizes.json'), result)
    for name in names:
      shutil.copyfile(os.path.join(rundir.report_dir(rundir.size_workdir(workdir, name)),
                                   'results.json'), os.path.join(output, f'{name}.json'))
    with open(os.path.join(output, 'SIZES.md'), 'w') as f:
      f.write(sizes.markdown(result))
    sizes.plot(os.path.join(output, 'sizes.png'), result)
  progress.log(f'[sizes] {progress.format_duration(time.time() - t0)} -> {_OUTPUT.value}/'
               'sizes.json, SIZES.md, sizes.png')


if __name__ == '__main__':
  cli.main(run, lock_workdir=True)
