"""The local hub's repository store: safe paths, deterministic and idempotent commits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

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
from gantry.localhub.store import (
    AddFile,
    DeleteFile,
    DeleteFolder,
    HubStore,
    TreeEntry,
    git_blob_oid,
    gitattributes,
    is_lfs,
)

pytestmark = pytest.mark.unit

REPO = "acme/tiny"
FILES: dict[str, Path | bytes] = {
    "config.json": b'{"a": 1}\n',
    "onnx/model.onnx": b"\x08\x07fake-onnx",
    "sub/dir/notes.txt": b"hello\n",
}


def _files_on_disk(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize(
    "path",
    [
        "../escape.txt",
        "/etc/passwd",
        "a/../../b",
        "a/./b",
        "./a",
        "a//b",
        "a/",
        "",
        "a\\..\\b",
        "nul\0byte",
    ],
)
def test_commit_refuses_unsafe_paths(tmp_path: Path, path: str) -> None:
    store = HubStore(tmp_path)
    with pytest.raises(UnsafePathError):
        store.create_commit(REPO, {path: b"x"}, message="m")
    # Refused before anything was written: no repo, no blob.
    assert not store.repo_exists(REPO)
    assert not (tmp_path / "blobs").exists()


@pytest.mark.parametrize("repo_id", ["../x", "a/b/c", "a", "a/..", "a/.hidden", "a/b.git", "/a/b"])
def test_refuses_unsafe_repo_ids(tmp_path: Path, repo_id: str) -> None:
    with pytest.raises(UnsafePathError):
        HubStore(tmp_path).create_commit(repo_id, {"f": b"x"}, message="m")


def test_refuses_file_and_folder_with_one_name(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError):
        HubStore(tmp_path).create_commit(REPO, {"a": b"1", "a/b": b"2"}, message="m")


def test_blob_path_refuses_non_digests(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError):
        HubStore(tmp_path).blob_path("../../etc/passwd")


def test_commit_id_is_sha1_of_canonical_json(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    sha = store.create_commit(REPO, FILES, message="first")
    raw = (tmp_path / "repos" / REPO / "commits" / f"{sha}.json").read_bytes()
    assert hashlib.sha1(raw).hexdigest() == sha
    body = json.loads(raw)
    assert body["parent"] is None
    assert body["timestamp"] == "2024-01-01T00:00:00.000Z"
    entry = body["tree"]["sub/dir/notes.txt"]
    assert entry == {
        "sha256": hashlib.sha256(b"hello\n").hexdigest(),
        "size": 6,
        "blob_oid": "ce013625030ba8dba906f756967f9e9ca394464a",  # git hash-object
        "lfs": False,
    }
    assert body["tree"]["onnx/model.onnx"]["lfs"] is True


def test_same_inputs_give_same_ids_in_any_store(tmp_path: Path) -> None:
    (tmp_path / "src.txt").write_bytes(b"hello\n")
    files: dict[str, Path | bytes] = {**FILES, "sub/dir/notes.txt": tmp_path / "src.txt"}
    a = HubStore(tmp_path / "a").create_commit(REPO, FILES, message="m")
    b = HubStore(tmp_path / "b").create_commit(REPO, files, message="m")
    assert a == b


def test_recommitting_is_a_no_op(tmp_path: Path) -> None:
    store = HubStore(tmp_path / "s")
    first = store.create_commit(REPO, FILES, message="m", tags=["v1"])
    before = _files_on_disk(tmp_path / "s")
    # On the branch head (the Hub skips empty commits) and with an explicit parent.
    assert store.create_commit(REPO, FILES, message="other message", tags=["v1"]) == first
    assert store.create_commit(REPO, FILES, message="m", parent=None, tags=["v1"]) == first
    assert _files_on_disk(tmp_path / "s") == before


def test_replaying_history_keeps_the_branch_forward(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    a = store.create_commit(REPO, FILES, message="a", parent=None)
    b = store.create_commit(REPO, {**FILES, "x": b"2"}, message="b", parent=a)
    # Re-running the same sequence must not move main back to a.
    assert store.create_commit(REPO, FILES, message="a", parent=None) == a
    assert store.resolve(REPO, "main") == b
    assert store.create_commit(REPO, {**FILES, "x": b"2"}, message="b", parent=a) == b
    assert [c.id for c in store.history(REPO, b)] == [b, a]


def test_refuses_to_rewrite_a_branch(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    a = store.create_commit(REPO, FILES, message="a", parent=None)
    store.create_commit(REPO, {**FILES, "x": b"2"}, message="b")
    with pytest.raises(PermanentError, match="rewrite"):
        store.create_commit(REPO, {**FILES, "x": b"3"}, message="c", parent=a)


def test_tags_are_immutable(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    a = store.create_commit(REPO, FILES, message="a", tags=["v1"])
    b = store.create_commit(REPO, {**FILES, "x": b"2"}, message="b")
    with pytest.raises(PermanentError, match="already points"):
        store.set_tag(REPO, "v1", b)
    store.set_tag(REPO, "v1", b, force=True)
    assert store.resolve(REPO, "v1") == b != a


def test_resolve(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    a = store.create_commit(REPO, FILES, message="a", tags=["v1"])
    b = store.create_commit(REPO, {**FILES, "x": b"2"}, message="b", branch="dev", parent=a)
    other = store.create_commit("acme/other", {"y": b"1"}, message="o")
    assert store.resolve(REPO, "main") == a
    assert store.resolve(REPO, "v1") == a
    assert store.resolve(REPO, "dev") == b
    assert store.resolve(REPO, b) == b
    for bad in ("nope", other, "0" * 40, b[:7], "../main"):
        with pytest.raises(RevisionNotFoundError):
            store.resolve(REPO, bad)
    with pytest.raises(RepoNotFoundError):
        store.resolve("acme/missing", "main")


def test_lfs_rule() -> None:
    assert is_lfs("onnx/model.onnx", 10)
    assert is_lfs("model.safetensors", 10)
    assert is_lfs("pytorch_model.bin", 10)
    assert is_lfs("big.txt", 1024 * 1024 + 1)
    assert not is_lfs("tokenizer.json", 466_247)
    assert git_blob_oid(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


def test_lfs_entries_report_the_pointer_oid(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    sha = store.create_commit(REPO, FILES, message="m")
    entry = store.tree(REPO, sha)["onnx/model.onnx"]
    pointer = entry.lfs_pointer.decode()
    assert pointer.splitlines() == [
        "version https://git-lfs.github.com/spec/v1",
        f"oid sha256:{entry.sha256}",
        f"size {entry.size}",
    ]
    assert entry.hub_oid == git_blob_oid(entry.lfs_pointer) != entry.blob_oid
    with store.open_blob(entry.sha256) as f:
        assert f.read() == FILES["onnx/model.onnx"]


def test_failed_write_leaves_old_state_and_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = HubStore(tmp_path)
    a = store.create_commit(REPO, FILES, message="a")
    refs_before = (tmp_path / "repos" / REPO / "refs.json").read_bytes()

    real_replace = Path.replace

    def boom(self: Path, target: Path) -> Path:
        # Blobs and the commit land; the crash hits the ref update, the last step.
        if Path(target).name == "refs.json":
            raise OSError("disk on fire")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        store.create_commit(REPO, {**FILES, "x": b"new"}, message="b")
    monkeypatch.undo()
    assert (tmp_path / "repos" / REPO / "refs.json").read_bytes() == refs_before
    assert HubStore(tmp_path).resolve(REPO, "main") == a
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_flags_and_tokens(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    store.create_repo(REPO, gated=True)
    store.create_repo(REPO)  # exists: flags unchanged
    assert store.repo_flags(REPO).gated
    flags = store.set_repo_flags(REPO, private=True)
    assert flags.gated and flags.private
    assert store.list_repos() == [REPO]
    store.add_token("t1")
    store.add_token("t1")
    assert [t.role for t in store.tokens()] == ["read"]
    assert store.token_role("t1") == "read"
    assert store.token_role("t2") is None
    with pytest.raises(PermanentError):
        store.add_token("has space")


def test_tokens_keep_only_digests_and_roles(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    token = store.create_token(role="write", name="ci")
    reader = store.create_token(role="read", name="viewer")
    assert token != reader and len(token) > 40
    assert store.token_role(token) == "write"
    assert store.token_role(reader) == "read"
    path = tmp_path / "tokens.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert token not in path.read_text() and reader not in path.read_text()
    assert [(t.name, t.role) for t in store.tokens()] == [("ci", "write"), ("viewer", "read")]
    assert store.remove_tokens("ci") == 1
    assert store.token_role(token) is None
    assert store.remove_tokens("ci") == 0
    with pytest.raises(PermanentError, match="token name"):
        store.create_token(role="read", name="two words")


def test_first_token_format_still_opens_repos(tmp_path: Path) -> None:
    # The first tokens.json: a JSON list of plain tokens, each with read access.
    (tmp_path / "tokens.json").write_text('["old-token"]')
    store = HubStore(tmp_path)
    assert store.token_role("old-token") == "read"
    writer = store.create_token(role="write", name="new")
    assert "old-token" not in (tmp_path / "tokens.json").read_text()  # migrated to a digest
    assert store.token_role("old-token") == "read"
    assert store.token_role(writer) == "write"


def test_created_repo_starts_with_gitattributes(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    assert store.create_repo(REPO, initial_files={".gitattributes": gitattributes()})
    assert not store.create_repo(REPO, initial_files={".gitattributes": b"other"})
    head = store.resolve(REPO, "main")
    tree = store.tree(REPO, head)
    assert list(tree) == [".gitattributes"]
    with store.open_blob(tree[".gitattributes"].sha256) as f:
        assert b"*.onnx filter=lfs diff=lfs merge=lfs -text\n" in f.read()
    assert store.commit(REPO, head).parent is None


def _upload(store: HubStore, data: bytes) -> TreeEntry:
    sha = hashlib.sha256(data).hexdigest()
    with store.receive_blob(sha, len(data)) as up:
        up.write(data[:3])
        up.write(data[3:])
        up.finish()
    return TreeEntry(sha256=sha, size=len(data), blob_oid=None, lfs=True)


def test_received_blob_is_stored_only_when_it_hashes_right(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    good = _upload(store, b"weights" * 100)
    assert store.has_blob(good.sha256, good.size)
    announced = hashlib.sha256(b"the real bytes").hexdigest()
    for sent in (b"other bytes!!!", b"the real", b"the real bytes and more"):
        up = store.receive_blob(announced, len(b"the real bytes"))
        with up, pytest.raises(ChecksumMismatchError) as err:
            up.write(sent)
            up.finish()
        assert announced in str(err.value)
    assert not store.blob_path(announced).exists()
    assert not list((tmp_path / "tmp").iterdir())


def test_abandoned_upload_leaves_nothing(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    data = b"x" * 1000
    with store.receive_blob(hashlib.sha256(data).hexdigest(), len(data)) as up:
        up.write(data[:500])  # the connection drops here: no finish()
    assert not (tmp_path / "blobs").exists()
    assert not list((tmp_path / "tmp").iterdir())


def test_commit_changes_applies_in_order_on_the_head(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    base = store.create_commit(REPO, FILES, message="a")
    big = _upload(store, b"\0" * 2048)
    small = store.put_blob(b"new\n", repo_path="new.txt")
    sha = store.commit_changes(
        REPO,
        [
            DeleteFolder("sub/"),
            DeleteFile("config.json"),
            AddFile("weights/model.safetensors", big),
            AddFile("new.txt", small),
        ],
        message="b",
        expected_head=base,
    )
    commit = store.commit(REPO, sha)
    assert commit.parent == base
    assert sorted(commit.tree) == ["new.txt", "onnx/model.onnx", "weights/model.safetensors"]
    assert store.resolve(REPO, "main") == sha
    # Nothing changed: no new commit.
    assert store.commit_changes(REPO, [AddFile("new.txt", small)], message="c") == sha


def test_commit_changes_refusals_leave_the_branch(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    a = store.create_commit(REPO, FILES, message="a")
    b = store.commit_changes(REPO, [DeleteFile("config.json")], message="b")
    missing = TreeEntry(sha256="0" * 64, size=3, blob_oid=None, lfs=True)
    with pytest.raises(CommitConflictError, match=b):
        store.commit_changes(REPO, [DeleteFile("onnx/model.onnx")], message="c", expected_head=a)
    with pytest.raises(EntryNotFoundError, match="doesn't exist"):
        store.commit_changes(REPO, [DeleteFile("config.json")], message="c")
    with pytest.raises(EntryNotFoundError):
        store.commit_changes(REPO, [DeleteFolder("nope")], message="c")
    with pytest.raises(BlobMissingError, match="x.bin"):
        store.commit_changes(REPO, [AddFile("x.bin", missing)], message="c")
    with pytest.raises(UnsafePathError):
        store.commit_changes(REPO, [AddFile("../x", missing)], message="c")
    with pytest.raises(UnsafePathError):
        store.commit_changes(REPO, [AddFile("onnx/model.onnx/x", missing)], message="c")
    with pytest.raises(RevisionNotFoundError):
        store.commit_changes(REPO, [DeleteFile("onnx/model.onnx")], message="c", branch="dev")
    assert store.resolve(REPO, "main") == b


def test_delete_refs(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    a = store.create_commit(REPO, FILES, message="a", tags=["v1"])
    store.set_branch(REPO, "dev", a)
    store.delete_ref(REPO, "tag", "v1")
    store.delete_ref(REPO, "branch", "dev")
    assert store.refs(REPO).model_dump() == {"branches": {"main": a}, "tags": {}}
    with pytest.raises(RevisionNotFoundError):
        store.delete_ref(REPO, "tag", "v1")
    with pytest.raises(PermanentError, match="default branch"):
        store.delete_ref(REPO, "branch", "main")
