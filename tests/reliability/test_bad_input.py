"""Hostile input: random and mutated release specs, and file names a hub should never list.

Specs: whatever the bytes, `gantry release` answers with a SpecError naming the field (exit
code 2) or accepts a valid spec; never a traceback, and the state dir is left as it was.
Hub file names: a name that could escape the download directory is refused before any
byte is written, by the real client talking to a real (tampered) hub endpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gantry import cli
from gantry.adapters.hub import check_relative_path
from gantry.errors import ChecksumMismatchError, SpecError, UnsafePathError
from gantry.localhub.store import HubStore
from gantry.settings import Settings
from gantry.spec import HubSource, ReleaseSpec, load_spec, parse_spec
from gantry.stages import weights as weights_stage
from gantry.stages.weights import WeightStore
from tests.reliability.conftest import Scenario
from tests.support import REPO_ROOT, GantryEnv

pytestmark = pytest.mark.reliability

EXAMPLES = 80
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DEMO: dict[str, Any] = yaml.safe_load((REPO_ROOT / "examples/minilm-demo.yaml").read_text())


# --- the state dir must not change -------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir with a release in it, the way a user's looks."""
    state = tmp_path_factory.mktemp("state")
    (state / "releases").mkdir()
    (state / "releases" / "minilm-0123456789ab.json").write_text('{"status": "succeeded"}')
    (state / "weights" / "blobs").mkdir(parents=True)
    return state


def _release_cli(spec: Path, state: Path) -> tuple[int, str]:
    """`gantry release SPEC` in this process: its exit code and what it wrote to stderr."""
    err = io.StringIO()
    env = {"GANTRY_STATE_DIR": str(state)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stderr(err):
            code = cli.main(["release", str(spec)])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, err.getvalue()


def _refused(data: bytes, state: Path) -> str:
    """Feed ``data`` to load_spec and to `gantry release`; both must refuse it cleanly.
    Returns the message. A valid spec is not released (that is not the property here)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_bytes(data)
        try:
            load_spec(path)
        except SpecError as exc:
            message = str(exc)
        else:
            return ""
        before = _tree(state)
        code, stderr = _release_cli(path, state)
        assert code == 2, stderr
        assert "Traceback" not in stderr and stderr.startswith("gantry: "), stderr
        assert "fix:" in stderr or "spec file" in stderr
        assert _tree(state) == before, "the state dir changed"
        return message


def _tally(scenario: Scenario, title: str, message: str) -> None:
    """Count this example on the test's line of the table (refused / accepted)."""
    refused, valid = _TALLY.setdefault(scenario.id, [0, 0])
    _TALLY[scenario.id] = [refused + bool(message), valid + (not message)]
    scenario.group, scenario.title = "bad input", title
    scenario.outcome = (
        f"{_TALLY[scenario.id][0]} refused with a SpecError (exit 2, no traceback, state dir "
        f"unchanged), {_TALLY[scenario.id][1]} valid and accepted"
    )


_TALLY: dict[str, list[int]] = {}


# --- random bytes and text -------------------------------------------------------------------


@FUZZ
@given(
    data=st.binary(max_size=512)
    | st.text(max_size=512).map(lambda t: t.encode("utf-8", "surrogatepass"))
)
def test_random_bytes_are_refused_cleanly(data: bytes, state_dir: Path, scenario: Scenario) -> None:
    message = _refused(data, state_dir)
    assert message == "" or "spec" in message
    _tally(scenario, f"random bytes as a spec file ({EXAMPLES} examples)", message)


# YAML that parses, with values of every type, nested, at any size.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(doc=st.dictionaries(st.text(max_size=12), _values, max_size=6) | _values)
def test_random_yaml_documents_are_refused_cleanly(
    doc: object, state_dir: Path, scenario: Scenario
) -> None:
    message = _refused(yaml.safe_dump(doc, allow_unicode=True).encode(), state_dir)
    assert message == "" or message.startswith(("invalid release spec", "spec file"))
    _tally(scenario, f"random YAML documents, any types and sizes ({EXAMPLES})", message)


# --- one field of the demo spec made hostile ---------------------------------------------------


def _paths(obj: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, str(k)))
    return out


DEMO_PATHS = [
    *_paths(DEMO),
    ("retries", "attempts"),
    ("retries", "delay_s"),
    ("smoke", "deadline_s"),
    ("smoke", "memory_mb"),
    ("runtime", "port"),
    ("runtime", "env"),
    ("runtime", "args"),
    ("build", "timeout_s"),
    ("mlflow", "timeout_s"),
]
_hostile = (
    _scalars
    | st.integers(min_value=10**18, max_value=10**400)
    | st.sampled_from([float("inf"), float("-inf"), float("nan"), -0.0, 2**63, -(2**63)])
    | st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=300)
    | st.lists(_scalars, max_size=3)
    | st.dictionaries(st.text(max_size=8), _scalars, max_size=3)
)


def _set(doc: dict[str, Any], path: tuple[str, ...], value: object) -> dict[str, Any]:
    """A deep copy of ``doc`` with ``value`` at ``path`` (parents created as needed)."""
    out: dict[str, Any] = json.loads(json.dumps(doc))
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return out


@FUZZ
@given(path=st.sampled_from(DEMO_PATHS), value=_hostile)
def test_a_hostile_field_is_named_or_accepted(
    path: tuple[str, ...], value: object, state_dir: Path, scenario: Scenario
) -> None:
    doc = _set(DEMO, path, value)
    try:
        spec = parse_spec(doc, origin="(fuzz)")
    except SpecError as exc:
        message = str(exc)
        # The message points at the field (or at a parent that cannot hold it).
        assert any(".".join(path[:n]) in message for n in range(len(path), 0, -1)), message
        assert "fix:" in message
    else:
        message = ""
        assert isinstance(spec, ReleaseSpec)
        again = parse_spec(json.loads(spec.model_dump_json()))
        assert again.release_id == spec.release_id  # identity survives a round trip
    # The same document through a file and the CLI ends the same way.
    text = yaml.safe_dump(doc, allow_unicode=True).encode()
    assert bool(_refused(text, state_dir)) == bool(message)
    title = (
        f"demo spec, one field hostile: huge numbers, NaN, unicode, wrong types; the error "
        f"names the field ({EXAMPLES})"
    )
    _tally(scenario, title, message)


@FUZZ
@given(name=st.text(max_size=80))
def test_model_names_in_any_script_are_refused_or_valid(name: str) -> None:
    try:
        spec = parse_spec({**DEMO, "name": name})
    except SpecError as exc:
        assert "name:" in str(exc)
    else:
        assert spec.image_repository == f"gantry/{name}" and name.isascii()


# --- structure bombs ----------------------------------------------------------------------------

BOMBS = {
    "deep nesting": b"name: " + b"[" * 5000 + b"]" * 5000,
    "alias bomb": b"a: &a [x, x, x, x, x, x, x, x]\n"
    + b"".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 8)}]\n".encode()
        for p, c in zip("abcdefg", "bcdefgh", strict=True)
    )
    + b"name: demo\nsource: {repo_id: a/b}\nruntime: {args: *h}\n",
    "2 MiB file": b"name: x\nsource: {repo_id: a/b}\n# " + b"x" * (2 << 20),
    "not UTF-8": b"name: \xff\xfe\n",
    "two documents": b"name: a\n---\nname: b\n",
}


@pytest.mark.parametrize("data", BOMBS.values(), ids=BOMBS.keys())
def test_structure_bombs_are_refused_fast(
    data: bytes, state_dir: Path, scenario: Scenario, request: pytest.FixtureRequest
) -> None:
    scenario.group = "bad input"
    scenario.title = f"spec file: {request.node.callspec.id}"
    t0 = time.monotonic()
    message = _refused(data, state_dir)
    elapsed = time.monotonic() - t0
    assert message and elapsed < 5, (message, elapsed)
    # Without the temporary path, so the table reads the same from run to run.
    said = re.sub(r"\S*/spec\.yaml", "spec.yaml", message.splitlines()[0])
    scenario.outcome = f"SpecError within {max(1, math.ceil(elapsed))}s: {said[:100]}"


# --- hub file names ---------------------------------------------------------------------------

_segment = st.sampled_from(
    ["..", ".", "", "a", "b.json", "ü", "C:", "\\", "..\\x", " ", "\x00", "~"]
)


@FUZZ
@given(name=st.lists(_segment, min_size=1, max_size=5).map("/".join) | st.text(max_size=30))
def test_a_name_that_passes_stays_inside_the_directory(name: str, scenario: Scenario) -> None:
    _TALLY.setdefault(scenario.id, [0, 0])
    scenario.group = "bad input"
    scenario.title = f"random hub file names of `..`, `.`, `\\`, `C:`, NUL, unicode ({EXAMPLES})"
    try:
        check_relative_path(name)
    except UnsafePathError:
        _TALLY[scenario.id][0] += 1
    else:
        root = Path("/srv/download")
        target = Path(os.path.normpath(root / name))
        assert target.is_relative_to(root) and target != root, name
        assert not Path(name).is_absolute() and ".." not in Path(name).parts
        _TALLY[scenario.id][1] += 1
    scenario.outcome = (
        f"{_TALLY[scenario.id][0]} refused (UnsafePathError); {_TALLY[scenario.id][1]} "
        "accepted, each inside the download directory"
    )


EVIL_NAMES = [
    "../escape.json",
    "/tmp/escape.json",
    "sub/../../escape.json",
    "sub\\..\\..\\escape.json",
    "C:/escape.json",
    "sub//escape.json",
    "./escape.json",
]


def _tamper(store: HubStore, repo_id: str, evil: str) -> str:
    """A commit whose tree lists ``evil``, written straight into the hub's store, as a
    compromised hub (or a hub with a path bug) would serve it; the store's own API would
    refuse it. Returns the tag that names it."""
    base = store.create_commit(
        repo_id, {"config.json": b'{"ok": true}\n'}, message="base", parent=None
    )
    commit = json.loads((store.root / "repos" / repo_id / "commits" / f"{base}.json").read_text())
    commit["tree"][evil] = commit["tree"]["config.json"]
    commit["parent"], commit["message"] = base, f"lists {evil!r}"
    body = json.dumps(commit, sort_keys=True, separators=(",", ":")).encode()
    sha = hashlib.sha1(body, usedforsecurity=False).hexdigest()
    (store.root / "repos" / repo_id / "commits" / f"{sha}.json").write_bytes(body)
    tag = f"evil-{hashlib.sha256(evil.encode()).hexdigest()[:8]}"
    store.set_tag(repo_id, tag, sha, force=True)
    return tag


@pytest.fixture
def tampered_hub(gantry_env: GantryEnv) -> Iterator[HubStore]:
    store = HubStore(Settings.from_env(gantry_env.env).hub_dir / "store")
    yield store


@pytest.mark.parametrize("evil", EVIL_NAMES)
def test_hub_listing_an_escaping_name_is_refused(
    evil: str,
    gantry_env: GantryEnv,
    tampered_hub: HubStore,
    scenario: Scenario,
    tmp_path: Path,
) -> None:
    scenario.group = "bad input"
    scenario.title = f"hub lists a file named {evil!r}"
    repo_id = "gantry-test/tampered"
    tag = _tamper(tampered_hub, repo_id, evil)
    info = httpx.get(f"{gantry_env.hub_url}/api/models/{repo_id}/revision/{tag}", timeout=10)
    assert evil in {s["rfilename"] for s in info.json()["siblings"]}  # it is really served
    root = tmp_path / "weights"
    before = {p.name for p in tmp_path.parent.iterdir()}
    with pytest.raises(UnsafePathError) as exc:
        weights_stage.run(
            HubSource(repo_id=repo_id, revision=tag, allow_patterns=("*",)), WeightStore(root)
        )
    assert repr(evil) in str(exc.value)
    written = [p for p in root.rglob("*") if p.is_file()]
    assert written == [], written
    assert {p.name for p in tmp_path.parent.iterdir()} == before  # nothing beside it either
    scenario.outcome = "UnsafePathError before any download; nothing written"


def test_symlink_in_cached_snapshot_is_refused(
    gantry_env: GantryEnv, scenario: Scenario, tmp_path: Path
) -> None:
    scenario.group = "bad input"
    scenario.title = "a cached weights file replaced by a symlink to identical bytes"
    source = HubSource(repo_id=gantry_env.repo_id, revision="v1")
    store = WeightStore(tmp_path / "weights")
    first = weights_stage.run(source, store)
    config = Path(first.path) / "config.json"
    outside = tmp_path / "outside.json"
    outside.write_bytes(config.read_bytes())
    config.unlink()
    config.symlink_to(outside)
    with pytest.raises(ChecksumMismatchError, match="symlink") as exc:
        weights_stage.run(source, store)
    assert "delete" in str(exc.value)
    config.unlink()
    config.write_bytes(outside.read_bytes())  # the file back, and one more beside it
    (Path(first.path) / "extra.bin").write_bytes(b"\0")
    with pytest.raises(ChecksumMismatchError, match="does not list"):
        weights_stage.run(source, store)
    scenario.outcome = "ChecksumMismatchError naming the file (and an added file too)"


# --- webhook deliveries --------------------------------------------------------------------------

_WEBHOOK_SECRET = b"fuzz-secret-0f3c9a7e"
_spec_paths = st.sampled_from(
    [
        "examples/minilm-demo.yaml",
        "examples/minilm-degraded.yaml",
        "../../../../etc/passwd",
        "/etc/passwd",
        "examples/../../outside.yaml",
        "examples/eval/minilm-retrieval.jsonl",
        "",
        "examples/nope.yaml",
    ]
) | st.text(max_size=60)
_override_keys = st.sampled_from(
    ["source.revision", "name", "scan.severity", "canary.steps", "evaluate.threshold", "x.y"]
) | st.text(max_size=20)
_generic = st.fixed_dictionaries(
    {},
    optional={
        "spec_path": _spec_paths,
        "spec": st.dictionaries(st.text(max_size=10), _values, max_size=4) | _values,
        "overrides": st.dictionaries(_override_keys, _values, max_size=4) | _values,
        "tags": st.lists(st.text(max_size=20), max_size=4) | _values,
    },
)
_github = st.fixed_dictionaries(
    {
        "action": st.sampled_from(["published", "created", "deleted", "completed"]) | _scalars,
        "repository": st.fixed_dictionaries({"full_name": st.sampled_from(["acme/minilm"])})
        | _values,
    },
    optional={
        "release": st.fixed_dictionaries({"tag_name": st.text(max_size=30) | _scalars}) | _values,
        "workflow_run": st.fixed_dictionaries(
            {"conclusion": st.sampled_from(["success", "failure"]) | _scalars}
        )
        | _values,
    },
)


# Well-formed deliveries too, so that accepted ones (and the runs they start) are exercised.
_well_formed = st.fixed_dictionaries(
    {"spec_path": st.sampled_from(["examples/minilm-demo.yaml", "examples/minilm-degraded.yaml"])},
    optional={
        "overrides": st.fixed_dictionaries(
            {}, optional={"source.revision": st.sampled_from(["v2", "main"]) | st.text(max_size=12)}
        )
    },
).map(lambda d: ("generic", d)) | st.fixed_dictionaries(
    {
        "action": st.just("published"),
        "repository": st.just({"full_name": "acme/minilm"}),
        "release": st.fixed_dictionaries({"tag_name": st.text(max_size=16)}),
    }
).map(lambda d: ("github", d))


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Path]]:
    """The receiver with a recording run starter: (client, starter, delivery store dir)."""
    from starlette.testclient import TestClient

    from gantry.webhook.app import create_app
    from gantry.webhook.config import GitHubRoute, WebhookConfig
    from gantry.webhook.store import DeliveryStore
    from tests.unit.test_webhook_app import RecordingStarter

    store_dir = tmp_path_factory.mktemp("webhook")
    config = WebhookConfig(
        spec_root=REPO_ROOT,
        max_body_bytes=4096,
        github={"acme/minilm": GitHubRoute(spec="examples/minilm-demo.yaml")},
        # Open, so that random inline specs and overrides meet the guard against weakening.
        allow_inline_spec=True,
        allow_overrides=True,
    )
    starter = RecordingStarter()

    @contextlib.asynccontextmanager
    async def factory() -> Any:
        yield starter

    app = create_app(
        config,
        secret=_WEBHOOK_SECRET,
        store=DeliveryStore(store_dir / "deliveries.sqlite3"),
        starter=factory,
    )
    with TestClient(app) as client:
        yield client, starter, store_dir


_WEBHOOK_TALLY: dict[str, dict[int, int]] = {}


@FUZZ
@given(
    payload=_well_formed
    | _generic.map(lambda d: ("generic", d))
    | _github.map(lambda d: ("github", d))
    | st.binary(max_size=600).map(lambda b: ("bytes", b))
)
def test_webhook_payloads_at_random_get_a_clear_answer(
    payload: tuple[str, Any], webhook: tuple[Any, Any, Path], scenario: Scenario
) -> None:
    """Correctly signed deliveries with random content: each gets 202, or a 4xx naming the
    problem; a refused one starts no run and is not stored; a run is only ever started
    with a valid release spec, read from inside the spec root."""
    from gantry.webhook.signature import sign

    client, starter, store_dir = webhook
    kind, data = payload
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Gantry-Signature": sign(body, _WEBHOOK_SECRET),
        "X-Gantry-Delivery": hashlib.sha256(body + kind.encode()).hexdigest()[:32],
    }
    if kind == "github":
        headers["X-GitHub-Event"] = "workflow_run" if "workflow_run" in data else "release"
    calls_before = len(starter.calls)
    answer = client.post("/webhook", content=body, headers=headers)

    assert answer.status_code in (202, 400, 403, 413, 422), answer.text
    reply = answer.json()
    if answer.status_code == 202:
        if "flow_run_id" in reply and not reply.get("duplicate"):
            assert len(starter.calls) == calls_before + 1
            parameters = starter.calls[-1][0]
            ReleaseSpec.model_validate(parameters["spec"])  # a valid spec, nothing else
        else:
            assert len(starter.calls) == calls_before
    else:
        assert len(starter.calls) == calls_before, "a refused delivery started a run"
        assert reply.get("error"), reply  # says what is wrong
        if answer.status_code in (403, 422):
            assert reply.get("fields"), reply  # names the field
    assert "Traceback" not in answer.text and _WEBHOOK_SECRET.decode() not in answer.text
    assert {p.name for p in store_dir.iterdir()} <= {
        "deliveries.sqlite3",
        "deliveries.sqlite3-journal",
        "deliveries.sqlite3-wal",
        "deliveries.sqlite3-shm",
    }

    tally = _WEBHOOK_TALLY.setdefault(scenario.id, {})
    tally[answer.status_code] = tally.get(answer.status_code, 0) + 1
    scenario.group = "bad input"
    scenario.title = (
        f"random signed webhook deliveries: generic and GitHub payloads, raw bytes ({EXAMPLES})"
    )
    scenario.outcome = (
        ", ".join(f"{n} answered {code}" for code, n in sorted(tally.items()))
        + "; no 5xx, no run but for a valid spec read inside the spec root"
    )
