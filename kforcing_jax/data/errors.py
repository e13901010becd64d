"""Errors a user can cause by pointing the data config at data that is not there."""


class DatasetMissingError(FileNotFoundError):
  """A dataset (or its manual files) is not where the config says; the message says how to fix."""
