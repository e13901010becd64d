"""What every absl main shares: the flags (--config, --workdir, the multi-host ones), quiet
libraries, distributed start-up and the error guard.

A main under kforcing_jax/main/ is then one line over a library call:

    cli.main(teacher.run, lock_workdir=True)   # parse, start up, lock, run(config, workdir)
    cli.main(distill.run, lock_workdir=True, only_stage=lambda: _STAGE.value)  # + a flag

and a main whose library call is not `run(config, workdir, ...)` (convert, reproduce) wraps its
own `main(argv)` in `cli.run`, calling `start()` first.

Exit status of every main (`run`):
    0    done
    1    a bug: an unexpected exception, with its traceback
    2    bad input (config value, flag, missing or unreadable file, mismatched or unusable
         checkpoints, a resume with a config that changes the math): one `error:` line
    3    the run directory is in use by another live process (run_lock): one `error:` line
    4    the loss or gradient norm became NaN/inf (loop.NonFiniteLoss): one `error:` line;
         the checkpoints hold the last finite state only
    5    a checkpoint could not be written (disk full, permissions): one `error:` line
    143  stopped by SIGTERM (preemption, e.g. a spot VM): in training, after saving a
         checkpoint at the next step boundary; elsewhere (start-up, export) at once, with
         nothing to lose. Rerun the same command to resume exactly
    130  the same for SIGINT (Ctrl-C; a second Ctrl-C stops at once, unsaved)
"""

import contextlib
import os
import signal
import sys
import threading
from typing import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from kforcing_jax import checkpoints, config_checks, distributed, loop, run_lock

CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file '
                                         '(configs/<name>.py); override fields with '
                                         '--config.train.steps=100 etc.', lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Run directory (its layout: '
                              'kforcing_jax/rundir.py).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Total processes (multi-host).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (multi-host).')


def quiet_libraries() -> None:
  """Keep orbax/absl INFO chatter out of the progress output (warnings still show)."""
  logging.set_verbosity(logging.WARNING)


def start() -> None:
  """Quiet the libraries and join the cluster (when the flags or the environment say so)."""
  quiet_libraries()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def config_file() -> str:
  """The --config file name as given (for reports)."""
  return config_flags.get_config_filename(flags.FLAGS['config'])


def run(main: Callable) -> None:
  """`absl.app.run(main)`, with errors a user can cause (bad config value, missing data or
  checkpoint, mismatched shapes) printed as one line instead of a traceback. Set
  KFORCING_TRACEBACK=1 to see the traceback anyway."""
  def guarded(argv):
    try:
      return main(argv)
    except loop.Preempted as e:  # not an error: the loop logged where to resume from
      sys.exit(e.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one outside it
      print('interrupted', file=sys.stderr, flush=True)
      sys.exit(128 + signal.SIGINT)
    except (FileNotFoundError, ValueError, run_lock.WorkdirLocked, loop.NonFiniteLoss,
            checkpoints.SaveFailed) as e:
      if os.environ.get('KFORCING_TRACEBACK'):
        raise
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.exit(getattr(e, 'exit_code', 2))
  app.run(guarded, flags_parser=config_checks.parse_flags)


def _exit_on_signal(signum, frame) -> None:
  del frame
  sys.exit(128 + signum)


def main(run_fn: Callable, lock_workdir: bool = False, **kwargs: Callable[[], object]) -> None:
  """The whole main of a `run(config, workdir, ...)` library function: --config is required;
  each keyword is a flag reader whose value is passed as that keyword argument.

  lock_workdir: the main writes the run directory (train, distill, pipeline), so it holds
  <workdir>/run.lock while it runs (run_lock): a second writer on the same directory refuses
  before it compiles anything (exit 3). The loop locks each model directory as well."""
  def entry(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    start()  # first: the lock asks jax which process this is, which fixes the cluster
    # before the lock, which creates the workdir: a refused config leaves nothing behind
    config_checks.check(CONFIG.value)
    with run_lock.hold(WORKDIR.value) if lock_workdir else contextlib.nullcontext():
      if (lock_workdir and threading.current_thread() is threading.main_thread()
          and jax.process_count() == 1):
        # outside the training loop (which saves first, loop.Preempted) SIGTERM ends the run
        # as an exception, so the lock is released on the way out (multi-host: jax's
        # preemption notifier owns SIGTERM)
        signal.signal(signal.SIGTERM, _exit_on_signal)
      run_fn(CONFIG.value, WORKDIR.value, **{name: read() for name, read in kwargs.items()})

  flags.mark_flags_as_required(['config'])
  run(entry)
