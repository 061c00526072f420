"""A tiny, real trivy vulnerability DB (schema 2) with planted findings, for offline tests.

Trivy's DB is a bbolt file (``trivy.db``) plus ``metadata.json`` in ``<cache dir>/db/``;
this writes both with the pure-Python ``boltdb`` port, laid out as aquasecurity/trivy-db
writes them:

* ``data-source``: bucket name -> ``{"ID", "Name", "URL"}`` of the advisory source;
* ``debian 12``: one nested bucket per Debian *source* package (trivy looks advisories up
  by the source name), vulnerability id -> advisory (``FixedVersion``; an unfixed one
  carries ``Status`` 2, "affected", as an int);
* ``vulnerability``: vulnerability id -> details (``Title``, ``VendorSeverity`` keyed by
  source id, 4 = CRITICAL).

The findings are planted in packages of ``debian:bookworm-slim`` with fixed versions
above anything bookworm ships, so trivy reports them on any image built from it. The ids
are in 2099 so they can never be mistaken for real CVEs.

The DB can also be served as trivy serves it (an OCI artifact with one
``application/vnd.aquasec.trivy.db.layer.v1.tar+gzip`` layer) from a local registry, so
the download path (``--db-repository``) is exercised without network access.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

#: trivy-db's schema version that trivy 0.59 reads.
SCHEMA_VERSION = 2
DB_MEDIA_TYPE = "application/vnd.aquasec.trivy.db.layer.v1.tar+gzip"
_DEBIAN_SOURCE = {
    "ID": "debian",
    "Name": "Debian Security Tracker",
    "URL": "https://salsa.debian.org/security-tracker-team/security-tracker",
}
_SEVERITY_INT = {"UNKNOWN": 0, "LOW": 1, "MEDIUM": 2, "HIGH": 3, "CRITICAL": 4}
_STATUS_AFFECTED = 2  # trivy-db stores advisory statuses as ints


@dataclass(frozen=True)
class Planted:
    """One planted advisory against a Debian source package."""

    id: str
    source_package: str
    binary_package: str
    severity: str
    fixed_version: str | None
    title: str


#: CRITICAL, fixed upstream: the finding the gate must block.
CRITICAL_FIXED = Planted(
    id="CVE-2099-0001",
    source_package="gzip",
    binary_package="gzip",
    severity="CRITICAL",
    fixed_version="1.12-1+deb12u99",
    title="gzip: planted test vulnerability (Gantry fixture, not real)",
)
#: HIGH with no fix yet: blocks only at `severity: HIGH`, and not with `ignore_unfixed`.
HIGH_UNFIXED = Planted(
    id="CVE-2099-0002",
    source_package="tar",
    binary_package="tar",
    severity="HIGH",
    fixed_version=None,
    title="tar: planted unfixed test vulnerability (Gantry fixture, not real)",
)
PLANTED = (CRITICAL_FIXED, HIGH_UNFIXED)


def _fix_meta_checksums(path: Path) -> None:
    """Write bbolt's meta-page checksums (FNV-1a 64 over the meta before the checksum).

    The ``boltdb`` port leaves them 0; Go's bbolt accepts 0 today, but a real checksum
    keeps the fixture valid for a bbolt that insists.
    """
    data = bytearray(path.read_bytes())
    page_header = 16  # id u64, flags u16, count u16, overflow u32
    meta_len = 4 * 4 + 8 * 5  # magic, version, pageSize, flags; root, seq, freelist, pgid, txid
    page_size = struct.unpack_from("<I", data, page_header + 8)[0]
    for page in (0, 1):
        start = page * page_size + page_header
        h = 0xCBF29CE484222325
        for b in data[start : start + meta_len]:
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        struct.pack_into("<Q", data, start + meta_len, h)
    path.write_bytes(bytes(data))


def build_db(
    cache_dir: Path,
    planted: tuple[Planted, ...] = PLANTED,
    *,
    updated_at: datetime | None = None,
    fixture: bool = True,
) -> Path:
    """Write ``<cache_dir>/db/{trivy.db,metadata.json}``; return the db directory.

    ``fixture`` adds a ``Fixture`` key to metadata.json (trivy ignores unknown keys), by
    which Gantry reports the DB as a test fixture rather than a real one.
    """
    import boltdb  # type: ignore[import-untyped]  # untyped pure-Python bbolt port

    db_dir = cache_dir / "db"
    db_dir.mkdir(parents=True, exist_ok=True)
    db_path = db_dir / "trivy.db"
    db_path.unlink(missing_ok=True)
    db = boltdb.BoltDB(str(db_path))
    try:
        with db.update() as tx:
            sources = tx.create_bucket(b"data-source")
            sources.put(b"debian 12", json.dumps(_DEBIAN_SOURCE).encode())
            debian = tx.create_bucket(b"debian 12")
            vulns = tx.create_bucket(b"vulnerability")
            for p in planted:
                pkg = debian.bucket(p.source_package.encode()) or debian.create_bucket(
                    p.source_package.encode()
                )
                advisory: dict[str, object] = (
                    {"FixedVersion": p.fixed_version}
                    if p.fixed_version
                    else {"Status": _STATUS_AFFECTED}
                )
                pkg.put(p.id.encode(), json.dumps(advisory).encode())
                detail = {
                    "Title": p.title,
                    "Description": f"{p.title}. Planted by tests/trivydb.py to prove the gate.",
                    "Severity": p.severity,
                    "VendorSeverity": {"debian": _SEVERITY_INT[p.severity]},
                    "References": [f"https://example.invalid/{p.id}"],
                }
                vulns.put(p.id.encode(), json.dumps(detail).encode())
    finally:
        db.close()
        # The port's __del__ closes again and trips over the closed descriptor.
        db.close = lambda: None
    _fix_meta_checksums(db_path)
    now = updated_at or datetime.now(UTC)
    meta: dict[str, object] = {
        "Version": SCHEMA_VERSION,
        "NextUpdate": _ts(now + timedelta(days=1)),
        "UpdatedAt": _ts(now),
        "DownloadedAt": _ts(now),
    }
    if fixture:
        meta["Fixture"] = "tests/trivydb.py: planted " + ", ".join(p.id for p in planted)
    (db_dir / "metadata.json").write_text(json.dumps(meta))
    return db_dir


def _ts(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def db_archive(db_dir: Path) -> bytes:
    """``db.tar.gz`` as trivy-db publishes it: trivy.db and metadata.json at the root."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("trivy.db", "metadata.json"):
            tar.add(db_dir / name, arcname=name)
    return gzip.compress(buf.getvalue(), mtime=0)


def push_db_artifact(registry: str, repository: str, tag: str, db_dir: Path) -> str:
    """Push the DB as trivy's OCI artifact to a plain-HTTP registry; return its digest."""
    layer = db_archive(db_dir)
    config = b"{}"
    base = f"http://{registry}/v2/{repository}"
    with httpx.Client(timeout=60) as http:
        for blob in (layer, config):
            digest = "sha256:" + hashlib.sha256(blob).hexdigest()
            start = http.post(f"{base}/blobs/uploads/")
            start.raise_for_status()
            location = start.headers["Location"]
            if location.startswith("/"):
                location = f"http://{registry}{location}"
            sep = "&" if "?" in location else "?"
            http.put(
                f"{location}{sep}digest={digest}",
                content=blob,
                headers={"Content-Type": "application/octet-stream"},
            ).raise_for_status()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.aquasec.trivy.config.v1+json",
                "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": DB_MEDIA_TYPE,
                    "digest": "sha256:" + hashlib.sha256(layer).hexdigest(),
                    "size": len(layer),
                    "annotations": {"org.opencontainers.image.title": "db.tar.gz"},
                }
            ],
        }
        body = json.dumps(manifest).encode()
        http.put(
            f"{base}/manifests/{tag}",
            content=body,
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        ).raise_for_status()
    return "sha256:" + hashlib.sha256(body).hexdigest()
