"""Send one report over a serial link (ASTM or JSON lines): the library behind `send`."""

from __future__ import annotations

import argparse
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hematovision.errors import ConfigError, DataError

from ..reports.report import Report
from .astm import AstmTiming, RecordSettings
from .astm_link import send_report_astm
from .jsonl import send_report_jsonl
from .serial_port import SendResult, SerialSettings, open_serial

logger = logging.getLogger(__name__)

LINKS = ("astm", "jsonl")


@dataclass(frozen=True)
class SendSettings:
    """Everything a send needs besides the report, the link kind and the port."""

    serial: SerialSettings = field(default_factory=SerialSettings)
    astm_timing: AstmTiming = field(default_factory=AstmTiming)
    astm_records: RecordSettings = field(default_factory=RecordSettings)
    jsonl_ack_timeout_s: float = 15.0
    wbc_10e9_per_l: float | None = None  # sends absolute counts too when given


def send_report(report_dict: Mapping[str, object], link: str, port: str,
                settings: SendSettings = SendSettings(), cancel: threading.Event | None = None) -> SendResult:
    """Validate the report and deliver it over `link` ("astm" or "jsonl") on `port`; every write
    and read on the line is bounded by the settings' timeouts and ends when `cancel` is set.

    Raises ReportInvalid for a bad report, ConfigError for an unknown link, LinkFailed
    (with the reason) when the port is missing or the receiver does not take the report,
    SendCancelled when `cancel` was set.
    """
    if link not in LINKS:
        raise ConfigError(f"link {link!r} is unknown; use one of {', '.join(LINKS)}")
    report = Report.from_dict(dict(report_dict))
    with open_serial(port, settings.serial, cancel) as line:
        if link == "astm":
            return send_report_astm(report, line, settings.astm_timing, settings.astm_records,
                                    settings.wbc_10e9_per_l, port)
        return send_report_jsonl(report.to_dict(), line, settings.jsonl_ack_timeout_s, port)


class ReportLink(Protocol):
    """Where finished reports go (a serial receiver, a USB drive); chosen by configuration."""

    def send(self, report: Report) -> SendResult:
        """Deliver one report; raises LinkFailed when it was not delivered."""


@dataclass(frozen=True)
class SerialReportLink:
    """ReportLink over a serial line: ASTM or JSON lines on `port`; a send in progress ends
    (SendCancelled) when `cancel` is set."""

    link: str
    port: str
    settings: SendSettings = field(default_factory=SendSettings)
    cancel: threading.Event | None = field(default=None, compare=False)

    def send(self, report: Report) -> SendResult:
        return send_report(report.to_dict(), self.link, self.port, self.settings, self.cancel)


def add_send_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `hematovision-edge send`."""
    parser.add_argument("--link", choices=LINKS, required=True, help="protocol of the receiver")
    parser.add_argument("--port", required=True,
                        help="serial device, pseudo-terminal or pyserial URL, e.g. /dev/ttyUSB0")
    parser.add_argument("--baud", type=int, default=SerialSettings.baudrate, help="serial speed")
    parser.add_argument("--timeout", type=float, default=AstmTiming.reply_timeout_s,
                        help="seconds to wait for each reply (ASTM) or the ack (JSON lines), and for a "
                             "receiver that stops taking bytes")
    parser.add_argument("--wbc", type=float, default=None,
                        help="white-cell count in 10^9/L: also send absolute counts (ASTM)")
    parser.add_argument("report_json", type=Path, help="a report .json file")


def send_main(args: argparse.Namespace) -> int:
    """Run `send` for parsed arguments; returns the exit status 0.

    Raises DataError when the report file is unreadable, ReportInvalid, ConfigError or
    LinkFailed as send_report does; the cli prints the message and exits non-zero.
    """
    report_dict = load_report_json(args.report_json)
    settings = SendSettings(
        serial=SerialSettings(baudrate=args.baud, write_timeout_s=args.timeout),
        astm_timing=AstmTiming(reply_timeout_s=args.timeout),
        jsonl_ack_timeout_s=args.timeout, wbc_10e9_per_l=args.wbc)
    result = send_report(report_dict, args.link, args.port, settings)
    logger.info("report %s delivered over %s on %s: %d message(s), %d frame(s), %d retries, "
                "%.2f s", result.specimen_id, result.link, result.port, result.messages_sent,
                result.frames_sent, result.retries, result.duration_s)
    return 0


def load_report_json(path: Path) -> dict:
    """Read a report file. Raises DataError when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except OSError as err:
        raise DataError(f"cannot read report {path}: {err.strerror}") from err
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"report {path} is not JSON: {err}") from err
