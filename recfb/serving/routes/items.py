"""Per-item answers: similar items (vector search from the item's own vector) and the item's
online rates (naive and delay-corrected CVR, refund rate, NetCVR)."""

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import Response

from recfb.serving.retrieval import ServingBundle, Timings
from recfb.serving.routes.common import finite, json_response
from recfb.serving.schemas import ItemRates, SimilarItems
from recfb.serving.service import Service

ItemId = Annotated[str, PathParam(min_length=1, max_length=256)]


def router(service: Service) -> APIRouter:
    cfg = service.cfg
    api = APIRouter()

    @api.get("/v1/items/{item_id}/similar", response_model=SimilarItems, tags=["recommendations"])
    async def similar(
        item_id: ItemId, k: Annotated[int | None, Query(ge=1, le=cfg.max_k)] = None
    ) -> Response:
        """Items whose vectors score highest against this item's vector (itself excluded)."""
        served = service.bundle()
        row = item_row(served, item_id)
        rows, scores = served.rank(
            served.bundle.item_vectors[row], k or cfg.default_k, {row}, None, Timings()
        )
        items = [
            {"item_id": served.item_ids[r], "score": float(s)}
            for r, s in zip(rows, scores, strict=True)
        ]
        return json_response({"item_id": item_id, "items": items, "bundle_version": served.version})

    @api.get("/v1/items/{item_id}/rates", response_model=ItemRates, tags=["rates"])
    def item_rates(item_id: ItemId) -> Response:
        """Naive and delay-corrected CVR, refund rate and NetCVR of an item over recent
        traffic, with their sample sizes (404 when the bundle has no delay models)."""
        served = service.bundle()
        row = item_row(served, item_id)
        table = served.rates.current(service.log) if served.rates is not None else None
        if table is None:
            raise HTTPException(
                404, f"bundle {served.version} has no delay models (no conversion in its log)"
            )
        return json_response(rates_body(service, served, item_id, row, table))

    return api


def item_row(served: ServingBundle, item_id: str) -> int:
    """The item's row in the bundle; 404 naming the bundle when it is not there."""
    row = served.item_row.get(item_id)
    if row is None:
        raise HTTPException(404, f"item_id {item_id!r} is not in bundle {served.version}")
    return row


def rates_body(service: Service, served: ServingBundle, item_id: str, row: int, table) -> dict:
    """The ItemRates body: the table's row, its windows and the conversion delay model."""
    rec = table.frame.row(row, named=True)
    fits = served.rates.fits
    conv = (
        fits.conversion.for_segment(served.rates.segment[row])
        if served.rates.segment is not None
        else fits.conversion.overall
    )
    rates_cfg = service.cfg.rates
    return {
        "item_id": item_id,
        "as_of": datetime.fromtimestamp(table.as_of_ms / 1000, UTC).isoformat(),
        "windows_days": {
            "clicks": rates_cfg.click_window_days,
            "purchases": rates_cfg.purchase_window_days,
        },
        **{k: finite(v) for k, v in rec.items() if k != "item_idx"},
        "conversion_delay": {"family": conv.family, "median_hours": conv.median_s() / 3600},
        "bundle_version": served.version,
    }
