"""Token rows of length config.data.seq_len with a loss mask, in an order fixed by (seed, step).

Two ways to make rows from documents:
  packing=True   every document of a split is tokenized once and followed by EOS, the stream is
                 cut into rows of seq_len (the remainder dropped) and cached as an int32 .npy
                 under `<data_dir>/<dataset>/packed/`, keyed by split, tokenizer and seq_len.
                 The mask is all ones.
  packing=False  one document per row, tokenized on the fly: [BOS if any] + tokens + [EOS],
                 truncated to seq_len or padded with the mask id; mask = 1 on real tokens.

Data order: rows form the stream `MapDataset.source(rows).shuffle(seed).repeat()` (grain
reshuffles every epoch with seed + epoch). The global batch of step s is stream positions
[s*B, (s+1)*B), and process p of P reads only its slice [s*B + p*B/P, s*B + (p+1)*B/P). So a
batch is a pure function of (seed, step): resuming at step s reads exactly that batch, at once.
"""

import dataclasses
import itertools
import math
import os
from typing import Iterable, Iterator, Sequence

import grain
import ml_collections
import numpy as np
from etils import epath

from kforcing_jax import distributed
from kforcing_jax.data import documents
from kforcing_jax.data import tokenizers as tokenizers_lib

# Prompts come from documents in this fixed shuffled order, the same for every run and seed.
_PREFIX_ORDER_SEED = 0


def pack_documents(token_lists: Iterable[Sequence[int]], eos_id: int, seq_len: int) -> np.ndarray:
  """Concatenates documents, each followed by EOS, into (num_rows, seq_len) int32 rows."""
  stream = np.fromiter(
      itertools.chain.from_iterable(itertools.chain(ids, (eos_id,)) for ids in token_lists),
      dtype=np.int32)
  num_rows = len(stream) // seq_len
  return stream[:num_rows * seq_len].reshape(num_rows, seq_len)


def pad_document(ids: Sequence[int], seq_len: int, *, bos_id: int | None, eos_id: int,
                 pad_id: int) -> dict[str, np.ndarray]:
  """[BOS] + ids + [EOS], truncated or padded with `pad_id` to seq_len; mask 1 on real tokens."""
  row = ([] if bos_id is None else [bos_id]) + list(ids) + [eos_id]
  row = row[:seq_len]
  tokens = np.full((seq_len,), pad_id, dtype=np.int32)
  tokens[:len(row)] = row
  mask = np.zeros((seq_len,), dtype=np.float32)
  mask[:len(row)] = 1.0
  return {'tokens': tokens, 'mask': mask}


def packed_rows_path(config: ml_collections.ConfigDict, split: str,
                     tokenizer: tokenizers_lib.Tokenizer) -> epath.Path:
  name = f'{split}.{tokenizer.name}-{tokenizer.fingerprint}.L{config.data.seq_len}.npy'
  return documents.dataset_dir(config) / 'packed' / name


def packed_rows(config: ml_collections.ConfigDict, split: str,
                tokenizer: tokenizers_lib.Tokenizer) -> np.ndarray:
  """The packed rows of `split`, from the .npy cache, building and saving it when missing."""
  path = packed_rows_path(config, split, tokenizer)
  if path.exists():
    with path.open('rb') as f:
      return np.load(f)
  texts = documents.open_documents(config, split).read_all()
  rows = pack_documents(tokenizer.encode_batch(texts), tokenizer.eos_id, config.data.seq_len)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Write then rename, so a crash (or a second writer) never leaves a truncated cache behind.
  partial = path.parent / f'{path.name}.{os.getpid()}.partial'
  with partial.open('wb') as f:
    np.save(f, rows)
  partial.replace(path)
  return rows


def _packed_row(tokens: np.ndarray) -> dict[str, np.ndarray]:
  return {'tokens': np.asarray(tokens, np.int32), 'mask': np.ones(tokens.shape, np.float32)}


@dataclasses.dataclass(frozen=True)
class _PaddedRow:
  tokenizer: tokenizers_lib.Tokenizer
  seq_len: int

  def __call__(self, text: str) -> dict[str, np.ndarray]:
    t = self.tokenizer
    return pad_document(t.encode(text), self.seq_len, bos_id=t.bos_id, eos_id=t.eos_id,
                        pad_id=t.mask_id)


@dataclasses.dataclass(frozen=True)
class BatchSource:
  """Batches of one split: `batch(step)` is a pure function of (seed, step, process)."""
  stream: grain.MapDataset  # infinite: position -> {'tokens': (L,) int32, 'mask': (L,) float32}
  num_rows: int  # rows in one epoch
  global_batch_size: int
  process_index: int
  process_count: int
  tokenizer: tokenizers_lib.Tokenizer

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
    """Stream positions [start, stop) stacked: {'tokens': (n, L) int32, 'mask': (n, L) float32}."""
    items = [self.stream[i] for i in range(start, stop)]
    return {key: np.stack([item[key] for item in items]) for key in ('tokens', 'mask')}

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's share of the global batch of `step`: (global_batch / processes, L)."""
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    return self.rows(start, start + self.local_batch_size)


def make_batch_source(config: ml_collections.ConfigDict, split: str, batch_size: int,
                      shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                      tokenizer: tokenizers_lib.Tokenizer | None = None) -> BatchSource:
  """Batches of `batch_size` (global) rows of `split`; shuffled with config.seed if `shuffle`."""
  if batch_size % process_count:
    raise ValueError(f'batch size {batch_size} does not divide over {process_count} processes.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} outside [0, {process_count}).')
  tokenizer = tokenizer or tokenizers_lib.load_tokenizer(config)
  if config.data.packing:
    source, to_row = packed_rows(config, split, tokenizer), _packed_row
  else:
    source = documents.open_documents(config, split)
    to_row = _PaddedRow(tokenizer, config.data.seq_len)
  if len(source) == 0:
    raise ValueError(f'{config.data.name}/{split} has no rows of {config.data.seq_len} tokens; '
                     'use a smaller config.data.seq_len or more data.')
  stream = grain.MapDataset.source(source)
  if shuffle:
    stream = stream.shuffle(seed=config.seed)
  stream = stream.repeat().map(to_row)
  return BatchSource(stream=stream, num_rows=len(source), global_batch_size=batch_size,
                     process_index=process_index, process_count=process_count,
                     tokenizer=tokenizer)


def document_prefixes(config: ml_collections.ConfigDict, split: str, num: int, prefix_len: int,
                      tokenizer: tokenizers_lib.Tokenizer | None = None) -> np.ndarray:
  """(num, prefix_len) int32 prompts: the first tokens of held-out documents (no special ids).

  Documents are visited in a fixed pseudo-random order (so prompts come from all over the
  split, not just its first work) and those shorter than prefix_len are skipped.
  """
  tokenizer = tokenizer or tokenizers_lib.load_tokenizer(config)
  docs = documents.open_documents(config, split)
  prefixes = []
  for index in np.random.default_rng(_PREFIX_ORDER_SEED).permutation(len(docs)):
    ids = tokenizer.encode(docs[index])
    if len(ids) >= prefix_len:
      prefixes.append(ids[:prefix_len])
      if len(prefixes) == num:
        return np.asarray(prefixes, dtype=np.int32)
  raise ValueError(f'{config.data.name}/{split} has only {len(prefixes)} documents of at least '
                   f'{prefix_len} tokens; asked for {num}. Fix: ask for at most {len(prefixes)} '
                   f'(--config.eval.num_samples), or give the split more documents.')


def _epoch_chunks(source: BatchSource, max_rows: int | None,
                  chunk: int = 1024) -> Iterator[dict[str, np.ndarray]]:
  total = source.num_rows if max_rows is None else min(max_rows, source.num_rows)
  for start in range(0, total, chunk):
    yield source.rows(start, min(start + chunk, total))


def _targets(rows: dict[str, np.ndarray]) -> np.ndarray:
  """The tokens an LM predicts: positions 1..L-1 where the mask is on."""
  return rows['tokens'][:, 1:][rows['mask'][:, 1:] > 0]


def unigram_stats(config: ml_collections.ConfigDict, split: str = 'train',
                  max_rows: int | None = None,
                  tokenizer: tokenizers_lib.Tokenizer | None = None) -> np.ndarray:
  """(vocab_size,) int64 counts of the predicted tokens (positions 1..L-1, masked) of `split`."""
  tokenizer = tokenizer or tokenizers_lib.load_tokenizer(config)
  source = make_batch_source(config, split, 1, shuffle=False, tokenizer=tokenizer)
  counts = np.zeros((tokenizer.vocab_size,), np.int64)
  for rows in _epoch_chunks(source, max_rows):
    counts += np.bincount(_targets(rows), minlength=tokenizer.vocab_size)
  return counts


def unigram_perplexity(config: ml_collections.ConfigDict, train_split: str = 'train',
                       eval_split: str = 'validation', max_rows: int | None = 100_000,
                       tokenizer: tokenizers_lib.Tokenizer | None = None) -> float:
  """Perplexity on `eval_split` of the add-one-smoothed unigram model of `train_split`.

  The baseline an LM must beat: it is scored on the same targets an LM is (positions 1..L-1
  under the loss mask), smoothing over every id except the mask id, which gets probability 0.
  Reads the first `max_rows` rows (unshuffled) of each split: all of the default corpus, a
  bounded sample of lm1b/owt, whose rows are tokenized on the fly. None reads everything.
  """
  tokenizer = tokenizer or tokenizers_lib.load_tokenizer(config)
  counts = unigram_stats(config, train_split, max_rows, tokenizer).astype(np.float64) + 1.0
  counts[tokenizer.mask_id] = 0.0
  log_probs = np.full(counts.shape, -np.inf)
  log_probs[counts > 0] = np.log(counts[counts > 0] / counts.sum())
  source = make_batch_source(config, eval_split, 1, shuffle=False, tokenizer=tokenizer)
  total_log_prob, num_targets = 0.0, 0
  for rows in _epoch_chunks(source, max_rows):
    targets = _targets(rows)
    total_log_prob += float(log_probs[targets].sum())
    num_targets += targets.size
  return math.exp(-total_log_prob / num_targets)


def global_batches(config: ml_collections.ConfigDict, layout, split: str, batch_size: int,
                   shuffle: bool, tokenizer: tokenizers_lib.Tokenizer | None = None):
  """step -> the global batch {'tokens', 'mask'} of `split` on `layout` (a sharding.Layout):
  each process reads only the rows its own devices hold (distributed.local_batch_rows)."""
  block, blocks = distributed.local_batch_rows(layout.mesh, layout.rules, batch_size)
  source = make_batch_source(config, split, batch_size, shuffle=shuffle, process_index=block,
                             process_count=blocks, tokenizer=tokenizer)
  return lambda step: layout.global_batch(source.batch(step))
