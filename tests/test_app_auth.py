"""``python -m captioners ui --auth``: HTTP basic auth in front of every route of the standalone app.

The real app runs in a subprocess on a free loopback port (uvicorn, the installed gradio); a second
part builds the same app in-process for FastAPI's TestClient. Either way: without the right
credentials every route answers 401, websockets included, and gradio's queue still works with them.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
from PIL import Image

from captioners.auth import BasicAuthMiddleware, check_bind, is_loopback, parse_auth
from captioners.errors import CaptionerError
from tests.app_logs import app_errors
from tests.webui_host import TINY, write_tiny_preset

ROOT = Path(__file__).resolve().parents[1]
USERS = {"alice": "secret", "bob": "pä:ss wörd"}  # a second login with a colon and non-ASCII characters
AUTH_ARG = ",".join(f"{user}:{password}" for user, password in USERS.items())
ALICE = ("alice", "secret")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# Authorization headers that must all be refused (None: no header at all).
BAD_AUTHORIZATION = {
    "none": None,
    "wrong password": basic("alice", "Secret"),
    "unknown user": basic("mallory", "secret"),
    "other user's password": basic("alice", USERS["bob"]),
    "empty": basic("", ""),
    "not base64": "Basic !!!not-base64!!!",
    "no colon": "Basic " + base64.b64encode(b"alicesecret").decode(),
    "bearer": "Bearer secret",
    "prefix of the password": basic("alice", "secre"),
}

# Every kind of route the app has under gradio 3.41, 4.40 and 6: the page, config, gradio's queue,
# API, files and uploads (under /gradio_api from gradio 5), and the REST API. Routes a gradio version
# lacks are listed anyway: the answer must be 401 before any routing happens.
ROUTES = [
    ("GET", "/"), ("HEAD", "/"), ("GET", "/config"), ("GET", "/info"), ("GET", "/theme.css"),
    ("GET", "/favicon.ico"), ("GET", "/robots.txt"), ("GET", "/startup-events"), ("GET", "/app_id"),
    ("GET", "/assets/index.js"), ("GET", "/static/img/logo.svg"), ("GET", "/user"), ("GET", "/token"),
    ("GET", "/login_check"), ("POST", "/login"), ("GET", "/openapi.json"), ("GET", "/docs"),
    # gradio 3: the queue is a websocket on /queue/join that posts each event to /api/predict
    ("GET", "/queue/join"), ("POST", "/api/predict"), ("POST", "/run/predict"), ("POST", "/reset"),
    ("GET", "/queue/status"), ("GET", "/file=/etc/hostname"), ("POST", "/upload"),
    # gradio 4: SSE queue
    ("POST", "/queue/join"), ("GET", "/queue/data?session_hash=x"), ("GET", "/heartbeat/x"),
    ("POST", "/cancel"), ("GET", "/file/x"), ("GET", "/stream/x/playlist.m3u8"), ("POST", "/component_server"),
    # gradio 5/6: the same under /gradio_api
    ("POST", "/gradio_api/queue/join"), ("GET", "/gradio_api/queue/data?session_hash=x"),
    ("GET", "/gradio_api/info"), ("GET", "/gradio_api/heartbeat/x"), ("POST", "/gradio_api/upload"),
    ("GET", "/gradio_api/file=/etc/hostname"), ("POST", "/gradio_api/run/predict"),
    ("POST", "/gradio_api/call/partial_6"), ("GET", "/gradio_api/startup-events"), ("GET", "/gradio_api/mcp/sse"),
    ("POST", "/gradio_api/cancel"), ("GET", "/gradio_api/upload_progress?upload_id=x"),
    # the REST API (--api)
    ("GET", "/captioners/v1/models"), ("POST", "/captioners/v1/caption"), ("POST", "/captioners/v1/batch"),
    ("POST", "/captioners/v1/interrupt"), ("POST", "/captioners/v1/unload"),
]


def gradio_major() -> int:
    from captioners.ui.compat import GRADIO_MAJOR

    return GRADIO_MAJOR


def real_gradio_routes() -> list[tuple[str, str]]:
    """The installed gradio's own queue / API / upload routes: with credentials they exist (not 401,
    not 404), which shows the 401s above are for routes that are really there."""
    if gradio_major() < 4:
        return [("GET", "/config"), ("GET", "/info"), ("POST", "/api/predict"), ("POST", "/run/predict"),
                ("POST", "/upload")]
    if gradio_major() < 5:
        return [("GET", "/config"), ("GET", "/info"), ("POST", "/queue/join"), ("GET", "/queue/data"),
                ("POST", "/upload")]
    return [("GET", "/config"), ("GET", "/gradio_api/info"), ("POST", "/gradio_api/queue/join"),
            ("GET", "/gradio_api/queue/data"), ("POST", "/gradio_api/upload")]


def b64_png(size: int = 32) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 80, 40)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ---- the real app in a subprocess -----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(port: int, method: str, path: str, authorization: str | None = None, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request (http.client: no redirects, no retries, no credentials of its own)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        all_headers = dict(headers or {})
        if authorization is not None:
            all_headers["Authorization"] = authorization
        if body is None and method == "POST":
            body, all_headers["Content-Type"] = b"{}", "application/json"
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@contextlib.contextmanager
def running_app(models_dir: Path, log_path: Path, *extra: str) -> Iterator[SimpleNamespace]:
    """``python -m captioners ui`` with the tiny model on a free loopback port, until the block ends.

    Waits for the first HTTP answer to ``GET /`` without credentials and records every status seen
    (``statuses``): with --auth the first answer the server ever gives must already be a 401.
    """
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "captioners", "ui", "--models-dir", str(models_dir), "--model", TINY,
             "--device", "cpu", "--port", str(port), *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    statuses: list[int] = []
    deadline = time.monotonic() + 180
    try:
        while not statuses:
            try:
                statuses.append(request(port, "GET", "/", timeout=5)[0])
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the app did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
        yield SimpleNamespace(port=port, url=f"http://127.0.0.1:{port}/", statuses=statuses, log_path=log_path,
                              process=process)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log_text = log_path.read_text()
    assert not app_errors(log_text), log_text[-3000:]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, icg_checkpoint, clip_overrides) -> Path:
    return write_tiny_preset(tmp_path_factory.mktemp("auth") / "models", icg_checkpoint.path, clip_overrides)


@pytest.fixture(scope="module")
def app(models_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("auth-app-log") / "app.log"
    with running_app(models_dir, log_path, "--auth", AUTH_ARG, "--api") as running:
        yield running
    assert "Captioners UI at http://127.0.0.1:" in log_path.read_text()


def test_the_first_answer_of_the_server_is_already_a_401(app):
    assert app.statuses == [401]


@pytest.mark.parametrize("method, path", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_every_route_refuses_missing_and_wrong_credentials(app, method, path):
    for case, authorization in BAD_AUTHORIZATION.items():
        status, headers, body = request(app.port, method, path, authorization)
        assert status == 401, (case, status, body[:200])
        assert headers["www-authenticate"].startswith('Basic realm="Captioners"'), case
        assert b"gradio" not in body.lower() and b"captioners" not in body.lower(), case  # nothing of the app


@pytest.mark.parametrize("method, path", real_gradio_routes())
def test_the_installed_gradios_routes_are_there_behind_the_auth(app, method, path):
    status, _, body = request(app.port, method, path, basic(*ALICE))
    assert status not in (401, 404), (status, body[:300])


def test_right_credentials_open_the_page_and_the_rest_api(app):
    for user, password in USERS.items():
        status, headers, page = request(app.port, "GET", "/", basic(user, password))
        assert status == 200 and headers["content-type"].startswith("text/html"), status
        assert b"Captioners" in page  # the page title
        status, _, models = request(app.port, "GET", "/captioners/v1/models", basic(user, password))
        assert status == 200
        assert TINY in [model["id"] for model in json.loads(models)["models"]]
    body = json.dumps({"image": b64_png(), "model": TINY}).encode()
    status, _, caption = request(app.port, "POST", "/captioners/v1/caption", basic(*ALICE), body=body,
                                 headers={"Content-Type": "application/json"}, timeout=120)
    assert status == 200, caption
    assert json.loads(caption)["model"] == TINY and json.loads(caption)["captions"][0]


def websocket_handshake(port: int, path: str, authorization: str | None = None) -> str:
    """The status line the server answers a websocket upgrade with (raw socket: no library needed)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
             f"Origin: http://127.0.0.1:{port}"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n")[0].decode()


@pytest.mark.parametrize("path", ["/queue/join", "/gradio_api/queue/join", "/captioners/v1/models"])
def test_websocket_handshakes_without_the_right_credentials_are_refused(app, path):
    for case in ("none", "wrong password", "bearer"):
        status_line = websocket_handshake(app.port, path, BAD_AUTHORIZATION[case])
        assert status_line.split()[1] == "401", (case, status_line)


def test_gradio_3s_queue_websocket_opens_with_credentials(app):
    if gradio_major() >= 4:
        pytest.skip("gradio 4 and later run the queue over HTTP (server-sent events), not a websocket")
    assert websocket_handshake(app.port, "/queue/join", basic(*ALICE)).split()[1] == "101"


def unload_button_event(config: dict) -> tuple[int, int]:
    """(fn index, button id) of the Models section's "Unload model" click: an event without inputs."""
    button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "captioners_unload")
    for index, dependency in enumerate(config["dependencies"]):
        targets = [t[0] if isinstance(t, (list, tuple)) else t for t in dependency["targets"]]
        if button in targets and dependency.get("trigger", "click") == "click":
            return dependency.get("id", index), button
    raise AssertionError("no click event on the Unload button")


def run_event_through_gradios_queue(port: int, authorization: str) -> list:
    """Run the Unload button's event the way the page does (gradio 3: websocket; later: SSE) and
    give its output data. Under gradio 3 the queue then posts the event to the app's own
    /api/predict and /reset, so this also proves those internal requests get through the auth."""
    status, _, raw = request(port, "GET", "/config", authorization)
    assert status == 200
    config = json.loads(raw)
    fn_index, button = unload_button_event(config)
    session = "captioners-auth-test"
    if gradio_major() < 4:
        from websockets.sync.client import connect

        with connect(f"ws://127.0.0.1:{port}/queue/join", additional_headers={"Authorization": authorization},
                     open_timeout=30) as ws:
            while True:
                message = json.loads(ws.recv(timeout=120))
                if message["msg"] == "send_hash":
                    ws.send(json.dumps({"fn_index": fn_index, "session_hash": session}))
                elif message["msg"] == "send_data":
                    ws.send(json.dumps({"data": [], "event_data": None, "fn_index": fn_index,
                                        "session_hash": session}))
                elif message["msg"] == "process_completed":
                    assert message["success"], message
                    return message["output"]["data"]
    prefix = config.get("api_prefix") or ""
    body = json.dumps({"data": [], "event_data": None, "fn_index": fn_index, "trigger_id": button,
                       "session_hash": session}).encode()
    status, _, raw = request(port, "POST", f"{prefix}/queue/join", authorization, body=body,
                             headers={"Content-Type": "application/json"})
    assert status == 200, raw
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("GET", f"{prefix}/queue/data?session_hash={session}",
                           headers={"Authorization": authorization})
        response = connection.getresponse()
        assert response.status == 200
        for line in response:
            if line.startswith(b"data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    assert message["success"], message
                    return message["output"]["data"]
    finally:
        connection.close()
    raise AssertionError("the event stream ended without process_completed")


def test_gradios_queue_runs_an_event_with_credentials(app):
    if gradio_major() < 4:
        pytest.importorskip("websockets.sync.client")
    output = run_event_through_gradios_queue(app.port, basic(*ALICE))
    assert output and output[0] in (f"Unloaded {TINY}.", "No model was loaded.")


# ---- the same app in-process (TestClient) ---------------------------------------------------------
@pytest.fixture()
def build(tiny_models_dir):
    """build(credentials, api) -> a TestClient on the standalone app (lifespan run: queue started)."""
    from fastapi.testclient import TestClient

    from captioners.app import build_app
    from captioners.service import CaptionService, Host, Settings

    settings = Settings(models_dir=tiny_models_dir, model=TINY, device="cpu")
    with contextlib.ExitStack() as stack:
        def make(credentials, api=True):
            asgi, _ = build_app(CaptionService(Host(lambda: settings)), credentials, api=api, port=free_port())
            return asgi, stack.enter_context(TestClient(asgi))
        yield make


def test_in_process_the_auth_wrapper_is_the_outermost_app(build):
    asgi, client = build(USERS)
    assert isinstance(asgi, BasicAuthMiddleware)  # what uvicorn serves: nothing is reached around it
    for method, path in ROUTES:
        response = client.request(method, path)
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"].startswith('Basic realm="Captioners"')
    assert client.get("/", auth=ALICE).status_code == 200
    assert client.get("/captioners/v1/models", auth=("bob", USERS["bob"])).status_code == 200
    assert client.get("/captioners/v1/models", auth=("bob", "secret")).status_code == 401


def test_in_process_websockets_without_credentials_are_refused(build):
    from starlette.websockets import WebSocketDisconnect

    try:
        from starlette.testclient import WebSocketDenialResponse  # starlette >= 0.37: the real 401
    except ImportError:
        WebSocketDenialResponse = None
    _, client = build(USERS)
    for path in ("/queue/join", "/gradio_api/queue/join"):
        for headers in ({}, {"Authorization": basic("alice", "wrong")}):
            with pytest.raises(WebSocketDisconnect) as refused:
                with client.websocket_connect(path, headers=headers):
                    pass
            if WebSocketDenialResponse is not None and isinstance(refused.value, WebSocketDenialResponse):
                assert refused.value.status_code == 401
            else:
                assert refused.value.code == 1008  # closed before the handshake was accepted


def test_without_auth_the_app_is_as_before(build):
    asgi, client = build(None)
    assert not isinstance(asgi, BasicAuthMiddleware)
    page = client.get("/")
    assert page.status_code == 200 and "Captioners" in page.text
    assert client.get("/captioners/v1/models").status_code == 200
    _, no_api = build(None, api=False)
    assert no_api.get("/captioners/v1/models").status_code == 404


def test_the_pages_css_is_served_with_and_without_auth(build):
    from captioners.app import STYLE

    rule = ".captioners-table { border-collapse: collapse;"
    assert rule in STYLE.read_text()
    for credentials in (USERS, None):
        _, client = build(credentials)
        config = client.get("/config", auth=ALICE).json()
        assert rule in (config.get("css") or "")


# ---- the middleware on its own --------------------------------------------------------------------
def call(middleware: BasicAuthMiddleware, scope_type: str, authorization: bytes | None,
         extensions: dict | None = None) -> list[dict]:
    import asyncio

    sent: list[dict] = []

    async def receive():
        return {"type": "websocket.connect"} if scope_type == "websocket" else {"type": "http.request"}

    async def send(message):
        sent.append(message)

    headers = [(b"host", b"x")] + ([(b"authorization", authorization)] if authorization is not None else [])
    scope = {"type": scope_type, "path": "/", "headers": headers, "extensions": extensions or {}}
    asyncio.run(middleware(scope, receive, send))
    return sent


def test_middleware_lets_only_known_logins_through_and_passes_lifespan():
    reached: list[str] = []

    async def inner(scope, receive, send):
        reached.append(scope["type"])

    middleware = BasicAuthMiddleware(inner, USERS)
    bob = base64.b64encode(f"bob:{USERS['bob']}".encode())
    assert call(middleware, "http", b"Basic " + bob) == [] and reached == ["http"]
    assert call(middleware, "http", b"basic  " + base64.b64encode(b"alice:secret")) == []  # scheme: any case
    assert call(middleware, "lifespan", None) == [] and reached[-1] == "lifespan"
    reached.clear()
    for authorization in (None, b"Basic", b"Basic " + base64.b64encode(b"alice:secret\n"), b"Digest x",
                          b"Basic " + base64.b64encode(b"alice:secret:")):
        start = call(middleware, "http", authorization)[0]
        assert start["status"] == 401 and dict(start["headers"])[b"www-authenticate"].startswith(b"Basic")
        assert call(middleware, "websocket", authorization) == [{"type": "websocket.close", "code": 1008}]
        denial = call(middleware, "websocket", authorization, {"websocket.http.response": {}})
        assert denial[0]["type"] == "websocket.http.response.start" and denial[0]["status"] == 401
    assert reached == []
    with pytest.raises(ValueError):
        BasicAuthMiddleware(inner, {})


def test_uvicorns_spurious_handshake_error_is_dropped_only_for_refused_websockets():
    import asyncio
    import logging

    from captioners.auth import DeniedHandshakeFilter

    async def inner(scope, receive, send):
        pass

    middleware = BasicAuthMiddleware(inner, USERS)
    line = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1,
                             "ASGI callable returned without completing handshake.", None, None)

    async def connection(authorization):  # one task per connection, as in uvicorn
        async def receive():
            return {"type": "websocket.connect"}

        async def send(message):
            pass

        headers = [(b"authorization", authorization)] if authorization else []
        await middleware({"type": "websocket", "headers": headers, "extensions": {}}, receive, send)
        return DeniedHandshakeFilter().filter(line)

    async def both():
        return await asyncio.gather(asyncio.create_task(connection(None)),
                                    asyncio.create_task(connection(basic(*ALICE).encode())))

    assert asyncio.run(both()) == [False, True]  # dropped for the refused one, kept for the other


# ---- the command line: flags, refusals, one-line errors -------------------------------------------
def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([sys.executable, "-m", "captioners", "ui", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_a_network_host_without_auth_is_refused_in_one_line(host, tmp_path):
    started = time.monotonic()
    result = run_cli("--host", host, "--port", str(free_port()), "--models-dir", str(tmp_path))
    assert result.returncode == 2, result
    assert result.stdout == ""  # no "Captioners UI at ...": no server
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "--auth user:password" in lines[0] and "--allow-unauthenticated" in lines[0] and host in lines[0]
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 50  # refused before gradio is even imported


@pytest.mark.parametrize("value, words", [
    ("alice", "no ':'"), (":secret", "empty user name"), ("alice:", "empty password"), (",", "no entry"),
    ("alice:secret,bob", "no ':'"),
])
def test_bad_auth_values_are_one_line_errors_without_the_password(value, words, tmp_path):
    for flag in ("--auth", "--api-auth"):
        result = run_cli(flag, value, "--port", str(free_port()), "--models-dir", str(tmp_path))
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --auth must be user:password"), result.stderr
        assert words in lines[0] and "secret" not in lines[0] and result.stdout == ""


def test_a_busy_port_is_a_one_line_error(models_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("--auth", "alice:secret", "--port", str(port), "--models-dir", str(models_dir),
                         "--model", TINY, "--device", "cpu", timeout=180)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: Cannot listen on 127.0.0.1:{port}") and "--port" in lines[-1]
    assert "Traceback" not in result.stderr


def test_flags_auth_is_the_primary_spelling_and_api_auth_still_works():
    from captioners.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["ui", "--auth", "a:b"]).auth == "a:b"
    assert parser.parse_args(["ui", "--api-auth", "a:b"]).auth == "a:b"
    args = parser.parse_args(["ui"])
    assert args.auth is None and args.allow_unauthenticated is False and args.host == "127.0.0.1"
    assert parser.parse_args(["ui", "--allow-unauthenticated"]).allow_unauthenticated is True
    ui = next(action for action in parser._subparsers._group_actions[0].choices["ui"]._actions
              if "--auth" in action.option_strings)
    assert ui.option_strings[0] == "--auth" and "whole app" in ui.help


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("localhost", True), ("LOCALHOST", True), ("::1", True),
    ("[::1]", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False), ("", False),
    ("192.168.1.20", False), ("10.0.0.1", False), ("fe80::1", False), ("myhost", False),
    ("localhost.example.com", False), ("128.0.0.1", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_check_bind():
    check_bind("127.0.0.1", {}, False)
    check_bind("localhost", {}, False)
    for host in ("0.0.0.0", "::", "myhost"):
        with pytest.raises(CaptionerError, match="--allow-unauthenticated"):
            check_bind(host, {}, False)
        check_bind(host, {"alice": "secret"}, False)  # with auth: allowed
        check_bind(host, {}, True)  # knowingly open: allowed (cmd_ui then logs a warning and serves)


def test_parse_auth():
    assert parse_auth(None) == {}
    assert parse_auth("alice:secret") == {"alice": "secret"}
    assert parse_auth(AUTH_ARG) == USERS
    for value in ("", "alice", ":x", "alice:", "a:b,c"):
        with pytest.raises(CaptionerError, match="--auth must be"):
            parse_auth(value)


def test_display_and_self_urls():
    from captioners.app import display_url, self_url

    assert display_url("127.0.0.1", 7862) == "http://127.0.0.1:7862/"
    assert display_url("0.0.0.0", 7862) == "http://localhost:7862/"
    assert display_url("::1", 80) == "http://[::1]:80/"
    assert self_url("0.0.0.0", 7862, USERS) == "http://alice:secret@127.0.0.1:7862/"
    assert self_url("localhost", 7862, USERS) == "http://alice:secret@127.0.0.1:7862/"
    assert self_url("192.168.1.20", 7862, USERS) == "http://alice:secret@192.168.1.20:7862/"
    assert self_url("::", 1, {"a@b": "p:/?"}) == "http://a%40b:p%3A%2F%3F@[::1]:1/"


def test_a_stop_with_a_page_still_connected_is_no_error():
    """uvicorn cancels connections still open after its graceful timeout and logs them as errors."""
    import asyncio
    import logging as logging_module

    from captioners.app import StopWithOpenPages

    def record(message, exc=None):
        return logging_module.LogRecord("uvicorn.error", logging_module.ERROR, __file__, 1, message, (),
                                        (type(exc), exc, None) if exc else None)

    keep = StopWithOpenPages()
    cancelled = asyncio.CancelledError("Task cancelled, timeout graceful shutdown exceeded")
    assert not keep.filter(record("Exception in ASGI application\n", cancelled))
    notice = record("Cancel %s running task(s), timeout graceful shutdown exceeded")
    notice.args = (2,)
    assert keep.filter(notice) and notice.levelname == "INFO" and "still open" in notice.getMessage()
    assert keep.filter(record("Exception in ASGI application\n", ValueError("a real bug")))
