"""What several routers share: JSON responses, 422s in FastAPI's shape, the API-key check,
and the error handlers whose bodies cannot fail to encode."""

import json
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from recfb.serving.guard import key_matches
from recfb.serving.service import Service

log = logging.getLogger("recfb.serving")
ECHO_CHARS = 200  # longest text echoed back in an error


def json_response(data: Any, status: int = 200) -> Response:
    """The body serialised once by `json` (no response-model validation on the hot path)."""
    return Response(json.dumps(data).encode(), status_code=status, media_type="application/json")


def unprocessable(loc: list, msg: str, kind: str = "value_error") -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, for checks pydantic cannot make
    (`kind`: the error's type, for an event the ETL's quarantine reason)."""
    return HTTPException(422, [{"loc": loc, "msg": msg, "type": kind}])


def printable(text: str, limit: int = ECHO_CHARS) -> str:
    """Text safe to put in a JSON answer: unpaired surrogates and control characters escaped,
    cut at `limit` characters with the length said."""
    out = text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
    out = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in out)
    return out if len(text) <= limit else f"{out}... ({len(text)} characters)"


def describe(value: Any, depth: int = 0) -> Any:
    """A JSON-safe picture of what arrived: non-finite numbers named, text made printable,
    containers summarised (an error never echoes a whole body)."""
    if value is None or isinstance(value, bool | int):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**18:
            return f"an integer of {len(str(abs(value)))} digits"
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN (not a number)"
        return value if math.isfinite(value) else f"{'-' if value < 0 else ''}Infinity"
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, bytes):
        return printable(value.decode("utf-8", "backslashreplace"))
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} items"
    return printable(type(value).__name__)


def error_entry(err: Any) -> dict:
    """One validation error with every part made safe (loc keys can be any text that came)."""
    if not isinstance(err, dict):
        return {"msg": printable(str(err))}
    entry = {
        "loc": [p if isinstance(p, int) else printable(str(p), 100) for p in err.get("loc", ())],
        "msg": printable(str(err.get("msg", "")), 500),
        "type": printable(str(err.get("type", "value_error")), 100),
    }
    if "input" in err:
        entry["input"] = describe(err["input"])
    return entry


def safe_json(status: int, body: Any, headers: dict | None = None) -> Response:
    """Serialise an error body; on any failure, a fixed body with the same status."""
    try:
        data = json.dumps(body, allow_nan=False, ensure_ascii=True).encode()
    except Exception:  # noqa: BLE001 - the error path must answer whatever it was given
        data = b'{"detail": "the error could not be described"}'
    return Response(data, status_code=status, media_type="application/json", headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """422s, HTTP errors and unexpected failures answered with bodies that always encode."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return safe_json(422, {"detail": [error_entry(e) for e in exc.errors()[:50]]})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail
        if isinstance(detail, list):
            detail = [error_entry(e) for e in detail[:50]]
        elif not isinstance(detail, dict):
            detail = printable(str(detail), 1000)
        return safe_json(exc.status_code, {"detail": detail}, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def failure(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
        return safe_json(500, {"detail": "internal error (logged by the server)"})


def finite(v: Any) -> Any:
    """JSON has no NaN: a rate with no trials is null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def utc(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def api_key_check(service: Service) -> Callable[..., None]:
    """The dependency of write and admin routes: 403 without a configured key, 401 when the
    X-API-Key header is missing or wrong (compared in constant time, as bytes). The guard
    (`recfb.serving.guard`) has already checked it before the body was read; this keeps the
    header in the OpenAPI description and the check where a route is mounted without it."""

    def require_key(x_api_key: Annotated[str | None, Header()] = None) -> None:
        if not service.api_key:
            raise HTTPException(403, "writes are disabled: the server has no API key configured")
        if not key_matches(x_api_key, service.api_key):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    return require_key
