"""The flags every absl main shares (--config, --workdir), defined once.

Mains stay thin: parse flags, `distributed.initialize()`, call `run(config, workdir)`.
"""

from absl import flags, logging
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file '
                                         '(configs/<name>.py); override fields with '
                                         '--config.train.steps=100 etc.', lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Run directory: teacher/, student_k*/, '
                              'report/.')


def quiet_libraries() -> None:
  """Keep orbax/absl INFO chatter out of the progress output (warnings still show)."""
  logging.set_verbosity(logging.WARNING)
