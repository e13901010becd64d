"""The main job (`make demo`): prepare data -> train the teacher -> distill 1 -> 2 -> 4 ->
train the independent evaluator -> evaluate.
`python -m kforcing_jax.main.pipeline --config=configs/<name>.py --workdir=DIR`.

Every part skips itself when its outputs exist and resumes from its newest checkpoint
otherwise, so re-running the command continues where it stopped. A stage whose teacher (or
previous stage) has changed since it was distilled is stale: distill sets it aside and rebuilds
it, which makes every later stage stale in turn, and evaluate then redoes a report whose models
changed (kforcing_jax/rundir.py, `stage_provenance`)."""

import time

from kforcing_jax import cli, data, distill, distributed, evaluate, progress, rundir, teacher


def pipeline(config, workdir: str, config_name: str | None = None) -> None:
  t0 = time.time()
  progress.log('\n=== 1/5 prepare data ===')
  distributed.main_process_first('prepare data', lambda: data.prepare(config))
  progress.log('\n=== 2/5 train the AR teacher ===')
  teacher.run(config, workdir)
  progress.log('\n=== 3/5 distill ' + ' -> '.join(f'k={k}' for k, _ in config.distill.stages)
               + ' ===')
  distill.run(config, workdir)
  progress.log('\n=== 4/5 train the independent evaluator ===')
  evaluate.train_evaluator(config, workdir)
  progress.log('\n=== 5/5 evaluate ===')
  evaluate.run(config, workdir, config_name=config_name)
  progress.log(f'\n=== done in {progress.format_duration(time.time() - t0)}: see '
               f'{rundir.report_dir(workdir)}/REPORT.md ===')


if __name__ == '__main__':
  cli.main(pipeline, lock_workdir=True, config_name=cli.config_file)
