"""Tally stage: a specimen's differential with exact 95% intervals, NRBC and rejected cells beside it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hematovision.classes import PER_100_WBC, REJECT, ROLES, UNIDENTIFIED, differential_classes

# The class reported per 100 white cells (role PER_100_WBC): nucleated red cells. The unpacking
# fails at import if classes.py ever gives that role to a second class, which reports would need.
(NRBC_CLASS,) = (name for name, r in ROLES.items() if r == PER_100_WBC)


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
    """One class of the differential: its count and percent of the identified white cells."""

    name: str
    count: int
    percent: float
    ci95: tuple[float, float]  # percent


@dataclass(frozen=True)
class NrbcCount:
    """Nucleated red cells, counted beside the differential and never inside its 100%."""

    count: int
    per_100_wbc: float | None  # count * 100 / differential cells; None while none is identified

    def to_dict(self) -> dict:
        per = None if self.per_100_wbc is None else round(self.per_100_wbc, 2)
        return {"count": self.count, "per_100_wbc": per}


@dataclass(frozen=True)
class RejectedCount:
    """Detections of a reject class (not white cells): listed, never counted in any result."""

    name: str
    count: int

    def to_dict(self) -> dict:
        return {"name": self.name, "count": self.count}


def per_100_wbc(count: int, identified: int) -> float | None:
    """Cells per 100 white cells of the differential; None when no white cell was identified."""
    return 100.0 * count / identified if identified else None


@dataclass(frozen=True)
class Tally:
    """A differential (identified white cells per class) with unidentified cells, nucleated red
    cells (None when the model has no such class) and rejected detections kept apart."""

    classes: tuple[ClassCount, ...]
    unidentified: int
    identified: int
    target: int
    nrbc: NrbcCount | None = None
    rejected: tuple[RejectedCount, ...] = ()  # empty when the model has no reject class

    @property
    def rejected_total(self) -> int:
        return sum(r.count for r in self.rejected)

    @property
    def total(self) -> int:
        """Every cell counted: identified, unidentified, nucleated red cells and rejected ones."""
        nrbc = self.nrbc.count if self.nrbc else 0
        return self.identified + self.unidentified + nrbc + self.rejected_total

    @property
    def target_reached(self) -> bool:
        return self.identified >= self.target

    def to_dict(self) -> dict:
        """The summary keys; "nrbc" and "rejected" only where the model has those classes."""
        out = {"classes": [{"name": c.name, "count": c.count, "percent": round(c.percent, 2),
                            "ci95": [round(c.ci95[0], 2), round(c.ci95[1], 2)]} for c in self.classes],
               "unidentified": self.unidentified, "identified": self.identified, "total": self.total,
               "target": self.target, "target_reached": self.target_reached}
        if self.nrbc is not None:
            out["nrbc"] = self.nrbc.to_dict()
        if self.rejected:
            out["rejected"] = [r.to_dict() for r in self.rejected]
        return out


@dataclass
class Counter:
    """Running counts of one specimen, in the bundle's class order."""

    class_names: tuple[str, ...]
    target: int = 100
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, label: str) -> None:
        self.counts[label] = self.counts.get(label, 0) + 1

    @property
    def identified(self) -> int:
        """White cells of the differential counted so far: what the target counts."""
        return sum(self.counts.get(c, 0) for c in differential_classes(self.class_names))

    def tally(self) -> Tally:
        return make_tally(self.counts, self.class_names, self.target)


def absolute_count(percent: float, wbc_10e9_per_l: float) -> float:
    """A class's absolute count in 10^9/L: its percent of the differential times the white count."""
    return wbc_10e9_per_l * percent / 100.0


def make_tally(counts: dict[str, int], class_names, target: int) -> Tally:
    """Percentages of the differential classes' cells with exact 95% intervals; nucleated red cells
    per 100 of those cells; rejected and unidentified cells kept apart. The target counts
    differential cells only."""
    names = tuple(class_names)
    wbc = differential_classes(names)
    identified = sum(counts.get(c, 0) for c in wbc)
    rows = tuple(_class_count(name, counts.get(name, 0), identified) for name in wbc)
    nrbc = None
    if NRBC_CLASS in names:
        k = counts.get(NRBC_CLASS, 0)
        nrbc = NrbcCount(k, per_100_wbc(k, identified))
    rejected = tuple(RejectedCount(c, counts.get(c, 0)) for c in names if ROLES.get(c) == REJECT)
    return Tally(rows, counts.get(UNIDENTIFIED, 0), identified, target, nrbc, rejected)


def _class_count(name: str, k: int, identified: int) -> ClassCount:
    lo, hi = clopper_pearson(k, identified)
    pct = 100.0 * k / identified if identified else 0.0
    return ClassCount(name, k, pct, (100.0 * lo, 100.0 * hi))
