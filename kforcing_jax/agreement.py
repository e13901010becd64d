"""Agreement of a student with the AR teacher's own noise -> token map (METHOD.md s.5).

A stage's acc_total measures the student against its *previous stage*, so errors that compound
through k=1 -> 2 -> 4 stay invisible there. Here every student is measured against the same
reference, the AR teacher sampling from its own previous samples with the same noises:

  token_1 = InverseCDF(p_AR(. | x_<=t), u_1),  token_i = InverseCDF(p_AR(. | x_<=t, token_<i), u_i)

in the model's cdf_order at tau = 1 - exactly what the AR decoder emits for those uniforms. The
student's tokens are its readout (model.readout: argmax or inverse CDF) of its all-windows
forward on the same u (no frequency penalty).
Reported per slot i: agreement_i (token i equal) and prefix_i (tokens 1..i all equal; prefix_k
is acc_total against the AR map; for k = 1 it measures what the stage-1 acc_total measures, on
other held-out noises - the widest stage's - and at tau = 1).

The same windows are also binned by the entropy (nats) of p_AR(. | x_<=t): a student can only
follow the noise where the teacher is uncertain, and E[max p] per bin is what a student that
ignores the noise and always emits the teacher's mode gets for slot 1 - the floor to beat.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import distill, sampling, sharding
from kforcing_jax.models import FunctionalModel

# lower edges (nats) of the entropy bins; the last bin is open: [5, inf)
ENTROPY_EDGES = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)


def ar_noise_rollout(ar: FunctionalModel, params, tokens, u, tau):
  """(B, N, k): the AR teacher's own k-token sample of every window at once for noises u
  (B, N, k) at temperature tau (B,), each token conditioned on the ones sampled before it;
  and the first token's logits (B, N, V) (the teacher's p(. | x_<=t)).

  One causal forward for the first tokens, then for slot j a window stream of the j tokens
  sampled so far (attending to the cached context <= t) for the next one, like
  distill.greedy_rollout but with the inverse-CDF sampler in the model's cdf_order."""
  backbone = ar.module(params)
  order, temperature = backbone.cfg.cdf_order, tau[:, None]
  logits, ctx_kvs = backbone(tokens)
  n, k = tokens.shape[1], u.shape[-1]
  sampled = [sampling.inverse_cdf_sample(logits, u[..., 0], temperature, order)]
  for j in range(1, k):
    slots = backbone.embed_tokens(jnp.stack(sampled, axis=-1))
    positions = jnp.arange(n)[:, None] + jnp.arange(1, j + 1)[None, :]
    hidden, _ = backbone.window_stream(slots, positions[None], ctx_kvs,
                                       (jnp.arange(n) + 1)[None])
    sampled.append(sampling.inverse_cdf_sample(backbone.logits(hidden[:, :, -1]), u[..., j],
                                               temperature, order))
  return jnp.stack(sampled, axis=-1).astype(jnp.int32), logits


def entropy_and_mode(logits):
  """Entropy (nats) and largest probability of softmax(logits) at temperature 1, (...,)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1), jnp.max(p, axis=-1)


def entropy_bin(entropy, edges=ENTROPY_EDGES):
  """Index of each entropy's bin: i where edges[i] <= entropy < edges[i + 1] (last bin open)."""
  return jnp.clip(jnp.searchsorted(jnp.asarray(edges, jnp.float32), entropy, side='right') - 1,
                  0, len(edges) - 1)


def window_counts(student_tokens, reference, entropy, mode_p, windows, edges=ENTROPY_EDGES):
  """Sums over the valid windows (B, N) of one batch, to be added up over batches:
  'windows', 'slot' (k,) and 'prefix' (k,) agreement counts, and per entropy bin 'bin_windows',
  'bin_slot1', 'bin_total' (all k right) and 'bin_mode' (sum of max p)."""
  equal = (student_tokens == reference).astype(jnp.float32)               # (B, N, k)
  prefix = jnp.cumprod(equal, axis=-1)
  w = windows.astype(jnp.float32)
  in_bin = jax.nn.one_hot(entropy_bin(entropy, edges), len(edges)) * w[..., None]
  return {'windows': w.sum(), 'slot': jnp.einsum('bnk,bn->k', equal, w),
          'prefix': jnp.einsum('bnk,bn->k', prefix, w), 'bin_windows': in_bin.sum((0, 1)),
          'bin_slot1': jnp.einsum('bn,bnc->c', equal[..., 0], in_bin),
          'bin_total': jnp.einsum('bn,bnc->c', prefix[..., -1], in_bin),
          'bin_mode': jnp.einsum('bn,bnc->c', mode_p, in_bin)}


@dataclasses.dataclass(frozen=True)
class Counts:
  """Agreement counts summed over held-out batches; `summary()` turns them into rates."""
  windows: float
  slot: np.ndarray
  prefix: np.ndarray
  bin_windows: np.ndarray
  bin_slot1: np.ndarray
  bin_total: np.ndarray
  bin_mode: np.ndarray

  def __add__(self, other: 'Counts') -> 'Counts':
    return Counts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

  def summary(self, edges=ENTROPY_EDGES) -> dict:
    """{'windows', 'slot': [agreement_i], 'prefix': [prefix_i], 'by_entropy': [{'lo', 'hi'
    (None: open), 'windows', 'agreement_1', 'acc_total', 'mode_reference'}]}; a rate over no
    windows is None."""
    rate = lambda num, den: float(num / den) if den > 0 else None  # noqa: E731
    bins = [{'lo': float(lo), 'hi': float(edges[i + 1]) if i + 1 < len(edges) else None,
             'windows': int(self.bin_windows[i]),
             'agreement_1': rate(self.bin_slot1[i], self.bin_windows[i]),
             'acc_total': rate(self.bin_total[i], self.bin_windows[i]),
             'mode_reference': rate(self.bin_mode[i], self.bin_windows[i])}
            for i, lo in enumerate(edges)]
    return {'windows': int(self.windows),
            'slot': [rate(c, self.windows) or 0.0 for c in self.slot],
            'prefix': [rate(c, self.windows) or 0.0 for c in self.prefix], 'by_entropy': bins}


def make_counter(ar: FunctionalModel, students: list[FunctionalModel], layout):
  """batch -> [Counts of each student] for a held-out batch {'tokens', 'mask', 'u' (B, N, K)}
  with K >= every student's k: the AR reference is rolled out once for K slots and each student
  compared on its first k (the AR sample of slot i does not depend on later noises).

  Returns counts(ar_params, [student params], batch), one jit."""
  @jax.jit
  def counts(ar_params, student_params, batch):
    tokens, u = batch['tokens'], batch['u']
    tau = jnp.ones((tokens.shape[0],), jnp.float32)
    with sharding.use_mesh_rules(layout.mesh, layout.rules):
      reference, logits = ar_noise_rollout(ar, ar_params, tokens, u, tau)
      entropy, mode_p = entropy_and_mode(logits)
      out = []
      for student, params in zip(students, student_params):
        k = student.k_max
        student_logits, _ = student.module(params)(tokens, u[..., :k], tau)
        out.append(window_counts(sampling.student_tokens(student.cfg, student_logits, u[..., :k]),
                                 reference[..., :k], entropy,
                                 mode_p, distill.window_mask(batch['mask'], k)))
    return out

  def count_batch(ar_params, student_params, batch) -> list[Counts]:
    return [Counts(**{key: np.asarray(v, np.float64) for key, v in c.items()})
            for c in jax.device_get(counts(ar_params, student_params, batch))]

  return count_batch


def measure(ar_export, student_exports, layout, batches) -> list[dict]:
  """Counts.summary() of every student against the AR map over `batches` (see make_counter)."""
  count = make_counter(ar_export.model, [s.model for s in student_exports], layout)
  total = None
  for batch in batches:
    got = count(ar_export.params, [s.params for s in student_exports], batch)
    total = got if total is None else [a + b for a, b in zip(total, got)]
  return [c.summary() for c in total]
