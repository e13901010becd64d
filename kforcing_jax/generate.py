"""Print completions for text prompts: `python -m kforcing_jax.generate --config=... --workdir=...
--prompt="To be, or not" [--k=4]` (k=0: the AR teacher; k>0: the student stage with that k)."""

import os

import jax
import numpy as np
from absl import flags

from kforcing_jax import checkpoints, cli, decode, distill, distributed, progress, train
from kforcing_jax import train_state

_PROMPTS = flags.DEFINE_multi_string('prompt', ['To be, or not to be'], 'Prompt text(s).')
_K = flags.DEFINE_integer('k', 0, '0 = AR teacher; otherwise decode the student with this k.')
_STUDENT_K = flags.DEFINE_integer('student', None, 'Which student stage (default: k itself).')
_SEED = flags.DEFINE_integer('seed', 0, 'Noise seed.')


def load_model(config, workdir: str, stage_k: int | None, mesh, rules):
  """(model, params) of the teacher (stage_k None/0) or the student of stage `stage_k`."""
  if not stage_k:
    model, directory = train.teacher_model(config), os.path.join(workdir, 'teacher', 'params')
  else:
    model = distill.student_model(config, stage_k)
    directory = os.path.join(distill.stage_dir(workdir, stage_k), 'params')
  if not checkpoints.has_params(directory):
    raise FileNotFoundError(f'no trained model at {directory}: run `make demo` or the train / '
                            'distill commands first.')
  params, _ = checkpoints.import_params(directory, checkpoints.abstract_like(
      model.param_shapes, train_state.param_shardings(model, mesh, rules)))
  return model, params


def complete(config, model, params, tokenizer, prompts: list[str], k: int, seed: int, mesh,
             rules):
  """Tokenize, decode to config.decode.gen_len, detokenize. Prompts are cut to the shortest."""
  encoded = [tokenizer.encode(p) for p in prompts]
  plen = min(len(e) for e in encoded)
  if plen < max(k, 1):
    raise ValueError(f'the shortest prompt has {plen} tokens; k={k} decoding needs >= {k}.')
  prompt_ids = np.asarray([e[:plen] for e in encoded], np.int32)
  key = jax.random.key(seed)
  gen_len = max(config.decode.gen_len, plen + 1)
  if k == 0:
    run = decode.sharded_decoder(model, mesh, rules, 'ar', gen_len=gen_len,
                                 eos_id=tokenizer.eos_id)
    out = run(params, prompt_ids, key, config.decode.temperature)
  else:
    run = decode.sharded_decoder(
        model, mesh, rules, 'pflm', gen_len=gen_len, k=k,
        freq_penalty=float(config.decode.freq_penalty.get(str(k), 0.0)), eos_id=tokenizer.eos_id)
    out = run(params, prompt_ids, key, 1.0)
  return [tokenizer.decode([t for t in row if t != config.model.mask_id])
          for row in decode.to_host(out)]


def main(argv):
  del argv
  cli.quiet_libraries()
  distributed.initialize()
  config = cli.CONFIG.value
  exp = train.Experiment(config)
  stage = _STUDENT_K.value or _K.value
  model, params = load_model(config, cli.WORKDIR.value, stage, exp.mesh, exp.rules)
  texts = complete(config, model, params, exp.tokenizer, _PROMPTS.value, _K.value, _SEED.value,
                   exp.mesh, exp.rules)
  if not progress.is_main_process():
    return
  name = 'AR teacher' if _K.value == 0 else f'student k_max={stage}, decode k={_K.value}'
  for prompt, text in zip(_PROMPTS.value, texts):
    print(f'--- {name} | prompt: {prompt!r}\n{text}\n')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)
