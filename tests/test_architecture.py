"""The layout's import and ownership rules, checked on the source (ast), not by convention.

- Mains are leaves: nothing imports kforcing_jax.main.
- The library (kforcing_jax/ outside main/ and benchmarks/) imports nothing from configs/, and
  configs/ imports nothing from kforcing_jax.
- absl flags are defined only in cli.py, main/, benchmarks/ and launch/.
- One owner per piece of knowledge: only rundir.py spells the run-directory names, and only
  rundir.load_export imports parameters (outside checkpoints.py).
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'kforcing_jax'
FLAG_OWNERS = ('kforcing_jax/cli.py', 'kforcing_jax/main/', 'kforcing_jax/benchmarks/', 'launch/')


def python_files(*folders: str) -> list[pathlib.Path]:
  return sorted(p for folder in folders for p in (ROOT / folder).rglob('*.py'))


def relative(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).as_posix()


def library_files() -> list[pathlib.Path]:
  return [p for p in python_files('kforcing_jax')
          if not relative(p).startswith(('kforcing_jax/main/', 'kforcing_jax/benchmarks/'))]


def imported_modules(tree: ast.AST) -> set[str]:
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def flag_definitions(tree: ast.AST) -> list[str]:
  """Calls like flags.DEFINE_string(...) / config_flags.DEFINE_config_file(...)."""
  return [node.func.attr for node in ast.walk(tree)
          if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr.startswith('DEFINE_')]


def docstring_nodes(tree: ast.AST) -> set[int]:
  ids = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        ids.add(id(body[0].value))
  return ids


def argument_name_nodes(tree: ast.AST) -> set[int]:
  """ids of the strings in `static_argnames=` / `donate_argnames=`: parameter names, not data."""
  return {id(const) for node in ast.walk(tree) if isinstance(node, ast.keyword)
          and node.arg in ('static_argnames', 'donate_argnames')
          for const in ast.walk(node.value) if isinstance(const, ast.Constant)}


def string_constants(tree: ast.AST) -> list[str]:
  skip = docstring_nodes(tree) | argument_name_nodes(tree)
  return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
          and isinstance(node.value, str) and id(node) not in skip]


def parsed(path: pathlib.Path) -> ast.AST:
  return ast.parse(path.read_text(), filename=str(path))


def violations(files, rule) -> list[str]:
  return [f'{relative(p)}: {problem}' for p in files for problem in rule(parsed(p))]


def test_scans_the_whole_library():
  # a rule that scans nothing passes vacuously: the library has well over 40 modules
  assert len(library_files()) >= 40, [relative(p) for p in library_files()]


def test_nothing_imports_the_mains():
  files = python_files('kforcing_jax', 'launch', 'configs', 'tests')
  bad = violations(files, lambda tree: sorted(
      m for m in imported_modules(tree) if m == 'kforcing_jax.main'
      or m.startswith('kforcing_jax.main.')))
  assert not bad, bad


def test_library_and_configs_do_not_import_each_other():
  bad = violations(library_files(), lambda tree: sorted(
      m for m in imported_modules(tree) if m == 'configs' or m.startswith('configs.')))
  bad += violations(python_files('configs'), lambda tree: sorted(
      m for m in imported_modules(tree) if m.startswith('kforcing_jax')))
  assert not bad, bad


def test_flags_are_defined_only_by_entry_points():
  files = [p for p in python_files('kforcing_jax', 'launch')
           if not relative(p).startswith(FLAG_OWNERS)]
  bad = violations(files, flag_definitions)
  assert not bad, bad


def test_only_rundir_spells_the_run_directory_names():
  def names(tree):
    return [s for s in string_constants(tree)
            if s == 'teacher' or s.startswith('teacher/') or 'student_k' in s]
  files = [p for p in library_files() if relative(p) != 'kforcing_jax/rundir.py']
  bad = violations(files, names)
  assert not bad, bad


def test_parameters_are_imported_in_one_place():
  def calls(tree):
    return [f'line {node.lineno}' for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, 'attr', getattr(node.func, 'id', None)) == 'import_params']
  owners = ('kforcing_jax/rundir.py', 'kforcing_jax/checkpoints.py')
  files = [p for p in python_files('kforcing_jax', 'launch') if relative(p) not in owners]
  bad = violations(files, calls)
  assert not bad, bad
  assert calls(parsed(PACKAGE / 'rundir.py')), 'rundir.load_export no longer imports params'


@pytest.mark.parametrize('source, rule, expected', [
    ('from kforcing_jax.main import train', imported_modules, 'kforcing_jax.main.train'),
    ('import configs.common', imported_modules, 'configs.common'),
    ('from absl import flags\nX = flags.DEFINE_bool("x", False, "")', flag_definitions,
     'DEFINE_bool'),
])
def test_rules_see_a_violation(source, rule, expected):
  # the checks above would pass vacuously if these detectors never fired
  assert expected in rule(ast.parse(source))


def test_slow_tests_are_marked():
  # make test-fast deselects -m slow: without marked tests it would silently run everything
  marked = [relative(p) for p in python_files('tests') if 'pytest.mark.slow' in p.read_text()
            and p.name != 'test_architecture.py']
  assert len(marked) >= 5, marked


def test_config_rules_equal_the_library_default():
  # configs/ may not import the library, so the rules table is written twice; keep them equal
  from configs import common
  from kforcing_jax import sharding
  assert tuple(tuple(r) for r in common.base_config().sharding_rules) == sharding.DEFAULT_RULES
