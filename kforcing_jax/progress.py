"""Progress lines (steps/s, ETA) and JSON-lines metrics for every long loop."""

import json
import os
import time

import jax


def is_main_process() -> bool:
  return jax.process_index() == 0


class MetricsWriter:
  """Appends one JSON object per line to <dir>/metrics.jsonl (process 0 only)."""

  def __init__(self, directory: str, filename: str = 'metrics.jsonl'):
    self.path = os.path.join(directory, filename)
    if is_main_process():
      os.makedirs(directory, exist_ok=True)

  def write(self, step: int, metrics: dict) -> None:
    if not is_main_process():
      return
    row = {'step': int(step), 'time': time.time()}
    row.update({k: float(v) for k, v in metrics.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')


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
    if is_main_process():
      print(f'[{self.name}] step {step}/{self.total}  {rate:.2f} steps/s  '
            f'ETA {format_duration(eta)}  {shown}', flush=True)
