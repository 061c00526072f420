"""Hostile candidates and hostile senders: the release cannot be steered by what it is
testing, nor by whoever holds the webhook's shared secret.

Each test is one attack on the real components (router, registry client, hub endpoint,
record files, the webhook receiver with its real delivery store) and records a line of the
README's Reliability table, group "hostile input": what was tried, what stopped it, and what
was lost (checked: nothing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gantry.adapters.haproxy import AccessRecord, Slot
from gantry.deploy.docker import DEPLOYMENT_LABEL, DockerTarget
from gantry.errors import GatedRepoError, SpecError
from gantry.localhub.demo import DEMO_TOKEN, GATED_REPO_ID
from gantry.spec import parse_spec
from gantry.stages import weights as weights_stage
from gantry.stages.weights import WeightStore
from tests.integration.test_router import make_target  # noqa: F401  (fixture)
from tests.integration.test_weights_stage import _source
from tests.reliability.conftest import Scenario
from tests.reliability.test_bad_input import _WEBHOOK_SECRET, webhook  # noqa: F401  (fixture)
from tests.support import GantryEnv

pytestmark = pytest.mark.reliability

GROUP = "hostile input"

# A stand-in model server: answers /health, and echoes the request's headers as JSON, so a
# test sees what reached the server (the router strips what must not).
ECHO_SERVER = r"""
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", 8080), H).serve_forever()
"""


def _echo_servers(target: DockerTarget) -> None:
    """Both slots served by the echo server (the base image's python), on the deployment's
    network under the slots' names, labelled so that remove_all() takes them."""
    for slot in Slot:
        target.client.containers.run(
            "python:3.11-slim-bookworm",
            ["python", "-c", ECHO_SERVER],
            name=target.server_name(slot),
            network=target.name,
            labels={DEPLOYMENT_LABEL: target.name},
            user="65534",
            detach=True,
        )
    for slot in Slot:
        target.wait_server_up(slot, 60)


def test_a_candidate_cannot_reach_the_routers_controls(
    make_target: Any,  # noqa: F811
    scenario: Scenario,
) -> None:
    """From inside a model server: the runtime API is not on the network (only on a socket
    the router alone mounts); a client's forged routing or probe header is ignored; the
    probe token never reaches a server."""
    target: DockerTarget = make_target("hostile")
    target.ensure({Slot.A: 100, Slot.B: 0})
    _echo_servers(target)
    candidate = target.client.containers.get(target.server_name(Slot.B))
    scenario.group = GROUP
    scenario.title = (
        "a candidate container connects to the router's admin API (`set weight` itself to 100)"
    )

    probe = (
        "import socket, sys\n"
        f"host = socket.gethostbyname({target.router_name!r})\n"
        "for port in (9999, 8404, 1936):\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=3).close()\n"
        "        sys.exit(f'the router answers on {port}')\n"
        "    except OSError:\n"
        "        pass\n"
        "print('unreachable')\n"
    )
    rc, out = candidate.exec_run(["python", "-c", probe])
    assert rc == 0 and out.decode().strip() == "unreachable", out.decode()
    assert "/run/gantry" not in {m["Destination"] for m in candidate.attrs["Mounts"]}
    assert target.current_weights() == {Slot.A: 100, Slot.B: 0}
    scenario.outcome = (
        "nothing listens on the router's address but the model endpoint: the runtime API "
        "is a unix socket in a host directory only the router mounts; weights unchanged"
    )

    forged_line = scenario.child(
        "forged-headers",
        group=GROUP,
        title="a client forges x-gantry-route / x-gantry-probe (pick the candidate, hide "
        "its requests from the success-rate check)",
    )
    target.observe()
    forged = {"x-gantry-route": "b", "x-gantry-probe": "quality", "x-gantry-probe-token": "0" * 64}
    with httpx.Client(base_url=target.endpoint, timeout=10, trust_env=False) as http:
        for _ in range(5):
            r = http.get("/health", headers=forged)
            assert r.status_code == 200
            assert not {k for k in r.json() if k.startswith("x-gantry")}, r.json()
        # Gantry's own probe, with the token: routed to b, logged as a probe, and the token
        # stripped before it reached the (untrusted) server.
        r = http.get("/health", headers=target.probe_headers(Slot.B, "quality"))
        assert r.status_code == 200
        seen = r.json()
        assert seen.get("x-gantry-route") == "b" and "x-gantry-probe-token" not in seen
    deadline = time.monotonic() + 10
    records: list[AccessRecord] = []
    while len(records) < 6 and time.monotonic() < deadline:
        records += target.observe()
        time.sleep(0.2)
    assert [(r.server, r.probe) for r in records] == [("a", "")] * 5 + [("b", "quality")]
    forged_line.outcome = (
        "without the deployment's probe token the headers are removed: 5 of 5 went by "
        "weight and were counted as live traffic; the token never reaches a server"
    )
    forged_line.result = "passed"


def test_a_spec_cannot_send_the_machines_token_elsewhere(
    gantry_env: GantryEnv, tmp_path: Path, scenario: Scenario
) -> None:
    """A spec chooses where its weights come from, not where the machine's token goes."""
    scenario.group = GROUP
    scenario.title = "a spec points source.endpoint at another host to collect $HF_TOKEN"
    other = gantry_env.hub_url.replace("127.0.0.1", "localhost")
    host = other.removeprefix("http://")
    store = WeightStore(tmp_path / "w")
    source = _source(gantry_env, repo_id=GATED_REPO_ID, endpoint=other)
    with pytest.raises(GatedRepoError) as e:
        weights_stage.run(source, store, token=DEMO_TOKEN)
    assert f"not sent to {host}" in str(e.value) and "GANTRY_TOKEN_HOSTS" in str(e.value)
    assert not any((tmp_path / "w").rglob("*.onnx"))
    ok = weights_stage.run(source, store, token=DEMO_TOKEN, token_hosts={"HF_TOKEN": (host,)})
    assert ok.file_count > 3
    scenario.outcome = (
        "token withheld (only huggingface.co, $HF_ENDPOINT's host and GANTRY_TOKEN_HOSTS get "
        "it); the gated repository is refused saying why; allowed host: downloads"
    )


def test_secrets_in_a_spec_are_refused_and_records_are_private(
    tmp_path: Path, scenario: Scenario
) -> None:
    from gantry.record import Recorder

    scenario.group = GROUP
    scenario.title = (
        "secrets put in a spec (runtime.env HF_TOKEN, https://TOKEN@host URLs), to be "
        "stored in clear in records, MLflow and Prefect"
    )
    base: dict[str, Any] = {"name": "m", "source": {"repo_id": "a/b", "revision": "v1"}}
    for bad in (
        {**base, "runtime": {"env": {"HF_TOKEN": "hf_" + "x" * 30}}},
        {**base, "source": {**base["source"], "endpoint": "https://hf_tok3n@hub.example"}},
        {**base, "mlflow": {"tracking_uri": "https://user:pw@mlflow.example"}},
    ):
        with pytest.raises(SpecError):
            parse_spec(bad)
    rec = Recorder(tmp_path / "releases", parse_spec(base), flow_run_id=None)
    assert rec.path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "releases").stat().st_mode & 0o777 == 0o700
    scenario.outcome = (
        "each refused naming the field (exit 2); records are 0600 in 0700 directories and "
        "store the spec redacted as MLflow's params are"
    )


def test_plain_http_only_to_a_registry_that_is_really_loopback(scenario: Scenario) -> None:
    from gantry.adapters.registry import RegistryClient

    scenario.group = GROUP
    scenario.title = (
        "a registry named 127.evil.example / localhost.evil.example, to get images pushed, "
        "scanned and signatures fetched over plain HTTP"
    )
    for address in ("127.evil.example:5000", "localhost.evil.example", "127.0.0.1.nip.io"):
        with RegistryClient(address) as client:
            assert client.base.startswith("https://"), client.base
    with RegistryClient("127.0.0.1:5075") as client:
        assert client.base == "http://127.0.0.1:5075"
    scenario.outcome = (
        "HTTPS: one predicate on the parsed address (not a prefix) for the registry client, "
        "trivy --insecure and cosign"
    )


def _post(hook: Any, payload: Any, delivery: str, **headers: str) -> Any:
    from gantry.webhook.signature import sign

    client, _starter, _dir = hook
    body = json.dumps(payload).encode()
    h = {
        "Content-Type": "application/json",
        "X-Gantry-Delivery": delivery,
        "X-Gantry-Signature": sign(body, _WEBHOOK_SECRET),
        **headers,
    }
    return client.post("/webhook", content=body, headers=h)


def test_a_webhook_sender_cannot_weaken_a_gate_or_replay_a_delivery(
    webhook: Any,  # noqa: F811
    scenario: Scenario,
) -> None:
    _client, starter, _dir = webhook
    scenario.group = GROUP
    scenario.title = (
        "a webhook sender overrides evaluate.threshold, scan.ignore_unfixed, sign.key, "
        "source.endpoint, mlflow.tracking_uri"
    )
    before = len(starter.calls)
    for field, value in (
        ("evaluate.threshold", 0.0),
        ("scan.ignore_unfixed", True),
        ("sign.key", "/root/.ssh/id_ed25519"),
        ("source.endpoint", "https://hub.attacker.example"),
        ("mlflow.tracking_uri", "https://mlflow.attacker.example"),
    ):
        r = _post(
            webhook,
            {"spec_path": "examples/minilm-demo.yaml", "overrides": {field: value}},
            f"weaken-{field}",
        )
        assert r.status_code == 403, r.text
    assert len(starter.calls) == before
    scenario.outcome = "403 naming the field, no run (only override_fields, never a weakening)"

    replay = scenario.child(
        "replay",
        group=GROUP,
        title="a captured, signed GitHub release body resent under a new X-GitHub-Delivery",
    )
    release = {
        "action": "published",
        "release": {"id": 991, "tag_name": "v1", "prerelease": False, "draft": False},
        "repository": {"full_name": "acme/minilm"},
    }
    first = _post(webhook, release, "gh-a", **{"X-GitHub-Event": "release"})
    again = _post(webhook, release, "gh-b", **{"X-GitHub-Event": "release"})
    assert first.status_code == again.status_code == 202
    assert again.json()["duplicate"] and again.json()["flow_run_id"] == first.json()["flow_run_id"]
    assert len(starter.calls) == before + 1
    replay.outcome = (
        "the same run back (deduplicated on the payload's release id + action, also the "
        "Prefect idempotency key); timestamped generic signatures refuse old bodies"
    )
    replay.result = "passed"


# A model server that answers embeddings, except (as "champion") the quality probes: the
# comparison the canary's quality check needs cannot be made.
EMBEDDINGS_SERVER = r"""
import http.server, json, os
class H(http.server.BaseHTTPRequestHandler):
    def _send(self, code, doc):
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self._send(200, {"status": "ok"})
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if os.environ["ROLE"] == "champion" and self.headers.get("x-gantry-probe") == "quality":
            return self._send(500, {"error": "down for quality probes"})
        texts = req["input"] if isinstance(req["input"], list) else [req["input"]]
        data = [{"index": i, "embedding": [1.0, 0.0, 0.0]} for i, _ in enumerate(texts)]
        self._send(200, {"data": data, "model": req.get("model")})
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", 8080), H).serve_forever()
"""


def test_a_champion_that_cannot_be_measured_is_no_pass(
    make_target: Any,  # noqa: F811
    scenario: Scenario,
) -> None:
    """The champion's quality probes fail (as a candidate might arrange by overloading
    it): the window is inconclusive, run again, then the step fails; it never passes on
    the candidate's word alone."""
    from gantry.spec import CanaryOptions
    from gantry.stages.canary.analysis import analyse_step
    from gantry.stages.canary.probes import Prober
    from gantry.stages.canary.sources import RouterLogSource
    from tests.support import REPO_ROOT

    scenario.group = GROUP
    scenario.title = "the champion cannot be scored by the canary's quality probe"
    target: DockerTarget = make_target("unmeasured")
    target.ensure({Slot.A: 90, Slot.B: 10})
    for slot, role in ((Slot.A, "champion"), (Slot.B, "candidate")):
        target.client.containers.run(
            "python:3.11-slim-bookworm",
            ["python", "-c", EMBEDDINGS_SERVER],
            name=target.server_name(slot),
            network=target.name,
            labels={DEPLOYMENT_LABEL: target.name},
            environment={"ROLE": role},
            user="65534",
            detach=True,
        )
    for slot in Slot:
        target.wait_server_up(slot, 60)
    dataset = REPO_ROOT / "examples" / "eval" / "minilm-retrieval.jsonl"
    spec = parse_spec(
        {
            "name": "unmeasured",
            "source": {"repo_id": "a/b", "revision": "v1"},
            "evaluate": {"dataset": str(dataset), "request_attempts": 1},
        }
    )
    opts = CanaryOptions(
        window_s=2, interval_s=0.5, min_requests=4, probe_rps=8, quality_probes=4,
        inconclusive_retries=1,
    )  # fmt: skip
    prober = Prober(spec, target.endpoint, dataset, target.probe_headers)
    t0 = time.monotonic()
    try:
        verdict = analyse_step(target, prober, RouterLogSource(target), opts, Slot.B, Slot.A, 0, 10)
    finally:
        prober.close()
    took = time.monotonic() - t0
    checks = {c.name: c for c in verdict.checks}
    assert not verdict.passed and "quality" in verdict.failed_checks, verdict
    assert checks["quality"].inconclusive and checks["quality"].passed is None
    assert checks["success-rate"].passed is True  # everything else was fine
    assert took >= 2 * opts.window_s  # the window was run again before it failed
    scenario.outcome = (
        f"quality inconclusive (no champion score): the window ran twice ({took:.0f}s), "
        "then the step failed naming the check; a rollback, never a pass"
    )
