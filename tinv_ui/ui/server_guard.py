"""`ServerGuard`: an ASGI middleware in front of the Gradio app that refuses requests no page of ours sends.

- **Host check (DNS rebinding).** A web page on another site can make its own name resolve to 127.0.0.1; the
  browser then sends that page's requests to this server with `Host: evil.example`. When the app is bound to
  loopback, only the loopback names (`127.0.0.1`, `localhost`, `[::1]`, with or without the port) are
  accepted; anything else gets 403. With `--host`/`--share` the app is meant to be reached by other names,
  so the Host is not checked (app.py warns and recommends `--auth`).
- **Origin check (cross-site requests).** A request that changes something (any method but GET, HEAD and
  OPTIONS) carrying an `Origin` from another site gets 403: browsers send `Origin` with such requests, so
  a foreign page cannot start training or write files through a visitor's browser. Scripts without an
  `Origin` (gradio_client, curl) are unaffected.
- **Login throttling (`--auth`).** After `FREE_LOGIN_TRIES` wrong passwords from one client address, that
  address must wait 1 s, then 2, 4, ... up to `MAX_LOCKOUT_SECONDS` between tries (429 with Retry-After);
  a right password resets the count.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_PATHS = frozenset({"/login", "/login/"})
FREE_LOGIN_TRIES = 5
MAX_LOCKOUT_SECONDS = 300.0
MAX_TRACKED_CLIENTS = 10_000


def split_host(value: str) -> tuple[str, int | None]:
    """`'LocalHost:7860'` → `('localhost', 7860)`, `'[::1]'` → `('[::1]', None)`; a bad port gives -1."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value.partition("]")
        if rest and not rest.startswith(":"):
            return value, -1
        name, port = name + "]", rest[1:]
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:
        name, port = value, ""
    if not port:
        return name, None
    return name, int(port) if port.isdigit() else -1


class LoginThrottle:
    """Wrong-password counts and lockouts per client address (thread-safe; the ASGI loop is one thread anyway)."""

    @dataclass
    class _Client:
        failures: int = 0
        locked_until: float = 0.0

    def __init__(self, free_tries: int = FREE_LOGIN_TRIES, max_lockout: float = MAX_LOCKOUT_SECONDS) -> None:
        self.free_tries = free_tries
        self.max_lockout = max_lockout
        self._clients: dict[str, LoginThrottle._Client] = {}
        self._lock = threading.Lock()

    def wait_left(self, client: str) -> float:
        """Seconds this client must still wait before its next try (0 when it may try now)."""
        with self._lock:
            state = self._clients.get(client)
            return max(0.0, state.locked_until - time.monotonic()) if state else 0.0

    def failed(self, client: str) -> None:
        with self._lock:
            if len(self._clients) >= MAX_TRACKED_CLIENTS and client not in self._clients:
                now = time.monotonic()
                self._clients = {k: v for k, v in self._clients.items() if v.locked_until > now}
            state = self._clients.setdefault(client, self._Client())
            state.failures += 1
            extra = state.failures - self.free_tries
            if extra >= 0:
                state.locked_until = time.monotonic() + min(2.0 ** extra, self.max_lockout)
                log.warning("%d wrong logins from %s; its next try must wait %.0f s", state.failures, client,
                            min(2.0 ** extra, self.max_lockout))

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)


class ServerGuard:
    """The ASGI middleware (see the module docstring). `check_host` is on when the app is bound to loopback."""

    def __init__(self, app, *, check_host: bool, port: int | None = None, throttle: LoginThrottle | None = None) -> None:
        self.app = app
        self.check_host = check_host
        self.port = port
        self.throttle = throttle or LoginThrottle()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.check_host and not self._loopback_host(host):
            await _refuse(scope, receive, send, 403, f"Host {host!r} is not accepted: this app answers only to "
                          "127.0.0.1, localhost and [::1] (start it with --host to serve other names).")
            return
        method = scope.get("method", "GET").upper()
        origin = headers.get("origin")
        if origin is not None and (scope["type"] == "websocket" or method not in SAFE_METHODS) \
                and not self._same_site(origin, host):
            await _refuse(scope, receive, send, 403, f"Requests from the page {origin!r} are not accepted; "
                          "open the app itself at its own address.")
            return
        if scope["type"] == "http" and method == "POST" and scope.get("path", "") in LOGIN_PATHS:
            await self._login(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _loopback_host(self, host: str) -> bool:
        name, port = split_host(host)
        return name in LOOPBACK_HOSTS and port != -1 and (port is None or self.port is None or port == self.port)

    def _same_site(self, origin: str, host: str) -> bool:
        """The page that sent the request is this app (same host and port), or a loopback page when bound to loopback."""
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (sandboxed frames, file://) and other schemes
        if parts.netloc.lower() == host.strip().lower():
            return True
        return self.check_host and self._loopback_host(parts.netloc)

    async def _login(self, scope, receive, send) -> None:
        client = (scope.get("client") or ("?", 0))[0]
        wait = self.throttle.wait_left(client)
        if wait > 0:
            seconds = math.ceil(wait)
            await _refuse(scope, receive, send, 429, f"Too many wrong logins: wait {seconds} s, then try again.",
                          [(b"retry-after", str(seconds).encode())])
            return
        status = 0

        async def watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status == 200:
            self.throttle.succeeded(client)
        elif 400 <= status < 500:
            self.throttle.failed(client)


async def _refuse(scope, receive, send, status: int, detail: str, extra_headers: list | None = None) -> None:
    """Answer `status` with `{"detail": ...}` (an HTTP response, or a closed websocket)."""
    log.warning("refused %s %s: %s", scope.get("method", "WS"), scope.get("path", ""), detail)
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})
