"""What every absl main shares: the flags (--config, --workdir, the multi-host ones), quiet
libraries, distributed start-up and the error guard.

A main under kforcing_jax/main/ is then one line over a library call:

    cli.main(teacher.run)                   # parse, start up, run(config, workdir)
    cli.main(distill.run, only_stage=lambda: _STAGE.value)   # plus a flag of its own

and a main whose library call is not `run(config, workdir, ...)` (convert, reproduce) wraps its
own `main(argv)` in `cli.run`, calling `start()` first.
"""

import os
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from kforcing_jax import config_checks, distributed

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
    except (FileNotFoundError, ValueError) as e:
      if os.environ.get('KFORCING_TRACEBACK'):
        raise
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.exit(2)
  app.run(guarded, flags_parser=config_checks.parse_flags)


def main(run_fn: Callable, **kwargs: Callable[[], object]) -> None:
  """The whole main of a `run(config, workdir, ...)` library function: --config is required;
  each keyword is a flag reader whose value is passed as that keyword argument."""
  def entry(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    start()
    config_checks.check(CONFIG.value)
    run_fn(CONFIG.value, WORKDIR.value, **{name: read() for name, read in kwargs.items()})

  flags.mark_flags_as_required(['config'])
  run(entry)
