"""Every bad input a user can give, answered before anything compiles by one line that names the
field or file (and line or byte), the bad value and the fix - never a traceback, never a
plausible-looking result.

Most cases call the checks and loaders in-process; a handful run the real mains and assert
exit status 2, stderr starting with `error:`, no traceback and no output written. Plus the
mixed-length prompt property: prompt i of a call is completed from its own length and gets
exactly the tokens it gets with noise key fold_in(key, i) alone (decode.decode_prompts).
"""

import importlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import models as hf_models

from configs import test_tiny
from kforcing_jax import config_checks, decode, models, reproduce, rundir, sharding
from kforcing_jax.convert import errors as convert_errors
from kforcing_jax.convert import reader
from kforcing_jax.data import text_files
from kforcing_jax.data import tokenizers as tokenizers_lib
from tests.helpers import params as params_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
CONFIGS = ('shakespeare_tiny', 'shakespeare_gumbel', 'shakespeare_quality',
           'shakespeare_quality_gumbel', 'lm1b_ar', 'owt_ar', 'distill_study',
           'test_tiny', 'text_files_tiny')


def one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert '\n' not in message, message
  return message


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize('name', CONFIGS)
def test_every_shipped_config_passes_the_checks(name):
  config_checks.check(importlib.import_module(f'configs.{name}').get_config(), num_devices=1)


def _set(config, field: str, value):
  *path, last = field.split('.')
  node = config
  for part in path:
    node = node[part]
  node[last] = value


# (field, bad value, words the one-line error must contain beyond "config.<field>=<value>")
CONFIG_FAULTS = [
    ('train.steps', 0, 'must be an integer >= 1'),
    ('train.steps', -5, 'must be an integer >= 1'),
    ('train.batch_size', 0, 'must be an integer >= 1'),
    ('train.microbatches', 3, 'does not divide train.batch_size=8'),
    ('train.eval_batches', 0, 'must be an integer >= 1'),
    ('train.checkpoint_every', 0, 'must be an integer >= 1'),
    ('train.keep_checkpoints', 0, 'would delete every checkpoint'),
    ('train.log_every', 0, 'must be an integer >= 1'),
    ('train.learning_rate', 0.0, 'must be a finite number > 0.0'),
    ('train.learning_rate', float('nan'), 'must be a finite number > 0.0'),
    ('train.b2', 1.0, '>= 0.0 and < 1.0'),
    ('data.seq_len', 1, 'a row predicts its tokens 1..seq_len-1'),
    ('data.tokenizer', 'sentencepiece', "is not one of ('bpe', 'bert', 'gpt2')"),
    ('data.name', 'wikitext', 'is not one of'),
    ('distill.tau_range', (-0.5, 1.0), 'must be (lo, hi) with 0 < lo <= hi'),
    ('distill.tau_range', (1.5, 1.0), 'must be (lo, hi) with 0 < lo <= hi'),
    ('distill.stages', ((1, 10), (2, 0)), 'gives stage k=2 0 steps'),
    ('distill.stages', (), 'must be a non-empty sequence of (k, steps)'),
    ('distill.seq_len', 64, 'exceeds data.seq_len=32'),
    ('distill.eval_batches', 0, 'must be an integer >= 1'),
    ('distill.keep_checkpoints', 0, 'would delete every checkpoint'),
    ('distill.learning_rate', -1e-3, 'must be a finite number > 0.0'),
    ('decode.temperature', 0.0, 'must be a finite number > 0.0'),
    ('decode.temperature', -1.0, 'must be a finite number > 0.0'),
    ('decode.gen_len', 6, 'must exceed decode.prefix_len=6'),
    ('decode.prefix_len', 2, 'shorter than the widest stage k=4'),
    ('model.dtype', 'float16', "is not one of ('float32', 'bfloat16')"),
    ('mesh_shape', (-1, 1), 'must be 3 sizes'),
    ('mesh_shape', (-1, -1, 1), 'each >= 1 or one of them -1'),
    ('mesh_shape', (3, 1, 1), 'does not fit the 1 devices'),
    ('eval.num_samples', 0, 'must be an integer >= 1'),
    ('eval.batch_sizes', (4, 0), 'must be a non-empty tuple of integers >= 1'),
    ('eval.split', 'dev', "is not one of ('train', 'validation', 'test')"),
    ('seed', -1, 'must be an integer >= 0'),
]


@pytest.mark.parametrize('field, value, words', CONFIG_FAULTS,
                         ids=[f'{f}={v!r}' for f, v, _ in CONFIG_FAULTS])
def test_config_fault_names_field_value_and_fix(field, value, words):
  config = test_tiny.get_config()
  _set(config, field, value)
  with pytest.raises(ValueError) as excinfo:
    config_checks.check(config, num_devices=1)
  message = one_line(excinfo)
  shown = tuple(value) if isinstance(value, (tuple, list)) else value
  assert message.startswith(f'config.{field}={shown!r} '), message
  assert words in message and 'Fix: ' in message, message


@pytest.mark.parametrize('changes, words', [
    ({'distill.stages': ((2, 10),)}, 'the first stage must be k=1'),
    ({'distill.stages': ((1, 10), (3, 10))}, 'stage k=3 follows k=1'),
    ({'decode.freq_penalty': {'2': -0.1}}, "has lambda -0.1 for k=2"),
    ({'model.num_heads': 3}, 'model.d_model=64 is not divisible by model.num_heads=3'),
    ({'model.cdf_order': 'random'},
     "model.cdf_order='random'; expected one of ('id', 'sorted', 'gumbel')"),
    ({'model.cdf_order': 'gumbel', 'distill.data_weight': 0.1},
     'needs a CDF order (noise inversion'),
    ({'model.cdf_order': 'sorted', 'distill.target_smoothing': 0.2},
     "needs model.cdf_order=id (it is 'sorted')"),
    ({'model.readout': 'mode'}, "model.readout='mode'; expected one of ('argmax', 'inverse_cdf')"),
    ({'model.readout': 'inverse_cdf', 'distill.target_smoothing': 0.2},
     'belongs to the argmax readout'),
    ({'model.readout': 'inverse_cdf', 'distill.data_weight': 0.1},
     'belongs to the argmax readout'),
    ({'distill.data_weight': 0.1, 'distill.microbatches': 2},
     'with distill.microbatches=2 is not supported'),
    ({'distill.seq_len': 4, 'distill.stages': ((1, 5), (2, 5), (4, 5))},
     'leaves no window for stage k=4'),
    ({'eval.evaluator.num_heads': 3}, 'config.eval.evaluator: model.d_model=64 is not divisible'),
])
def test_config_fault_across_fields(changes, words):
  config = test_tiny.get_config()
  for field, value in changes.items():
    _set(config, field, value)
  with pytest.raises(ValueError) as excinfo:
    config_checks.check(config, num_devices=1)
  assert words in one_line(excinfo)


def test_batch_must_divide_over_the_batch_shards_of_the_mesh():
  config = test_tiny.get_config()  # batch 8, mesh (-1, 1, 1): 16 devices are 16 batch shards
  config_checks.check(config, num_devices=8)
  with pytest.raises(ValueError) as excinfo:
    config_checks.check(config, num_devices=16)
  assert one_line(excinfo).startswith('config.train.batch_size=8 does not divide over the 16 '
                                      'batch shards')


@pytest.mark.parametrize('changes, words', [
    ({'ks': (2, 2)}, 'config.reproduce.ks=(2, 2) must be distinct integers >= 1'),
    ({'batch_size': 0}, 'config.reproduce.batch_size=0 must be an integer >= 1'),
    ({'freq_penalty': (0.1, -0.2, 0.3, 0.4)}, 'has lambda -0.2 for k=2'),
    ({'dtype': 'fp8'}, "config.reproduce.dtype='fp8' is not one of"),
])
def test_reproduce_settings(changes, words):
  config = importlib.import_module('configs.lm1b_ar').get_config()
  for field, value in changes.items():
    config.reproduce[field] = value
  with pytest.raises(ValueError) as excinfo:
    config_checks.check(config, num_devices=1)
  assert words in one_line(excinfo)


# ----------------------------------------------------------------------------- decode

GEN_LEN = 12


class CharTokenizer:
  """One token per character (ids 2..), mask id 0: prompt lengths are exactly the text's."""
  mask_id = 0

  def encode(self, text):
    return [2 + ord(c) % 200 for c in text]

  def decode(self, ids):
    return ''.join(chr(i) for i in ids)


def _export(kind: str, k: int = 1) -> rundir.Export:
  config = test_tiny.get_config()
  model = models.teacher(config) if kind == 'ar' else models.student(config, k)
  return rundir.Export(model, params_lib.random_params(model, 0, head_scale=0.1), {}, 'mem')


@pytest.fixture(scope='module')
def ar_decoder():
  export = _export('ar')
  return export, decode.decoder(export, sharding.single_device_layout(), gen_len=GEN_LEN)


@pytest.fixture(scope='module')
def student_decoder():
  export = _export('pflm', 2)
  return export, decode.decoder(export, sharding.single_device_layout(), gen_len=GEN_LEN,
                                penalty=0.2)


@pytest.mark.parametrize('prompts, words', [
    ([], 'no prompt given'),
    (['abc', ''], "prompt 2 ('') has 0 tokens"),
    (['a' * GEN_LEN], f'prompt 1 has {GEN_LEN} tokens but config.decode.gen_len={GEN_LEN} is '
                      f'the total length'),
    (['ok', 'b' * 20], '--config.decode.gen_len=21 or more'),
])
def test_ar_prompt_faults(ar_decoder, prompts, words):
  _, dec = ar_decoder
  with pytest.raises(ValueError) as excinfo:
    decode.prompt_ids(dec, CharTokenizer(), prompts)
  assert words in one_line(excinfo)


def test_student_prompt_shorter_than_k(student_decoder):
  _, dec = student_decoder
  with pytest.raises(ValueError) as excinfo:
    decode.prompt_ids(dec, CharTokenizer(), ['abcd', 'a'])
  assert "prompt 2 ('a') has 1 tokens; pflm_k2 decoding needs at least 2" in one_line(excinfo)


@pytest.mark.parametrize('settings, words', [
    ({'temperature': 0.0}, 'temperature=0.0: must be a finite number > 0'),
    ({'temperature': float('inf')}, 'temperature=inf: must be a finite number > 0'),
    ({'penalty': -0.5}, 'frequency penalty=-0.5: must be a finite number >= 0'),
    ({'k': 0}, 'k=0: the student in mem decodes 1..2 tokens per step'),
    ({'k': 3}, 'k=3: the student in mem decodes 1..2 tokens per step'),
])
def test_decoder_setting_faults(settings, words):
  export = _export('pflm', 2) if 'k' in settings else _export('ar')
  with pytest.raises(ValueError) as excinfo:
    decode.decoder(export, sharding.single_device_layout(), gen_len=GEN_LEN, **settings)
  assert words in one_line(excinfo)


@pytest.mark.parametrize('which', ['ar', 'student'])
def test_mixed_length_prompts_each_decode_from_their_own_length(which, ar_decoder,
                                                                student_decoder):
  """Prompt i of one call == the prompt alone through the plain jit with key fold_in(key, i):
  nothing cut to the shortest, nothing depending on the other prompts."""
  export, dec = ar_decoder if which == 'ar' else student_decoder
  tokenizer = CharTokenizer()
  texts = ['abcd', 'ab', 'wxyz']  # lengths 4, 2, 4: each length compiles once per path
  key = jax.random.key(7)
  encoded = decode.prompt_ids(dec, tokenizer, texts)
  rows = decode.decode_prompts(dec, encoded, key)
  for i, ids in enumerate(encoded):
    prompt = np.asarray([ids], np.int32)
    if which == 'ar':
      alone = decode.generate_ar(export.model, export.params, prompt, jax.random.fold_in(key, i),
                                 1.0, gen_len=GEN_LEN)
    else:
      alone = decode.generate_pflm(export.model, export.params, prompt, jax.random.fold_in(key, i),
                                   1.0, gen_len=GEN_LEN, k=2, freq_penalty=0.2)
    np.testing.assert_array_equal(rows[i], np.asarray(alone)[0])
    np.testing.assert_array_equal(rows[i][:len(ids)], ids)  # the whole prompt is kept
    assert rows[i].shape == (GEN_LEN,) and (rows[i][len(ids):] != tokenizer.mask_id).all()
  # and the same prompt at the same index of a call with other prompts decodes the same
  other = decode.decode_prompts(dec, [encoded[2], encoded[2], encoded[2]], key)
  np.testing.assert_array_equal(other[2], rows[2])


# ----------------------------------------------------------------------------- prefix files

@pytest.mark.parametrize('content, words', [
    (b'{"prefix": "fine"}\n{"prefix": "oops"\n', 'line 2 is not JSON'),
    (b'{"prefix": "fine"}\n\n{"text": "wrong key"}\n', 'line 3 has no "prefix" string'),
    (b'["a list", "not an object"]\n', 'line 1 has no "prefix" string'),
    (b'{"prefix": 17}\n', 'line 1 has no "prefix" string'),
    (b'', 'holds no prefixes (it is empty or blank)'),
    (b'\n  \n', 'holds no prefixes (it is empty or blank)'),
    (b'{"prefix": "a"}\n{"prefix": "b"}\n{"prefix": "caf\xe9"}\n',
     'line 3 is not UTF-8 (invalid continuation byte at byte 47)'),
])
def test_prefix_file_faults_name_file_and_line(tmp_path, content, words):
  path = tmp_path / 'prefixes.jsonl'
  path.write_bytes(content)
  with pytest.raises(ValueError) as excinfo:
    reproduce.load_prefixes(str(path))
  message = one_line(excinfo)
  assert str(path) in message and words in message


def test_missing_prefix_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='--prefix_file=.*missing.jsonl does not exist'):
    reproduce.load_prefixes(str(tmp_path / 'missing.jsonl'))


# ----------------------------------------------------------------------------- tokenizer files

def test_bpe_json_faults(tmp_path):
  path = tmp_path / 'tokenizer-bpe256.json'
  path.write_text('{"version": "1.0", "model": ')
  with pytest.raises(ValueError) as excinfo:
    tokenizers_lib.bpe_from_json(path)
  assert one_line(excinfo).startswith(f'BPE tokenizer {path} is not a tokenizer JSON file')
  assert 'prepare_data' in str(excinfo.value)

  path.write_bytes(b'{"version": "\xff"}')
  with pytest.raises(ValueError, match=r'is not UTF-8 text \(invalid start byte at byte 13\)'):
    tokenizers_lib.bpe_from_json(path)

  # a valid tokenizer JSON without this project's special tokens (mask id would be None)
  path.write_text(tokenizers.Tokenizer(hf_models.BPE()).to_str())
  with pytest.raises(ValueError) as excinfo:
    tokenizers_lib.bpe_from_json(path)
  assert 'has no [MASK] or <|endoftext|> token' in one_line(excinfo)


def test_bert_vocab_faults(tmp_path):
  vocab = tmp_path / 'vocab.txt'
  vocab.write_bytes(b'[PAD]\n[UNK]\n\xc3\x28\n')
  with pytest.raises(ValueError) as excinfo:
    tokenizers_lib.bert_from_vocab(vocab)
  assert one_line(excinfo).startswith(f'{vocab} is not UTF-8 text (invalid continuation byte '
                                      'at byte 12)')
  vocab.write_text('[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n')
  with pytest.raises(ValueError, match=r'has no \[MASK\] token; is it a BERT vocab.txt'):
    tokenizers_lib.bert_from_vocab(vocab)


@pytest.mark.parametrize('encoder, merges', [
    ('{"a": 0, "b": ', '#version: 0.2\n'),        # truncated encoder.json
    ('{"a": 0, "b": 1}', '#version: 0.2\na b c\n'),  # a merges line that is not a pair
])
def test_gpt2_file_faults(tmp_path, encoder, merges):
  (tmp_path / 'encoder.json').write_text(encoder)
  (tmp_path / 'vocab.bpe').write_text(merges)
  with pytest.raises(ValueError) as excinfo:
    tokenizers_lib.gpt2_from_dir(tmp_path)
  message = one_line(excinfo)
  assert message.startswith(f'GPT-2 tokenizer files {tmp_path}/encoder.json and '
                            f'{tmp_path}/vocab.bpe do not load')


def test_missing_bpe_tokenizer_says_how_to_make_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='not found. Fix: run `python -m '
                                              'kforcing_jax.main.prepare_data'):
    tokenizers_lib.bpe_from_json(tmp_path / 'tokenizer-bpe256.json')


# ----------------------------------------------------------------------------- text files

def test_non_utf8_txt_names_file_and_byte(tmp_path):
  (tmp_path / 'good.txt').write_text('fine text')
  (tmp_path / 'latin1.txt').write_bytes('na\u00efve caf'.encode() + b'\xe9 au lait')
  with pytest.raises(ValueError) as excinfo:
    list(text_files.iter_documents(tmp_path, text_files.find_manual_files(tmp_path)))
  assert one_line(excinfo).startswith(f'{tmp_path}/latin1.txt is not UTF-8 text (invalid '
                                      'continuation byte at byte 10)')


def test_non_utf8_jsonl_names_file_line_and_byte(tmp_path):
  lines = [b'{"text": "one"}\n', b'{"text": "two"}\n', b'{"text": "thr\xff"}\n']
  (tmp_path / 'docs.jsonl').write_bytes(b''.join(lines))
  with pytest.raises(ValueError) as excinfo:
    list(text_files.iter_documents(tmp_path, text_files.find_manual_files(tmp_path)))
  offset = len(lines[0]) + len(lines[1]) + lines[2].index(b'\xff')
  assert one_line(excinfo).startswith(f'{tmp_path}/docs.jsonl is not UTF-8 text (invalid start '
                                      f'byte at line 3, byte {offset})')


def test_crlf_text_reads_as_before(tmp_path):
  (tmp_path / 'a.txt').write_bytes(b'line one\r\nline two\rthree\r\n')
  assert list(text_files.iter_documents(tmp_path, text_files.find_manual_files(tmp_path))) == [
      ('a.txt', 'line one\nline two\nthree')]


# ----------------------------------------------------------------------------- safetensors

def _safetensors_bytes() -> bytes:
  from safetensors.numpy import save
  return save({'embed.weight': np.ones((4, 4), np.float32)})


@pytest.mark.parametrize('damage, words', [
    (lambda b: b[:-10], 'incomplete metadata, file not fully covered'),
    (lambda b: b[:8] + b'{bad' + b[12:], 'invalid JSON in header'),
    (lambda b: b'', 'header too small'),
    (lambda b: (10 ** 12).to_bytes(8, 'little') + b[8:], 'header too large'),
])
def test_damaged_safetensors_name_the_file(tmp_path, damage, words):
  path = tmp_path / 'model.safetensors'
  path.write_bytes(damage(_safetensors_bytes()))
  with pytest.raises(convert_errors.ConversionError) as excinfo:
    reader.read_state_dict(str(path))
  message = one_line(excinfo)
  assert message.startswith(f'{path} is not a readable .safetensors file') and words in message


# ----------------------------------------------------------------------------- the real mains

def run_main(*args):
  out = subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True,
                       check=False, cwd=ROOT, timeout=300)
  return out.returncode, out.stderr


def assert_error_line(rc, stderr, *words):
  assert rc == 2, stderr[-2000:]
  assert stderr.startswith('error: ') and 'Traceback' not in stderr, stderr[-2000:]
  for word in words:
    assert word in stderr, stderr


@pytest.mark.parametrize('flags, words', [
    (['--config=configs/test_tiny.py', '--config.train.stepz=3'],
     ("no such config field 'stepz'", 'Did you mean "steps"')),
    (['--config=configs/no_such_config.py'],
     ('--config=configs/no_such_config.py is not a file',)),
    (['--config=configs/test_tiny.py', '--config.train.steps=0'],
     ('error: config.train.steps=0 must be an integer >= 1',)),
    (['--config=configs/test_tiny.py', '--config.decode.temperature=0'],
     ('config.decode.temperature=0.0 must be a finite number > 0.0',)),
    (['--config=configs/test_tiny.py', '--config.train.steps=ten'],
     ('--config.train.steps=ten', 'invalid literal')),
])
def test_train_main_refuses_before_writing_anything(tmp_path, flags, words):
  workdir = tmp_path / 'run'
  rc, stderr = run_main('kforcing_jax.main.train', *flags, f'--workdir={workdir}')
  assert_error_line(rc, stderr, *words)
  written = [p for p in workdir.rglob('*')] if workdir.exists() else []
  assert not written, written  # the workdir lock may leave the empty directory, nothing in it


def test_reproduce_main_names_the_malformed_prefix_line(tmp_path):
  prefixes = tmp_path / 'prefixes.jsonl'
  prefixes.write_text('{"prefix": "the king is dead"}\n{"prefix": \n')
  out = tmp_path / 'out'
  rc, stderr = run_main('kforcing_jax.main.reproduce', '--config=configs/lm1b_ar.py',
                        f'--config.data.tokenizer_path={FIXTURES}/bert_tiny/vocab.txt',
                        f'--prefix_file={prefixes}', f'--out={out}', f'--ar={tmp_path}/none')
  assert_error_line(rc, stderr, f'{prefixes} line 2 is not JSON')
  assert not out.exists()


def test_convert_main_names_the_truncated_safetensors(tmp_path):
  src = tmp_path / 'model.safetensors'
  src.write_bytes(_safetensors_bytes()[:-10])
  dst = tmp_path / 'converted'
  rc, stderr = run_main('kforcing_jax.main.convert', '--config=configs/test_tiny.py',
                        f'--src={src}', f'--dst={dst}')
  assert_error_line(rc, stderr, f'{src} is not a readable .safetensors file')
  assert not dst.exists()


@pytest.mark.parametrize('flags, words', [
    (['--k=2'], '--k is the tokens per step of a student: pass --student=K as well'),
    (['--student=2', '--k=0'], '--k=0: a student decodes k >= 1 tokens per step'),
    (['--student=0'], '--student=0: a stage K is >= 1'),
])
def test_generate_main_flag_faults(tmp_path, flags, words):
  rc, stderr = run_main('kforcing_jax.main.generate', '--config=configs/test_tiny.py',
                        f'--workdir={tmp_path / "run"}', *flags)
  assert_error_line(rc, stderr, words)


@pytest.mark.parametrize('shapes, words', [
    ('12x2x5:1', "calibration shape '12x2x5:1': d_model, layers, heads and batch sizes"),
    ('192x6', "calibration shape '192x6': expected 'DxL[xH]:B/B/..'"),
    ('192x6:1/four', "calibration shape '192x6:1/four': expected"),
])
def test_speed_table_refuses_a_bad_calibration_shape_before_timing(tmp_path, shapes, words):
  out = tmp_path / 'table.json'
  rc, stderr = run_main('kforcing_jax.benchmarks.speed_table', '--config=configs/test_tiny.py',
                        f'--calibration_shapes={shapes}', f'--output={out}')
  assert_error_line(rc, stderr, words)
  assert not out.exists()


def test_speed_model_fit_refuses_a_table_without_calibration_shapes(tmp_path):
  table = tmp_path / 'table.json'
  table.write_text('{"k": 4, "configs": {"demo": {"role": "held_out"}}}')
  rc, stderr = run_main('kforcing_jax.benchmarks.speed_model_fit', '--config=configs/test_tiny.py',
                        f'--measured={table}', f'--output={tmp_path / "fit.json"}')
  assert_error_line(rc, stderr, 'needs calibration and held-out shapes',
                    '--calibration_shapes')
