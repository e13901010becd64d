"""Prepares a config's data: `python -m kforcing_jax.prepare_data --config=configs/<name>.py`.

Downloads/builds the dataset, trains or checks the tokenizer, packs the splits (all skipped
when already done) and prints a summary: works, documents, tokens and rows per split. Started
on every host of a pod, process 0 prepares and the others wait, then find it done.
"""

from absl import app

from kforcing_jax import cli, data, distributed, progress


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.quiet_libraries()
  distributed.initialize()
  summary = distributed.main_process_first('prepare data',
                                           lambda: data.prepare(cli.CONFIG.value))
  if progress.is_main_process():
    print(data.format_summary(summary))


if __name__ == '__main__':
  cli.run(main)
