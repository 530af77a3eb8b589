"""The web application (Flask): live view, specimen entry, reports list, review and sign-off, and its JSON API."""

from __future__ import annotations

import json
import logging
import math

from flask import Flask, Response, current_app, g, jsonify, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from hematovision.errors import HematovisionError

from ..config import WebConfig
from ..reports import review
from ..reports.files import report_csv, report_json, report_stem
from ..reports.html_page import render_html
from ..reports.report import ReportInvalid
from .backend import (REPORT_KINDS, Conflict, NotFound, Specimens, StartRequest, cell_jpeg,
                      without_thumbnails)
from .live import LiveView, live_status
from .security import CSRF_HEADER, SESSION_COOKIE, Access, host_allowed, is_loopback, same_origin

logger = logging.getLogger(__name__)

PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"
FORMATS = {"json": "application/json", "csv": "text/csv; charset=utf-8", "html": "text/html; charset=utf-8"}
OPEN_PATHS = ("login", "static")  # reachable without the password


class ReviewBadRequest(ReportInvalid):
    """A request body that is not what the API takes."""


def create_app(specimens: Specimens, web: WebConfig, live: LiveView | None = None,
               access: Access | None = None) -> Flask:
    """The application over `specimens`, with the live view of a device's frame loop when given."""
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=web.max_request_kb * 1024, SESSION_COOKIE_NAME="hv_flask_unused")
    app.json.sort_keys = False
    app.url_map.merge_slashes = False  # an id is taken as given, never redirected to another
    app.extensions["hematovision"] = (specimens, web, live, access or Access.of(web.token))
    _guard(app)
    _pages(app)
    _api(app)
    _errors(app)
    return app


def _state() -> tuple[Specimens, WebConfig, LiveView | None, Access]:
    return current_app.extensions["hematovision"]


# --- who may do what ---------------------------------------------------------------------

def _guard(app: Flask) -> None:
    @app.before_request
    def guard():
        _, web, _, access = _state()
        if not host_allowed(request.host, web.host, bool(access.token)):
            return _error(400, f"this page answers to {web.host}, localhost or 127.0.0.1, not {request.host!r}")
        if (request.content_length or 0) > web.max_request_kb * 1024:
            return _error(413, f"request larger than {web.max_request_kb} kB (web.max_request_kb)")
        bearer = access.bearer_ok(request.headers.get("Authorization"))
        g.authenticated = bearer or access.session_ok(request.cookies.get(SESSION_COOKIE))
        changing = request.method not in ("GET", "HEAD", "OPTIONS")
        if changing and not _from_this_site():
            return _error(403, "refused: the request comes from another site's page")
        if request.endpoint in OPEN_PATHS:
            return None
        if not access.token and not is_loopback(request.remote_addr):
            return _error(403, "this page takes requests from other machines only with a password (web.token)")
        if access.token and not g.authenticated and not _local_reader(web):
            return _needs_login()
        if changing and not bearer:
            return _check_change(access)
        return None

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers.setdefault("Cache-Control", "no-store")
        return response


def _local_reader(web: WebConfig) -> bool:
    """A read without the password: from this machine, under this machine's name (a page of another site that
    reaches this one under a name of its own, DNS rebinding, signs in first)."""
    return request.method in ("GET", "HEAD", "OPTIONS") and is_loopback(request.remote_addr) and \
        host_allowed(request.host, web.host, token_set=False)


def _from_this_site() -> bool:
    return same_origin(request.headers.get("Origin"), request.host) and \
        request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")


def _check_change(access: Access):
    """A change from a page (not a bearer token) is JSON, which another site's form cannot send, and, signed in
    with the password's cookie, carries the page's CSRF token."""
    if not request.is_json:
        return _error(415, "send changes as JSON (Content-Type: application/json)")
    if g.authenticated and not access.csrf_ok(request.headers.get(CSRF_HEADER)):
        return _error(403, f"refused: the {CSRF_HEADER} header is missing or wrong; reload the page")
    return None


def _needs_login():
    if request.path.startswith("/api/"):
        return _error(401, "sign in first: the password of web.token (header Authorization: Bearer TOKEN)")
    return redirect(url_for("login", next=request.path))


# --- pages ---------------------------------------------------------------------------------

def _render(template: str, **values) -> str:
    """A page; it carries the CSRF token of changes only where it can make them (signed in, or no password)."""
    specimens, web, live, access = _state()
    signed_in = g.get("authenticated", False)
    csrf = access.csrf_token() if signed_in or not access.token else ""
    return render_template(template, csrf=csrf, device=specimens.device, signed_in=signed_in,
                           password=bool(access.token), **values)


def _pages(app: Flask) -> None:
    @app.get("/")
    def home():
        specimens, web, live, _ = _state()
        if not specimens.device:
            return redirect(url_for("reports_page"))
        return _render("live.html", live=live is not None, status=specimens.status())

    @app.get("/specimens")
    def reports_page():
        return _render("specimens.html", entries=_state()[0].entries())

    @app.get("/review/<path:sid>")
    def review_page(sid: str):
        report = _state()[0].report(sid)
        labels = [vars(x) for x in review.labels(report)]
        return _render("review.html", specimen_id=sid, labels=labels, labels_json=json.dumps(labels))

    @app.get("/download/<kind>/<fmt>/<path:sid>")
    def download(kind: str, fmt: str, sid: str):
        if kind not in REPORT_KINDS or fmt not in FORMATS:
            raise NotFound(f"no such report: {kind} {fmt}; kinds {', '.join(REPORT_KINDS)}, formats "
                           f"{', '.join(FORMATS)}")
        report = _state()[0].report(sid, kind)
        body = {"json": report_json, "csv": report_csv, "html": lambda r: render_html(r).encode()}[fmt](report)
        response = Response(body, mimetype=FORMATS[fmt])
        if fmt == "html":
            response.headers["Content-Security-Policy"] = REPORT_CSP
        disposition = "inline" if fmt == "html" and not request.args.get("download") else "attachment"
        response.headers["Content-Disposition"] = f'{disposition}; filename="{report_stem(report)}.{fmt}"'
        return response

    @app.route("/login", methods=["GET", "POST"])
    def login():
        _, _, _, access = _state()
        wanted = request.args.get("next", "/")
        wanted = wanted if wanted.startswith("/") and not wanted.startswith("//") else "/"
        if request.method == "POST" and not access.login_ok(request.form.get("csrf_token")):
            return _error(403, "refused: the sign-in form is out of date; reload the page")
        if request.method == "GET" or not access.password_ok(request.form.get("password")):
            failed = request.method == "POST"
            return _render("login.html", failed=failed, next=wanted, login_csrf=access.login_token()), \
                401 if failed else 200
        response = redirect(wanted)
        response.set_cookie(SESSION_COOKIE, access.session_value(), httponly=True, samesite="Strict",
                            secure=request.is_secure)
        return response


# --- the JSON API ---------------------------------------------------------------------------

def _api(app: Flask) -> None:
    @app.get("/api/status")
    def status():
        specimens, _, live, _ = _state()
        return jsonify({**specimens.status(), "live": live_status(live.current()) if live else None})

    @app.get("/api/live.jpg")
    def live_jpeg():
        _, _, live, _ = _state()
        rendered = live.current() if live else None
        if rendered is None:
            raise NotFound("no frame yet")
        return Response(rendered.jpeg, mimetype="image/jpeg", headers={"X-Frame-Index": str(rendered.index)})

    @app.get("/api/specimens")
    def entries():
        return jsonify([e.to_dict() for e in _state()[0].entries()])

    @app.get("/api/specimens/<path:sid>")
    def report(sid: str):
        kind = request.args.get("kind", "current")
        if kind not in REPORT_KINDS:
            raise NotFound(f"no {kind!r} report; use one of {', '.join(REPORT_KINDS)}")
        data = _state()[0].report(sid, kind).to_dict()
        return jsonify(without_thumbnails(data) if request.args.get("thumbnails") == "0" else data)

    @app.get("/api/specimens/<path:sid>/cells/<int:n>.jpg")
    def cell_image(sid: str, n: int):
        jpeg = cell_jpeg(_state()[0].report(sid), n)
        return Response(jpeg, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/specimens/<path:sid>/cells/<int:n>")
    def change_cell(sid: str, n: int):
        body = _json_body()
        updated = _state()[0].change_cell(sid, n, body.get("label"), body.get("operator"))
        return _report_response(updated.to_dict())

    @app.post("/api/specimens/<path:sid>/sign")
    def sign(sid: str):
        verified = _state()[0].sign(sid, _json_body().get("operator"))
        return _report_response(verified.to_dict())

    @app.post("/api/specimen")
    def command():
        body = _json_body()
        action = body.get("action")
        if action not in ("start", "finish"):
            return _error(400, "action must be \"start\" or \"finish\"")
        result = _state()[0].command(action, start_request(body) if action == "start" else None)
        return jsonify(result.to_dict()), 409 if result.refused else 202 if result.result is None else 200


def _report_response(data: dict):
    return jsonify(without_thumbnails(data) if request.args.get("thumbnails") == "0" else data)


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ReviewBadRequest("the request body must be a JSON object")
    return body


def start_request(body: dict) -> StartRequest:
    """The specimen to start, from a JSON body. Raises ReviewBadRequest naming the field."""
    text = {k: _text(body, k) for k in ("specimen_id", "accession", "operator")}
    target, wbc = body.get("target"), body.get("wbc")
    if target is not None and (not isinstance(target, int) or isinstance(target, bool) or not 1 <= target <= 100_000):
        raise ReviewBadRequest("target must be a whole number of cells from 1 to 100000")
    if wbc is not None and (not isinstance(wbc, (int, float)) or isinstance(wbc, bool) or not math.isfinite(wbc)
                            or not 0.001 <= wbc <= 1000):
        raise ReviewBadRequest("wbc must be the white count in 10^9/L (e.g. 7.2), from 0.001 to 1000")
    return StartRequest(text["specimen_id"], text["accession"], text["operator"], target,
                        None if wbc is None else float(wbc))


def _text(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str) or len(value.strip()) > 128 or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ReviewBadRequest(f"{key} must be one line of at most 128 characters")
    return value.strip()


# --- errors ---------------------------------------------------------------------------------

def _error(status: int, message: str):
    if request.path.startswith("/api/") or request.is_json:
        return jsonify({"error": message}), status
    return render_template("error.html", status=status, message=message), status


def _errors(app: Flask) -> None:
    @app.errorhandler(NotFound)
    def not_found(err):
        return _error(404, str(err))

    @app.errorhandler(review.UnknownCell)
    def unknown_cell(err):
        return _error(404, str(err))

    @app.errorhandler(review.AlreadyVerified)
    @app.errorhandler(Conflict)
    def conflict(err):
        return _error(409, str(err))

    @app.errorhandler(ReportInvalid)
    def bad_request(err):
        return _error(400, str(err))

    @app.errorhandler(HematovisionError)
    def failed(err):
        logger.warning("web request %s %s failed: %s", request.method, request.path, err)
        return _error(503, str(err))

    @app.errorhandler(HTTPException)
    def http_error(err):
        if err.code == 413:
            return _error(413, f"request larger than {_state()[1].max_request_kb} kB (web.max_request_kb)")
        return _error(err.code or 500, err.description or err.name)
