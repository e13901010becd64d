"""The converter for the authors' PyTorch checkpoints (kforcing_jax/convert, METHOD.md s.6).

Converted models are checked against an independent float64 numpy forward pass written from
METHOD.md s.2-3 directly over the PyTorch-layout state dict (none of our model code), so a wrong
transpose, QKV split, RoPE pairing, LayerNorm eps, GELU kind or noise-feature order fails them.
Our models run in float32; the logits here are O(1) and agree with the float64 reference to
~1e-6, so the tolerance is atol = rtol = 2e-5.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from configs import lm1b_ar, test_tiny
from kforcing_jax import decode, distill, rundir, sharding
from kforcing_jax.convert import (DestinationError, InvFreqMismatchError, KindMismatchError,
                                  MissingKeysError, ShapeMismatchError, UnexpectedKeysError,
                                  convert_checkpoint, layout, synthetic)

TOLERANCE = {'atol': 2e-5, 'rtol': 2e-5}
DIMS = layout.Dims(vocab_size=100, d_model=32, num_layers=2, num_heads=4)
MASK_ID = 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, 'configs', 'test_tiny.py')
LM1B_CONFIG = os.path.join(REPO, 'configs', 'lm1b_ar.py')


def has_torch() -> bool:
  return importlib.util.find_spec('torch') is not None


def write(path, kind='ar', dims=DIMS, seed=0, state=None):
  state = synthetic.random_state_dict(kind, dims, seed) if state is None else state
  synthetic.write_checkpoint(str(path), state)
  return state


def base_config(vocab_size: int = DIMS.vocab_size, mask_id: int = MASK_ID):
  """configs/test_tiny.py as `--config.model.vocab_size=V --config.model.mask_id=M
  --config.model.pad_vocab_to_multiple_of=128` gives it for a checkpoint's vocabulary."""
  config = test_tiny.get_config()
  config.model.vocab_size, config.model.mask_id = vocab_size, mask_id
  config.model.pad_vocab_to_multiple_of = 128
  return config


def convert(src, dst, config=None, config_file=TINY_CONFIG, **kwargs):
  config = base_config() if config is None else config
  return convert_checkpoint(str(src), str(dst), config, config_file, log=lambda _: None,
                            **kwargs)


def load(dst, kind: str, k: int | None = None) -> rundir.Export:
  """A converted export through the one loader, its model built from DST/config.py."""
  return rundir.load_export(rundir.model_dir(str(dst), kind, k), sharding.single_device_layout(),
                            kind=kind, config=load_run_config(dst))


def load_run_config(dst):
  """DST/config.py loaded the way --config=DST/config.py loads it."""
  spec = importlib.util.spec_from_file_location('converted_config', os.path.join(dst, 'config.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# ----------------------------------------------------------------------------- numpy reference

def ref_layer_norm(x, scale, bias=None):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  y = (x - mean) / np.sqrt(var + 1e-5) * scale
  return y if bias is None else y + bias


def ref_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def ref_gelu_erf(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def ref_rope(x, positions):
  """x (S, H, Dh): channel j rotates with j + Dh/2 by angle position * 10000^(-2j/Dh)."""
  half = x.shape[-1] // 2
  angles = positions[:, None] * 10000.0 ** (-np.arange(half) * 2.0 / x.shape[-1])
  cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
  first, second = x[..., :half], x[..., half:]
  return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def ref_stream(sd, x, positions, num_heads):
  """Pre-norm causal decoder over one stream x (S, D) at RoPE `positions` -> logits (S, V)."""
  s, d = x.shape
  dh = d // num_heads
  causal = np.tril(np.ones((s, s), bool))
  for i in range(len({k.split('.')[1] for k in sd if k.startswith('blocks.')})):
    p = f'blocks.{i}.'
    qkv = ref_layer_norm(x, sd[p + 'norm1.weight']) @ sd[p + 'attn_qkv.weight'].T
    q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(s, num_heads, dh) for j in range(3))
    q, k = ref_rope(q, positions), ref_rope(k, positions)
    scores = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(dh)
    scores = np.where(causal, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attn = np.einsum('hqk,khd->qhd', weights, v).reshape(s, d)
    x = x + attn @ sd[p + 'attn_out.weight'].T
    h = ref_layer_norm(x, sd[p + 'norm2.weight'])
    h = ref_gelu_tanh(h @ sd[p + 'mlp.0.weight'].T + sd[p + 'mlp.0.bias'])
    x = x + h @ sd[p + 'mlp.2.weight'].T + sd[p + 'mlp.2.bias']
  h = ref_layer_norm(x, sd['output_layer.norm_final.weight'])
  return h @ sd['output_layer.linear.weight'].T + sd['output_layer.linear.bias']


def ref_noise_encoder(sd, u, tau):
  """u (k,), tau scalar -> hints (k, D): columns cos(u) | sin(u) | cos(tau) | sin(tau)."""
  p = 'noise_encoder.'
  half = sd[p + 'combined_proj.bias'].shape[0] // 2
  freqs = 10000.0 ** (-np.arange(half) / half)
  angles_u = 2 * np.pi * u[:, None] * freqs
  angles_tau = 2 * np.pi * np.full_like(u, tau)[:, None] * freqs
  feats = np.concatenate([np.cos(angles_u), np.sin(angles_u), np.cos(angles_tau),
                          np.sin(angles_tau)], axis=-1)
  z = feats @ sd[p + 'combined_proj.weight'].T + sd[p + 'combined_proj.bias']
  h = ref_layer_norm(z, sd[p + 'norm.weight'], sd[p + 'norm.bias'])
  h = ref_gelu_erf(h @ sd[p + 'mlp.0.weight'].T + sd[p + 'mlp.0.bias'])
  return z + h @ sd[p + 'mlp.2.weight'].T + sd[p + 'mlp.2.bias']


def ref_hint_logits(sd, tokens, t, u, tau, num_heads):
  """Window t's hint logits (k, V): the stream [tokens 0..t | k hints] at positions
  [0..t | t+1..t+k] under a causal mask is exactly the all-windows mask for this window."""
  k = u.shape[0]
  x = np.concatenate([sd['vocab_embed.embedding'][tokens[:t + 1]], ref_noise_encoder(sd, u, tau)])
  positions = np.arange(t + 1 + k, dtype=np.float64)
  return ref_stream(sd, x, positions, num_heads)[t + 1:]


def float64(state):
  return {key: value.astype(np.float64) for key, value in state.items()}


def assert_real_logits_match(ours, reference):
  """Ours is (.., Vp): the mask id and the padding are forced to -1000, the rest must match."""
  ours = np.asarray(ours)
  real = np.arange(reference.shape[-1]) != MASK_ID
  np.testing.assert_allclose(ours[..., :reference.shape[-1]][..., real], reference[..., real],
                             **TOLERANCE)
  assert (ours[..., MASK_ID] == -1000.0).all()
  assert (ours[..., reference.shape[-1]:] == -1000.0).all()


# ----------------------------------------------------------------------------- layout

def test_key_names_and_shapes_are_the_documented_ones():
  # METHOD.md s.6 written out by hand for L=1, D=8, V=11, H=2 (Dh=4): a typo in the layout table
  # would otherwise also reach the synthetic writer and pass every numeric test
  dims = layout.Dims(vocab_size=11, d_model=8, num_layers=1, num_heads=2)
  documented = {
      'vocab_embed.embedding': (11, 8), 'rotary_emb.inv_freq': (2,),
      'blocks.0.norm1.weight': (8,), 'blocks.0.attn_qkv.weight': (24, 8),
      'blocks.0.attn_out.weight': (8, 8), 'blocks.0.norm2.weight': (8,),
      'blocks.0.mlp.0.weight': (32, 8), 'blocks.0.mlp.0.bias': (32,),
      'blocks.0.mlp.2.weight': (8, 32), 'blocks.0.mlp.2.bias': (8,),
      'output_layer.norm_final.weight': (8,), 'output_layer.linear.weight': (11, 8),
      'output_layer.linear.bias': (11,)}
  student = {
      'noise_encoder.combined_proj.weight': (8, 16), 'noise_encoder.combined_proj.bias': (8,),
      'noise_encoder.norm.weight': (8,), 'noise_encoder.norm.bias': (8,),
      'noise_encoder.mlp.0.weight': (32, 8), 'noise_encoder.mlp.0.bias': (32,),
      'noise_encoder.mlp.2.weight': (8, 32), 'noise_encoder.mlp.2.bias': (8,)}
  assert {k: tuple(v) for k, v in layout.expected_shapes('ar', dims).items()} == documented
  assert ({k: tuple(v) for k, v in layout.expected_shapes('pflm', dims).items()}
          == {**documented, **student})


def test_documented_counts():
  # METHOD.md s.6: AR 101 entries and 162,246,482 params (OWT, L=12, D=768); the student adds
  # 8 tensors and 5,904,384 params
  owt = layout.Dims(vocab_size=50258, d_model=768, num_layers=12, num_heads=12)
  ar, pflm = layout.expected_shapes('ar', owt), layout.expected_shapes('pflm', owt)
  assert len(ar) == 101
  assert layout.parameter_count(ar) == 162_246_482
  assert len(pflm) - len(ar) == 8
  assert layout.parameter_count(pflm) - layout.parameter_count(ar) == 5_904_384


# ----------------------------------------------------------------------------- numerics

@pytest.mark.parametrize('suffix', ['safetensors', 'ckpt'])
def test_ar_logits_equal_numpy_reference(tmp_path, suffix):
  if suffix == 'ckpt' and not has_torch():
    pytest.skip('torch is not installed (pip install -r requirements-convert.txt); the .ckpt '
                'reader needs it - .safetensors is covered without it.')
  state = write(tmp_path / f'ar.{suffix}')
  meta = convert(tmp_path / f'ar.{suffix}', tmp_path / 'run')
  assert meta['padded_vocab_size'] == 128 and meta['k'] == 1 and meta['converted']  # AR: k 1
  export = load(tmp_path / 'run', 'ar')
  model, params, stored_meta = export.model, export.params, export.meta
  assert stored_meta['params'] == layout.parameter_count(layout.expected_shapes('ar', DIMS))
  # the real vocabulary and mask id travel with the export (reproduce.py checks them)
  assert (stored_meta['vocab_size'], stored_meta['mask_id']) == (DIMS.vocab_size, MASK_ID)
  tokens = np.random.default_rng(1).integers(0, DIMS.vocab_size, (2, 9))
  logits, _ = jax.jit(lambda p, t: model.module(p)(t))(params, jnp.asarray(tokens, jnp.int32))
  sd = float64(state)
  reference = np.stack([ref_stream(sd, sd['vocab_embed.embedding'][row], np.arange(9.0),
                                   DIMS.num_heads) for row in tokens])
  assert_real_logits_match(logits, reference)


def test_student_hint_logits_equal_numpy_reference(tmp_path):
  state = write(tmp_path / 'pflm.safetensors', kind='pflm', seed=2)
  convert(tmp_path / 'pflm.safetensors', tmp_path / 'run', k=4)
  export = load(tmp_path / 'run', 'pflm', 4)
  model, params = export.model, export.params
  assert model.k_max == 4
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, DIMS.vocab_size, (2, 6))
  u = rng.random((2, 6, 3), dtype=np.float32)
  tau = np.asarray([0.7, 1.3], np.float32)  # distinct per row: a u/tau swap changes logits
  logits, _ = jax.jit(lambda p, *a: model.module(p)(*a))(
      params, jnp.asarray(tokens, jnp.int32), jnp.asarray(u), jnp.asarray(tau))
  sd = float64(state)
  reference = np.stack([np.stack([
      ref_hint_logits(sd, tokens[b], t, u[b, t].astype(np.float64), float(tau[b]),
                      DIMS.num_heads) for t in range(6)]) for b in range(2)])
  assert_real_logits_match(logits, reference)


def test_student_decodes_its_first_tokens_like_the_reference(tmp_path):
  state = write(tmp_path / 'pflm.safetensors', kind='pflm', seed=4)
  convert(tmp_path / 'pflm.safetensors', tmp_path / 'run', k=4)
  export = load(tmp_path / 'run', 'pflm')  # the widest stage, as reproduce picks it
  model, params = export.model, export.params
  prompt_len, k = 5, 4
  prompts = np.random.default_rng(5).integers(0, DIMS.vocab_size, (2, prompt_len))
  key = jax.random.key(6)
  out = np.asarray(decode.generate_pflm(model, params, jnp.asarray(prompts, jnp.int32), key, 1.0,
                                        gen_len=prompt_len + k, k=k))
  # output position j uses the noise drawn for position j; the first step is window P-1
  u = np.asarray(decode.position_uniforms(key, jnp.arange(prompt_len + k), 2), np.float64)
  sd = float64(state)
  for b in range(2):
    reference = ref_hint_logits(sd, prompts[b], prompt_len - 1, u[b, prompt_len:], 1.0,
                                DIMS.num_heads)
    reference[:, MASK_ID] = -np.inf
    np.testing.assert_array_equal(out[b, :prompt_len], prompts[b])
    np.testing.assert_array_equal(out[b, prompt_len:], reference.argmax(-1))


# ----------------------------------------------------------------------------- strict checks

def broken(state, **changes):
  state = dict(state)
  for key, value in changes.items():
    if value is None:
      del state[key]
    else:
      state[key] = value
  return state


@pytest.mark.parametrize('error, key, change', [
    (MissingKeysError, 'blocks.1.mlp.2.bias', None),
    (MissingKeysError, 'output_layer.linear.weight', None),
    (UnexpectedKeysError, 'blocks.0.attn_qkv.bias', np.zeros(96, np.float32)),
    (ShapeMismatchError, 'blocks.1.attn_out.weight', np.zeros((32, 64), np.float32)),
    (ShapeMismatchError, 'output_layer.linear.bias', np.zeros(99, np.float32)),
    (InvFreqMismatchError, 'rotary_emb.inv_freq',
     (1.0 / 500000.0 ** (np.arange(0, 8, 2) / 8)).astype(np.float32)),
])
def test_bad_checkpoints_raise_named_errors(tmp_path, error, key, change):
  state = broken(synthetic.random_state_dict('ar', DIMS, 0), **{key: change})
  write(tmp_path / 'bad.safetensors', state=state)
  with pytest.raises(error, match=key.replace('.', r'\.')):
    convert(tmp_path / 'bad.safetensors', tmp_path / 'run')
  assert not os.path.exists(tmp_path / 'run')  # nothing half-written


def test_a_partial_noise_encoder_names_the_missing_tensors(tmp_path):
  state = broken(synthetic.random_state_dict('pflm', DIMS, 0),
                 **{'noise_encoder.norm.bias': None, 'noise_encoder.mlp.2.weight': None})
  write(tmp_path / 'bad.safetensors', state=state)
  with pytest.raises(MissingKeysError, match=r'noise_encoder\.mlp\.2\.weight, '
                                             r'noise_encoder\.norm\.bias'):
    convert(tmp_path / 'bad.safetensors', tmp_path / 'run')


def test_kind_must_agree_with_the_keys(tmp_path):
  write(tmp_path / 'ar.safetensors')
  with pytest.raises(KindMismatchError, match='--kind=pflm'):
    convert(tmp_path / 'ar.safetensors', tmp_path / 'run', kind='pflm')


def test_cli_prints_one_line_errors(tmp_path):
  write(tmp_path / 'bad.safetensors',
        state=broken(synthetic.random_state_dict('ar', DIMS, 0), **{'blocks.0.norm2.weight': None}))
  result = subprocess.run(
      [sys.executable, '-m', 'kforcing_jax.main.convert', '--config=configs/test_tiny.py',
       '--config.model.vocab_size=100', '--config.model.mask_id=3',
       f'--src={tmp_path / "bad.safetensors"}', f'--dst={tmp_path / "run"}'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu', KFORCING_TRACEBACK=''))
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      'error: missing 1 tensor(s): blocks.0.norm2.weight']


def test_ckpt_without_torch_names_the_requirements_file(tmp_path, monkeypatch):
  (tmp_path / 'ar.ckpt').write_bytes(b'never unpickled')
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError
  with pytest.raises(ValueError, match='requirements-convert.txt'):
    convert(tmp_path / 'ar.ckpt', tmp_path / 'run')


def test_ckpt_without_a_state_dict_is_refused(tmp_path):
  torch = pytest.importorskip('torch', reason='torch is not installed (requirements-convert.txt)')
  torch.save({'model': {'vocab_embed.embedding': torch.zeros(4, 2)}}, tmp_path / 'raw.ckpt')
  with pytest.raises(ValueError, match=r'no "state_dict" entry \(found \[\'model\'\]\)'):
    convert(tmp_path / 'raw.ckpt', tmp_path / 'run')


def test_the_config_must_name_the_checkpoints_vocabulary_and_mask_id(tmp_path):
  write(tmp_path / 'ar.safetensors')  # V = 100; test_tiny.py says 256
  with pytest.raises(ValueError) as excinfo:
    convert(tmp_path / 'ar.safetensors', tmp_path / 'run', config=test_tiny.get_config())
  message = str(excinfo.value)
  assert 'a 100-token vocabulary' in message and 'model.vocab_size=256' in message
  assert '--config.model.vocab_size=100' in message and '--config.model.mask_id' in message
  with pytest.raises(ValueError, match=r'--config\.model\.mask_id=100 is outside'):
    convert(tmp_path / 'ar.safetensors', tmp_path / 'run', config=base_config(mask_id=100))
  assert not os.path.exists(tmp_path / 'run')  # nothing half-written


@pytest.mark.parametrize('field, value', [('cdf_order', 'sorted'), ('noise_scale', 100.0)])
def test_the_config_must_keep_the_authors_sampler_and_noise_encoder(tmp_path, field, value):
  write(tmp_path / 'ar.safetensors')
  config = base_config()
  config.model[field] = value
  with pytest.raises(ValueError, match='cdf_order=id --config.model.noise_scale=1'):
    convert(tmp_path / 'ar.safetensors', tmp_path / 'run', config=config)
  assert not os.path.exists(tmp_path / 'run')


# ----------------------------------------------------------------------------- run directory

def test_ar_and_student_share_a_run_directory(tmp_path):
  write(tmp_path / 'ar.safetensors')
  write(tmp_path / 'pflm.safetensors', kind='pflm', seed=1)
  dst = tmp_path / 'run'
  convert(tmp_path / 'pflm.safetensors', dst, k=4)
  convert(tmp_path / 'ar.safetensors', dst)
  config = load_run_config(dst)
  assert (config.model.vocab_size, config.model.mask_id, config.model.d_model,
          config.model.num_layers, config.model.num_heads,
          config.model.pad_vocab_to_multiple_of) == (100, 3, 32, 2, 4, 128)
  # the config's schedule reaches one stage past the converted student
  assert [k for k, _ in config.distill.stages] == [1, 2, 4, 8]
  with pytest.raises(DestinationError, match='teacher/params already exists'):
    convert(tmp_path / 'ar.safetensors', dst)
  write(tmp_path / 'wide.safetensors', dims=layout.Dims(100, 64, 2, 4))
  with pytest.raises(DestinationError, match='d_model 32 vs 64'):
    convert(tmp_path / 'wide.safetensors', dst)
  with pytest.raises(DestinationError, match='mask_id 3 vs 7'):
    convert(tmp_path / 'ar.safetensors', tmp_path / 'run', config=base_config(mask_id=7))
  with pytest.raises(DestinationError, match='based on --config=.*test_tiny.py'):
    convert(tmp_path / 'ar.safetensors', tmp_path / 'run', config_file=LM1B_CONFIG)


def test_paper_configs_give_the_paper_vocabularies(tmp_path):
  # tiny widths with the LM1B vocabulary: --config=configs/lm1b_ar.py gives the bert mask id 103
  dims = layout.Dims(vocab_size=30522, d_model=16, num_layers=1, num_heads=2)
  write(tmp_path / 'ar.safetensors', dims=dims)
  meta = convert(tmp_path / 'ar.safetensors', tmp_path / 'run', config=lm1b_ar.get_config(),
                 config_file=LM1B_CONFIG)
  assert (meta['mask_id'], meta['padded_vocab_size']) == (103, 30592)
  assert f'BASE = {LM1B_CONFIG!r}' in (tmp_path / 'run' / 'config.py').read_text()
  config = load_run_config(tmp_path / 'run')
  assert (config.data.name, config.model.vocab_size, config.model.mask_id) == ('lm1b', 30522, 103)
  assert (config.model.d_model, config.model.num_layers, config.model.num_heads) == (16, 1, 2)


def test_converted_run_loads_through_our_paths(tmp_path):
  """The one loader (evaluate / generate / reproduce load through it), with DST/config.py, and a
  k=8 distillation stage from the converted k=4."""
  dims = layout.Dims(vocab_size=256, d_model=32, num_layers=2, num_heads=4)  # test_tiny's vocab
  ar_state = write(tmp_path / 'ar.safetensors', dims=dims)
  write(tmp_path / 'pflm.safetensors', kind='pflm', dims=dims, seed=1)
  dst = str(tmp_path / 'run')
  convert(tmp_path / 'ar.safetensors', dst, config=base_config(256, 0))
  student_meta = convert(tmp_path / 'pflm.safetensors', dst, config=base_config(256, 0), k=4)
  config = load_run_config(dst)
  mesh_layout = sharding.layout_from_config(config)

  evaluator = rundir.load_export(rundir.teacher_dir(dst), mesh_layout, kind='ar', config=config)
  assert evaluator.model.cfg.vocab_size == 256 and evaluator.model.cfg.num_layers == 2
  np.testing.assert_array_equal(np.asarray(evaluator.params['embed']),
                                ar_state[layout.EMBEDDING])
  student = rundir.load_export(rundir.model_dir(dst, 'pflm'), mesh_layout, config=config)
  assert (student.kind, student.k, student.directory) == ('pflm', 4, rundir.stage_dir(dst, 4))

  teachers = distill.load_teachers(config, dst, mesh_layout, prev_k=4)
  program = distill.stage_program(config, mesh_layout, 8, 4)
  assert (program.model.k_max, teachers.teacher.k) == (8, 4)
  assert student_meta['path'] == rundir.params_dir(rundir.stage_dir(dst, 4))
  np.testing.assert_array_equal(np.asarray(teachers.teacher.params['noise_encoder']['proj']),
                                np.asarray(student.params['noise_encoder']['proj']))
  np.testing.assert_array_equal(np.asarray(teachers.ar.params['head']),
                                np.asarray(evaluator.params['head']))


@pytest.mark.slow
def test_commands_write_and_convert_a_synthetic_checkpoint(tmp_path, monkeypatch):
  """main/synthetic_checkpoint.py then main/convert.py, as the README runs them: the --config
  path given on the command line is the base DST/config.py loads."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  src, dst = tmp_path / 'pflm.safetensors', tmp_path / 'run'
  commands = [
      ['kforcing_jax.main.synthetic_checkpoint', f'--dst={src}', '--kind=pflm',
       '--vocab_size=100', '--d_model=32', '--num_layers=2', '--num_heads=4', '--seed=5'],
      ['kforcing_jax.main.convert', '--config=configs/test_tiny.py', f'--src={src}',
       f'--dst={dst}', '--k=2', '--config.model.vocab_size=100', '--config.model.mask_id=3']]
  for command in commands:
    done = subprocess.run([sys.executable, '-m', *command], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
  state = synthetic.random_state_dict('pflm', DIMS, 5)
  monkeypatch.chdir(REPO)  # the relative base path resolves where the commands run
  assert "BASE = 'configs/test_tiny.py'" in (dst / 'config.py').read_text()
  config = load_run_config(dst)
  assert (config.model.vocab_size, config.model.mask_id, config.model.d_model) == (100, 3, 32)
  assert [k for k, _ in config.distill.stages] == [1, 2, 4]
  export = load(dst, 'pflm')
  assert export.k == 2
  np.testing.assert_array_equal(np.asarray(export.params['noise_encoder']['norm_bias']),
                                state['noise_encoder.norm.bias'])
