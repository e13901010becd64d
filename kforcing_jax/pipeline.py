"""The main job (`make demo`): prepare data -> train teacher -> distill 1 -> 2 -> 4 -> evaluate.

Every stage is skipped when its outputs exist, and each resumes from its newest checkpoint,
so re-running the command continues where it stopped.
"""

import os
import time

from absl import flags

from kforcing_jax import cli, data, distill, distributed, evaluate, progress, train



def banner(text: str) -> None:
  if progress.is_main_process():
    print(f'\n=== {text} ===', flush=True)


def run(config, workdir: str) -> None:
  t0 = time.time()
  banner('1/4 prepare data')
  distributed.main_process_first('prepare data', lambda: data.prepare(config))
  banner('2/4 train the AR teacher')
  if os.path.exists(os.path.join(workdir, 'teacher', 'eval.json')):
    if progress.is_main_process():
      print('teacher already trained; skipping', flush=True)
  else:
    train.run(config, workdir)
  banner('3/4 distill ' + ' -> '.join(f'k={k}' for k, _ in config.distill.stages))
  distill.run(config, workdir)
  banner('4/4 evaluate')
  evaluate.run(config, workdir)
  banner(f'done in {progress.format_duration(time.time() - t0)}: see {workdir}/report/REPORT.md')


def main(argv):
  del argv
  cli.quiet_libraries()
  distributed.initialize()
  run(cli.CONFIG.value, cli.WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)
