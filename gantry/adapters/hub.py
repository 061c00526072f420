"""Adapter for a Hugging Face Hub endpoint (huggingface.co or any compatible one).

Wraps the real ``huggingface_hub`` client: resolve a revision to a commit with per-file
metadata, and download a chosen set of files at that commit. Maps the client's errors to
Gantry's, each naming the fix. Prefect-free.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import httpx
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils._paths import filter_repo_objects
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm
from pydantic import BaseModel, ConfigDict

from gantry.errors import (
    DiskFullError,
    DownloadIncompleteError,
    GantryError,
    GatedRepoError,
    HubAuthError,
    HubResponseError,
    HubUnavailableError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsafePathError,
)
from gantry.proc import redact_text
from gantry.spec import DEFAULT_HUB_ENDPOINT

try:  # huggingface_hub >= 2 speaks HTTP through httpx2, 1.x through httpx
    import httpx2

    _TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
        httpx.TransportError,
        httpx2.TransportError,
    )
except ImportError:  # pragma: no cover
    _TRANSPORT_ERRORS = (httpx.TransportError,)

log = logging.getLogger(__name__)


class HubFile(BaseModel):
    """A file in a repository at one commit, as the hub describes it."""

    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    #: sha256 from the LFS pointer; None for files stored in git proper.
    lfs_sha256: str | None
    #: git blob id (sha1 of "blob <size>\\0" + content); None if the hub did not say.
    git_oid: str | None


class RepoSnapshot(BaseModel):
    """A repository pinned to a commit, with the files selected for download."""

    model_config = ConfigDict(frozen=True)

    repo_id: str
    revision: str
    commit: str
    endpoint: str
    files: tuple[HubFile, ...]
    #: Whether the hub gates the files of this repository behind an access grant.
    gated: bool = False


def check_relative_path(name: str) -> None:
    """Refuse a repository file name that could escape the directory it is written to."""
    parts = name.split("/")
    if (
        not name
        or name.startswith(("/", "\\"))
        or "\\" in name
        or any(p in ("", ".", "..") for p in parts)
        or ":" in parts[0]
        or "\x00" in name
    ):
        raise UnsafePathError(
            f"the hub listed a file named {name!r}, which would escape the download directory",
            fix="this repository is unsafe to download as is; report it to its owner, or "
            "narrow source.allow_patterns so the file is not selected",
        )


class _LogProgress(hf_tqdm):
    """tqdm that reports large downloads to the log every few seconds instead of a bar."""

    interval_s: ClassVar[float] = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A disabled tqdm sets no ``desc`` (nor most attributes): keep our own label.
        self._label = str(kwargs.get("desc") or "download")
        kwargs["disable"] = True  # no terminal bar; we log instead
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._last = time.monotonic()
        self._done = 0

    def update(self, n: float | None = 1) -> bool | None:
        self._done += int(n or 0)
        now = time.monotonic()
        total = self.total or 0
        if total > 1 << 20 and now - self._last >= self.interval_s:
            self._last = now
            log.info(
                "%s: %.1f / %.1f MiB (%.0f%%)",
                self._label,
                self._done / 2**20,
                total / 2**20,
                100 * self._done / total,
            )
        return super().update(n)  # type: ignore[no-any-return]


def gated_without_token(
    repo_id: str, endpoint: str, token_env: str, *, withheld: bool = False
) -> GatedRepoError:
    """The error for a gated repository used without a token, cached files or not;
    ``withheld``: there was one, but not for this endpoint's host."""
    if withheld:
        host = endpoint.split("://", 1)[-1].split("/", 1)[0]
        return GatedRepoError(
            f"{repo_id} is a gated repository, and the token of {token_env} is not sent to "
            f"{host}: it goes only to huggingface.co, the host of $HF_ENDPOINT and the hosts "
            "GANTRY_TOKEN_HOSTS lists for it",
            fix=f"if {host} is meant to get it, set GANTRY_TOKEN_HOSTS='{token_env}={host}' on "
            "the machine that runs the release; otherwise correct source.endpoint",
        )
    return GatedRepoError(
        f"{repo_id} is a gated repository and no token was given",
        fix=f"request access at {endpoint}/{repo_id}, then export {token_env}=<a token with "
        "read access> (or set source.token_env / source.token_secret)",
    )


def _map_error(
    exc: BaseException,
    *,
    repo_id: str,
    revision: str,
    endpoint: str,
    token_env: str,
    has_token: bool,
) -> GantryError:
    where = f"{endpoint}/{repo_id}"
    text = redact_text(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, hf_errors.GatedRepoError):
        return GatedRepoError(
            f"{repo_id} is a gated repository and "
            + (
                "the token in $" + token_env + " has no access to it"
                if has_token
                else "no token was given"
            ),
            fix=f"request access at {where}, then export {token_env}=<a token with read "
            "access> (or set source.token_env to the variable that holds it)",
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return RepoNotFoundError(
            f"repository {repo_id} was not found on {endpoint}",
            fix="check source.repo_id and source.endpoint (or $HF_ENDPOINT); if the repository "
            f"is private, export {token_env}=<a token with read access>",
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return RevisionNotFoundError(
            f"revision {revision!r} does not exist in {repo_id} on {endpoint}",
            fix="set source.revision to an existing branch, tag or full commit sha "
            f"(see {where}/tree)",
        )
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return HubAuthError(
                f"{endpoint} refused the request for {repo_id} ({status}): {text}",
                fix=f"check the token in ${token_env} is valid and has read access",
            )
        if status is not None and (status >= 500 or status in (408, 429)):
            return HubUnavailableError(
                f"{endpoint} answered {status} for {repo_id}: {text}",
                fix="the hub is overloaded or down; the stage retries, re-run later if it "
                "keeps failing",
            )
        return HubResponseError(f"{endpoint} answered {status} for {repo_id}: {text}")
    if isinstance(
        exc, (*_TRANSPORT_ERRORS, hf_errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)
    ):
        if endpoint.rstrip("/") == DEFAULT_HUB_ENDPOINT:
            # Nothing chose this endpoint: most likely a machine without internet access
            # that was meant to use a mirror, so say which variable picks one.
            fix = (
                "set HF_ENDPOINT (or the spec's source.endpoint) to your Hub mirror; for the "
                "embedded hub: `export HF_ENDPOINT=$(gantry env url hub)` after `gantry env up`"
            )
        else:
            fix = (
                "check the endpoint is up and reachable (source.endpoint or $HF_ENDPOINT; for "
                "the embedded hub run `gantry env up`)"
            )
        return HubUnavailableError(f"cannot reach the hub at {endpoint}: {text}", fix=fix)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskFullError(Path(exc.filename or "."))
    # The client's own size check, after its resume attempts ran out: a plain OSError whose
    # text is the only mark of it. The transfer was cut, the content is not known bad.
    if isinstance(exc, OSError) and str(exc).startswith("Consistency check failed"):
        return DownloadIncompleteError(
            f"a download from {endpoint} for {repo_id} ended short: {text}",
            fix="the connection to the hub was cut; the stage retries (spec retries), re-run "
            "later if it keeps failing",
        )
    return HubResponseError(f"hub request for {repo_id} failed: {type(exc).__name__}: {text}")


class HubClient:
    """One hub endpoint, with a token (or none) and a timeout per request."""

    def __init__(
        self, endpoint: str, *, token: str | None, token_env: str, timeout_s: float
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._token = token
        self._token_env = token_env
        self.timeout_s = timeout_s
        self._api = HfApi(endpoint=self.endpoint, token=token or False)

    @contextmanager
    def _mapped(self, repo_id: str, revision: str) -> Iterator[None]:
        try:
            yield
        except GantryError:
            raise
        except Exception as exc:
            raise _map_error(
                exc,
                repo_id=repo_id,
                revision=revision,
                endpoint=self.endpoint,
                token_env=self._token_env,
                has_token=bool(self._token),
            ) from None

    def resolve(self, repo_id: str, revision: str, allow_patterns: Sequence[str]) -> RepoSnapshot:
        """Resolve ``revision`` to a commit and list the selected files with their digests."""
        with self._mapped(repo_id, revision):
            info = self._api.model_info(
                repo_id, revision=revision, files_metadata=True, timeout=self.timeout_s
            )
        if not info.sha:
            raise HubResponseError(f"{self.endpoint} did not say which commit {revision!r} is")
        siblings = list(info.siblings or [])
        for s in siblings:
            check_relative_path(s.rfilename)
        chosen = list(
            filter_repo_objects(
                siblings, allow_patterns=list(allow_patterns), key=lambda s: s.rfilename
            )
        )
        files = tuple(
            HubFile(
                path=s.rfilename,
                size=int(s.lfs.size if s.lfs else (s.size or 0)),
                lfs_sha256=s.lfs.sha256 if s.lfs else None,
                git_oid=s.blob_id,
            )
            for s in sorted(chosen, key=lambda s: s.rfilename)
        )
        return RepoSnapshot(
            repo_id=repo_id,
            revision=revision,
            commit=info.sha,
            endpoint=self.endpoint,
            files=files,
            gated=bool(info.gated),
        )

    def download(
        self,
        snap: RepoSnapshot,
        paths: Sequence[str],
        dest: Path,
        *,
        max_workers: int = 4,
        on_file: Callable[[str, Path], None] | None = None,
    ) -> None:
        """Download ``paths`` of ``snap`` (at its commit, never the moving revision) into
        ``dest``, ``max_workers`` files at a time. ``on_file(path, local_file)`` runs as soon
        as a file is complete, while the others still download (the caller hashes it then,
        with its bytes still in the page cache). Verification is the caller's job: the
        client checks sizes only."""
        if not paths:
            return
        # The client reads its download timeout from this module constant at call time.
        hf_constants.HF_HUB_DOWNLOAD_TIMEOUT = int(self.timeout_s)

        def one(path: str) -> None:
            # What snapshot_download does per file, minus its extra repo-info request (the
            # commit is already resolved) and plus the hook.
            local = hf_hub_download(
                snap.repo_id,
                path,
                revision=snap.commit,
                endpoint=self.endpoint,
                token=self._token or False,
                local_dir=dest,
                etag_timeout=self.timeout_s,
                tqdm_class=_LogProgress,
            )
            if on_file is not None:
                on_file(path, Path(str(local)))

        with self._mapped(snap.repo_id, snap.commit):
            pool = ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="hub")
            try:
                futures = [pool.submit(one, p) for p in paths]
                for fut in as_completed(futures):
                    fut.result()  # the first failure stops the rest
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
