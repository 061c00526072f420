"""A local endpoint that speaks enough of the Hugging Face Hub HTTP API for
``huggingface_hub`` (``snapshot_download``, ``hf_hub_download``, ``HfApi.model_info``,
``HfApi.list_repo_tree``; uploads, commits, tags and branches through
:mod:`gantry.localhub.upload`) to work unmodified against it through ``HF_ENDPOINT``.

Read routes (model repositories only)::

    GET       /api/models/{ns}/{name}[/revision/{rev}]     model info (?blobs=true: sizes, LFS)
    GET       /api/models/{ns}/{name}/tree/{rev}[/{path}]  tree (?recursive=true, ?expand=true)
    GET       /api/models/{ns}/{name}/refs                 branches and tags
    HEAD, GET /{ns}/{name}/resolve/{rev}/{path}            file content (Range supported)
    GET, DELETE          /_gantry/stats                    request counts by kind / reset them
    GET, POST, DELETE    /_gantry/faults                   fault injection rules

Errors carry the ``X-Error-Code`` header the client maps to its exceptions (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``). No Xet headers are ever sent, so the
client downloads over plain HTTP. Repository file paths are only ever looked up in a
commit's tree and blobs are read by their sha256, so no request path reaches the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import anyio
import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gantry.errors import (
    RepoNotFoundError,
    RevisionNotFoundError,
    ServiceError,
    UnsafePathError,
)
from gantry.localhub.httputil import bearer as _bearer
from gantry.localhub.httputil import error as _error
from gantry.localhub.httputil import segments as _segments
from gantry.localhub.store import (
    Commit,
    HubStore,
    RepoFlags,
    TreeEntry,
    check_repo_id,
    check_repo_path,
)
from gantry.localhub.upload import Uploads

log = logging.getLogger(__name__)

Kind = Literal["api", "download", "control", "other"]
_CHUNK = 1024 * 1024
_TRUE = {"1", "true", "True"}
#: Fault modes that act on a response body, so only on GET.
_BODY_FAULTS = frozenset({"truncate", "short", "corrupt"})


# --- faults and statistics -------------------------------------------------------------


class FaultRule(BaseModel):
    """Make the next ``count`` matching requests fail in one way.

    ``status`` answers ``status``; ``reset`` closes the connection before any byte is sent;
    ``stall`` waits ``stall_s`` seconds before answering normally (clients time out);
    ``truncate`` (GET only) sends the headers and half the body, then closes cleanly;
    ``short`` (GET only) answers half the body as if it were all of it (Content-Length
    halved, the connection kept), a file cut short by a broken proxy or cache;
    ``corrupt`` (GET only) sends the whole body with one byte in its middle flipped.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["status", "reset", "stall", "truncate", "short", "corrupt"]
    status: int = Field(default=503, ge=400, le=599)
    count: int = Field(default=1, ge=1, le=100_000)
    path_contains: str = ""
    method: str | None = None
    stall_s: float = Field(default=30.0, gt=0, le=600)

    def matches(self, method: str, path: str) -> bool:
        if self.mode in _BODY_FAULTS and method != "GET":
            return False
        return (self.method is None or self.method.upper() == method) and (
            self.path_contains in path
        )


class HubState:
    """Counters, pending faults and the request log of one app."""

    def __init__(self, request_log: Path | None) -> None:
        self.request_log = request_log
        self.faults: list[FaultRule] = []
        self.requests: Counter[str] = Counter()
        self.download_methods: Counter[str] = Counter()
        self.download_bytes = 0
        self._lock = threading.Lock()

    def add_fault(self, rule: FaultRule) -> None:
        with self._lock:
            self.faults.append(rule)

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def take_fault(self, method: str, path: str) -> FaultRule | None:
        with self._lock:
            for i, rule in enumerate(self.faults):
                if rule.matches(method, path):
                    if rule.count == 1:
                        del self.faults[i]
                    else:
                        self.faults[i] = rule.model_copy(update={"count": rule.count - 1})
                    return rule
        return None

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            kind = entry["kind"]
            self.requests[kind] += 1
            if kind == "download":
                self.download_methods[entry["method"]] += 1
                self.download_bytes += entry["bytes"]
            if self.request_log is not None:
                self.request_log.parent.mkdir(parents=True, exist_ok=True)
                with self.request_log.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(entry, sort_keys=True) + "\n")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": {k: self.requests[k] for k in ("api", "download", "control", "other")},
                "downloads": {m: self.download_methods[m] for m in ("HEAD", "GET")},
                "download_bytes": self.download_bytes,
                "faults_pending": [r.model_dump() for r in self.faults],
            }

    def reset_stats(self) -> None:
        with self._lock:
            self.requests.clear()
            self.download_methods.clear()
            self.download_bytes = 0


def request_kind(path: str) -> Kind:
    """How a request path is counted in the stats and the request log."""
    if path.startswith("/_gantry/"):
        return "control"
    if path.startswith("/api/"):
        return "api"
    if "/resolve/" in path:
        return "download"
    return "other"


async def _drop_connection(send: Send, *, reset: bool) -> bool:
    """Close the TCP connection under ``send``; False if the server does not expose it.

    ASGI has no way to drop a connection, so this reaches uvicorn's transport (the ``send``
    it hands the app is a method of its request cycle). ``reset`` sends a RST at once
    (SO_LINGER 0), as a crashed proxy would; otherwise what was written is flushed, then
    a FIN: a body cut short, which clients resume with a Range request.
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if not isinstance(transport, asyncio.Transport):
        return False
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()
    # Wait for uvicorn's connection_lost, so it neither answers on nor logs about the
    # dead connection once the app returns.
    deadline = time.monotonic() + 5
    while not getattr(cycle, "disconnected", True) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    return True


# --- helpers ---------------------------------------------------------------------------


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "") in _TRUE


def _dir_oid(tree: Mapping[str, TreeEntry], directory: str) -> str:
    # Deterministic folder id (not git's tree hash: nothing downstream recomputes it).
    prefix = directory + "/"
    listing = {p: e.hub_oid for p, e in tree.items() if p.startswith(prefix)}
    data = json.dumps(listing, sort_keys=True).encode()
    return hashlib.sha1(b"tree\0" + data, usedforsecurity=False).hexdigest()


def _parse_range(header: str | None, size: int) -> tuple[int, int] | Literal["invalid"] | None:
    """``(start, end_inclusive)`` of a single ``bytes=`` range, None to send it all."""
    if not header or size == 0:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # Multiple or foreign ranges: answering 200 with everything is allowed.
    first, dash, last = spec.strip().partition("-")
    try:
        if not dash:
            return None
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                return "invalid"
            return max(size - suffix, 0), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return "invalid"
    return start, min(end, size - 1)


async def _file_chunks(path: Path, start: int, length: int) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        await f.seek(start)
        remaining = length
        while remaining > 0:
            chunk = await f.read(min(_CHUNK, remaining))
            if not chunk:
                return  # Blob shorter than recorded: the client sees a short body.
            remaining -= len(chunk)
            yield chunk


# --- the app ---------------------------------------------------------------------------


class HubApp(Starlette):
    """The Hub endpoint; its outermost layer injects faults and logs every request."""

    def __init__(self, store: HubStore, tokens: Iterable[str], request_log: Path | None) -> None:
        self.store = store
        self.tokens = frozenset(tokens)
        self.hub = HubState(request_log)
        self.uploads = Uploads(store, self.tokens)
        super().__init__(
            routes=[
                Route("/_gantry/stats", self._stats, methods=["GET", "DELETE"]),
                Route("/_gantry/faults", self._faults, methods=["GET", "POST", "DELETE"]),
                *self.uploads.routes(),
                Route("/api/models/{rest:path}", self._api, methods=["GET"]),
                Route("/{rest:path}", self._resolve, methods=["GET"]),  # HEAD implied
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Faults and logging sit outside Starlette's own middleware so that `send` is
        # still the server's: a reset needs its transport.
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        await self._outer(scope, receive, send, super().__call__)

    async def _outer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        inner: Callable[[Scope, Receive, Send], Awaitable[None]],
    ) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        kind = request_kind(path)
        status: int | None = None
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        fault = None if kind == "control" else self.hub.take_fault(method, path)
        if fault is not None:
            log.info("injecting fault %r into %s %s", fault.mode, method, path)
        started = time.monotonic()
        try:
            if fault is None:
                await inner(scope, receive, counting_send)
            elif fault.mode == "status":
                msg = f"injected fault: status {fault.status}"
                response = JSONResponse(
                    {"error": msg}, status_code=fault.status, headers={"X-Gantry-Fault": "status"}
                )
                await response(scope, receive, counting_send)
            elif fault.mode == "reset":
                if not await _drop_connection(send, reset=True):
                    raise RuntimeError("injected fault: reset (server exposes no transport)")
            elif fault.mode == "stall":
                await anyio.sleep(fault.stall_s)
                await inner(scope, receive, counting_send)
            elif fault.mode == "truncate":
                await inner(scope, receive, _truncating(counting_send, send))
            else:
                await inner(scope, receive, _rewriting(counting_send, fault.mode))
        finally:
            self.hub.record(
                {
                    "ts": round(time.time(), 3),
                    "method": method,
                    "path": path,
                    "query": scope.get("query_string", b"").decode("latin-1"),
                    "status": status,
                    "kind": kind,
                    "bytes": sent,
                    "fault": fault.mode if fault else None,
                    "duration_s": round(time.monotonic() - started, 4),
                }
            )

    # --- control -------------------------------------------------------------------------

    async def _stats(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.hub.reset_stats()
        return JSONResponse(self.hub.stats())

    async def _faults(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                rule = FaultRule.model_validate_json(await request.body())
            except ValidationError as exc:
                return _error(400, None, f"invalid fault rule: {exc.errors(include_url=False)}")
            self.hub.add_fault(rule)
        elif request.method == "DELETE":
            self.hub.clear_faults()
        return JSONResponse({"faults_pending": self.hub.stats()["faults_pending"]})

    # --- access --------------------------------------------------------------------------

    def _repo(self, request: Request, repo_id: str, *, download: bool) -> RepoFlags | Response:
        """The repo's flags if the request may see it (and its files), else the error."""
        try:
            check_repo_id(repo_id)
            flags = self.store.repo_flags(repo_id)
        except (UnsafePathError, RepoNotFoundError):
            return _error(404, "RepoNotFound", "Repository not found")
        token = _bearer(request)
        allowed = self.uploads.role(token) is not None
        if flags.private and not allowed:
            if token is None:
                # As the Hub: an anonymous caller cannot tell private from missing.
                return _error(401, "RepoNotFound", "Repository not found")
            return _error(401, None, "Invalid credentials in Authorization header")
        # As the Hub: a gated repo's metadata is public, its files are not.
        if flags.gated and download and not allowed:
            if token is None:
                return _error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it "
                    "and be authenticated to access it. Please log in.",
                )
            return _error(
                403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted and you are not in the authorized list.",
            )
        return flags

    def _commit(self, repo_id: str, revision: str) -> Commit | Response:
        try:
            return self.store.commit(repo_id, self.store.resolve(repo_id, revision))
        except (RevisionNotFoundError, UnsafePathError):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    # --- /api/models -----------------------------------------------------------------------

    async def _api(self, request: Request) -> Response:
        segs = _segments(request)[2:]  # after "api", "models"
        if len(segs) < 2:
            return _error(404, None, "Not Found")
        repo_id = f"{segs[0]}/{segs[1]}"
        rest = segs[2:]
        flags = self._repo(request, repo_id, download=False)
        if isinstance(flags, Response):
            return flags
        if not rest or (rest[0] == "revision" and len(rest) == 2):
            commit = self._commit(repo_id, rest[1] if rest else "main")
            if isinstance(commit, Response):
                return commit
            blobs = _flag(request, "blobs")
            return JSONResponse(self._model_info(repo_id, commit, flags, blobs=blobs))
        if rest == ["refs"]:
            refs = self.store.refs(repo_id)

            def listing(names: Mapping[str, str], kind: str) -> list[dict[str, str]]:
                return [
                    {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha}
                    for n, sha in sorted(names.items())
                ]

            return JSONResponse(
                {
                    "branches": listing(refs.branches, "heads"),
                    "tags": listing(refs.tags, "tags"),
                    "converts": [],
                    "pullRequests": [],
                }
            )
        if rest[0] == "tree" and len(rest) >= 2:
            commit = self._commit(repo_id, rest[1])
            if isinstance(commit, Response):
                return commit
            base = "/".join(rest[2:])
            entries = self._tree_listing(
                repo_id,
                commit,
                base,
                recursive=_flag(request, "recursive"),
                expand=_flag(request, "expand"),
            )
            if entries is None:
                return _error(
                    404,
                    "EntryNotFound",
                    f"{base} does not exist on {commit.id}",
                    **{"X-Repo-Commit": commit.id},
                )
            return JSONResponse(entries)
        return _error(404, None, "Not Found")

    def _model_info(
        self, repo_id: str, commit: Commit, flags: RepoFlags, *, blobs: bool
    ) -> dict[str, Any]:
        siblings: list[dict[str, Any]] = []
        for path, entry in sorted(commit.tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling |= {"size": entry.size, "blobId": entry.hub_oid}
                if entry.lfs:
                    sibling["lfs"] = {
                        "sha256": entry.sha256,
                        "size": entry.size,
                        "pointerSize": len(entry.lfs_pointer),
                    }
            siblings.append(sibling)
        *_, first = self.store.history(repo_id, commit.id)
        return {
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.id,
            "lastModified": commit.timestamp,
            "createdAt": first.timestamp,
            "private": flags.private,
            "gated": "manual" if flags.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(e.size for e in commit.tree.values()),
        }

    def _tree_listing(
        self, repo_id: str, commit: Commit, base: str, *, recursive: bool, expand: bool
    ) -> list[dict[str, Any]] | None:
        """The Hub's tree entries under folder ``base`` ("" for the root); None if no folder."""
        tree = commit.tree
        prefix = f"{base}/" if base else ""
        under = [p for p in tree if p.startswith(prefix)]
        if base and (base in tree or not under):
            return None
        dirs: set[str] = set()
        files: list[str] = []
        for path in under:
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                dirs.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files.append(path)
        out: list[dict[str, Any]] = []
        for d in sorted(dirs):
            item: dict[str, Any] = {"type": "directory", "oid": _dir_oid(tree, d), "size": 0}
            item["path"] = d
            if expand:
                item["lastCommit"] = self._last_commit(repo_id, commit, d)
            out.append(item)
        for path in sorted(files):
            entry = tree[path]
            item = {"type": "file", "oid": entry.hub_oid, "size": entry.size, "path": path}
            if entry.lfs:
                item["lfs"] = {
                    "oid": entry.sha256,
                    "size": entry.size,
                    "pointerSize": len(entry.lfs_pointer),
                }
            if expand:
                item["lastCommit"] = self._last_commit(repo_id, commit, path)
                item["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": {"virusFound": False, "virusNames": None},
                    "pickleImportScan": None,
                }
            out.append(item)
        return out

    def _last_commit(self, repo_id: str, commit: Commit, path: str) -> dict[str, str]:
        """The newest commit (from ``commit`` back) that changed ``path`` or anything below."""

        def view(c: Commit) -> dict[str, TreeEntry]:
            return {p: e for p, e in c.tree.items() if p == path or p.startswith(path + "/")}

        changed = commit
        for c in self.store.history(repo_id, commit.id):
            if c.parent is None or view(self.store.commit(repo_id, c.parent)) != view(c):
                changed = c
                break
        return {
            "id": changed.id,
            "title": changed.message.splitlines()[0] if changed.message else "",
            "date": changed.timestamp,
        }

    # --- /{repo}/resolve -------------------------------------------------------------------

    async def _resolve(self, request: Request) -> Response:
        segs = _segments(request)
        if len(segs) < 5 or segs[2] != "resolve":
            return _error(404, None, "Not Found")
        repo_id, revision, path = f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:])
        flags = self._repo(request, repo_id, download=True)
        if isinstance(flags, Response):
            return flags
        commit = self._commit(repo_id, revision)
        if isinstance(commit, Response):
            return commit
        try:
            entry = commit.tree.get(check_repo_path(path))
        except UnsafePathError:
            entry = None
        if entry is None:
            return _error(404, "EntryNotFound", "Entry not found", **{"X-Repo-Commit": commit.id})
        return self._file_response(request, commit, entry)

    def _file_response(self, request: Request, commit: Commit, entry: TreeEntry) -> Response:
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.lfs:
            # The client prefers these over ETag/Content-Length; the Hub sends them for LFS.
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        span = _parse_range(request.headers.get("range"), entry.size)
        if span == "invalid":
            return Response(
                b"", status_code=416, headers={**headers, "Content-Range": f"bytes */{entry.size}"}
            )
        start, end = span if span is not None else (0, entry.size - 1)
        length = end - start + 1 if entry.size else 0
        status = 200
        if span is not None:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            return Response(b"", status_code=status, headers=headers)
        body = _file_chunks(self.store.blob_path(entry.sha256), start, length)
        return StreamingResponse(body, status_code=status, headers=headers)


def _rewriting(send: Send, mode: str) -> Send:
    """A ``send`` that answers half the body as a whole one (``short``), or the whole body
    with the byte at its middle flipped (``corrupt``); the connection stays usable."""
    half = 0
    offset = 0
    done = False

    async def rewriting_send(message: Message) -> None:
        nonlocal half, offset, done
        if done:
            return
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            length = next((int(v) for k, v in headers if k.lower() == b"content-length"), 0)
            half = length // 2
            if mode == "short":
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((b"content-length", str(half).encode()))
            await send({**message, "headers": headers})
            return
        body: bytes = message.get("body", b"")
        start, offset = offset, offset + len(body)
        if mode == "corrupt":
            if start <= half < offset:
                i = half - start
                body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1 :]
            await send({**message, "body": body})
            return
        if offset < half and message.get("more_body", False):
            await send(message)
            return
        done = True
        await send({"type": "http.response.body", "body": body[: half - start], "more_body": False})

    return rewriting_send


def _truncating(send: Send, raw_send: Send) -> Send:
    """A ``send`` that lets half the body through, then closes the connection."""
    limit = 0
    passed = 0
    done = False

    async def truncating_send(message: Message) -> None:
        nonlocal limit, passed, done
        if done:
            return
        if message["type"] == "http.response.start":
            headers = {k.lower(): v for k, v in message.get("headers", [])}
            limit = int(headers.get(b"content-length", b"0")) // 2
            await send(message)
            return
        body: bytes = message.get("body", b"")
        if passed + len(body) < limit:
            passed += len(body)
            await send(message)
            return
        await send(
            {"type": "http.response.body", "body": body[: limit - passed], "more_body": True}
        )
        done = True
        if not await _drop_connection(raw_send, reset=False):
            raise RuntimeError("injected fault: truncate (server exposes no transport)")

    return truncating_send


def create_app(
    store: HubStore, *, tokens: Iterable[str] = (), request_log: Path | None = None
) -> HubApp:
    """The Hub endpoint over ``store``.

    ``tokens`` (together with the store's own, :meth:`HubStore.token_role`) open gated
    and private repositories; writes need a store token with the ``write`` role. Every
    request is appended to ``request_log`` as a JSON line.
    """
    return HubApp(store, tokens, request_log)


# --- running it ------------------------------------------------------------------------


def uvicorn_config(
    app: ASGIApp, *, host: str, port: int, log_level: str = "info"
) -> uvicorn.Config:
    """How Gantry runs the endpoint: h11 (faults need its transport), no access log."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http="h11",
        lifespan="off",
        proxy_headers=False,
        access_log=False,
        log_config=None,
        log_level=log_level,
        # Stalled requests would otherwise hold shutdown for as long as they stall.
        timeout_graceful_shutdown=2,
    )


@contextlib.contextmanager
def serve_in_thread(
    app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 15
) -> Iterator[str]:
    """Serve ``app`` from a background thread; yields its base URL (``port=0``: any free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, host=host, port=bound_port, log_level="warning"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="gantry-localhub", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise ServiceError(
                f"the local hub endpoint did not start on {host}:{bound_port}",
                fix="see the uvicorn error above; free the port or pick another",
            )
        time.sleep(0.02)
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


__all__ = [
    "FaultRule",
    "HubApp",
    "HubState",
    "create_app",
    "request_kind",
    "serve_in_thread",
    "uvicorn_config",
]
