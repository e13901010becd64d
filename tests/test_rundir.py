"""rundir: the run-directory layout and the one loader, load_export."""

import copy

import jax
import numpy as np
import pytest

from configs import shakespeare_gumbel, test_tiny
from kforcing_jax import checkpoints, distill, models, progress, provenance, rundir, sharding


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A run directory with an AR export (and its config.json) and students k=1 and k=2."""
  root = str(tmp_path_factory.mktemp('run'))
  config = test_tiny.get_config()
  ar = models.teacher(config)
  checkpoints.export_params(rundir.params_dir(rundir.teacher_dir(root)),
                            ar.init(jax.random.key(0)), {'kind': 'ar', 'k': 1})
  provenance.write_run_config(rundir.teacher_dir(root), provenance.run_record(config))
  for k in (1, 2):
    student = models.student(config, k)
    checkpoints.export_params(rundir.params_dir(rundir.stage_dir(root, k)),
                              student.init(jax.random.key(k)), {'kind': 'pflm', 'k': k})
  return root


def layout():
  return sharding.single_device_layout()


def test_paths_and_stages(workdir):
  assert rundir.student_stages(workdir) == [1, 2]
  assert rundir.exports(workdir) == [rundir.teacher_dir(workdir), rundir.stage_dir(workdir, 1),
                                     rundir.stage_dir(workdir, 2)]
  assert rundir.model_dir(workdir, 'pflm') == rundir.stage_dir(workdir, 2)  # the widest
  assert rundir.stage_k(rundir.stage_dir(workdir, 12)) == 12
  assert rundir.stage_k(rundir.teacher_dir(workdir)) is None


def test_architecture_from_shapes_equals_the_config_model(workdir):
  config = test_tiny.get_config()
  from_config = rundir.load_export(rundir.teacher_dir(workdir), layout(), config=config)
  # no config, no tokenizer: vocabulary and dtype come from the recorded config.json
  from_shapes = rundir.load_export(rundir.teacher_dir(workdir), layout())
  assert from_shapes.model.cfg == from_config.model.cfg
  assert (from_shapes.kind, from_shapes.k, from_shapes.name) == ('ar', 1, 'ar')
  for a, b in zip(jax.tree.leaves(from_shapes.params), jax.tree.leaves(from_config.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  student = rundir.load_export(rundir.stage_dir(workdir, 2), layout(), config=config)
  assert (student.kind, student.k, student.name) == ('pflm', 2, 'pflm_k2')


def test_recorded_dtype_is_used_without_a_config(workdir, tmp_path):
  config = test_tiny.get_config()
  config.model.dtype = 'bfloat16'
  directory = str(tmp_path / 'teacher')
  checkpoints.export_params(rundir.params_dir(directory),
                            models.teacher(config).init(jax.random.key(0)), {'kind': 'ar'})
  provenance.write_run_config(directory, provenance.run_record(config))
  assert rundir.load_export(directory, layout()).model.cfg.dtype == 'bfloat16'
  assert rundir.load_export(directory, layout(), dtype='float32').model.cfg.dtype == 'float32'


@pytest.mark.parametrize('field, value, words', [
    ('d_model', 128, 'does not match config.model'),
    ('num_layers', 3, 'does not match config.model'),
    ('mask_id', 1, 'model.mask_id=0'),      # same shapes: only config.json can tell
])
def test_a_different_config_is_refused(workdir, field, value, words):
  config = test_tiny.get_config()
  config.model[field] = value
  with pytest.raises(ValueError, match=words):
    rundir.load_export(rundir.teacher_dir(workdir), layout(), config=config)


def test_kind_and_missing_exports_are_named(workdir, tmp_path):
  with pytest.raises(ValueError, match='holds an AR model, but a PFLM student'):
    rundir.load_export(rundir.teacher_dir(workdir), layout(), kind='pflm')
  with pytest.raises(FileNotFoundError, match='no exported model'):
    rundir.load_export(str(tmp_path / 'nothing'), layout())
  with pytest.raises(FileNotFoundError, match='no student export'):
    rundir.model_dir(str(tmp_path), 'pflm')


def test_a_student_loads_with_the_map_it_learned(tmp_path):
  # a student trained with noise_scale 100 in the sorted order: without a config the recorded
  # values come back; a config with other values is refused (same shapes, other function)
  config = test_tiny.get_config()
  config.model.noise_scale = 100.0
  config.model.cdf_order = 'sorted'
  directory = rundir.stage_dir(str(tmp_path), 1)
  student = models.student(config, 1)
  checkpoints.export_params(rundir.params_dir(directory), student.init(jax.random.key(0)),
                            {'kind': 'pflm', 'k': 1})
  provenance.write_run_config(directory, provenance.run_record(config))
  loaded = rundir.load_export(directory, layout())
  assert loaded.model.cfg.noise_scale == 100.0 and loaded.model.cfg.cdf_order == 'sorted'
  for field, value in (('noise_scale', 1.0), ('cdf_order', 'id')):
    other = test_tiny.get_config()
    other.model.noise_scale, other.model.cdf_order = 100.0, 'sorted'
    other.model[field] = value
    with pytest.raises(ValueError, match=f'model.{field}='):
      rundir.load_export(directory, layout(), config=other)


def test_distill_refuses_the_finished_stage_of_another_recipe(tiny_data_config, tmp_path):
  """A run directory whose stage another recipe distilled (one `make demo` wrote before the
  demo's recipe changed) is refused before anything trains, naming the fields that differ; the
  recipe that made it reuses it."""
  workdir = str(tmp_path)
  argmax = tiny_data_config
  argmax.distill.stages = ((1, 20),)
  directory = rundir.stage_dir(workdir, 1)
  checkpoints.export_params(rundir.params_dir(directory),
                            models.student(argmax, 1).init(jax.random.key(0)),
                            {'kind': 'pflm', 'k': 1})
  provenance.write_run_config(directory, provenance.run_record(argmax))
  progress.write_json(rundir.eval_path(directory), {'k': 1, 'acc_total': 0.25})

  recipe = shakespeare_gumbel.with_gumbel_recipe(copy.deepcopy(argmax))
  recipe.distill.seq_len = recipe.data.seq_len
  with pytest.raises(ValueError, match=r"model\.cdf_order='id' \(given 'gumbel'\), "
                     r"model\.readout='argmax' \(given 'inverse_cdf'\).*--workdir of its own"):
    distill.run(recipe, workdir)
  assert distill.run(argmax, workdir)[1]['acc_total'] == 0.25
