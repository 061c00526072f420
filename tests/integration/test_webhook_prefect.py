"""The webhook receiver end to end: `gantry webhook serve` (uvicorn) in front of a real
Prefect server with the `release` deployment registered from prefect.yaml.

No worker polls the pool, so a created run stays Scheduled: what is checked is that the
right runs, and only those, exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from gantry.adapters.prefect_api import (
    PrefectRunStarter,
    RegisteredDeployment,
    ensure_work_pool,
    register_deployments,
)
from gantry.spec import load_spec
from gantry.webhook.signature import sign
from tests.support import REPO_ROOT, PrefectServer, free_port

pytestmark = pytest.mark.integration

SECRET = "integration-secret-5d2c9a71e0"
DEMO = "examples/minilm-demo.yaml"
MAX_BODY = 64 * 1024


def _client(server: PrefectServer) -> Any:
    """A client of the test server, without touching this process's Prefect settings."""
    from prefect.client.orchestration import PrefectClient

    return PrefectClient(api=server.api_url)


@pytest.fixture(scope="module")
def deployment(prefect_server: PrefectServer) -> Iterator[RegisteredDeployment]:
    """`release` registered from prefect.yaml; the runs the tests created deleted after."""

    async def register() -> RegisteredDeployment:
        async with _client(prefect_server) as client:
            await ensure_work_pool(client, "gantry-process")
            (dep,) = await register_deployments(
                client,
                REPO_ROOT,
                env={"GANTRY_PROJECT_DIR": str(REPO_ROOT)},
                names=["release"],
            )
            return dep

    dep = anyio.run(register)
    yield dep

    async def clean() -> None:
        # A worker started by another test on this server must find nothing to run.
        async with _client(prefect_server) as client:
            for run in await _runs(client, dep):
                await client.delete_flow_run(run.id)

    anyio.run(clean)


async def _runs(client: Any, dep: RegisteredDeployment) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    return list(
        await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            # Explicit sort and limit: the 3.8.8 server refuses the client's nulls.
            sort=FlowRunSort.ID_DESC,
            limit=200,
        )
    )


def _count(server: PrefectServer, dep: RegisteredDeployment) -> int:
    async def count() -> int:
        async with _client(server) as client:
            return len(await _runs(client, dep))

    return anyio.run(count)


@pytest.fixture(scope="module")
def receiver(
    prefect_server: PrefectServer,
    deployment: RegisteredDeployment,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """`gantry webhook serve` as users run it; yields its /webhook URL."""
    state = tmp_path_factory.mktemp("webhook-state")
    config = state / "webhook.yaml"
    config.write_text(
        f"spec_root: {REPO_ROOT}\nmax_body_bytes: {MAX_BODY}\nallow_overrides: true\n"
        f"github:\n  acme/minilm-model:\n    spec: {DEMO}\n    events: [release]\n"
    )
    port = free_port()
    env = {
        **os.environ,
        **prefect_server.env(),
        "PREFECT_HOME": str(state / "prefect-home"),
        "GANTRY_STATE_DIR": str(state),
        "GANTRY_WEBHOOK_SECRET": SECRET,
    }
    argv = [sys.executable, "-m", "gantry.cli", "webhook", "serve", "--config", str(config)]
    log = (state / "receiver.log").open("wb")
    proc = subprocess.Popen(
        [*argv, "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (state / "receiver.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "receiver did not start"
            time.sleep(0.2)
        yield f"{url}/webhook"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        logged = (state / "receiver.log").read_text()
        assert SECRET not in logged, "the secret must never be logged"


def _github_release(action: str = "published") -> dict[str, Any]:
    return {
        "action": action,
        "release": {"tag_name": "v1", "prerelease": False, "draft": False, "id": 42},
        "repository": {"full_name": "acme/minilm-model", "id": 7},
        "sender": {"login": "octocat"},
    }


def _send(
    url: str,
    body: bytes,
    *,
    headers: dict[str, str] | None = None,
    event: str | None = "release",
    delivery: str | None = None,
    signature: str | None = "valid",
    content_type: str = "application/json",
) -> httpx.Response:
    h = {"Content-Type": content_type, **(headers or {})}
    if event is not None:
        h["X-GitHub-Event"] = event
    if delivery is not None:
        h["X-GitHub-Delivery"] = delivery
    if signature == "valid":
        h["X-Hub-Signature-256"] = sign(body, SECRET.encode())
    elif signature is not None:
        h["X-Hub-Signature-256"] = signature
    return httpx.post(url, content=body, headers=h, timeout=30)


def test_github_release_twice_starts_exactly_one_run(
    receiver: str, prefect_server: PrefectServer, deployment: RegisteredDeployment
) -> None:
    before = _count(prefect_server, deployment)
    body = json.dumps(_github_release()).encode()
    delivery = str(uuid.uuid4())
    first = _send(receiver, body, delivery=delivery)
    second = _send(receiver, body, delivery=delivery)
    assert first.status_code == second.status_code == 202, first.text
    run_id = first.json()["flow_run_id"]
    assert second.json()["flow_run_id"] == run_id
    assert first.json()["url"] == f"{prefect_server.ui_url}/runs/flow-run/{run_id}"
    assert _count(prefect_server, deployment) == before + 1

    async def read() -> Any:
        async with _client(prefect_server) as client:
            return await client.read_flow_run(uuid.UUID(run_id))

    run = anyio.run(read)
    assert run.deployment_id == deployment.id
    assert run.state.type.value == "SCHEDULED"
    # Keyed on the payload's own identity, so a replay under another delivery id is caught
    # by Prefect too.
    assert run.idempotency_key == "gantry-webhook:github:acme/minilm-model:release:42:published"
    assert run.parameters == {"spec": load_spec(REPO_ROOT / DEMO).model_dump(mode="json")}
    # The link opens in a browser: the UI serves its page for it (to HTML clients only).
    page = httpx.get(first.json()["url"], headers={"Accept": "text/html"}, timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_a_captured_body_resent_under_a_new_delivery_id_starts_no_second_run(
    receiver: str, prefect_server: PrefectServer, deployment: RegisteredDeployment
) -> None:
    """A replay of a signed GitHub body (new X-GitHub-Delivery): the same run comes back."""
    body = json.dumps(
        {**_github_release(), "release": {**_github_release()["release"], "id": 4242}}
    )
    first = _send(receiver, body.encode(), delivery=str(uuid.uuid4()))
    before = _count(prefect_server, deployment)
    replay = _send(receiver, body.encode(), delivery=str(uuid.uuid4()))
    assert first.status_code == replay.status_code == 202, replay.text
    assert replay.json()["flow_run_id"] == first.json()["flow_run_id"]
    assert replay.json()["duplicate"] is True
    assert _count(prefect_server, deployment) == before


def _cases() -> list[Any]:
    release = json.dumps(_github_release()).encode()
    generic_bad = json.dumps({"spec_path": DEMO, "overrides": {"source.revision": ""}}).encode()
    generic_weaker = json.dumps(
        {"spec_path": DEMO, "overrides": {"evaluate.threshold": 0.0}}
    ).encode()
    generic_inline = json.dumps({"spec": {"name": "x", "source": {"repo_id": "a/b"}}}).encode()
    return [
        pytest.param(release, {"signature": None}, 401, id="unsigned"),
        pytest.param(release, {"signature": sign(release, b"wrong")}, 401, id="bad-signature"),
        pytest.param(
            release,
            {"signature": "sha1=" + sign(release, SECRET.encode())[7:47]},
            401,
            id="wrong-prefix",
        ),
        pytest.param(
            release,
            {
                "signature": None,
                "headers": {"X-Gantry-Signature": sign(release + b" ", SECRET.encode())},
            },
            401,
            id="generic-header-bad",
        ),
        pytest.param(b"{" + b" " * MAX_BODY + b"}", {}, 413, id="too-large"),
        pytest.param(release, {"content_type": "text/plain"}, 415, id="not-json-type"),
        pytest.param(b"action=published", {}, 400, id="not-json-body"),
        pytest.param(release, {"delivery": None}, 400, id="no-delivery-id"),
        pytest.param(generic_bad, {"event": None}, 422, id="invalid-parameters"),
        pytest.param(generic_weaker, {"event": None}, 403, id="override-weakens-a-gate"),
        pytest.param(generic_inline, {"event": None}, 403, id="inline-spec-not-allowed"),
        pytest.param(release, {"event": "push"}, 202, id="unknown-event"),
        pytest.param(
            json.dumps(_github_release("created")).encode(), {}, 202, id="release-not-published"
        ),
    ]


@pytest.mark.parametrize(("body", "options", "status"), _cases())
def test_refusals_create_no_run(
    receiver: str,
    prefect_server: PrefectServer,
    deployment: RegisteredDeployment,
    body: bytes,
    options: dict[str, Any],
    status: int,
) -> None:
    before = _count(prefect_server, deployment)
    options = {"delivery": str(uuid.uuid4()), **options}
    r = _send(receiver, body, **options)
    assert r.status_code == status, r.text
    answer = r.json()
    if status == 202:
        assert "ignored" in answer and "flow_run_id" not in answer
    else:
        assert "error" in answer
    if status == 422:
        assert answer["fields"][0]["loc"] == "spec.source.revision"
    if status == 403:
        assert answer["fields"] and answer["fix"]
    assert _count(prefect_server, deployment) == before


def test_prefect_idempotency_key_alone_prevents_a_second_run(
    prefect_server: PrefectServer, deployment: RegisteredDeployment
) -> None:
    """If the receiver lost its record (crash after creating the run), Prefect's
    idempotency key still returns the first run."""
    spec = load_spec(REPO_ROOT / DEMO).model_dump(mode="json")
    key = f"gantry-webhook:{uuid.uuid4()}"

    async def start_twice() -> tuple[uuid.UUID, uuid.UUID, int]:
        async with _client(prefect_server) as client:
            starter = PrefectRunStarter(
                client, deployment=deployment.full_name, ui_url=prefect_server.ui_url
            )
            before = len(await _runs(client, deployment))
            a = await starter.start({"spec": spec}, idempotency_key=key)
            b = await starter.start({"spec": spec}, idempotency_key=key)
            return a.flow_run_id, b.flow_run_id, len(await _runs(client, deployment)) - before

    first, second, created = anyio.run(start_twice)
    assert first == second and created == 1


def test_missing_deployment_is_unavailable(prefect_server: PrefectServer) -> None:
    from gantry.errors import TriggerUnavailableError

    async def start() -> None:
        async with _client(prefect_server) as client:
            starter = PrefectRunStarter(
                client, deployment="release/no-such", ui_url=prefect_server.ui_url
            )
            await starter.start({"spec": {}}, idempotency_key="k")

    with pytest.raises(TriggerUnavailableError, match="does not exist"):
        anyio.run(start)


def test_secret_from_a_prefect_secret_block(prefect_server: PrefectServer) -> None:
    from prefect.blocks.system import Secret
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from gantry.errors import ConfigError
    from gantry.webhook.config import WebhookConfig, load_secret

    block = WebhookConfig(secret_block="gantry-webhook-test")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        Secret(value="from-a-block-0123456789").save("gantry-webhook-test", overwrite=True)
        assert load_secret(block, env={}) == b"from-a-block-0123456789"
        # The variable, when set, wins over the block.
        assert load_secret(block, env={"GANTRY_WEBHOOK_SECRET": "from-env"}) == b"from-env"
        with pytest.raises(ConfigError, match="cannot be loaded"):
            load_secret(WebhookConfig(secret_block="no-such-block"), env={})
        # Saving a block emits events; send them while this server is the API.
        EventsWorker.drain_all(timeout=10)
    with pytest.raises(ConfigError, match="no webhook secret"):
        load_secret(WebhookConfig(), env={})
