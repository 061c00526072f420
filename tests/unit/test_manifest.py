from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from gantry.manifest import (
    ManifestEntry,
    WeightsManifest,
    git_blob_oid,
    hash_many,
    manifest_digest,
    sha256_file,
)

pytestmark = pytest.mark.unit


def test_digest_is_order_independent_and_content_sensitive() -> None:
    a = ManifestEntry(path="a.json", size=1, sha256="0" * 64)
    b = ManifestEntry(path="onnx/model.onnx", size=2, sha256="1" * 64)
    assert manifest_digest([a, b]) == manifest_digest([b, a])
    expected = hashlib.sha256(
        f"a.json\t1\t{'0' * 64}\nonnx/model.onnx\t2\t{'1' * 64}\n".encode()
    ).hexdigest()
    assert manifest_digest([a, b]) == expected
    b2 = ManifestEntry(path="onnx/model.onnx", size=2, sha256="2" * 64)
    assert manifest_digest([a, b2]) != manifest_digest([a, b])
    m = WeightsManifest.build("o/r", "c" * 40, [b, a])
    assert [e.path for e in m.files] == ["a.json", "onnx/model.onnx"]
    assert m.digest == expected and m.total_bytes == 3


def test_hashes_match_reference_tools(tmp_path: Path) -> None:
    files = []
    for i in range(5):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]) * (i * 700_001))
        files.append(p)
    assert hash_many(files) == [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    assert sha256_file(files[2]) == hashlib.sha256(files[2].read_bytes()).hexdigest()
    git = subprocess.run(
        ["git", "hash-object", str(files[3])],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert git_blob_oid(files[3]) == git.stdout.strip()
