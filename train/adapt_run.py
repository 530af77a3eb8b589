"""`hematovision-train adapt`: a base bundle and a site's verified cells in, an adapted bundle out.

RUN/adapt.json holds the figures and the gate's verdict either way; RUN/bundle/ is written only when
the gate passes. No TensorFlow here."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hematovision.edge.vision.model_bundle import MODEL_FILE, Bundle, load_bundle, read_hashed
from hematovision.errors import DataError, HematovisionError, ModelInvalid
from hematovision.head import HEAD_FILE
from hematovision.novelty import ARRAYS_FILE
from hematovision.reference_cells import CELLS_FILE, ReferenceCells

from .adapt import AdaptGate, Adapted, AdaptSettings, adapt
from .site_cells import SiteFeatures, cells_digest, read_verified, site_features

logger = logging.getLogger(__name__)
FIGURES_FILE = "adapt.json"
MIN_CELLS_PER_CLASS = 5  # fewer cannot be cross-validated in five folds
BUNDLE_DIR = "bundle"


class AdaptRefused(HematovisionError):
    """The adapted head did not pass the gate; no bundle was written."""


def reference_of(bundle: Bundle) -> ReferenceCells:
    """The base bundle's reference cells, hash-checked. Raises ModelInvalid naming the fix."""
    entry = bundle.meta.get("reference_cells")
    if not isinstance(entry, dict) or entry.get("file") != CELLS_FILE:
        raise ModelInvalid(f"{bundle.path}: has no {CELLS_FILE} (exported before site adaptation existed); "
                           "export it again with this version (make reference)")
    data = read_hashed(bundle.path / CELLS_FILE, str(entry.get("sha256")))
    return ReferenceCells.from_bytes(data, bundle.model.n_features, str(bundle.path / CELLS_FILE))


def read_site(bundle: Bundle, folders: list[Path], views: int,
              min_cells: int = MIN_CELLS_PER_CLASS) -> tuple[SiteFeatures, str, list[tuple[str, str]]]:
    """Every folder's cells through the bundle's model; their digest; the files left out (labelled
    unidentified or not a white cell) and why.

    Raises DataError, before anything is written, naming every image that cannot be read or shows no
    white cell at its centre, and every class with fewer than `min_cells` cells."""
    cells, left = [], []
    for folder in folders:
        found, skipped = read_verified(folder)
        cells.extend(found)
        left.extend(skipped)
    site = site_features(bundle, cells, views)
    where = ", ".join(map(str, folders))
    if site.skipped:
        named = "; ".join(f"{path}: {why}" for path, why in site.skipped[:10])
        more = f" (and {len(site.skipped) - 10} more)" if len(site.skipped) > 10 else ""
        raise DataError(f"{where}: {len(site.skipped)} image(s) cannot be used: {named}{more}. "
                        "Remove or replace them, then run adapt again")
    counts = site.counts()
    few = {c: n for c, n in counts.items() if n < min_cells}
    if not counts or few:
        listed = ", ".join(f"{c} {n}" for c, n in few.items()) or "no cells"
        raise DataError(f"{where}: fewer than {min_cells} verified cells per class ({listed}); verify more cells "
                        "of those classes, or leave their folders out")
    return site, cells_digest(cells), left


def run_adapt(base: Path, folders: list[Path], out: Path, site_name: str, settings: AdaptSettings = AdaptSettings(),
              gate: AdaptGate = AdaptGate(), threads: int | None = None, min_cells: int = MIN_CELLS_PER_CLASS) -> dict:
    """Adapt, write RUN/adapt.json, and RUN/bundle when the gate passes (raises AdaptRefused otherwise)."""
    bundle = load_bundle(base, threads)
    reference = reference_of(bundle)
    site, digest, left = read_site(bundle, folders, settings.views, min_cells)
    logger.info("%d site cells (%s); %d left out", len(site), site.counts(), len(left))
    adapted = adapt(bundle.meta, bundle.novelty, reference, site, site_name, settings, gate)
    record = {"base": {"name": bundle.meta.get("name"), "meta_sha256": bundle.meta.get("meta_sha256")},
              "site": site_name, "site_cells_sha256": digest, "folders": [str(f) for f in folders],
              "left_out": [{"path": p, "why": w} for p, w in left], "settings": asdict(settings),
              "gate": {**asdict(gate), "passed": adapted.passed, "reasons": list(adapted.reasons)},
              "figures": adapted.figures}
    out.mkdir(parents=True, exist_ok=True)
    (out / FIGURES_FILE).write_text(json.dumps(record, indent=2))
    if not adapted.passed:
        raise AdaptRefused("adapted head refused, no bundle written: " + "; ".join(adapted.reasons)
                           + f" (figures in {out / FIGURES_FILE})")
    from hematovision.export.files import write_bundle

    meta = adapted_meta(bundle.meta, adapted, record)
    files = {ARRAYS_FILE: adapted.novelty.arrays_bytes(), CELLS_FILE: adapted.reference.to_bytes(),
             HEAD_FILE: adapted.head.to_bytes()}
    return write_bundle(out / BUNDLE_DIR, (bundle.path / MODEL_FILE).read_bytes(), meta, files)


def adapted_meta(base: dict, adapted: Adapted, record: dict) -> dict:
    """The base's bundle.json with the head, its classes, confidence, novelty centres, figures and lineage."""
    meta = {k: v for k, v in base.items() if k != "meta_sha256"}
    head = adapted.head.to_bytes()
    cells = adapted.reference.to_bytes()
    meta.update({
        "name": f"{base.get('name', 'bundle')}+{record['site']}"[:200],
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": list(adapted.head.classes),
        "confidence": {**adapted.confidence.to_dict(), "fitted_on": "training labs' validation cells and the "
                       "site's cells out of fold"},
        "novelty": {**base["novelty"], "sha256": hashlib.sha256(adapted.novelty.arrays_bytes()).hexdigest(),
                    "centres": int(len(adapted.novelty.centres))},
        "head": {**adapted.head.to_dict(), "sha256": hashlib.sha256(head).hexdigest()},
        "metrics": {"split": "the original labs' held-out reference cells (validation and test)",
                    "by_lab": {lab: {"int8": row["after"]}
                               for lab, row in adapted.figures["original_held_out_by_lab"].items()},
                    "site_cross_validated": adapted.figures["site_cv"], "base": base.get("metrics")},
        "reference_cells": {**base["reference_cells"], "sha256": hashlib.sha256(cells).hexdigest(),
                            "cells": adapted.reference.counts()},
        "adaptation": {"base_name": base.get("name"), "base_meta_sha256": base.get("meta_sha256"),
                       "base_created_at": base.get("created_at"), "site": record["site"],
                       "site_cells": adapted.figures["site_cells"], "site_cells_sha256": record["site_cells_sha256"],
                       "settings": record["settings"], "gate": record["gate"], "figures": adapted.figures},
    })
    return meta


def default_site_name(folders: list[Path]) -> str:
    return "site-" + "-".join(f.resolve().name for f in folders)[:40]


def summary_lines(record_or_meta: dict) -> list[str]:
    """What the command prints: the site's figures and each original lab's, before and after."""
    figures = record_or_meta.get("adaptation", record_or_meta)["figures"]
    site = figures["site_cv"]
    lines = [f"site cells {figures['site_cells']}: cross-validated accuracy {site['accuracy']:.3f}, "
             f"macro-F1 {site['macro_f1']:.3f}"]
    for lab, row in figures["original_held_out_by_lab"].items():
        b, a = row["before"], row["after"]
        lines.append(f"{lab} held-out ({row['cells']} cells): accuracy {_f(b['accuracy'])} -> {a['accuracy']:.3f}, "
                     f"macro-F1 {_f(b['macro_f1'])} -> {a['macro_f1']:.3f}")
    agreement = figures["int8_float_agreement"]
    lines.append(f"int8/float agreement of the head: {_f(agreement)} on {figures['int8_float_agreement_cells']} cells")
    return lines


def _f(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"
