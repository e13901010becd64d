"""Prepare a config's data: `python -m kforcing_jax.main.prepare_data --config=configs/<name>.py`.

Builds the dataset, trains or checks the tokenizer, packs the splits (each skipped when done)
and prints a summary. On a pod, process 0 prepares while the others wait."""

from kforcing_jax import cli, data, distributed, progress


def prepare(config, workdir: str) -> None:
  del workdir  # data lives in config.data.data_dir
  summary = distributed.main_process_first('prepare data', lambda: data.prepare(config))
  progress.log(data.format_summary(summary))


if __name__ == '__main__':
  cli.main(prepare)
