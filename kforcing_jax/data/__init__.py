"""Datasets (TFDS builders read as array_record data sources), tokenizers and input pipelines.

  prepare(config)                          make everything on disk a run needs (idempotent)
  load_tokenizer(config), check_vocab(...) the configured tokenizer; fail early on a mismatch
  make_batch_source(config, split, B, ...) batch(step) -> {'tokens', 'mask'}, pure in (seed, step)
  global_batches(config, layout, split, B)  step -> that batch as global arrays on a layout
  document_prefixes(config, split, n, k)   prompts from the start of held-out documents
  unigram_perplexity(config, ...)          the unigram baseline an LM must beat
"""

from kforcing_jax.data.documents import open_documents
from kforcing_jax.data.errors import DatasetMissingError
from kforcing_jax.data.pipeline import (BatchSource, document_prefixes, global_batches,
                                        make_batch_source, unigram_perplexity, unigram_stats)
from kforcing_jax.data.preparation import (SplitSummary, format_summary, prepare,
                                          prepared_tokenizer)
from kforcing_jax.data.tokenizers import Tokenizer, check_vocab, load_tokenizer

__all__ = [
    'BatchSource', 'DatasetMissingError', 'SplitSummary', 'Tokenizer', 'check_vocab',
    'document_prefixes', 'format_summary', 'global_batches', 'load_tokenizer', 'make_batch_source',
    'open_documents', 'prepare', 'unigram_perplexity', 'unigram_stats',
]
