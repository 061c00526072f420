"""Stage `weights`: the model files at a pinned commit, verified, in a local cache.

The stage's contract (:class:`WeightsResult`), its store and its checks live here, with
:func:`run` as the entry point; the Prefect task (and the token lookup from a Prefect
Secret block) is :mod:`tasks.weights`.

The cache is content-addressed: every file is stored once under ``blobs/sha256/<hex>``
and a snapshot (``snapshots/<owner>/<name>/<commit>.<selection>/``) is a tree of hard
links to blobs, completed by its manifest written last. So a second run at the same
commit downloads nothing, a revision that shares files with a cached one downloads only
the difference, and a run killed at any point leaves no half-snapshot a re-run could
mistake for a finished one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from gantry.adapters.hub import (
    HubClient,
    HubFile,
    RepoSnapshot,
    check_relative_path,
    gated_without_token,
)
from gantry.atomicfile import link_or_copy
from gantry.errors import (
    ChecksumMismatchError,
    DiskFullError,
    DownloadIncompleteError,
    HubResponseError,
)
from gantry.manifest import (
    ManifestEntry,
    WeightsManifest,
    hash_many,
    sha256_and_git_oid,
    sha256_file,
)
from gantry.scratch import scratch_dir
from gantry.spec import HubSource

log = logging.getLogger("gantry.weights")

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class WeightsResult(BaseModel):
    """The weights, pinned to a commit and verified, in the local content-addressed cache."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo_id: str
    revision: str = Field(description="The revision the spec asked for.")
    commit: str = Field(description="The commit sha it resolved to; used from then on.")
    endpoint: str
    uri: str = Field(description="hf://<repo>@<commit>, the weights' immutable address.")
    manifest_digest: str
    manifest_path: str
    path: str = Field(description="Snapshot directory, mounted read-only into containers.")
    file_count: int
    total_bytes: int
    downloaded_files: int = Field(description="Files fetched from the hub by this run.")
    downloaded_bytes: int
    verify_seconds: float = Field(description="Time spent hashing the files.")
    cached: bool = Field(description="True when no file had to be downloaded.")


class WeightStore:
    """The content-addressed weights cache under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.oids = root / "blobs" / "git-sha1"
        self.snapshots = root / "snapshots"
        self.tmp = root / "tmp"

    def ensure_dirs(self) -> None:
        for d in (self.blobs, self.oids, self.snapshots, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def snapshot_dir(self, repo_id: str, commit: str, patterns: tuple[str, ...]) -> Path:
        # The file selection is part of the key: two specs that pick different files from
        # one commit must not see each other's snapshots.
        sel = hashlib.sha256("\n".join(sorted(patterns)).encode()).hexdigest()[:10]
        return self.snapshots / repo_id / f"{commit}.{sel}"

    @staticmethod
    def manifest_path(snapshot: Path) -> Path:
        return snapshot.with_name(snapshot.name + ".manifest.json")

    def blob_for(self, f: HubFile) -> Path | None:
        """A stored blob with this file's content, if the hub told us enough to find one."""
        if f.lfs_sha256 and (p := self.blobs / f.lfs_sha256).is_file():
            return p
        if f.git_oid and (p := self.oids / f.git_oid).is_file():
            return p.resolve()  # the index entry links to the sha256-named blob
        return None

    def add_blob(self, src: Path, sha256: str, git_oid: str) -> Path:
        """Move a verified file into the blob store (atomic; the first writer wins)."""
        dest = self.blobs / sha256
        if not dest.exists():
            src.chmod(0o444)  # cached weights are never edited in place
            os.replace(src, dest)
        oid_link = self.oids / git_oid
        if not oid_link.exists():
            # Small git-stored files are known to the hub only by their git blob id: index
            # them by it too, as a relative symlink to the sha256-named blob. Made beside
            # ``src`` (in the run's scratch dir), so a kill cannot leave it in the store.
            tmp = src.with_name(f".oid-{git_oid}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(Path("..") / "sha256" / sha256)
            os.replace(tmp, oid_link)
        return dest


def _verify_download(path: Path, f: HubFile, actual_sha: str, oid: str) -> None:
    """Check a downloaded file (its sha256 and git blob id) against the hub's metadata."""
    size = path.stat().st_size
    if size < f.size:
        # Short, not wrong: the transfer was cut. Transient, so the stage downloads again.
        raise DownloadIncompleteError(
            f"{f.path} arrived with {size} of its {f.size} bytes",
            fix="the connection to the hub was cut; the stage retries (spec retries), re-run "
            "later if it keeps failing",
        )
    if size != f.size:
        raise ChecksumMismatchError(
            f.path,
            f"{f.size} bytes",
            f"{size} bytes",
            source="size",
            fix="the hub served more bytes than its own metadata lists; re-run, and if it "
            "persists report the repository to its owner",
        )
    if f.lfs_sha256 is not None:
        if actual_sha != f.lfs_sha256:
            raise ChecksumMismatchError(
                f.path,
                f.lfs_sha256,
                actual_sha,
                source="LFS sha256",
                fix="the hub served content that does not match its own LFS metadata; re-run, "
                "and if it persists report the repository to its owner",
            )
    elif f.git_oid is not None and oid != f.git_oid:
        raise ChecksumMismatchError(
            f.path,
            f.git_oid,
            oid,
            source="git blob id",
            fix="the hub served content that does not match its git blob id; re-run, and if "
            "it persists report the repository to its owner",
        )


def verify_snapshot(snapshot: Path, manifest: WeightsManifest) -> float:
    """Re-hash every file of a cached snapshot against its manifest; seconds spent."""
    t0 = time.monotonic()
    paths = [snapshot / e.path for e in manifest.files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ChecksumMismatchError(
            missing[0],
            "a cached file",
            "nothing",
            source="manifest",
            fix=f"the cached snapshot is incomplete; delete {snapshot} and "
            f"{WeightStore.manifest_path(snapshot)} and re-run",
        )
    _check_only_listed_files(snapshot, {e.path for e in manifest.files})
    actual = hash_many(paths, sha256_file)
    for entry, got, p in zip(manifest.files, actual, paths, strict=True):
        if got != entry.sha256:
            raise ChecksumMismatchError(
                str(p),
                entry.sha256,
                got,
                source="manifest sha256",
                fix=f"the cached copy was modified after download; delete {snapshot}, its "
                f"manifest and the blob {p.resolve()}, then re-run to download it again",
            )
    return time.monotonic() - t0


def _check_only_listed_files(snapshot: Path, listed: set[str]) -> None:
    """A snapshot holds real files and folders, exactly those of its manifest: a symlink
    (even to identical bytes) would be followed by whoever reads the mount, an extra file
    would be mounted unverified."""
    for top, dirs, files in os.walk(snapshot):
        for name in [*dirs, *files]:
            p = Path(top) / name
            rel = p.relative_to(snapshot).as_posix()
            if p.is_symlink():
                what = f"a symlink to {p.readlink()}"
            elif name in files and rel not in listed:
                what = "a file its manifest does not list"
            else:
                continue
            raise ChecksumMismatchError(
                rel,
                "only regular files of the manifest",
                what,
                source="in the snapshot",
                fix=f"the cached snapshot was tampered with; delete {snapshot} and "
                f"{WeightStore.manifest_path(snapshot)} and re-run",
            )


def _load_manifest(path: Path) -> WeightsManifest | None:
    try:
        return WeightsManifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("ignoring unreadable manifest %s; the snapshot will be rebuilt", path)
        return None


def _result(
    source: HubSource,
    revision: str,
    commit: str,
    endpoint: str,
    snapshot: Path,
    manifest: WeightsManifest,
    *,
    downloaded: list[HubFile],
    verify_s: float,
) -> WeightsResult:
    return WeightsResult(
        repo_id=source.repo_id,
        revision=revision,
        commit=commit,
        endpoint=endpoint,
        uri=f"hf://{source.repo_id}@{commit}",
        manifest_digest=manifest.digest,
        manifest_path=str(WeightStore.manifest_path(snapshot)),
        path=str(snapshot),
        file_count=len(manifest.files),
        total_bytes=manifest.total_bytes,
        downloaded_files=len(downloaded),
        downloaded_bytes=sum(f.size for f in downloaded),
        verify_seconds=round(verify_s, 3),
        cached=not downloaded,
    )


def _write_atomic(path: Path, data: bytes, scratch: Path) -> None:
    """Write ``path`` whole or not at all; the temp file lives in the run's ``scratch``
    dir (same filesystem), so a kill never leaves it in the store."""
    tmp = scratch / f".{path.name}.tmp"
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


#: Where any Hub token may go; each token also to the host of $HF_ENDPOINT (the machine's
#: own configuration, not a spec's) and to the hosts GANTRY_TOKEN_HOSTS lists for it.
TOKEN_HOSTS = ("huggingface.co",)


def _host(url: str) -> str:
    return urlsplit(url).netloc.lower().rpartition("@")[2]


def token_allowed(
    source: HubSource, endpoint: str, token_hosts: Mapping[str, Sequence[str]]
) -> bool:
    """Whether the token of ``source`` may be sent to ``endpoint``: a spec names where its
    weights come from, not where the machine's credentials go."""
    name = f"secret:{source.token_secret}" if source.token_secret else source.token_env
    allowed = {*TOKEN_HOSTS, *(h.lower() for h in token_hosts.get(name, ()))}
    if env_endpoint := os.environ.get("HF_ENDPOINT"):
        allowed.add(_host(env_endpoint))
    return _host(endpoint) in allowed


def run(
    source: HubSource,
    store: WeightStore,
    *,
    token: str | None = None,
    client: HubClient | None = None,
    token_hosts: Mapping[str, Sequence[str]] | None = None,
) -> WeightsResult:
    """Resolve, download (what is not cached), verify and snapshot the weights.

    A cached snapshot is re-hashed against its manifest on every use, so a file changed
    on disk fails here, naming it and both digests. ``token`` is sent only to the hosts
    :func:`token_allowed` names.
    """
    store.ensure_dirs()
    endpoint = source.resolved_endpoint()
    withheld = False
    if token and not token_allowed(source, endpoint, token_hosts or {}):
        log.warning(
            "not sending the token from %s to %s: that host is not one it is meant for "
            "(huggingface.co, $HF_ENDPOINT's, or GANTRY_TOKEN_HOSTS)",
            f"Prefect Secret {source.token_secret}"
            if source.token_secret
            else f"${source.token_env}",
            _host(endpoint),
        )
        token, withheld = None, True
    hub = client or HubClient(
        endpoint, token=token, token_env=source.token_env, timeout_s=source.timeout_s
    )

    # A full commit sha is immutable: with its snapshot cached, the hub is not asked at all.
    if _COMMIT.match(source.revision):
        snap_dir, m = _cached(store, source, source.revision)
        if m is not None:
            if m.gated and not token:
                raise gated_without_token(
                    source.repo_id, endpoint, source.token_env, withheld=withheld
                )
            return _from_cache(source, source.revision, endpoint, snap_dir, m)

    log.info("resolving %s@%s on %s", source.repo_id, source.revision, endpoint)
    snap = hub.resolve(source.repo_id, source.revision, source.allow_patterns)
    if not snap.files:
        raise HubResponseError(
            f"no file of {source.repo_id}@{snap.commit} matches source.allow_patterns "
            f"{list(source.allow_patterns)}",
            fix="fix source.allow_patterns (globs over repository paths, e.g. 'onnx/*.onnx')",
        )
    log.info(
        "%s resolves to commit %s (%d files, %.1f MiB)",
        source.revision,
        snap.commit,
        len(snap.files),
        sum(f.size for f in snap.files) / 2**20,
    )
    # Like the Hub, gated repositories list their files to anyone but serve them only with
    # a token: a copy cached by someone who had one is not served to someone who has none.
    if snap.gated and not token:
        raise gated_without_token(source.repo_id, endpoint, source.token_env, withheld=withheld)
    snap_dir, m = _cached(store, source, snap.commit)
    if m is not None:
        _check_manifest_matches_hub(m, snap, snap_dir)
        return _from_cache(source, snap.commit, endpoint, snap_dir, m)

    return _build_snapshot(source, snap, store, hub, snap_dir, endpoint)


def _cached(
    store: WeightStore, source: HubSource, commit: str
) -> tuple[Path, WeightsManifest | None]:
    """The snapshot dir for ``commit`` and its manifest, if a finished snapshot is cached."""
    snap_dir = store.snapshot_dir(source.repo_id, commit, source.allow_patterns)
    m = _load_manifest(store.manifest_path(snap_dir))
    return snap_dir, m if m is not None and snap_dir.is_dir() else None


def _from_cache(
    source: HubSource, commit: str, endpoint: str, snap_dir: Path, m: WeightsManifest
) -> WeightsResult:
    log.info("weights cached at %s; verifying %d files", snap_dir, len(m.files))
    secs = verify_snapshot(snap_dir, m)
    return _result(
        source, source.revision, commit, endpoint, snap_dir, m, downloaded=[], verify_s=secs
    )


def _check_manifest_matches_hub(m: WeightsManifest, snap: RepoSnapshot, snap_dir: Path) -> None:
    listed = {f.path: f for f in snap.files}
    cached = {e.path: e for e in m.files}
    if listed.keys() != cached.keys() or any(
        (f.lfs_sha256 is not None and f.lfs_sha256 != cached[p].sha256) or f.size != cached[p].size
        for p, f in listed.items()
    ):
        raise ChecksumMismatchError(
            str(snap_dir),
            f"the hub's listing of {snap.commit}",
            "a different cached manifest",
            source="manifest",
            fix=f"delete {snap_dir} and its manifest, then re-run",
        )


def _build_snapshot(
    source: HubSource,
    snap: RepoSnapshot,
    store: WeightStore,
    hub: HubClient,
    snap_dir: Path,
    endpoint: str,
) -> WeightsResult:
    for f in snap.files:
        check_relative_path(f.path)
    need = [f for f in snap.files if store.blob_for(f) is None]
    have = len(snap.files) - len(need)
    log.info(
        "downloading %d files (%.1f MiB); %d already in the cache",
        len(need),
        sum(f.size for f in need) / 2**20,
        have,
    )
    t0 = time.monotonic()
    try:
        with scratch_dir(store.tmp, "snap-") as work:
            manifest, t_verify = _download_and_publish(store, snap, hub, need, snap_dir, work)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(store.root) from None
        raise
    log.info(
        "weights %s@%s: manifest %s in %.1fs",
        snap.repo_id,
        snap.commit[:12],
        manifest.digest[:16],
        time.monotonic() - t0,
    )
    return _result(
        source,
        source.revision,
        snap.commit,
        endpoint,
        snap_dir,
        manifest,
        downloaded=need,
        verify_s=t_verify,
    )


def _download_and_publish(
    store: WeightStore,
    snap: RepoSnapshot,
    hub: HubClient,
    need: list[HubFile],
    snap_dir: Path,
    work: Path,
) -> tuple[WeightsManifest, float]:
    """Download ``need`` into ``work``, verify, store the blobs, publish the snapshot;
    the manifest and the seconds spent verifying."""
    dl = work / "download"
    dl.mkdir()
    # Each file is hashed (read once, for its sha256 and git blob id) the moment it is
    # complete, in its download thread, while the other files are still arriving.
    digests: dict[str, tuple[str, str]] = {}
    hashing: list[float] = []

    def hash_now(path: str, local: Path) -> None:
        t = time.monotonic()
        digests[path] = sha256_and_git_oid(local)
        hashing.append(time.monotonic() - t)

    hub.download(snap, [f.path for f in need], dl, on_file=hash_now)
    blobs: dict[str, Path] = {}
    for f in need:
        p = dl / f.path
        if not p.is_file() or f.path not in digests:
            raise HubResponseError(
                f"the hub did not deliver {f.path} of {snap.repo_id}@{snap.commit}"
            )
        sha, oid = digests[f.path]
        _verify_download(p, f, sha, oid)
        blobs[f.path] = store.add_blob(p, sha, oid)
    t_verify = sum(hashing)

    tree = work / "snapshot"
    entries: list[ManifestEntry] = []
    for f in snap.files:
        blob = blobs.get(f.path) or store.blob_for(f)
        assert blob is not None  # either downloaded just now or found in the store
        target = tree / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(blob, target)
        entries.append(ManifestEntry(path=f.path, size=blob.stat().st_size, sha256=blob.name))
    manifest = WeightsManifest.build(snap.repo_id, snap.commit, entries, gated=snap.gated)

    # Publish: the tree first, the manifest last. Only a snapshot with a manifest counts.
    snap_dir.parent.mkdir(parents=True, exist_ok=True)
    if snap_dir.exists():
        shutil.rmtree(snap_dir)  # a leftover of a run killed before its manifest
    os.replace(tree, snap_dir)
    _write_atomic(
        WeightStore.manifest_path(snap_dir),
        json.dumps(manifest.model_dump(mode="json"), indent=2).encode(),
        work,
    )
    return manifest, t_verify
