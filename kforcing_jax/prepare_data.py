"""Prepares a config's data: `python -m kforcing_jax.prepare_data --config=configs/<name>.py`.

Downloads/builds the dataset, trains or checks the tokenizer, packs the splits (all skipped
when already done) and prints a summary: works, documents, tokens and rows per split.
"""

from absl import app
from ml_collections import config_flags

from kforcing_jax import data

_CONFIG = config_flags.DEFINE_config_file('config', lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    summary = data.prepare(_CONFIG.value)
  except FileNotFoundError as error:  # missing dataset or vocabulary: the message says the fix
    raise SystemExit(f'error: {error}') from error
  print(data.format_summary(summary))


if __name__ == '__main__':
  app.run(main)
