"""Prepares a config's data: `python -m kforcing_jax.prepare_data --config=configs/<name>.py`.

Downloads/builds the dataset, trains or checks the tokenizer, packs the splits (all skipped
when already done) and prints a summary: works, documents, tokens and rows per split.
"""

from absl import app

from kforcing_jax import cli, data


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.quiet_libraries()
  print(data.format_summary(data.prepare(cli.CONFIG.value)))


if __name__ == '__main__':
  cli.run(main)
