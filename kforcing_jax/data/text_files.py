"""TFDS builder `text_files`: the documents of any folder of `*.txt` / `*.jsonl` files.

`config.data.name = 'text_files'` reads `config.data.manual_dir` (local or gs://), searched
recursively in sorted path order:
  * `*.txt`   one document per file, UTF-8.
  * `*.jsonl` one document per line, a JSON object with a "text" field.
Empty documents are skipped. A document's key is its path relative to the folder (plus
`:<line>` for jsonl, 0-based). OpenWebText is one such folder (configs/owt_ar.py): the original
release once extracted (`tar xf openwebtext.tar.xz`, then `tar xJf` every
`openwebtext/urlsf_subset*.xz` into the folder), or a jsonl export of the Hugging Face
`Skylion007/openwebtext` dataset. `data.name = 'owt'` is an alias for `text_files`.

Splits: every document gets a pseudo-random rank, the CRC32 of its key; the lowest-ranked 5%
(at least one document) are `validation`, the next 5% (at least one) `test`, the rest
`train`. So any folder of three or more documents has three non-empty splits, a document's
split depends on its key alone (not on file order, machine or build), and the held-out
documents are spread over the whole folder. Adding documents may move a few near the 5% cut
points; a built dataset never changes, though: to pick up new files, delete
`<data_dir>/text_files` and prepare again. The folder the dataset was built from is stored in
its metadata, and `prepare` refuses a config that points the same data_dir at another folder.
Long single files (a whole book in one .txt) are one document each: split such a file into
chapters or paragraphs (several .txt files, or one .jsonl line each) to get held-out text.
"""

import json
import os
import zlib
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from kforcing_jax.data.errors import DatasetMissingError
from kforcing_jax.data.local_builder import LocalBuilder

SUFFIXES = ('.txt', '.jsonl')
SPLITS = ('train', 'validation', 'test')
HELDOUT_FRACTION = 0.05  # of the documents, for validation and again for test
MIN_DOCUMENTS = 3  # one per split


def find_manual_files(manual_dir: str | os.PathLike) -> list[epath.Path]:
  """Every *.txt and *.jsonl file under `manual_dir`, in sorted path order ([] if no folder)."""
  root = epath.Path(manual_dir)
  if not str(manual_dir) or not root.is_dir():
    return []
  return sorted(epath.Path(folder) / name for folder, _, names in root.walk()
                for name in names if name.endswith(SUFFIXES))


def missing_files_message(manual_dir: str | os.PathLike) -> str:
  """One line: what is wrong with config.data.manual_dir, and the flag that fixes it."""
  fix = ('Fix: pass --config.data.manual_dir=/path/to/folder holding *.txt files (one document '
         'each) and/or *.jsonl files (one {"text": ...} document per line).')
  if not str(manual_dir):
    return f'config.data.manual_dir is not set; text_files reads its documents from it. {fix}'
  if not epath.Path(manual_dir).is_dir():
    return f'config.data.manual_dir={str(manual_dir)!r} is not a folder. {fix}'
  return f'config.data.manual_dir={str(manual_dir)!r} holds no *.txt or *.jsonl files. {fix}'


def folder_id(manual_dir: str | os.PathLike) -> str:
  """The folder as stored in the dataset's metadata: absolute, or the URI as given."""
  return str(manual_dir) if '://' in str(manual_dir) else os.path.realpath(manual_dir)


def key_rank(key: str) -> int:
  return zlib.crc32(key.encode('utf-8'))


def cut_points(ranks: Sequence[int]) -> tuple[int, int]:
  """(v, t): ranks below v are validation, below t test, the rest train (module docstring)."""
  heldout = max(1, round(len(ranks) * HELDOUT_FRACTION))
  ordered = np.sort(np.asarray(ranks, np.int64))
  return int(ordered[heldout]), int(ordered[2 * heldout])


def split_of_rank(rank: int, cuts: tuple[int, int]) -> str:
  return 'validation' if rank < cuts[0] else 'test' if rank < cuts[1] else 'train'


def iter_documents(root: str | os.PathLike,
                   files: list[epath.Path]) -> Iterator[tuple[str, str]]:
  """(key, text) for every non-empty document in `files`. A file that is not UTF-8 text is an
  error naming it and the byte offset (and, for jsonl, the line): documents are never decoded
  with replacement characters, which would train the tokenizer and the model on them silently."""
  root = epath.Path(root)
  for path in files:
    yield from _file_documents(path, path.relative_to(root).as_posix())


def _not_utf8(path, error: UnicodeDecodeError, offset: int = 0, line: int | None = None):
  where = f'line {line}, ' if line is not None else ''
  return ValueError(f'{path} is not UTF-8 text ({error.reason} at {where}byte '
                    f'{offset + error.start}): convert it to UTF-8 or move it out of '
                    'data.manual_dir.')


def _file_documents(path: epath.Path, relative: str) -> Iterator[tuple[str, str]]:
  if path.suffix == '.txt':
    try:
      text = path.read_bytes().decode('utf-8')
    except UnicodeDecodeError as e:
      raise _not_utf8(path, e) from None
    # the newlines text-mode reading gives (what datasets built before this read)
    text = text.replace('\r\n', '\n').replace('\r', '\n').strip()
    if text:
      yield relative, text
    return
  # jsonl files can be large (an OpenWebText export is one file): read them line by line
  offset = 0
  with path.open('rb') as lines:
    for number, raw in enumerate(lines):
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise _not_utf8(path, e, offset, number + 1) from None
      offset += len(raw)
      if line.strip():
        text = _jsonl_text(line, path, number)
        if text:
          yield f'{relative}:{number}', text


def _jsonl_text(line: str, path, number: int) -> str:
  """The stripped "text" of one jsonl line; a line that has none is an error naming it."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} line {number + 1} is not JSON ({e.msg}); expected one object per '
                     'line like {"text": "..."}.') from None
  if not isinstance(record, dict) or not isinstance(record.get('text'), str):
    raise ValueError(f'{path} line {number + 1} has no "text" string; expected one object per '
                     'line like {"text": "..."}.')
  return record['text'].strip()


class TextFiles(LocalBuilder):
  """Documents from the *.txt / *.jsonl files in manual_dir; train, validation and test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Documents from *.txt / *.jsonl files in manual_dir; 5% + 5% '
                            'held out by the CRC32 rank of their keys.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = epath.Path(dl_manager.manual_dir)
    files = find_manual_files(root)
    if not files:
      raise DatasetMissingError(missing_files_message(root))
    ranks = [key_rank(key) for key, _ in iter_documents(root, files)]
    if len(ranks) < MIN_DOCUMENTS:
      raise DatasetMissingError(
          f'config.data.manual_dir={str(root)!r} holds {len(ranks)} non-empty documents; '
          f'text_files needs at least {MIN_DOCUMENTS} (train, validation and test get one each). '
          f'Fix: add documents, or split a long file into several (see '
          f'kforcing_jax/data/text_files.py).')
    cuts = cut_points(ranks)
    self.info.metadata.update(manual_dir=folder_id(root), documents=len(ranks),
                              validation_below=cuts[0], test_below=cuts[1])
    return {split: self._generate_examples(root, files, cuts, split) for split in SPLITS}

  def _generate_examples(self, root: epath.Path, files: list[epath.Path], cuts: tuple[int, int],
                         split: str):
    for key, text in iter_documents(root, files):
      if split_of_rank(key_rank(key), cuts) == split:
        yield key, {'text': text}
