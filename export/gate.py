"""The export gate: an absolute floor on held-out cells, and quantization must not cost accuracy or recall."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hematovision.train.evaluate import Metrics


@dataclass(frozen=True)
class GateMargins:
    """Largest allowed drops, in percentage points, from float to int8; the least share of test
    cells on which int8 must give float's top-1 class (equal scores can hide a model that
    disagrees everywhere when float itself is poor); and the floor the int8 model must reach on
    its own (a model can agree with a poor float model and still be useless)."""

    accuracy_pt: float = 1.0
    recall_pt: float = 3.0
    min_agreement: float = 0.95
    min_macro_f1: float = 0.80
    min_recall: float = 0.50  # every class with held-out cells


OPEN = GateMargins(100.0, 100.0, 0.0, 0.0, 0.0)  # measure only: cross-validation folds, cross-lab runs


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: tuple[str, ...]
    agreement: float
    agreement_per_class: dict

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reasons": list(self.reasons), "top1_agreement": self.agreement,
                "top1_agreement_per_class": self.agreement_per_class}


def agreement(float_pred: np.ndarray, int8_pred: np.ndarray, y: np.ndarray, classes) -> tuple[float, dict]:
    """Share of cells with the same top-1 class, overall and per true class."""
    same = float_pred == int8_pred
    per_class = {c: float(same[y == i].mean()) if (y == i).any() else None for i, c in enumerate(classes)}
    return float(same.mean()) if len(same) else 1.0, per_class


def judge(float_m: Metrics, int8_m: Metrics, float_pred, int8_pred, y, margins: GateMargins) -> GateResult:
    """Pass when int8 accuracy and every class's recall stay within the margins of float, int8
    agrees with float's top-1 class on enough cells, and int8 reaches the absolute floor."""
    reasons = []
    drop = 100 * (float_m.accuracy - int8_m.accuracy)
    if drop > margins.accuracy_pt:
        reasons.append(f"accuracy {100 * int8_m.accuracy:.1f}% is {drop:.1f} points below float "
                       f"{100 * float_m.accuracy:.1f}% (allowed {margins.accuracy_pt})")
    for c in float_m.classes:
        if float_m.per_class[c]["support"] == 0:
            continue
        r_drop = 100 * (float_m.per_class[c]["recall"] - int8_m.per_class[c]["recall"])
        if r_drop > margins.recall_pt:
            reasons.append(f"{c} recall drops {r_drop:.1f} points (allowed {margins.recall_pt})")
    overall, per_class = agreement(float_pred, int8_pred, y, float_m.classes)
    if overall < margins.min_agreement:
        reasons.append(f"int8 gives float's top-1 class on {100 * overall:.1f}% of test cells "
                       f"(at least {100 * margins.min_agreement:.0f}% required)")
    reasons += floor_reasons(int8_m, margins)
    return GateResult(not reasons, tuple(reasons), overall, per_class)


def floor_reasons(m: Metrics, margins: GateMargins) -> list[str]:
    """Why the int8 model falls below the absolute floor on the held-out cells, if it does."""
    reasons = []
    if m.macro_f1 < margins.min_macro_f1:
        reasons.append(f"int8 macro-F1 {m.macro_f1:.3f} is below the floor {margins.min_macro_f1:.2f} "
                       "(--min-macro-f1): train longer or on more cells")
    weak = [f"{c} {m.per_class[c]['recall']:.2f}" for c in m.classes
            if m.per_class[c]["support"] and m.per_class[c]["recall"] < margins.min_recall]
    if weak:
        reasons.append(f"recall below {margins.min_recall:.2f} (--min-recall) for {', '.join(weak)}")
    return reasons
