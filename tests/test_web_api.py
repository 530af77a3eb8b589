"""The web page's HTTP API against a real server on a free localhost port: contract, password, CSRF, paths, sizes."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from dataclasses import replace

import pytest

from hematovision.edge.config import WebConfig, check_web
from hematovision.edge.reports.files import write_report_files
from hematovision.edge.web.app import create_app
from hematovision.edge.web.folder import FolderSpecimens
from hematovision.edge.web.server import WebServer, WebUnavailable
from hematovision.errors import ConfigError
from test_report import eight_class_report

TOKEN = "correct-horse-battery"
JSON = {"Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def reports(tmp_path):
    folder = tmp_path / "reports"
    write_report_files(eight_class_report("S-1"), folder)
    write_report_files(eight_class_report("S/2"), folder)
    return folder


@contextlib.contextmanager
def server(folder, token: str = "", **web):
    config = WebConfig(enabled=True, port=free_port(), token=token, **web)
    with WebServer(create_app(FolderSpecimens(folder), config), config) as running:
        yield running


def request(srv, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, headers, parsed JSON or bytes) of one real HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", srv.server.effective_port, timeout=30)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    connection.request(method, path, data, {**(JSON if body is not None else {}), **(headers or {})})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    kind = response.getheader("Content-Type", "")
    return response.status, response, json.loads(payload) if kind.startswith("application/json") else payload


def test_status_list_and_report_follow_the_contract(reports):
    with server(reports) as srv:
        status, _, answer = request(srv, "GET", "/api/status")
        assert status == 200 and {"specimen_id", "counted", "target", "state"} <= set(answer)
        status, _, entries = request(srv, "GET", "/api/specimens")
        assert status == 200 and {e["specimen_id"] for e in entries} == {"S-1", "S/2"}
        assert all(e["state"] == "preliminary" for e in entries)
        status, _, report = request(srv, "GET", "/api/specimens/S%2F2")
        assert status == 200 and report["specimen_id"] == "S/2" and report["cells"][0]["thumbnail"]
        status, response, jpeg = request(srv, "GET", "/api/specimens/S-1/cells/1.jpg")
        assert status == 200 and jpeg[:2] == b"\xff\xd8" and response.getheader("Content-Type") == "image/jpeg"


def test_a_reclassified_cell_and_a_sign_off_give_the_verified_report_with_its_trail(reports):
    with server(reports) as srv:
        status, _, updated = request(srv, "POST", "/api/specimens/S-1/cells/1", {"label": "monocyte"})
        assert status == 200 and updated["cells"][0]["label"] == "monocyte"
        assert {c["name"]: c["count"] for c in updated["classes"]}["monocyte"] == 1
        status, _, verified = request(srv, "POST", "/api/specimens/S-1/sign", {"operator": "Ada"})
        assert status == 200
        trail = verified["verification"]
        assert trail["operator"] == "Ada" and trail["signed_at"]
        assert [(c["cell"], c["from"], c["to"], c["operator"]) for c in trail["changes"]] == [
            (1, "neutrophil", "monocyte", "Ada")]
        assert request(srv, "POST", "/api/specimens/S-1/sign", {"operator": "Ada"})[0] == 409
        assert request(srv, "POST", "/api/specimens/S-1/cells/2", {"label": "monocyte"})[0] == 409
        entries = {e["specimen_id"]: e for e in request(srv, "GET", "/api/specimens")[2]}
        assert entries["S-1"]["state"] == "verified" and entries["S-1"]["verified_by"] == "Ada"
    assert json.loads((reports / "S-1.json").read_text())["verification"] == "preliminary: not verified"
    assert json.loads((reports / "S-1.verified.json").read_text())["verification"]["operator"] == "Ada"


def test_bad_labels_cells_and_names_are_refused_with_what_to_do(reports):
    with server(reports) as srv:
        status, _, answer = request(srv, "POST", "/api/specimens/S-1/cells/1", {"label": "dragon"})
        assert status == 400 and "use one of" in answer["error"]
        assert request(srv, "POST", "/api/specimens/S-1/cells/9999", {"label": "monocyte"})[0] == 404
        assert request(srv, "POST", "/api/specimens/S-1/sign", {"operator": " "})[0] == 400
        assert request(srv, "POST", "/api/specimens/S-1/sign", raw=b"[1, 2]", headers=JSON)[0] == 400
        assert request(srv, "POST", "/api/specimen", {"action": "start"})[0] == 409  # no device here


def test_downloads_of_each_format_name_the_file_and_the_html_keeps_its_own_policy(reports):
    with server(reports) as srv:
        for fmt, start in (("json", b"{"), ("csv", b"\xef\xbb\xbfspecimen_id"), ("html", b"<!DOCTYPE html>")):
            status, response, body = request(srv, "GET", f"/download/preliminary/{fmt}/S-1")
            body = body if isinstance(body, bytes) else json.dumps(body).encode()
            assert status == 200 and body.startswith(start)
            assert f'filename="S-1.{fmt}"' in response.getheader("Content-Disposition")
        assert "default-src 'none'" in response.getheader("Content-Security-Policy")
        assert request(srv, "GET", "/download/verified/json/S-1")[0] == 404


@pytest.mark.parametrize("path", ["/api/specimens/..%2F..%2Fetc%2Fpasswd", "/api/specimens/../../etc/passwd",
                                  "/download/current/json/..%2F..%2F..%2Fetc%2Fpasswd",
                                  "/download/current/../../etc/passwd/json/S-1", "/api/specimens/%2Fetc%2Fpasswd",
                                  "/api/specimens/outside/cells/1.jpg", "/static/..%2F..%2Fapp.py"])
def test_no_path_outside_the_reports_folder_can_be_named(tmp_path, reports, path):
    outside = tmp_path / "outside"
    write_report_files(eight_class_report("outside"), outside)
    (reports / "outside.json").symlink_to(outside / "outside.json")  # a link out of the folder is passed over
    with server(reports) as srv:
        status, _, body = request(srv, "GET", path)
    assert status in (400, 404), (status, body)
    assert b"root:" not in (body if isinstance(body, bytes) else json.dumps(body).encode())


def test_an_oversized_request_is_refused_before_it_is_read(reports):
    with server(reports, max_request_kb=4) as srv:
        big = json.dumps({"label": "monocyte", "padding": "x" * 10_000}).encode()
        assert request(srv, "POST", "/api/specimens/S-1/cells/1", raw=big, headers=JSON)[0] == 413
        status, _, answer = request(srv, "POST", "/api/specimens/S-1/cells/1", raw=big[:4000] + b"}",
                                    headers={**JSON, "Content-Length": str(len(big))})
        assert status == 413
        assert request(srv, "GET", "/api/specimens/S-1")[2]["cells"][0]["label"] == "neutrophil"


def test_a_change_from_another_sites_page_is_refused(reports):
    with server(reports) as srv:
        form = b"label=monocyte"
        assert request(srv, "POST", "/api/specimens/S-1/cells/1", raw=form,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
        assert request(srv, "POST", "/api/specimens/S-1/cells/1", {"label": "monocyte"},
                       {"Origin": "http://evil.example"})[0] == 403
        assert request(srv, "POST", "/api/specimens/S-1/cells/1", {"label": "monocyte"},
                       {"Sec-Fetch-Site": "cross-site"})[0] == 403
        assert request(srv, "GET", "/api/status", headers={"Host": "evil.example:80"})[0] == 400  # DNS rebinding
        port = srv.server.effective_port
        assert request(srv, "POST", "/api/specimens/S-1/cells/1", {"label": "monocyte"},
                       {"Origin": f"http://127.0.0.1:{port}"})[0] == 200


def test_with_a_password_changes_need_it_even_on_localhost_and_pages_need_their_csrf_token(reports):
    with server(reports, token=TOKEN) as srv:
        assert request(srv, "GET", "/api/specimens")[0] == 200  # reading on this machine needs no password
        rebound = {"Host": "evil.example:80"}  # ... under its own name: another site's page reached it (DNS rebinding)
        assert request(srv, "GET", "/api/specimens", headers=rebound)[0] == 401
        assert request(srv, "GET", "/api/specimens", headers={**rebound, "Authorization": f"Bearer {TOKEN}"})[0] == 200
        unsigned = request(srv, "GET", "/specimens")[2].decode()
        assert 'name="csrf-token" content=""' in unsigned  # a page that cannot change anything has no CSRF token
        status, _, answer = request(srv, "POST", "/api/specimens/S-1/cells/1", {"label": "monocyte"})
        assert status == 401 and "web.token" in answer["error"]
        wrong = {"Authorization": "Bearer not-the-password"}
        assert request(srv, "POST", "/api/specimens/S-1/cells/1", {"label": "monocyte"}, wrong)[0] == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert request(srv, "POST", "/api/specimens/S-1/cells/1", {"label": "monocyte"}, bearer)[0] == 200
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        sign_in = request(srv, "GET", "/login")[2].decode().split('name="csrf_token" value="')[1].split('"')[0]
        assert request(srv, "POST", "/login", raw=f"password={TOKEN}".encode(), headers=form)[0] == 403
        assert request(srv, "POST", "/login", raw=f"password=wrong&csrf_token={sign_in}".encode(),
                       headers=form)[0] == 401
        status, response, _ = request(srv, "POST", "/login", raw=f"password={TOKEN}&csrf_token={sign_in}".encode(),
                                      headers=form)
        assert status == 302
        cookie = response.getheader("Set-Cookie").split(";")[0]
        assert "HttpOnly" in response.getheader("Set-Cookie") and "SameSite=Strict" in response.getheader("Set-Cookie")
        session = {"Cookie": cookie}
        assert request(srv, "POST", "/api/specimens/S-1/cells/2", {"label": "monocyte"}, session)[0] == 403
        page = request(srv, "GET", "/specimens", headers=session)[2].decode()
        csrf = page.split('name="csrf-token" content="')[1].split('"')[0]
        assert csrf and csrf != sign_in
        assert request(srv, "POST", "/api/specimens/S-1/cells/2", {"label": "monocyte"},
                       {**session, "X-CSRF-Token": sign_in})[0] == 403  # the sign-in form's token is not the pages'
        assert request(srv, "POST", "/api/specimens/S-1/cells/2", {"label": "monocyte"},
                       {**session, "X-CSRF-Token": csrf})[0] == 200


def test_listening_beyond_this_machine_needs_a_password_of_some_length():
    with pytest.raises(ConfigError, match="web.token"):
        check_web(WebConfig(enabled=True, host="0.0.0.0"), "config.toml")
    with pytest.raises(ConfigError, match="shorter"):
        check_web(WebConfig(enabled=True, host="0.0.0.0", token="short"), "config.toml")
    check_web(WebConfig(enabled=True, host="0.0.0.0", token=TOKEN), "config.toml")
    check_web(WebConfig(enabled=True), "config.toml")


def test_a_port_in_use_is_refused_naming_web_port(reports):
    with server(reports) as srv:
        taken = replace(WebConfig(enabled=True), port=srv.server.effective_port)
        with pytest.raises(WebUnavailable, match="web.port"):
            WebServer(create_app(FolderSpecimens(reports), taken), taken)


def test_check_config_warns_of_a_password_every_user_can_read(tmp_path):
    from hematovision.edge.config import Config
    from hematovision.edge.service.preflight import web_warnings

    path = tmp_path / "config.toml"
    path.write_text("")
    path.chmod(0o644)
    config = Config(web=WebConfig(enabled=True, token=TOKEN), path=path)
    assert "chmod 640" in web_warnings(config)[0]
    path.chmod(0o640)
    assert web_warnings(config) == []
