"""What several routers share: JSON responses, 422s in FastAPI's shape, the API-key check."""

import hmac
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Header, HTTPException
from fastapi.responses import Response

from recfb.serving.service import Service


def json_response(data: Any, status: int = 200) -> Response:
    """The body serialised once by `json` (no response-model validation on the hot path)."""
    return Response(json.dumps(data).encode(), status_code=status, media_type="application/json")


def unprocessable(loc: list, msg: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, for checks pydantic cannot make."""
    return HTTPException(422, [{"loc": loc, "msg": msg, "type": "value_error"}])


def finite(v: Any) -> Any:
    """JSON has no NaN: a rate with no trials is null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def utc(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def api_key_check(service: Service) -> Callable[..., None]:
    """The dependency of write and admin routes: 403 without a configured key, 401 when the
    X-API-Key header is missing or wrong (compared in constant time)."""

    def require_key(x_api_key: Annotated[str | None, Header()] = None) -> None:
        if not service.api_key:
            raise HTTPException(403, "writes are disabled: the server has no API key configured")
        if x_api_key is None or not hmac.compare_digest(x_api_key, service.api_key):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    return require_key
