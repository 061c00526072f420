"""Stage `register`'s pure parts: params, metrics, source, error mapping."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException
from pydantic import BaseModel

from gantry.adapters.mlflow_registry import map_error, sqlite_path, store_state
from gantry.errors import MLflowUnavailableError, RegistrationError, TransientError
from gantry.settings import Settings
from gantry.spec import parse_spec
from gantry.stages.register import (
    REDACTED,
    RegisterResult,
    default_tracking_uri,
    flatten_params,
    numeric_fields,
    spec_params,
)
from tasks.register import summary_markdown

pytestmark = pytest.mark.unit

SPEC = parse_spec(
    {
        "name": "minilm",
        "source": {"repo_id": "gantry-demo/all-MiniLM-L6-v2", "revision": "v1"},
        "runtime": {"env": {"LOG_LEVEL": "info"}},
    }
)


def test_spec_params_are_flat_strings_with_secrets_redacted() -> None:
    params = spec_params(SPEC)
    assert params["name"] == "minilm"
    assert params["source.repo_id"] == "gantry-demo/all-MiniLM-L6-v2"
    assert params["source.timeout_s"] == "60.0"
    assert params["source.allow_patterns"].startswith('["onnx/model.onnx"')
    assert params["runtime.env.LOG_LEVEL"] == "info"
    assert params["mlflow.tracking_uri"] == "null"
    # anything named like a token or password is never logged, even a variable's name
    # (a spec refuses secret-named runtime.env keys; the flattening redacts them anyway)
    env = flatten_params({"runtime": {"env": {"API_TOKEN": "s3cret"}}})
    assert env["runtime.env.API_TOKEN"] == REDACTED
    assert params["source.token_env"] == REDACTED
    assert params["sign.password_env"] == REDACTED
    assert "s3cret" not in "".join([*params.values(), *env.values()])
    assert all(isinstance(v, str) for v in params.values())


def test_flatten_params_limits_and_urls() -> None:
    params = flatten_params(
        {
            "a": {"b": {"c": 1}, "empty": {}},
            "url": "https://user:hunter22@mlflow.example/",
            "long": "x" * 7000,
            "we!rd key": True,
        }
    )
    assert params["a.b.c"] == "1"
    assert params["a.empty"] == "{}"
    assert "hunter22" not in params["url"]
    assert len(params["long"]) == 6000
    assert params["we_rd key"] == "true"


class _Latency(BaseModel):
    p50_ms: float
    p95_ms: float


class _Eval(BaseModel):
    score: float
    top1: float
    passed: bool
    n: int
    label: str
    latency: _Latency
    per_item: list[float]
    skipped: float | None = None
    bad: float = float("nan")


def test_numeric_fields_reads_any_result_model() -> None:
    ev = _Eval(
        score=0.91,
        top1=0.91,
        passed=True,
        n=40,
        label="x",
        latency=_Latency(p50_ms=3.5, p95_ms=9.0),
        per_item=[1.0],
    )
    assert numeric_fields(ev, "eval") == {
        "eval.score": 0.91,
        "eval.top1": 0.91,
        "eval.n": 40.0,
        "eval.latency.p50_ms": 3.5,
        "eval.latency.p95_ms": 9.0,
    }
    assert numeric_fields(None, "smoke") == {}


def test_default_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path)})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = default_tracking_uri(settings)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    assert sqlite_path(uri) == tmp_path.resolve() / "mlflow" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert default_tracking_uri(settings) == "http://mlflow:5000"
    assert sqlite_path("sqlite:///rel/x.db") == Path("rel/x.db")
    assert sqlite_path("http://h") is None


def _rest(code: str, message: str) -> RestException:
    """An error answer from a tracking server."""
    return RestException({"error_code": code, "message": message})  # type: ignore[no-untyped-call]


URI = "http://user:pw123456@mlflow.example:5000"


@pytest.mark.parametrize(
    "exc",
    [
        MlflowException(
            "API request to http://127.0.0.1:1/api/2.0/mlflow/runs/create failed with exception "
            "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded"
        ),
        MlflowException(
            "API request to http://h/api failed with timeout exception Read timed out. To "
            "increase the timeout, set MLFLOW_HTTP_REQUEST_TIMEOUT"
        ),
        _rest("TEMPORARILY_UNAVAILABLE", "overloaded"),
        _rest("INTERNAL_ERROR", "server blew up"),
        MlflowException("API request to endpoint /x failed with error code 503 != 200"),
        requests.exceptions.ConnectionError("refused"),
        TimeoutError("slow"),
        sqlite3.OperationalError("database is locked"),
    ],
)
def test_unreachable_or_overloaded_is_transient(exc: Exception) -> None:
    err = map_error(exc, action="create a run", uri=URI)
    assert isinstance(err, MLflowUnavailableError)
    assert isinstance(err, TransientError)
    assert "MLFLOW_TRACKING_URI" in str(err)
    assert "pw123456" not in str(err)


@pytest.mark.parametrize(
    ("exc", "fix_names"),
    [
        (
            _rest("INVALID_PARAMETER_VALUE", "bad name"),
            "mlflow.model_name",
        ),
        (
            _rest("PERMISSION_DENIED", "no"),
            "MLFLOW_TRACKING_TOKEN",
        ),
        # a local store's MlflowException defaults to INTERNAL_ERROR: not a server answer
        (MlflowException("Run 'x' not found"), "mlflow.model_name"),
        (ValueError("odd"), "mlflow.model_name"),
    ],
)
def test_refusals_are_permanent(exc: Exception, fix_names: str) -> None:
    err = map_error(exc, action="register a version of 'minilm'", uri=URI)
    assert isinstance(err, RegistrationError)
    assert not isinstance(err, TransientError)
    assert "register a version of 'minilm'" in str(err)
    assert fix_names in err.fix


def test_sqlite_refusal_names_the_store() -> None:
    err = map_error(MlflowException("no such table"), action="x", uri="sqlite:////s/mlflow.db")
    assert isinstance(err, RegistrationError)
    assert "sqlite:////s/mlflow.db" in err.fix


def test_summary_markdown_links_a_server_ui() -> None:
    result = RegisterResult(
        tracking_uri="http://mlflow:5000",
        experiment_id="3",
        run_id="abc",
        model_name="minilm",
        version="2",
        source="hf://o/r@c0ffee",
        aliases=("candidate",),
        tags={"gantry.image_ref": "reg/gantry/minilm@sha256:00"},
        cached=False,
        register_seconds=0.1,
    )
    md = summary_markdown(result)
    assert "http://mlflow:5000/#/experiments/3/runs/abc" in md
    assert "http://mlflow:5000/#/models/minilm/versions/2" in md
    sqlite_md = summary_markdown(result.model_copy(update={"tracking_uri": "sqlite:////s/m.db"}))
    assert "mlflow ui --backend-store-uri sqlite:////s/m.db" in sqlite_md


def _commit(db: Path, sql: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(sql)


def test_store_state_changes_with_every_committed_write(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert store_state(uri) is None  # no store yet: nothing is known
    _commit(db, "create table t (x)")
    first = store_state(uri)
    assert first is not None and store_state(uri) == first  # reading changes nothing
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("select * from t").fetchall()
    assert store_state(uri) == first
    seen = {first}
    for i in range(5):  # back to back, well inside one mtime tick: the counter tells them
        _commit(db, f"insert into t values ({i})")
        state = store_state(uri)
        assert state is not None and state not in seen
        seen.add(state)


def test_store_state_is_unknown_where_it_cannot_promise(tmp_path: Path) -> None:
    assert store_state("http://mlflow.example:5000") is None
    assert store_state("sqlite:///:memory:") is None
    wal = tmp_path / "wal.db"
    with contextlib.closing(sqlite3.connect(wal)) as conn:
        conn.execute("pragma journal_mode=wal")
        conn.execute("create table t (x)")
        conn.commit()
        assert store_state(f"sqlite:///{wal}") is None
    not_sqlite = tmp_path / "junk.db"
    not_sqlite.write_bytes(b"x" * 200)
    assert store_state(f"sqlite:///{not_sqlite}") is None
    hot = tmp_path / "hot.db"
    _commit(hot, "create table t (x)")
    Path(f"{hot}-journal").write_bytes(b"")  # a writer in the middle of a transaction
    assert store_state(f"sqlite:///{hot}") is None
