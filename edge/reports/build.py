"""From a finished count to its report: tally, provenance, frames, flags and thumbnails."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from datetime import datetime

from hematovision.calibration.profile import CalibrationProfile, profile_to_dict

from ..vision.model_bundle import Bundle
from .report import PRELIMINARY, CellRecord, FrameStats, ModelInfo, Report, build_classes, build_nrbc


def profile_id(profile: CalibrationProfile | None) -> str | None:
    """A short content hash that names a calibration profile."""
    if profile is None:
        return None
    text = json.dumps(profile_to_dict(profile), sort_keys=True).encode()
    return "cal-" + hashlib.sha256(text).hexdigest()[:12]


def cell_record(index: int, cell, slide_xy_um) -> CellRecord:
    uri = "data:image/jpeg;base64," + base64.b64encode(cell.thumbnail_jpeg).decode()
    return CellRecord(index, cell.prediction.label, round(cell.prediction.confidence, 4), uri,
                      (round(slide_xy_um[0], 1), round(slide_xy_um[1], 1)), cell.field or None)


def model_info(bundle: Bundle) -> ModelInfo:
    """The report's name for a bundle: name, version, model hash, and the bundle's stamp and export time."""
    meta = bundle.meta
    created = meta.get("created_at")
    return ModelInfo(meta.get("name", "model"), meta.get("project_version", "?"), meta["model_sha256"],
                     meta.get("meta_sha256"), created if isinstance(created, str) and created else None)


def report_from_run(run, bundle: Bundle, profile, specimen_id: str) -> Report:
    """The specimen report of a `count` run (preliminary until a person verifies it): the
    differential, with nucleated red cells and rejected detections beside it where the model
    has those classes, the white count when the operator entered one, and the run's flags (judged with
    its own limits)."""
    tally = run.counter.tally()
    frames = FrameStats(run.fields, run.skipped_blur, run.skipped_motion)
    cells = tuple(cell_record(i + 1, c, xy) for i, (c, xy) in enumerate(zip(run.cells, run.slide_xy_um)))
    return Report(
        specimen_id=specimen_id, device_id=socket.gethostname(), started_at=run.started_at,
        finished_at=datetime.now().astimezone().isoformat(timespec="seconds"),
        model=model_info(bundle),
        calibration_profile_id=profile_id(profile),
        classes=build_classes({c.name: c.count for c in tally.classes}),
        nrbc=None if tally.nrbc is None else build_nrbc(tally.nrbc.count, tally.identified),
        rejected=tally.rejected,
        unidentified=tally.unidentified, total=tally.total, target=tally.target,
        target_reached=tally.target_reached, frames=frames,
        flags=run.flags(), verification=PRELIMINARY, cells=cells, wbc_10e9_per_l=run.wbc_10e9_per_l)
