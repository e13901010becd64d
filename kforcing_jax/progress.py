"""What a long loop shows and leaves in its run directory, from process 0 only.

  log(message)                  one printed line (flushed) on process 0; nothing elsewhere
  Progress                      `[name] step s/total  x steps/s  ETA h:mm:ss  metrics` lines
  MetricsWriter                 metrics.jsonl, plus TensorBoard event files where tensorboardX
                                is installed (and the run's hyper-parameters, `write_hparams`)
  write_json / read_json        whole JSON files (read_json: None when the file is missing);
                                append_text adds lines to a text file

Every file goes through `etils.epath`, so a run directory may be local or on an object store
(gs://...). Object stores cannot append: there `append_text` rewrites the file, and
MetricsWriter batches its rows (one rewrite a minute and at close); TensorBoard event files on
an object store appear when the writer closes. JSON written here is always valid JSON: NaN and
+-inf become null (`json_safe`), never the non-standard `NaN` / `Infinity` literals.
"""

import json
import math
import os
import time
import uuid
from typing import Any

import jax
import numpy as np
from etils import epath

try:
  import tensorboardX
  from tensorboardX import record_writer as tb_record_writer
  from tensorboardX import summary as tb_summary
except ImportError:  # JSON lines only
  tensorboardX = None


def is_main_process() -> bool:
  return jax.process_index() == 0


def log(message: str) -> None:
  """Prints `message` on process 0 only, flushed (pod logs interleave otherwise)."""
  if is_main_process():
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# JSON files through epath


def json_safe(value: Any) -> Any:
  """`value` as plain JSON data: tuples and arrays become lists, numpy scalars Python numbers,
  dict keys strings, and non-finite floats (NaN, +-inf) None."""
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return json_safe(np.asarray(value).tolist())
  if isinstance(value, np.generic):
    return json_safe(value.item())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def dumps(value: Any, **kwargs) -> str:
  """json.dumps of `json_safe(value)`; allow_nan=False makes a missed non-finite float an error
  here rather than an unreadable file later."""
  return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write_json(path: str | epath.PathLike, value: Any) -> None:
  """Writes `value` as indented JSON to `path` (local or gs://), creating the parent folders.

  Process 0 writes; the other processes of a multi-host run return (their copy would race)."""
  if not is_main_process():
    return
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = dumps(value, indent=2) + '\n'
  if is_object_store(path):  # an object is replaced whole by its upload anyway
    path.write_text(text)
    return
  # written aside and renamed: a process killed meanwhile leaves the old file or none, never
  # half a file that the next run (which reads eval.json to skip work) cannot parse
  tmp = path.parent / f'{path.name}.tmp{os.getpid()}'
  tmp.write_text(text)
  os.replace(tmp, path)


def read_json(path: str | epath.PathLike) -> Any:
  """The JSON value in the file at `path`, or None when there is no such file."""
  path = epath.Path(path)
  return json.loads(path.read_text()) if path.exists() else None


def is_object_store(path: str | epath.PathLike) -> bool:
  return '://' in str(path)


def append_text(path: str | epath.PathLike, text: str) -> None:
  """Appends `text` to the file at `path` (created with its folders when missing). On an object
  store, which has no append, the file is read and written back whole (fsspec's gcsfs would
  silently overwrite in append mode)."""
  path = epath.Path(path)
  if not is_object_store(path):
    with path.open('a') as f:
      f.write(text)
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  old = path.read_text() if path.exists() else ''
  path.write_text(old + text)


# ---------------------------------------------------------------------------------------------
# Metrics: JSON lines + TensorBoard


class _EpathEventFile:
  """The file tensorboardX's RecordWriter writes events into (write/flush/close), opened
  through epath. tensorboardX's own gs:// writer needs google-cloud-storage, which we do not
  install; and RecordWriter fsyncs whatever has a `fileno`, which fsspec files refuse."""

  def __init__(self, path: str):
    self._file = epath.Path(path).open('wb')

  def write(self, data: bytes) -> None:
    self._file.write(data)

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class _EpathEventFiles:
  """A tensorboardX writer factory (record_writer.register_writer_factory) over epath."""

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard_writer(directory: epath.Path):
  if tensorboardX is None:
    return None
  if is_object_store(directory):
    scheme = str(directory).split('://', 1)[0]
    tb_record_writer.register_writer_factory(scheme, _EpathEventFiles())
  # A unique suffix: tensorboardX names files by the second and the host, so a loop restarted
  # within the same second would otherwise truncate the previous file.
  return tensorboardX.SummaryWriter(logdir=str(directory),
                                    filename_suffix=f'.{uuid.uuid4().hex[:8]}')


def _row_step(line: str) -> int | None:
  try:
    row = json.loads(line)
  except ValueError:
    return None
  return row.get('step') if isinstance(row, dict) else None


class MetricsWriter:
  """Metrics rows to <directory>/metrics.jsonl (one JSON object per line: step, time, then the
  metrics; NaN/inf as null) and, where tensorboardX is installed, to TensorBoard event files in
  <directory>. Process 0 only: elsewhere every method does nothing. Close it (or use `with`)."""

  def __init__(self, directory: str | epath.PathLike, filename: str = 'metrics.jsonl',
               flush_every_s: float | None = None):
    self.directory = epath.Path(directory)
    self.path = self.directory / filename
    self.active = is_main_process()
    remote = is_object_store(self.directory)
    self.flush_every_s = (60.0 if remote else 0.0) if flush_every_s is None else flush_every_s
    self._rows: list[str] = []
    self._last_flush = time.time()
    self.tensorboard = None
    if self.active:
      self.directory.mkdir(parents=True, exist_ok=True)
      self.tensorboard = _tensorboard_writer(self.directory)

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    values = {k: float(v) for k, v in metrics.items()}
    self._rows.append(dumps({'step': int(step), 'time': time.time(), **values}) + '\n')
    if self.tensorboard is not None:
      for name, value in values.items():
        self.tensorboard.add_scalar(name, value, int(step))
    if time.time() - self._last_flush >= self.flush_every_s:
      self._flush_rows()

  def drop_rows_after(self, step: int) -> None:
    """Removes the rows of steps after `step` (and a last line cut short by a killed process)
    from the file: a run resumed from `step` writes those steps again, so each step keeps one
    row, the same as in a run never stopped."""
    if not self.active or not self.path.exists():
      return
    self._flush_rows()
    lines = self.path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith('\n') and _row_step(line) is not None
            and _row_step(line) <= step]
    if len(kept) == len(lines):
      return
    if is_object_store(self.path):
      self.path.write_text(''.join(kept))
    else:  # never a half-written metrics file, even if this process is killed meanwhile
      tmp = self.path.parent / (self.path.name + '.tmp')
      tmp.write_text(''.join(kept))
      os.replace(tmp, self.path)

  def write_hparams(self, hparams: dict[str, bool | int | float | str]) -> None:
    """The run's hyper-parameters (flat name -> scalar or string) for TensorBoard's HParams
    dashboard, and as one text summary. Nothing without tensorboardX (config.json has them)."""
    if not self.active or self.tensorboard is None:
      return
    experiment, session_start, session_end = tb_summary.hparams(hparams, {})
    for proto in (experiment, session_start, session_end):
      self.tensorboard.file_writer.add_summary(proto)
    table = '\n'.join(f'| {name} | {value} |' for name, value in sorted(hparams.items()))
    self.tensorboard.add_text('hparams', '| name | value |\n|---|---|\n' + table, 0)
    self.tensorboard.flush()

  def _flush_rows(self) -> None:
    if self._rows:
      append_text(self.path, ''.join(self._rows))
      self._rows.clear()
    self._last_flush = time.time()

  def flush(self) -> None:
    """Writes the pending rows; TensorBoard flushes itself every 2 minutes and here."""
    if not self.active:
      return
    self._flush_rows()
    if self.tensorboard is not None:
      self.tensorboard.flush()

  def close(self) -> None:
    if not self.active:
      return
    self.flush()
    if self.tensorboard is not None:
      self.tensorboard.close()
      self.tensorboard = None

  def __enter__(self) -> 'MetricsWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------------------------------
# Progress lines


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Progress:
  """Prints `[name] step s/total  x steps/s  ETA h:mm:ss  metrics` (process 0 only)."""

  def __init__(self, name: str, total: int, start: int = 0):
    self.name, self.total = name, total
    self._t0, self._s0 = time.time(), start
    self._last_time, self._last_step = self._t0, start

  def update(self, step: int, metrics: dict | None = None) -> None:
    now = time.time()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    overall = (step - self._s0) / max(now - self._t0, 1e-9)
    eta = (self.total - step) / overall if overall > 0 else 0.0
    self._last_time, self._last_step = now, step
    shown = '  '.join(f'{k} {v:.4g}' for k, v in (metrics or {}).items())
    log(f'[{self.name}] step {step}/{self.total}  {rate:.2f} steps/s  '
        f'ETA {format_duration(eta)}  {shown}')
