"""Site adaptation: the bundle's head re-fitted on the training labs' cells and a site's verified ones.

The int8 backbone stays as shipped (its features are what the gate of the base bundle measured against
the float model); only the dense layer over its pooled features is re-fitted, in numpy, so this runs
where the device's libraries run. Judged before a bundle is written: the site's cells by
cross-validation, every original lab's held-out cells against the base bundle's own figures, and the
head on int8 against float features of those held-out cells. No TensorFlow here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from hematovision.classes import KNOWN_CLASSES
from hematovision.errors import DataError, ModelInvalid
from hematovision.head import FitSettings, Head, fit_head
from hematovision.novelty import NoveltyModel
from hematovision.reference_cells import ReferenceCells

from hematovision.export.confidence import Confidence, fit_confidence
from .evaluate import compute_metrics, softmax
from .site_cells import SiteFeatures


@dataclass(frozen=True)
class AdaptSettings:
    site_share: float = 0.7  # of the training weight given to the site's cells (the rest: the training labs')
    views: int = 8  # rotations and flips of each site cell learned from
    folds: int = 5  # cross-validation of the site's cells
    fit: FitSettings = FitSettings()
    max_rejected_correct: float = 0.02  # confidence threshold, as at export


@dataclass(frozen=True)
class AdaptGate:
    """What an adapted head must meet before a bundle is written."""

    max_original_drop_pt: float = 1.0  # accuracy and macro-F1, each original lab's held-out cells
    min_site_macro_f1: float = 0.80  # cross-validated on the site's cells
    min_site_recall: float = 0.50  # every class the site gave cells of
    min_agreement: float = 0.95  # int8 vs float features through the head, original held-out cells


@dataclass(frozen=True)
class Adapted:
    head: Head
    confidence: Confidence
    novelty: NoveltyModel
    reference: ReferenceCells  # the base's cells and the site's (split "train", lab = the site)
    figures: dict
    passed: bool
    reasons: tuple[str, ...]


def head_classes(base: tuple[str, ...], site: SiteFeatures) -> tuple[str, ...]:
    """The base bundle's classes and any new one the site's cells bring, in canonical order."""
    names = set(base) | set(site.labels)
    return tuple(c for c in KNOWN_CLASSES if c in names)


def fit_site_head(reference: ReferenceCells, site: SiteFeatures, classes: tuple[str, ...],
                  settings: AdaptSettings, keep: np.ndarray | None = None) -> Head:
    """The head on the training labs' training cells and the site's cells (`keep`: which of them) under
    `settings.views` views; the site's cells carry `site_share` of the weight."""
    train = reference.split("train")
    train = train.where(np.isin(train.labels, classes))
    keep = np.arange(len(site)) if keep is None else keep
    site_x = site.features[keep, :settings.views].reshape(-1, site.features.shape[-1])
    site_y = np.repeat(site.labels[keep], settings.views)
    share = settings.site_share if len(site_x) else 0.0
    weights = np.concatenate([np.full(len(train), (1 - share) / max(len(train), 1)),
                              np.full(len(site_x), share / max(len(site_x), 1))])
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in np.concatenate([train.labels, site_y])])
    return fit_head(np.concatenate([train.features, site_x]), y, classes, weights, settings.fit)


def site_out_of_fold(reference: ReferenceCells, site: SiteFeatures, classes, settings: AdaptSettings) -> np.ndarray:
    """Logits of each site cell (as cut, view 0) from a head fitted without its fold: the site's
    figures, and its share of the confidence fit, are of cells the head did not learn from."""
    logits = np.zeros((len(site), len(classes)))
    folds = _folds(site.labels, settings.folds, settings.fit.seed)
    for fold in range(settings.folds):
        held = folds == fold
        if held.any():
            head = fit_site_head(reference, site, classes, settings, np.flatnonzero(~held))
            logits[held] = head.logits(site.features[held, 0])
    return logits


def _folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold per cell, each class dealt round the folds in a seeded order (stratified)."""
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(labels), int)
    for c in sorted(set(labels)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        folds[idx] = np.arange(len(idx)) % k
    return folds


def adapt(base_meta: dict, novelty: NoveltyModel, reference: ReferenceCells, site: SiteFeatures, site_name: str,
          settings: AdaptSettings = AdaptSettings(), gate: AdaptGate = AdaptGate()) -> Adapted:
    """Re-fit, calibrate and judge a head for a site; `base_meta` is the base bundle's bundle.json."""
    if not len(site):
        raise DataError("no site cells to adapt to: give folders of verified cells")
    classes = head_classes(tuple(base_meta["classes"]), site)
    head = fit_site_head(reference, site, classes, settings)
    oof = site_out_of_fold(reference, site, classes, settings)
    y_site = _indices(site.labels, classes)
    val = reference.split("val").where(np.isin(reference.split("val").labels, classes))
    confidence = fit_confidence(np.concatenate([head.logits(val.features), oof]),
                                np.concatenate([_indices(val.labels, classes), y_site]),
                                settings.max_rejected_correct,
                                np.concatenate([val.labs, np.full(len(site), site_name)]))
    figures = _figures(base_meta, head, reference, classes, oof, y_site, confidence, site)
    reasons = _judge(figures, gate)
    kept = _with_site_cells(reference, site, site_name)
    kept = replace(kept, logits=head.logits(kept.features).astype(np.float32))  # this bundle's own, for the next
    return Adapted(head, confidence, _with_site_centres(novelty, site), kept, figures, not reasons, tuple(reasons))


def _indices(labels: np.ndarray, classes) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[c] for c in labels], int)


def _figures(base_meta, head, reference, classes, oof, y_site, confidence, site) -> dict:
    site_m = compute_metrics(softmax(oof, confidence.temperature), y_site, classes)
    held = held_out(reference)
    base_classes = np.array(base_meta["classes"])
    original = {}
    for lab in sorted(set(held.labs)):
        of = held.where(held.labs == lab)
        after = np.array(classes)[head.logits(of.features).argmax(1)]
        original[lab] = {"cells": len(of), "before": name_scores(of.labels, base_classes[of.logits.argmax(1)]),
                         "after": name_scores(of.labels, after)}
    measured = ~np.isnan(held.float_features).any(axis=1) if held.float_features is not None else np.zeros(len(held), bool)
    agreement = float(np.mean(head.logits(held.features[measured]).argmax(1)
                              == head.logits(held.float_features[measured]).argmax(1))) if measured.any() else None
    return {"classes": list(classes), "site_cells": site.counts(), "site_cv": site_m.to_dict(),
            "original_held_out_by_lab": original, "int8_float_agreement": agreement,
            "int8_float_agreement_cells": int(measured.sum())}


def held_out(reference: ReferenceCells) -> ReferenceCells:
    """The training labs' validation and test cells (no head is fitted on them), with the base's logits.
    A lab with no training cells (the lab a leave-one-lab-out bundle was tested on) is none of them."""
    trained = np.isin(reference.labs, sorted(set(reference.split("train").labs)))
    held = reference.where(np.isin(reference.splits, ("val", "test")) & trained)
    if held.logits is None or np.isnan(held.logits).any():
        raise ModelInvalid("the reference cells lack the base model's logits of the held-out cells; "
                         "export the base bundle again with this version")
    return held


def name_scores(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Accuracy, and macro-F1 over the true classes present, of predicted class names."""
    from sklearn.metrics import f1_score

    present = sorted(set(truth))
    return {"accuracy": float(np.mean(truth == predicted)) if len(truth) else None,
            "macro_f1": float(f1_score(truth, predicted, labels=present, average="macro", zero_division=0))
            if len(truth) else None}


def _judge(figures: dict, gate: AdaptGate) -> list[str]:
    reasons = []
    site = figures["site_cv"]
    if site["macro_f1"] < gate.min_site_macro_f1:
        reasons.append(f"site cells (cross-validated) macro-F1 {site['macro_f1']:.3f} < {gate.min_site_macro_f1}")
    for c, row in site["per_class"].items():
        if row["support"] and row["recall"] < gate.min_site_recall:
            reasons.append(f"site {c} recall {row['recall']:.3f} < {gate.min_site_recall}")
    for lab, row in figures["original_held_out_by_lab"].items():
        for key in ("accuracy", "macro_f1"):
            before, after = row["before"][key], row["after"][key]
            if before is not None and (before - after) * 100 > gate.max_original_drop_pt:
                reasons.append(f"{lab} held-out {key} {before:.3f} -> {after:.3f}: more than "
                               f"{gate.max_original_drop_pt} point lost")
    agreement = figures["int8_float_agreement"]
    if agreement is not None and agreement < gate.min_agreement:
        reasons.append(f"int8/float top-1 agreement {agreement:.3f} < {gate.min_agreement}")
    return reasons


def _with_site_centres(novelty: NoveltyModel, site: SiteFeatures) -> NoveltyModel:
    """The base's centres and one per class of the site's cells (all views): a site's cells are familiar."""
    z = novelty.whiten(site.features.reshape(-1, site.features.shape[-1]))
    labels = np.repeat(site.labels, site.features.shape[1])
    centres = [z[labels == c].mean(0) for c in sorted(set(site.labels))]
    return NoveltyModel(novelty.projection, novelty.offset, np.vstack([novelty.centres, *centres]), novelty.threshold)


def _with_site_cells(reference: ReferenceCells, site: SiteFeatures, site_name: str) -> ReferenceCells:
    """The base's reference cells and the site's (as cut), kept for the next adaptation."""
    n = len(site)
    own = ReferenceCells(site.features[:, 0], site.labels, np.full(n, site_name), np.full(n, "train"))
    return ReferenceCells.concat([reference, own])
