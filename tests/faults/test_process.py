"""Process and checkpoint faults: the workdir lock, NaN/inf stops, unreadable checkpoints,
failed saves, SIGTERM/SIGINT and kill -9, and resumes with another config. Each case asserts
the exact outcome: the exception or exit status, the message's key words, and which files exist
and what they hold afterwards.

The fast cases call loop.run in-process on a toy state (the batch of step s is s + 1, so after
d steps w = d(d+1)/2); the ones that need a real process (kill -9, SIGTERM, two concurrent runs)
run `python -m kforcing_jax.main.train|distill` on configs/test_tiny.py and compare with one
undisturbed reference run (module fixture). Those share a persistent JAX compilation cache so
that each restart costs seconds, not a recompile.
"""

import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test_tiny
from kforcing_jax import checkpoints, cli, loop, progress, provenance, rundir, run_lock
from tests.test_loop import losses, toy_loop
from tests.test_progress import metrics_rows

REPO = Path(__file__).resolve().parents[2]


def steps_saved(workdir) -> list[int]:
  folder = Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() \
      else []


def saved_w(workdir, step) -> float:
  ckpt = checkpoints.Checkpointer(str(Path(workdir) / 'checkpoints'), async_save=False)
  try:
    state, _ = ckpt.restore(step, jax.eval_shape(lambda: {'w': jnp.zeros((), jnp.float32)}))
  finally:
    ckpt.close()
  return float(state['w'])


def dead_pid() -> int:
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait()
  return child.pid


def write_lock(workdir, **holder) -> Path:
  path = run_lock.lock_path(str(workdir))
  Path(workdir).mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(holder))
  return Path(path)


def record(**changes) -> dict:
  config = test_tiny.get_config()
  for name, value in changes.items():
    section, _, field = name.rpartition('.')
    (config[section] if section else config)[field] = value
  return provenance.run_record(config)


# ----------------------------------------------------------------------------- the lock


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
  holder = run_lock.RunLock(str(tmp_path))
  holder.acquire()
  t0 = time.time()
  with pytest.raises(run_lock.WorkdirLocked) as refused:
    loop.run(toy_loop(tmp_path, 4))
  assert time.time() - t0 < 5
  message = str(refused.value)
  assert f'host {socket.gethostname()}, pid {os.getpid()}, since ' in message
  assert 'in use by another run' in message and '--workdir' in message
  assert not (tmp_path / 'checkpoints').exists() and not (tmp_path / 'metrics.jsonl').exists()
  holder.release()
  assert not run_lock.lock_path(str(tmp_path)).exists()
  assert float(loop.run(toy_loop(tmp_path, 4))[0]['w']) == 10.0  # free again


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
  pid = dead_pid()
  write_lock(tmp_path, host=socket.gethostname(), pid=pid, start='2026-01-01T00:00:00+00:00')
  state, _ = loop.run(toy_loop(tmp_path, 4))
  assert float(state['w']) == 10.0
  assert f'taking over the stale lock {tmp_path / "run.lock"} (host ' \
         f'{socket.gethostname()}, pid {pid},' in capsys.readouterr().out
  assert not (tmp_path / 'run.lock').exists()  # released at the end


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
  # its pid cannot be checked from here: the live run there must not be broken into
  path = write_lock(tmp_path, host='elsewhere', pid=dead_pid(), start='2026-01-01T00:00:00')
  with pytest.raises(run_lock.WorkdirLocked, match='host elsewhere, pid '):
    loop.run(toy_loop(tmp_path, 4))
  assert path.exists() and not (tmp_path / 'checkpoints').exists()


def test_an_empty_lock_is_young_refused_and_old_taken_over(tmp_path):
  path = Path(run_lock.lock_path(str(tmp_path)))
  tmp_path.mkdir(exist_ok=True)
  path.write_text('')  # a holder between its O_EXCL create and its write
  with pytest.raises(run_lock.WorkdirLocked):
    loop.run(toy_loop(tmp_path, 2))
  old = time.time() - 60
  os.utime(path, (old, old))  # ... or one that died there
  assert float(loop.run(toy_loop(tmp_path, 2))[0]['w']) == 3.0
  assert not path.exists()


def test_the_lock_is_released_when_the_loop_raises(tmp_path):
  def batch_at(step):
    if step == 3:
      raise KeyError('boom')
    return jnp.float32(step + 1)
  with pytest.raises(KeyError):
    loop.run(toy_loop(tmp_path, 6, batch_at=batch_at))
  assert not (tmp_path / 'run.lock').exists()
  assert steps_saved(tmp_path) == [2]


# ----------------------------------------------------------------------------- keep_checkpoints


@pytest.mark.parametrize('kind, field', [('ar', 'train.keep_checkpoints'),
                                         ('pflm', 'distill.keep_checkpoints')])
def test_keep_checkpoints_0_is_an_error_naming_the_field(tmp_path, kind, field):
  with pytest.raises(ValueError, match=rf'{field} must be >= 1 \(got 0\)'):
    loop.run(toy_loop(tmp_path, 4, keep_checkpoints=0, meta={'kind': kind}))
  assert list(tmp_path.iterdir()) == []  # refused before anything is written


# ----------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize('bad_step, last_run', [(4, 5), (5, 5)])
def test_a_nan_loss_stops_within_one_log_interval_and_is_never_saved(tmp_path, bad_step,
                                                                     last_run):
  # bad_step 4: step 5's loss is NaN, seen at its flush after the next step ran; bad_step 5:
  # step 6 is a checkpoint step, whose metrics are checked before its save.
  seen = []
  def batch_at(step):
    seen.append(step)
    return jnp.float32(np.nan if step == bad_step else step + 1)
  with pytest.raises(loop.NonFiniteLoss) as stopped:
    loop.run(toy_loop(tmp_path, 10, batch_at=batch_at))
  message = str(stopped.value)
  assert message.startswith(f'[toy] non-finite loss nan at step {bad_step + 1}; stopped '
                            '(newest checkpoint: step 4, nothing non-finite saved)')
  assert 'Check the data of that step' in message and 'in a fresh --workdir' in message
  assert 'a lower train.learning_rate' in message and 'bfloat16' in message
  assert seen == list(range(last_run + 1))  # log_every is 2
  assert steps_saved(tmp_path) == [2, 4] and saved_w(tmp_path, 4) == 10.0
  rows = metrics_rows(tmp_path / 'metrics.jsonl')  # strict JSON: NaN written as null
  assert rows[-1]['step'] == bad_step + 1 and rows[-1]['loss'] is None
  assert not (tmp_path / 'run.lock').exists()


def test_an_infinite_grad_norm_stops(tmp_path):
  def step_fn(state, batch):
    return {'w': state['w'] + 1}, {'loss': state['w'], 'grad_norm': jnp.inf * (batch > 2)}
  with pytest.raises(loop.NonFiniteLoss, match='non-finite grad_norm inf at step 3;'):
    loop.run(dataclasses.replace(toy_loop(tmp_path, 8), train_step=step_fn))
  assert steps_saved(tmp_path) == [2]


def test_a_non_finite_state_with_a_finite_loss_is_not_saved(tmp_path):
  def step_fn(state, batch):  # the update overflows; the loss (of the old state) does not show it
    return {'w': state['w'] * batch}, {'loss': jnp.float32(1.0)}
  inf_batch = lambda step: jnp.float32(np.inf if step == 3 else 1.0)  # noqa: E731
  with pytest.raises(loop.NonFiniteLoss, match='non-finite parameters or optimizer state at '
                                               r'step 4; stopped \(newest checkpoint: step 2'):
    loop.run(dataclasses.replace(toy_loop(tmp_path, 8, batch_at=inf_batch), train_step=step_fn))
  assert steps_saved(tmp_path) == [2]


def test_json_the_project_writes_is_valid_with_nan_and_inf(tmp_path):
  value = {'nan': float('nan'), 'inf': np.float32(np.inf), 'arr': jnp.array([1.0, -np.inf]),
           'nested': [(np.nan, 2)]}
  progress.write_json(tmp_path / 'eval.json', value)
  strict = json.loads((tmp_path / 'eval.json').read_text(),
                      parse_constant=lambda name: pytest.fail(f'{name} in JSON'))
  assert strict == {'nan': None, 'inf': None, 'arr': [1.0, None], 'nested': [[None, 2]]}
  with progress.MetricsWriter(tmp_path) as writer:
    writer.write(3, {'loss': float('nan'), 'acc': 0.5})
  assert [{k: v for k, v in row.items() if k != 'time'}
          for row in metrics_rows(tmp_path / 'metrics.jsonl')] == [
              {'step': 3, 'loss': None, 'acc': 0.5}]


# ----------------------------------------------------------------------------- checkpoints


def garble(path: Path) -> None:
  data = path.read_bytes()
  path.write_bytes(bytes(b ^ 0xFF for b in data[:64]) + data[64:])


@pytest.mark.parametrize('damage', ['garbled', 'truncated', 'metadata_deleted'])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, damage):
  loop.run(toy_loop(tmp_path, 6))
  assert steps_saved(tmp_path) == [4, 6]
  state_dir = tmp_path / 'checkpoints' / '6' / 'state'
  if damage == 'metadata_deleted':
    (state_dir / '_METADATA').unlink()
  else:
    files = [p for p in state_dir.rglob('*') if p.is_file() and p.parent.name == 'd']
    assert files, sorted(state_dir.rglob('*'))
    for path in files:
      garble(path) if damage == 'garbled' else path.write_bytes(path.read_bytes()[:10])
  capsys.readouterr()
  state, last_eval = loop.run(toy_loop(tmp_path, 8))
  out = capsys.readouterr().out
  assert 'checkpoint step 6 is unreadable (' in out
  assert '); resuming from step 4 (step 6 deleted)' in out
  assert '[toy] resumed from step 4' in out
  assert float(state['w']) == 36.0 and last_eval == {'loss': 36.0}  # as if never damaged
  assert losses(tmp_path) == {d: float(d * (d + 1)) for d in range(1, 9)}
  assert steps_saved(tmp_path) == [6, 8] and saved_w(tmp_path, 6) == 21.0


def test_all_checkpoints_unreadable_is_a_clear_error(tmp_path):
  loop.run(toy_loop(tmp_path, 4))
  for step in (2, 4):
    (tmp_path / 'checkpoints' / str(step) / 'state' / '_METADATA').unlink()
  with pytest.raises(ValueError) as refused:
    loop.run(toy_loop(tmp_path, 6))
  message = str(refused.value)
  assert message.startswith(f'no usable checkpoint in {tmp_path / "checkpoints"} (step 4: ')
  assert '; step 2: ' in message and 'fresh --workdir' in message
  assert steps_saved(tmp_path) == [2, 4]  # nothing deleted: the user decides
  assert not (tmp_path / 'run.lock').exists()


def test_a_checkpoint_holding_nan_is_not_resumed(tmp_path, capsys):
  loop.run(toy_loop(tmp_path, 4))
  ckpt = checkpoints.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  ckpt.save(6, {'w': jnp.float32(np.nan)}, {'step': 6})  # e.g. written by an older version
  ckpt.close()
  state, _ = loop.run(toy_loop(tmp_path, 6))
  assert 'checkpoint step 6 is unreadable (it holds NaN or infinite values); resuming from ' \
         'step 4' in capsys.readouterr().out
  assert float(state['w']) == 21.0 and saved_w(tmp_path, 6) == 21.0


def test_a_failed_save_stops_the_run_at_once(tmp_path, monkeypatch):
  save = ocp.CheckpointManager.save
  def full_disk(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(28, 'No space left on device')
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_disk)
  seen = []
  batch_at = lambda step: seen.append(step) or jnp.float32(step + 1)  # noqa: E731
  with pytest.raises(checkpoints.SaveFailed) as stopped:
    loop.run(toy_loop(tmp_path, 10, batch_at=batch_at))
  assert str(stopped.value) == (f'saving checkpoint step 4 to {tmp_path / "checkpoints"} '
                                'failed: OSError: [Errno 28] No space left on device')
  assert seen == [0, 1, 2, 3]  # not one step more
  assert steps_saved(tmp_path) == [2] and saved_w(tmp_path, 2) == 3.0
  assert not (tmp_path / 'run.lock').exists()


def test_a_failed_asynchronous_save_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
  saves = []
  monkeypatch.setattr(ocp.CheckpointManager, 'save',
                      lambda self, step, *a, **k: saves.append(step))
  def check(self):
    if saves:  # the background write of the first save failed
      raise OSError(5, 'Input/output error')
  monkeypatch.setattr(ocp.CheckpointManager, 'check_for_errors', check)
  seen = []
  batch_at = lambda step: seen.append(step) or jnp.float32(step + 1)  # noqa: E731
  with pytest.raises(checkpoints.SaveFailed, match=r'failed: OSError: \[Errno 5\] Input/output'):
    loop.run(toy_loop(tmp_path, 10, batch_at=batch_at))
  assert saves == [2] and seen == [0, 1, 2]


# ----------------------------------------------------------------------------- resume config


def test_a_resume_with_other_steps_or_lr_is_refused_naming_the_keys(tmp_path):
  loop.run(toy_loop(tmp_path, 4, config_record=record(), meta={'kind': 'ar'}))
  changed = record(**{'train.steps': 99, 'train.learning_rate': 0.1})
  with pytest.raises(ValueError) as refused:
    loop.run(toy_loop(tmp_path, 6, config_record=changed, meta={'kind': 'ar'}))
  assert str(refused.value) == (
      f'resuming {tmp_path} with a different config: train.learning_rate 0.003 -> 0.1, '
      'train.steps 40 -> 99; use the original config or a fresh --workdir')
  assert steps_saved(tmp_path) == [2, 4]
  assert provenance.read_run_config(tmp_path)['config']['train']['steps'] == 40


def test_a_resume_may_change_logging_saving_paths_and_mesh(tmp_path):
  loop.run(toy_loop(tmp_path, 4, config_record=record(), meta={'kind': 'ar'}))
  free = record(**{'train.log_every': 1, 'train.eval_every': 3, 'train.checkpoint_every': 7,
                   'train.keep_checkpoints': 5, 'train.eval_batches': 9,
                   'train.profile_steps': 2, 'data.data_dir': '/elsewhere',
                   'mesh_shape': (1, -1, 1), 'decode.gen_len': 99,
                   'distill.learning_rate': 0.5})  # a teacher does not read distill.*
  state, _ = loop.run(toy_loop(tmp_path, 6, config_record=free, meta={'kind': 'ar'}))
  assert float(state['w']) == 21.0


def test_a_stage_resume_is_held_to_its_own_stage_only(tmp_path):
  meta = {'kind': 'pflm', 'k': 2}
  loop.run(toy_loop(tmp_path, 4, config_record=record(), meta=meta))
  others = record(**{'distill.stages': ((1, 20), (2, 20), (4, 50), (8, 10)),
                     'train.learning_rate': 1.0})  # the teacher's: checked by its fingerprint
  loop.run(toy_loop(tmp_path, 6, config_record=others, meta=meta))
  own = record(**{'distill.stages': ((1, 20), (2, 30), (4, 20))})
  with pytest.raises(ValueError, match=r'different config: distill.stages k=2 steps 20 -> 30;'):
    loop.run(toy_loop(tmp_path, 8, config_record=own, meta=meta))
  with pytest.raises(ValueError, match=r'different config: seed 0 -> 1;'):
    loop.run(toy_loop(tmp_path, 8, config_record=record(seed=1), meta=meta))


def test_a_key_added_by_a_code_change_does_not_block_a_resume(tmp_path):
  older = record()
  del older['config']['model']['noise_scale']  # config.json written before the key existed
  loop.run(toy_loop(tmp_path, 4, config_record=older))
  assert float(loop.run(toy_loop(tmp_path, 6, config_record=record()))[0]['w']) == 21.0


def test_a_resume_drops_the_rows_a_killed_run_wrote_after_its_checkpoint(tmp_path):
  loop.run(toy_loop(tmp_path, 4))
  with (tmp_path / 'metrics.jsonl').open('a') as f:  # steps 5, 6 and a line cut by kill -9
    f.write('{"step": 5, "time": 0, "loss": 1.0}\n{"step": 6, "time": 0, "loss": 2.0}\n{"st')
  loop.run(toy_loop(tmp_path, 6))
  rows = metrics_rows(tmp_path / 'metrics.jsonl')
  assert [row['step'] for row in rows] == [1, 2, 3, 4, 4, 5, 6, 6]  # loss and val_loss rows
  assert losses(tmp_path) == {d: float(d * (d + 1)) for d in range(1, 7)}


# ----------------------------------------------------------------------------- signals, in-process


@pytest.mark.parametrize('signum, code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_at_the_next_step_boundary_and_resumes_exactly(tmp_path, capsys, signum,
                                                                      code):
  def batch_at(step):
    if step == 2:  # arrives while step 3 runs (after step 2's checkpoint)
      os.kill(os.getpid(), signum)
    return jnp.float32(step + 1)
  before = signal.getsignal(signum)
  with pytest.raises(loop.Preempted) as stopped:
    loop.run(toy_loop(tmp_path, 10, batch_at=batch_at))
  assert stopped.value.exit_code == code and stopped.value.step == 3
  assert '[toy] preempted at step 3; checkpoint saved; rerun the same command to resume' in \
      capsys.readouterr().out
  assert signal.getsignal(signum) is before  # handlers restored
  assert steps_saved(tmp_path) == [2, 3] and saved_w(tmp_path, 3) == 6.0
  assert not (tmp_path / 'run.lock').exists()
  state, _ = loop.run(toy_loop(tmp_path, 10))
  assert float(state['w']) == 55.0
  assert losses(tmp_path) == {d: float(d * (d + 1)) for d in range(1, 11)}
  assert [row['step'] for row in metrics_rows(tmp_path / 'metrics.jsonl')
          if 'loss' in row] == list(range(1, 11))  # each step once


def test_a_signal_at_an_evaluation_step_keeps_that_steps_val_row(tmp_path):
  # a resume starts after the saved step and never re-runs its evaluation, so the evaluation
  # due at the preempted step must be written before the save (a CI run once lost it)
  def rows(workdir):
    return [{k: v for k, v in row.items() if k != 'time'}
            for row in metrics_rows(workdir / 'metrics.jsonl')]

  def batch_at(step):
    if step == 3:  # arrives while step 4 runs: an evaluation step (eval_every 4)
      os.kill(os.getpid(), signal.SIGTERM)
    return jnp.float32(step + 1)
  with pytest.raises(loop.Preempted) as stopped:
    loop.run(toy_loop(tmp_path / 'stopped', 10, batch_at=batch_at))
  assert stopped.value.step == 4
  assert rows(tmp_path / 'stopped')[-1] == {'step': 4, 'val_loss': 10.0}
  loop.run(toy_loop(tmp_path / 'stopped', 10))
  loop.run(toy_loop(tmp_path / 'undisturbed', 10))
  assert rows(tmp_path / 'stopped') == rows(tmp_path / 'undisturbed')


@pytest.mark.parametrize('error, code, line', [
    (run_lock.WorkdirLocked('runs/x is in use by another run'), 3,
     'error: runs/x is in use by another run\n'),
    (loop.NonFiniteLoss('[t] non-finite loss nan at step 5'), 4,
     'error: [t] non-finite loss nan at step 5\n'),
    (checkpoints.SaveFailed('saving checkpoint step 4 failed'), 5,
     'error: saving checkpoint step 4 failed\n'),
    (ValueError('resuming x with a different config'), 2,
     'error: resuming x with a different config\n'),
    (loop.Preempted('preempted at step 3', 3, signal.SIGTERM), 143, ''),
    (KeyboardInterrupt(), 130, 'interrupted\n'),
], ids=['locked', 'non_finite', 'save_failed', 'bad_input', 'preempted', 'ctrl_c'])
def test_cli_turns_each_stop_into_its_exit_status(monkeypatch, capsys, error, code, line):
  def main(argv):
    raise error
  monkeypatch.setattr(sys, 'argv', ['prog'])
  monkeypatch.delenv('KFORCING_TRACEBACK', raising=False)
  with pytest.raises(SystemExit) as exited:
    cli.run(main)
  assert exited.value.code == code
  assert capsys.readouterr().err == line


# ----------------------------------------------------------------------------- real processes


@pytest.fixture(scope='module')
def procs(tiny_data_dir, tmp_path_factory):
  """Starts `python -m kforcing_jax.main.<main>` runs on configs/test_tiny.py (teacher 40 steps,
  stage k=1 20 steps), with the module's shared compilation cache."""
  root = tmp_path_factory.mktemp('procs')
  cache = root / 'jax_cache'

  class Procs:
    def __init__(self):
      self.count = 0

    def start(self, main, workdir, *extra, cached=True):
      self.count += 1
      log = root / f'log{self.count}.txt'
      env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
      env.pop('KFORCING_TRACEBACK', None)
      if cached:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
      command = [sys.executable, '-m', f'kforcing_jax.main.{main}',
                 '--config=configs/test_tiny.py', f'--workdir={workdir}',
                 f'--config.data.data_dir={tiny_data_dir}', *extra]
      handle = log.open('w')
      process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle,
                                 stderr=subprocess.STDOUT)
      process.log = log
      return process

    def finish(self, process, timeout=300):
      rc = process.wait(timeout=timeout)
      return rc, process.log.read_text()

    def run(self, main, workdir, *extra):
      rc, out = self.finish(self.start(main, workdir, *extra))
      assert rc == 0, out[-3000:]
      return out

  return Procs()


def train_rows(directory) -> list[dict]:
  """metrics.jsonl without the wall-clock times: what a resumed run must reproduce bit for bit
  (JSON floats round-trip exactly)."""
  return [{k: v for k, v in row.items() if k != 'time'}
          for row in metrics_rows(Path(directory) / 'metrics.jsonl')]


def results(directory) -> dict:
  found = json.loads((Path(directory) / 'eval.json').read_text())
  return {k: v for k, v in found.items() if k != 'seconds'}


def stage1(workdir) -> Path:
  return Path(rundir.stage_dir(str(workdir), 1))


def teacher(workdir) -> Path:
  return Path(rundir.teacher_dir(str(workdir)))


@pytest.fixture(scope='module')
def reference(procs, tmp_path_factory):
  """One undisturbed teacher + stage k=1 run."""
  workdir = tmp_path_factory.mktemp('reference')
  procs.run('train', workdir)
  procs.run('distill', workdir, '--stage=1')
  return workdir


def wait_for_row(process, metrics: Path, step: int, timeout=240) -> int:
  """Polls until metrics.jsonl has a row of `step` or later; returns the newest step seen."""
  t0 = time.time()
  while time.time() - t0 < timeout:
    if process.poll() is not None:
      raise AssertionError(f'finished before step {step}: {process.log.read_text()[-3000:]}')
    if metrics.exists():
      steps = [row['step'] for row in map(json.loads, metrics.read_text().splitlines()[:-1])]
      if steps and steps[-1] >= step:
        return steps[-1]
    time.sleep(0.005)
  raise AssertionError(f'no step {step} within {timeout}s')


def with_teacher_of(reference, workdir) -> Path:
  """A run directory whose teacher is the reference's (a stage test needs no teacher run)."""
  shutil.copytree(teacher(reference), teacher(workdir))
  return workdir


def random_step_program(program: str, reference, workdir):
  """(main, extra flags, model directory of workdir, total steps) of the teacher or the k=1
  stage; the stage's workdir gets the reference's teacher."""
  if program == 'teacher':
    return 'train', (), teacher, 40
  with_teacher_of(reference, workdir)
  return 'distill', ('--stage=1',), stage1, 20


@pytest.mark.slow
@pytest.mark.parametrize('program', ['teacher', 'stage'])
def test_kill_9_at_a_random_step_resumes_bitwise(procs, reference, tmp_path, program):
  main, extra, directory, total = random_step_program(program, reference, tmp_path)
  target = random.randint(3, total - 6)
  process = procs.start(main, tmp_path, *extra)
  seen = wait_for_row(process, directory(tmp_path) / 'metrics.jsonl', target)
  process.kill()
  assert process.wait() == -signal.SIGKILL, f'target step {target}'
  assert (directory(tmp_path) / 'run.lock').exists()  # left behind: taken over below
  out = procs.run(main, tmp_path, *extra)
  assert 'taking over the stale lock' in out
  assert train_rows(directory(tmp_path)) == train_rows(directory(reference)), \
      f'killed at step ~{seen} (target {target})'
  assert results(directory(tmp_path)) == results(directory(reference))
  assert not (directory(tmp_path) / 'run.lock').exists() and not (tmp_path / 'run.lock').exists()


@pytest.mark.slow
@pytest.mark.parametrize('program', ['teacher', 'stage'])
def test_sigterm_at_a_random_step_saves_exits_143_and_resumes_bitwise(procs, reference,
                                                                       tmp_path, program):
  main, extra, directory, total = random_step_program(program, reference, tmp_path)
  target = random.randint(3, total - 8)
  process = procs.start(main, tmp_path, *extra)
  wait_for_row(process, directory(tmp_path) / 'metrics.jsonl', target)
  process.send_signal(signal.SIGTERM)
  rc, out = procs.finish(process)
  assert rc == 143, f'target step {target}: {out[-3000:]}'
  saved = [line for line in out.splitlines() if 'preempted at step' in line]
  assert len(saved) == 1 and saved[0].endswith('; checkpoint saved; rerun the same command to '
                                               'resume'), out[-3000:]
  step = int(saved[0].split('preempted at step ')[1].split(';')[0])
  assert target <= step < total
  assert step in steps_saved(directory(tmp_path))
  assert train_rows(directory(tmp_path))[-1]['step'] == step
  assert not (directory(tmp_path) / 'eval.json').exists()
  assert not (directory(tmp_path) / 'run.lock').exists() and not (tmp_path / 'run.lock').exists()
  out = procs.run(main, tmp_path, *extra)
  assert f'resumed from step {step}' in out
  assert train_rows(directory(tmp_path)) == train_rows(directory(reference))
  assert results(directory(tmp_path)) == results(directory(reference))


@pytest.mark.slow
def test_sigterm_before_training_exits_143_and_releases_the_lock(procs, tmp_path):
  # SIGTERM while the run starts up (the loop's own saving handler is not installed yet)
  process = procs.start('train', tmp_path)
  t0 = time.time()
  while not (tmp_path / 'run.lock').exists():
    assert process.poll() is None and time.time() - t0 < 120, process.log.read_text()[-3000:]
    time.sleep(0.01)
  process.send_signal(signal.SIGTERM)
  rc, out = procs.finish(process)
  assert rc == 143 and 'Traceback' not in out, out[-3000:]
  assert not (tmp_path / 'run.lock').exists()
  assert not (teacher(tmp_path) / 'run.lock').exists()
  assert steps_saved(teacher(tmp_path)) == []


@pytest.mark.slow
def test_a_nan_loss_in_a_real_run_exits_4_and_exports_nothing(procs, tmp_path):
  # a learning rate that overflows the parameters in the first updates
  process = procs.start('train', tmp_path, '--config.train.learning_rate=1e30')
  rc, out = procs.finish(process)
  assert rc == 4, out[-3000:]
  errors = [line for line in out.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and errors[0].startswith('error: [AR teacher] non-finite '), out[-3000:]
  assert 'train.learning_rate' in errors[0] and 'Traceback' not in out
  step = int(errors[0].split(' at step ')[1].split(';')[0])
  assert step <= 10, errors[0]  # log_every 5, checkpoint_every 10: caught at its flush
  directory = teacher(tmp_path)
  assert steps_saved(directory) == []  # step 10's save comes after the check
  assert not (directory / 'params').exists() and not (directory / 'eval.json').exists()
  rows = train_rows(directory)  # strict JSON, the non-finite values as null
  assert rows[-1]['step'] == step and None in rows[-1].values()
  assert not (directory / 'run.lock').exists() and not (tmp_path / 'run.lock').exists()


@pytest.mark.slow
def test_a_second_concurrent_train_refuses_within_5s_and_the_first_is_undisturbed(
    procs, reference, tmp_path):
  # The first run compiles without the shared cache, so it surely still runs while the second
  # starts; it is paused (SIGSTOP) meanwhile so that the 2-vCPU test machine times the second
  # run's own refusal, not its competition with a compile. Pausing changes no result.
  first = procs.start('train', tmp_path, cached=False)
  lock = tmp_path / 'run.lock'
  t0 = time.time()
  while not lock.exists():
    assert first.poll() is None and time.time() - t0 < 120, first.log.read_text()[-3000:]
    time.sleep(0.01)
  first.send_signal(signal.SIGSTOP)
  t0 = time.time()
  try:
    rc, out = procs.finish(procs.start('train', tmp_path))
  finally:
    first.send_signal(signal.SIGCONT)
  elapsed = time.time() - t0
  assert rc == 3, out[-3000:]
  assert elapsed < 5, f'refused after {elapsed:.1f}s'
  errors = [line for line in out.splitlines() if line.startswith('error:')]
  assert errors == [f'error: {tmp_path} is in use by another run (host {socket.gethostname()}, '
                    f'pid {first.pid}, since {json.loads(lock.read_text())["start"]}); wait for '
                    f'it to finish or use another --workdir (if that run is gone, delete '
                    f'{lock})'], out[-3000:]
  assert 'Traceback' not in out
  rc, out = procs.finish(first)
  assert rc == 0, out[-3000:]
  assert train_rows(teacher(tmp_path)) == train_rows(teacher(reference))
  assert results(teacher(tmp_path)) == results(teacher(reference))
  assert not lock.exists()
