"""evals/stats.py's Student-t interval against scipy (an independent implementation)."""
import numpy as np
import pytest

from ppd_jax.evals import stats

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("dof", [1, 2, 3, 9, 30, 1000])
def test_t_quantile_matches_scipy(dof):
  for p in (0.975, 0.995, 0.6, 0.025, 0.01):
    assert stats.t_quantile(p, dof) == pytest.approx(scipy_stats.t.ppf(p, dof), rel=1e-9)


@pytest.mark.parametrize("n", [2, 5, 40])
def test_mean_ci_matches_scipy(n):
  x = np.random.default_rng(n).normal(3.0, 2.0, size=n)
  lo, hi = scipy_stats.t.interval(0.95, n - 1, loc=x.mean(), scale=scipy_stats.sem(x))
  out = stats.mean_ci(x)
  assert out["n"] == n and out["mean"] == pytest.approx(x.mean())
  assert (out["ci_low"], out["ci_high"]) == pytest.approx((lo, hi), rel=1e-9)


def test_degenerate_samples():
  assert stats.mean_ci([])["mean"] is None
  one = stats.mean_ci([2.5])
  assert one["mean"] == 2.5 and one["ci_low"] is None
  with pytest.raises(ValueError, match="not in"):
    stats.t_quantile(1.0, 3)
