"""JSON-lines link: the command handler never raises and always answers one line."""

from __future__ import annotations

import argparse
import json
import os
import select
import threading
import tty
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hematovision.edge.links.jsonl import (MAX_LINE, LineSplitter, handle_line, send_report_jsonl,
                                          serve_commands)
from hematovision.edge.reports.report import commissioning_report
from hematovision.edge.links.send import (SendSettings, SerialReportLink, add_send_arguments,
                                           send_main, send_report)
from hematovision.edge.links.serial_port import open_serial
from hematovision.errors import CameraUnavailable, DataError, LinkFailed

FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REPORT = commissioning_report("S-7", "hv-pi-07", datetime(2024, 5, 6, 9, 30, tzinfo=timezone.utc))


class FakeController:
    """A counter that remembers what it was asked."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[tuple] = []
        self.fail = fail

    def _call(self, *call):
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    def start(self, specimen_id, target):
        self._call("start", specimen_id, target)
        return {"state": "counting", "specimen_id": specimen_id, "target": target}

    def status(self):
        self._call("status")
        return {"state": "idle", "ok": "never overrides", "counted": 0}

    def stop(self):
        self._call("stop")
        return {"state": "stopped"}

    def report(self, specimen_id):
        self._call("report", specimen_id)
        return REPORT.to_dict() if specimen_id == "S-7" else None

    def list(self):
        self._call("list")
        return ["S-7"]


def _ask(obj, controller=None) -> dict:
    line = obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n"
    answer = handle_line(line, controller or FakeController())
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1
    return json.loads(answer)


def test_each_command_gets_one_ok_answer_and_reaches_the_controller():
    c = FakeController()
    assert _ask({"cmd": "START", "specimen_id": "S-7", "target": 200}, c) == {
        "ok": True, "cmd": "START", "state": "counting", "specimen_id": "S-7", "target": 200}
    assert _ask({"cmd": "STATUS"}, c)["ok"] is True
    assert _ask({"cmd": "STOP"}, c)["state"] == "stopped"
    assert _ask({"cmd": "LIST"}, c)["specimens"] == ["S-7"]
    assert _ask({"cmd": "REPORT", "specimen_id": "S-7"}, c)["report"]["total"] == REPORT.total
    assert c.calls == [("start", "S-7", 200), ("status",), ("stop",), ("list",),
                       ("report", "S-7")]


@pytest.mark.parametrize("line, words", [
    (b"{not json\n", "not valid JSON"),
    (b"[1, 2]\n", "one JSON object"),
    (b'{"cmd": "FORMAT_DISK"}\n', "unknown command"),
    (b'{"cmd": "status"}\n', "unknown command"),
    (b'{"cmd": "START", "specimen_id": "S-1"}\n', 'needs "target"'),
    (b'{"cmd": "START", "specimen_id": "S-1", "target": "200"}\n', "whole number"),
    (b'{"cmd": "START", "specimen_id": "S-1", "target": true}\n', "whole number"),
    (b'{"cmd": "START", "specimen_id": "S-1", "target": 2.5}\n', "whole number"),
    (b'{"cmd": "START", "specimen_id": "S-1", "target": 0}\n', "whole number"),
    (b'{"cmd": "START", "specimen_id": "", "target": 5}\n', "printable text"),
    (b'{"cmd": "START", "specimen_id": "a\\u0000b", "target": 5}\n', "printable text"),
    (b'{"cmd": "REPORT", "specimen_id": "\\ud800"}\n', "printable text"),
    (b'{"cmd": "STOP", "force": true}\n', "takes no field"),
    (b'{"cmd": "STATUS", "x": NaN}\n', "not valid JSON"),
    (b"\xff\xfe{}\n", "not UTF-8"),
    (b"[" * 100_000, "longer than"),
    (b"[" * 4000 + b"]" * 4000, "not valid JSON"),
    (b'{"cmd": "START", "specimen_id": "S", "target": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"", "not valid JSON"),
])
def test_a_malformed_line_gets_an_error_answer_and_the_controller_is_not_called(line, words):
    c = FakeController()
    answer = _ask(line, c)
    assert answer["ok"] is False and words in answer["error"]
    assert c.calls == []


def test_a_report_for_an_unknown_specimen_is_an_error_answer():
    answer = _ask({"cmd": "REPORT", "specimen_id": "nope"})
    assert answer == {"ok": False, "cmd": "REPORT",
                      "error": "no report for specimen 'nope'; LIST shows the specimens "
                               "with reports"}


def test_controller_failures_become_error_answers():
    known = FakeController(fail=CameraUnavailable("camera not found; check the ribbon cable"))
    assert _ask({"cmd": "STATUS"}, known)["error"] == "camera not found; check the ribbon cable"
    bug = FakeController(fail=ZeroDivisionError("bug"))
    assert _ask({"cmd": "STOP"}, bug) == {"ok": False,
                                          "error": "internal error on the device; see its log"}


def test_an_answer_that_cannot_be_encoded_becomes_an_error_answer():
    class Odd(FakeController):
        def status(self):
            return {"value": float("nan"), "when": datetime.now()}
    assert _ask({"cmd": "STATUS"}, Odd())["ok"] is False


def test_line_splitter_joins_chunks_and_cuts_an_over_long_line_once():
    splitter = LineSplitter(max_line=10)
    assert splitter.feed(b'{"cmd"') == []
    assert splitter.feed(b':1}\n{"a"') == [b'{"cmd":1}\n']
    long = splitter.feed(b"x" * 30) + splitter.feed(b"y" * 30 + b"\nSTATUS\n")
    assert len(long) == 2 and len(long[0]) == 13 and long[1] == b"STATUS\n"
    assert [handle_line(x, FakeController()).count(b"\n") for x in long] == [1, 1]


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_any_bytes_get_exactly_one_json_answer_line(line):
    answer = handle_line(line, FakeController())
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1
    assert isinstance(json.loads(answer)["ok"], bool)


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3), max_leaves=4)
_REQUESTS = st.dictionaries(
    st.sampled_from(["cmd", "specimen_id", "target", "x"]) | st.text(max_size=6),
    st.sampled_from(["START", "STATUS", "STOP", "REPORT", "LIST", "S-7"]) | _VALUES,
    max_size=4)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_REQUESTS)
def test_fuzz_command_shaped_objects_get_exactly_one_json_answer_line(request):
    line = json.dumps(request, allow_nan=True).encode() + b"\n"
    answer = json.loads(handle_line(line, FakeController()))
    assert answer["ok"] in (True, False) and ("error" in answer) != answer["ok"]


# --- over a pseudo-terminal -----------------------------------------------------------

class PtyHost:
    """A host program on the pty master: it reads lines and answers with `reply(line)`."""

    def __init__(self, reply):
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self.reply = reply
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        os.close(self.master)
        os.close(self._slave)

    def _run(self):
        splitter = LineSplitter(max_line=1 << 20)
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.02)
            if not ready and self._stop.is_set():
                return  # stop once everything written to the line has been read
            for line in splitter.feed(os.read(self.master, 65536) if ready else b""):
                self.received.append(line)
                os.write(self.master, self.reply(line))


def _ack(line: bytes) -> bytes:
    message = json.loads(line)
    return b"noise that is not json\n" + json.dumps(
        {"ack": message["report"]["specimen_id"]}).encode() + b"\n"


def test_a_report_sent_over_jsonl_is_acknowledged_by_the_host():
    with PtyHost(_ack) as host:
        result = send_report(REPORT.to_dict(), "jsonl", host.path,
                             SendSettings(jsonl_ack_timeout_s=2.0))
    assert len(host.received) == 1
    message = json.loads(host.received[0])
    assert message["type"] == "report" and message["report"] == REPORT.to_dict()
    assert (result.link, result.messages_sent, result.retries) == ("jsonl", 1, 0)


def test_send_main_sends_a_report_file_given_cli_arguments(tmp_path):
    parser = argparse.ArgumentParser()
    add_send_arguments(parser)
    report_file = tmp_path / "S-7.json"
    report_file.write_text(json.dumps(REPORT.to_dict()))
    with PtyHost(_ack) as host:
        args = parser.parse_args(["--link", "jsonl", "--port", host.path, "--timeout", "2",
                                  str(report_file)])
        assert send_main(args) == 0
    assert json.loads(host.received[0])["report"]["specimen_id"] == "S-7"
    with pytest.raises(DataError, match="cannot read report"):
        send_main(parser.parse_args(["--link", "astm", "--port", "x", str(tmp_path / "no")]))


def test_serial_report_link_sends_over_jsonl():
    with PtyHost(_ack) as host:
        result = SerialReportLink("jsonl", host.path).send(REPORT)
    assert (result.link, result.port, result.specimen_id) == ("jsonl", host.path, "S-7")


def test_no_ack_from_the_host_is_a_link_failure():
    with PtyHost(lambda line: b'{"ack": "some other specimen"}\n') as host:
        with open_serial(host.path) as line:
            with pytest.raises(LinkFailed, match="did not acknowledge.*check the cable"):
                send_report_jsonl(REPORT.to_dict(), line, ack_timeout_s=0.3)


def test_a_nak_from_the_host_is_a_link_failure_with_its_reason():
    nak = b'{"nak": "S-7", "error": "unknown patient"}\n'
    with PtyHost(lambda line: nak) as host:
        with open_serial(host.path) as line:
            with pytest.raises(LinkFailed, match="refused report 'S-7': unknown patient"):
                send_report_jsonl(REPORT.to_dict(), line, ack_timeout_s=2.0)


def test_serve_commands_answers_host_lines_over_a_pty_until_stopped():
    master, slave = os.openpty()
    tty.setraw(slave)
    stop, controller = threading.Event(), FakeController()
    with open_serial(os.ttyname(slave)) as line:
        server = threading.Thread(target=serve_commands, args=(line, controller, stop, 0.02))
        server.start()
        os.write(master, b'{"cmd": "STATUS"}\n\xff\n{"cmd": "LIST"}\n' + b"x" * (MAX_LINE + 50)
                 + b"\n")
        answers = _read_lines(master, 4)
        stop.set()
        server.join(5)
    os.close(master)
    os.close(slave)
    assert [a["ok"] for a in answers] == [True, False, True, False]
    assert "longer than" in answers[3]["error"]


def _read_lines(fd: int, count: int) -> list[dict]:
    data = b""
    while data.count(b"\n") < count:
        ready, _, _ = select.select([fd], [], [], 5)
        assert ready, f"only got {data!r}"
        data += os.read(fd, 4096)
    return [json.loads(x) for x in data.splitlines()]
