"""A hub that cannot be reached: the error says which variable picks another endpoint."""

from __future__ import annotations

import httpx2
import pytest

from gantry.adapters.hub import HubClient
from gantry.errors import HubUnavailableError
from gantry.spec import HubSource

pytestmark = pytest.mark.unit


def _unreachable(client: HubClient, monkeypatch: pytest.MonkeyPatch, exc: Exception) -> str:
    def fail(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(client._api, "model_info", fail)
    with pytest.raises(HubUnavailableError) as err:
        client.resolve("acme/model", "main", ["*"])
    return str(err.value)


@pytest.mark.parametrize(
    "exc",
    [
        httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"),
        httpx2.ConnectTimeout("timed out"),
        ConnectionError("Network is unreachable"),
    ],
    ids=["dns", "timeout", "connection"],
)
def test_default_endpoint_unreachable_names_hf_endpoint(
    monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    endpoint = HubSource(repo_id="acme/model").resolved_endpoint()
    assert endpoint == "https://huggingface.co"
    client = HubClient(endpoint, token=None, token_env="HF_TOKEN", timeout_s=5)
    message = _unreachable(client, monkeypatch, exc)
    assert "cannot reach the hub at https://huggingface.co" in message
    assert "set HF_ENDPOINT (or the spec's source.endpoint) to your Hub mirror" in message
    assert "export HF_ENDPOINT=$(gantry env url hub)` after `gantry env up`" in message


def test_chosen_endpoint_unreachable_says_to_check_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:5076")
    endpoint = HubSource(repo_id="acme/model").resolved_endpoint()
    client = HubClient(endpoint, token=None, token_env="HF_TOKEN", timeout_s=5)
    message = _unreachable(client, monkeypatch, httpx2.ConnectError("connection refused"))
    assert "cannot reach the hub at http://127.0.0.1:5076" in message
    assert "check the endpoint is up and reachable" in message
    assert "your Hub mirror" not in message
