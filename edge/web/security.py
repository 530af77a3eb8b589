"""Who may read and change what over HTTP: the password, the session cookie, CSRF and the Host header."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..config import LOOPBACK_HOSTS

SESSION_COOKIE = "hv_session"
CSRF_HEADER = "X-CSRF-Token"


@dataclass(frozen=True)
class Access:
    """The web page's password (empty: none) and the secret its session cookie and CSRF token derive from."""

    token: str
    secret: bytes

    @classmethod
    def of(cls, token: str) -> Access:
        """Derived from the password, so that a restart keeps sessions; a random secret without one."""
        secret = hashlib.sha256(b"hematovision-web\0" + token.encode()).digest() if token else secrets.token_bytes(32)
        return cls(token, secret)

    def session_value(self) -> str:
        return hmac.new(self.secret, b"session", hashlib.sha256).hexdigest()

    def csrf_token(self) -> str:
        return hmac.new(self.secret, b"csrf", hashlib.sha256).hexdigest()

    def login_token(self) -> str:
        """The sign-in form's CSRF token: another than the pages' one, which only a signed-in page is given."""
        return hmac.new(self.secret, b"login", hashlib.sha256).hexdigest()

    def password_ok(self, given: str | None) -> bool:
        return bool(self.token) and given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def bearer_ok(self, authorization: str | None) -> bool:
        scheme, _, value = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and self.password_ok(value.strip())

    def session_ok(self, cookie: str | None) -> bool:
        return bool(self.token) and cookie is not None and hmac.compare_digest(cookie, self.session_value())

    def csrf_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.csrf_token().encode())

    def login_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.login_token().encode())


def is_loopback(address: str | None) -> bool:
    """True for a client on this machine (127.0.0.0/8, ::1, an IPv4-mapped loopback address)."""
    try:
        ip = ipaddress.ip_address((address or "").split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def host_allowed(host_header: str | None, configured_host: str, token_set: bool) -> bool:
    """A Host header naming this machine's loopback or configured address; any with a password set (a page of
    another site, reaching this one under a name it controls, then has no cookie and no password)."""
    if token_set:
        return True
    name = urlsplit(f"//{host_header or ''}").hostname or ""
    return name in LOOPBACK_HOSTS or name == configured_host.strip("[]")


def same_origin(origin: str | None, host_header: str | None) -> bool:
    """An Origin header absent ("null" counts as foreign) or naming this very host and port."""
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc == (host_header or "")
