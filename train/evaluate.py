"""Honest evaluation: accuracy, per-class P/R/F1, confusion matrix, ROC-AUC, calibration error."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hematovision.crop import CropGeometry
from hematovision.edge.vision.classify import temperature_softmax
from hematovision.pixels import model_input
from hematovision.stain import NO_STANDARD, ColourStandard

from .batches import crops_array
from .datasets import Sample

logger = logging.getLogger(__name__)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The device's own temperature-scaled softmax, so training and device agree."""
    return temperature_softmax(logits, temperature)


def predict_logits(model, samples: list[Sample], geometry: CropGeometry, batch: int = 32,
                   colour: ColourStandard = NO_STANDARD) -> np.ndarray:
    """Logits of a Keras classifier for un-augmented crops of the samples."""
    out = []
    for i in range(0, len(samples), batch):
        x = model_input(crops_array(samples[i:i + batch], geometry, colour))
        out.append(np.asarray(model(x, training=False)))
    return np.concatenate(out) if out else np.zeros((0, 0))


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


@dataclass(frozen=True)
class Metrics:
    """Figures of one classifier on one labelled set."""

    classes: tuple[str, ...]
    n: int
    accuracy: float
    macro_f1: float
    per_class: dict
    confusion: list
    roc_auc: dict
    ece: float

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "n": self.n, "accuracy": self.accuracy,
                "macro_f1": self.macro_f1, "per_class": self.per_class,
                "confusion_matrix": self.confusion, "roc_auc_ovr": self.roc_auc, "ece": self.ece}

    @classmethod
    def from_dict(cls, d: dict) -> "Metrics":
        """The inverse of `to_dict` (a bundle's stored metrics)."""
        return cls(tuple(d["classes"]), d["n"], d["accuracy"], d["macro_f1"], d["per_class"],
                   d["confusion_matrix"], d["roc_auc_ovr"], d["ece"])


def compute_metrics(probs: np.ndarray, y_true: np.ndarray, classes: tuple[str, ...]) -> Metrics:
    """Metrics from class probabilities (N, K) and true class indices (N,)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                     "support": int(support[i])} for i, c in enumerate(classes)}
    present = support > 0
    return Metrics(
        classes=tuple(classes), n=int(len(y_true)), accuracy=float((y_pred == y_true).mean()),
        macro_f1=float(f[present].mean()) if present.any() else 0.0, per_class=per_class,
        confusion=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        roc_auc=_roc_auc(probs, y_true, classes), ece=expected_calibration_error(probs, y_true),
    )


def _roc_auc(probs, y_true, classes) -> dict:
    """One-vs-rest AUC per class, and the macro mean; null for a class absent from the set."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for i, c in enumerate(classes):
        positive = y_true == i
        out[c] = float(roc_auc_score(positive, probs[:, i])) if 0 < positive.sum() < len(y_true) else None
    values = [v for v in out.values() if v is not None]
    out["macro"] = float(np.mean(values)) if values else None
    return out


def write_report(metrics: Metrics, folder: Path, title: str, history: Path | None = None) -> None:
    """metrics.json, confusion.png, curves.png (when a history exists) and report.md."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics.to_dict(), indent=2))
    _plot_confusion(metrics, folder / "confusion.png")
    has_curves = history is not None and history.is_file() and _plot_curves(history, folder / "curves.png")
    (folder / "report.md").write_text(_markdown(metrics, title, has_curves))


def _markdown(m: Metrics, title: str, has_curves: bool) -> str:
    lines = [f"# {title}", "", f"{m.n} cells. Accuracy **{m.accuracy:.3f}**, macro-F1 **{m.macro_f1:.3f}**, "
             f"macro ROC-AUC {_fmt(m.roc_auc['macro'])}, expected calibration error {m.ece:.3f}.", "",
             "| class | precision | recall | F1 | ROC-AUC | support |", "|---|---|---|---|---|---|"]
    for c in m.classes:
        pc = m.per_class[c]
        lines.append(f"| {c} | {pc['precision']:.3f} | {pc['recall']:.3f} | {pc['f1']:.3f} | "
                     f"{_fmt(m.roc_auc[c])} | {pc['support']} |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", "", "![confusion](confusion.png)"]
    if has_curves:
        lines += ["", "Training curves:", "", "![curves](curves.png)"]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _plot_confusion(m: Metrics, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(m.confusion)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(m.classes)), m.classes, rotation=45, ha="right")
    ax.set_yticks(range(len(m.classes)), m.classes)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(history: Path, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(history.open()))
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for prefix in ("", "val_"):
            values = [float(r[prefix + key]) for r in rows if r.get(prefix + key)]
            ax.plot(range(1, len(values) + 1), values, label=prefix + key)
        ax.set_xlabel("epoch (phase 1, then phase 2)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
