"""The flags every absl main shares (--config, --workdir), defined once.

Mains stay thin: parse flags, `distributed.initialize()`, call `run(config, workdir)`.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file '
                                         '(configs/<name>.py); override fields with '
                                         '--config.train.steps=100 etc.', lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Run directory: teacher/, student_k*/, '
                              'report/.')


def quiet_libraries() -> None:
  """Keep orbax/absl INFO chatter out of the progress output (warnings still show)."""
  logging.set_verbosity(logging.WARNING)


def run(main) -> None:
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
  app.run(guarded)
