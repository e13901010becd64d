"""A calibrated decode-step time model: seconds = overhead + flops / (f_eff * peak) +
bytes / (b_eff * bandwidth), fitted on measured step times.

The plain roofline (roofline.py: max(flops / peak, bytes / bandwidth)) assumes every op runs at
the device's peak; on this CPU small decode matmuls and the per-step bookkeeping run far below
it, and it over-predicted the student's speed-up ~2x. Here three numbers are fitted instead, by
non-negative least squares on *relative* error (each step time weighs the same whatever its
size): a fixed per-step overhead, seconds per FLOP and seconds per byte; with the device's
peak and bandwidth they read as achieved fractions of peak (f_eff, b_eff). The terms add (no
overlap of compute and memory traffic is assumed), which keeps the fit linear.

Costs are roofline.analytic_step_cost (hand-counted, affine in the batch).
"""

import numpy as np
from scipy import optimize


def fit(flops, nbytes, seconds) -> dict:
  """{'overhead_s', 's_per_flop', 's_per_byte'} minimising the squared relative error of
  overhead + s_per_flop * flops + s_per_byte * bytes against `seconds`, all terms >= 0."""
  flops, nbytes, seconds = (np.asarray(x, np.float64) for x in (flops, nbytes, seconds))
  # columns scaled to unit size so NNLS is well conditioned; scaled back after
  design = np.stack([np.ones_like(flops), flops, nbytes], axis=1) / seconds[:, None]
  scale = np.abs(design).max(axis=0)
  scale[scale == 0] = 1.0
  coef, _ = optimize.nnls(design / scale, np.ones_like(seconds))
  coef = coef / scale
  return {'overhead_s': float(coef[0]), 's_per_flop': float(coef[1]),
          's_per_byte': float(coef[2])}


def predict(model: dict, flops, nbytes):
  """Predicted seconds of steps with these costs."""
  return (model['overhead_s'] + model['s_per_flop'] * np.asarray(flops, np.float64)
          + model['s_per_byte'] * np.asarray(nbytes, np.float64))


def efficiencies(model: dict, peak_flops: float, bandwidth: float) -> dict:
  """The fitted model as achieved fractions of a device's peak FLOP/s and bandwidth."""
  inv = lambda x: float('inf') if x == 0 else 1.0 / x  # noqa: E731
  return {'flops_fraction_of_peak': inv(model['s_per_flop'] * peak_flops),
          'bytes_fraction_of_bandwidth': inv(model['s_per_byte'] * bandwidth),
          'overhead_s': model['overhead_s']}


def for_device(eff: dict, peak_flops: float, bandwidth: float,
               overhead_s: float | None = None) -> dict:
  """A model for another device that reaches the same fractions of ITS peaks (an assumption,
  stated wherever its predictions are shown); overhead_s replaces the fitted overhead."""
  return {'overhead_s': eff['overhead_s'] if overhead_s is None else overhead_s,
          's_per_flop': 1.0 / (eff['flops_fraction_of_peak'] * peak_flops),
          's_per_byte': 1.0 / (eff['bytes_fraction_of_bandwidth'] * bandwidth)}
