"""speed_model: the fit recovers known rates from synthetic step times; weights are priced at
the bandwidth of their size; fitted fractions carry to another device."""

import numpy as np
import pytest

from kforcing_jax import speed_model

# a device whose small buffers read 4x faster than large ones (caches vs main memory)
TABLE = [[1e6, 80e9], [1e7, 80e9], [1e8, 20e9], [1e9, 20e9]]


def _costs(rng, n):
  return [{'matmul_flops': rng.uniform(1e6, 1e10), 'attention_flops': rng.uniform(1e5, 1e9),
           'weight_bytes': float(np.exp(rng.uniform(np.log(2e6), np.log(5e8)))),
           'activation_bytes': rng.uniform(1e4, 1e8)} for _ in range(n)]


def _seconds(cost, bandwidth_at):
  # 30% / 5% of a 2e11 peak, weights at 70% of the bandwidth of their size, activations at 50%
  # of 2e10, 40 us per step: an independent closed form of the model's prediction
  return (40e-6 + cost['matmul_flops'] / (0.3 * 2e11) + cost['attention_flops'] / (0.05 * 2e11)
          + cost['weight_bytes'] / (0.7 * bandwidth_at(cost['weight_bytes']))
          + cost['activation_bytes'] / (0.5 * 2e10))


def _bandwidth_at(nbytes):  # TABLE by hand: flat, log-linear between 1e7 and 1e8, flat
  if nbytes <= 1e7:
    return 80e9
  if nbytes >= 1e8:
    return 20e9
  return 80e9 + (20e9 - 80e9) * np.log(nbytes / 1e7) / np.log(10)


def test_weight_bandwidth_interpolates_in_log_size_and_clamps():
  for nbytes in (5e5, 1e6, 3e6, 1e7, 2e7, 3.1622e7, 9e7, 1e8, 5e9):
    assert speed_model.weight_bandwidth_at(TABLE, nbytes) == pytest.approx(_bandwidth_at(nbytes))
  assert speed_model.weight_bandwidth_at(TABLE[::-1], 3e7) == pytest.approx(_bandwidth_at(3e7))
  assert speed_model.weight_bandwidth_at(5e9, 123.0) == 5e9  # one number: every size


def test_fit_recovers_known_fractions_and_overhead():
  costs = _costs(np.random.default_rng(0), 60)
  seconds = [_seconds(c, _bandwidth_at) for c in costs]
  model = speed_model.fit(costs, seconds, TABLE)
  eff = speed_model.efficiencies(model, 2e11, 2e10)
  assert eff['matmul_fraction_of_peak'] == pytest.approx(0.3, rel=1e-6)
  assert eff['attention_fraction_of_peak'] == pytest.approx(0.05, rel=1e-6)
  assert eff['weights_fraction_of_bandwidth'] == pytest.approx(0.7, rel=1e-6)
  assert eff['activations_fraction_of_bandwidth'] == pytest.approx(0.5, rel=1e-6)
  assert eff['overhead_s'] == pytest.approx(40e-6, rel=1e-6)
  np.testing.assert_allclose([speed_model.predict(model, c) for c in costs], seconds, rtol=1e-9)


def test_one_bandwidth_for_all_sizes_cannot_fit_cache_and_memory_regimes():
  """Why the weights carry a bandwidth per size: with one number for every size the same
  synthetic steps (weights and overhead only, as a batch-1 step of a small or a large model)
  fit far worse."""
  costs = [{'matmul_flops': 0.0, 'attention_flops': 0.0, 'weight_bytes': w,
            'activation_bytes': 0.0} for w in np.geomspace(2e6, 5e8, 12)]
  seconds = np.array([_seconds(c, _bandwidth_at) for c in costs])
  sized = speed_model.fit(costs, seconds, TABLE)
  flat = speed_model.fit(costs, seconds, 20e9)
  err = lambda m: np.abs(np.array([speed_model.predict(m, c) for c in costs]) / seconds - 1)  # noqa
  assert err(sized).max() < 1e-9
  assert err(flat).max() > 0.2


def test_fit_keeps_terms_non_negative_and_transfers_fractions():
  costs = [{'matmul_flops': f, 'attention_flops': 0.0, 'weight_bytes': 1e6,
            'activation_bytes': 0.0} for f in (1e6, 2e6, 4e6, 8e6)]
  seconds = [c['matmul_flops'] / 1e9 for c in costs]  # pure compute: no other term
  model = speed_model.fit(costs, seconds, 1e10)
  assert model['overhead_s'] == pytest.approx(0.0, abs=1e-12)
  assert model['weight_time_factor'] == pytest.approx(0.0, abs=1e-12)
  assert model['s_per_matmul_flop'] == pytest.approx(1e-9)
  eff = speed_model.efficiencies(model, 2e9, 1e9)
  assert eff['weights_fraction_of_bandwidth'] is None  # a term the fit did not need
  other = speed_model.for_device(eff, 4e9, 1e9)
  assert other['s_per_matmul_flop'] == pytest.approx(0.5e-9)  # half of a 2x faster peak
  assert other['weight_time_factor'] == 0.0 and other['overhead_s'] == pytest.approx(0.0)
  assert other['weight_bandwidth'] == 1e9  # an accelerator streams its weights from HBM
  big = {'matmul_flops': 2e9, 'attention_flops': 0.0, 'weight_bytes': 1e9,
         'activation_bytes': 0.0}
  assert speed_model.predict(other, big) == pytest.approx(1.0)
