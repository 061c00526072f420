"""Publishing to the local Hub endpoint with the real ``huggingface_hub`` client and ``hf``.

One endpoint (in a thread) over a fresh store serves the module. The client uploads over
Xet whenever ``hf_xet`` is installed; the local hub speaks LFS, so these tests (like the
README) set ``HF_HUB_DISABLE_XET`` — and one shows what happens without it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, get_session, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils.tqdm import disable_progress_bars

from gantry.localhub.server import create_app, serve_in_thread
from gantry.localhub.store import HubStore

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
HF_CLI = REPO_ROOT / ".venv" / "bin" / "hf"
CLI_READ_TOKEN = "server-read-token-0123456789"


@dataclass(frozen=True)
class Hub:
    url: str
    store: HubStore
    writer: str
    reader: str
    request_log: Path

    def api(self, token: str | bool | None = None) -> HfApi:
        return HfApi(endpoint=self.url, token=self.writer if token is None else token)

    def requests(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.request_log.read_text().splitlines()]

    def blobs(self) -> set[str]:
        d = self.store.root / "blobs" / "sha256"
        return {p.name for p in d.iterdir()} if d.is_dir() else set()

    def temp_files(self) -> list[Path]:
        d = self.store.root / "tmp"
        return list(d.iterdir()) if d.is_dir() else []


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    disable_progress_bars()
    root = tmp_path_factory.mktemp("upload-hub")
    store = HubStore(root / "store")
    writer = store.create_token(role="write", name="tests")
    reader = store.create_token(role="read", name="tests-read")
    log = root / "requests.jsonl"
    app = create_app(store, tokens=[CLI_READ_TOKEN], request_log=log)
    with pytest.MonkeyPatch.context() as mp, serve_in_thread(app) as url:
        mp.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        yield Hub(url, store, writer, reader, log)


def _model_dir(root: Path) -> Path:
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "config.json").write_text('{"hidden_size": 8}\n')
    (root / "nested" / "deeper" / "notes.txt").write_text("nested file\n")
    (root / "model.safetensors").write_bytes(os.urandom(1024 * 1024 + 4321))
    return root


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _head(hub: Hub, repo: str, rev: str = "main") -> str:
    return hub.store.resolve(repo, rev)


def _raw_commit(hub: Hub, repo: str, lines: list[dict[str, Any]]) -> httpx.Response:
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return httpx.post(
        f"{hub.url}/api/models/{repo}/commit/main",
        content=body,
        headers={"Authorization": f"Bearer {hub.writer}", "Content-Type": "application/x-ndjson"},
        timeout=30,
    )


def test_publish_with_the_client_then_download_the_same_bytes(hub: Hub, tmp_path: Path) -> None:
    api = hub.api()
    repo = "acme/tiny-model"
    url = api.create_repo(repo)
    assert url.repo_id == repo
    assert api.create_repo(repo, exist_ok=True).repo_id == repo
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_repo(repo)
    assert exists.value.response.status_code == 409

    src = _model_dir(tmp_path / "src")
    first = api.upload_folder(folder_path=src, repo_id=repo, commit_message="first upload")
    assert first.oid == _head(hub, repo)
    tree = hub.store.tree(repo, first.oid)
    assert tree["model.safetensors"].lfs and not tree["config.json"].lfs
    puts = [r for r in hub.requests() if r["method"] == "PUT"]
    assert len(puts) == 1 and puts[0]["status"] == 200  # only the LFS file goes by PUT

    card = api.upload_file(path_or_fileobj=b"# tiny\n", path_in_repo="README.md", repo_id=repo)
    api.create_tag(repo, tag="v1", revision=card.oid)
    api.create_branch(repo, branch="experiment", revision="v1")
    with pytest.raises(HfHubHTTPError) as tag_exists:
        api.create_tag(repo, tag="v1", revision="main")
    with pytest.raises(HfHubHTTPError) as branch_exists:
        api.create_branch(repo, branch="experiment")
    assert tag_exists.value.response.status_code == branch_exists.value.response.status_code == 409
    api.create_tag(repo, tag="v1", exist_ok=True)
    api.create_branch(repo, branch="experiment", exist_ok=True)
    gone = api.delete_file("nested/deeper/notes.txt", repo_id=repo, commit_message="drop notes")
    assert hub.store.commit(repo, gone.oid).parent == card.oid

    refs = api.list_repo_refs(repo)
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": card.oid}
    assert {b.name: b.target_commit for b in refs.branches} == {
        "main": gone.oid,
        "experiment": card.oid,
    }
    expected = {**_tree_bytes(src), "README.md": b"# tiny\n"}
    for rev, drop in (("v1", None), ("main", "nested/deeper/notes.txt")):
        path = Path(
            snapshot_download(repo, revision=rev, endpoint=hub.url, cache_dir=tmp_path / rev)
        )
        got = _tree_bytes(path)
        assert got.pop(".gitattributes").startswith(b"*.")  # as a new Hub repo starts
        assert got == {p: d for p, d in expected.items() if p != drop}
    info = api.model_info(repo, revision="v1", files_metadata=True)
    lfs = {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if s.lfs is not None}
    assert lfs == {"model.safetensors": _sha256(expected["model.safetensors"])}


def test_unchanged_and_known_content_is_not_sent_again(hub: Hub, tmp_path: Path) -> None:
    api = hub.api()
    repo = "acme/dedup"
    api.create_repo(repo)
    src = _model_dir(tmp_path / "src")
    first = api.upload_folder(folder_path=src, repo_id=repo)
    n_puts = sum(r["method"] == "PUT" for r in hub.requests())
    # Same folder again: preupload reports every file's oid, so nothing is committed.
    again = api.upload_folder(folder_path=src, repo_id=repo)
    assert again.oid == first.oid == _head(hub, repo)
    # The same LFS content under a new name: the batch answers without an upload action.
    copy = api.upload_file(
        path_or_fileobj=src / "model.safetensors", path_in_repo="copy.safetensors", repo_id=repo
    )
    assert copy.oid != first.oid
    assert sum(r["method"] == "PUT" for r in hub.requests()) == n_puts


def test_hf_upload_cli(hub: Hub, tmp_path: Path) -> None:
    src = _model_dir(tmp_path / "src")
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": hub.writer,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    argv = [str(HF_CLI), "upload", "acme/from-cli", str(src)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    head = _head(hub, "acme/from-cli")
    assert head in done.stdout  # `hf` prints the commit URL
    tree = hub.store.tree("acme/from-cli", head)
    assert tree["model.safetensors"].sha256 == _sha256((src / "model.safetensors").read_bytes())
    assert set(tree) == {".gitattributes", *_tree_bytes(src)}

    # A branch that does not exist yet is created from main, as on the Hub.
    (src / "config.json").write_text('{"hidden_size": 16}\n')
    branch = [*argv, "--revision", "tuned", "--commit-message", "tune"]
    done = subprocess.run(branch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tuned = hub.store.commit("acme/from-cli", _head(hub, "acme/from-cli", "tuned"))
    assert tuned.parent == head and tuned.message == "tune"
    assert _head(hub, "acme/from-cli") == head


def test_hf_upload_over_xet_is_refused_with_the_fix(hub: Hub, tmp_path: Path) -> None:
    src = _model_dir(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
    env |= {"HF_ENDPOINT": hub.url, "HF_TOKEN": hub.writer, "HF_HOME": str(tmp_path / "h")}
    argv = [str(HF_CLI), "upload", "acme/xet-attempt", str(src)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "xet-write-token" in done.stderr  # hf_xet shows the URL, not the answer's text
    refused = [r for r in hub.requests() if "xet-write-token" in r["path"]]
    assert refused and {r["status"] for r in refused} == {501}
    answer = httpx.get(f"{hub.url}{refused[0]['path']}", timeout=10)
    assert "HF_HUB_DISABLE_XET=1" in answer.headers["X-Error-Message"]
    assert hub.store.tree("acme/xet-attempt", _head(hub, "acme/xet-attempt")).keys() == {
        ".gitattributes"
    }


def test_writes_need_a_write_token(hub: Hub) -> None:
    repo = "acme/guarded"
    hub.api().create_repo(repo)
    head = _head(hub, repo)
    add = [CommitOperationAdd(path_in_repo="x.txt", path_or_fileobj=b"x")]
    writes: list[Callable[[HfApi], object]] = [
        lambda api: api.create_repo("acme/other-one"),
        lambda api: api.create_commit(repo, add, commit_message="m"),
        lambda api: api.create_tag(repo, tag="t"),
        lambda api: api.create_branch(repo, branch="b"),
    ]
    for token, status in (
        (False, 401),
        ("not-a-token", 401),
        (hub.reader, 403),
        (CLI_READ_TOKEN, 403),
    ):
        for write in writes:
            with pytest.raises(HfHubHTTPError) as err:
                write(hub.api(token))
            assert err.value.response.status_code == status, (token, err.value)
            assert not isinstance(err.value, RepositoryNotFoundError)
    assert _head(hub, repo) == head
    assert hub.store.refs(repo).tags == {} and set(hub.store.refs(repo).branches) == {"main"}
    assert not hub.store.repo_exists("acme/other-one")
    # What a read token is for: a private repository's content.
    hub.api().create_repo("acme/secret", private=True)
    with pytest.raises(RepositoryNotFoundError):
        hub.api(False).model_info("acme/secret")
    assert hub.api(hub.reader).model_info("acme/secret").private is True


def _batch(hub: Hub, repo: str, data: bytes) -> dict[str, Any]:
    answer = httpx.post(
        f"{hub.url}/{repo}.git/info/lfs/objects/batch",
        json={
            "operation": "upload",
            "transfers": ["basic"],
            "objects": [{"oid": _sha256(data), "size": len(data)}],
            "hash_algo": "sha256",
        },
        headers={"Authorization": f"Bearer {hub.writer}"},
        timeout=10,
    )
    answer.raise_for_status()
    obj: dict[str, Any] = answer.json()["objects"][0]
    return obj


def test_lfs_content_that_does_not_hash_to_its_oid_is_refused(hub: Hub) -> None:
    repo = "acme/mismatch"
    hub.api().create_repo(repo)
    announced = os.urandom(4096)
    href = _batch(hub, repo, announced)["actions"]["upload"]["href"]
    wrong = os.urandom(4096)  # same size, other bytes
    answer = httpx.put(href, content=wrong, timeout=10)
    assert answer.status_code == 400
    message = answer.headers["X-Error-Message"]
    assert _sha256(announced) in message and _sha256(wrong) in message
    assert _sha256(announced) not in hub.blobs() and _sha256(wrong) not in hub.blobs()
    assert not hub.temp_files()
    # A tampered link is refused before any byte is read.
    forged = href.replace("size=4096", "size=4097")
    assert httpx.put(forged, content=wrong + b"x", timeout=10).status_code == 403
    # The right bytes then go through, and the batch stops asking for them.
    assert httpx.put(href, content=announced, timeout=10).status_code == 200
    assert "actions" not in _batch(hub, repo, announced)


def test_commit_naming_content_never_uploaded_is_refused(hub: Hub) -> None:
    repo = "acme/no-blob"
    hub.api().create_repo(repo)
    head = _head(hub, repo)
    oid = _sha256(b"never sent")
    answer = _raw_commit(
        hub,
        repo,
        [
            {"key": "header", "value": {"summary": "m"}},
            {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid}},
        ],
    )
    assert answer.status_code == 400
    assert "w.bin" in answer.headers["X-Error-Message"] and oid in answer.headers["X-Error-Message"]
    assert _head(hub, repo) == head


@pytest.mark.parametrize("path", ["../escape.txt", "/etc/passwd", "a\\..\\b", "a/../../b", "a//b"])
def test_paths_escaping_the_repository_are_refused(hub: Hub, path: str) -> None:
    repo = "acme/paths"
    hub.api().create_repo(repo, exist_ok=True)
    head = _head(hub, repo)
    answer = _raw_commit(
        hub,
        repo,
        [
            {"key": "header", "value": {"summary": "m"}},
            {"key": "file", "value": {"path": path, "content": "eA==", "encoding": "base64"}},
        ],
    )
    assert answer.status_code == 400
    assert "refusing repository file path" in answer.headers["X-Error-Message"]
    assert _head(hub, repo) == head
    preupload = httpx.post(
        f"{hub.url}/api/models/{repo}/preupload/main",
        json={"files": [{"path": path, "size": 1, "sample": "eA=="}]},
        headers={"Authorization": f"Bearer {hub.writer}"},
        timeout=10,
    )
    assert preupload.status_code == 400


def test_interrupted_upload_leaves_nothing(hub: Hub) -> None:
    repo = "acme/interrupted"
    hub.api().create_repo(repo)
    data = os.urandom(2 * 1024 * 1024)
    href = urlsplit(_batch(hub, repo, data)["actions"]["upload"]["href"])
    with socket.create_connection((href.hostname or "", href.port or 80), timeout=10) as sock:
        head = (
            f"PUT {href.path}?{href.query} HTTP/1.1\r\nHost: {href.netloc}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        sock.sendall(head.encode() + data[: len(data) // 2])
        deadline = time.monotonic() + 10
        while not hub.temp_files():  # the server is receiving it
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while hub.temp_files():
        assert time.monotonic() < deadline, f"left behind: {hub.temp_files()}"
        time.sleep(0.02)
    assert _sha256(data) not in hub.blobs()
    assert "actions" in _batch(hub, repo, data)  # still to be uploaded


def test_concurrent_commits_on_one_parent_one_wins(hub: Hub) -> None:
    repo = "acme/race"
    hub.api().create_repo(repo)
    for attempt in range(3):
        parent = _head(hub, repo)
        start = threading.Barrier(2)
        results: dict[int, Any] = {}

        def commit(i: int, parent: str, start: threading.Barrier, results: dict[int, Any]) -> None:
            ops = [CommitOperationAdd(path_in_repo=f"f{i}.txt", path_or_fileobj=b"%d" % i)]
            start.wait()
            try:
                results[i] = hub.api().create_commit(
                    repo, ops, commit_message=f"writer {i}", parent_commit=parent
                )
            except HfHubHTTPError as exc:
                results[i] = exc

        threads = [
            threading.Thread(target=commit, args=(i, parent, start, results))
            for i in (attempt * 2, attempt * 2 + 1)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        won = [r for r in results.values() if not isinstance(r, HfHubHTTPError)]
        lost = [r for r in results.values() if isinstance(r, HfHubHTTPError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert lost[0].response.status_code == 412
        assert "A commit has happened since" in str(lost[0])
        assert _head(hub, repo) == won[0].oid
        assert hub.store.commit(repo, won[0].oid).parent == parent


def test_validate_yaml_refuses_a_broken_card(hub: Hub) -> None:
    api = hub.api()
    api.create_repo("acme/card")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(
            path_or_fileobj=b"---\nlicense: [unclosed\n---\n# card\n",
            path_in_repo="README.md",
            repo_id="acme/card",
        )


def test_regular_file_content_must_be_base64(hub: Hub) -> None:
    hub.api().create_repo("acme/b64")
    bad = base64.b64encode(b"ok").decode() + "!"
    answer = _raw_commit(
        hub,
        "acme/b64",
        [
            {"key": "header", "value": {"summary": "m"}},
            {"key": "file", "value": {"path": "a.txt", "content": bad, "encoding": "base64"}},
        ],
    )
    assert answer.status_code == 400 and "base64" in answer.headers["X-Error-Message"]


def test_delete_folder_and_missing_file(hub: Hub, tmp_path: Path) -> None:
    api = hub.api()
    repo = "acme/folders"
    api.create_repo(repo)
    src = _model_dir(tmp_path / "src")
    api.upload_folder(folder_path=src, repo_id=repo)
    api.delete_folder("nested", repo_id=repo)
    assert set(hub.store.tree(repo, _head(hub, repo))) == {
        ".gitattributes",
        "config.json",
        "model.safetensors",
    }
    with pytest.raises(RemoteEntryNotFoundError, match="A file with this name doesn't exist"):
        api.delete_file("nested/deeper/notes.txt", repo_id=repo)


def test_uploading_lends_a_writer_for_the_block_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gantry.localhub.demo import CLIENT_TIMEOUT_S, uploading

    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", False)
    store = HubStore(tmp_path / "store")
    with uploading(store) as api:
        assert hf_constants.HF_HUB_DISABLE_XET is True  # the local hub takes LFS only
        assert get_session().timeout.read == CLIENT_TIMEOUT_S  # the client has none of its own
        assert [t.role for t in store.tokens()] == ["write"]
        api.create_repo("acme/lent")
        api.upload_file(path_or_fileobj=b"x" * 2_000_000, path_in_repo="w.bin", repo_id="acme/lent")
        with uploading(store):  # overlapping blocks (e.g. threads) each get their own
            assert len(store.tokens()) == 2
        assert hf_constants.HF_HUB_DISABLE_XET is True
    assert hf_constants.HF_HUB_DISABLE_XET is False
    assert get_session().timeout.read is None
    assert store.tokens() == []
    assert store.tree("acme/lent", store.resolve("acme/lent", "main"))["w.bin"].lfs
