"""Report delivery off the frame loop: a thread with its own database connection empties the outbox."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hematovision.errors import DataError, HematovisionError, LinkFailed, SendCancelled

from .cell_images import CellImages
from .state import OutboxEntry, PruneSettings, Store

logger = logging.getLogger(__name__)

CLOSE_WAIT_S = 5.0  # a send still running after this at shutdown is abandoned (retried after the restart)


@dataclass(frozen=True)
class DeliverySettings:
    """Where reports go besides the link, how soon a failed one is tried again, what is kept."""

    report_dir: Path | None = None
    retry_s: float = 60.0
    prune: PruneSettings = PruneSettings()
    cell_images: CellImages | None = None  # verified cells kept, cell images pruned, at each pass


class Outbox:
    """Writes report files and sends reports over the link in its own thread, so that a slow,
    silent or hung receiver never holds up counting. The frame loop only calls `wake`.

    Each pass takes every undelivered report in order and stops at the first that fails; the
    next pass comes after `retry_s`, or at once when woken (a new report). Delivery state lives
    in the outbox table, so a restart resumes it. `stop` (the daemon's SIGTERM event) ends a send
    in progress: the link was made with the same event.
    """

    def __init__(self, state_path: Path, link, settings: DeliverySettings, stop: threading.Event):
        self.state_path, self.link, self.settings, self.stop = Path(state_path), link, settings, stop
        self._wake, self._closing = threading.Event(), False
        self._cond = threading.Condition()
        self._requested, self._started, self._done = 1, 0, 0  # the first pass takes what earlier runs left
        self._retry_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="report-outbox", daemon=True)

    def __enter__(self) -> Outbox:
        self._wake.set()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wake(self) -> None:
        """A report was added: deliver it now (the pass after any in progress)."""
        with self._cond:
            self._requested = self._started + 1
        self._wake.set()

    def flush(self) -> None:
        """Wait until every report woken for has had its attempt, or the daemon is stopping."""
        with self._cond:
            while not self._cond.wait_for(self._flushed, timeout=1.0):
                pass

    def _flushed(self) -> bool:
        return self._done >= self._requested or self.stop.is_set() or not self._thread.is_alive()

    def close(self) -> None:
        """End the thread after its current step; a send still running after CLOSE_WAIT_S is left."""
        self._closing = True
        self._wake.set()
        self._thread.join(CLOSE_WAIT_S)
        if self._thread.is_alive():
            logger.warning("a report send was still running at shutdown; the report stays in the outbox")

    # --- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with Store(self.state_path) as store:
                if self.settings.report_dir is not None:
                    from ..reports.files import remove_temporaries  # noqa: PLC0415

                    remove_temporaries(self.settings.report_dir)
                while self._next_pass():
                    self._pass(store)
        except HematovisionError as err:
            logger.error("report delivery stopped: %s; reports wait in the outbox until the restart", err)
        finally:
            with self._cond:
                self._done = self._requested = float("inf")
                self._cond.notify_all()

    def _next_pass(self) -> bool:
        """Wait for a wake-up or the retry time; False when the daemon is stopping."""
        if not (self._closing or self.stop.is_set()):
            self._wake.wait(None if self._retry_at is None else max(self._retry_at - time.monotonic(), 0.0))
            self._wake.clear()
        return not (self._closing or self.stop.is_set())

    def _pass(self, store: Store) -> None:
        with self._cond:
            self._started += 1
        try:
            self._cell_images(store, "collect")  # a signed report's cells are kept, whatever its delivery
            if self._deliver_all(store):
                store.prune(self.settings.prune, self.settings.report_dir is not None, self.link is not None)
            self._cell_images(store, "prune")
        except HematovisionError as err:  # the state database: logged, tried again at the next pass
            logger.error("report outbox: %s", err)
            self._retry_at = time.monotonic() + self.settings.retry_s
        with self._cond:
            self._done += 1
            self._cond.notify_all()

    def _cell_images(self, store: Store, step: str) -> None:
        """Keep signed cells ("collect") or bound the images ("prune"); a failure is logged, tried at the next pass."""
        if self.settings.cell_images is None:
            return
        try:
            getattr(self.settings.cell_images, step)(store)
        except OSError as err:
            logger.error("cell images (%s): %s; tried again at the next pass", step, err)

    def _deliver_all(self, store: Store) -> bool:
        """One attempt at each undelivered report in order; False at the first that fails."""
        for entry in store.pending_reports(self.settings.report_dir is not None, self.link is not None):
            try:
                self._deliver(store, entry)
            except SendCancelled:
                logger.info("report %s: send stopped for shutdown; it stays in the outbox", entry.specimen_id)
                return False
            except (LinkFailed, DataError) as err:
                logger.warning("report %s not delivered yet (next try in %g s): %s", entry.specimen_id,
                               self.settings.retry_s, err)
                store.mark_report(entry, error=str(err))
                self._retry_at = time.monotonic() + self.settings.retry_s
                return False
        self._retry_at = None
        return True

    def _deliver(self, store: Store, entry: OutboxEntry) -> None:
        from ..reports.report import Report  # noqa: PLC0415

        report = Report.from_dict(entry.report)
        if self.settings.report_dir is not None and not entry.files_written:
            from ..reports.files import write_report_files  # noqa: PLC0415

            write_report_files(report, self.settings.report_dir)
            store.mark_report(entry, files=True)
        if self.link is not None and not entry.link_sent:
            result = self.link.send(report)
            logger.info("report %s sent over %s", entry.specimen_id, result.link)
            store.mark_report(entry, link=True)
