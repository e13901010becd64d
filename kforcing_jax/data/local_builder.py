"""The base of this project's TFDS builders (code that lives in this package, no TensorFlow)."""

import sys

import tensorflow_datasets as tfds
from etils import epath


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A GeneratorBasedBuilder whose `code_path` is its own module's file.

  TFDS's default `code_path` needs `importlib_resources`, which tensorflow-datasets 4.9.10
  imports but does not install; the module file is the answer it would compute."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(sys.modules[cls.__module__].__file__)
