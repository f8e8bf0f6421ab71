"""What stands between the network and the model: response headers that keep the page inert
in a browser, the request-size limit, a check that a browser POST comes from the page itself,
and optional API keys (stored as hashes only)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path

from covidxray.errors import UserError
from covidxray.fileutil import atomic_path

# the page loads nothing from anywhere else, runs no inline script, and cannot be framed
SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'self'; img-src 'self' data:; "
                                b"script-src 'self'; style-src 'self'; object-src 'none'; "
                                b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
}
API_KEY_HEADER = "x-api-key"


class SecurityHeaders:
    """ASGI middleware: the headers above on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (name, value) for name, value in SECURITY_HEADERS.items()
                    if name not in present]
            await send(message)

        await self.app(scope, receive, with_headers)


class RequestSizeLimit:
    """ASGI middleware: answer 413 to a request body over ``max_bytes``, declared or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _json(send, 413, f"request body over the limit of {self.max_bytes} "
                                          f"bytes")
        received = 0
        state = {"started": False, "rejected": False}

        async def limited_receive():
            nonlocal received
            if state["rejected"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not state["started"]:
                    # answer now; the app sees the client gone and its answer is dropped
                    state["rejected"] = True
                    await _json(send, 413, f"request body over the limit of {self.max_bytes} "
                                           f"bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["rejected"]:
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["rejected"]:
                raise


class SameOriginPost:
    """ASGI middleware: a POST a browser sends from another site (a form or a script on a page
    the user happens to visit) is refused with 403; tools that send no ``Origin`` (curl, Python)
    and the allowed cross-origin sites pass."""

    def __init__(self, app, allowed_origins: tuple[str, ...] = ()):
        self.app = app
        self.allowed = {origin.rstrip("/").lower() for origin in allowed_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope.get("headers") or []}
            origin = headers.get("origin")
            own = {f"http://{headers.get('host', '')}".lower(),
                   f"https://{headers.get('host', '')}".lower()}
            cross_site = headers.get("sec-fetch-site") == "cross-site"
            if (origin and origin.lower() not in own | self.allowed) or \
                    (cross_site and not (origin and origin.lower() in self.allowed)):
                return await _json(send, 403, "cross-site request refused")
        await self.app(scope, receive, send)


async def _json(send, status: int, detail: str) -> None:
    import json
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            *SECURITY_HEADERS.items()]})
    await send({"type": "http.response.body", "body": body})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class APIKeys:
    """Keys from a file of ``id:sha256`` lines (the keys themselves are never stored)."""

    def __init__(self, hashes: dict[str, str]):
        self.hashes = hashes  # sha256 -> key id

    @classmethod
    def load(cls, path: str | Path) -> "APIKeys":
        hashes = {}
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key_id, _, digest = line.rpartition(":")
            if not key_id or len(digest) != 64:
                raise UserError(f"{path}:{number}: expected 'id:sha256-of-the-key'")
            hashes[digest.lower()] = key_id
        if not hashes:
            raise UserError(f"{path}: no API keys")
        return cls(hashes)

    def identify(self, key: str | None) -> str | None:
        """The id of a valid key, else None (compared in constant time)."""
        if not key:
            return None
        digest = hash_key(key)
        for known, key_id in self.hashes.items():
            if hmac.compare_digest(known, digest):
                return key_id
        return None


class FailedKeyThrottle:
    """Wrong API keys, counted per client address: after ``allowed`` of them each further one
    locks the address out for twice as long as the one before (``base`` seconds first, at most
    ``longest``), answered 429 with Retry-After; a right key clears the count. Guessing keys
    then takes forever, a mistyped key costs a second. At most ``clients`` addresses are
    remembered (the longest quiet go first)."""

    def __init__(self, allowed: int = 5, base: float = 1.0, longest: float = 300.0,
                 clients: int = 10_000, clock=time.monotonic):
        self.allowed, self.base, self.longest, self.clients = allowed, base, longest, clients
        self.clock = clock
        self._state: OrderedDict[str, tuple[int, float]] = OrderedDict()  # failures, until
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        """Seconds ``client`` must wait before its next key is looked at (0: none)."""
        with self._lock:
            _, until = self._state.get(client, (0, 0.0))
        return max(0.0, until - self.clock())

    def failed(self, client: str) -> None:
        with self._lock:
            failures = self._state.pop(client, (0, 0.0))[0] + 1
            over = failures - self.allowed
            until = self.clock() + min(self.longest, self.base * 2 ** (over - 1)) \
                if over > 0 else 0.0
            self._state[client] = (failures, until)
            while len(self._state) > self.clients:
                self._state.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._state.pop(client, None)


def new_api_key(path: str | Path, key_id: str) -> str:
    """A new random key, its hash appended to ``path`` under ``key_id``; returns the key (shown
    once: only its hash is kept)."""
    if ":" in key_id or not key_id.strip():
        raise UserError("a key id must be a non-empty name without ':'")
    key = secrets.token_urlsafe(32)
    path = Path(path)
    existing = path.read_text() if path.is_file() else "# covidxray API keys: id:sha256\n"
    with atomic_path(path) as tmp:
        tmp.write_text(existing + f"{key_id}:{hash_key(key)}\n")
        tmp.chmod(0o600)
    return key
