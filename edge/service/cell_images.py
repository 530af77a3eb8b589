"""The daemon's cell images: each counted cell's cut written with its frame, kept as a verified cell once its report
is signed, and all of them held within their size limit (edge/reports/verified_cells.py has the layout)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hematovision.errors import DataError, HematovisionError, LinkFailed

from ..config import Config
from ..reports.report import Report
from ..reports.verified_cells import (PENDING, VERIFIED, CellCut, folder_bytes, keep_verified, prune_oldest,
                                      write_cut)
from ..vision.field_cut import FieldCut
from .state import VERIFIED_REPORT, Specimen, Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrittenCut:
    """A cut as written for one cell: its file (relative to the pending folder) and its corner in the field."""

    file: str
    origin: tuple[int, int]


@dataclass(frozen=True)
class CellImages:
    """Where the cell images of a state folder go (ROOT/cell_cuts/<specimen row>/<frame>-<n>.png until signed,
    then ROOT/verified_cells/<specimen>/), and how many bytes they may take."""

    root: Path
    max_bytes: int

    @classmethod
    def of(cls, config: Config) -> CellImages | None:
        """The configuration's (state.cell_images, state.cell_images_mb), None when cells are not kept."""
        if not config.state.cell_images:
            return None
        return cls(config.state_dir(), int(config.state.cell_images_mb * 2**20))

    def write(self, specimen: Specimen, frame: int, cuts: Sequence[FieldCut]) -> list[WrittenCut | None]:
        """The cuts of a frame's new cells, each written atomically before the frame is committed (a cut whose frame
        never commits is written again with it, or deleted with its specimen's folder). A cut that cannot be written
        is logged and left out (None): counting goes on."""
        folder = self.root / PENDING / str(specimen.row)
        written: list[WrittenCut | None] = []
        for seq, cut in enumerate(cuts):
            name = f"{frame}-{seq}.png"
            try:
                write_cut(folder, name, cut)
                written.append(WrittenCut(f"{specimen.row}/{name}", cut.origin))
            except LinkFailed as err:
                logger.warning("cell image of frame %d not kept: %s", frame, err)
                written.append(None)
        return written

    def collect(self, store: Store) -> int:
        """Keep the cells of every signed specimen whose cuts still wait, then delete those cuts; returns how many
        specimens were kept. A specimen that cannot be kept now is logged and tried again at the next call."""
        kept = 0
        for specimen in store.verified_specimens():
            pending = self.root / PENDING / str(specimen.row)
            if not pending.is_dir():
                continue
            try:
                self.keep(store, specimen)
            except (HematovisionError, OSError) as err:
                logger.error("verified cells of specimen %s not kept yet: %s", specimen.specimen_id, err)
                continue
            shutil.rmtree(pending, ignore_errors=True)
            kept += 1
        return kept

    def keep(self, store: Store, specimen: Specimen) -> Path | None:
        """Keep one signed specimen's cells (verified_cells.keep_verified). Raises DataError, OSError."""
        data = store.report(specimen.specimen_id, VERIFIED_REPORT)
        if data is None:
            raise DataError(f"specimen {specimen.specimen_id} has no signed report kept")
        return keep_verified(self.root, Report.from_dict(data), self.cuts(store, specimen))

    def cuts(self, store: Store, specimen: Specimen) -> dict[int, CellCut]:
        """The cuts of a specimen's cells by the report's cell number (counting order)."""
        out = {}
        for number, (_, cell) in enumerate(store.cells(specimen), start=1):
            if cell.cut and (self.root / PENDING / cell.cut).is_file():
                out[number] = CellCut(number, self.root / PENDING / cell.cut, cell.field, cell.x_px, cell.y_px,
                                      cell.cut_origin, cell.um_per_pixel)
        return out

    def prune(self, store: Store) -> None:
        """Delete the cuts of specimens whose cells were pruned, then, while the images take more than max_bytes,
        the oldest: those of specimens never signed first, then verified cells."""
        open_specimen = store.open_specimen()
        counting = str(open_specimen.row) if open_specimen else None
        counted = {str(row) for row in store.rows_with_cells()}
        waiting = []
        for folder in _folders(self.root / PENDING):
            if folder.name == counting:
                continue
            if folder.name not in counted:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                waiting.append(folder)
        verified = _folders(self.root / VERIFIED)
        over = sum(map(folder_bytes, [*_folders(self.root / PENDING), *verified])) - self.max_bytes
        if over > 0:
            over -= prune_oldest(waiting, over)
        if over > 0:
            prune_oldest(verified, over)


def _folders(base: Path) -> list[Path]:
    return [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")] if base.is_dir() else []
