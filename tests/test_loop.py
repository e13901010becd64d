"""loop.run on a toy state: config.json and TensorBoard hparams at step 0 (kept on resume,
rewritten when missing), metrics in JSON lines and TensorBoard, and the profiler trace."""

import gzip
import json
import re

import jax
import jax.numpy as jnp
import pytest

from configs import test_tiny
from kforcing_jax import loop, provenance
from tests.test_progress import hparams, metrics_rows, scalars


class Interrupt(Exception):
  pass


def _init():
  return {'w': jnp.zeros((), jnp.float32)}


@jax.jit
def _train_step(state, batch):
  w = state['w'] + batch
  return {'w': w}, {'loss': 2.0 * w}


def toy_loop(workdir, total_steps, batch_at=None, **kwargs) -> loop.Loop:
  """The batch of step s is s + 1, so after d steps w = d(d+1)/2 and the logged loss d(d+1)."""
  return loop.Loop(name='toy', workdir=str(workdir), total_steps=total_steps, init_state=_init,
                   abstract_state=jax.eval_shape(_init), train_step=_train_step,
                   batch_at=batch_at or (lambda step: jnp.float32(step + 1)),
                   evaluate=lambda state: {'loss': float(state['w'])},
                   log_every=2, eval_every=4, checkpoint_every=2, **kwargs)


def losses(workdir, key='loss') -> dict[int, float]:
  return {row['step']: row[key] for row in metrics_rows(workdir / 'metrics.jsonl') if key in row}


def test_config_json_and_hparams_at_step_0_kept_on_resume(tmp_path):
  config = test_tiny.get_config()
  record = provenance.run_record(config)
  state, last_eval = loop.run(toy_loop(tmp_path, 6, config_record=record))
  assert float(state['w']) == 21.0 and last_eval == {'loss': 21.0}

  stored = provenance.read_run_config(tmp_path)
  assert stored == record
  assert stored['config']['train']['steps'] == 40
  assert stored['config']['distill']['stages'] == [[1, 20], [2, 20], [4, 20]]
  assert stored['versions']['jax'] == jax.__version__
  assert stored['devices']['device_count'] == jax.device_count()
  assert stored['git']['commit'] is None or re.fullmatch('[0-9a-f]{40}', stored['git']['commit'])
  assert losses(tmp_path) == {d: float(d * (d + 1)) for d in range(1, 7)}
  assert losses(tmp_path, 'val_loss') == {4: 10.0, 6: 21.0}
  assert scalars(tmp_path)['loss'] == {d: float(d * (d + 1)) for d in range(1, 7)}
  tb = hparams(tmp_path)
  assert tb['train.steps'] == 40 and tb['data.name'] == 'shakespeare'
  assert tb['distill.stages'] == '[[1, 20], [2, 20], [4, 20]]'

  # A resume keeps the config.json of the run that started it, and writes no second hparams
  # (log_every may change on a resume: it does not change the math).
  config.train.log_every = 7
  loop.run(toy_loop(tmp_path, 8, config_record=provenance.run_record(config)))
  assert provenance.read_run_config(tmp_path) == record
  assert hparams(tmp_path)['train.log_every'] == 5
  assert losses(tmp_path)[8] == 72.0
  # ... but writes one when it is missing.
  provenance.config_path(tmp_path).unlink()
  loop.run(toy_loop(tmp_path, 10, config_record=provenance.run_record(config)))
  assert provenance.read_run_config(tmp_path)['config']['train']['log_every'] == 7
  assert hparams(tmp_path)['train.log_every'] == 5


def test_no_record_no_config_json(tmp_path):
  loop.run(toy_loop(tmp_path, 2))
  assert provenance.read_run_config(tmp_path) is None
  assert not (tmp_path / 'profile').exists()
  assert losses(tmp_path) == {1: 2.0, 2: 6.0}


def test_profile_steps_trace_the_steps_after_the_first(tmp_path, capsys):
  loop.run(toy_loop(tmp_path, 5, profile_steps=2))
  assert '[toy] profile of steps 2-3 written to' in capsys.readouterr().out
  traces = list((tmp_path / 'profile').glob('plugins/profile/*/*.trace.json.gz'))
  assert len(traces) == 1 and list(traces[0].parent.glob('*.xplane.pb'))
  assert b'_train_step' in gzip.decompress(traces[0].read_bytes())
  assert losses(tmp_path) == {d: float(d * (d + 1)) for d in range(1, 6)}


def test_an_error_while_profiling_stops_the_trace(tmp_path):
  def batch_at(step):
    if step == 2:
      raise Interrupt
    return jnp.float32(step + 1)
  with pytest.raises(Interrupt):
    loop.run(toy_loop(tmp_path, 5, batch_at=batch_at, profile_steps=3))
  jax.profiler.start_trace(str(tmp_path / 'again'))  # raises if the loop left a trace running
  jax.profiler.stop_trace()
  # the rows before the error were written (step 2's at its save, which checks it first)
  assert losses(tmp_path) == {1: 2.0, 2: 6.0}


def test_run_record_is_json_and_tolerates_no_git(tmp_path, monkeypatch):
  config = test_tiny.get_config()
  record = provenance.run_record(config)
  assert json.loads(json.dumps(record, allow_nan=False)) == record  # plain JSON data already
  assert record['config'] == json.loads(json.dumps(config.to_dict()))  # tuples as lists
  assert record['config']['mesh_shape'] == [-1, 1, 1]
  monkeypatch.setattr(provenance, 'REPO_ROOT', tmp_path)  # not a git checkout
  assert provenance.git_state() == {'commit': None, 'dirty': None}
