"""Confidence intervals for reported means, in numpy alone (scipy is not a dependency).

    mean +- t_{(1+level)/2, n-1} * s / sqrt(n),    s the sample standard deviation (ddof = 1)

The Student-t quantile inverts the t CDF, F(t) = 1 - I_{v/(v+t^2)}(v/2, 1/2) / 2 for t > 0, with
the regularised incomplete beta I from its continued fraction (Lentz's method) and bisection.
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


def bootstrap_mean_ci(values, level: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float] | tuple[None, None]:
  """Percentile bootstrap interval of the mean of `values` (one per user: resampling users keeps
  each user's items together, the clustering a per-user average needs)."""
  x = np.asarray([v for v in values if v is not None], np.float64)
  if x.size == 0:
    return None, None
  rng = np.random.default_rng(seed)
  means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
  tail = (1 - level) / 2
  return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
