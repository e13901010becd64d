"""TFDS builder `openwebtext_manual`: OpenWebText from files the user downloaded.

OpenWebText cannot be fetched here, so the builder reads `config.data.manual_dir`, which may
hold (searched recursively, in sorted path order):
  * `*.txt`   one document per file, UTF-8. This is what the original release gives once
              extracted: `tar xf openwebtext.tar.xz`, then `tar xJf` every
              `openwebtext/urlsf_subset*.xz` into manual_dir.
  * `*.jsonl` one document per line, a JSON object with a "text" field (e.g. an export of the
              Hugging Face `Skylion007/openwebtext` dataset).
A document's key is its relative path (plus `:<line>` for jsonl). About 1% of the documents,
those whose CRC32(key) % 100 == 0, form the `validation` split, the rest `train`; the split is a
function of the key alone, so adding files never moves an old document between splits.
Empty documents are skipped. Build with
`python -m kforcing_jax.prepare_data --config=configs/owt_ar.py --config.data.manual_dir=DIR`.
"""

import json
import os
import zlib
from pathlib import Path
from typing import Iterator

import tensorflow_datasets as tfds
from etils import epath

from kforcing_jax.data.errors import DatasetMissingError

VALIDATION_PERCENT = 1
PATTERNS = ('*.txt', '*.jsonl')


def find_manual_files(manual_dir: str | os.PathLike) -> list[Path]:
  root = Path(manual_dir)
  return sorted(path for pattern in PATTERNS for path in root.rglob(pattern))


def missing_files_message(manual_dir: str | os.PathLike) -> str:
  return (
      f'No OpenWebText files (*.txt, one document each, or *.jsonl with a "text" field) in '
      f'manual_dir={str(manual_dir)!r}. Fix: put the downloaded files there (see '
      f'kforcing_jax/data/owt.py for the format) and run `python -m kforcing_jax.prepare_data '
      f'--config=configs/owt_ar.py --config.data.manual_dir=<that folder>`.')


def split_of_key(key: str) -> str:
  return 'validation' if zlib.crc32(key.encode('utf-8')) % 100 < VALIDATION_PERCENT else 'train'


def iter_documents(root: str | os.PathLike, files: list[Path]) -> Iterator[tuple[str, str]]:
  """(key, text) for every non-empty document in `files`."""
  for path in files:
    relative = path.relative_to(root).as_posix()
    if path.suffix == '.txt':
      text = path.read_text(encoding='utf-8').strip()
      if text:
        yield relative, text
      continue
    with path.open(encoding='utf-8') as lines:
      for number, line in enumerate(lines):
        if line.strip():
          text = json.loads(line)['text'].strip()
          if text:
            yield f'{relative}:{number}', text


class OpenwebtextManual(tfds.core.GeneratorBasedBuilder):
  """OpenWebText documents from manual_dir; train and a hashed ~1% validation split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Documents from *.txt / *.jsonl files in manual_dir.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  # TFDS's default `code_path` needs `importlib_resources`, which tensorflow-datasets 4.9.10
  # imports but does not install; this module's file is the answer it would compute.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        homepage='https://skylion007.github.io/OpenWebTextCorpus/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = Path(dl_manager.manual_dir)
    files = find_manual_files(root)
    if not files:
      raise DatasetMissingError(missing_files_message(root))
    return {split: self._generate_examples(root, files, split) for split in ('train', 'validation')}

  def _generate_examples(self, root: Path, files: list[Path], split: str):
    for key, text in iter_documents(root, files):
      if split_of_key(key) == split:
        yield key, {'text': text}
