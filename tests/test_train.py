"""Teacher training: the loss goes down, and a killed-and-resumed run repeats the same losses."""

import json
import os

import pytest

from kforcing_jax import checkpoints, teacher
from kforcing_jax.data import pipeline


def read_metrics(workdir):
  """step -> last logged training loss (a resumed run re-logs steps; the last one counts)."""
  losses = {}
  with open(os.path.join(workdir, 'teacher', 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if 'loss' in row:
        losses[row['step']] = row['loss']
  return losses


def test_training_lowers_loss_and_writes_outputs(tiny_data_config, tmp_path):
  config = tiny_data_config
  result = teacher.run(config, str(tmp_path))
  losses = read_metrics(str(tmp_path))
  first = sum(losses[s] for s in range(1, 6)) / 5
  last = sum(losses[s] for s in range(config.train.steps - 4, config.train.steps + 1)) / 5
  assert last < first - 0.3, (first, last)
  with open(tmp_path / 'teacher' / 'eval.json') as f:
    saved = json.load(f)
  for key in ('val_loss', 'val_ppl', 'unigram_val_ppl', 'params', 'train_steps'):
    assert key in saved
  assert saved == pytest.approx(result)
  assert saved['val_ppl'] < saved['unigram_val_ppl']  # the LM beats the unigram baseline
  assert checkpoints.has_params(str(tmp_path / 'teacher' / 'params'))


class Interrupt(Exception):
  pass


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_losses(tiny_data_config, tmp_path, monkeypatch):
  config = tiny_data_config
  config.train.steps = 20
  config.train.checkpoint_every = 10
  config.train.eval_every = 20
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  teacher.run(config, straight)

  real_source = pipeline.make_batch_source  # what data.global_batches calls

  class DyingSource:
    """The training source, 'killed' when step 13's batch is requested."""

    def __init__(self, source, is_train):
      self.source, self.is_train = source, is_train

    def batch(self, step):
      if self.is_train and step == 13:
        raise Interrupt('killed at step 13')
      return self.source.batch(step)

  def dying_source(*args, **kwargs):
    return DyingSource(real_source(*args, **kwargs), kwargs.get('shuffle', True))

  monkeypatch.setattr(pipeline, 'make_batch_source', dying_source)
  with pytest.raises(Interrupt):
    teacher.run(config, resumed)
  monkeypatch.setattr(pipeline, 'make_batch_source', real_source)
  teacher.run(config, resumed)

  a, b = read_metrics(straight), read_metrics(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 21))
  for step in range(11, 21):
    assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step
