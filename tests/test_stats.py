"""evals/stats.py: the Student-t interval against scipy (an independent implementation), and
the bootstrap intervals' coverage by simulation (numpy alone)."""
import math

import numpy as np
import pytest

from ppd_jax.evals import stats


@pytest.fixture
def scipy_stats():
  return pytest.importorskip("scipy.stats")


@pytest.fixture
def scipy_stats_or_none():
  try:
    import scipy.stats
  except ImportError:
    return None
  return scipy.stats


@pytest.mark.parametrize("dof", [1, 2, 3, 9, 30, 1000])
def test_t_quantile_matches_scipy(dof, scipy_stats):
  for p in (0.975, 0.995, 0.6, 0.025, 0.01):
    assert stats.t_quantile(p, dof) == pytest.approx(scipy_stats.t.ppf(p, dof), rel=1e-9)


@pytest.mark.parametrize("n", [2, 5, 40])
def test_mean_ci_matches_scipy(n, scipy_stats):
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


# --- Bootstrap intervals that keep their coverage -------------------------------------------

def test_small_sample_level_is_hesterbergs_expanded_level(scipy_stats):
  # alpha'/2 = Phi(-sqrt(n/(n-1)) t_{1-alpha/2, n-1}); so z_{1-alpha'/2} sqrt((n-1)/n) = t.
  for n in (2, 5, 16, 48, 400):
    for level in (0.95, 0.9):
      expected = 1 - 2 * scipy_stats.norm.cdf(
          -np.sqrt(n / (n - 1)) * scipy_stats.t.ppf(0.5 + level / 2, n - 1))
      assert stats.small_sample_level(n, level) == pytest.approx(expected, rel=1e-9, abs=1e-15)
  z16 = scipy_stats.norm.ppf(0.5 + stats.small_sample_level(16) / 2)
  assert z16 * np.sqrt(15 / 16) == pytest.approx(scipy_stats.t.ppf(0.975, 15), rel=1e-9)
  for z in (-3.0, -0.4, 0.0, 1.7):
    assert stats.normal_cdf(z) == pytest.approx(scipy_stats.norm.cdf(z), rel=1e-12)


def test_small_sample_level_limits():
  # Without scipy: t_{0.975, 15} = 2.131449545559323 from a t table, Phi from math.erf.
  z = 2.131449545559323 * math.sqrt(16 / 15)
  assert stats.small_sample_level(16) == pytest.approx(math.erf(z / math.sqrt(2)), rel=1e-9)
  assert stats.small_sample_level(1) == 0.95
  assert 0.95 < stats.small_sample_level(10**6) < 0.95 + 1e-5
  assert stats.small_sample_level(16) > stats.small_sample_level(48) > 0.95
  with pytest.raises(ValueError, match="level=1.5"):
    stats.small_sample_level(10, 1.5)


def _covers(interval, truth):
  lo, hi = interval
  return lo <= truth <= hi


def test_expanded_bootstrap_keeps_its_coverage_with_16_users():
  """16 users, each a win rate over 8 items with a skewed per-user p ~ Beta(2, 1) (mean 2/3):
  the plain percentile bootstrap covers the true mean about 0.92 of the time, the default
  (expanded) one 0.95."""
  sets, users, items = 2000, 16, 8
  rng = np.random.default_rng(1)
  rates = rng.binomial(items, rng.beta(2.0, 1.0, size=(sets, users))) / items
  plain = np.mean([_covers(stats.bootstrap_mean_ci(r, resamples=1000, seed=k, expanded=False),
                           2 / 3) for k, r in enumerate(rates)])
  default = np.mean([_covers(stats.bootstrap_mean_ci(r, resamples=1000, seed=k), 2 / 3)
                     for k, r in enumerate(rates)])
  # Monte Carlo standard error at 0.95 over 2000 sets: 0.005.
  assert plain < 0.935, plain
  assert 0.935 <= default <= 0.965, default


def _two_way_world(sets, users, items, item_sd, seed, user_sd=1.0, mu=0.5, missing=0.15):
  """Outcomes [sets, users, items] from logit p_ui = mu + user_u + item_i (normal effects), a
  share `missing` of verdicts dropped, and the true mean E[p] by Gauss-Hermite quadrature."""
  nodes, weights = np.polynomial.hermite_e.hermegauss(60)
  weights = weights / weights.sum()
  eta = mu + user_sd * nodes[:, None] + item_sd * nodes[None, :]
  truth = float(np.sum(weights[:, None] * weights[None, :] / (1 + np.exp(-eta))))
  rng = np.random.default_rng(seed)
  logit = (mu + user_sd * rng.normal(size=(sets, users, 1))
           + item_sd * rng.normal(size=(sets, 1, items)))
  y = (rng.random((sets, users, items)) < 1 / (1 + np.exp(-logit))).astype(np.float64)
  y[rng.random(y.shape) < missing] = np.nan
  return y, truth


def _users_only(y, seed):
  decided = (~np.isnan(y)).sum(axis=1)
  rates = [np.nansum(row) / d if d else None for row, d in zip(y, decided)]
  return stats.bootstrap_mean_ci(rates, resamples=800, seed=seed)


def _coverage_and_width(worlds, truth):
  out = {}
  for name, ci in (("users", _users_only),
                   ("two_way", lambda y, k: stats.two_way_bootstrap_ci(y, resamples=800, seed=k))):
    intervals = np.array([ci(y, k) for k, y in enumerate(worlds)])
    out[name] = (np.mean((intervals[:, 0] <= truth) & (truth <= intervals[:, 1])),
                 np.mean(intervals[:, 1] - intervals[:, 0]))
  return out


def test_two_way_bootstrap_covers_when_users_share_item_effects():
  """48 users x 8 shared items (the demo's shape) with an item difficulty every user shares: the
  users-only bootstrap misses the item variance and under-covers; the two-way one covers."""
  worlds, truth = _two_way_world(500, 48, 8, item_sd=1.0, seed=5)
  got = _coverage_and_width(worlds, truth)
  assert got["users"][0] < 0.85, got
  assert got["two_way"][0] >= 0.93, got


def test_two_way_bootstrap_without_item_effects_stays_close():
  worlds, truth = _two_way_world(500, 48, 8, item_sd=0.0, seed=6)
  got = _coverage_and_width(worlds, truth)
  assert got["users"][0] >= 0.93 and got["two_way"][0] >= 0.93, got
  # Conservative (item resampling counts the verdict noise again) but not unboundedly wider.
  assert got["two_way"][1] < 2.0 * got["users"][1], got


def test_two_way_replicates_are_the_sub_matrix_win_rates():
  """Each replicate is winrate.py's statistic on y[drawn users][:, drawn items]."""
  rng = np.random.default_rng(7)
  y = (rng.random((6, 5)) < 0.6).astype(np.float64)
  y[rng.random(y.shape) < 0.3] = np.nan
  y[2] = np.nan
  y[3, :] = [np.nan, 1.0, np.nan, np.nan, np.nan]
  user_picks = rng.integers(0, 6, size=(300, 6))
  item_picks = rng.integers(0, 5, size=(300, 5))
  got = stats._two_way_rates(y, user_picks, item_picks)
  for r in range(300):
    sub = y[user_picks[r]][:, item_picks[r]]
    decided = (~np.isnan(sub)).sum(axis=1)
    rates = [np.nansum(row) / d for row, d in zip(sub, decided) if d > 0]
    if rates:
      assert got[r] == pytest.approx(np.mean(rates), abs=1e-12)
    else:
      assert np.isnan(got[r])


def test_two_way_interval_edges():
  rng = np.random.default_rng(12)
  y = (rng.random((10, 6)) < 0.7).astype(np.float64)
  y[rng.random(y.shape) < 0.2] = np.nan
  lo, hi = stats.two_way_bootstrap_ci(y, seed=3)
  decided = (~np.isnan(y)).sum(axis=1)
  point = np.mean([np.nansum(row) / d for row, d in zip(y, decided) if d])
  assert lo < point < hi
  # A user or an item without any verdict changes nothing.
  padded = np.full((11, 7), np.nan)
  padded[1:, :6] = y
  assert stats.two_way_bootstrap_ci(padded, seed=3) == (lo, hi)
  # The level is widened for the smaller side, here the 6 items.
  plain = stats.two_way_bootstrap_ci(y, level=stats.small_sample_level(6), seed=3, expanded=False)
  assert (lo, hi) == plain
  assert stats.two_way_bootstrap_ci(np.ones((5, 4))) == (1.0, 1.0)
  assert stats.two_way_bootstrap_ci(np.full((3, 2), np.nan)) == (None, None)
  with pytest.raises(ValueError, match="not \\[users, items\\]"):
    stats.two_way_bootstrap_ci([1.0, 0.0])


# --- Paired differences ------------------------------------------------------------------------

T975 = {5: 2.570581835636314, 9: 2.262157162740992}   # Student-t table, two-sided 95%


def test_paired_difference_is_the_t_interval_of_the_differences(scipy_stats_or_none):
  rng = np.random.default_rng(8)
  a = rng.normal(size=10)
  b = a - 0.3 + rng.normal(0, 0.2, size=10)
  d = a - b
  half = T975[9] * d.std(ddof=1) / np.sqrt(10)
  got = stats.paired_difference_ci(a, b)
  assert got["mean"] == pytest.approx(d.mean()) and got["n"] == 10 and got["clusters"] == 10
  assert got["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], rel=1e-9)
  if scipy_stats_or_none is not None:
    ci = scipy_stats_or_none.ttest_rel(a, b).confidence_interval(0.95)
    assert got["ci95"] == pytest.approx([ci.low, ci.high], rel=1e-9)


def test_paired_difference_clustered_by_caption():
  """Captions repeated under several seeds: the interval is over the 6 caption means (5 dof)."""
  rng = np.random.default_rng(9)
  captions = np.array(["c0", "c1", "c2", "c3", "c4", "c5"])[rng.integers(0, 6, size=20)]
  captions[:6] = ["c0", "c1", "c2", "c3", "c4", "c5"]
  a = rng.normal(size=20) + (captions == "c2")
  b = rng.normal(size=20)
  names, which = np.unique(captions, return_inverse=True)
  means = np.bincount(which, weights=a - b) / np.bincount(which)
  half = T975[5] * means.std(ddof=1) / np.sqrt(len(names))
  got = stats.paired_difference_ci(a, b, clusters=list(captions))
  assert got["n"] == 20 and got["clusters"] == 6
  assert got["mean"] == pytest.approx(means.mean())
  assert got["ci95"] == pytest.approx([means.mean() - half, means.mean() + half], rel=1e-9)


def test_pairing_is_narrower_when_models_share_prompt_effects():
  rng = np.random.default_rng(10)
  prompt = rng.normal(0, 1.0, size=200)           # an easy prompt scores high for both models
  a = prompt + 0.1 + rng.normal(0, 0.1, size=200)
  b = prompt + rng.normal(0, 0.1, size=200)
  paired = stats.paired_difference_ci(a, b)["ci95"]
  sa, sb = stats.mean_ci(a), stats.mean_ci(b)
  unpaired_half = np.hypot(sa["ci_high"] - sa["mean"], sb["ci_high"] - sb["mean"])
  assert paired[1] - paired[0] < 0.25 * 2 * unpaired_half
  assert paired[0] > 0.0                          # the +0.1 is found; unpaired it is not
  assert sa["ci_low"] < sb["ci_high"]


def test_paired_difference_errors_are_named():
  with pytest.raises(ValueError, match="a has 3 scores and b 2"):
    stats.paired_difference_ci([1, 2, 3], [1, 2])
  with pytest.raises(ValueError, match="non-finite scores at prompts \\[1\\]"):
    stats.paired_difference_ci([1, np.nan, 3], [1, 2, 3])
  with pytest.raises(ValueError, match="2 clusters for 3 prompts"):
    stats.paired_difference_ci([1, 2, 3], [1, 2, 2], clusters=["x", "y"])


# --- A ratio clustered by user -----------------------------------------------------------------

def test_cluster_ratio_keeps_coverage_where_wilson_does_not():
  """Judge agreement over 16 users who are not equally easy to judge (per-user accuracy
  p ~ Beta(3, 1.5)), 4-12 decided pairs each: Wilson treats the verdicts as independent and
  under-covers; the user-clustered bootstrap covers."""
  sets, users = 1000, 16
  rng = np.random.default_rng(2)
  p = rng.beta(3.0, 1.5, size=(sets, users))
  decided = rng.integers(4, 13, size=(sets, users))
  right = rng.binomial(decided, p)
  truth = 3.0 / 4.5
  wilson = np.mean([_covers(stats.wilson(int(k.sum()), int(m.sum())), truth)
                    for k, m in zip(right, decided)])
  clustered = np.mean([_covers(stats.cluster_ratio_ci(k, m, resamples=800, seed=s), truth)
                       for s, (k, m) in enumerate(zip(right, decided))])
  assert wilson < 0.85, wilson
  assert clustered >= 0.935, clustered


def test_cluster_ratio_is_a_ratio_of_sums():
  # Users (right, decided) = (10, 10) and (0, 1): a replicate drawing each once is 10 / 11 (a
  # mean of per-user ratios would say 0.5), and half of the replicates draw each once.
  lo, hi = stats.cluster_ratio_ci([10, 0], [10, 1], level=0.3, resamples=4000, expanded=False)
  assert lo == pytest.approx(10 / 11) and hi == pytest.approx(10 / 11)


def test_cluster_ratio_with_one_question_each_is_the_mean_bootstrap():
  right = np.random.default_rng(11).integers(0, 2, size=30)
  got = stats.cluster_ratio_ci(right, np.ones(30), seed=4)
  assert got == pytest.approx(stats.bootstrap_mean_ci(right, seed=4), abs=1e-12)
  # Users with nothing decided are left out.
  assert stats.cluster_ratio_ci(np.r_[right, 0, 0], np.r_[np.ones(30), 0, 0], seed=4) == got
  assert stats.cluster_ratio_ci([0, 0], [0, 0]) == (None, None)
  with pytest.raises(ValueError, match="3 numerators for 2 denominators"):
    stats.cluster_ratio_ci([1, 2, 3], [3, 3])
