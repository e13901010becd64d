"""speed_model: the fit recovers known efficiencies from synthetic step times."""

import numpy as np
import pytest

from kforcing_jax import speed_model


def test_fit_recovers_known_efficiencies_and_overhead():
  rng = np.random.default_rng(0)
  peak, bandwidth = 2e11, 2e10
  flops = rng.uniform(1e6, 1e10, 40)
  nbytes = rng.uniform(1e5, 1e9, 40)
  # 30% of peak, 60% of bandwidth, 50 us per step
  seconds = 50e-6 + flops / (0.3 * peak) + nbytes / (0.6 * bandwidth)
  model = speed_model.fit(flops, nbytes, seconds)
  eff = speed_model.efficiencies(model, peak, bandwidth)
  assert eff['flops_fraction_of_peak'] == pytest.approx(0.3, rel=1e-6)
  assert eff['bytes_fraction_of_bandwidth'] == pytest.approx(0.6, rel=1e-6)
  assert eff['overhead_s'] == pytest.approx(50e-6, rel=1e-6)
  np.testing.assert_allclose(speed_model.predict(model, flops, nbytes), seconds, rtol=1e-9)


def test_fit_keeps_terms_non_negative_and_transfers_fractions():
  flops = np.array([1e6, 2e6, 4e6, 8e6])
  seconds = flops / 1e9  # pure compute, no overhead, no bytes term
  model = speed_model.fit(flops, np.zeros(4), seconds)
  assert model['overhead_s'] == pytest.approx(0.0, abs=1e-12)
  assert model['s_per_flop'] == pytest.approx(1e-9)
  other = speed_model.for_device(speed_model.efficiencies(model, 2e9, 1e9), 4e9, 1e9)
  assert other['s_per_flop'] == pytest.approx(0.5e-9)  # half of a 2x faster peak
