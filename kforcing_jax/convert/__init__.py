"""Importers for the K-Forcing authors' released PyTorch checkpoints (METHOD.md s.6).

`python -m kforcing_jax.main.convert --config=configs/lm1b_ar.py --src=FILE.ckpt|.safetensors
--dst=DIR` writes a run directory (see `run_dir`) that our train / distill / evaluate /
generate / reproduce commands load like one they trained; the named config supplies the
vocabulary (checked against the checkpoint), the mask id and the padding. Modules: `reader`
(files -> arrays), `layout` (documented keys and shapes), `validate` (strict checks),
`mapping` (PyTorch layouts -> ours), `run_dir` (what is written), `importer` (one
conversion), `synthetic` (random checkpoints in the authors' format).
"""

from kforcing_jax.convert.errors import (ConversionError, DestinationError, InvFreqMismatchError,
                                         KindMismatchError, MissingKeysError, ShapeMismatchError,
                                         UnexpectedKeysError)
from kforcing_jax.convert.importer import convert_checkpoint

__all__ = ['ConversionError', 'DestinationError', 'InvFreqMismatchError', 'KindMismatchError',
           'MissingKeysError', 'ShapeMismatchError', 'UnexpectedKeysError', 'convert_checkpoint']
