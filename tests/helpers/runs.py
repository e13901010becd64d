"""Tiny real runs shared by tests: a teacher, then a distillation stage."""

from kforcing_jax import distill, teacher


def teacher_then_k1_stage(config, tmp_path, teacher_steps: int, steps: int, **distill_fields):
  """Trains config's teacher for teacher_steps, then stage k=1 alone for `steps` (evaluated at
  its end) with config.distill fields set from distill_fields; returns distill.run's result."""
  config.train.steps = teacher_steps
  teacher.run(config, str(tmp_path))
  config.distill.stages = ((1, steps),)
  config.distill.eval_every = steps
  for field, value in distill_fields.items():
    config.distill[field] = value
  return distill.run(config, str(tmp_path))

