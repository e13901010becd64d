"""HF transformers `generate` (PyTorch, CPU) vs our jitted AR decoder, side by side.

Needs torch and transformers, which the project itself does not: install them into a SEPARATE
venv (`requirements-bench.txt` says how), then

  /tmp/benchvenv/bin/python -m kforcing_jax.benchmarks.hf_generate \
      --config=configs/shakespeare_tiny.py --output=runs/bench/hf_generate.json

Both sides decode the same shape of work: a model the size of the config's AR teacher (HF:
GPT-2 with n_layer / n_embd / n_head / n_inner / vocabulary from config.model, n_positions =
prompt + new tokens; ours: the teacher backbone), random weights, --prefix_len-token random
prompts, exactly --new_tokens new tokens (HF: min_new_tokens = max_new_tokens, KV cache on,
do_sample=True with top_k=0 / top_p=1 / temperature=1, i.e. plain ancestral sampling like ours;
ours: decode.generate_ar with eos_id=None). For each batch size both are warmed up (our first
call compiles), then timed --repeats times, interleaved, and the median is reported as
generated tokens per second (batch * new_tokens / seconds). The architectures differ in the
details (GPT-2 has learned positions, biases and tied embeddings; ours RoPE, no QKV bias, an
untied head): parameter counts are reported for both. The JSON goes to --output and a plot
next to it (same name, .png).
"""

import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from kforcing_jax import cli, decode, models, progress, report, timing

_OUTPUT = flags.DEFINE_string('output', None, 'Where the JSON result goes (plot: same, .png).')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '4', '16', '64', '256'], 'Batch sizes.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 122, 'Tokens generated after the prompt.')
_PREFIX_LEN = flags.DEFINE_integer('prefix_len', 6, 'Prompt length.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per (side, batch); median reported.')
_THREADS = flags.DEFINE_integer('threads', None, "torch intra-op threads (default: torch's own "
                                'choice, one per physical core; XLA uses every core). On a busy '
                                'machine torch threads that spin-wait slow down sharply: run it '
                                'quiet.')
_SEED = flags.DEFINE_integer('seed', 0, 'Prompt / weight / sampling seed.')


def hf_model(model_cfg, n_positions: int):
  import torch
  import transformers
  cfg = transformers.GPT2Config(
      vocab_size=model_cfg.vocab_size, n_positions=n_positions, n_embd=model_cfg.d_model,
      n_layer=model_cfg.num_layers, n_head=model_cfg.num_heads,
      n_inner=model_cfg.mlp_ratio * model_cfg.d_model, bos_token_id=1, eos_token_id=1,
      pad_token_id=model_cfg.mask_id)
  torch.manual_seed(_SEED.value)
  return transformers.GPT2LMHeadModel(cfg).eval()


def hf_generate(model, prompts, new_tokens: int):
  import torch
  with torch.inference_mode():
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                         top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, use_cache=True)
  if out.shape[1] != prompts.shape[1] + new_tokens:
    raise RuntimeError(f'HF generate returned {out.shape[1]} tokens, expected '
                       f'{prompts.shape[1] + new_tokens}.')
  return out


def timed(fn) -> float:
  return timing.seconds(fn)[0]


def draw(result: dict, ax) -> None:
  batches = [r['batch'] for r in result['results']]
  ax.plot(batches, [r['hf_tokens_per_s'] for r in result['results']], 'o-',
          label=f'HF transformers {result["transformers_version"]} (torch, CPU)')
  ax.plot(batches, [r['jax_tokens_per_s'] for r in result['results']], 's-',
          label=f'kforcing_jax generate_ar (JAX {result["jax_version"]})')
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.set_xlabel('batch size')
  ax.set_ylabel('generated tokens / s')
  ax.set_title(f'AR decoding, {result["new_tokens"]} new tokens, {result["device"]}', fontsize=9)
  ax.legend(fontsize=7)


def run(config, output: str, batch_sizes, new_tokens: int, prefix_len: int, repeats: int,
        threads: int | None, seed: int) -> dict:
  import torch
  import transformers
  if threads:
    torch.set_num_threads(threads)
  mc = config.model
  gen_len = prefix_len + new_tokens
  hf = hf_model(mc, gen_len)
  ours = models.teacher(config)
  params = jax.jit(ours.init)(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  rows = []
  for batch in batch_sizes:
    ids = rng.integers(1, mc.vocab_size, (batch, prefix_len)).astype(np.int64)
    ids[ids == mc.mask_id] = 1
    hf_prompts = torch.from_numpy(ids)
    jax_prompts = jnp.asarray(ids, jnp.int32)
    run_hf = lambda: hf_generate(hf, hf_prompts, new_tokens)  # noqa: E731
    run_jax = lambda: jax.block_until_ready(decode.generate_ar(  # noqa: E731
        ours, params, jax_prompts, key, 1.0, gen_len=gen_len, eos_id=None))
    warm = timed(run_hf), timed(run_jax)
    hf_s, jax_s = [], []
    for _ in range(repeats):
      hf_s.append(timed(run_hf))
      jax_s.append(timed(run_jax))
    tokens = batch * new_tokens
    row = {'batch': batch, 'hf_tokens_per_s': tokens / float(np.median(hf_s)),
           'jax_tokens_per_s': tokens / float(np.median(jax_s)), 'hf_seconds': hf_s,
           'jax_seconds': jax_s, 'hf_warmup_s': warm[0], 'jax_warmup_compile_s': warm[1]}
    row['jax_over_hf'] = row['jax_tokens_per_s'] / row['hf_tokens_per_s']
    rows.append(row)
    progress.log(f'[hf_generate] batch {batch}: HF {row["hf_tokens_per_s"]:.0f} tok/s, ours '
                 f'{row["jax_tokens_per_s"]:.0f} tok/s ({row["jax_over_hf"]:.2f}x)')
  result = {
      'device': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
      'jax_device': str(jax.devices()[0].device_kind), 'torch_version': torch.__version__,
      'transformers_version': transformers.__version__, 'jax_version': jax.__version__,
      'torch_threads': torch.get_num_threads(), 'prefix_len': prefix_len,
      'new_tokens': new_tokens, 'repeats': repeats, 'seed': seed,
      'hf_model': {'architecture': 'GPT2LMHeadModel', 'n_layer': mc.num_layers,
                   'n_embd': mc.d_model, 'n_head': mc.num_heads,
                   'n_inner': mc.mlp_ratio * mc.d_model, 'vocab_size': mc.vocab_size,
                   'n_positions': gen_len, 'params': sum(p.numel() for p in hf.parameters())},
      'jax_model_params': ours.num_params(),
      'hf_generate_kwargs': {'do_sample': True, 'top_k': 0, 'top_p': 1.0, 'temperature': 1.0,
                             'use_cache': True, 'max_new_tokens': new_tokens,
                             'min_new_tokens': new_tokens},
      'results': rows}
  progress.write_json(output, result)
  report.plot(os.path.splitext(output)[0] + '.png', lambda ax: draw(result, ax))
  progress.log(f'[hf_generate] wrote {output}')
  return result


if __name__ == '__main__':
  flags.mark_flags_as_required(['output'])
  cli.main(lambda config, workdir: run(
      config, _OUTPUT.value, [int(b) for b in _BATCH_SIZES.value], _NEW_TOKENS.value,
      _PREFIX_LEN.value, _REPEATS.value, _THREADS.value, _SEED.value))
