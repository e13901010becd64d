"""How often a distributional student and its teacher pick the same token for the same noise,
under each way a noise picks a token (sampling.CDF_ORDERS), for the same pair of distributions.

Run by benchmarks/coupling.py. For the AR teacher's p and an inverse-CDF-readout k=1 student's q
on held-out windows: KL(p || q), KL(q || p), total variation, and the agreement of the two
samplers for a uniform u under
  'id', 'sorted'  inverse CDF in that order: exactly the total overlap of the two distributions'
                  intervals of each token (`interval_overlap`, float64);
  'gumbel'        the Gumbel-max coupling: estimated with the sampler itself on `noises` noises
                  per window;
next to what any coupling could reach (1 - TV, the maximal coupling) and the Gumbel-max coupling's
guarantee (1 - TV) / (1 + TV). Windows are split by position: the stage trains on the first
distill.seq_len tokens of each row, generation runs to decode.gen_len + prefix_len.
"""

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import data, distill, rundir, sampling, sharding

COUPLINGS = ('id', 'sorted', 'gumbel')


def interval_overlap(p: np.ndarray, q: np.ndarray, order: str) -> np.ndarray:
  """(...,) the measure of u in [0, 1) for which inverse-CDF sampling of p and of q (float64
  rows (..., V), each normalised) return the same token, in the id or the sorted order (each
  distribution sorted by its own probabilities, ties by id)."""
  def intervals(r):
    if order == 'id':
      hi = np.cumsum(r, -1)
      return hi - r, hi
    rank = np.argsort(-r, axis=-1, kind='stable')
    in_order = np.take_along_axis(r, rank, -1)
    hi_sorted = np.cumsum(in_order, -1)
    back = np.argsort(rank, axis=-1)
    return (np.take_along_axis(hi_sorted - in_order, back, -1),
            np.take_along_axis(hi_sorted, back, -1))
  if order not in ('id', 'sorted'):
    raise ValueError(f'interval_overlap: order {order!r} has no intervals (id or sorted).')
  (lo_p, hi_p), (lo_q, hi_q) = intervals(p), intervals(q)
  return np.maximum(np.minimum(hi_p, hi_q) - np.maximum(lo_p, lo_q), 0.0).sum(-1)


def divergences(p: np.ndarray, q: np.ndarray) -> dict:
  """Per-row KL(p || q), KL(q || p) and TV of float64 rows (..., V)."""
  log = lambda x: np.log(np.maximum(x, 1e-300))  # noqa: E731
  return {'kl_teacher_student': np.sum(np.where(p > 0, p * (log(p) - log(q)), 0.0), -1),
          'kl_student_teacher': np.sum(np.where(q > 0, q * (log(q) - log(p)), 0.0), -1),
          'tv': 0.5 * np.abs(p - q).sum(-1)}


def gumbel_agreement(p: jax.Array, q: jax.Array, noises: jax.Array) -> jax.Array:
  """(...,) the fraction of `noises` (U,) for which the Gumbel-max coupling picks the same token
  from p and q (..., V)."""
  def one(u):
    u = jnp.full(p.shape[:-1], u)
    return (sampling.inverse_cdf_from_probs(p, u, 'gumbel')
            == sampling.inverse_cdf_from_probs(q, u, 'gumbel')).astype(jnp.float32)
  return jnp.mean(jax.lax.map(one, noises), axis=0)


def window_rows(p: np.ndarray, q: np.ndarray, gumbel: np.ndarray) -> dict:
  """Every per-window figure for rows of p, q (float64, renormalised here)."""
  p = p / p.sum(-1, keepdims=True)
  q = q / q.sum(-1, keepdims=True)
  rows = divergences(p, q)
  rows.update({'id': interval_overlap(p, q, 'id'), 'sorted': interval_overlap(p, q, 'sorted'),
               'gumbel': gumbel})
  rows['maximal'] = 1.0 - rows['tv']
  rows['gumbel_guarantee'] = (1.0 - rows['tv']) / (1.0 + rows['tv'])
  return rows


def measure(config, workdir: str, batches: int, noises: int, split_at: int | None = None) -> dict:
  """Over `batches` held-out batches of whole data.seq_len rows: the mean of every per-window
  figure, for windows before `split_at` (default distill.seq_len) and from it on."""
  if config.model.get('readout', 'argmax') != 'inverse_cdf':
    raise ValueError('coupling.measure needs a distributional student (model.readout='
                     'inverse_cdf): an argmax student\'s logits are no sampling distribution.')
  split_at = split_at or distill.stage_seq_len(config)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.distill.seq_len = config.data.seq_len  # whole rows: trained and untrained lengths
  layout = sharding.layout_from_config(config)
  tokenizer = data.prepared_tokenizer(config)
  ar, student = rundir.load_teacher_and_stage(config, workdir, 1, layout, tokenizer)
  gumbel_noises = jnp.asarray(np.random.default_rng(0).random(noises, dtype=np.float32))

  @jax.jit
  def distributions(tokens, u):
    p = sampling.probabilities(ar.model.module(ar.params)(tokens)[0])
    logits, _ = student.model.module(student.params)(tokens, u, jnp.ones((tokens.shape[0],)))
    q = sampling.probabilities(logits[..., 0, :])
    return p, q, gumbel_agreement(p, q, gumbel_noises)

  val_at = distill.stage_batches(config, layout, 1, 'validation', False,
                                 distill.VALIDATION_SEED_OFFSET, tokenizer)
  parts = {'trained': [], 'beyond': []}
  for b in range(batches):
    batch = val_at(b)
    valid = np.asarray(jax.device_get(distill.window_mask(batch['mask'], 1)))
    p, q, g = (np.asarray(x, np.float64) for x in distributions(batch['tokens'], batch['u']))
    position = np.broadcast_to(np.arange(valid.shape[1])[None], valid.shape)
    for name, chosen in (('trained', valid & (position < split_at)),
                         ('beyond', valid & (position >= split_at))):
      if chosen.any():
        parts[name].append(window_rows(p[chosen], q[chosen], g[chosen]))
  result = {'workdir': workdir, 'split_at': int(split_at), 'noises': int(noises)}
  for name, rows in parts.items():
    if rows:
      merged = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
      result[name] = {'windows': int(len(merged['tv'])),
                      **{key: float(np.mean(v)) for key, v in merged.items()}}
  return result


def markdown(results: dict) -> str:
  lines = ['| run | windows (positions) | KL(p\\|\\|q) | KL(q\\|\\|p) | TV | agreement: id CDF | '
           'sorted CDF | Gumbel-max | maximal coupling (1 - TV) | Gumbel guarantee |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for label, r in results.items():
    for part, where in (('trained', f'< {r["split_at"]}'), ('beyond', f'>= {r["split_at"]}')):
      if part not in r:
        continue
      m = r[part]
      lines.append(f'| {label} | {m["windows"]} ({where}) | {m["kl_teacher_student"]:.3f} | '
                   f'{m["kl_student_teacher"]:.3f} | {m["tv"]:.3f} | {m["id"]:.3f} | '
                   f'{m["sorted"]:.3f} | {m["gumbel"]:.3f} | {m["maximal"]:.3f} | '
                   f'{m["gumbel_guarantee"]:.3f} |')
  return '\n'.join(lines) + '\n'
