"""HTTP basic auth in front of the whole standalone app, and the checks on where it may listen.

:class:`BasicAuthMiddleware` is a plain ASGI wrapper: every ``http`` and ``websocket`` connection
passes through it before any routing happens, so no route of the wrapped app (the page, gradio's
queue, files and API, the REST routes) can answer without the credentials. ``lifespan`` passes
through untouched (gradio starts its queue there).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
from contextvars import ContextVar
from typing import Any, Awaitable, Callable, Mapping

from captioners.errors import CaptionerError

REALM = "Captioners"
AUTH_FORMAT = "--auth must be user:password[,user:password...]"

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[Mapping[str, Any]], Awaitable[None]]

# Set while the server finishes a websocket handshake this module refused (see DeniedHandshakeFilter).
_refused_websocket: ContextVar[bool] = ContextVar("captioners_refused_websocket", default=False)


def parse_auth(value: str | None) -> dict[str, str]:
    """``user:password[,user:password]`` -> {user: password}; ``None`` -> {} (no auth).

    Raises a one-line :class:`CaptionerError` for an entry without a colon, an empty user name or
    password, or a value with no entry at all; the message never repeats the value (it holds
    passwords).
    """
    from captioners.api import parse_credentials

    if value is None:
        return {}
    try:
        credentials = parse_credentials(value)
    except CaptionerError:
        raise CaptionerError(f"{AUTH_FORMAT} (an entry has no ':').") from None
    if not credentials:
        raise CaptionerError(f"{AUTH_FORMAT} (got no entry).")
    if "" in credentials:
        raise CaptionerError(f"{AUTH_FORMAT} (an entry has an empty user name).")
    if any(not password for password in credentials.values()):
        raise CaptionerError(f"{AUTH_FORMAT} (an entry has an empty password).")
    return credentials


def is_loopback(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 or ::1 (also written ``[::1]``); ``0.0.0.0``,
    ``::`` and any other host name count as reachable from the network."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def check_bind(host: str, credentials: Mapping[str, str], allow_unauthenticated: bool) -> None:
    """Refuse to serve an app without auth on an address other machines can reach."""
    if credentials or allow_unauthenticated or is_loopback(host):
        return
    raise CaptionerError(f"--host {host} would expose the app to your network without a password: pass "
                         "--auth user:password, or --allow-unauthenticated to knowingly serve it to anyone "
                         "who can reach it.")


class BasicAuthMiddleware:
    """Answer 401 (``WWW-Authenticate: Basic``) to any HTTP request or websocket handshake without
    one of ``credentials`` ({user: password}); compare in constant time."""

    def __init__(self, app: Callable[..., Awaitable[None]], credentials: Mapping[str, str], realm: str = REALM):
        if not credentials:
            raise ValueError("BasicAuthMiddleware needs at least one user:password")
        self.app = app
        self.realm = realm
        self._expected = [f"{user}:{password}".encode("utf-8") for user, password in credentials.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.authorized(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self._deny_http(send)
        else:
            await self._deny_websocket(scope, receive, send)

    def authorized(self, scope: Scope) -> bool:
        given = self._credentials_of(scope)
        if given is None:
            return False
        matched = False
        for expected in self._expected:  # no early exit: the time taken does not tell which entry matched
            matched |= hmac.compare_digest(given, expected)
        return matched

    @staticmethod
    def _credentials_of(scope: Scope) -> bytes | None:
        """The decoded ``user:password`` of an ``Authorization: Basic ...`` header, else None."""
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                if scheme.lower() != b"basic":
                    return None
                try:
                    decoded = base64.b64decode(token.strip(), validate=True)
                except (binascii.Error, ValueError):
                    return None
                return decoded if b":" in decoded else None
        return None

    def _headers(self, body: bytes) -> list[tuple[bytes, bytes]]:
        return [(b"www-authenticate", f'Basic realm="{self.realm}", charset="UTF-8"'.encode("latin-1")),
                (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store")]

    async def _deny_http(self, send: Send) -> None:
        body = b"Authentication required.\n"
        await send({"type": "http.response.start", "status": 401, "headers": self._headers(body)})
        await send({"type": "http.response.body", "body": body})

    async def _deny_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse the handshake: a real 401 where the server supports the ASGI websocket denial
        response (uvicorn does), else close before accepting (the client sees 403)."""
        message = await receive()
        if message.get("type") != "websocket.connect":
            return
        _refused_websocket.set(True)
        if "websocket.http.response" in (scope.get("extensions") or {}):
            body = b"Authentication required.\n"
            await send({"type": "websocket.http.response.start", "status": 401, "headers": self._headers(body)})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})


class DeniedHandshakeFilter(logging.Filter):
    """Drop uvicorn's "ASGI callable returned without completing handshake." for the websockets
    this middleware refused: uvicorn (0.54's default websocket implementation) logs it after any
    denial response, though the 401 went out complete. Other handshake errors still show.

    Works because uvicorn logs it in the task that ran the middleware, which set the context var.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_refused_websocket.get() and "without completing handshake" in record.getMessage())
