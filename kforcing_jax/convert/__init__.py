"""Importers for the K-Forcing authors' released PyTorch checkpoints (METHOD.md s.6).

`python -m kforcing_jax.convert --src=FILE.ckpt|FILE.safetensors --dst=DIR` writes a run
directory (see `run_dir`) that our train / distill / evaluate / generate CLIs load like one
they trained. Modules: `reader` (files -> arrays), `layout` (documented keys and shapes),
`validate` (strict checks), `mapping` (PyTorch layouts -> ours), `run_dir` (what is written),
`importer` (one conversion), `synthetic` (random checkpoints in the authors' format).
"""

from kforcing_jax.convert.errors import (ConversionError, DestinationError, InvFreqMismatchError,
                                         KindMismatchError, MissingKeysError, ShapeMismatchError,
                                         UnexpectedKeysError)
from kforcing_jax.convert.importer import convert_checkpoint

__all__ = ['ConversionError', 'DestinationError', 'InvFreqMismatchError', 'KindMismatchError',
           'MissingKeysError', 'ShapeMismatchError', 'UnexpectedKeysError', 'convert_checkpoint']
