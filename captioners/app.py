"""The standalone app: ``python -m captioners ui`` serves the WebUI's Captioners tab on its own.

Bound to 127.0.0.1 unless ``--host`` says otherwise. ``--api`` adds the same REST routes as the
WebUI extension (``/captioners/v1/...``). ``--auth user:password`` puts HTTP basic auth in front of
everything the app serves; a ``--host`` other machines can reach needs it (or
``--allow-unauthenticated``).

The app is a FastAPI app of our own: the REST routes, then the gradio Blocks mounted at ``/`` with
``gradio.mount_gradio_app``, wrapped (with auth) in :class:`captioners.auth.BasicAuthMiddleware`,
and served by uvicorn. The wrapper is built before the socket is even bound, so there is no moment
when a route answers without credentials.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import socket
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import quote

from captioners.errors import CaptionerError

log = logging.getLogger(__name__)

STYLE = Path(__file__).resolve().parents[1] / "style.css"  # the extension's style.css, in a checkout
API_PREFIX = "/captioners/v1"


# ---- addresses ------------------------------------------------------------------------------------
def _bare(host: str) -> str:
    host = host.strip()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def display_url(host: str, port: int) -> str:
    """The address to open in a browser (the one gradio printed: localhost for 0.0.0.0)."""
    host = _bare(host)
    return f"http://{_url_host('localhost' if host in ('', '0.0.0.0', '::') else host)}:{port}/"


def self_url(host: str, port: int, credentials: Mapping[str, str]) -> str:
    """Where the app reaches itself, with the first login: gradio 3's queue runs each event by an
    HTTP request to its own server (``/api/predict``, ``/reset``), which the auth wrapper guards too."""
    host = _bare(host)
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "localhost": "127.0.0.1", "::": "::1"}.get(host.lower(), host)
    user, password = next(iter(credentials.items()))
    return f"http://{quote(user, safe='')}:{quote(password, safe='')}@{_url_host(host)}:{port}/"


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound (as uvicorn would bind it) but not yet listening: a taken port is
    a one-line error, and connections are refused until uvicorn serves the finished app on it."""
    host = _bare(host)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        hint = "; is another program using it? Pick another --port" if exc.errno == errno.EADDRINUSE else ""
        raise CaptionerError(f"Cannot listen on {_url_host(host)}:{port}: {reason}{hint}") from None
    return sock


# ---- the app --------------------------------------------------------------------------------------
def build_app(service: Any, credentials: Mapping[str, str] | None = None, api: bool = False,
              host: str = "127.0.0.1", port: int = 7862) -> tuple[Any, Any]:
    """(the ASGI app to serve, the gradio Blocks). With ``credentials`` ({user: password}) the ASGI
    app is the auth wrapper around everything; without, the FastAPI app itself."""
    import gradio as gr
    from fastapi import FastAPI

    from captioners.auth import BasicAuthMiddleware
    from captioners.ui import build_tab
    from captioners.ui.compat import queue_kwargs

    css = STYLE.read_text(encoding="utf-8") if STYLE.is_file() else None
    demo = build_tab(service, title="Captioners", css=css)
    demo.queue(**queue_kwargs(4))
    app = FastAPI(docs_url=None, redoc_url=None)
    if api:
        from captioners import api as rest

        rest.mount(app, service, None)  # before the gradio mount at "/", which would shadow them
    gr.mount_gradio_app(app, demo, path="/", **_mount_kwargs(gr.mount_gradio_app, css, host, port, credentials))
    return (BasicAuthMiddleware(app, credentials) if credentials else app), demo


def _mount_kwargs(mount: Callable[..., Any], css: str | None, host: str, port: int,
                  credentials: Mapping[str, str] | None) -> dict[str, Any]:
    params = inspect.signature(mount).parameters
    kwargs: dict[str, Any] = {}
    if css and "css" in params:  # gradio 6: the page's CSS is a launch / mount argument, no longer gr.Blocks'
        kwargs["css"] = css
    if "server_name" in params:
        kwargs.update(server_name=host, server_port=port)
    if credentials and "gradio_api_url" in params:  # gradio 3 (see self_url)
        kwargs["gradio_api_url"] = self_url(host, port, credentials)
    return kwargs


class StopWithOpenPages(logging.Filter):
    """A stop while a page still holds its event stream or queue socket: uvicorn waits, then cancels
    those connections and logs each as an ASGI error with a traceback. That is how a UI server stops
    with a browser open, not an error; one INFO line says it instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError):
            return False
        if "timeout graceful shutdown exceeded" in record.getMessage():
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "Closing the connections of pages still open", ()
        return True


def serve(app: Any, host: str, port: int, on_started: Callable[[], None] = lambda: None) -> None:
    """Run uvicorn on ``host:port`` until Ctrl-C / SIGTERM; ``on_started`` once it accepts connections."""
    import uvicorn

    sock = bind_socket(host, port)
    options: dict[str, Any] = {"log_level": "warning", "lifespan": "on",  # gradio starts its queue there
                               "ws_max_size": 1024 * 1024 * 1024}  # gradio 3 sends images over its websocket
    if "timeout_graceful_shutdown" in inspect.signature(uvicorn.Config).parameters:
        options["timeout_graceful_shutdown"] = 5  # open event streams must not hold up Ctrl-C
    config = uvicorn.Config(app, host=_bare(host), port=port, **options)  # (configures uvicorn's loggers)
    from captioners.auth import DeniedHandshakeFilter

    uvicorn_log = logging.getLogger("uvicorn.error")
    for kind in (DeniedHandshakeFilter, StopWithOpenPages):
        if not any(isinstance(f, kind) for f in uvicorn_log.filters):
            uvicorn_log.addFilter(kind())

    class Server(uvicorn.Server):
        async def startup(self, *args: Any, **kwargs: Any) -> None:
            await super().startup(*args, **kwargs)
            if self.started and not self.should_exit:
                on_started()

    try:
        Server(config).run(sockets=[sock])
    finally:
        sock.close()
