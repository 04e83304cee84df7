"""Statistics for judging fleet telemetry: every estimate carries its sample size and an interval.

One :class:`Judge` holds the settings (confidence, minimum sample, how many looks) and turns them into the
critical value ``z`` of an interval:

* a **fixed** look (``sequential=False``) uses the normal quantile of the two-sided confidence level, valid
  for one look at the data (the end of a rollout's observation window);
* a **sequential** look (``sequential=True``) uses a time-uniform boundary, the normal-mixture confidence
  sequence (Robbins' mixture; in its asymptotic form, Waudby-Smith et al., "Time-uniform central limit theory
  and asymptotic confidence sequences"): valid however often the data is looked at while it grows, so a gate
  evaluated every second, or a monitor evaluated forever, trips on noise no more often than the stated level.

Rates (accuracy, error rate, disagreement) get Wilson score intervals, differences of rates Newcombe's hybrid
score interval built from the two Wilson intervals; means a normal (Welch) interval; quantiles of a latency
histogram a distribution-free order-statistic interval whose ends are the *edges* of the buckets holding the
bounding ranks, so the histogram's bucket error is inside the interval. Pure: no I/O, no numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

_NORMAL = NormalDist()


@dataclass(frozen=True)
class Estimate:
    """A metric's value with its interval ``[low, high]`` and the sample sizes behind it.

    ``n`` is the candidate's sample, ``n_baseline`` the baseline's (None for a one-cohort metric); an exact
    value (a count of failed installs, a number from the operator) has ``low == value == high``.
    """

    value: float
    low: float
    high: float
    n: int = 0
    n_baseline: int | None = None

    @classmethod
    def exact(cls, value: float, n: int = 0) -> Estimate:
        return cls(value, value, value, n)

    @property
    def is_exact(self) -> bool:
        return self.low == self.value == self.high

    def to_json(self) -> dict[str, float | int | None]:
        return {"value": self.value, "low": _finite(self.low), "high": _finite(self.high), "n": self.n,
                "n_baseline": self.n_baseline}


@dataclass(frozen=True)
class Judge:
    """How sure a decision must be: two-sided ``confidence``, the ``min_sample`` each cohort needs before any
    decision, and whether the data is looked at once (fixed) or again and again (sequential)."""

    confidence: float = 0.95
    min_sample: int = 10
    sequential: bool = False

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0.5, 1), not {self.confidence}")

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence

    def z(self, n: float, parts: int = 1) -> float:
        """Critical value for an interval on ``n`` observations; ``parts`` splits the error among that many
        intervals combined into one (Bonferroni)."""
        alpha = self.alpha / parts
        if not self.sequential:
            return _NORMAL.inv_cdf(1.0 - alpha / 2)
        return mixture_z(max(n, 1.0), alpha, max(float(self.min_sample), 30.0))

    def looks(self, *, sequential: bool) -> Judge:
        return Judge(self.confidence, self.min_sample, sequential)


def mixture_z(n: float, alpha: float, n_star: float) -> float:
    """The two-sided normal-mixture boundary in units of the standard error after ``n`` observations, tuned to
    be tightest near ``n_star``: with probability 1 - alpha it holds at every n at once."""
    log_inv = math.log(1.0 / alpha)
    rho2 = (2.0 * log_inv + math.log(1.0 + 2.0 * log_inv)) / n_star
    v = rho2 * n
    return math.sqrt((1.0 + v) / v * 2.0 * math.log(math.sqrt(1.0 + v) / alpha))


def effective_n(n1: int, n2: int) -> float:
    """The information of a two-sample comparison in observations (n1 n2 / (n1 + n2))."""
    return n1 * n2 / (n1 + n2) if n1 and n2 else 0.0


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(k / n, 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int, judge: Judge) -> Estimate:
    """A proportion with its Wilson interval."""
    k = min(max(k, 0), n)
    low, high = wilson(k, n, judge.z(n))
    return Estimate(k / n, low, high, n)


def rate_difference(k1: int, n1: int, k2: int, n2: int, judge: Judge) -> Estimate:
    """p1 - p2 with Newcombe's hybrid score interval (from the Wilson intervals of p1 and p2)."""
    k1, k2 = min(max(k1, 0), n1), min(max(k2, 0), n2)
    z = judge.z(effective_n(n1, n2))
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    diff = p1 - p2
    low = diff - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = diff + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return Estimate(diff, max(-1.0, low), min(1.0, high), n1, n2)


def mean_difference(mean1: float, var1: float, n1: int, mean2: float, var2: float, n2: int,
                    judge: Judge) -> Estimate:
    """mean1 - mean2 with a normal (Welch) interval."""
    se = math.sqrt(max(var1, 0.0) / n1 + max(var2, 0.0) / n2)
    half = judge.z(effective_n(n1, n2)) * se
    diff = mean1 - mean2
    return Estimate(diff, diff - half, diff + half, n1, n2)


# -- quantiles of bucketed samples ---------------------------------------------------------------------------
Bucket = tuple[float, float, int]
"""One histogram bucket: its lower edge, upper edge and count; a histogram is a list of them, sorted."""


@dataclass(frozen=True)
class QuantileBounds:
    value: float
    low: float
    high: float
    n: int


def quantile_bounds(buckets: Sequence[Bucket], q: float, z: float) -> QuantileBounds | None:
    """The q-quantile (the middle of its bucket) and a distribution-free interval: the order statistics whose
    ranks bound it at ``z`` (normal approximation of the binomial rank), widened to their buckets' edges. The
    upper end is +inf (the lower 0) when even the largest (smallest) observation is not a safe bound."""
    n = sum(c for _, _, c in buckets)
    if n == 0:
        return None
    side = 1.0 - _NORMAL.cdf(z)
    spread = z * math.sqrt(n * q * (1.0 - q))
    rank = max(1, math.ceil(q * n))
    lo_rank = math.floor(n * q - spread)
    hi_rank = math.ceil(n * q + spread) + 1
    if lo_rank < 1:
        lo_rank = 1 if (1.0 - q) ** n <= side else 0
    if hi_rank > n:
        hi_rank = n if q ** n <= side else n + 1
    value = low = high = math.nan
    seen = 0
    for lo_edge, hi_edge, count in buckets:
        first, seen = seen + 1, seen + count
        if count == 0:
            continue
        if first <= rank <= seen:
            value = math.sqrt(lo_edge * hi_edge) if lo_edge > 0 else hi_edge / 2
        if first <= lo_rank <= seen:
            low = lo_edge
        if first <= hi_rank <= seen:
            high = hi_edge
    return QuantileBounds(value, 0.0 if lo_rank == 0 else low, math.inf if hi_rank > n else high, n)


def quantile(buckets: Sequence[Bucket], q: float, judge: Judge) -> Estimate | None:
    """One cohort's q-quantile with its interval."""
    n = sum(c for _, _, c in buckets)
    bounds = quantile_bounds(buckets, q, judge.z(n))
    return None if bounds is None else Estimate(bounds.value, bounds.low, bounds.high, bounds.n)


def quantile_change(candidate: Sequence[Bucket], baseline: Sequence[Bucket], q: float,
                    judge: Judge) -> Estimate | None:
    """Relative change of the q-quantile, candidate over baseline minus one, with an interval from inverting a
    two-sample quantile test: the ratio is above r when more than a share 1 - q of the candidate lies above r
    times the baseline's q-quantile, beyond what chance allows for both samples (the candidate's share is
    binomial, the baseline quantile's error is q(1 - q) / n in probability). Bucket edges keep it
    conservative: for the lower end only candidate buckets wholly above count and the baseline quantile is its
    bucket's upper edge; for the upper end the reverse."""
    n_c, n_b = sum(c for _, _, c in candidate), sum(c for _, _, c in baseline)
    b = quantile_bounds(baseline, q, 0.0)
    c = quantile_bounds(candidate, q, 0.0)
    if c is None or b is None or not b.value > 0:
        return None
    b_lo, b_hi = _bucket_of_rank(baseline, max(1, math.ceil(q * n_b)))
    z = judge.z(effective_n(n_c, n_b))
    tail = 1.0 - q
    base_var = q * (1.0 - q) / n_b

    def stat(above: int) -> float:
        share = above / n_c
        se = math.sqrt(max(share * (1.0 - share) / n_c + base_var, 1e-12))
        return (share - tail) / se

    low, high = -1.0, math.inf
    counts = [count for _, _, count in candidate]
    at_or_above = [sum(counts[i:]) for i in range(len(counts))]
    for i, (lo_edge, _, _) in enumerate(candidate):  # the largest r with evidence the ratio is above it
        if b_hi > 0 and math.isfinite(b_hi) and stat(at_or_above[i]) >= z:
            low = max(low, lo_edge / b_hi - 1.0)
    for i, (_, hi_edge, _) in enumerate(candidate):  # the smallest r with evidence the ratio is below it
        above = at_or_above[i + 1] if i + 1 < len(counts) else 0
        if b_lo > 0 and stat(above) <= -z:
            high = hi_edge / b_lo - 1.0
            break
    return Estimate(c.value / b.value - 1.0, low, high, n_c, n_b)


def _bucket_of_rank(buckets: Sequence[Bucket], rank: int) -> tuple[float, float]:
    seen = 0
    for lo_edge, hi_edge, count in buckets:
        seen += count
        if seen >= rank:
            return lo_edge, hi_edge
    return buckets[-1][0], buckets[-1][1]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
