"""Named conversion errors. All are ValueErrors, so `cli.run` prints them as one line."""


class ConversionError(ValueError):
  """A checkpoint (or destination) that this converter refuses, with the reason."""


class MissingKeysError(ConversionError):
  """Tensors the layout needs are absent (the authors' loader would leave them at init)."""


class UnexpectedKeysError(ConversionError):
  """Tensors the layout does not know (they would be silently dropped)."""


class ShapeMismatchError(ConversionError):
  """A tensor's shape disagrees with the dimensions inferred from the others."""


class InvFreqMismatchError(ConversionError):
  """The stored RoPE frequencies are not our base-10000 rotate-half frequencies."""


class KindMismatchError(ConversionError):
  """--kind says ar/pflm but the noise-encoder tensors say otherwise."""


class DestinationError(ConversionError):
  """The destination already holds something this conversion would overwrite or contradict."""


def name_keys(keys, limit: int = 20) -> str:
  """'a, b, c' for error messages, cut after `limit` names (with the total)."""
  keys = sorted(keys)
  shown = ', '.join(keys[:limit])
  return shown if len(keys) <= limit else f'{shown}, ... ({len(keys)} in all)'
