"""Print completions for text prompts: `python -m kforcing_jax.main.generate --config=...
--workdir=DIR --prompt="To be, or not" [--student=4 [--k=2]] [--seed=0]`.

Without --student: the AR teacher, sampled at config.decode.temperature. --student=K: the
student of distillation stage K, decoding --k tokens per step (default K) at tau = 1 with the
frequency penalty of config.decode.freq_penalty. Stops at EOS. --mode (default
config.decode.mode): lossy, the student's own k-token decoding; lossless, the student drafts
--k tokens and the AR teacher verifies them with the same noise (kforcing_jax/lossless.py): the
text is exactly the teacher's, and the log gives tokens per teacher pass (without --student,
lossless is the AR teacher's own sampling).

Each --prompt is completed from its own length to config.decode.gen_len tokens in all (prompt
included; a prompt of gen_len tokens or more is an error, as is one shorter than k). Prompt i
draws its noise from fold_in(key(seed), i) alone, so its completion does not depend on the
other prompts (decode.decode_prompts)."""

import jax
from absl import flags

from kforcing_jax import cli, data, decode, lossless, progress, rundir, sharding

_PROMPTS = flags.DEFINE_multi_string('prompt', ['To be, or not to be'], 'Prompt text(s).')
_STUDENT = flags.DEFINE_integer('student', None, 'Student stage K (default: the AR teacher).')
_K = flags.DEFINE_integer('k', None, 'Tokens per step for the student (default: its K).')
_SEED = flags.DEFINE_integer('seed', 0, 'Noise seed.')
_MODE = flags.DEFINE_enum('mode', None, ['lossy', 'lossless'],
                          "Default config.decode.mode. lossy: the model's own decoding; "
                          'lossless: --student drafts, the AR teacher verifies (the output is '
                          'the teacher sample).')


def generate(config, workdir: str, *, prompts: list[str], student: int | None,
             k: int | None, seed: int, mode: str | None = None) -> None:
  mode = mode or config.decode.mode
  if student is None and k is not None:
    raise ValueError('--k is the tokens per step of a student: pass --student=K as well.')
  if student is not None and student < 1:
    raise ValueError(f'--student={student}: a stage K is >= 1 (one of config.distill.stages).')
  if k is not None and k < 1:
    raise ValueError(f'--k={k}: a student decodes k >= 1 tokens per step.')
  if mode == 'lossless' and student is None:
    progress.log('lossless without a drafting --student=K: the AR teacher samples alone (the '
                 'same text)')
    mode = 'lossy'
  layout = sharding.layout_from_config(config)
  tokenizer = data.load_tokenizer(config)
  data.check_vocab(config, tokenizer)
  directory = rundir.model_dir(workdir, 'ar' if student is None else 'pflm', k=student)
  export = rundir.load_export(directory, layout, config=config, tokenizer=tokenizer)
  k = export.k if k is None else k
  if mode == 'lossless':
    teacher = rundir.load_export(rundir.model_dir(workdir, 'ar'), layout, config=config,
                                 tokenizer=tokenizer)
    rows, mean = lossless.complete_ids(
        teacher.model, teacher.params, export.model, export.params,
        [tokenizer.encode(p) for p in prompts], jax.random.key(seed),
        gen_len=config.decode.gen_len, k=k, temperature=config.decode.temperature,
        eos_id=tokenizer.eos_id)
    for prompt, row in zip(prompts, rows):
      text = tokenizer.decode([t for t in row if t != tokenizer.mask_id])
      progress.log(f'--- lossless, ar verifying pflm_k{k} of {export.name} | prompt: '
                   f'{prompt!r}\n{text}\n')
    progress.log(f'lossless k={k}: {mean:.2f} tokens per teacher pass')
    return
  dec = decode.decoder(export, layout, gen_len=config.decode.gen_len, k=k,
                       eos_id=tokenizer.eos_id, penalty=decode.freq_penalty(config, k),
                       temperature=config.decode.temperature)
  for prompt, text in zip(prompts, decode.complete(dec, tokenizer, prompts,
                                                   jax.random.key(seed))):
    name = dec.name if dec.name == export.name else f'{dec.name} of {export.name}'
    progress.log(f'--- {name} | prompt: {prompt!r}\n{text}\n')


if __name__ == '__main__':
  cli.main(generate, prompts=lambda: _PROMPTS.value, student=lambda: _STUDENT.value,
           k=lambda: _K.value, seed=lambda: _SEED.value, mode=lambda: _MODE.value)
