"""Stage `weights` against the real local Hub endpoint and the real huggingface_hub client."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gantry.errors import (
    ChecksumMismatchError,
    DiskFullError,
    GatedRepoError,
    HubUnavailableError,
    RepoNotFoundError,
    RevisionNotFoundError,
    is_transient,
)
from gantry.localhub.demo import DEMO_TOKEN, GATED_REPO_ID
from gantry.manifest import WeightsManifest, sha256_file
from gantry.spec import DEFAULT_ALLOW_PATTERNS, HubSource
from gantry.stages import weights as weights_stage
from gantry.stages.weights import WeightStore
from tests.support import GantryEnv

pytestmark = pytest.mark.integration


def _source(env: GantryEnv, revision: str = "v1", **kw: object) -> HubSource:
    data: dict[str, Any] = {
        "repo_id": env.repo_id,
        "revision": revision,
        "endpoint": env.hub_url,
        **kw,
    }
    return HubSource.model_validate(data)


def _downloads(env: GantryEnv) -> int:
    return int(env.hub_stats()["requests"]["download"])  # type: ignore[index]


def test_download_verify_and_cache(gantry_env: GantryEnv, tmp_path: Path) -> None:
    store = WeightStore(tmp_path / "w")
    gantry_env.reset_hub_stats()
    first = weights_stage.run(_source(gantry_env), store)
    assert first.commit == gantry_env.revisions["v1"]
    assert not first.cached and first.downloaded_files == first.file_count > 3
    assert first.uri == f"hf://{gantry_env.repo_id}@{first.commit}"
    assert _downloads(gantry_env) > 0
    snap = Path(first.path)
    assert (snap / "onnx" / "model.onnx").is_file() and (snap / "tokenizer.json").is_file()
    assert not (snap / ".cache").exists()  # no client metadata inside the mounted tree
    manifest = WeightsManifest.model_validate_json(Path(first.manifest_path).read_bytes())
    assert manifest.digest == first.manifest_digest
    for e in manifest.files:  # the manifest is the truth about the files on disk
        assert sha256_file(snap / e.path) == e.sha256

    # Second run: the revision is resolved (one API call), nothing is downloaded.
    gantry_env.reset_hub_stats()
    second = weights_stage.run(_source(gantry_env), store)
    assert second.cached and second.downloaded_files == 0
    assert second.manifest_digest == first.manifest_digest and second.path == first.path
    assert _downloads(gantry_env) == 0

    # A pinned commit with a cached snapshot makes no hub request at all.
    gantry_env.reset_hub_stats()
    pinned = weights_stage.run(_source(gantry_env, revision=first.commit), store)
    assert pinned.cached and pinned.manifest_digest == first.manifest_digest
    stats = gantry_env.hub_stats()["requests"]
    assert stats["api"] == 0 and stats["download"] == 0  # type: ignore[index]

    # A revision sharing the model file downloads only what changed.
    gantry_env.reset_hub_stats()
    v2 = weights_stage.run(_source(gantry_env, revision="v2"), store)
    assert v2.commit == gantry_env.revisions["v2"] and v2.manifest_digest != first.manifest_digest
    assert 0 < v2.downloaded_files < v2.file_count
    assert v2.downloaded_bytes < 2_000_000  # the 22 MiB model came from the blob store
    assert not list((store.tmp).iterdir())  # no temp leftovers


def test_flipped_byte_in_cache_names_file_and_digests(
    gantry_env: GantryEnv, tmp_path: Path
) -> None:
    store = WeightStore(tmp_path / "w")
    res = weights_stage.run(_source(gantry_env), store)
    target = Path(res.path) / "onnx" / "model.onnx"
    expected = sha256_file(target)
    os.chmod(target, 0o644)
    with target.open("r+b") as f:
        f.seek(1234)
        b = f.read(1)
        f.seek(1234)
        f.write(bytes([b[0] ^ 0xFF]))
    actual = sha256_file(target)
    with pytest.raises(ChecksumMismatchError) as e:
        weights_stage.run(_source(gantry_env), store)
    msg = str(e.value)
    assert "onnx/model.onnx" in msg and expected in msg and actual in msg
    assert not is_transient(e.value)


def test_unknown_repo_revision_and_gated(gantry_env: GantryEnv, tmp_path: Path) -> None:
    store = WeightStore(tmp_path / "w")
    with pytest.raises(RepoNotFoundError, match="fix:.*repo_id"):
        weights_stage.run(_source(gantry_env, repo_id="gantry-demo/no-such-model"), store)
    with pytest.raises(RevisionNotFoundError, match="no-such-branch"):
        weights_stage.run(_source(gantry_env, revision="no-such-branch"), store)
    with pytest.raises(GatedRepoError) as e:
        weights_stage.run(_source(gantry_env, repo_id=GATED_REPO_ID), store)
    assert "HF_TOKEN" in str(e.value) and "request access" in str(e.value)
    ok = weights_stage.run(_source(gantry_env, repo_id=GATED_REPO_ID), store, token=DEMO_TOKEN)
    assert ok.file_count > 3
    assert DEMO_TOKEN not in ok.model_dump_json()


def test_hub_down_is_transient(tmp_path: Path) -> None:
    src = HubSource(repo_id="a/b", endpoint="http://127.0.0.1:9", timeout_s=3)
    with pytest.raises(HubUnavailableError) as e:
        weights_stage.run(src, WeightStore(tmp_path / "w"))
    assert is_transient(e.value)


def test_hub_5xx_is_transient_and_recovers(gantry_env: GantryEnv, tmp_path: Path) -> None:
    faults = f"{gantry_env.hub_url}/_gantry/faults"
    httpx.post(
        faults,
        json={"mode": "status", "status": 503, "count": 20, "path_contains": "/api/models"},
        timeout=10,
    ).raise_for_status()
    try:
        with pytest.raises(HubUnavailableError, match="503") as e:
            weights_stage.run(_source(gantry_env), WeightStore(tmp_path / "w"))
        assert is_transient(e.value)
    finally:
        httpx.delete(faults, timeout=10)
    assert weights_stage.run(_source(gantry_env), WeightStore(tmp_path / "w")).file_count > 3


def test_truncated_download_leaves_nothing(gantry_env: GantryEnv, tmp_path: Path) -> None:
    store = WeightStore(tmp_path / "w")
    faults = f"{gantry_env.hub_url}/_gantry/faults"
    httpx.post(
        faults, json={"mode": "truncate", "count": 50, "path_contains": "model.onnx"}, timeout=10
    ).raise_for_status()
    try:
        with pytest.raises(Exception):  # noqa: B017 (the client or our size check refuses)
            weights_stage.run(_source(gantry_env), store)
    finally:
        httpx.delete(faults, timeout=10)
    assert not list(store.blobs.iterdir()) or all(
        sha256_file(p) == p.name for p in store.blobs.iterdir()
    )
    assert not list(store.tmp.iterdir())
    assert not list(store.snapshots.rglob("*.manifest.json"))
    assert weights_stage.run(_source(gantry_env), store).file_count > 3  # and a re-run finishes


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False, timeout=30)


def test_disk_full_keeps_no_partial_file(gantry_env: GantryEnv, tmp_path: Path) -> None:
    # The model is 22 MiB: a 4 MiB filesystem fills up during the download.
    with _tmpfs(tmp_path / "small", "4m") as root:
        store = WeightStore(root)
        with pytest.raises(DiskFullError, match="no space left") as e:
            weights_stage.run(_source(gantry_env), store)
        assert "GANTRY_STATE_DIR" in str(e.value)
        leftovers = [p for p in root.rglob("*") if p.is_file()]
        assert leftovers == [], leftovers


def test_allow_patterns_select_files(gantry_env: GantryEnv, tmp_path: Path) -> None:
    store = WeightStore(tmp_path / "w")
    only_json = weights_stage.run(_source(gantry_env, allow_patterns=("*.json",)), store)
    full = weights_stage.run(_source(gantry_env, allow_patterns=DEFAULT_ALLOW_PATTERNS), store)
    assert only_json.path != full.path  # the selection is part of the cache key
    names = {
        e.path
        for e in WeightsManifest.model_validate_json(
            Path(only_json.manifest_path).read_bytes()
        ).files
    }
    assert names and all(n.endswith(".json") for n in names)


def test_cached_gated_weights_still_need_a_token(gantry_env: GantryEnv, tmp_path: Path) -> None:
    store = WeightStore(tmp_path / "w")
    ok = weights_stage.run(_source(gantry_env, repo_id=GATED_REPO_ID), store, token=DEMO_TOKEN)
    with pytest.raises(GatedRepoError, match="no token"):
        weights_stage.run(_source(gantry_env, repo_id=GATED_REPO_ID), store)
    with pytest.raises(GatedRepoError, match="no token"):  # the no-request fast path too
        weights_stage.run(_source(gantry_env, repo_id=GATED_REPO_ID, revision=ok.commit), store)
    assert weights_stage.run(
        _source(gantry_env, repo_id=GATED_REPO_ID, revision=ok.commit), store, token=DEMO_TOKEN
    ).cached
