"""Tally stage: a specimen's differential with exact binomial (Clopper-Pearson) 95% intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hematovision.classes import UNIDENTIFIED


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact for the n of a differential)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _solve(f, target: float) -> float:
    """p in [0, 1] with f(p) = target for decreasing f, by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval for a proportion k/n (the statistics of Rümke's table).

    Raises ValueError when k is not within 0..n or the confidence not within (0, 1).
    """
    if not 0 <= k <= n or not 0.0 < confidence < 1.0:
        raise ValueError(f"clopper_pearson needs 0 <= k <= n and 0 < confidence < 1, got k={k} n={n}")
    if n == 0:
        return (0.0, 1.0)
    alpha = 1.0 - confidence
    # The lower bound for k successes is one minus the upper bound for the n - k failures.
    lower = 0.0 if k == 0 else 1.0 - _solve(lambda q: _binom_cdf(n - k, n, q), alpha / 2)
    upper = 1.0 if k == n else _solve(lambda p: _binom_cdf(k, n, p), alpha / 2)
    return (lower, upper)


@dataclass(frozen=True)
class ClassCount:
    name: str
    count: int
    percent: float
    ci95: tuple[float, float]  # percent


@dataclass(frozen=True)
class Tally:
    """A differential: counts of identified cells per class, unidentified cells apart."""

    classes: tuple[ClassCount, ...]
    unidentified: int
    identified: int
    target: int

    @property
    def total(self) -> int:
        return self.identified + self.unidentified

    @property
    def target_reached(self) -> bool:
        return self.identified >= self.target

    def to_dict(self) -> dict:
        return {"classes": [{"name": c.name, "count": c.count, "percent": round(c.percent, 2),
                             "ci95": [round(c.ci95[0], 2), round(c.ci95[1], 2)]} for c in self.classes],
                "unidentified": self.unidentified, "identified": self.identified, "total": self.total,
                "target": self.target, "target_reached": self.target_reached}


@dataclass
class Counter:
    """Running counts of one specimen, in the bundle's class order."""

    class_names: tuple[str, ...]
    target: int = 100
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, label: str) -> None:
        self.counts[label] = self.counts.get(label, 0) + 1

    def tally(self) -> Tally:
        return make_tally(self.counts, self.class_names, self.target)


def make_tally(counts: dict[str, int], class_names, target: int) -> Tally:
    """Percentages of identified cells with exact 95% intervals; unidentified cells are kept apart."""
    identified = sum(counts.get(c, 0) for c in class_names)
    rows = []
    for name in class_names:
        k = counts.get(name, 0)
        lo, hi = clopper_pearson(k, identified)
        pct = 100.0 * k / identified if identified else 0.0
        rows.append(ClassCount(name, k, pct, (100.0 * lo, 100.0 * hi)))
    return Tally(tuple(rows), counts.get(UNIDENTIFIED, 0), identified, target)
