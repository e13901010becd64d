"""Train the AR teacher: `python -m kforcing_jax.main.train --config=configs/<name>.py
--workdir=DIR` (resumes from DIR's newest checkpoint; skipped when it is done)."""

from kforcing_jax import cli, teacher

if __name__ == '__main__':
  cli.main(teacher.run, lock_workdir=True)
