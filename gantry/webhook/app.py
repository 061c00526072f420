"""The webhook receiver as an ASGI app (Starlette).

``POST /webhook`` handles one delivery, in this order; every refusal starts nothing:

1. ``Content-Length`` over ``max_body_bytes`` → 413; not ``application/json`` → 415;
   the body is read counting bytes, and refused with 413 as soon as it is too large.
2. The HMAC-SHA256 signature over the raw body (``X-Hub-Signature-256`` or
   ``X-Gantry-Signature``) → 401 when missing or wrong.
3. A delivery id (``X-GitHub-Delivery`` or ``X-Gantry-Delivery``) → 400 when absent.
   It is required, not derived from the body: a sender knows what one delivery is
   (GitHub sends a GUID; a CI job can send ``$RUN_ID-$ATTEMPT``), while a body hash
   would make a deliberate re-run of the same payload return the old, maybe failed, run.
4. A delivery id seen before → 202 with the same run (409 if its body differs).
5. Not JSON → 400; an event Gantry does not act on → 202 ``{"ignored": …}``; a payload
   that is no valid spec → 422 naming each field.
6. A run of the deployment is created with the idempotency key
   ``gantry-webhook:<delivery id>`` → 202 ``{flow_run_id, url, …}``; Prefect
   unreachable or the deployment missing → 503 with ``Retry-After``.

Neither the secret nor a signature header value is ever logged or answered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gantry.adapters.prefect_api import StartedRun
from gantry.errors import (
    GantryError,
    TransientError,
    WebhookBodyTooLargeError,
    WebhookConflictError,
    WebhookContentTypeError,
    WebhookError,
    WebhookForbiddenError,
    WebhookParameterError,
    WebhookSignatureError,
    WebhookTimeoutError,
)
from gantry.proc import redact_text
from gantry.webhook.config import WebhookConfig
from gantry.webhook.mapping import Ignored, map_delivery
from gantry.webhook.signature import signed_timestamp, verify_signature
from gantry.webhook.store import Delivery, DeliveryStore

log = logging.getLogger(__name__)

DELIVERY_HEADERS = ("x-github-delivery", "x-gantry-delivery")
_DELIVERY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}")
#: The `release` flow's one parameter.
RELEASE_PARAMETER = "spec"


class RunStarter(Protocol):
    """Starts a run of the release deployment (``PrefectRunStarter`` in production)."""

    async def start(
        self, parameters: dict[str, Any], *, idempotency_key: str, tags: Sequence[str] = ()
    ) -> StartedRun: ...


StarterFactory = Callable[[], AbstractAsyncContextManager[RunStarter]]


def create_app(
    config: WebhookConfig, *, secret: bytes, store: DeliveryStore, starter: StarterFactory
) -> Starlette:
    """The receiver. ``starter`` is entered once for the app's lifetime (it holds the
    Prefect client, which must live on the server's event loop)."""
    if not secret:
        raise ValueError("the webhook secret is empty")
    state: dict[str, RunStarter] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with starter() as s:
            state["starter"] = s
            yield

    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def receive(request: Request) -> JSONResponse:
        delivery = "-"
        try:
            body = await _read_body(request, config.max_body_bytes, config.read_timeout_s)
            verify_signature(
                body, request.headers, secret, tolerance_s=config.signature_tolerance_s
            )
            delivery = _delivery_id(request)
            answer = await _handle(request, body, delivery, config, store, state["starter"])
        except WebhookError as exc:
            fields = (
                [{"loc": loc, "msg": msg} for loc, msg in exc.errors]
                if isinstance(exc, WebhookParameterError)
                else [{"loc": f, "msg": "not allowed from a delivery"} for f in exc.fields]
                if isinstance(exc, WebhookForbiddenError)
                else None
            )
            return _refuse(exc.status, exc, delivery, secret, fields=fields)
        except TransientError as exc:
            return _refuse(503, exc, delivery, secret, headers={"Retry-After": "30"})
        except GantryError as exc:  # the receiver's own configuration, or Prefect refusing
            return _refuse(500, exc, delivery, secret)
        return answer

    return Starlette(
        routes=[
            Route("/webhook", receive, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


async def _handle(
    request: Request,
    body: bytes,
    delivery: str,
    config: WebhookConfig,
    store: DeliveryStore,
    starter: RunStarter,
) -> JSONResponse:
    body_sha256 = hashlib.sha256(body).hexdigest()
    known = await anyio.to_thread.run_sync(store.get, delivery)
    if known is not None:
        if known.body_sha256 != body_sha256:
            raise WebhookConflictError(
                f"delivery {delivery} was received before with another body",
                fix="send a new delivery id for a new payload",
            )
        log.info("delivery %s: seen before, flow run %s", delivery, known.flow_run_id)
        return _accepted(known, duplicate=True)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WebhookError(f"the body is not JSON: {exc}") from None
    event = request.headers.get("x-github-event")
    stamp = signed_timestamp(request.headers)
    if event is None and stamp is None and config.require_timestamp:
        raise WebhookSignatureError(
            "this receiver takes only timestamped signatures from generic senders",
            fix="sign as X-Gantry-Signature: t=<unix time>,v1=<hex of HMAC-SHA256 over "
            '"<t>." + body>',
        )
    outcome = map_delivery(event, payload, config)
    if isinstance(outcome, Ignored):
        log.info("delivery %s (%s): ignored: %s", delivery, event or "generic", outcome.reason)
        return JSONResponse({"ignored": outcome.reason, "delivery": delivery}, status_code=202)
    # The payload's own identity: a captured body resent under a new delivery id is the
    # same trigger, answered with the run it started.
    identity = outcome.identity or (
        f"generic:{stamp}:{body_sha256}" if event is None and stamp is not None else None
    )
    if identity is not None:
        earlier = await anyio.to_thread.run_sync(store.get_by_identity, identity)
        if earlier is not None:
            log.info(
                "delivery %s: the same payload as delivery %s (%s), flow run %s",
                delivery,
                earlier.delivery_id,
                identity,
                earlier.flow_run_id,
            )
            return _accepted(earlier, duplicate=True)
    run = await starter.start(
        {RELEASE_PARAMETER: outcome.spec.model_dump(mode="json")},
        idempotency_key=f"gantry-webhook:{identity or delivery}",
        tags=["webhook", f"webhook:{outcome.event}"],
    )
    stored = await anyio.to_thread.run_sync(
        store.put,
        Delivery(
            delivery_id=delivery,
            body_sha256=body_sha256,
            flow_run_id=str(run.flow_run_id),
            url=run.url,
            release_id=outcome.spec.release_id,
            identity=identity,
        ),
    )
    log.info(
        "delivery %s: %s → release %s, flow run %s",
        delivery,
        outcome.origin,
        outcome.spec.release_id,
        stored.flow_run_id,
    )
    return _accepted(stored, duplicate=False)


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise WebhookError("Content-Length is not a number")
        if int(length) > limit:
            raise WebhookBodyTooLargeError(
                f"the body ({length} bytes) is larger than {limit} bytes",
                fix="raise max_body_bytes in the webhook config if such payloads are expected",
            )
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise WebhookContentTypeError(f"content type {media or '(none)'!r} is not JSON")
    # Content-Length can be absent (chunked) or lie: count what actually arrives.
    chunks: list[bytes] = []
    size = 0
    # A deadline for the whole body: uvicorn has none, and a client trickling bytes would
    # otherwise hold its connection for as long as it likes.
    with anyio.move_on_after(timeout_s) as scope:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise WebhookBodyTooLargeError(f"the body is larger than {limit} bytes")
            chunks.append(chunk)
    if scope.cancelled_caught:
        raise WebhookTimeoutError(f"the body did not arrive within {timeout_s:g}s")
    return b"".join(chunks)


def _delivery_id(request: Request) -> str:
    for name in DELIVERY_HEADERS:
        if (value := request.headers.get(name)) is not None:
            if not _DELIVERY_ID.fullmatch(value):
                raise WebhookError(
                    f"{name} must be 1-200 letters, digits or ._:@+- (starting with a letter "
                    "or digit)"
                )
            return value
    raise WebhookError(
        "the delivery has no id: send X-Gantry-Delivery (GitHub sends X-GitHub-Delivery)",
        fix="give each delivery a unique id, e.g. the CI run id and attempt; a resend of "
        "the same delivery keeps its id and gets the same run back",
    )


def _accepted(d: Delivery, *, duplicate: bool) -> JSONResponse:
    return JSONResponse(
        {
            "flow_run_id": d.flow_run_id,
            "url": d.url,
            "release_id": d.release_id,
            "delivery": d.delivery_id,
            "duplicate": duplicate,
        },
        status_code=202,
    )


def _refuse(
    status: int,
    exc: GantryError,
    delivery: str,
    secret: bytes,
    *,
    fields: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    # Messages never carry header values, but a payload could echo the secret back.
    message = redact_text(exc.message, [secret.decode(errors="replace")])
    log.warning("delivery %s refused with %d: %s", delivery, status, message)
    content: dict[str, object] = {"error": message}
    if exc.fix:
        content["fix"] = exc.fix
    if fields is not None:
        content["fields"] = fields
    return JSONResponse(content, status_code=status, headers=headers)
