"""progress: process-0 logging, valid JSON files, metrics.jsonl + TensorBoard events, and all of
it through etils.epath (shown on a fake gs:// bucket served by epath.testing.mock_epath)."""

import contextlib
import json
import os
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from etils.epath import testing as epath_testing
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

from kforcing_jax import progress


def read_events(directory) -> list[event_pb2.Event]:
  """Every event in the TensorBoard files of `directory` (TFRecord framing: u64 length, u32
  crc, the Event proto, u32 crc), read independently of tensorboardX's writer."""
  events = []
  for path in sorted(Path(directory).glob('events.out.tfevents.*')):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack('Q', data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
  return events


def scalars(directory) -> dict[str, dict[int, float]]:
  """tag -> {step: value} of the scalar summaries in `directory`."""
  found: dict[str, dict[int, float]] = {}
  for event in read_events(directory):
    for value in event.summary.value:
      if value.WhichOneof('value') == 'simple_value':
        found.setdefault(value.tag, {})[event.step] = value.simple_value
  return found


def hparams(directory) -> dict[str, float | str | bool]:
  """The hyper-parameters of the HParams plugin's session-start summaries in `directory`."""
  found = {}
  for event in read_events(directory):
    for value in event.summary.value:
      if value.tag == '_hparams_/session_start_info':
        data = plugin_hparams_pb2.HParamsPluginData.FromString(
            value.metadata.plugin_data.content)
        for name, v in data.session_start_info.hparams.items():
          found[name] = getattr(v, v.WhichOneof('kind'))
  return found


@contextlib.contextmanager
def fake_bucket(root: Path):
  """Serves gs://<path> from root/<path> through epath's mocked backend; yields the list of
  (path, mode) of every file epath opens, so a test sees what went through epath."""
  opened = []

  def local(path):
    path = os.fspath(path)
    return str(root / path.removeprefix('gs://')) if path.startswith('gs://') else path

  def open_file(original, path, mode):
    opened.append((os.fspath(path), mode))
    return original(local(path), mode)

  def redirect(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  with epath_testing.mock_epath(open=open_file, exists=redirect, isdir=redirect,
                                makedirs=redirect, mkdir=redirect, listdir=redirect,
                                stat=redirect, remove=redirect):
    yield opened


def metrics_rows(path) -> list[dict]:
  def no_constants(name):
    raise AssertionError(f'{name} is not JSON')
  return [json.loads(line, parse_constant=no_constants)
          for line in Path(path).read_text().splitlines()]


def test_log_prints_on_process_0_only(capsys, monkeypatch):
  progress.log('hello from 0')
  assert capsys.readouterr().out == 'hello from 0\n'
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  progress.log('hello from 1')
  assert capsys.readouterr().out == ''


def test_json_files_are_valid_json_and_read_back(tmp_path):
  value = {'loss': float('nan'), 'best': float('inf'), 'stages': ((1, 300), (2, 300)),
           'lr': np.float32(0.5), 'ids': np.arange(3), 3: 'three'}
  path = tmp_path / 'deep' / 'folder' / 'out.json'
  progress.write_json(path, value)
  text = path.read_text()
  assert 'NaN' not in text and 'Infinity' not in text
  assert progress.read_json(path) == {'loss': None, 'best': None, 'stages': [[1, 300], [2, 300]],
                                      'lr': 0.5, 'ids': [0, 1, 2], '3': 'three'}
  assert progress.read_json(tmp_path / 'missing.json') is None
  with pytest.raises(TypeError):  # not JSON data at all: an error, not a silent str()
    progress.write_json(tmp_path / 'bad.json', {'x': object()})


def test_metrics_writer_writes_jsonl_and_tensorboard(tmp_path):
  with progress.MetricsWriter(tmp_path / 'run') as writer:
    writer.write(1, {'loss': 2.5, 'lr': np.float32(0.001)})
    writer.write(2, {'loss': float('nan'), 'lr': 0.002})
    writer.write_hparams({'train.learning_rate': 0.003, 'data.name': 'text_files',
                          'data.packing': True})
  rows = metrics_rows(tmp_path / 'run' / 'metrics.jsonl')
  assert [(r['step'], r['loss'], r['lr']) for r in rows] == [(1, 2.5, pytest.approx(0.001)),
                                                            (2, None, 0.002)]
  assert all(isinstance(r['time'], float) for r in rows)
  found = scalars(tmp_path / 'run')
  assert found['loss'][1] == 2.5 and np.isnan(found['loss'][2])
  assert found['lr'] == {1: pytest.approx(0.001), 2: pytest.approx(0.002)}
  assert hparams(tmp_path / 'run') == {'train.learning_rate': pytest.approx(0.003),
                                       'data.name': 'text_files', 'data.packing': True}


def test_a_resumed_writer_appends_and_keeps_the_old_events(tmp_path):
  for step in (1, 2):  # two runs of the loop, as after a restart
    with progress.MetricsWriter(tmp_path) as writer:
      writer.write(step, {'loss': float(step)})
  assert [r['step'] for r in metrics_rows(tmp_path / 'metrics.jsonl')] == [1, 2]
  assert len(list(tmp_path.glob('events.out.tfevents.*'))) == 2
  assert scalars(tmp_path)['loss'] == {1: 1.0, 2: 2.0}


def test_without_tensorboardx_only_jsonl(tmp_path, monkeypatch):
  monkeypatch.setattr(progress, 'tensorboardX', None)
  with progress.MetricsWriter(tmp_path) as writer:
    writer.write(1, {'loss': 1.0})
    writer.write_hparams({'seed': 0})
  assert [p.name for p in tmp_path.iterdir()] == ['metrics.jsonl']


def test_other_processes_write_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  with progress.MetricsWriter(tmp_path / 'run') as writer:
    writer.write(1, {'loss': 1.0})
    writer.write_hparams({'seed': 0})
  assert not (tmp_path / 'run').exists()


def test_a_gs_run_directory_goes_through_epath(tmp_path):
  bucket = tmp_path / 'bucket-root'
  with fake_bucket(bucket) as opened:
    for session in range(2):  # a run and its resume
      writer = progress.MetricsWriter('gs://bucket/run/teacher')
      assert writer.flush_every_s == 60.0  # object stores: batched rewrites
      writer.write(session * 2 + 1, {'loss': 1.0})
      writer.write(session * 2 + 2, {'loss': float('inf')})
      writer.write_hparams({'seed': 0})
      writer.close()
    progress.write_json('gs://bucket/run/teacher/eval.json', {'val_ppl': 12.5})
    assert progress.read_json('gs://bucket/run/teacher/eval.json') == {'val_ppl': 12.5}
  local = bucket / 'bucket' / 'run' / 'teacher'
  rows = metrics_rows(local / 'metrics.jsonl')
  assert [(r['step'], r['loss']) for r in rows] == [(1, 1.0), (2, None), (3, 1.0), (4, None)]
  assert scalars(local)['loss'] == {1: 1.0, 2: float('inf'), 3: 1.0, 4: float('inf')}
  assert hparams(local) == {'seed': 0.0}
  # every file went through epath: metrics.jsonl is rewritten whole ('w'), never appended ('a'),
  # because gcsfs would silently overwrite in append mode
  metrics = [mode for path, mode in opened if path == 'gs://bucket/run/teacher/metrics.jsonl']
  assert metrics == ['w', 'r', 'w']  # first session writes; the second reads, then rewrites
  events = [(p, m) for p, m in opened if 'events.out.tfevents' in p]
  assert len(events) == 2 and all(p.startswith('gs://bucket/run/teacher/') and m == 'wb'
                                  for p, m in events)
  assert ('gs://bucket/run/teacher/eval.json', 'w') in opened
  assert ('gs://bucket/run/teacher/eval.json', 'r') in opened
  assert not Path('gs:').exists()  # nothing fell through to the local backend as 'gs:/...'
