"""The comparison the paper left out (issue 15): K-Forcing beside speculative decoding,
independent heads and a masked diffusion LM, under identical conditions. The command is
kforcing_jax/main/compare.py (`make compare`); this module holds what it is made of: the
training budgets, the methods and their settings, the loop that decodes each, how many
forward passes a token costs, and the table and plot.

Identical conditions: one corpus split and tokenizer, one AR teacher (the run's), one
independent evaluator (the run's), one prompt set and noise key, one timing protocol
(timing.measure_throughput: every method compiled and warmed up, then timed in interleaved
rounds with the AR teacher, median round) in one process on one device.

Budgets (config.compare; `steps = 0` = this rule). The K-Forcing distillation sees
sum(stage steps) x distill.batch_size x distill.stage_seq_len tokens. The draft model and the
heads get that many tokens; the diffusion LM, which does not start from the teacher, gets the
teacher's + the distillation's. Each baseline's eval.json records its steps and wall time.

Methods (`Method.family`):
  ar                 the AR teacher, one token per pass;
  kforcing           a student stage decoding its k tokens per pass (its default penalty);
  kforcing_lossless  the student drafts k, the teacher verifies with the same noise
                     (lossless.py: the output is the teacher's own sample);
  speculative        the small AR draft proposes k tokens, the teacher verifies them in one
                     pass; variant 'rejection' (lossless in distribution) or 'coupled'
                     (shared noise, as K-Forcing's lossless mode: token for token the teacher's);
  heads              k-1 extra heads on the frozen teacher, every head sampled on its own
                     (independent marginals, no verification);
  heads_verified     the heads' drafts verified by the teacher with the same noise;
  mdlm               the masked diffusion LM, `steps` denoising passes for the whole output.
"""

import dataclasses
import math

import numpy as np

from kforcing_jax import decode, distill, evaluate, provenance, report, rundir

FAMILIES = ('ar', 'kforcing', 'kforcing_lossless', 'speculative', 'heads', 'heads_verified',
            'mdlm')
# families whose loop is lossless.py-style (per-row lengths; its dict output counts iterations)
RAGGED = ('kforcing_lossless', 'speculative', 'heads_verified')


# ----------------------------------------------------------------------------- budgets

def distill_tokens(config) -> int:
  """Tokens the K-Forcing distillation trains on: every stage's steps x batch x windows."""
  steps = sum(int(s) for _, s in config.distill.stages)
  return steps * int(config.distill.batch_size) * distill.stage_seq_len(config)


def teacher_tokens(config) -> int:
  return int(config.train.steps) * int(config.train.batch_size) * int(config.data.seq_len)


def steps_for(tokens: int, batch_size: int, length: int) -> int:
  """The steps of `batch_size` rows of `length` tokens that see at least `tokens` tokens."""
  return max(1, math.ceil(tokens / (int(batch_size) * int(length))))


def budgets(config) -> dict:
  """{'draft' | 'heads' | 'mdlm': {'steps', 'tokens', 'rule'}}: each baseline's training
  steps (the configured count, or the budget rule's when it is 0) and the tokens they see."""
  cc = config.compare
  distilled = distill_tokens(config)
  plans = {
      'draft': (cc.draft.steps, cc.draft.batch_size, config.data.seq_len, distilled,
                'the distillation\'s tokens'),
      'heads': (cc.heads.steps, cc.heads.batch_size, cc.heads.seq_len, distilled,
                'the distillation\'s tokens'),
      'mdlm': (cc.mdlm.steps, cc.mdlm.batch_size, config.data.seq_len,
               teacher_tokens(config) + distilled,
               'the teacher\'s + the distillation\'s tokens'),
  }
  out = {}
  for name, (steps, batch, length, tokens, rule) in plans.items():
    steps = int(steps) or steps_for(tokens, batch, length)
    out[name] = {'steps': steps, 'tokens': steps * int(batch) * int(length),
                 'rule': rule if not int(plans[name][0]) else 'configured steps'}
  return out


def draft_config(config):
  """The config speculative decoding's draft model trains with (teacher.run, like the
  evaluator): the run's data, tokenizer and config.train optimizer, but config.compare.draft's
  seed, size, batch and its budget's steps."""
  out = evaluate.small_ar_config(config, config.compare.draft, budgets(config)['draft']['steps'])
  out.train.batch_size = int(config.compare.draft.batch_size)
  return out


# ----------------------------------------------------------------------------- methods

@dataclasses.dataclass(frozen=True)
class Method:
  """One method at one setting. k: tokens drafted or decoded per iteration (mdlm: 0);
  variant: speculative's acceptance rule; steps: mdlm's denoising passes."""
  family: str
  k: int = 1
  variant: str = ''
  steps: int = 0

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f'unknown method family {self.family!r}; expected one of {FAMILIES}.')

  @property
  def name(self) -> str:
    if self.family == 'ar':
      return 'ar'
    if self.family == 'mdlm':
      return f'mdlm_T{self.steps}'
    return f'{self.family}_k{self.k}' + (f'_{self.variant}' if self.variant else '')

  @property
  def label(self) -> str:
    return {
        'ar': 'AR teacher',
        'kforcing': f'K-Forcing k={self.k} (lossy)',
        'kforcing_lossless': f'K-Forcing k={self.k} lossless',
        'speculative': f'speculative k={self.k} ({self.variant})',
        'heads': f'heads k={self.k} (no verification)',
        'heads_verified': f'heads k={self.k} verified',
        'mdlm': f'MDLM T={self.steps}',
    }[self.family]

  @property
  def lossless(self) -> bool:
    """The output is the teacher's sample (token for token, or in distribution)."""
    return self.family in ('ar', 'kforcing_lossless', 'speculative', 'heads_verified')


def methods(config, student_ks: list[int], new_tokens: int) -> list[Method]:
  """The compared settings: AR; every student stage k >= 2 lossy and lossless; speculative
  decoding at each config.compare.draft.ks with both acceptance rules; heads at each
  config.compare.heads.ks without and with verification; the diffusion LM at each
  config.compare.mdlm.denoising_steps (clipped to the new tokens, duplicates dropped)."""
  cc = config.compare
  out = [Method('ar')]
  for k in sorted(k for k in student_ks if k >= 2):
    out += [Method('kforcing', k), Method('kforcing_lossless', k)]
  for k in cc.draft.ks:
    out += [Method('speculative', int(k), 'rejection'), Method('speculative', int(k), 'coupled')]
  for k in cc.heads.ks:
    out += [Method('heads', int(k)), Method('heads_verified', int(k))]
  steps = sorted({min(int(t), new_tokens) for t in cc.mdlm.denoising_steps})
  out += [Method('mdlm', 0, steps=t) for t in steps]
  return out


@dataclasses.dataclass(frozen=True)
class Models:
  """Every loaded model of a comparison: rundir.Export for the teacher, the students (by k),
  the draft and the diffusion LM; heads: {k: (HeadsModel, params)}."""
  teacher: object
  students: dict
  draft: object
  heads: dict
  mdlm: object


def models_fingerprint(models: Models) -> dict:
  """{model: provenance.params_fingerprint} of every model a comparison decodes with: a saved
  measurement of other models (retrained, another setting) is not reused."""
  prints = {rundir.TEACHER: models.teacher.params, 'draft': models.draft.params,
            'mdlm': models.mdlm.params}
  prints.update({f'{rundir.STUDENT_PREFIX}{k}': s.params for k, s in models.students.items()})
  prints.update({f'heads_k{k}': params for k, (_, params) in models.heads.items()})
  return {name: provenance.params_fingerprint(p) for name, p in sorted(prints.items())}


@dataclasses.dataclass
class MethodDecoder:
  """A method bound to its models, called like a decode.Decoder: `dec(prompts, key)` -> tokens
  (B, gen_len) or a ragged loop's dict. The last output per batch size is kept in `outputs`,
  so the timed runs also give the samples and the loop iterations."""
  method: Method
  run: object = dataclasses.field(repr=False)
  outputs: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def name(self) -> str:
    return self.method.name

  @property
  def k(self) -> int:
    return max(self.method.k, 1)

  @property
  def kind(self) -> str:  # what evaluate.quality reads beside name and k
    return self.method.family

  @property
  def settings(self) -> dict:
    return {}

  def __call__(self, prompts, key):
    out = self.run(prompts, key)
    self.outputs[int(prompts.shape[0])] = out
    return out


def _full_lengths(prompts) -> np.ndarray:
  return np.full(prompts.shape[0], prompts.shape[1], np.int32)


def decoder(method: Method, models: Models, layout, *, gen_len: int, temperature: float,
            freq_penalty: float = 0.0) -> MethodDecoder:
  """The MethodDecoder of `method`. The teacher, drafts and heads sample at `temperature`; a
  K-Forcing student decodes at tau = 1 with `freq_penalty` (its default), as evaluate does."""
  # imported here: the baselines import the library, and the library's import graph stays
  # free of them unless a comparison runs
  from kforcing_jax.baselines import heads, mdlm, speculative
  m, t = method, models.teacher
  if m.family == 'ar':
    run = decode.decoder(t, layout, gen_len=gen_len, eos_id=None, temperature=temperature)
  elif m.family == 'kforcing':
    run = decode.decoder(models.students[m.k], layout, gen_len=gen_len, k=m.k, eos_id=None,
                         penalty=freq_penalty)
  elif m.family == 'kforcing_lossless':
    run = evaluate.lossless_decoder(t, models.students[m.k], gen_len=gen_len,
                                    temperature=temperature, k=m.k).run
  elif m.family == 'speculative':
    d = models.draft

    def run(prompts, key):
      return speculative.generate_speculative(
          t.model, t.params, d.model, d.params, prompts, _full_lengths(prompts), key,
          temperature, gen_len=gen_len, k=m.k, acceptance=m.variant)
  elif m.family == 'heads':
    hm, hp = models.heads[m.k]

    def run(prompts, key):
      return heads.generate_heads(t.model, t.params, hm, hp, prompts, key, temperature,
                                  gen_len=gen_len, k=m.k)
  elif m.family == 'heads_verified':
    hm, hp = models.heads[m.k]

    def run(prompts, key):
      return heads.generate_heads_verified(t.model, t.params, hm, hp, prompts,
                                           _full_lengths(prompts), key, temperature,
                                           gen_len=gen_len, k=m.k)
  else:
    dm = models.mdlm

    def run(prompts, key):
      return mdlm.generate_mdlm(dm.model, dm.params, prompts, key, temperature,
                                gen_len=gen_len, steps=m.steps)
  return MethodDecoder(m, run)


def tokens_of(output) -> np.ndarray:
  """The (B, gen_len) tokens of a MethodDecoder output."""
  return decode.to_host(output['tokens'] if isinstance(output, dict) else output)


# ----------------------------------------------------------------------------- passes

def iterations(method: Method, new_tokens: int, output) -> int:
  """Loop iterations of one decode of `new_tokens` per row: measured for the ragged loops
  (the slowest row sets the count), else fixed by the method."""
  if method.family in RAGGED:
    return int(np.asarray(output['iterations']))
  if method.family == 'mdlm':
    return method.steps
  return math.ceil(new_tokens / max(method.k, 1))


def passes_per_token(method: Method, new_tokens: int, output) -> dict:
  """Forward passes per generated token, split by what runs them: 'full' = passes of a
  teacher-size network (the teacher, a student, or the diffusion LM over the whole sequence),
  'small' = passes of the draft model. An iteration of: AR, lossy K-Forcing and heads one full
  pass; K-Forcing lossless a student draft + a teacher verify pass; speculative one teacher
  verify pass + k draft passes; verified heads one teacher pass (drafting is fused into it);
  the diffusion LM one pass over all gen_len positions per denoising step."""
  n = iterations(method, new_tokens, output)
  full = {'kforcing_lossless': 2}.get(method.family, 1)
  small = method.k if method.family == 'speculative' else 0
  return {'iterations': n, 'full': full * n / new_tokens, 'small': small * n / new_tokens}


# ----------------------------------------------------------------------------- records

def _interval(ci) -> list[float] | None:
  return None if ci is None else [float(ci.lo), float(ci.hi)]


def record(method: Method, quality: dict, speed: list[dict], passes: dict, rows: int,
           identical: int, ar_quality: dict) -> dict:
  """One method x setting's JSON record: quality over `rows` completions (evaluate.quality's
  metrics, intervals as [lo, hi]; `ar_quality` the AR teacher's of the same rows, its
  reference), speed per batch against the AR teacher of the same rounds, passes per token."""
  keys = ('gen_ppl_teacher', 'gen_ppl_evaluator', 'entropy', 'distinct_2', 'distinct_4')
  q = {key: quality[key] for key in keys}
  for key in ('gen_ppl_teacher_ci', 'gen_ppl_evaluator_ci', 'entropy_ci', 'distinct_2_ci'):
    q[key] = _interval(quality[key])
  reference = {key: ar_quality[key] for key in ('gen_ppl_teacher', 'gen_ppl_evaluator',
                                                'entropy', 'distinct_2')}
  return dict(name=method.name, label=method.label, lossless=method.lossless,
              **dataclasses.asdict(method),
              quality=dict(q, rows=rows, rows_identical_to_ar=identical, ar=reference),
              speed=speed, passes_per_token=passes)


def _ci(value, ci, fmt: str) -> str:
  if value is None:
    return '-'
  return f'{value:{fmt}}' + ('' if ci is None else f' [{ci[0]:{fmt}}, {ci[1]:{fmt}}]')


def markdown(result: dict) -> str:
  """COMPARE.md: one row per method x setting (the README table is this one)."""
  batches = result['batch_sizes']
  lines = [
      '# Decoding accelerators under identical conditions (kforcing_jax/main/compare.py)', '',
      f'{result["device"]}, jax {result["jax_version"]}; run {result["workdir"]} '
      f'({result["config"]}); {result["quality_rows"]} held-out prompts of '
      f'{result["prefix_len"]} tokens decoded to {result["gen_len"]} tokens (no EOS stop), '
      'one noise key for every method. Quality: generative perplexity under the teacher and '
      'under the independent evaluator, unigram entropy, distinct-2, with 95% bootstrap '
      'intervals, over the rows of the largest timed batch (lower gen. ppl than the AR '
      'samples\' is mode-seeking, not better). Speed: tokens/s over the AR teacher\'s in the '
      'same interleaved rounds (median). Passes per token: forward passes of a teacher-size '
      'network (+ draft-model passes). Budget: training tokens (steps x batch x length) and '
      'wall time.', '',
      '| method | lossless | passes / token | '
      + ' | '.join(f'speed-up B={b}' for b in batches)
      + ' | gen. ppl (evaluator) | gen. ppl (teacher) | entropy | distinct-2 | rows = AR | '
      'training |',
      '|---|---|---|' + '---|' * len(batches) + '---|---|---|---|---|---|']
  for r in result['methods']:
    q, p = r['quality'], r['passes_per_token']
    by_batch = {s['batch']: s['speedup_vs_ar'] for s in r['speed']}
    passes = f'{p["full"]:.2f}' + (f' + {p["small"]:.2f} draft' if p['small'] else '')
    budget = result['training'].get(r['family'], '-')
    lines.append(
        f'| {r["label"]} | {"yes" if r["lossless"] else "no"} | {passes} | '
        + ' | '.join(f'{by_batch[b]:.2f}x' if b in by_batch else '-' for b in batches)
        + f' | {_ci(q["gen_ppl_evaluator"], q["gen_ppl_evaluator_ci"], ".1f")} | '
        f'{_ci(q["gen_ppl_teacher"], q["gen_ppl_teacher_ci"], ".1f")} | '
        f'{_ci(q["entropy"], q["entropy_ci"], ".3f")} | '
        f'{_ci(q["distinct_2"], q["distinct_2_ci"], ".3f")} | '
        f'{q["rows_identical_to_ar"]}/{q["rows"]} | {budget} |')
  lines += ['', '![compare](compare.png)', '', '## Training budgets', '']
  for name, text in result['training'].items():
    lines.append(f'- {name}: {text}')
  return '\n'.join(lines) + '\n'


_COLOURS = {'ar': 'k', 'kforcing': 'tab:blue', 'kforcing_lossless': 'tab:green',
            'speculative': 'tab:orange', 'heads': 'tab:red', 'heads_verified': 'tab:brown',
            'mdlm': 'tab:purple'}
_MARKERS = ('o', 's', '^', 'D')


def plot(path, result: dict) -> None:
  """compare.png: speed-up over AR (y, one marker per batch size) against gen. ppl under the
  independent evaluator (x, log) in the first panel and against unigram entropy in the
  second; one colour per method family, every setting labelled."""
  batches = result['batch_sizes']
  rows = result['methods']
  ref = next(r for r in rows if r['family'] == 'ar')['quality']

  def draw(axes):
    for ax, key, title in zip(axes, ('gen_ppl_evaluator', 'entropy'),
                              ('gen. ppl under the independent evaluator', 'unigram entropy')):
      for r in rows:
        x = r['quality'][key]
        if x is None:
          continue
        for b, marker in zip(batches, _MARKERS):
          speed = {s['batch']: s['speedup_vs_ar'] for s in r['speed']}
          if b in speed:
            ax.scatter([x], [speed[b]], color=_COLOURS[r['family']], marker=marker, s=30,
                       label=f'B={b}' if r['family'] == 'ar' else None)
        first = {s['batch']: s['speedup_vs_ar'] for s in r['speed']}.get(batches[0])
        if first is not None:
          ax.annotate(r['name'], (x, first), fontsize=6, xytext=(3, 3),
                      textcoords='offset points')
      if ref[key] is not None:
        ax.axvline(ref[key], color='k', ls='--', lw=0.8)
      ax.axhline(1.0, color='grey', lw=0.6)
      if key == 'gen_ppl_evaluator':
        ax.set_xscale('log')
      ax.set_yscale('log')
      ax.set_xlabel(title + ' (dashed: AR samples)')
      ax.set_ylabel('tokens/s over AR (measured)')
      ax.set_title(f'{result["device"]}', fontsize=8)
      ax.legend(fontsize=7)

  report.plot(path, draw, ncols=2, figsize=(12, 5))


def check_methods_loaded(method_list: list[Method], models: Models) -> None:
  """Fail before any timing when a method's model is missing."""
  for m in method_list:
    if m.family.startswith('kforcing') and m.k not in models.students:
      raise FileNotFoundError(f'{m.name}: the run has no student stage k={m.k}.')
    if m.family.startswith('heads') and m.k not in models.heads:
      raise FileNotFoundError(f'{m.name}: no trained heads for k={m.k}.')

