"""An on-disk model repository store with git-like, content-addressed commits.

Layout under ``root``::

    blobs/sha256/<hex>                  file contents, named by their sha256
    repos/<ns>/<name>/repo.json         flags: gated, private
    repos/<ns>/<name>/refs.json         branches and tags -> commit id
    repos/<ns>/<name>/commits/<id>.json commits (immutable)
    tokens.json                         bearer tokens the hub endpoint accepts (sha256 only)
    tmp/                                uploads being received (removed when they end)

A commit id is the sha1 of the commit's canonical JSON (tree, parent, message, timestamp),
so the same inputs give the same ids on every machine. Every write goes to a temporary
file first and is moved into place with ``os.replace``: a reader never sees half a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gantry.atomicfile import sweep_stale, write_atomic
from gantry.errors import (
    BlobMissingError,
    ChecksumMismatchError,
    CommitConflictError,
    EntryNotFoundError,
    PermanentError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsafePathError,
)

#: Commit timestamp used when the caller gives none, so ids stay reproducible.
DEFAULT_TIMESTAMP = datetime(2024, 1, 1, tzinfo=UTC)
#: Suffixes the Hub's default ``.gitattributes`` stores in LFS; larger files go there too.
LFS_SUFFIXES = (".onnx", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
LFS_MIN_SIZE = 1024 * 1024
_CHUNK = 1024 * 1024

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,99}")

#: A token's access: ``read`` opens gated and private repositories, ``write`` also pushes.
TokenRole = Literal["read", "write"]


class TreeEntry(BaseModel):
    """One file of a commit."""

    model_config = ConfigDict(frozen=True)

    sha256: str
    size: int
    #: git blob id of the content: sha1(b"blob <size>\\0" + content). None for LFS content
    #: received over HTTP: nothing reads it (LFS files are named by sha256), and hashing a
    #: large upload twice would halve its throughput.
    blob_oid: str | None
    lfs: bool

    @property
    def lfs_pointer(self) -> bytes:
        """The git-lfs pointer file git would store in place of an LFS file."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {self.size}\n"
        ).encode()

    @model_validator(mode="after")
    def _regular_files_have_a_git_oid(self) -> TreeEntry:
        if not self.lfs and self.blob_oid is None:
            raise ValueError("a file stored in git proper (lfs=False) needs its blob_oid")
        return self

    @property
    def hub_oid(self) -> str:
        """The ``oid``/``blobId`` the Hub reports: the pointer's blob id for LFS files."""
        if self.lfs or self.blob_oid is None:
            return git_blob_oid(self.lfs_pointer)
        return self.blob_oid

    @property
    def etag(self) -> str:
        """The ETag of the file's content: its sha256 for LFS files, else its git id."""
        return self.sha256 if self.lfs or self.blob_oid is None else self.blob_oid


class Commit(BaseModel):
    """An immutable snapshot of a repository."""

    model_config = ConfigDict(frozen=True)

    id: str
    parent: str | None
    message: str
    timestamp: str
    tree: dict[str, TreeEntry]


class RepoFlags(BaseModel):
    """Access flags of a repository."""

    model_config = ConfigDict(frozen=True)

    gated: bool = False
    private: bool = False


class Refs(BaseModel):
    """A repository's branches and tags, each naming a commit id."""

    branches: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)


class HubToken(BaseModel):
    """A bearer token the endpoint accepts. Only its sha256 is kept: the token itself is
    shown once, when it is created."""

    model_config = ConfigDict(frozen=True)

    name: str
    role: TokenRole
    created: str
    sha256: str


class _TokenFile(BaseModel):
    version: Literal[2] = 2
    tokens: list[HubToken] = Field(default_factory=list)


@dataclass(frozen=True)
class AddFile:
    """Put ``entry`` (a stored blob) at ``path``."""

    path: str
    entry: TreeEntry


@dataclass(frozen=True)
class DeleteFile:
    """Remove the file at ``path``; it must exist."""

    path: str


@dataclass(frozen=True)
class DeleteFolder:
    """Remove every file under folder ``path``; there must be one."""

    path: str


#: One operation of a commit, applied in order to the branch head's tree.
Change = AddFile | DeleteFile | DeleteFolder


def git_blob_oid(data: bytes) -> str:
    """The id git gives ``data`` as a blob.

    >>> git_blob_oid(b"hello\\n")
    'ce013625030ba8dba906f756967f9e9ca394464a'
    """
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    """Whether the Hub would store ``path`` in LFS."""
    return path.lower().endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE


def format_timestamp(ts: datetime) -> str:
    """The Hub's timestamp format, e.g. ``2024-01-01T00:00:00.000Z``."""
    utc = ts.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a safe ``namespace/name``; :class:`UnsafePathError` otherwise."""
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith(".git"):
        raise UnsafePathError(
            f"invalid repository id {repo_id!r}",
            fix="use NAMESPACE/NAME with letters, digits, '.', '_' and '-' only",
        )
    return repo_id


def check_repo_path(path: str) -> str:
    """``path`` if it is a relative, normalized file path inside a repository.

    Absolute paths, ``..``/``.`` segments, empty segments and backslashes are refused: a
    client would write such a file outside (or ambiguously inside) its download directory.
    """
    segments = path.split("/")
    if (
        not path
        or "\\" in path
        or "\0" in path
        or any(seg in ("", ".", "..") for seg in segments)
        or len(path) > 1000
    ):
        raise UnsafePathError(
            f"refusing repository file path {path!r}",
            fix="use a relative path with '/' separators and no '.', '..' or empty segments",
        )
    return path


def check_ref_name(name: str) -> str:
    """``name`` if it can be a branch or tag name (and cannot be mistaken for a commit id)."""
    if (
        not _REF_NAME.fullmatch(name)
        or _SHA1.fullmatch(name)
        or ".." in name
        or "//" in name
        or name.endswith("/")
    ):
        raise UnsafePathError(
            f"invalid branch or tag name {name!r}",
            fix="use letters, digits, '.', '_', '-' and single '/' separators",
        )
    return name


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def gitattributes() -> bytes:
    """The ``.gitattributes`` a new repository starts with: the store's LFS suffixes, as
    git-lfs writes them (the Hub's default file, to the store's own rule)."""
    lines = [f"*{suffix} filter=lfs diff=lfs merge=lfs -text" for suffix in LFS_SUFFIXES]
    return ("\n".join(lines) + "\n").encode()


class HubStore:
    """Repositories, commits and blobs under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # Commits are immutable, so a parsed commit never goes stale.
        self._commits: dict[tuple[str, str], Commit] = {}
        self._local = threading.local()

    # --- paths -----------------------------------------------------------------------

    def _repo_dir(self, repo_id: str) -> Path:
        return self.root / "repos" / check_repo_id(repo_id)

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this sha256 lives (whether or not it exists)."""
        if not _SHA256.fullmatch(sha256):
            raise UnsafePathError(f"invalid sha256 {sha256!r}", fix="pass 64 lowercase hex digits")
        return self.root / "blobs" / "sha256" / sha256

    def open_blob(self, sha256: str) -> IO[bytes]:
        """Open a stored blob for reading."""
        return self.blob_path(sha256).open("rb")

    # --- tokens ----------------------------------------------------------------------

    def tokens(self) -> list[HubToken]:
        """The tokens the endpoint accepts (digests, names, roles)."""
        path = self.root / "tokens.json"
        if not path.is_file():
            return []
        data = json.loads(path.read_bytes())
        if isinstance(data, list):
            # The first format: a list of plain tokens, each opening gated/private repos.
            return [
                HubToken(name="token", role="read", created="", sha256=_token_digest(t))
                for t in data
            ]
        return _TokenFile.model_validate(data).tokens

    def token_role(self, token: str) -> TokenRole | None:
        """What ``token`` may do; None if the store does not know it."""
        digest = _token_digest(token)
        roles = {t.role for t in self.tokens() if hmac.compare_digest(t.sha256, digest)}
        return "write" if "write" in roles else "read" if roles else None

    def add_token(self, token: str, *, role: TokenRole = "read", name: str = "token") -> None:
        """Accept ``token`` with ``role`` from now on (idempotent)."""
        if not token or any(c.isspace() for c in token):
            raise PermanentError("a hub token must be non-empty and contain no whitespace")
        if not _TOKEN_NAME.fullmatch(name):
            raise PermanentError(
                f"invalid token name {name!r}",
                fix="use up to 100 letters, digits, '.', '_', '@' and '-'",
            )
        digest = _token_digest(token)
        with self._lock():
            tokens = self.tokens()
            if any(t.sha256 == digest and t.role == role for t in tokens):
                return
            created = format_timestamp(datetime.now(UTC))
            tokens.append(HubToken(name=name, role=role, created=created, sha256=digest))
            self._write_tokens(tokens)

    def create_token(self, *, role: TokenRole, name: str) -> str:
        """A new random token with ``role``, stored as its digest; the caller shows it once."""
        token = "gantry_" + secrets.token_urlsafe(32)
        self.add_token(token, role=role, name=name)
        return token

    def remove_tokens(self, name: str) -> int:
        """Stop accepting the tokens called ``name``; how many there were."""
        with self._lock():
            tokens = self.tokens()
            kept = [t for t in tokens if t.name != name]
            if len(kept) != len(tokens):
                self._write_tokens(kept)
            return len(tokens) - len(kept)

    def _write_tokens(self, tokens: list[HubToken]) -> None:
        data = _TokenFile(tokens=tokens).model_dump_json(indent=2).encode()
        write_atomic(self.root / "tokens.json", data, mode=0o600)

    # --- repositories ----------------------------------------------------------------

    def repo_exists(self, repo_id: str) -> bool:
        """Whether ``repo_id`` was created."""
        return (self._repo_dir(repo_id) / "repo.json").is_file()

    def list_repos(self) -> list[str]:
        """All repository ids, sorted."""
        base = self.root / "repos"
        return sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in base.glob("*/*/repo.json"))

    def create_repo(
        self,
        repo_id: str,
        *,
        gated: bool = False,
        private: bool = False,
        initial_files: Mapping[str, bytes] | None = None,
    ) -> bool:
        """Create ``repo_id`` if it does not exist (an existing one keeps its flags and
        content); whether it was created.

        ``initial_files`` become a first commit on ``main``, as the Hub starts a repository
        with its ``.gitattributes``. The repository appears (``repo.json``) only after it.
        """
        with self._lock(repo_id):
            if self.repo_exists(repo_id):
                return False
            if initial_files is not None:
                paths = sorted(check_repo_path(p) for p in initial_files)
                tree = {p: self.put_blob(initial_files[p], repo_path=p) for p in paths}
                sha = self._write_commit(repo_id, None, "initial commit", datetime.now(UTC), tree)
                self._write_refs(repo_id, Refs(branches={"main": sha}))
            flags = RepoFlags(gated=gated, private=private)
            write_atomic(self._repo_dir(repo_id) / "repo.json", _canonical(flags.model_dump()))
            return True

    def repo_flags(self, repo_id: str) -> RepoFlags:
        """The repository's access flags."""
        self._require_repo(repo_id)
        return RepoFlags.model_validate_json((self._repo_dir(repo_id) / "repo.json").read_bytes())

    def set_repo_flags(
        self, repo_id: str, *, gated: bool | None = None, private: bool | None = None
    ) -> RepoFlags:
        """Change the given flags; the others keep their value."""
        with self._lock(repo_id):
            flags = self.repo_flags(repo_id)
            changes = {k: v for k, v in (("gated", gated), ("private", private)) if v is not None}
            new = flags.model_copy(update=changes)
            if new != flags:
                write_atomic(self._repo_dir(repo_id) / "repo.json", _canonical(new.model_dump()))
            return new

    def _require_repo(self, repo_id: str) -> None:
        if not self.repo_exists(repo_id):
            raise RepoNotFoundError(
                f"repository {repo_id!r} does not exist in the hub store at {self.root}",
                fix="check the repository id, or run `python -m gantry.localhub assemble-demo`",
            )

    # --- refs ------------------------------------------------------------------------

    def refs(self, repo_id: str) -> Refs:
        """The repository's branches and tags."""
        self._require_repo(repo_id)
        path = self._repo_dir(repo_id) / "refs.json"
        return Refs.model_validate_json(path.read_bytes()) if path.is_file() else Refs()

    def _write_refs(self, repo_id: str, refs: Refs) -> None:
        write_atomic(self._repo_dir(repo_id) / "refs.json", _canonical(refs.model_dump()))

    def set_branch(self, repo_id: str, name: str, sha: str, *, only_new: bool = False) -> None:
        """Point branch ``name`` at commit ``sha`` (creating it, or moving it anywhere);
        ``only_new`` refuses a branch that exists."""
        check_ref_name(name)
        with self._lock(repo_id):
            self.commit(repo_id, sha)
            refs = self.refs(repo_id)
            if only_new and name in refs.branches:
                raise PermanentError(
                    f"branch {name!r} of {repo_id} already exists",
                    fix="pick another name, or commit to the existing branch",
                )
            if refs.branches.get(name) != sha:
                refs.branches[name] = sha
                self._write_refs(repo_id, refs)

    def set_tag(self, repo_id: str, name: str, sha: str, *, force: bool = False) -> None:
        """Tag commit ``sha``; moving an existing tag needs ``force``."""
        check_ref_name(name)
        with self._lock(repo_id):
            self.commit(repo_id, sha)
            refs = self.refs(repo_id)
            current = refs.tags.get(name)
            if current == sha:
                return
            if current is not None and not force:
                raise PermanentError(
                    f"tag {name!r} of {repo_id} already points at {current}, not {sha}",
                    fix="tags are immutable; use a new tag name (or force=True on purpose)",
                )
            refs.tags[name] = sha
            self._write_refs(repo_id, refs)

    def delete_ref(self, repo_id: str, kind: Literal["branch", "tag"], name: str) -> None:
        """Remove branch or tag ``name`` (its commits stay: tags or other branches may hold
        them). The ``main`` branch cannot be deleted."""
        if kind == "branch" and name == "main":
            raise PermanentError(
                f"refusing to delete the default branch of {repo_id}",
                fix="delete another branch, or the whole store directory",
            )
        with self._lock(repo_id):
            refs = self.refs(repo_id)
            names = refs.branches if kind == "branch" else refs.tags
            if names.pop(name, None) is None:
                raise RevisionNotFoundError(f"{kind} {name!r} not found in {repo_id}")
            self._write_refs(repo_id, refs)

    def resolve(self, repo_id: str, revision: str) -> str:
        """The commit id ``revision`` names: a branch, a tag, or a full commit id."""
        refs = self.refs(repo_id)
        sha = refs.branches.get(revision) or refs.tags.get(revision)
        if sha is None and _SHA1.fullmatch(revision) and self._commit_file(repo_id, revision):
            sha = revision
        if sha is None:
            raise RevisionNotFoundError(
                f"revision {revision!r} not found in {repo_id}",
                fix=f"use a branch ({', '.join(sorted(refs.branches)) or 'none'}), a tag "
                f"({', '.join(sorted(refs.tags)) or 'none'}) or a full 40-hex commit id",
            )
        return sha

    # --- commits ---------------------------------------------------------------------

    def _commit_file(self, repo_id: str, sha: str) -> Path | None:
        path = self._repo_dir(repo_id) / "commits" / f"{sha}.json"
        return path if _SHA1.fullmatch(sha) and path.is_file() else None

    def commit(self, repo_id: str, sha: str) -> Commit:
        """The commit ``sha`` of ``repo_id``."""
        key = (repo_id, sha)
        if key not in self._commits:
            self._require_repo(repo_id)
            path = self._commit_file(repo_id, sha)
            if path is None:
                raise RevisionNotFoundError(f"commit {sha!r} not found in {repo_id}")
            body = json.loads(path.read_bytes())
            self._commits[key] = Commit.model_validate({**body, "id": sha})
        return self._commits[key]

    def tree(self, repo_id: str, sha: str) -> Mapping[str, TreeEntry]:
        """Path -> file of commit ``sha``."""
        return self.commit(repo_id, sha).tree

    def history(self, repo_id: str, sha: str) -> Iterator[Commit]:
        """Commit ``sha`` and its ancestors, newest first."""
        current: str | None = sha
        while current is not None:
            c = self.commit(repo_id, current)
            yield c
            current = c.parent

    def has_blob(self, sha256: str, size: int) -> bool:
        """Whether the blob with this sha256 (and size) is stored."""
        path = self.blob_path(sha256)
        return path.is_file() and path.stat().st_size == size

    def receive_blob(self, sha256: str, size: int) -> BlobUpload:
        """Start receiving the blob the client announced as ``sha256`` of ``size`` bytes::

        with store.receive_blob(oid, size) as upload:
            for chunk in body:
                upload.write(chunk)
            upload.finish()  # checks size and sha256; without it nothing is stored
        """
        self.blob_path(sha256)  # validates the digest before anything touches the disk
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        # Temp files of uploads whose server process died: nothing else would remove them.
        sweep_stale(tmp_dir / "upload")
        return BlobUpload(self, sha256, size, tmp_dir)

    def put_blob(self, data: bytes | Path, *, repo_path: str) -> TreeEntry:
        """Store ``data`` as a blob (no-op if present) and describe it as ``repo_path``."""
        sha256 = hashlib.sha256()
        if isinstance(data, bytes):
            size = len(data)
            sha256.update(data)
            digest = sha256.hexdigest()
            if not self.blob_path(digest).is_file():
                write_atomic(self.blob_path(digest), data)
            oid = git_blob_oid(data)
        else:
            digest, size, oid = self._put_blob_file(data)
        return TreeEntry(sha256=digest, size=size, blob_oid=oid, lfs=is_lfs(repo_path, size))

    def _put_blob_file(self, src: Path) -> tuple[str, int, str]:
        # One pass: hash while copying to a temporary blob, then rename it to its digest.
        size = src.stat().st_size
        sha256 = hashlib.sha256()
        sha1 = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
        tmp_dir = self.root / "blobs" / "sha256"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f".{uuid.uuid4().hex}.tmp"
        try:
            n = 0
            with src.open("rb") as fin, tmp.open("wb") as fout:
                while chunk := fin.read(_CHUNK):
                    sha256.update(chunk)
                    sha1.update(chunk)
                    fout.write(chunk)
                    n += len(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            if n != size:
                raise PermanentError(f"{src} changed size while it was being stored")
            digest = sha256.hexdigest()
            if not self.blob_path(digest).is_file():
                tmp.replace(self.blob_path(digest))
        finally:
            tmp.unlink(missing_ok=True)
        return digest, size, sha1.hexdigest()

    def create_commit(
        self,
        repo_id: str,
        files: Mapping[str, Path | bytes],
        *,
        message: str,
        branch: str = "main",
        parent: str | Literal["head"] | None = "head",
        tags: Iterable[str] = (),
        timestamp: datetime = DEFAULT_TIMESTAMP,
    ) -> str:
        """Commit exactly ``files`` (the whole tree) on ``branch``; return the commit id.

        ``parent="head"`` builds on the branch head and, as the Hub does, skips the commit
        when nothing changed. An explicit ``parent`` (or ``None`` for a root commit) makes
        the id independent of the branch's state; the branch then only moves forward: a
        commit already in its history is a no-op, and one that would rewrite it is refused.
        The repository is created when missing.
        """
        check_ref_name(branch)
        tag_names = [check_ref_name(t) for t in tags]
        paths = sorted(check_repo_path(p) for p in files)
        _check_no_file_dir_clash(paths)
        self.create_repo(repo_id)
        # Blobs first: a commit must never name a blob that is not on disk.
        tree = {p: self.put_blob(files[p], repo_path=p) for p in paths}
        with self._lock(repo_id):
            head = self.refs(repo_id).branches.get(branch)
            if parent == "head":
                if head is not None and self.tree(repo_id, head) == tree:
                    sha = head
                    self._apply_tags(repo_id, sha, tag_names)
                    return sha
                parent = head
            elif parent is not None:
                self.commit(repo_id, parent)
            sha = self._write_commit(repo_id, parent, message, timestamp, tree)
            if head is None or head == parent:
                if head != sha:
                    refs = self.refs(repo_id)
                    refs.branches[branch] = sha
                    self._write_refs(repo_id, refs)
            elif not self._reaches(repo_id, head, sha):
                raise PermanentError(
                    f"branch {branch!r} of {repo_id} is at {head}; a commit on parent "
                    f"{parent} would rewrite its history",
                    fix="commit with parent='head', or move the branch with set_branch",
                )
            self._apply_tags(repo_id, sha, tag_names)
            return sha

    def commit_changes(
        self,
        repo_id: str,
        changes: Sequence[Change],
        *,
        message: str,
        branch: str = "main",
        expected_head: str | None = None,
        timestamp: datetime | None = None,
    ) -> str:
        """Apply ``changes`` in order to the head of ``branch`` as one new commit (at
        ``timestamp``, default now); the new commit id, or the head's if nothing changed.

        The head is read and moved under the repository's lock, so of two commits built on
        one ``expected_head`` exactly one lands; the other raises
        :class:`CommitConflictError`. Every added blob must already be stored.
        """
        check_ref_name(branch)
        with self._lock(repo_id):
            head = self.refs(repo_id).branches.get(branch)
            if head is None:
                raise RevisionNotFoundError(
                    f"branch {branch!r} not found in {repo_id}",
                    fix="commit to an existing branch, or create it first (create_branch)",
                )
            if expected_head is not None and expected_head != head:
                raise CommitConflictError(
                    f"branch {branch!r} of {repo_id} is at {head}, not at the parent commit "
                    f"{expected_head} this commit was built on",
                    fix="fetch the branch again, rebuild the commit on its head and retry",
                )
            tree = dict(self.tree(repo_id, head))
            for change in changes:
                _apply(tree, change, repo_id)
            _check_no_file_dir_clash(sorted(tree))
            for path, entry in ((c.path, c.entry) for c in changes if isinstance(c, AddFile)):
                if not self.has_blob(entry.sha256, entry.size):
                    raise BlobMissingError(
                        f"{path} names content sha256:{entry.sha256} ({entry.size} bytes) "
                        f"that {repo_id} never received",
                        fix="upload the file's content first (the client's LFS upload step), "
                        "then commit",
                    )
            if tree == self.tree(repo_id, head):
                return head
            when = timestamp or datetime.now(UTC)
            sha = self._write_commit(repo_id, head, message, when, tree)
            refs = self.refs(repo_id)
            refs.branches[branch] = sha
            self._write_refs(repo_id, refs)
            return sha

    def _write_commit(
        self,
        repo_id: str,
        parent: str | None,
        message: str,
        timestamp: datetime,
        tree: Mapping[str, TreeEntry],
    ) -> str:
        body = {
            "parent": parent,
            "message": message,
            "timestamp": format_timestamp(timestamp),
            "tree": {p: e.model_dump() for p, e in sorted(tree.items())},
        }
        data = _canonical(body)
        sha = hashlib.sha1(data, usedforsecurity=False).hexdigest()
        path = self._repo_dir(repo_id) / "commits" / f"{sha}.json"
        if not path.is_file():
            write_atomic(path, data)
        return sha

    def _apply_tags(self, repo_id: str, sha: str, tags: Iterable[str]) -> None:
        for tag in tags:
            self.set_tag(repo_id, tag, sha)

    def _reaches(self, repo_id: str, head: str, sha: str) -> bool:
        return any(c.id == sha for c in self.history(repo_id, head))

    # --- locking ---------------------------------------------------------------------

    @contextmanager
    def _lock(self, repo_id: str | None = None) -> Iterator[None]:
        # flock serialises read-modify-write of refs.json/repo.json across processes. It is
        # per open file, so nested calls in one thread must not take it again (deadlock):
        # the depth is counted per thread.
        path = (self._repo_dir(repo_id) if repo_id else self.root) / ".lock"
        held: dict[str, int] = self._local.__dict__.setdefault("held", {})
        key = str(path)
        if held.get(key):
            held[key] += 1
            try:
                yield
            finally:
                held[key] -= 1
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            held[key] = 1
            try:
                yield
            finally:
                held[key] = 0
                fcntl.flock(f, fcntl.LOCK_UN)


class BlobUpload:
    """A blob being received: hashed while it is written to a temporary file, and stored
    under its sha256 only once exactly the announced bytes arrived. Until then, and after
    :meth:`abort` (or leaving the ``with`` block without :meth:`finish`), readers see
    nothing of it."""

    def __init__(self, store: HubStore, sha256: str, size: int, tmp_dir: Path) -> None:
        self.sha256 = sha256
        self.size = size
        self._store = store
        self._hash = hashlib.sha256()
        self._received = 0
        self._done = False
        # The pid in the name lets a later upload sweep this file if this process dies.
        self._tmp = tmp_dir / f".upload.{os.getpid()}.{secrets.token_hex(8)}.tmp"
        self._file: IO[bytes] | None = self._tmp.open("xb")

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; more bytes than announced is refused at once."""
        if self._file is None:
            raise PermanentError("write to a finished or aborted upload")
        self._received += len(chunk)
        if self._received > self.size:
            raise ChecksumMismatchError(
                f"LFS object {self.sha256}",
                f"{self.size} bytes",
                f"more ({self._received} so far)",
                source="announced size",
                fix="upload exactly the bytes announced to the batch endpoint",
            )
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self) -> None:
        """Check size and sha256, then store the blob (durably) under its digest."""
        if self._file is None:
            raise PermanentError("finish of a finished or aborted upload")
        try:
            actual = self._hash.hexdigest()
            if self._received != self.size:
                raise ChecksumMismatchError(
                    f"LFS object {self.sha256}",
                    f"{self.size} bytes",
                    f"{self._received} bytes",
                    source="announced size",
                    fix="upload the whole file again",
                )
            if actual != self.sha256:
                raise ChecksumMismatchError(
                    f"LFS object {self.sha256}",
                    self.sha256,
                    actual,
                    source="announced sha256",
                    fix="the bytes changed between hashing and upload (or in transit); "
                    "upload the file again",
                )
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            target = self._store.blob_path(self.sha256)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._tmp.replace(target)
            self._done = True
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop what was received (idempotent; a no-op after :meth:`finish`)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._done:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlobUpload:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


def _apply(tree: dict[str, TreeEntry], change: Change, repo_id: str) -> None:
    if isinstance(change, AddFile):
        tree[check_repo_path(change.path)] = change.entry
        return
    if isinstance(change, DeleteFile):
        if tree.pop(check_repo_path(change.path), None) is None:
            raise EntryNotFoundError(
                f"cannot delete {change.path}: A file with this name doesn't exist in {repo_id}",
                fix="check the path (folders are deleted with delete_folder)",
            )
        return
    prefix = check_repo_path(change.path.rstrip("/")) + "/"
    under = [p for p in tree if p.startswith(prefix)]
    if not under:
        raise EntryNotFoundError(
            f"cannot delete folder {change.path}: no file under it in {repo_id}",
            fix="check the folder's path",
        )
    for p in under:
        del tree[p]


def _check_no_file_dir_clash(paths: list[str]) -> None:
    names = set(paths)
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                raise UnsafePathError(
                    f"{p!r} needs {'/'.join(parts[:i])!r} to be a folder, but it is a file",
                    fix="rename one of the two paths",
                )
