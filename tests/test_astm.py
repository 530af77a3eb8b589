"""ASTM E1381/E1394: framing, sender and receiver cores, and real transfers over ptys."""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import tty
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hematovision.edge.links import astm
from hematovision.edge.links.astm import (ACK, ENQ, EOT, ETB, ETX, NAK, STX, AstmReceiver, AstmTiming,
                                    AwaitReply, FrameError, Pause, RecordSettings, SenderCounts,
                                    Write, build_frame, build_frames, checksum, parse_frame,
                                    parse_message, report_records, sender_steps)
from hematovision.edge.links.astm_link import send_report_astm
from hematovision.edge.reports.report import Flag, commissioning_report
from hematovision.edge.links.send import SendSettings, send_report
from hematovision.edge.links.serial_port import SerialSettings, open_serial
from hematovision.errors import ConfigError, LinkFailed
from test_report import eight_class_report

FAST = AstmTiming(reply_timeout_s=0.5, busy_wait_s=0.05, contention_wait_s=0.2,
                  receive_timeout_s=1.0)
WHEN = datetime(2024, 5, 6, 9, 30, tzinfo=timezone.utc)
FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sample_report(specimen_id: str = "S-2024-0001"):
    report = commissioning_report(specimen_id, "hv-pi-07", WHEN)
    return replace(report, flags=(Flag.of("low_focus"), Flag.of("target_not_reached")))


# --- a receiving computer system on the master end of a pseudo-terminal ----------------

@dataclass
class Faults:
    """What the receiving side does wrong; frames are counted from 1 as they arrive."""

    nak_frames: set[int] = field(default_factory=set)       # answer NAK, do not read it
    drop_ack_frames: set[int] = field(default_factory=set)  # read it, lose the ACK
    garble_frames: set[int] = field(default_factory=set)    # line noise on the checksum
    nak_all_frames: bool = False
    silent: bool = False                                     # cable to a switched-off host
    unplug_at_frame: int | None = None                       # close the pty mid-message
    contend: bool = False                                    # answer our ENQ with its own


class PtyHost:
    """The lab computer: an AstmReceiver in a thread on the pty master, with faults."""

    def __init__(self, receiver: AstmReceiver | None = None, faults: Faults | None = None):
        self.receiver = receiver or AstmReceiver()
        self.faults = faults or Faults()
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self.frames_seen = 0
        self._frame: bytearray | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PtyHost:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):  # the master is already closed when unplugged
                os.close(fd)

    def _run(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.master], [], [], 0.02)
                data = os.read(self.master, 4096) if ready else b""
            except (OSError, ValueError):
                return  # the "cable" was pulled
            if not data and self._stop.is_set():
                return  # stop once everything written to the line has been read
            for i in range(len(data)):
                self._byte(data[i:i + 1])

    def _byte(self, b: bytes) -> None:
        if self.faults.silent:
            return
        if self._frame is not None:
            self._frame += b
            if b == b"\n":
                raw, self._frame = bytes(self._frame), None
                self._on_frame(raw)
        elif b == STX and self.receiver.receiving:
            self._frame = bytearray(b)
        elif b == ENQ and self.faults.contend:
            self.faults.contend = False
            self._send_own_message()
        else:
            self._write(self.receiver.feed(b))

    def _on_frame(self, raw: bytes) -> None:
        self.frames_seen += 1
        n, f = self.frames_seen, self.faults
        if f.unplug_at_frame == n:
            os.close(self.master)
            self._stop.set()
            return
        if f.nak_all_frames or n in f.nak_frames:
            self._write(NAK)
            return
        if n in f.garble_frames:
            raw = raw[:-4] + (b"0" if raw[-4:-3] != b"0" else b"1") + raw[-3:]
        reply = self.receiver.feed(raw)
        if n not in f.drop_ack_frames:
            self._write(reply)

    def _send_own_message(self) -> None:
        """Contention: answer ENQ with ENQ, then send a query as the prioritised computer."""
        self._write(ENQ)
        time.sleep(0.05)
        for data in [ENQ, *build_frames(["H|\\^&", "Q|1|^ALL", "L|1|N"]), EOT]:
            self._write(data)
            if data != EOT:
                assert self._read_reply() == ACK
        self.host_query_acked = True

    def _read_reply(self) -> bytes:
        ready, _, _ = select.select([self.master], [], [], 2.0)
        return os.read(self.master, 1) if ready else b""

    def _write(self, data: bytes) -> None:
        if data:
            os.write(self.master, data)


def _send(host: PtyHost, report=None, timing: AstmTiming = FAST):
    with open_serial(host.path) as line:
        return send_report_astm(report or sample_report(), line, timing, port=host.path)


def _assert_delivered_once(receiver: AstmReceiver, report) -> None:
    assert len(receiver.messages) == 1
    got = parse_message(receiver.messages[0])
    assert got.specimen_id == report.specimen_id
    assert got.patient_ids[0] == report.specimen_id
    assert got.sender == ("Hematovision", astm.__version__, report.device_id)
    assert got.comments == tuple((f.code, f.message) for f in report.flags)
    for c in report.classes:
        code = astm.DEFAULT_PERCENT_CODES[c.name]
        assert got.results[code] == astm.ReceivedResult(f"{c.percent:.1f}", "%", "P")
    assert got.results["UNIDCNT"].value == str(report.unidentified)
    assert got.results["CELLCNT"].value == str(report.total)
    assert len(got.results) == len(report.classes) + 2


# --- transfers over real pseudo-terminals ---------------------------------------------

def test_clean_transfer_delivers_the_report_once():
    with PtyHost() as host:
        result = _send(host)
    _assert_delivered_once(host.receiver, sample_report())
    assert (result.messages_sent, result.retries, host.receiver.duplicates) == (1, 0, 0)
    assert result.frames_sent == host.frames_seen == len(host.receiver.messages[0])


def test_a_nak_makes_the_sender_repeat_the_frame_then_succeed():
    with PtyHost(faults=Faults(nak_frames={2, 3})) as host:
        result = _send(host)
    _assert_delivered_once(host.receiver, sample_report())
    assert result.retries == 2 and host.receiver.duplicates == 0


def test_a_lost_ack_is_retransmitted_and_the_duplicate_recorded_once():
    with PtyHost(faults=Faults(drop_ack_frames={3})) as host:
        result = _send(host)
    _assert_delivered_once(host.receiver, sample_report())
    assert result.retries == 1
    assert host.receiver.duplicates == 1  # seen twice, ACKed twice, kept once


def test_a_garbled_checksum_is_naked_by_the_receiver_and_resent():
    with PtyHost(faults=Faults(garble_frames={1, 5})) as host:
        result = _send(host)
    _assert_delivered_once(host.receiver, sample_report())
    assert host.receiver.naks == 2 and result.retries == 2


def test_a_silent_receiver_fails_the_send_and_a_later_send_succeeds():
    with PtyHost(faults=Faults(silent=True)) as host:
        with pytest.raises(LinkFailed, match="no receiver answered ENQ.*check the cable"):
            _send(host)
        host.faults.silent = False
        result = _send(host)
    _assert_delivered_once(host.receiver, sample_report())
    assert result.retries == 0


def test_a_frame_naked_six_times_aborts_with_eot_and_delivers_nothing():
    with PtyHost(faults=Faults(nak_all_frames=True)) as host:
        with pytest.raises(LinkFailed, match="not accepted after 6 attempt"):
            _send(host)
        time.sleep(0.1)
    assert host.frames_seen == 6 and host.receiver.messages == []
    assert not host.receiver.receiving  # our EOT ended the transfer


def test_an_unplugged_cable_fails_then_a_fresh_line_delivers_exactly_once():
    receiver = AstmReceiver()
    with PtyHost(receiver, Faults(unplug_at_frame=4)) as host:
        with pytest.raises(LinkFailed, match="check the cable"):
            _send(host)
    assert receiver.messages == []  # nothing is delivered without the L record and EOT
    receiver.expire()  # its 30 s receive timer runs out on the dead line
    with PtyHost(receiver) as host:
        _send(host)
    _assert_delivered_once(receiver, sample_report())
    assert receiver.duplicates == 0


def test_on_contention_the_device_yields_to_the_computer_then_sends():
    with PtyHost(faults=Faults(contend=True)) as host:
        started = time.monotonic()
        result = _send(host)
    assert getattr(host, "host_query_acked", False)
    assert time.monotonic() - started >= FAST.contention_wait_s
    _assert_delivered_once(host.receiver, sample_report())
    assert result.retries == 1  # one more ENQ


def test_send_report_opens_a_pty_path_and_a_missing_port_says_check_the_cable(tmp_path):
    with PtyHost() as host:
        result = send_report(sample_report().to_dict(), "astm", host.path,
                             SendSettings(astm_timing=FAST, wbc_10e9_per_l=6.5))
    got = parse_message(host.receiver.messages[0])
    assert got.results["NEUT#"] == astm.ReceivedResult("3.77", "10^9/L", "P")
    assert result.link == "astm" and result.messages_sent == 1
    with pytest.raises(LinkFailed, match="check the cable / port name"):
        send_report(sample_report().to_dict(), "astm", str(tmp_path / "ttyUSB9"))
    with pytest.raises(ConfigError, match="astm, jsonl"):
        send_report(sample_report().to_dict(), "kermit", host.path)


def test_serial_settings_out_of_range_are_refused():
    with pytest.raises(ConfigError, match="parity"):
        SerialSettings(parity="X")


# --- E1394 records --------------------------------------------------------------------

def test_records_escape_delimiters_in_a_hostile_specimen_id():
    report = sample_report("A|B^C\\D&E")
    records = report_records(report, RecordSettings(), WHEN)
    plain = report_records(sample_report("ABCDE"), RecordSettings(), WHEN)
    assert [r.count("|") for r in records] == [r.count("|") for r in plain]
    assert [r.count("^") for r in records] == [r.count("^") for r in plain]
    assert "A&F&B&S&C&R&D&E&E" in records[1]
    assert parse_message(records).specimen_id == "A|B^C\\D&E"


def test_records_follow_e1394_layout_and_status_turns_final_when_verified():
    report = sample_report().with_verification("Ada Lovelace at Lab 2", WHEN)
    records = report_records(report, RecordSettings(patient_id_field=4), WHEN)
    assert [r[0] for r in records] == ["H", "P", "O", "C", "C"] + ["R"] * 7 + ["L"]
    assert records[0] == "H|\\^&|||Hematovision^%s^hv-pi-07|||||||P|LIS2-A2|20240506093000" % (
        astm.__version__)
    assert records[1] == "P|1||S-2024-0001"
    assert records[2].split("|")[4] == "^^^DIFF" and records[2].endswith("|F")
    r1 = records[5].split("|")
    assert r1[:5] == ["R", "1", "^^^NEUT%", "58.0", "%"] and r1[8] == "F"
    assert r1[10] == "Ada Lovelace at Lab 2" and r1[13] == "hv-pi-07"
    assert records[-1] == "L|1|N"


def test_result_codes_are_configurable_and_a_missing_code_is_a_config_error():
    codes = dict(astm.DEFAULT_PERCENT_CODES, neutrophil="GRAN%")
    records = report_records(sample_report(), RecordSettings(percent_codes=codes), WHEN)
    assert "GRAN%" in parse_message(records).results
    with pytest.raises(ConfigError, match="lymphocyte"):
        report_records(sample_report(), RecordSettings(percent_codes={"neutrophil": "N"}), WHEN)


# --- framing and the pure state machines ----------------------------------------------

def test_nrbc_is_its_own_result_per_100_wbc_and_rejected_cells_are_not_sent():
    report = eight_class_report()
    records = report_records(report, RecordSettings(), WHEN)
    results = parse_message(records).results
    assert results["NRBC"] == astm.ReceivedResult("7.0", "/100 WBC", "P")
    assert [code for code in results] == ["NEUT%", "LYMPH%", "MONO%", "EO%", "BASO%", "IG%", "NRBC",
                                          "UNIDCNT", "CELLCNT"]
    assert results["NEUT%"].value == "50.0" and results["IG%"].value == "0.0"
    assert results["CELLCNT"].value == "102"  # white cells: 100 identified + 2 unidentified
    assert not any("platelet" in r or "PLT" in r for r in records)
    with_wbc = parse_message(report_records(report, RecordSettings(), WHEN, wbc_10e9_per_l=8.0)).results
    assert with_wbc["NEUT#"].value == "4.00" and with_wbc["NRBC"].value == "7.0"


def test_nrbc_result_code_and_units_are_configurable():
    settings = RecordSettings(nrbc_code="NRBC%", nrbc_units="/100WBC")
    results = parse_message(report_records(eight_class_report(), settings, WHEN)).results
    assert results["NRBC%"] == astm.ReceivedResult("7.0", "/100WBC", "P") and "NRBC" not in results


def test_an_eight_class_report_reaches_the_receiver_with_its_nrbc_record():
    report = eight_class_report()
    with PtyHost() as host:
        _send(host, report)
    (message,) = host.receiver.messages
    assert parse_message(message).results["NRBC"].value == "7.0"


def test_checksum_is_the_byte_sum_mod_256_in_upper_case_hex():
    assert checksum(b"1L|1|N\r\x03") == b"04"
    frame = build_frame(1, b"L|1|N\r", True)
    assert frame == b"\x021L|1|N\r\x0304\r\n"
    assert parse_frame(frame) == astm.Frame(1, b"L|1|N\r", True)
    assert checksum(bytes([0xFF, 0xFF])) == b"FE"


def test_frame_numbers_cycle_one_to_seven_then_zero():
    frames = build_frames([f"R|{i}" for i in range(10)])
    assert [f[1:2] for f in frames] == [b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"0", b"1",
                                        b"2"]


def test_a_long_record_is_split_into_etb_frames_of_at_most_240_characters():
    records = ["R|1|" + "x" * 600, "L|1|N"]
    frames = build_frames(records)
    parsed = [parse_frame(f) for f in frames]
    assert [p.final for p in parsed] == [False, False, True, True]
    assert all(len(p.text) <= 240 for p in parsed) and len(frames[0]) == 247
    receiver = AstmReceiver()
    assert receiver.feed(ENQ + b"".join(frames) + EOT) == ACK * 5
    assert receiver.messages == [records]


def test_parse_frame_rejects_a_bad_checksum_lower_case_and_bad_numbers():
    good = build_frame(3, b"R|1|^^^MONO%|7.0|%\r", True)
    assert good[-4:-2] == b"E8"
    for bad in (good[:-4] + b"00" + good[-2:], good[:-4] + good[-4:-2].lower() + good[-2:],
                good[:1] + b"8" + good[2:], good[:-1], good.replace(ETX, ETB)):
        with pytest.raises(FrameError):
            parse_frame(bad)


def _drive(frames, replies, timing=FAST):
    """Run the sender core against scripted replies; returns the steps it took."""
    steps, counts = [], SenderCounts()
    gen, reply = sender_steps(frames, timing, counts), None
    replies = list(replies)
    try:
        while True:
            step = gen.send(reply)
            steps.append(step)
            reply = replies.pop(0) if isinstance(step, AwaitReply) else None
    except StopIteration:
        return steps, counts


def test_sender_core_waits_after_a_busy_nak_and_after_contention():
    frames = build_frames(["H|\\^&", "L|1|N"])
    steps, counts = _drive(frames, [NAK, ENQ, ACK, ACK, ACK])
    pauses = [s.seconds for s in steps if isinstance(s, Pause)]
    assert pauses == [FAST.busy_wait_s, FAST.contention_wait_s]
    assert (counts.enq_sent, counts.contentions, counts.frames_sent) == (3, 1, 2)
    assert steps[-1] == Write(EOT)


def test_a_busy_receiver_naks_enq_and_an_idle_one_ignores_stray_bytes():
    assert AstmReceiver(busy=True).feed(ENQ) == NAK
    receiver = AstmReceiver()
    assert receiver.feed(b"garbage" + build_frame(1, b"L|1|N\r", True) + EOT) == b""
    assert not receiver.receiving and receiver.messages == []


def test_sender_core_gives_up_after_the_allowed_attempts_with_eot():
    frames = build_frames(["H|\\^&", "L|1|N"])
    with pytest.raises(LinkFailed, match="not accepted after 6"):
        _drive(frames, [ACK] + [NAK] * 6)
    strict = replace(FAST, retransmit_on_timeout=False)
    with pytest.raises(LinkFailed, match="after 1 attempt"):
        _drive(frames, [ACK, None], strict)
    with pytest.raises(LinkFailed, match="refused 6 requests"):
        _drive(frames, [NAK] * 6)


def test_timing_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError):
        AstmTiming(max_frame_attempts=0)


# --- fuzzing --------------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_parse_frame_never_crashes_and_never_accepts_a_bad_checksum(raw):
    try:
        frame = parse_frame(raw)
    except FrameError:
        return
    assert checksum(raw[1:-4]) == raw[-4:-2]
    assert raw == build_frame(frame.number, frame.text, frame.final)


_TEXT = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 7), _TEXT, st.booleans(), st.data())
def test_fuzz_any_single_byte_change_of_a_frame_is_rejected(number, text, final, data):
    frame = bytearray(build_frame(number, text, final))
    index = data.draw(st.integers(0, len(frame) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda v: v != frame[index]))
    frame[index] = new
    with pytest.raises(FrameError):
        parse_frame(bytes(frame))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=40),
                          st.tuples(st.integers(0, 7), _TEXT, st.booleans())), max_size=8))
def test_fuzz_receiver_survives_any_byte_stream_and_answers_only_ack_or_nak(chunks):
    receiver = AstmReceiver()
    stream = ENQ + b"".join(c if isinstance(c, bytes) else build_frame(*c) for c in chunks)
    replies = receiver.feed(stream + EOT)
    assert set(replies) <= {ACK[0], NAK[0]}
    assert not receiver.receiving
    for message in receiver.messages:
        assert message[-1].startswith("L")


def test_a_report_holding_the_white_count_sends_absolute_counts_without_send_wbc():
    from dataclasses import replace

    from hematovision.edge.reports.report import commissioning_report

    report = replace(commissioning_report(), wbc_10e9_per_l=6.0)
    results = parse_message(report_records(report, RecordSettings(), WHEN)).results
    neutrophil = report.classes[0]
    assert results["NEUT#"].value == f"{6.0 * neutrophil.percent / 100:.2f}"
    overridden = parse_message(report_records(report, RecordSettings(), WHEN, wbc_10e9_per_l=10.0)).results
    assert overridden["NEUT#"].value == f"{10.0 * neutrophil.percent / 100:.2f}"
