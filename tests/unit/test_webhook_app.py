"""The receiver's HTTP contract, with a recording run starter in place of Prefect.

The same contract against a real Prefect server is in
tests/integration/test_webhook_prefect.py; here are the cases that need control over
the starter (Prefect down) or the transport (chunked bodies).
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from gantry.adapters.prefect_api import StartedRun
from gantry.errors import TriggerUnavailableError
from gantry.webhook.app import RunStarter, create_app
from gantry.webhook.config import GitHubRoute, WebhookConfig
from gantry.webhook.signature import sign
from gantry.webhook.store import DeliveryStore
from tests.support import REPO_ROOT

pytestmark = pytest.mark.unit

SECRET = b"unit-test-secret-3b9f0c1e"
DEMO = "examples/minilm-demo.yaml"


class RecordingStarter:
    """Creates a fresh run id per idempotency key, as Prefect does; can be made to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], str, list[str]]] = []
        self.runs: dict[str, uuid.UUID] = {}
        self.fail: Exception | None = None

    async def start(
        self, parameters: dict[str, Any], *, idempotency_key: str, tags: Sequence[str] = ()
    ) -> StartedRun:
        if self.fail is not None:
            raise self.fail
        self.calls.append((parameters, idempotency_key, list(tags)))
        run_id = self.runs.setdefault(idempotency_key, uuid.uuid4())
        return StartedRun(flow_run_id=run_id, name="x", url=f"http://ui/runs/flow-run/{run_id}")


@pytest.fixture
def starter() -> RecordingStarter:
    return RecordingStarter()


@pytest.fixture
def client(tmp_path: Path, starter: RecordingStarter) -> Iterator[TestClient]:
    config = WebhookConfig(
        spec_root=REPO_ROOT,
        max_body_bytes=4096,
        github={"acme/minilm": GitHubRoute(spec=DEMO)},
        allow_overrides=True,
        allow_inline_spec=True,
    )

    @contextlib.asynccontextmanager
    async def factory() -> AsyncIterator[RunStarter]:
        yield starter

    app = create_app(
        config, secret=SECRET, store=DeliveryStore(tmp_path / "d.sqlite3"), starter=factory
    )
    with TestClient(app) as c:
        yield c


def _post(
    client: TestClient,
    payload: Any,
    *,
    delivery: str | None = "d-1",
    event: str | None = None,
    content_type: str = "application/json",
    secret: bytes = SECRET,
) -> Any:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": content_type, "X-Gantry-Signature": sign(body, secret)}
    if delivery is not None:
        headers["X-Gantry-Delivery"] = delivery
    if event is not None:
        headers["X-GitHub-Event"] = event
    return client.post("/webhook", content=body, headers=headers)


def test_generic_delivery_starts_one_run_and_a_resend_gets_it_back(
    client: TestClient, starter: RecordingStarter
) -> None:
    payload = {"spec_path": DEMO, "overrides": {"source.revision": "v2"}}
    first = _post(client, payload)
    again = _post(client, payload)
    assert first.status_code == again.status_code == 202
    assert first.json()["flow_run_id"] == again.json()["flow_run_id"]
    assert (first.json()["duplicate"], again.json()["duplicate"]) == (False, True)
    assert first.json()["url"].endswith(first.json()["flow_run_id"])
    assert len(starter.calls) == 1
    parameters, key, tags = starter.calls[0]
    assert key == "gantry-webhook:d-1" and "webhook" in tags
    assert parameters["spec"]["source"]["revision"] == "v2"


def test_same_delivery_id_with_another_body_is_a_conflict(
    client: TestClient, starter: RecordingStarter
) -> None:
    assert _post(client, {"spec_path": DEMO}).status_code == 202
    other = _post(client, {"spec_path": DEMO, "overrides": {"source.revision": "v2"}})
    assert other.status_code == 409
    assert len(starter.calls) == 1


def test_body_over_the_limit_without_content_length_is_counted(
    client: TestClient, starter: RecordingStarter
) -> None:
    body = json.dumps({"spec_path": DEMO, "pad": "x" * 5000}).encode()

    def chunks() -> Iterator[bytes]:  # a generator body is sent chunked, with no length
        yield from (body[i : i + 1000] for i in range(0, len(body), 1000))

    r = client.post(
        "/webhook",
        content=chunks(),
        headers={
            "Content-Type": "application/json",
            "X-Gantry-Signature": sign(body, SECRET),
            "X-Gantry-Delivery": "chunked",
        },
    )
    assert r.status_code == 413
    assert starter.calls == []


def test_prefect_unavailable_is_503_and_a_retry_then_succeeds(
    client: TestClient, starter: RecordingStarter
) -> None:
    starter.fail = TriggerUnavailableError("cannot reach the Prefect API")
    r = _post(client, {"spec_path": DEMO})
    assert r.status_code == 503 and r.headers["retry-after"] == "30"
    starter.fail = None
    assert _post(client, {"spec_path": DEMO}).status_code == 202
    assert len(starter.calls) == 1


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"secret": b"wrong"}, 401),
        ({"content_type": "application/x-www-form-urlencoded"}, 415),
        ({"content_type": "text/plain"}, 415),
        ({"delivery": None}, 400),
        ({"delivery": "bad id with spaces"}, 400),
    ],
)
def test_refusals(
    client: TestClient, starter: RecordingStarter, kwargs: dict[str, Any], status: int
) -> None:
    r = _post(client, {"spec_path": DEMO}, **kwargs)
    assert r.status_code == status, r.text
    assert "error" in r.json()
    assert starter.calls == []


def test_neither_secret_nor_signature_is_logged(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    body = json.dumps({"spec": {"name": "x", "source": {"repo_id": SECRET.decode()}}}).encode()
    signature = sign(body, SECRET)
    for headers in (
        {"X-Gantry-Signature": signature},  # valid: 422 (repo_id is no owner/name)
        {"X-Gantry-Signature": signature[:-1] + "0"},  # invalid: 401
    ):
        client.post(
            "/webhook",
            content=body,
            headers={"Content-Type": "application/json", "X-Gantry-Delivery": "d", **headers},
        )
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "refused with 422" in logged and "refused with 401" in logged
    assert SECRET.decode() not in logged
    assert signature.removeprefix("sha256=")[:16] not in logged


def test_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"ok": True}


def test_a_body_that_trickles_in_is_cut_off_with_408(
    tmp_path: Path, starter: RecordingStarter
) -> None:
    """A client sending its body slower than read_timeout_s cannot hold the receiver."""
    import anyio

    config = WebhookConfig(spec_root=REPO_ROOT, read_timeout_s=0.3)

    @contextlib.asynccontextmanager
    async def factory() -> AsyncIterator[RunStarter]:
        yield starter

    app = create_app(
        config, secret=SECRET, store=DeliveryStore(tmp_path / "d.sqlite3"), starter=factory
    )
    body = json.dumps({"spec_path": DEMO}).encode()
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not sent:
            sent.append({})
            return {"type": "http.request", "body": body[:10], "more_body": True}
        await anyio.sleep(30)  # the rest never comes in time
        return {"type": "http.request", "body": body[10:], "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/webhook",
        "raw_path": b"/webhook",
        "query_string": b"",
        "headers": [
            (b"content-type", b"application/json"),
            (b"x-gantry-signature", sign(body, SECRET).encode()),
            (b"x-gantry-delivery", b"slow"),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def run() -> float:
        t0 = anyio.current_time()
        with anyio.fail_after(10):
            await app(scope, receive, send)
        return anyio.current_time() - t0

    elapsed = anyio.run(run)
    (start,) = [m for m in sent if m.get("type") == "http.response.start"]
    assert start["status"] == 408
    assert elapsed < 5
    assert starter.calls == []


# --- replays -------------------------------------------------------------------------------


def _github_release(release_id: int = 42) -> dict[str, Any]:
    return {
        "action": "published",
        "release": {"id": release_id, "tag_name": "v1", "prerelease": False, "draft": False},
        "repository": {"full_name": "acme/minilm"},
    }


def test_a_captured_github_body_resent_under_a_new_delivery_id_starts_nothing(
    client: TestClient, starter: RecordingStarter
) -> None:
    first = _post(client, _github_release(), delivery="gh-1", event="release")
    replay = _post(client, _github_release(), delivery="gh-2", event="release")
    assert first.status_code == replay.status_code == 202
    assert replay.json()["duplicate"] is True
    assert replay.json()["flow_run_id"] == first.json()["flow_run_id"]
    assert [key for _, key, _ in starter.calls] == [
        "gantry-webhook:github:acme/minilm:release:42:published"
    ]
    # Another release of the repository is another trigger.
    other = _post(client, _github_release(43), delivery="gh-3", event="release")
    assert other.json()["duplicate"] is False and len(starter.calls) == 2


def test_a_workflow_run_is_one_trigger_per_attempt(
    tmp_path: Path, starter: RecordingStarter
) -> None:
    config = WebhookConfig(
        spec_root=REPO_ROOT, github={"acme/ci": GitHubRoute(spec=DEMO, events=("workflow_run",))}
    )

    @contextlib.asynccontextmanager
    async def factory() -> AsyncIterator[RunStarter]:
        yield starter

    app = create_app(
        config, secret=SECRET, store=DeliveryStore(tmp_path / "d.sqlite3"), starter=factory
    )

    def run(attempt: int) -> dict[str, Any]:
        return {
            "action": "completed",
            "workflow_run": {
                "id": 777, "run_attempt": attempt, "name": "publish", "head_branch": "main",
                "head_sha": "0" * 40, "conclusion": "success",
            },
            "repository": {"full_name": "acme/ci"},
        }  # fmt: skip

    with TestClient(app) as c:
        ids = [
            _post(c, run(a), delivery=d, event="workflow_run").json()["flow_run_id"]
            for a, d in ((1, "w-1"), (1, "w-2"), (2, "w-3"))
        ]
    assert ids[0] == ids[1] != ids[2] and len(starter.calls) == 2


def _post_timestamped(client: TestClient, payload: Any, *, delivery: str, at: float) -> Any:
    from gantry.webhook.signature import sign_timestamped

    body = json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Gantry-Delivery": delivery,
        "X-Gantry-Signature": sign_timestamped(body, SECRET, int(at)),
    }
    return client.post("/webhook", content=body, headers=headers)


def test_timestamped_signatures_refuse_old_bodies_and_dedupe_replays(
    tmp_path: Path, starter: RecordingStarter
) -> None:
    import time

    config = WebhookConfig(spec_root=REPO_ROOT, require_timestamp=True, signature_tolerance_s=60)

    @contextlib.asynccontextmanager
    async def factory() -> AsyncIterator[RunStarter]:
        yield starter

    app = create_app(
        config, secret=SECRET, store=DeliveryStore(tmp_path / "d.sqlite3"), starter=factory
    )
    payload = {"spec_path": DEMO}
    now = time.time()
    with TestClient(app) as c:
        fresh = _post_timestamped(c, payload, delivery="t-1", at=now)
        assert fresh.status_code == 202, fresh.text
        # The same signed body under a new delivery id, inside the window: the same run.
        replay = _post_timestamped(c, payload, delivery="t-2", at=now)
        assert replay.json()["duplicate"] is True
        assert replay.json()["flow_run_id"] == fresh.json()["flow_run_id"]
        # Outside the window (either way): refused, whatever the delivery id.
        for at in (now - 3600, now + 3600):
            r = _post_timestamped(c, payload, delivery=f"t-{at}", at=at)
            assert r.status_code == 401 and "outside the 60s" in r.json()["error"]
        # Required: a plain signature from a generic sender is refused.
        plain = _post(c, payload, delivery="t-3")
        assert plain.status_code == 401 and "timestamped" in plain.json()["error"]
    assert len(starter.calls) == 1


def test_forbidden_changes_are_403_and_start_nothing(
    client: TestClient, starter: RecordingStarter
) -> None:
    r = _post(client, {"spec_path": DEMO, "overrides": {"evaluate.threshold": 0.0}})
    assert r.status_code == 403
    assert r.json()["fields"] == [
        {"loc": "overrides.evaluate.threshold", "msg": "not allowed from a delivery"}
    ]
    assert starter.calls == []
