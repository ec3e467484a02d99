"""The HTTP side of the endpoint: the standard library's threading HTTP server on 127.0.0.1, routing each request to
a session.

    server = EndpointServer()                     # a free port on 127.0.0.1 (port=0), served from a daemon thread
    base_url = server.open(handle)                # http://127.0.0.1:PORT/s/KEY/v1, or /v1 for key=""
    # POST {base_url}/chat/completions -> handle(ChatRequest) -> the response object
    # GET  {base_url}/models
    server.close_session(key); server.shutdown()

Sessions let one server serve many episodes at once: each training episode's agent gets its own base URL, so its
calls reach its own environment. The server listens on the loopback interface only, never on a public address.
Errors are OpenAI's error objects (`{"error": {"message", "type", "param", "code"}}`) with a 4xx status for a
request the endpoint cannot serve (so the `openai` client does not retry it) and 500 for anything else.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from posttrain.agents.openai_format import ChatRequest, RequestError, models_response, parse_request
from posttrain.agents.turns import MODEL_NAME
from posttrain.errors import PosttrainError

HOST = "127.0.0.1"
MAX_BODY_BYTES = 32 * 1024 * 1024
"""The largest request body read; a longer one is refused (413)."""

Handle = Callable[[ChatRequest], dict[str, Any]]


class EndpointServer:
    """An OpenAI-compatible chat-completions server routing requests to sessions (see the module docstring)."""

    def __init__(self, port: int = 0, *, model_name: str = MODEL_NAME) -> None:
        self.sessions: dict[str, Handle] = {}
        self.model_name = model_name
        self.lock = threading.Lock()
        try:
            self.httpd = ThreadingHTTPServer((HOST, port), _handler_class(self))
        except OSError as err:
            raise PosttrainError(f"serve: cannot listen on {HOST}:{port}: {err.strerror or err}; choose another "
                                 "--port (0: a free one)") from err  # fmt: skip
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="posttrain-endpoint", daemon=True)
        self.thread.start()

    def url(self, key: str = "") -> str:
        return f"http://{HOST}:{self.port}" + (f"/s/{key}" if key else "") + "/v1"

    def open(self, handle: Handle, key: str | None = None) -> tuple[str, str]:
        """Route a new session's requests to `handle`; returns (key, base URL). key None: a fresh random one."""
        key = secrets.token_hex(8) if key is None else key
        with self.lock:
            if key in self.sessions:
                raise ValueError(f"endpoint session {key!r} is already open")
            self.sessions[key] = handle
        return key, self.url(key)

    def close_session(self, key: str) -> None:
        with self.lock:
            self.sessions.pop(key, None)

    def handle_for(self, key: str) -> Handle | None:
        with self.lock:
            return self.sessions.get(key)

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def route(path: str) -> tuple[str, str] | None:
    """`/v1/x` -> ("", "x"); `/s/KEY/v1/x` -> (KEY, "x"); anything else None."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    if len(parts) >= 2 and parts[0] == "v1":
        return "", "/".join(parts[1:])
    if len(parts) >= 4 and parts[0] == "s" and parts[2] == "v1":
        return parts[1], "/".join(parts[3:])
    return None


def error_body(message: str, status: int) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _handler_class(server: EndpointServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # a connection per request: no idle keep-alive threads left behind

        def log_message(self, format: str, *args: Any) -> None:  # requests are not logged to stderr
            pass

        def do_GET(self) -> None:
            target = route(self.path)
            if target is None or target[1] != "models" or server.handle_for(target[0]) is None:
                self.reply(404, error_body(f"no such endpoint: GET {self.path}", 404))
                return
            self.reply(200, models_response(server.model_name))

        def do_POST(self) -> None:
            target = route(self.path)
            handle = None if target is None or target[1] != "chat/completions" else server.handle_for(target[0])
            if handle is None:
                self.drain()
                self.reply(404, error_body(f"no such endpoint: POST {self.path} (a closed session, or not "
                                           "/v1/chat/completions)", 404))  # fmt: skip
                return
            try:
                request = parse_request(self.read_json())
                status, body = 200, handle(request)
            except RequestError as error:
                status, body = error.status, error_body(str(error), error.status)
            except Exception as error:  # the server answers; the failure is the episode's or the caller's
                status, body = 500, error_body(f"{type(error).__name__}: {error}", 500)
            self.reply(status, body)

        def read_json(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise RequestError(f"the request body has {length} bytes; at most {MAX_BODY_BYTES}", status=413)
            raw = self.rfile.read(length)
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RequestError(f"the request body is not JSON: {err}") from None

        def drain(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if 0 < length <= MAX_BODY_BYTES:
                self.rfile.read(length)

        def reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


_SHARED: EndpointServer | None = None
_SHARED_LOCK = threading.Lock()


def shared_server() -> EndpointServer:
    """The process's one server for training episodes, started on first use."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = EndpointServer()
        return _SHARED
