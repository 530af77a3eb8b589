"""The headless service: frames through the pipeline into a specimen, every frame committed whole."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from hematovision.classes import REJECT, ROLES, UNIDENTIFIED, differential_classes
from hematovision.errors import (CameraUnavailable, ConfigError, DataError, HematovisionError, ImageUnreadable,
                                 ModelInvalid)

from ..capture.sources import Frame, FrameSource, open_source, source_key
from ..config import DEFAULT_CONFIG, Config, ReportConfig, check_timings, load_config
from ..counting.checks import TARGET_NOT_REACHED, ColourSums, Evidence, TrainingRange, specimen_flags, worst
from ..counting.select import make_selector
from ..counting.tally import NRBC_CLASS, make_tally
from ..counting.track import DEFAULT_TRACK
from ..vision.pipeline import CellResult, CellSelector, FieldPipeline, FieldResult
from ..vision.segment import Detection
from ..web.live import LiveBox, LiveFrame, LiveSlot
from .cell_images import CellImages, WrittenCut
from .notify import Notifier, watchdog_interval_s
from .outbox import DeliverySettings, Outbox
from .preflight import check_devices
from .state import BundleRef, FrameRecord, NewCell, PruneSettings, Specimen, StateError, Store, StorageFull

logger = logging.getLogger(__name__)

EX_CONFIG = 78  # sysexits.h: the unit's RestartPreventExitStatus, a configuration error is not retried
STATE_FILE = "state.db"
# The open specimen's worst flag in the status line is judged again at most this often: the tally's
# exact intervals cost tens of milliseconds, more than a frame's segmentation.
FLAG_STATUS_EVERY_S = 5.0


# --- the service -----------------------------------------------------------------------

class Backoff:
    """Waits that double from `initial` up to `maximum`."""

    def __init__(self, initial: float, maximum: float):
        self.initial, self.maximum, self.current = initial, maximum, initial

    def next(self) -> float:
        wait, self.current = self.current, min(self.current * 2, self.maximum)
        return wait

    def reset(self) -> None:
        self.current = self.initial


class Daemon:
    """The frame loop and the specimen workflow over one store, one pipeline and one source.

    Only this loop feeds the watchdog, once per frame (and while it waits on purpose to reopen
    a camera): if frames stop, WATCHDOG=1 stops. Reports are delivered by the Outbox thread.
    """

    def __init__(self, config: Config, pipeline: FieldPipeline, store: Store, notifier: Notifier,
                 stop: threading.Event, link=None, live: LiveSlot | None = None):
        self.config, self.pipeline, self.store, self.notifier, self.stop = config, pipeline, store, notifier, stop
        self.link, self.live = link, live
        self.key, self.replay = source_key(config), config.source.kind == "replay"
        self.bundle_listeners: list = []  # called with the class list when another bundle is taken
        self.use_pipeline(pipeline)
        self.backoff = Backoff(config.source.retry_initial_s, config.source.retry_max_s)
        self.specimen: Specimen | None = None
        self.selector: CellSelector | None = None
        self.counts: dict[str, int] = {}
        self.last_finished: str | None = None  # the status line of the specimen finished last
        self.flag_status: tuple[float, str] | None = None  # (when, text) of the open specimen's worst flag
        self.announced = self.refused_id = False
        self.fresh_pipeline = pipeline_state(pipeline)
        self.outbox: Outbox | None = None
        self.cell_images = CellImages.of(config)

    def run(self) -> int:
        """Count until stopped (0) or, for a replay without loop, until the recording ends (0);
        at the end of a replay every report waiting has had its attempt at delivery."""
        with Outbox(self.store.path, self.link, delivery_settings(self.config), self.stop) as self.outbox:
            self.load()
            self.finish_if_due()
            while not self.stop.is_set():
                try:
                    if self.session():
                        break
                except CameraUnavailable as err:
                    self.pause(f"camera unavailable, retrying: {err}", self.backoff.next())
                except StorageFull as err:
                    self.pause(f"STOPPED: disk full: {err}", self.config.source.retry_max_s)
            self.outbox.flush()
        self.notifier.stopping(f"stopped; {self.status_text()}")
        logger.info("stopped cleanly: %s", self.status_text())
        return 0

    def session(self) -> bool:
        """One opening of the source; True when a recording has ended."""
        self.load()
        with open_source(self.config, self.store.position(self.key), self.pipeline.profile) as source:
            self.backoff.reset()
            self.announce_ready()
            ended = self.count_frames(source)
        if ended:
            self.end_of_recording()
        return ended

    def load(self) -> None:
        """Specimen, counts, tracker and pipeline state as last committed; an open specimen goes on with the bundle
        it started with. Raises ModelInvalid when that bundle cannot be loaded any more."""
        self.specimen = self.store.open_specimen()
        if self.specimen is not None:
            self.use_specimen_bundle(self.specimen)
        state = self.specimen.tracker_state if self.specimen else None
        keyframes = self.store.keyframes(self.specimen, DEFAULT_TRACK.max_keyframes) if state else None
        self.selector = make_selector(self.config.counting.mode, state, keyframes) if self.specimen else None
        self.counts = self.store.label_counts(self.specimen) if self.specimen else {}
        self.flag_status = None
        last = self.store.last_finished()
        self.last_finished = finished_text(*last) if last else None
        restore_pipeline_state(self.pipeline, {**self.fresh_pipeline, **(self.store.pipeline_state() or {})})

    def announce_ready(self) -> None:
        if not self.announced:
            self.announced = True
            self.notifier.ready(self.status_text())
            logger.info("ready: model %s, source %s", Path(self.pipeline.bundle.path).resolve().name, self.key)

    def pause(self, status: str, seconds: float) -> None:
        logger.warning("%s (next try in %.3g s)", status, seconds)
        self.notifier.status(status)
        self.notifier.wait(self.stop, seconds)

    def count_frames(self, source: FrameSource) -> bool:
        """Frames until stopped (False) or the recording ends (True)."""
        while not self.stop.is_set():
            self.run_commands()
            try:
                frame = source.next_frame(self.stop)
            except ImageUnreadable as err:
                logger.warning("skipped unreadable frame: %s", err)
                self.record_unusable(source.position - 1)
                continue
            if frame is None:
                return not self.stop.is_set()
            self.count_frame(frame)
            self.notifier.watchdog()
            self.notifier.status(self.status_text())
        return False

    def count_frame(self, frame: Frame) -> None:
        """One frame: its new cells, tracker and pipeline state and the source position, in one commit."""
        specimen = self.specimen or self.auto_start()
        if specimen is None:
            if self.replay:
                self.store.skip_frame(self.key, frame.index)
            self.show(frame, None, "no specimen")
            return
        record, result = self.frame_record(specimen, frame)
        self.store.record_frame(record)
        for cell in record.cells:
            self.counts[cell.label] = self.counts.get(cell.label, 0) + 1
        logger.debug("frame %d: %s, %d new cell(s)", frame.index, record.kind, len(record.cells))
        self.show(frame, result, record.kind)
        self.finish_if_due()

    def frame_record(self, specimen: Specimen, frame: Frame) -> tuple[FrameRecord, FieldResult | None]:
        try:
            result = self.pipeline.process(frame.image, frame.name, self.selector)
        except DataError as err:
            logger.warning("frame %d unusable: %s", frame.index, err)
            return self.unusable(specimen, frame.index), None
        cuts = self.write_cuts(specimen, frame.index, result)
        cells = tuple(new_cell(r, xy, result.um_per_pixel, cut) for r, xy, cut in zip(result.cells, result.slide_xy_um,
                                                                                     cuts))
        um = result.um_per_pixel if result.kind == "used" and result.um_per_pixel > 0 else None
        return FrameRecord(specimen, self.key, frame.index, result.kind, cells, result.edge_cells,
                           self.selector.to_dict(), pipeline_state(self.pipeline), self.selector.new_keyframes(),
                           result.colour, um), result

    def write_cuts(self, specimen: Specimen, index: int, result: FieldResult) -> list:
        """Each new cell's cut (state.cell_images), written before its frame commits; None for each where none is
        kept. Raises StorageFull below the free-space limit (nothing written)."""
        if self.cell_images is None or not result.cells:
            return [None] * len(result.cells)
        self.store.check_space()
        try:
            cuts = self.pipeline.field_cuts(result)
        except DataError as err:
            logger.warning("frame %d: cells not cut out of the field: %s", index, err)
            return [None] * len(result.cells)
        return self.cell_images.write(specimen, index, cuts)

    def show(self, frame: Frame, result: FieldResult | None, kind: str) -> None:
        """Hand the frame to the live view: one reference replaced, nothing drawn or copied here."""
        if self.live is not None:
            self.live.publish(live_frame(frame, result, kind, self.pipeline.pixel_size_um))

    def unusable(self, specimen: Specimen, index: int) -> FrameRecord:
        return FrameRecord(specimen, self.key, index, "unusable", (), 0, self.selector.to_dict(),
                           pipeline_state(self.pipeline), self.selector.new_keyframes())

    def record_unusable(self, index: int) -> None:
        if self.specimen is not None:
            self.store.record_frame(self.unusable(self.specimen, index))
        elif self.replay:
            self.store.skip_frame(self.key, index)

    # --- the specimen workflow ---------------------------------------------------------

    @property
    def identified(self) -> int:
        """White cells of the differential counted so far (NRBC, rejected and unidentified apart)."""
        return sum(self.counts.get(c, 0) for c in self.wbc_classes)

    def status_text(self) -> str:
        """The counts of the open specimen, then its worst flag's message; with none open, the last one's."""
        if self.specimen is None:
            return "no specimen open" + (f"; last: {self.last_finished}" if self.last_finished else "")
        text = (f"specimen {self.specimen.specimen_id}: {self.identified}/{self.specimen.target} cells, "
                f"{self.counts.get(UNIDENTIFIED, 0)} unidentified")
        if NRBC_CLASS in self.classes:
            text += f", {self.counts.get(NRBC_CLASS, 0)} NRBC"
        if self.reject_classes:
            text += f", {sum(self.counts.get(c, 0) for c in self.reject_classes)} rejected"
        return text + self.worst_flag_text()

    def worst_flag_text(self) -> str:
        """The open specimen's worst flag as "; message", or nothing (its target is judged at the end only);
        judged again every FLAG_STATUS_EVERY_S."""
        now = time.monotonic()
        if self.flag_status is None or now - self.flag_status[0] >= FLAG_STATUS_EVERY_S:
            flag = worst(f for f in self.flags() if f.code != TARGET_NOT_REACHED)
            self.flag_status = (now, f"; {flag.message}" if flag else "")
        return self.flag_status[1]

    def flags(self):
        """The open specimen's flags as its stored evidence stands."""
        specimen = self.store.specimen(self.specimen.specimen_id)
        return specimen_flags(specimen_evidence(self.store, specimen, self.classes), self.training,
                              self.config.checks)

    def auto_start(self) -> Specimen | None:
        if not self.config.specimen.auto_start:
            return None
        wanted = self.config.specimen.id
        if wanted and self.store.specimen(wanted) is not None:
            if not self.refused_id:
                self.refused_id = True
                logger.warning("specimen %s was counted already; start the next one by command "
                               "(hematovision-edge specimen start ID)", wanted)
            return None
        return self.start(wanted or self.automatic_id(), self.config.specimen.target)

    def automatic_id(self) -> str:
        base = f"{socket.gethostname()}-{datetime.now():%Y%m%d-%H%M%S}"
        used, n, name = set(self.store.specimen_ids()), 1, base
        while name in used:
            n += 1
            name = f"{base}-{n}"
        return name

    def start(self, specimen_id: str, target: int, wbc_10e9_per_l: float | None = None,
              accession: str | None = None, operator: str | None = None) -> Specimen:
        """A new specimen, counted with the installed bundle (taken now when it changed since the last specimen).
        Raises StateError when a specimen is open or the id was used."""
        self.use_installed_bundle()
        self.specimen = self.store.start_specimen(specimen_id, target, wbc_10e9_per_l, accession, operator,
                                                  BundleRef.of(self.pipeline.bundle))
        self.selector = make_selector(self.config.counting.mode, None)
        self.counts, self.flag_status = {}, None
        return self.specimen

    # --- the bundle: switched between specimens only ----------------------------------------

    def use_pipeline(self, pipeline: FieldPipeline) -> None:
        """Count with `pipeline` (its bundle's classes, training range) from now on."""
        self.pipeline = pipeline
        self.classes = pipeline.bundle.classes
        self.wbc_classes = differential_classes(self.classes)  # what the target counts
        self.reject_classes = tuple(c for c in self.classes if ROLES.get(c) == REJECT)
        self.training = TrainingRange.of(pipeline.bundle)
        for listener in self.bundle_listeners:
            listener(self.classes)

    def use_bundle(self, bundle) -> None:
        """The same pipeline (profile, running pixel-size estimate) with another bundle. Raises CalibrationError or
        ConfigError when the profile does not suit the bundle."""
        pipeline = FieldPipeline(bundle, self.pipeline.profile, self.pipeline.params)
        pipeline.restore(self.pipeline.state())
        self.use_pipeline(pipeline)
        logger.info("counting with bundle %s (%s, %s)", bundle.meta.get("name"),
                    str(bundle.meta.get("meta_sha256"))[:12], Path(bundle.path).resolve())

    def use_installed_bundle(self) -> None:
        """Between specimens: the configured bundle (an install or rollback switches it) loaded when it is another
        folder than the one counting; one that fails to load is logged, and counting goes on with the one it has."""
        wanted = self.config.bundle_path().resolve()
        if wanted == Path(self.pipeline.bundle.path).resolve():
            return
        from ..vision.model_bundle import load_bundle  # noqa: PLC0415

        try:
            self.use_bundle(load_bundle(wanted, self.config.model.threads or None))
        except HematovisionError as err:
            logger.error("the installed bundle %s is not taken, counting goes on with %s: %s", wanted,
                         Path(self.pipeline.bundle.path).resolve(), err)

    def use_specimen_bundle(self, specimen: Specimen) -> None:
        """The bundle an open specimen started with (after a restart, an install may have switched the installed one).
        Raises ModelInvalid when it cannot be loaded or is not the one recorded."""
        ref = specimen.bundle
        if ref is None or ref.meta_sha256 == self.pipeline.bundle.meta.get("meta_sha256"):
            return
        from ..vision.model_bundle import load_bundle  # noqa: PLC0415

        try:
            bundle = load_bundle(ref.path, self.config.model.threads or None)
            if bundle.meta.get("meta_sha256") != ref.meta_sha256:
                raise ModelInvalid(f"{ref.path} holds bundle {str(bundle.meta.get('meta_sha256'))[:12]} now")
            self.use_bundle(bundle)
        except HematovisionError as err:
            raise ModelInvalid(f"specimen {specimen.specimen_id} is being counted with bundle {ref.name} "
                               f"({ref.meta_sha256[:12]}) from {ref.path}, which cannot be loaded ({err}); install "
                               "that bundle again (hematovision-edge model install BUNDLE) and restart, so that the "
                               "specimen finishes on it") from err

    def finish_if_due(self) -> None:
        if self.specimen is not None and self.identified >= self.specimen.target:
            self.finish("target reached")

    def end_of_recording(self) -> None:
        logger.info("replay of %s ended", self.key)
        if self.specimen is not None:
            self.finish("end of replay")

    def finish(self, reason: str) -> None:
        """Close the open specimen; its report goes into the outbox in the same commit."""
        specimen = self.store.specimen(self.specimen.specimen_id)
        report = build_report(self.store, specimen, self.pipeline, self.config)
        self.store.finish_specimen(specimen, reason, report)
        self.last_finished = finished_text(replace(specimen, finish_reason=reason), report)
        self.specimen, self.selector, self.counts, self.flag_status = None, None, {}, None
        self.outbox.wake()

    def run_commands(self) -> None:
        for command in self.store.pending_commands():
            self.store.complete_command(command, self.apply_command(command))

    def apply_command(self, command) -> str:
        try:
            if command.action == "finish":
                if self.specimen is None:
                    return "refused: no specimen is open"
                self.finish("finished by command")
                return "finished"
            if self.specimen is not None:
                return f"refused: specimen {self.specimen.specimen_id} is open; finish it first"
            started = self.start(command.specimen_id or self.automatic_id(),
                                 command.target or self.config.specimen.target, command.wbc_10e9_per_l,
                                 command.accession, command.operator)
            return f"started {started.specimen_id}"
        except StorageFull:
            raise
        except StateError as err:
            return f"refused: {err}"


# --- values between the pipeline and the store ------------------------------------------

def live_frame(frame: Frame, result: FieldResult | None, kind: str, um_per_pixel: float) -> LiveFrame:
    """What the live view shows of a frame: every cell found, with its class where it was counted in it."""
    if result is None:
        return LiveFrame(frame.index, frame.name, frame.image, kind, (), um_per_pixel, time.time())
    labels = {c.detection.bbox: c.prediction.label for c in result.cells}
    boxes = tuple(LiveBox(tuple(d.bbox), labels.get(d.bbox, ""), d.touches_edge) for d in result.found)
    return LiveFrame(frame.index, frame.name, frame.image, kind, boxes, result.um_per_pixel, time.time())


def new_cell(result: CellResult, slide_xy_um: tuple[float, float], um_per_pixel: float | None = None,
             cut: WrittenCut | None = None) -> NewCell:
    """A counted cell as stored: where it lies on the slide and in its field, its class, thumbnail and cut."""
    x, y = result.detection.center
    return NewCell(float(slide_xy_um[0]), float(slide_xy_um[1]), result.prediction.label,
                   float(result.prediction.confidence), tuple(int(v) for v in result.detection.bbox),
                   result.thumbnail_jpeg, result.field, bool(result.prediction.unfamiliar), float(x), float(y),
                   um_per_pixel, cut.file if cut else "", cut.origin if cut else None)


def specimen_evidence(store: Store, specimen: Specimen, classes) -> Evidence:
    """What the specimen checks judge, as stored: counts, unfamiliar cells, frames, colour, pixel size."""
    counts = store.label_counts(specimen)
    return Evidence(make_tally(counts, classes, specimen.target), sum(counts.values()),
                    store.unfamiliar_count(specimen), specimen.fields,
                    specimen.skipped_blur, specimen.skipped_motion, specimen_colour(specimen), specimen.um_per_pixel)


def specimen_colour(specimen: Specimen) -> ColourSums:
    return ColourSums(specimen.colour_frames, specimen.colour_sums) if specimen.colour_sums else ColourSums()


def finished_text(specimen: Specimen, report: dict | None) -> str:
    """A finished specimen in the status line: its counts and its worst flag (flags are stored worst first)."""
    if report is None:  # pruned: the report was delivered long ago
        return f"specimen {specimen.specimen_id} finished ({specimen.finish_reason})"
    identified = sum(c["count"] for c in report["classes"])
    flags = report.get("flags") or [{"message": code} for code in report["quality_flags"]]
    text = (f"specimen {specimen.specimen_id} finished ({specimen.finish_reason}): {identified}/{report['target']} "
            f"cells, {report['unidentified']} unidentified")
    return text + (f"; {flags[0]['message']}" if flags else "")


def pipeline_state(pipeline: FieldPipeline) -> dict:
    """What the pipeline carries from field to field (its running red-cell pixel-size estimate)."""
    return pipeline.state()


def restore_pipeline_state(pipeline: FieldPipeline, state: dict | None) -> None:
    """Put back what pipeline_state saved (a fresh pipeline stays as it is where nothing was saved)."""
    pipeline.restore(state)


def build_report(store: Store, specimen: Specimen, pipeline: FieldPipeline, config: Config) -> dict:
    """The report of a specimen from its stored cells and evidence (schema hematovision.report/1, as a dict)."""
    from ..vision.classify import Prediction  # noqa: PLC0415
    from ..counting.count import CountRun  # noqa: PLC0415
    from ..reports.build import report_from_run  # noqa: PLC0415
    from ..counting.tally import Counter  # noqa: PLC0415

    run = CountRun(Counter(pipeline.bundle.classes, specimen.target), fields=specimen.fields,
                   skipped_blur=specimen.skipped_blur, skipped_motion=specimen.skipped_motion,
                   edge_cells=specimen.edge_cells, started_at=specimen.started_at,
                   wbc_10e9_per_l=specimen.wbc_10e9_per_l, training=TrainingRange.of(pipeline.bundle),
                   limits=config.checks, colour=specimen_colour(specimen), um_per_pixel=specimen.um_per_pixel)
    for _, cell in store.cells(specimen):
        x0, y0, x1, y1 = cell.bbox
        detection = Detection(((x0 + x1) / 2, (y0 + y1) / 2), cell.bbox, 0.0, 0.0, False)
        prediction = Prediction(cell.label, cell.confidence, {}, unfamiliar=cell.unfamiliar)
        run.add_cell(CellResult(detection, prediction, cell.thumbnail, cell.field), (cell.x_um, cell.y_um))
    report = report_from_run(run, pipeline.bundle, pipeline.profile, specimen.specimen_id)
    return replace(report, accession=specimen.accession, operator=specimen.operator).to_dict()


def delivery_settings(config: Config) -> DeliverySettings:
    return DeliverySettings(config.report_dir(), config.report.retry_s,
                            PruneSettings(config.state.keep_days, config.state.max_mb), CellImages.of(config))


def make_link(report: ReportConfig, cancel: threading.Event | None = None):
    """The ReportLink of `report.link`, or None; a serial send in progress ends when `cancel` is set."""
    if report.link in ("astm", "jsonl"):
        from ..links.astm import AstmTiming  # noqa: PLC0415
        from ..links.send import SendSettings, SerialReportLink  # noqa: PLC0415
        from ..links.serial_port import SerialSettings  # noqa: PLC0415

        settings = SendSettings(serial=SerialSettings(report.baudrate, write_timeout_s=report.reply_timeout_s),
                                astm_timing=AstmTiming(reply_timeout_s=report.reply_timeout_s),
                                jsonl_ack_timeout_s=report.reply_timeout_s)
        return SerialReportLink(report.link, report.port, settings, cancel)
    if report.link == "usb":
        from ..links.usb import UsbReportLink, UsbSettings  # noqa: PLC0415

        return UsbReportLink(UsbSettings(mount_point=Path(report.usb_mount_point) if report.usb_mount_point else None))
    return None


# --- entry points -----------------------------------------------------------------------

def open_pipeline(config: Config) -> FieldPipeline:
    """The bundle and calibration profile of a configuration. Raises ModelInvalid, ConfigError."""
    from ..vision.model_bundle import load_bundle  # noqa: PLC0415

    bundle = load_bundle(config.bundle_path().resolve(), config.model.threads or None)  # an installed one's own folder
    profile = None
    if config.calibration.profile:
        from hematovision.calibration.profile import load_profile  # noqa: PLC0415

        profile = load_profile(config.resolve(config.calibration.profile))
    return FieldPipeline(bundle, profile)


def serve(config: Config, stop: threading.Event) -> int:
    """Run the service until `stop` is set or a replay ends. Raises ConfigError when a wait of the
    frame loop does not fit in the watchdog interval systemd gave (WATCHDOG_USEC)."""
    interval = watchdog_interval_s()
    if interval is not None and interval < config.service.watchdog_s:
        check_timings(config, interval, every_key=False)
    pipeline = open_pipeline(config)
    min_free = config.state.min_free_mb * 2**20
    with Store(config.state_dir() / STATE_FILE, min_free) as store, Notifier() as notifier:
        daemon = Daemon(config, pipeline, store, notifier, stop, make_link(config.report, stop),
                        LiveSlot() if config.web.enabled else None)
        with web_page(config, daemon):
            return daemon.run()


@contextlib.contextmanager
def web_page(config: Config, daemon: Daemon):
    """The web page (config [web]) for the daemon's life: its own threads and database connection, the live view
    of the frame loop's latest frame. Raises WebUnavailable when it cannot listen."""
    if not config.web.enabled:
        yield None
        return
    from ..web.app import create_app  # noqa: PLC0415
    from ..web.live import LiveView  # noqa: PLC0415
    from ..web.server import WebServer  # noqa: PLC0415
    from .specimens import StateSpecimens  # noqa: PLC0415

    specimens = StateSpecimens(daemon.store.path, daemon.classes,
                               lambda store, specimen: build_report(store, specimen, daemon.pipeline, config),
                               lambda: daemon.outbox and daemon.outbox.wake())
    daemon.bundle_listeners.append(specimens.use_classes)
    try:
        app = create_app(specimens, config.web, LiveView(daemon.live, config.web.live_width))
        with WebServer(app, config.web) as server:
            yield server
    finally:
        specimens.close()


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """SIGTERM and SIGINT set `stop`: the frame in hand is finished and committed, then the loop ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        logger.info("%s received: finishing the current frame", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def setup_logging(verbose: bool = False) -> None:
    """stderr (journald) logging, unless the caller configured logging already."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")


def run_main(config_path: str | Path = DEFAULT_CONFIG) -> int:
    """`hematovision-edge run`: 0 when stopped by SIGTERM/SIGINT or at the end of a replay,
    78 for a configuration error (not retried by the unit), 1 for any other error.
    """
    setup_logging()
    stop = threading.Event()
    with stop_on_signals(stop):
        try:
            return serve(load_config(config_path), stop)
        except ConfigError as err:
            logger.error("configuration error: %s", err)
            return EX_CONFIG
        except HematovisionError as err:
            logger.error("%s", err)
            return 1


def check_config_main(config_path: str | Path = DEFAULT_CONFIG) -> int:
    """`hematovision-edge check-config`: 0 when the file, the model bundle (every field, its stamp
    and its model), the calibration profile, the camera and the serial port it names are all
    valid and every wait of the frame loop fits in the watchdog interval; 78 (naming the key or
    field and the fix) when not. A USB drive not mounted yet is a warning.
    """
    setup_logging()
    try:
        config = load_config(config_path)
        open_pipeline(config)
        warnings = check_devices(config)
    except HematovisionError as err:
        logger.error("%s", err)
        return EX_CONFIG
    for warning in warnings:
        logger.warning("%s: %s", config_path, warning)
    logger.info("%s: configuration is valid (source %s, state in %s)", config_path, config.source.kind,
                config.state_dir())
    return 0


def command_main(config_path: str | Path, action: str, specimen_id: str | None = None,
                 target: int | None = None, wbc_10e9_per_l: float | None = None) -> int:
    """`hematovision-edge specimen start|finish`: queue a command the running daemon takes at its
    next frame (a start may carry the white count, 10^9/L, for absolute counts in the report). Returns 0
    once queued, 78 for a bad configuration, 1 when the state cannot be opened.
    """
    setup_logging()
    if action not in ("start", "finish"):
        logger.error("unknown specimen action %r; use start or finish", action)
        return 2
    try:
        config = load_config(config_path)
        with Store(config.state_dir() / STATE_FILE) as store:
            row = store.add_command(action, specimen_id, target, wbc_10e9_per_l)
    except ConfigError as err:
        logger.error("%s", err)
        return EX_CONFIG
    except HematovisionError as err:
        logger.error("%s", err)
        return 1
    logger.info("command %d queued: %s %s", row, action, specimen_id or "")
    return 0
