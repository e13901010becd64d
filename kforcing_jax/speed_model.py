"""A calibrated decode-step time model: each kind of work at its own measured rate.

    seconds = overhead
            + matmul_flops    / (f_matmul    * peak)       weights, head, noise encoder, CDF
            + attention_flops / (f_attention * peak)       scores and values over the cache
            + weight_bytes    / (f_weights   * bandwidth(weight_bytes))
            + activation_bytes / (f_activations * bandwidth)   cache, logits, penalty counts

The plain roofline (roofline.py: max(flops / peak, bytes / bandwidth)) over-predicted this
CPU's speed-ups ~2x, and a first calibrated form (overhead + flops + bytes, one rate each)
missed a shape it was not fitted on by up to 74%: a model whose weights sit in the CPU's caches
(the demo's 7 MB) and one that streams them from memory (117 MB) read their weights at
bandwidths ~5x apart, and attention's small batched matmuls run far below the weight matmuls'
FLOP rate. So the weights are priced at the bandwidth MEASURED for a buffer of their size
(`weight_bandwidth`: a table of (bytes, bytes/s) points, interpolated in log size; one number
for an accelerator, whose weights stream from HBM every step), and FLOPs and bytes are split
by kind (roofline.analytic_step_cost). Five numbers are fitted by non-negative least squares
on relative error (each step time weighs the same whatever its size); with the device's peak
and bandwidth they read as achieved fractions (`efficiencies`), which `for_device` carries to
another device's published peaks (an assumption, stated wherever its predictions are shown).
The terms add (no overlap of compute and memory traffic is assumed): the fit stays linear.
"""

import numpy as np
from scipy import optimize

# coefficient names, in the order of `design_row`'s columns
COEFFICIENTS = ('overhead_s', 's_per_matmul_flop', 's_per_attention_flop',
                'weight_time_factor', 's_per_activation_byte')


def weight_bandwidth_at(weight_bandwidth, nbytes: float) -> float:
  """Bytes/s of reading `nbytes` of weights: a number, or [(bytes, bytes/s), ...] measured
  points interpolated linearly in log(bytes) and held constant past both ends."""
  if np.isscalar(weight_bandwidth):
    return float(weight_bandwidth)
  points = sorted((float(b), float(r)) for b, r in weight_bandwidth)
  sizes, rates = zip(*points)
  return float(np.interp(np.log(nbytes), np.log(sizes), rates))


def design_row(cost: dict, weight_bandwidth) -> np.ndarray:
  """The fit's features of one step: what each coefficient multiplies."""
  return np.array([1.0, cost['matmul_flops'], cost['attention_flops'],
                   cost['weight_bytes'] / weight_bandwidth_at(weight_bandwidth,
                                                              cost['weight_bytes']),
                   cost['activation_bytes']], np.float64)


def fit_columns(design, seconds) -> np.ndarray:
  """Coefficients c >= 0 minimising sum((design @ c / seconds - 1)^2): the relative-error
  non-negative least squares every additive form here is fitted with."""
  seconds = np.asarray(seconds, np.float64)
  design = np.asarray(design, np.float64) / seconds[:, None]
  # columns scaled to unit size so NNLS is well conditioned; scaled back after
  scale = np.abs(design).max(axis=0)
  scale[scale == 0] = 1.0
  coef, _ = optimize.nnls(design / scale, np.ones_like(seconds))
  return coef / scale


def fit(costs: list[dict], seconds, weight_bandwidth) -> dict:
  """The coefficients (all >= 0) minimising the squared relative error of the predicted
  against the measured `seconds` of steps with these analytic costs; `weight_bandwidth` is the
  device's (see weight_bandwidth_at) and is kept in the model."""
  coef = fit_columns([design_row(c, weight_bandwidth) for c in costs], seconds)
  out = {name: float(c) for name, c in zip(COEFFICIENTS, coef)}
  out['weight_bandwidth'] = weight_bandwidth
  return out


def predict(model: dict, cost: dict) -> float:
  """Predicted seconds of one step with this analytic cost."""
  row = design_row(cost, model['weight_bandwidth'])
  return float(row @ np.array([model[name] for name in COEFFICIENTS]))


def efficiencies(model: dict, peak_flops: float, bandwidth: float) -> dict:
  """The fitted model as achieved fractions: of the device's peak FLOP/s (matmul, attention),
  of the bandwidth measured at the weights' size (weights) and of its large-buffer bandwidth
  (activations); plus the per-step overhead."""
  inv = lambda x: None if x == 0 else 1.0 / x  # noqa: E731  (None: the term was not needed)
  return {'matmul_fraction_of_peak': inv(model['s_per_matmul_flop'] * peak_flops),
          'attention_fraction_of_peak': inv(model['s_per_attention_flop'] * peak_flops),
          'weights_fraction_of_bandwidth': inv(model['weight_time_factor']),
          'activations_fraction_of_bandwidth': inv(model['s_per_activation_byte'] * bandwidth),
          'overhead_s': model['overhead_s']}


def for_device(eff: dict, peak_flops: float, bandwidth: float,
               overhead_s: float | None = None) -> dict:
  """A model for another device that reaches the same fractions of ITS peak and bandwidth
  (weights streamed at its bandwidth whatever their size); overhead_s replaces the fitted
  overhead. A term the fit did not need (fraction None) costs nothing there either."""
  rate = lambda fraction, peak: 0.0 if fraction is None else 1.0 / (fraction * peak)  # noqa
  return {'overhead_s': eff['overhead_s'] if overhead_s is None else overhead_s,
          's_per_matmul_flop': rate(eff['matmul_fraction_of_peak'], peak_flops),
          's_per_attention_flop': rate(eff['attention_fraction_of_peak'], peak_flops),
          'weight_time_factor': rate(eff['weights_fraction_of_bandwidth'], 1.0),
          's_per_activation_byte': rate(eff['activations_fraction_of_bandwidth'], bandwidth),
          'weight_bandwidth': bandwidth}
