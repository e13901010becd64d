"""One writer per directory: a lock file created with O_EXCL that names its holder.

  with run_lock.hold(directory):      # <directory>/run.lock holds {host, pid, start}
    ...                               # a second writer gets WorkdirLocked at once

Two runs on one run directory would interleave their checkpoints and metrics silently, so the
writing mains take the run directory's lock (cli.main) and loop.run takes its model directory's
(teacher/, student_k*/, the evaluator's teacher/). A lock left by a process that died without
releasing it (kill -9, a crash of the machine's power) is recognised when its holder ran on
this host and that pid no longer exists; it is taken over with a log line. A lock from another
host cannot be checked from here and is reported instead (delete the file by hand when that
host's run is really gone).

Only process 0 of a multi-host run takes the lock: the directory is one shared place (an object
store bucket) for the whole run, and process 0's pid/host stands for it; a second launch's
process 0 then refuses, and its other processes stop with it when the distributed runtime
goes down. Object-store paths (gs://) have no atomic exclusive create through epath, so no lock
is taken there (a run on a bucket relies on its scheduler to start it once).
"""

import contextlib
import datetime
import json
import os
import socket

from etils import epath

from kforcing_jax import progress

LOCK_NAME = 'run.lock'


class WorkdirLocked(Exception):
  """Another live process writes to the directory."""
  exit_code = 3


def lock_path(directory: str) -> epath.Path:
  return epath.Path(directory) / LOCK_NAME


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def _read_holder(path: epath.Path) -> dict | None:
  """The holder recorded in the lock file; None when it is gone or half-written."""
  try:
    holder = json.loads(path.read_text())
  except (FileNotFoundError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def _describe(holder: dict) -> str:
  return f'host {holder.get("host")}, pid {holder.get("pid")}, since {holder.get("start")}'


class RunLock:
  """The lock of `directory` (see the module doc). acquire() raises WorkdirLocked."""

  def __init__(self, directory: str):
    self.directory = directory
    self.path = lock_path(directory)
    self.record = {'host': socket.gethostname(), 'pid': os.getpid(),
                   'start': datetime.datetime.now(datetime.timezone.utc)
                   .isoformat(timespec='seconds')}
    self.held = False

  def acquire(self) -> None:
    if progress.is_object_store(self.directory) or not progress.is_main_process():
      return
    os.makedirs(self.directory, exist_ok=True)
    # Two tries: the second after removing a stale lock (another process may win that race,
    # and then this one reports it as the holder).
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        if not self._remove_if_stale():
          break
        continue
      with os.fdopen(fd, 'w') as f:
        f.write(json.dumps(self.record) + '\n')
      self.held = True
      return
    holder = _read_holder(self.path) or {}
    raise WorkdirLocked(
        f'{self.directory} is in use by another run ({_describe(holder)}); wait for it to '
        f'finish or use another --workdir (if that run is gone, delete {self.path})')

  def _remove_if_stale(self) -> bool:
    """Removes the lock when its holder is a dead process of this host; True when it did."""
    holder = _read_holder(self.path)
    if holder is None:
      # Created but not yet written: a live holder writes within microseconds; a holder that
      # died in between left an empty file for good. Only the latter is old.
      try:
        age = datetime.datetime.now().timestamp() - os.path.getmtime(self.path)
      except FileNotFoundError:
        return True
      if age < 10:
        return False
      holder = {}
    elif holder.get('host') != self.record['host'] or _pid_alive(int(holder.get('pid', -1))):
      return False
    progress.log(f'taking over the stale lock {self.path} ({_describe(holder)}: that process '
                 'is gone)')
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.path)
    return True

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    # only our own lock: a user who deleted it and started another run keeps theirs
    if _read_holder(self.path) == self.record:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.path)

  def __enter__(self) -> 'RunLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def hold(directory: str) -> RunLock:
  """A context manager holding `directory`'s lock."""
  return RunLock(directory)
