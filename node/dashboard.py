"""The live dashboard (`--web 127.0.0.1:PORT`): a page, its JSON, and two actions.

Rules:
- Loopback only. The bind address must be a loopback one (checked when the
  address is parsed and again once bound), and every request must name a
  loopback Host: a web page elsewhere that points a DNS name at 127.0.0.1
  (DNS rebinding) gets 403, so it can neither read nor act.
- Reading is free, acting needs the token. GETs change nothing; the two POSTs
  (`/api/pull`, `/api/remove`) need `Authorization: Bearer TOKEN`, the token
  printed at start (`dashboard http://127.0.0.1:PORT/#token=…`: the page takes
  it from the URL fragment, which browsers never send), compared in constant
  time. Without it: 401, and nothing changes.
- It runs in the node's own trio run (hypercorn's trio worker, in a nursery
  this service owns), so a request reads the node's state directly on the trio
  thread, between two awaits: no locks, no copies across threads.
- Memory is bounded: at most MAX_CLIENTS live streams, request bodies of at
  most MAX_BODY bytes, snapshots bounded by dashboard_state.py, and one
  snapshot built per SNAPSHOT_EVERY seconds whatever the number of pages open.

Routes: `/` (the page, node/web/), `/api/state` (one snapshot), `/api/events`
(Server-Sent Events: a snapshot a second), `POST /api/pull {"cid"}` (pull a
model into this node), `POST /api/remove {"cid"}` (delete a held model's
folder from the data dir).
"""

from __future__ import annotations

import hmac
import importlib.resources
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from fragmenter.progress import human_bytes
from protocol import is_cid

from .addresses import is_loopback
from .dashboard_state import Caches, PullState, RateHistory, build, collect, totals
from .errors import NodeError, first_leaf

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

MAX_CLIENTS = 8  # live event streams at once; beyond, 503
MAX_BODY = 4096  # bytes of a POST body
MAX_PULLS = 4  # pulls started from the dashboard running at once
MAX_PULLS_SHOWN = 16
SNAPSHOT_EVERY = 1.0  # seconds between two snapshots on an event stream
SEND_TIMEOUT = 30.0  # a page that takes no bytes this long loses its stream
PULL_FIND_TIMEOUT = 30.0
STATIC = {  # path -> (file in node/web, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# ---- addresses ----------------------------------------------------------------


def host_allowed(value: str) -> bool:
    """Whether a Host header names this machine's loopback: `localhost`, a
    loopback IP, `[::1]`, each with or without a port."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        host, rest = (value[1:end], value[end + 1 :]) if end > 0 else ("", "")
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return False
    else:
        host, sep, port = value.partition(":")
        if sep and not port.isdigit():
            return False
    return bool(host) and is_loopback(host)


def origin_allowed(value: str) -> bool:
    """A browser's Origin header (POSTs): absent, or a loopback http origin."""
    scheme, sep, rest = value.partition("://")
    return bool(sep) and scheme == "http" and host_allowed(rest)


# ---- the app ----------------------------------------------------------------------


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DashboardApp:
    """The ASGI application: one per node."""

    def __init__(self, node: Node, token: str, max_clients: int = MAX_CLIENTS) -> None:
        self.node = node
        self.token = token
        self.max_clients = max_clients
        self.clients = 0
        self.history = RateHistory()
        self.caches = Caches()
        self.pulls: dict[str, PullState] = {}
        self.started = trio.current_time()
        self.nursery: trio.Nursery | None = None  # set by serve_dashboard: pulls run in it
        self._snapshot: tuple[float, bytes] | None = None
        web = importlib.resources.files("node") / "web"
        self.static = {path: ((web / name).read_bytes(), kind) for path, (name, kind) in STATIC.items()}

    # ---- snapshots

    def snapshot(self) -> bytes:
        """The current snapshot as JSON, built at most once per SNAPSHOT_EVERY/2."""
        now = trio.current_time()
        if self._snapshot is not None and now - self._snapshot[0] < SNAPSHOT_EVERY / 2:
            return self._snapshot[1]
        state = collect(self.node, now, time.time(), self.history, list(self.pulls.values()), self.caches, self.started)
        data = json.dumps(build(state), separators=(",", ":")).encode()
        self._snapshot = (now, data)
        return data

    async def sample_rates(self) -> None:
        while True:
            now = trio.current_time()
            self.history.sample(now, *totals(self.node, now))
            await trio.sleep(1.0)

    # ---- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        headers = _headers(scope)
        try:
            host = headers.get("host") or headers.get(":authority") or ""
            if not host_allowed(host):
                raise HttpError(403, "forbidden: the dashboard answers only to a loopback Host (127.0.0.1, localhost)")
            await self._route(scope, headers, receive, send)
        except HttpError as e:
            await _json(send, e.status, {"error": str(e)})

    async def _route(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if method in ("GET", "HEAD"):
            if path in self.static:
                body, kind = self.static[path]
                extra = [(b"content-security-policy", CSP.encode())] if kind.startswith("text/html") else []
                await _respond(send, 200, body, kind, extra, head=method == "HEAD")
            elif path == "/api/state":
                await _respond(send, 200, self.snapshot(), "application/json", head=method == "HEAD")
            elif path == "/api/events":
                await self._events(receive, send)
            elif path in ("/api/pull", "/api/remove"):
                raise HttpError(405, "use POST")
            else:
                raise HttpError(404, "not found")
            return
        if method != "POST":
            raise HttpError(405, "method not allowed")
        if path not in ("/api/pull", "/api/remove"):
            raise HttpError(404, "not found")
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin):
            raise HttpError(403, "forbidden: request from another origin")
        if not self._authorized(headers.get("authorization", "")):
            raise HttpError(401, "the dashboard's token is needed (Authorization: Bearer TOKEN, printed at start)")
        cid = _cid_of(await _read_body(receive))
        if path == "/api/pull":
            await _json(send, 202, self.start_pull(cid))
        else:
            await _json(send, 200, await self.remove(cid))

    def _authorized(self, value: str) -> bool:
        expected = f"Bearer {self.token}".encode()
        return hmac.compare_digest(value.encode("latin-1", "replace"), expected)

    async def _events(self, receive: Receive, send: Send) -> None:
        if self.clients >= self.max_clients:
            raise HttpError(503, f"too many live pages open (at most {self.max_clients}); close one")
        self.clients += 1
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream"),
                        (b"cache-control", b"no-store"),
                        (b"x-content-type-options", b"nosniff"),
                    ],
                }
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
                with trio.fail_after(SEND_TIMEOUT):
                    await send({"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True})
                while True:
                    with trio.fail_after(SEND_TIMEOUT):
                        body = b"data: " + self.snapshot() + b"\n\n"
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                    await trio.sleep(SNAPSHOT_EVERY)
        except trio.TooSlowError:
            log.info("dashboard: a page stopped reading its event stream; closed it")
        finally:
            self.clients -= 1

    # ---- actions

    def start_pull(self, cid: str) -> dict[str, Any]:
        current = self.pulls.get(cid)
        if current is not None and current.state == "running":
            raise HttpError(409, f"a pull of {cid} is already running")
        if sum(1 for p in self.pulls.values() if p.state == "running") >= MAX_PULLS:
            raise HttpError(429, f"{MAX_PULLS} pulls are running already; wait for one to end")
        assert self.nursery is not None
        self.pulls.pop(cid, None)
        self.pulls[cid] = PullState(cid, "running")
        finished = [c for c, p in self.pulls.items() if p.state != "running"]  # oldest first
        for old in finished[: max(0, len(self.pulls) - MAX_PULLS_SHOWN)]:
            del self.pulls[old]
        self.nursery.start_soon(self._pull, cid)
        return {"cid": cid, "state": "running"}

    async def _pull(self, cid: str) -> None:
        from .pull import PullOptions, pull_model  # not at the top: pull.py imports node.py, which imports us

        events = self.node.events
        events.add("pull", f"pull of {cid} started from the dashboard", model=cid)
        options = PullOptions(find_timeout=PULL_FIND_TIMEOUT, stall_timeout=self.node.config.pull_stall_timeout)
        try:
            model, stats = await pull_model(self.node, cid, options)
        except NodeError as e:
            self.pulls[cid] = PullState(cid, "failed", str(e))
            events.add("pull_failed", f"pull of {cid} failed: {e}", model=cid)
        except Exception as e:  # a bug of ours must not take the node down through a button
            log.exception("dashboard pull of %s failed", cid)
            self.pulls[cid] = PullState(cid, "failed", f"internal error: {e!r}")
            events.add("pull_failed", f"pull of {cid} failed (internal error: {e!r})", model=cid)
        else:
            peers = len(stats.bytes_by_peer)
            text = f"{human_bytes(stats.bytes_fetched)} in {stats.seconds:.1f} s from {peers} peer(s)"
            self.pulls[cid] = PullState(cid, "done", text)
            events.add("pulled", f"pulled {model.name} ({cid}): {text}", model=cid)

    async def remove(self, cid: str) -> dict[str, Any]:
        """Stop serving a held model and delete its folder (a folder of the data dir only)."""
        node = self.node
        model = node.store.models.get(cid)
        if model is None:
            raise HttpError(404, f"model {cid} is not held here")
        swarm = node.swarms.get(cid)
        pulling = swarm is not None and swarm.picker is not None and not swarm.complete.is_set()
        if pulling or (cid in self.pulls and self.pulls[cid].state == "running"):
            raise HttpError(409, f"model {cid} is being pulled; remove it once the pull ends")
        try:
            node.store.forget_model(cid)  # from here on nothing serves it
        except ValueError as e:
            raise HttpError(403, str(e)) from None
        if swarm is not None:
            del node.swarms[cid]
            swarm.stop()
            with trio.move_on_after(10):
                await swarm.closed.wait()  # its partial files closed before the folder goes
        try:
            await trio.to_thread.run_sync(node.store.delete_model_folder, model)
        except (OSError, ValueError) as e:
            node.events.add("removed", f"{model.name} ({cid}) is no longer served, but deleting it failed: {e}")
            raise HttpError(500, f"model {cid} is no longer served, but deleting {model.folder} failed: {e}") from None
        node.events.add("removed", f"removed {model.name} ({cid}): {model.folder} deleted", model=cid)
        return {"cid": cid, "removed": str(model.folder)}


# ---- serving --------------------------------------------------------------------


@asynccontextmanager
async def serve_dashboard(node: Node, host: str, port: int) -> AsyncIterator[str]:
    """Serve the dashboard on host:port (loopback) while the block runs; yields
    its URL with the token in the fragment. The port is released on the way out."""
    if not is_loopback(host):
        raise NodeError(f"the dashboard is served on loopback only, not on {host}")
    # Here, not at the top: hypercorn takes ~0.1 s to import, and a node
    # without a dashboard (every pull) need not pay it.
    from hypercorn.config import Config
    from hypercorn.trio import serve

    app = DashboardApp(node, secrets.token_urlsafe(24))
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.errorlog = logging.getLogger("node.dashboard.http")  # the node's logging decides what shows
    config.accesslog = None
    config.include_server_header = False
    config.graceful_timeout = 1.0
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        app.nursery = nursery
        try:
            binds: list[str] = await nursery.start(partial(serve, app, config))
        except BaseException as e:
            error = first_leaf(e, (OSError,))  # a port taken, say
            if not isinstance(error, OSError):
                raise
            raise NodeError(f"cannot serve the dashboard on {host}:{port}: {error.strerror or error}") from None
        url = binds[0]
        bound = url.removeprefix("http://").rsplit(":", 1)[0].strip("[]")
        if not is_loopback(bound):  # never: the address was checked; but this is the promise the page rests on
            nursery.cancel_scope.cancel()
            raise NodeError(f"the dashboard was bound to {bound}, not loopback; stopped it")
        nursery.start_soon(app.sample_rates)
        try:
            yield f"{url}/#token={app.token}"
        except BaseException as e:  # the caller's: raised as it is, not wrapped in this nursery's group
            body_error = e
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


# ---- helpers ----------------------------------------------------------------------


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _until_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HttpError(400, "the request ended early")
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            raise HttpError(413, f"request body over {MAX_BODY} bytes")
        if not message.get("more_body", False):
            return body


def _cid_of(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        raise HttpError(400, 'expected a JSON body {"cid": MODEL_CID}') from None
    cid = doc.get("cid") if isinstance(doc, dict) else None
    if not isinstance(cid, str) or not is_cid(cid):
        raise HttpError(400, "not a model CID (CIDv1 raw sha2-256, bafk...)")
    return cid


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra: list[tuple[bytes, bytes]] | None = None,
    head: bool = False,
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _json(send: Send, status: int, doc: dict[str, Any]) -> None:
    await _respond(send, status, json.dumps(doc).encode(), "application/json")
