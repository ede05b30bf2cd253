"""Confidence intervals for reported means, in numpy alone (scipy is not a dependency).

    mean +- t_{(1+level)/2, n-1} * s / sqrt(n),    s the sample standard deviation (ddof = 1)

The Student-t quantile inverts the t CDF, F(t) = 1 - I_{v/(v+t^2)}(v/2, 1/2) / 2 for t > 0, with
the regularised incomplete beta I from its continued fraction (Lentz's method) and bisection.

Bootstrap intervals resample the independent units (users; users and shared items; clusters) and
read their percentiles at a level widened for small samples (`small_sample_level`): the plain
percentile bootstrap is too narrow with few units (it covers about 0.92 at 16 users).
"""
import math

import numpy as np


def _log_beta(a: float, b: float) -> float:
  return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_fraction(a: float, b: float, x: float) -> float:
  """The continued fraction of I_x(a, b) (modified Lentz), for x < (a + 1) / (a + b + 2)."""
  tiny = 1e-300
  c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 300):
    for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                      -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d = 1.0 + numerator * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + numerator / c
      c = c if abs(c) > tiny else tiny
      h *= c * d
    if abs(c * d - 1.0) < 1e-15:
      break
  return h


def incomplete_beta(a: float, b: float, x: float) -> float:
  """The regularised incomplete beta function I_x(a, b), x in [0, 1]."""
  if x <= 0.0 or x >= 1.0:
    return float(x >= 1.0)
  front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b))
  if x < (a + 1.0) / (a + b + 2.0):
    return front * _beta_fraction(a, b, x) / a
  return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
  tail = 0.5 * incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))
  return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, dof: float) -> float:
  """The p-quantile of Student's t with `dof` degrees of freedom (bisection to 1e-12)."""
  if not 0.0 < p < 1.0:
    raise ValueError(f"t_quantile: p={p} is not in (0, 1)")
  lo, hi = -1.0, 1.0
  while t_cdf(lo, dof) > p:
    lo *= 2.0
  while t_cdf(hi, dof) < p:
    hi *= 2.0
  while hi - lo > 1e-12 * max(1.0, abs(hi)):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if t_cdf(mid, dof) < p else (lo, mid)
  return 0.5 * (lo + hi)


def mean_ci(values, level: float = 0.95) -> dict:
  """{'n', 'mean', 'std', 'ci_low', 'ci_high', 'level'} of a sample (CI None below 2 values)."""
  x = np.asarray(values, np.float64).ravel()
  n = int(x.size)
  out = {"n": n, "mean": float(x.mean()) if n else None,
         "std": float(x.std(ddof=1)) if n > 1 else None, "ci_low": None, "ci_high": None,
         "level": level}
  if n > 1:
    half = t_quantile(0.5 + level / 2.0, n - 1) * out["std"] / math.sqrt(n)
    out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
  return out


Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
  """Wilson score interval of a proportion k / n:

      centre = (p + z^2 / 2n) / (1 + z^2 / n),  half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)
  """
  if n <= 0:
    return None, None
  p = k / n
  d = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / d
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
  return max(0.0, centre - half), min(1.0, centre + half)


def normal_cdf(z: float) -> float:
  """Phi(z) = (1 + erf(z / sqrt(2))) / 2."""
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def small_sample_level(n: int, level: float = 0.95) -> float:
  """The percentile level at which a bootstrap over n clusters keeps its nominal coverage
  (Hesterberg's expanded percentile interval):

      alpha' / 2 = Phi(-sqrt(n / (n - 1)) * t_{1 - alpha/2, n-1}),   alpha = 1 - level,
      returned: 1 - alpha'

  The bootstrap distribution of a mean spreads by the plug-in s_n / sqrt(n) (divisor n, not
  n - 1) and has normal rather than Student-t tails, so the percentile interval is too narrow for
  small n (it covers about 0.92 at n = 16 for a nominal 0.95). Read at 1 - alpha' it is as wide
  as the t interval. Below 2 clusters there is nothing to widen and `level` is returned.
  """
  if not 0.0 < level < 1.0:
    raise ValueError(f"stats.small_sample_level: level={level} is not in (0, 1)")
  if n < 2:
    return level
  alpha = 1.0 - level
  return 1.0 - 2.0 * normal_cdf(-math.sqrt(n / (n - 1)) * t_quantile(1.0 - alpha / 2.0, n - 1))


def _counts(picks: np.ndarray, n: int) -> np.ndarray:
  """[R, n]: how often each of n units appears in each row of picks [R, k] (drawn indices), so
  that a replicate's sum over its drawn units is counts @ values."""
  rows = picks.shape[0]
  flat = (picks + n * np.arange(rows)[:, None]).ravel()
  return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _draw_counts(rng, n: int, resamples: int) -> np.ndarray:
  """[resamples, n] draw counts of n units resampled n times with replacement."""
  return _counts(rng.integers(0, n, size=(resamples, n)), n)


def _percentile_interval(replicates, level: float, n: int,
                         expanded: bool) -> tuple[float, float] | tuple[None, None]:
  """The central interval of the bootstrap replicates, at small_sample_level(n) if expanded."""
  r = np.asarray(replicates, np.float64)
  r = r[np.isfinite(r)]
  if r.size == 0:
    return None, None
  tail = (1.0 - (small_sample_level(n, level) if expanded else level)) / 2.0
  return float(np.quantile(r, tail)), float(np.quantile(r, 1.0 - tail))


def bootstrap_mean_ci(values, level: float = 0.95, resamples: int = 2000, seed: int = 0,
                      expanded: bool = True) -> tuple[float, float] | tuple[None, None]:
  """Percentile bootstrap interval of the mean of `values` (one per user: resampling users keeps
  each user's items together, the clustering a per-user average needs). None values are left out.
  expanded: read the percentiles at small_sample_level(n), which keeps the coverage nominal with
  few users; False gives the plain percentile interval."""
  x = np.asarray([v for v in values if v is not None], np.float64)
  if x.size == 0:
    return None, None
  counts = _draw_counts(np.random.default_rng(seed), x.size, resamples)
  return _percentile_interval(counts @ x / x.size, level, x.size, expanded)


def two_way_bootstrap_ci(outcomes, level: float = 0.95, resamples: int = 2000, seed: int = 0,
                         expanded: bool = True) -> tuple[float, float] | tuple[None, None]:
  """Bootstrap interval of a win rate when every user is judged on the same items.

  outcomes [users, items]: 1.0 (A won), 0.0 (B won), NaN (no verdict). The statistic is the
  win rate of evals/winrate.py:

      win_u = sum_i y_ui / #{i : y_ui not NaN},    rate = mean of win_u over users with a verdict

  Shared items make the users' rates correlated (an easy prompt lifts every user), so resampling
  users alone leaves the item variance out. Each replicate draws users and items independently
  with replacement and recomputes the rate on that sub-matrix (the two-way, or "pigeonhole",
  bootstrap); the percentiles are read at small_sample_level(min(users, items)) if expanded.
  Users and items with no verdict at all are left out first, as are replicates whose sub-matrix
  has no verdict. Returns (lo, hi), or (None, None) when nothing has a verdict.
  """
  y = np.asarray(outcomes, np.float64)
  if y.ndim != 2:
    raise ValueError(f"stats.two_way_bootstrap_ci: outcomes has shape {y.shape}, "
                     "not [users, items]")
  seen = ~np.isnan(y)
  keep = np.ix_(seen.any(axis=1), seen.any(axis=0))
  y = y[keep]
  users, items = y.shape
  if users == 0:
    return None, None
  rng = np.random.default_rng(seed)
  item_picks = rng.integers(0, items, size=(resamples, items))
  user_picks = rng.integers(0, users, size=(resamples, users))
  replicates = _two_way_rates(y, user_picks, item_picks)
  return _percentile_interval(replicates, level, min(users, items), expanded)


def _two_way_rates(y: np.ndarray, user_picks: np.ndarray, item_picks: np.ndarray) -> np.ndarray:
  """[R] win rates of the sub-matrices y[user_picks[r]][:, item_picks[r]] (NaN: no verdict), in
  matrix products over draw counts instead of R sub-matrices:

      won_ru = sum_i m_ri y_ui,   decided_ru = sum_i m_ri [y_ui seen]     (m: item draw counts)
      rate_r = sum_u c_ru won_ru / decided_ru / sum_u c_ru   over users with decided_ru > 0
                                                             (c: user draw counts)
  NaN where no drawn user has a verdict on the drawn items."""
  seen = ~np.isnan(y)
  item_counts = _counts(item_picks, y.shape[1])                     # [R, I]
  user_counts = _counts(user_picks, y.shape[0])                     # [R, U]
  won = item_counts @ np.where(seen, y, 0.0).T                      # [R, U]
  decided = item_counts @ seen.T.astype(np.float64)                 # [R, U]
  weight = user_counts * (decided > 0)
  rate = won / np.maximum(decided, 1.0)
  total = weight.sum(axis=1)
  return np.where(total > 0, (weight * rate).sum(axis=1) / np.maximum(total, 1.0), np.nan)


def paired_difference_ci(a, b, clusters=None, level: float = 0.95) -> dict:
  """Mean difference of two models scored on the same prompts, with its Student-t interval.

      d_p = a_p - b_p;   without clusters: mean_ci(d) over the P prompts
      with clusters:     dbar_g = mean of d_p over the prompts of cluster g,
                         mean_ci(dbar) over the G clusters (G - 1 dof)

  Pairing removes what the prompts share (an easy prompt scores high for both models), so the
  interval is of the difference itself, far narrower than two unpaired intervals side by side.
  Prompts that repeat one caption under several seeds are not independent: `clusters` (e.g. the
  caption of each prompt) makes the caption the unit, and the mean is then over captions.
  Returns {'mean', 'ci95': [lo, hi], 'n': prompts, 'clusters': units of the interval}.
  """
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f"stats.paired_difference_ci: a has {a.size} scores and b {b.size}; "
                     "they must score the same prompts")
  d = a - b
  bad = np.flatnonzero(~np.isfinite(d))
  if bad.size:
    raise ValueError("stats.paired_difference_ci: non-finite scores at prompts "
                     f"{bad[:10].tolist()}")
  units = d
  if clusters is not None:
    labels = list(clusters)
    if len(labels) != d.size:
      raise ValueError(f"stats.paired_difference_ci: {len(labels)} clusters for {d.size} prompts")
    groups: dict = {}
    for label, x in zip(labels, d):
      groups.setdefault(label, []).append(x)
    units = np.array([np.mean(g) for g in groups.values()])
  s = mean_ci(units, level)
  return {"mean": s["mean"], "ci95": [s["ci_low"], s["ci_high"]], "n": int(d.size),
          "clusters": int(units.size)}


def cluster_ratio_ci(numerators, denominators, level: float = 0.95, resamples: int = 2000,
                     seed: int = 0,
                     expanded: bool = True) -> tuple[float, float] | tuple[None, None]:
  """Bootstrap interval of a pooled ratio sum(num) / sum(den) whose counts come in clusters.

  E.g. judge agreement: per user, the verdicts that match the user's label (num) among the decided
  ones (den). A Wilson interval treats every verdict as independent; verdicts on one user's pairs
  are not (some users are easy to judge), so each replicate draws users with replacement and
  recomputes sum(num) / sum(den) over them; percentiles at small_sample_level(users) if expanded.
  Clusters with den = 0 are left out. Returns (lo, hi), or (None, None) when no den is positive.
  """
  num = np.asarray(numerators, np.float64).ravel()
  den = np.asarray(denominators, np.float64).ravel()
  if num.shape != den.shape:
    raise ValueError(f"stats.cluster_ratio_ci: {num.size} numerators for {den.size} denominators")
  if (den < 0).any() or (num < 0).any():
    raise ValueError("stats.cluster_ratio_ci: counts must be non-negative")
  keep = den > 0
  num, den = num[keep], den[keep]
  if num.size == 0:
    return None, None
  counts = _draw_counts(np.random.default_rng(seed), num.size, resamples)
  return _percentile_interval(counts @ num / (counts @ den), level, num.size, expanded)
