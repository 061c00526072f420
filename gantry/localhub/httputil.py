"""What the read and the write routes of the local Hub endpoint share: error answers in
the Hub's form, path segments as the client encodes them, the bearer token."""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def error(status: int, code: str | None, message: str, **headers: str) -> Response:
    """The Hub's error answer: ``{"error": message}`` with ``X-Error-Message`` (and
    ``X-Error-Code``, which the client maps to its exception classes)."""
    # Messages echo request input (revisions, paths): keep the header printable ASCII, so
    # an encoded CR/LF cannot split it and a non-latin-1 character cannot crash it.
    hdrs = {"X-Error-Message": _UNPRINTABLE.sub("?", message), **headers}
    if code is not None:
        hdrs["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=hdrs)


def segments(request: Request) -> list[str]:
    """The request path's segments, each percent-decoded on its own."""
    # The client percent-encodes revisions (and tree paths) as one segment, so "/" inside
    # them arrives as %2F: split the raw path first, then decode each segment.
    raw = request.scope.get("raw_path") or quote(request.scope["path"]).encode()
    text = raw.decode("latin-1").split("?", 1)[0]
    parts = [unquote(s) for s in text.split("/")[1:]]
    while parts and parts[-1] == "":
        parts.pop()
    return parts


def bearer(request: Request) -> str | None:
    """The request's bearer token, if it carries one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
