"""The write half of the local Hub endpoint: what ``HfApi.create_repo``, ``upload_file`` /
``upload_folder`` / ``create_commit``, ``delete_file``, ``create_tag`` / ``create_branch``
(and their deletes) and ``hf upload`` send, answered as the Hub answers.

Routes (model repositories only)::

    POST   /api/repos/create                              create (409 if it exists)
    POST   /api/validate-yaml                              the model card's metadata
    POST   /api/models/{ns}/{name}/preupload/{rev}         regular or LFS, per file
    POST   /{ns}/{name}.git/info/lfs/objects/batch         LFS batch ("basic" transfer)
    PUT    /{ns}/{name}.git/info/lfs/objects/{oid}         the upload link (signed, expires)
    POST   /{ns}/{name}.git/info/lfs/verify                the verify link
    POST   /api/models/{ns}/{name}/commit/{branch}         the NDJSON commit
    POST   /api/models/{ns}/{name}/tag/{rev}               create_tag
    POST   /api/models/{ns}/{name}/branch/{branch}         create_branch (startingPoint)
    DELETE /api/models/{ns}/{name}/(tag|branch)/{name}     delete_tag, delete_branch
    GET    /api/models/{ns}/{name}/xet-write-token/{rev}   refused: this hub has no Xet

Writes need a token with the ``write`` role (``gantry hub token create --write``): 401
without one (or with an unknown one), 403 with a read token. The client uploads over Xet
whenever ``hf_xet`` is installed (huggingface_hub depends on it on x86_64 and arm64) and
``HF_HUB_DISABLE_XET`` is not set; there is no negotiation, so the Xet token route answers
with what to set. LFS content is hashed while it streams to a temporary file and is stored
only if it is exactly what the batch request announced.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import anyio
import yaml
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gantry.errors import (
    BlobMissingError,
    ChecksumMismatchError,
    CommitConflictError,
    EntryNotFoundError,
    PermanentError,
    RevisionNotFoundError,
    UnsafePathError,
)
from gantry.localhub.httputil import bearer, error, segments
from gantry.localhub.store import (
    AddFile,
    BlobUpload,
    Change,
    DeleteFile,
    DeleteFolder,
    HubStore,
    TokenRole,
    TreeEntry,
    check_ref_name,
    check_repo_id,
    check_repo_path,
    gitattributes,
    is_lfs,
)

log = logging.getLogger(__name__)

#: How long an upload link stays valid: long enough for a client to start every upload
#: of one batch, short enough that a leaked link is soon worthless.
UPLOAD_LINK_TTL_S = 3600
#: Longest NDJSON line of a commit. Regular files are at most 1 MiB (larger ones go to
#: LFS), so a line is at most ~1.4 MiB of base64; the margin is for copies of bigger ones.
MAX_COMMIT_LINE = 16 * 2**20
#: Body bytes handed to an upload's writer thread at once, and how many such batches may
#: wait for it: hand-offs cost nothing next to hashing the bytes, and an upload holds at
#: most 16 MiB in memory.
_WRITE_BATCH = 4 * 2**20
_BATCHES_IN_FLIGHT = 4
_LFS_JSON = "application/vnd.git-lfs+json"
_CONFLICT = "A commit has happened since. Please refresh and try again."
_NO_XET = (
    "this hub does not speak Xet: upload over LFS by setting HF_HUB_DISABLE_XET=1 in the "
    "environment of the client (huggingface_hub uses Xet whenever hf_xet is installed)"
)


# --- request bodies ----------------------------------------------------------------------


class CreateRepoBody(BaseModel):
    """``POST /api/repos/create``."""

    name: str
    organization: str | None = None
    type: str | None = None
    visibility: Literal["public", "private", "protected"] | None = None
    private: bool | None = None


class PreuploadFile(BaseModel):
    path: str
    size: int = Field(ge=0)
    sample: str = ""


class PreuploadBody(BaseModel):
    """``POST .../preupload/{rev}``: which files go to LFS."""

    files: list[PreuploadFile]
    gitIgnore: str | None = None  # noqa: N815 - the Hub's field name


class LfsObject(BaseModel):
    oid: str
    size: int = Field(ge=0)


class LfsBatchBody(BaseModel):
    """``POST {repo}.git/info/lfs/objects/batch`` (git-lfs batch API)."""

    operation: str
    transfers: list[str] = Field(default_factory=lambda: ["basic"])
    objects: list[LfsObject]
    hash_algo: str = "sha256"


class TagBody(BaseModel):
    tag: str
    message: str | None = None


class BranchBody(BaseModel):
    startingPoint: str | None = None  # noqa: N815 - the Hub's field name


class _BadCommitError(Exception):
    """A commit line the endpoint cannot use; answered 400 with its message."""


# --- the routes --------------------------------------------------------------------------


class Uploads:
    """The write routes over ``store``. ``read_tokens`` (the server's ``--token``s) open
    gated and private repositories but never write."""

    def __init__(self, store: HubStore, read_tokens: frozenset[str]) -> None:
        self.store = store
        self.read_tokens = read_tokens
        # Signs upload links: the client PUTs to them without its token (as to S3).
        self._key = secrets.token_bytes(32)

    def routes(self) -> list[Route]:
        """Starlette routes; they go before the read routes' catch-alls."""
        return [
            Route("/api/repos/create", self.create_repo, methods=["POST"]),
            Route("/api/validate-yaml", self.validate_yaml, methods=["POST"]),
            Route(
                "/api/models/{ns}/{name}/xet-{kind}-token/{rest:path}", self.no_xet, methods=["GET"]
            ),
            Route("/api/models/{ns}/{name}/xet-{kind}-token", self.no_xet, methods=["GET"]),
            Route("/api/models/{rest:path}", self.models_write, methods=["POST", "DELETE"]),
            Route("/{ns}/{name}/info/lfs/objects/batch", self.lfs_batch, methods=["POST"]),
            Route("/{ns}/{name}/info/lfs/objects/{oid}", self.lfs_upload, methods=["PUT"]),
            Route("/{ns}/{name}/info/lfs/verify", self.lfs_verify, methods=["POST"]),
        ]

    # --- access ----------------------------------------------------------------------------

    def role(self, token: str | None) -> TokenRole | None:
        """What the request's token may do; None for no token or an unknown one."""
        if token is None:
            return None
        if any(hmac.compare_digest(token, t) for t in self.read_tokens):
            return self.store.token_role(token) or "read"
        return self.store.token_role(token)

    def _writer(self, request: Request, what: str) -> Response | None:
        """None if the request may write (``what`` names the target), else the refusal."""
        token = bearer(request)
        fix = (
            "create a write token with `gantry hub token create --write` and pass it "
            "(HF_TOKEN, or token= in HfApi)"
        )
        if token is None:
            return error(401, None, f"You must be authenticated to write to {what}: {fix}")
        role = self.role(token)
        if role is None:
            return error(401, None, "Invalid credentials in Authorization header")
        if role != "write":
            return error(
                403,
                None,
                f"You don't have the rights to write to {what}: this token has read access "
                f"only; {fix}",
            )
        return None

    def _repo_for_write(self, request: Request, ns: str, name: str) -> str | Response:
        """The repository id if it exists and the request may write to it."""
        repo_id = f"{ns}/{name}"
        refused = self._writer(request, repo_id)
        if refused is not None:
            return refused
        try:
            check_repo_id(repo_id)
            if self.store.repo_exists(repo_id):
                return repo_id
        except UnsafePathError:
            pass
        return error(404, "RepoNotFound", "Repository not found")

    # --- repositories ------------------------------------------------------------------------

    async def create_repo(self, request: Request) -> Response:
        body = await _parse(request, CreateRepoBody)
        if isinstance(body, Response):
            return body
        if body.type not in (None, "model"):
            return error(400, None, f"this hub holds model repositories only, not {body.type}s")
        if not body.organization:
            return error(
                400,
                None,
                "give the repository id as NAMESPACE/NAME: this hub has no users to default to",
            )
        repo_id = f"{body.organization}/{body.name}"
        refused = self._writer(request, f"the namespace {body.organization!r}")
        if refused is not None:
            return refused
        try:
            check_repo_id(repo_id)
        except UnsafePathError as exc:
            return error(400, None, str(exc))
        private = body.visibility == "private" or bool(body.private)
        url = f"{_base(request)}/{repo_id}"
        created = await anyio.to_thread.run_sync(
            lambda: self.store.create_repo(
                repo_id, private=private, initial_files={".gitattributes": gitattributes()}
            )
        )
        if not created:
            # Also what `create_repo(exist_ok=True)` and `hf upload` expect of an existing one.
            return JSONResponse(
                {"error": "You already created this model repo", "url": url},
                status_code=409,
                headers={"X-Error-Message": "You already created this model repo"},
            )
        log.info("created repository %s", repo_id)
        return JSONResponse({"url": url, "name": repo_id, "id": repo_id})

    async def validate_yaml(self, request: Request) -> Response:
        try:
            content = str((await request.json()).get("content", ""))
        except (ValueError, AttributeError):
            return error(400, None, "expected a JSON object with the card's `content`")
        problem = _card_metadata_problem(content)
        if problem is not None:
            return JSONResponse({"errors": [{"message": problem}], "warnings": []}, status_code=400)
        return JSONResponse({"errors": [], "warnings": []})

    async def no_xet(self, request: Request) -> Response:
        return error(501, None, _NO_XET)

    # --- /api/models/{repo}/... --------------------------------------------------------------

    async def models_write(self, request: Request) -> Response:
        segs = segments(request)[2:]  # after "api", "models"
        if len(segs) != 4:
            return error(404, None, "Not Found")
        ns, name, action, rev = segs
        repo_id = self._repo_for_write(request, ns, name)
        if isinstance(repo_id, Response):
            return repo_id
        if request.query_params.get("create_pr") in ("1", "true", "True"):
            return error(400, None, "this hub has no pull requests: commit to a branch instead")
        handlers: dict[tuple[str, str], Callable[[Request, str, str], Any]] = {
            ("POST", "preupload"): self._preupload,
            ("POST", "commit"): self._commit,
            ("POST", "tag"): self._create_tag,
            ("POST", "branch"): self._create_branch,
            ("DELETE", "tag"): self._delete_ref,
            ("DELETE", "branch"): self._delete_ref,
        }
        handler = handlers.get((request.method, action))
        if handler is None:
            return error(404, None, "Not Found")
        try:
            response: Response = await handler(request, repo_id, rev)
        except RevisionNotFoundError:
            return error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        except UnsafePathError as exc:
            return error(400, None, str(exc))
        return response

    async def _preupload(self, request: Request, repo_id: str, rev: str) -> Response:
        body = await _parse(request, PreuploadBody)
        if isinstance(body, Response):
            return body
        for f in body.files:
            check_repo_path(f.path)
        commit = self.store.resolve(repo_id, rev)
        tree = self.store.tree(repo_id, commit)
        files = []
        for f in body.files:
            mode = "lfs" if is_lfs(f.path, f.size) else "regular"
            item: dict[str, Any] = {"path": f.path, "uploadMode": mode, "shouldIgnore": False}
            if (entry := tree.get(f.path)) is not None:
                # What the client compares with its own: sha256 for LFS, else the git id.
                item["oid"] = entry.sha256 if mode == "lfs" else entry.blob_oid
            files.append(item)
        return JSONResponse({"files": files, "commitOid": commit})

    async def _commit(self, request: Request, repo_id: str, branch: str) -> Response:
        check_ref_name(branch)
        try:
            header, changes = await self._read_commit(request, repo_id)
        except _BadCommitError as exc:
            return error(400, None, str(exc))
        except BlobMissingError as exc:
            return error(400, None, exc.message)
        except ClientDisconnect:
            return Response(status_code=400)
        summary = str(header.get("summary") or "").strip() or "Upload with huggingface_hub"
        description = str(header.get("description") or "").strip()
        message = f"{summary}\n\n{description}" if description else summary
        parent = header.get("parentCommit")
        try:
            sha = await anyio.to_thread.run_sync(
                lambda: self.store.commit_changes(
                    repo_id,
                    changes,
                    message=message,
                    branch=branch,
                    expected_head=str(parent) if parent else None,
                )
            )
        except CommitConflictError as exc:
            return error(412, None, f"{_CONFLICT} ({exc.message})")
        except EntryNotFoundError as exc:
            return error(404, "EntryNotFound", exc.message)
        except BlobMissingError as exc:
            return error(400, None, exc.message)
        log.info("commit %s on %s@%s: %s", sha, repo_id, branch, summary)
        return JSONResponse(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{_base(request)}/{repo_id}/commit/{sha}",
                "commitMessage": message,
                "pullRequestUrl": None,
                "hookOutput": "",
            }
        )

    async def _read_commit(
        self, request: Request, repo_id: str
    ) -> tuple[dict[str, Any], list[Change]]:
        """The commit's header and its changes, in order. Regular files are stored as their
        lines arrive, so memory holds one line, not the whole commit; an LFS file must name
        content already received."""
        header: dict[str, Any] | None = None
        changes: list[Change] = []
        async for line in _lines(request.stream(), MAX_COMMIT_LINE):
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if not isinstance(value, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise _BadCommitError(
                    "each commit line must be a JSON object with `key` and `value`"
                ) from None
            if header is None:
                if key != "header":
                    raise _BadCommitError("a commit starts with its `header` line")
                header = value
                continue
            raw = str(value.get("path", ""))
            path = check_repo_path(raw.rstrip("/") if key == "deletedFolder" else raw)
            if key == "file":
                changes.append(AddFile(path, await self._regular_file(path, value)))
            elif key == "lfsFile":
                changes.append(AddFile(path, self._lfs_file(repo_id, path, value)))
            elif key == "deletedFile":
                changes.append(DeleteFile(path))
            elif key == "deletedFolder":
                changes.append(DeleteFolder(path))
            else:
                raise _BadCommitError(f"unknown commit operation {key!r} (for {path})")
        if header is None:
            raise _BadCommitError("empty commit: no header line")
        return header, changes

    async def _regular_file(self, path: str, value: dict[str, Any]) -> TreeEntry:
        if value.get("encoding", "base64") != "base64":
            raise _BadCommitError(f"{path}: only base64 content is supported")
        try:
            data = base64.b64decode(str(value.get("content", "")), validate=True)
        except binascii.Error:
            raise _BadCommitError(f"{path}: content is not valid base64") from None
        return await anyio.to_thread.run_sync(lambda: self.store.put_blob(data, repo_path=path))

    def _lfs_file(self, repo_id: str, path: str, value: dict[str, Any]) -> TreeEntry:
        oid, algo = str(value.get("oid", "")), value.get("algo", "sha256")
        if algo != "sha256" or not _is_sha256(oid):
            raise _BadCommitError(f"{path}: an LFS file is named by its sha256 (algo sha256, oid)")
        size = value.get("size")
        blob = self.store.blob_path(oid)
        if not blob.is_file() or (size is not None and blob.stat().st_size != size):
            raise BlobMissingError(
                f"{path} names LFS object sha256:{oid} that {repo_id} never received",
                fix="upload its content first (the LFS batch and upload steps), then commit",
            )
        return TreeEntry(sha256=oid, size=blob.stat().st_size, blob_oid=None, lfs=True)

    async def _create_tag(self, request: Request, repo_id: str, rev: str) -> Response:
        body = await _parse(request, TagBody)
        if isinstance(body, Response):
            return body
        check_ref_name(body.tag)
        sha = self.store.resolve(repo_id, rev)
        if body.tag in self.store.refs(repo_id).tags:
            return error(409, None, f"Tag reference {body.tag} already exists in {repo_id}")
        try:
            await anyio.to_thread.run_sync(lambda: self.store.set_tag(repo_id, body.tag, sha))
        except PermanentError:  # created meanwhile, at another commit
            return error(409, None, f"Tag reference {body.tag} already exists in {repo_id}")
        return JSONResponse({"tag": body.tag, "commit": sha})

    async def _create_branch(self, request: Request, repo_id: str, branch: str) -> Response:
        body = await _parse(request, BranchBody)
        if isinstance(body, Response):
            return body
        check_ref_name(branch)
        sha = self.store.resolve(repo_id, body.startingPoint or "main")
        try:
            await anyio.to_thread.run_sync(
                lambda: self.store.set_branch(repo_id, branch, sha, only_new=True)
            )
        except PermanentError:
            return error(409, None, f"Reference {branch} already exists in {repo_id}")
        return JSONResponse({"branch": branch, "commit": sha})

    async def _delete_ref(self, request: Request, repo_id: str, name: str) -> Response:
        kind: Literal["branch", "tag"] = "tag" if segments(request)[4] == "tag" else "branch"
        try:
            await anyio.to_thread.run_sync(lambda: self.store.delete_ref(repo_id, kind, name))
        except PermanentError as exc:
            if isinstance(exc, RevisionNotFoundError):
                raise
            return error(403, None, exc.message)  # the default branch
        return JSONResponse({})

    # --- LFS ---------------------------------------------------------------------------------

    async def lfs_batch(self, request: Request) -> Response:
        ns, name = request.path_params["ns"], request.path_params["name"]
        if not name.endswith(".git"):
            return error(404, None, "Not Found")
        repo_id = self._repo_for_write(request, ns, name.removesuffix(".git"))
        if isinstance(repo_id, Response):
            return repo_id
        body = await _parse(request, LfsBatchBody)
        if isinstance(body, Response):
            return body
        if body.operation != "upload":
            return error(400, None, "this hub's LFS batch endpoint serves uploads only")
        if "basic" not in body.transfers or body.hash_algo != "sha256":
            return error(
                400, None, f"this hub offers the `basic` LFS transfer with sha256 only; {_NO_XET}"
            )
        base = f"{_base(request)}/{repo_id}.git/info/lfs"
        expires = int(time.time()) + UPLOAD_LINK_TTL_S
        expires_at = datetime.fromtimestamp(expires, UTC).isoformat().replace("+00:00", "Z")
        objects: list[dict[str, Any]] = []
        for obj in body.objects:
            item: dict[str, Any] = {"oid": obj.oid, "size": obj.size}
            if not _is_sha256(obj.oid):
                item["error"] = {"code": 422, "message": "oid must be a lowercase hex sha256"}
            elif not self.store.has_blob(obj.oid, obj.size):
                # Stored content gets no actions: the client skips its upload.
                sig = self._sign(repo_id, obj.oid, obj.size, expires)
                href = f"{base}/objects/{obj.oid}?size={obj.size}&expires={expires}&sig={sig}"
                item["authenticated"] = True
                item["actions"] = {
                    "upload": {"href": href, "expires_at": expires_at},
                    "verify": {"href": f"{base}/verify", "expires_at": expires_at},
                }
            objects.append(item)
        return JSONResponse(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            headers={"Content-Type": _LFS_JSON},
        )

    async def lfs_upload(self, request: Request) -> Response:
        ns, name, oid = (request.path_params[k] for k in ("ns", "name", "oid"))
        repo_id = f"{ns}/{name.removesuffix('.git')}"
        q = request.query_params
        try:
            size, expires = int(q.get("size", "")), int(q.get("expires", ""))
        except ValueError:
            return error(400, None, "an upload link carries size, expires and sig")
        good = hmac.compare_digest(q.get("sig", ""), self._sign(repo_id, oid, size, expires))
        if not good or expires < time.time():
            return error(
                403, None, "this upload link is invalid or expired: ask the batch endpoint again"
            )
        if not _is_sha256(oid):
            return error(400, None, f"{oid!r} is not an LFS object id (a sha256)")
        length = request.headers.get("content-length")
        if length is not None and length != str(size):
            return error(
                400, None, f"LFS object {oid} is {size} bytes, the request body {length} bytes"
            )
        try:
            with self.store.receive_blob(oid, size) as upload:
                await _stream_into(request, upload)
        except ClientDisconnect:
            log.info("upload of LFS object %s to %s was cut off; nothing kept", oid, repo_id)
            return Response(status_code=400)
        except ChecksumMismatchError as exc:
            log.warning("refused LFS object for %s: %s", repo_id, exc.message)
            return error(400, None, f"{exc.message}; nothing was stored")
        return Response(status_code=200)

    async def lfs_verify(self, request: Request) -> Response:
        ns, name = request.path_params["ns"], request.path_params["name"]
        repo_id = self._repo_for_write(request, ns, name.removesuffix(".git"))
        if isinstance(repo_id, Response):
            return repo_id
        body = await _parse(request, LfsObject)
        if isinstance(body, Response):
            return body
        if not _is_sha256(body.oid) or not self.store.has_blob(body.oid, body.size):
            return error(404, None, f"LFS object {body.oid} ({body.size} bytes) was not received")
        return JSONResponse({"oid": body.oid, "size": body.size})

    def _sign(self, repo_id: str, oid: str, size: int, expires: int) -> str:
        msg = f"{repo_id}\n{oid}\n{size}\n{expires}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()


# --- helpers -------------------------------------------------------------------------------


async def _stream_into(request: Request, upload: BlobUpload) -> None:
    """Write the request body into ``upload`` and finish it.

    The event loop only reads the socket; batches of the body are hashed and written in
    order by a thread of this upload's own meanwhile (hashlib and file writes release the
    GIL), a few batches ahead at most, so receiving and storing overlap instead of taking
    turns, and memory stays bounded.
    """
    loop = asyncio.get_running_loop()
    inflight: deque[asyncio.Future[None]] = deque()
    batch: list[bytes] = []
    batched = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lfs-upload") as writer:
        try:
            async for chunk in request.stream():
                batch.append(chunk)
                batched += len(chunk)
                if batched >= _WRITE_BATCH:
                    if len(inflight) >= _BATCHES_IN_FLIGHT:
                        await inflight.popleft()
                    inflight.append(loop.run_in_executor(writer, _write_all, upload, batch))
                    batch, batched = [], 0
            inflight.append(loop.run_in_executor(writer, _write_all, upload, batch))
            inflight.append(loop.run_in_executor(writer, upload.finish))
            while inflight:
                await inflight.popleft()
        except BaseException:
            # Let the writer stop before abort() removes the file it writes to; the error
            # being raised is the one to report, so the writer's own ones are only seen.
            with anyio.CancelScope(shield=True):
                for future in inflight:
                    future.cancel()
                if inflight:
                    await asyncio.wait(inflight)
            for future in inflight:
                if not future.cancelled():
                    future.exception()
            raise


def _write_all(upload: BlobUpload, chunks: list[bytes]) -> None:
    for chunk in chunks:
        upload.write(chunk)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _is_sha256(oid: str) -> bool:
    return len(oid) == 64 and all(c in "0123456789abcdef" for c in oid)


M = TypeVar("M", bound=BaseModel)


async def _parse(request: Request, model: type[M]) -> M | Response:
    """The JSON body as ``model``, or a 400 naming what is wrong with it."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        return error(400, None, f"invalid request body: {problems}")


async def _lines(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The non-empty lines of a streamed NDJSON body; a longer line than ``limit`` is refused."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line.strip():
                yield line
        if len(pending) > limit:
            raise _BadCommitError(f"a commit line is longer than {limit} bytes")
    if pending.strip():
        yield pending


def _card_metadata_problem(content: str) -> str | None:
    """Why the model card's YAML front matter is invalid; None if it is fine (or absent)."""
    if not content.startswith("---"):
        return None
    end = content.find("\n---", 3)
    if end < 0:
        return "the metadata block opened by `---` is never closed"
    try:
        meta = yaml.safe_load(content[3:end])
    except yaml.YAMLError as exc:
        return f"invalid YAML in the metadata block: {exc}"
    if meta is not None and not isinstance(meta, dict):
        return "the metadata block must be a YAML mapping"
    return None


__all__ = ["UPLOAD_LINK_TTL_S", "Uploads"]
