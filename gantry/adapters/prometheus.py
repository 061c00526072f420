"""Adapter for Prometheus's HTTP API (v1). Prefect-free.

What the canary's analysis and `gantry env` need: instant and range queries parsed into
typed samples, the active scrape targets, readiness and a configuration reload.

    with PrometheusClient(settings.prometheus_url) as prom:
        p95 = prom.query('histogram_quantile(0.95, sum by (le) (rate(x_bucket[30s])))')
        for s in p95.samples:
            print(s.labels, s.value)  # NaN when there were no requests

Values are floats; Prometheus's ``NaN``, ``+Inf`` and ``-Inf`` become ``float('nan')`` and
``±inf``. Every call has a timeout (``timeout_s``, also sent to Prometheus as the query's
own deadline). A URL may carry basic-auth credentials (``https://user:pass@host``): they
are sent as an Authorization header and never appear in an error message.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field

from gantry.errors import (
    PrometheusQueryError,
    PrometheusResponseError,
    PrometheusUnavailableError,
)
from gantry.proc import redact_text
from gantry.tls import tls_context

_QUERY_FIX = (
    "correct the PromQL of the check that uses this query (try it in the Graph tab of the "
    "Prometheus UI at the address `gantry env url prometheus` prints)"
)
# Prometheus writes this for a target never scraped yet.
_NEVER = datetime(1, 1, 1, tzinfo=UTC)


class Sample(BaseModel):
    """One value of one series at one instant."""

    model_config = ConfigDict(frozen=True)

    labels: dict[str, str] = Field(description="The series' labels (empty for a scalar).")
    value: float = Field(description="The value; NaN or ±inf where Prometheus says so.")
    at: datetime = Field(description="The instant of the value (UTC).")


class QueryResult(BaseModel):
    """An instant query's answer: one sample per series (one, unlabelled, for a scalar)."""

    model_config = ConfigDict(frozen=True)

    result_type: Literal["vector", "scalar"]
    samples: tuple[Sample, ...]
    warnings: tuple[str, ...] = ()

    def scalar(self) -> float | None:
        """The single value of a scalar, or of a one-series vector; None when empty.

        More than one series is ambiguous and raises ``ValueError``: aggregate in PromQL.
        """
        if not self.samples:
            return None
        if len(self.samples) > 1:
            raise ValueError(f"{len(self.samples)} series where one was expected")
        return self.samples[0].value


class Series(BaseModel):
    """One series of a range query: its labels and its values in time order."""

    model_config = ConfigDict(frozen=True)

    labels: dict[str, str]
    points: tuple[tuple[datetime, float], ...]


class ScrapeTarget(BaseModel):
    """An active scrape target, as Prometheus last saw it."""

    model_config = ConfigDict(frozen=True)

    labels: dict[str, str] = Field(description="Labels after relabelling (job, instance, …).")
    scrape_pool: str = Field(description="The scrape job that found it.")
    scrape_url: str = Field(description="Where it is scraped (credentials redacted).")
    health: Literal["up", "down", "unknown"]
    last_error: str = ""
    last_scrape: datetime | None = Field(description="None when never scraped yet.")
    last_scrape_duration_s: float = 0.0


def _value(raw: Any) -> float:
    # "NaN", "+Inf", "-Inf" and numbers: float() reads them all.
    return float(raw)


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _timestamp(at: datetime) -> str:
    if at.tzinfo is None:  # a naive time is taken as UTC, never as local time
        at = at.replace(tzinfo=UTC)
    return f"{at.timestamp():.3f}"


class PrometheusClient:
    """Client of one Prometheus server (``url``: its base, e.g. ``http://127.0.0.1:5077``)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network (tests replay recorded answers through it)."""
        parts = urlsplit(url.rstrip("/"))
        auth: tuple[str, str] | None = None
        if parts.username is not None:
            auth = (parts.username, parts.password or "")
            host = parts.hostname or ""
            netloc = f"[{host}]" if ":" in host else host
            netloc += f":{parts.port}" if parts.port else ""
            parts = parts._replace(netloc=netloc)
        self.base = urlunsplit(parts)
        self.timeout_s = timeout_s
        self._secrets = [auth[1]] if auth else []
        self._http = httpx.Client(
            timeout=timeout_s, verify=tls_context(), auth=auth, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _redact(self, text: str) -> str:
        return redact_text(text, self._secrets)

    # --- transport ------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, self.base + path, **kw)
        except httpx.TimeoutException:
            raise PrometheusUnavailableError(
                f"Prometheus at {self.base} did not answer {path} within {self.timeout_s:g}s"
            ) from None
        except httpx.TransportError as exc:
            raise PrometheusUnavailableError(
                f"cannot reach Prometheus at {self.base}: {self._redact(str(exc))}"
            ) from None
        return r

    def _api(
        self, method: str, path: str, *, query: str = "", **kw: Any
    ) -> tuple[Any, tuple[str, ...]]:
        """``data`` and ``warnings`` of an API answer; errors mapped to gantry.errors."""
        r = self._request(method, path, **kw)
        body: dict[str, Any] = {}
        try:
            parsed = r.json()
            if isinstance(parsed, dict):
                body = parsed
        except ValueError:
            pass
        reason = self._redact(str(body.get("error") or r.text.strip()[:300]))
        if r.status_code in (400, 422) and body.get("status") == "error":
            kind = body.get("errorType") or "bad_data"
            raise PrometheusQueryError(
                f"Prometheus at {self.base} refused the query {query!r} ({kind}): {reason}"
                if query
                else f"Prometheus at {self.base} refused {path} ({kind}): {reason}",
                query=query,
                reason=reason,
                fix=_QUERY_FIX,
            )
        if r.status_code >= 500:
            what = "is not ready yet" if r.status_code == 503 else f"answered {r.status_code}"
            raise PrometheusUnavailableError(
                f"Prometheus at {self.base} {what} for {path}"
                + (f" (query {query!r})" if query else "")
                + (f": {reason}" if reason else "")
            )
        if r.status_code in (401, 403):
            raise PrometheusResponseError(
                f"Prometheus at {self.base} refused {path} ({r.status_code})",
                fix="give GANTRY_PROMETHEUS_URL the credentials it needs "
                "(https://user:password@host), or check the proxy in front of it",
            )
        if r.status_code != 200 or body.get("status") != "success":
            raise PrometheusResponseError(
                f"{self.base}{path} answered {r.status_code}"
                + (f": {reason}" if reason else "")
                + "; is it a Prometheus server?",
                fix="check GANTRY_PROMETHEUS_URL: it must be the server's base URL, without "
                "/api/v1 or /graph",
            )
        return body.get("data"), tuple(str(w) for w in body.get("warnings") or ())

    # --- queries ----------------------------------------------------------------------------

    def query(self, promql: str, at: datetime | None = None) -> QueryResult:
        """Evaluate ``promql`` at one instant (``at``, default now).

        A vector gives one sample per series; a scalar one sample without labels. A range
        vector (``x[1m]``) is refused: wrap it in a function (``rate(x[1m])``) or use
        :meth:`query_range`.
        """
        form = {"query": promql, "timeout": f"{self.timeout_s:g}s"}
        if at is not None:
            form["time"] = _timestamp(at)
        data, warnings = self._api("POST", "/api/v1/query", query=promql, data=form)
        try:
            kind = data["resultType"]
            result = data["result"]
            if kind == "vector":
                samples = tuple(
                    Sample(labels=s["metric"], value=_value(s["value"][1]), at=_at(s["value"][0]))
                    for s in result
                )
            elif kind == "scalar":
                samples = (Sample(labels={}, value=_value(result[1]), at=_at(result[0])),)
            else:
                raise PrometheusQueryError(
                    f"the query {promql!r} gives a {kind}, not a number or an instant vector",
                    query=promql,
                    reason=f"result type {kind}",
                    fix="wrap a range selector in a function such as rate() or "
                    "avg_over_time(), or ask query_range() for a series over time",
                )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise self._malformed("/api/v1/query", exc) from None
        return QueryResult(result_type=kind, samples=samples, warnings=warnings)

    def query_range(
        self, promql: str, start: datetime, end: datetime, step_s: float
    ) -> list[Series]:
        """Evaluate ``promql`` every ``step_s`` seconds from ``start`` to ``end``."""
        if step_s <= 0:
            raise ValueError("step_s must be positive")
        form = {
            "query": promql,
            "start": _timestamp(start),
            "end": _timestamp(end),
            "step": f"{step_s:g}",
            "timeout": f"{self.timeout_s:g}s",
        }
        data, _ = self._api("POST", "/api/v1/query_range", query=promql, data=form)
        try:
            if data["resultType"] != "matrix":
                raise ValueError(f"result type {data['resultType']}, not matrix")
            return [
                Series(
                    labels=s["metric"],
                    points=tuple((_at(ts), _value(v)) for ts, v in s["values"]),
                )
                for s in data["result"]
            ]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise self._malformed("/api/v1/query_range", exc) from None

    def targets(self) -> list[ScrapeTarget]:
        """The active scrape targets (those service discovery currently finds)."""
        data, _ = self._api("GET", "/api/v1/targets", params={"state": "active"})
        try:
            out = []
            for t in data["activeTargets"]:
                last = datetime.fromisoformat(t["lastScrape"]) if t.get("lastScrape") else _NEVER
                out.append(
                    ScrapeTarget(
                        labels=t["labels"],
                        scrape_pool=t.get("scrapePool", ""),
                        scrape_url=self._redact(t["scrapeUrl"]),
                        health=t["health"],
                        last_error=self._redact(t.get("lastError") or ""),
                        last_scrape=None if last <= _NEVER else last,
                        last_scrape_duration_s=float(t.get("lastScrapeDuration") or 0.0),
                    )
                )
            return out
        except (KeyError, TypeError, ValueError) as exc:
            raise self._malformed("/api/v1/targets", exc) from None

    # --- lifecycle --------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether Prometheus answers and is ready to serve queries (``/-/ready``)."""
        try:
            return self._request("GET", "/-/ready").status_code == 200
        except PrometheusUnavailableError:
            return False

    def reload(self) -> None:
        """Make Prometheus re-read its configuration file (needs ``--web.enable-lifecycle``).

        A configuration it cannot load is refused and the old one stays in force.
        """
        r = self._request("POST", "/-/reload")
        if r.status_code == 200:
            return
        text = self._redact(r.text.strip()[-500:])
        if r.status_code == 403:
            raise PrometheusResponseError(
                f"Prometheus at {self.base} refused to reload: {text}",
                fix="start it with --web.enable-lifecycle (the embedded one has it), or "
                "reload it with SIGHUP",
            )
        if r.status_code == 500:
            raise PrometheusResponseError(
                f"Prometheus at {self.base} could not load its new configuration and keeps "
                f"the old one: {text}",
                fix="correct the configuration file it names (the embedded one's is "
                ".gantry/prometheus/prometheus.yml, written by `gantry env up`)",
            )
        raise PrometheusUnavailableError(
            f"Prometheus at {self.base} answered {r.status_code} to a reload: {text}"
        )

    def _malformed(self, path: str, exc: Exception) -> PrometheusResponseError:
        return PrometheusResponseError(
            f"{self.base}{path} answered JSON Gantry cannot read ({type(exc).__name__}: "
            f"{self._redact(str(exc))[:200]})",
            fix="check GANTRY_PROMETHEUS_URL points at Prometheus 2.x (or a compatible API)",
        )


__all__ = ["PrometheusClient", "QueryResult", "Sample", "ScrapeTarget", "Series"]
