"""`recfb etl`: raw events -> validated, canonical, ordinal, split training data.

Stages: read -> validate (bad rows to quarantine) -> de-duplicate -> canonicalise signals ->
drop noise by dwell -> optional filters -> vocabularies -> link cancellations and delays ->
split -> fold pairs per split -> write everything atomically with `stats.json`.

The scan, validation and quarantine run as Polars lazy queries sunk to parquet by the
streaming engine; the later stages work on the validated columns only (integers, small
strings), which is what bounds memory at tens of millions of events.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from recfb.errors import InputError
from recfb.etl.aggregate import PAIR, aggregate_pairs
from recfb.etl.config import EtlConfig
from recfb.etl.filters import apply_filters
from recfb.etl.link import conversion_delays, link_cancellations
from recfb.etl.readers import PROVENANCE, read_events
from recfb.etl.signals import SignalMap, load_signal_map
from recfb.etl.split import (
    SPLIT_DTYPE,
    SPLITS,
    Windows,
    assign_temporal,
    leave_last_deepest,
    leave_last_out,
    temporal_windows,
)
from recfb.etl.validate import REASON_EXPECTED, bad_rows, good_rows, validate
from recfb.etl.vocab import VOCAB_FILES, attach_index, extend_vocab, load_vocab
from recfb.io import atomic_dir, write_json
from recfb.progress import StageTimer

_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


@dataclass
class EtlResult:
    out: Path
    stats: dict[str, Any]


def _quantiles(values: pl.Series) -> dict[str, float | int | None]:
    values = values.drop_nulls()
    out: dict[str, float | int | None] = {"count": values.len()}
    for q in _QUANTILES:
        out[f"p{int(q * 100)}"] = float(values.quantile(q)) if values.len() else None
    return out


def _ms_text(ms: int) -> str:
    return str(pl.Series([ms], dtype=pl.Int64).cast(pl.Datetime("ms"))[0])


def _level_names(smap: SignalMap) -> dict[int, str]:
    return {-1: "negative", 0: "none"} | {i + 1: lv.name for i, lv in enumerate(smap.levels)}


def _counts(df: pl.DataFrame, column: str) -> dict[str, int]:
    if df.height == 0:
        return {}
    grouped = df.group_by(column).len().sort(column)
    return {str(k): int(v) for k, v in grouped.iter_rows()}


def _stage_validation(
    cfg: EtlConfig, smap: SignalMap, stage_dir: Path
) -> tuple[list[str], list[Path]]:
    """Validate and sink good rows and quarantine to parquet in one streaming pass."""
    raw, files = read_events(cfg.input)
    validated, extras = validate(raw, cfg.input, list(smap.signals))
    if smap.unknown_events == "error":
        unknown = (
            validated.filter(pl.col("reason") == "unknown_event")
            .select("source_file", "source_row", "event")
            .head(1)
            .collect()
        )
        if unknown.height:
            f, r, e = unknown.row(0)
            raise InputError(
                f"unknown event '{e}'; expected one of {sorted(smap.signals)} "
                "(or set unknown_events: quarantine in the signal map)",
                file=f,
                row=r,
                field="event",
            )
    try:
        pl.collect_all(
            [
                good_rows(validated, extras).sink_parquet(stage_dir / "good.parquet", lazy=True),
                bad_rows(validated, extras).sink_parquet(
                    stage_dir / "quarantine.parquet", lazy=True
                ),
            ],
            engine="streaming",
        )
    except pl.exceptions.PolarsError as exc:
        names = ", ".join(str(f) for f in files[:5])
        raise InputError(f"reading failed: {exc}", file=names) from exc
    return extras, files


def _dedupe(events: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """Drop repeated event_ids, then repeated (user, item, event, ts); the first copy wins.

    Also numbers the surviving rows (`row`) in input order: later joins may reorder rows, and
    `row` keeps every tie-break (equal timestamps) deterministic.
    """
    n0 = events.height
    events = (
        events.lazy()
        .filter(pl.col("event_id").is_null() | pl.col("event_id").is_first_distinct())
        .collect(engine="streaming")
    )
    n1 = events.height
    events = (
        events.lazy()
        .filter(pl.struct("user_id", "item_id", "event", "ts").is_first_distinct())
        .with_row_index("row")
        .collect(engine="streaming")
    )
    return events, {"same_event_id": n0 - n1, "same_user_item_event_ts": n1 - events.height}


def _filtered_frame(reason: str, rows: pl.DataFrame) -> pl.DataFrame:
    return rows.select(
        pl.col("source_file").cast(pl.String),
        "source_row",
        pl.lit(reason).alias("reason"),
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("event").cast(pl.String),
        pl.col("ts").cast(pl.Datetime("ms")),
        "value",
        "event_id",
        "order_id",
    )


def run_etl(cfg: EtlConfig, quiet: bool = False) -> EtlResult:
    """Run the whole ETL; returns the output directory and the statistics written there."""
    smap = load_signal_map(cfg.signals)
    timer = StageTimer(quiet)
    out = Path(cfg.out)
    vocab_dir = Path(cfg.vocab_from) if cfg.vocab_from else out
    users_vocab, items_vocab = load_vocab(vocab_dir, "user"), load_vocab(vocab_dir, "item")

    with atomic_dir(out) as tmp:
        stage = tmp / "_stage"
        stage.mkdir()
        with timer.stage("read + validate"):
            extras, files = _stage_validation(cfg, smap, stage)
            quarantine = pl.read_parquet(stage / "quarantine.parquet")
            events = pl.read_parquet(stage / "good.parquet")
        rows_in = events.height + quarantine.height

        with timer.stage("deduplicate"):
            events, duplicates = _dedupe(events)

        with timer.stage("canonicalise"):
            # every event is known after validation: an Enum holds it in one byte, not a string
            event_type = pl.Enum(list(smap.signals))
            table = (
                pl.DataFrame(smap.signal_table())
                .drop("cancels", "is_exposure")
                .with_columns(
                    pl.col("event").cast(event_type),
                    pl.col("code").cast(pl.UInt8),
                    pl.col("level").cast(pl.Int8),
                    pl.col("fallback_level").cast(pl.Int8),
                    pl.col("min_dwell_s").cast(pl.Float64),
                )
            )
            events = events.with_columns(pl.col("event").cast(event_type)).join(
                table, on="event", how="left"
            )
            noise = (
                pl.col("min_dwell_s").is_not_null()
                & pl.col("value").is_not_null()
                & (pl.col("value") < pl.col("min_dwell_s"))
            )
            removed = [("noise_dwell", events.filter(noise))]
            events = events.filter(~noise).drop("min_dwell_s")
            events, more = apply_filters(events, cfg.filters)
            removed += more
            filtered = pl.concat(
                [_filtered_frame(r, rows) for r, rows in removed], how="diagonal_relaxed"
            )

        if events.height == 0:
            raise InputError(
                "no usable events left after validation and filters; see quarantine reasons "
                f"{_counts(quarantine, 'reason')}",
                file=", ".join(str(f) for f in files[:5]),
            )

        with timer.stage("vocabularies"):
            users_vocab = extend_vocab(users_vocab, events, "user")
            items_vocab = extend_vocab(items_vocab, events, "item")
            events = attach_index(events, users_vocab, "user")
            events = attach_index(events, items_vocab, "item")
            # from here on rows are addressed by index; provenance only served the reports
            events = events.drop("user_id", "item_id", *PROVENANCE)

        with timer.stage("link cancellations + delays"):
            cancel_map = {n: s.cancels for n, s in smap.signals.items() if s.cancels}
            events = link_cancellations(events, cancel_map)
            events = conversion_delays(events)

        with timer.stage("split + fold pairs"):
            pair_tables, windows, events = _split_and_fold(events, smap, cfg, extras)

        with timer.stage("write"):
            for name, table_ in pair_tables.items():
                table_.write_parquet(tmp / f"{name}.parquet")
            seq = (
                events.lazy()
                .sort(["user_idx", "ts", "row"])
                .select(
                    "user_idx",
                    "item_idx",
                    "event",
                    pl.col("level").cast(pl.Int8),
                    pl.col("ts").cast(pl.Datetime("ms")),
                    "value",
                    "split",
                    pl.col("cancelled_at").cast(pl.Datetime("ms")),
                    (pl.col("clock_delay_ms") / 1000).alias("click_to_purchase_s"),
                    "event_id",
                    "order_id",
                    *extras,
                )
            )
            seq.sink_parquet(tmp / "events.parquet", engine="streaming")
            users_vocab.write_parquet(tmp / VOCAB_FILES["user"])
            items_vocab.write_parquet(tmp / VOCAB_FILES["item"])
            quarantine.write_parquet(tmp / "quarantine.parquet")
            filtered.write_parquet(tmp / "filtered.parquet")
            stats = _stats(
                cfg,
                smap,
                files,
                rows_in,
                quarantine,
                duplicates,
                filtered,
                events,
                pair_tables,
                windows,
                users_vocab,
                items_vocab,
            )
            stats["timings_s"] = timer.seconds
            write_json(tmp / "stats.json", stats)
            (stage / "good.parquet").unlink()
            (stage / "quarantine.parquet").unlink()
            stage.rmdir()
    return EtlResult(out=out, stats=stats)


def _pair_key() -> pl.Expr:
    """(user_idx, item_idx) packed into one UInt64: cheap set membership."""
    return (pl.col("user_idx").cast(pl.UInt64) * (1 << 32) + pl.col("item_idx")).alias("key")


def _split_and_fold(
    events: pl.DataFrame, smap: SignalMap, cfg: EtlConfig, features: list[str]
) -> tuple[dict[str, pl.DataFrame], Windows | None, pl.DataFrame]:
    """Pair tables per split, the temporal windows (if any), and events with `split`."""
    method = cfg.split.method
    if method == "temporal":
        windows = temporal_windows(events["ts"], cfg.split)
        events = assign_temporal(events, windows)
        tables: dict[str, pl.DataFrame] = {}
        earlier: list[pl.Series] = []  # pair keys of the earlier windows
        for split in SPLITS:
            _, cutoff = windows.bounds(split)
            part = events.lazy().filter(pl.col("split") == split)
            pairs = aggregate_pairs(part, smap, cutoff, features).collect(engine="streaming")
            keys = pairs.select(_pair_key()).to_series()
            seen = pl.repeat(False, pairs.height, eager=True)
            for previous in earlier:
                seen = seen | keys.is_in(previous.implode())
            earlier.append(keys)
            tables[split] = pairs.with_columns(seen.alias("seen_before")).sort(PAIR)
        return tables, windows, events
    end = int(events["ts"].max()) + 1
    pairs = aggregate_pairs(events, smap, end, features).collect(engine="streaming")
    pairs = pairs.with_columns(pl.lit(False).alias("seen_before"))
    if method == "none":
        empty = pairs.clear()
        tables = {"train": pairs.sort(PAIR), "valid": empty, "test": empty}
        return tables, None, events.with_columns(pl.lit("train").alias("split"))
    if cfg.split.leave_out == "deepest":
        return _leave_last_deepest(events, pairs, smap, end, features)
    assigned = leave_last_out(pairs)
    events = events.join(assigned.select(*PAIR, "split"), on=PAIR, how="left")
    tables = {s: assigned.filter(pl.col("split") == s).drop("split").sort(PAIR) for s in SPLITS}
    return tables, None, events


def _leave_last_deepest(
    events: pl.DataFrame, pairs: pl.DataFrame, smap: SignalMap, end: int, features: list[str]
) -> tuple[dict[str, pl.DataFrame], None, pl.DataFrame]:
    """Each user's last buy tests, the one before validates: those pairs' deepest-level events
    move to the split, everything else (their views and carts included) folds into train."""
    bought = (
        events.filter(pl.col("level") == smap.n_levels)
        .group_by(PAIR)
        .agg(pl.col("ts").max().alias("_bought"))
    )
    by_buy = pairs.join(bought, on=PAIR, how="left").with_columns(
        pl.coalesce("_bought", "last_ts").alias("last_ts")
    )
    held = leave_last_deepest(by_buy, smap.n_levels)
    events = events.join(held, on=PAIR, how="left").with_columns(
        pl.when(pl.col("split").is_not_null() & (pl.col("level") == smap.n_levels))
        .then(pl.col("split"))
        .otherwise(pl.lit("train"))
        .cast(SPLIT_DTYPE)
        .alias("split")
    )
    tables: dict[str, pl.DataFrame] = {}
    train_keys = None
    for split in SPLITS:
        part = events.lazy().filter(pl.col("split") == split)
        folded = aggregate_pairs(part, smap, end, features).collect(engine="streaming")
        keys = folded.select(_pair_key()).to_series()
        if train_keys is None:
            train_keys, seen = keys, pl.repeat(False, folded.height, eager=True)
        else:  # the held-out buy was viewed or carted before: repeat intent
            seen = keys.is_in(train_keys.implode())
        tables[split] = folded.with_columns(seen.alias("seen_before")).sort(PAIR)
    return tables, None, events


def _stats(
    cfg: EtlConfig,
    smap: SignalMap,
    files: list[Path],
    rows_in: int,
    quarantine: pl.DataFrame,
    duplicates: dict[str, int],
    filtered: pl.DataFrame,
    events: pl.DataFrame,
    pair_tables: dict[str, pl.DataFrame],
    windows: Windows | None,
    users_vocab: pl.DataFrame,
    items_vocab: pl.DataFrame,
) -> dict[str, Any]:
    """Everything a reviewer checks first: reconciliation, volumes, levels, delays."""
    quarantined = _counts(quarantine, "reason")
    filtered_counts = _counts(filtered, "reason")
    used = events.height
    accounted = (
        used + sum(quarantined.values()) + sum(duplicates.values()) + sum(filtered_counts.values())
    )
    names = _level_names(smap)
    per_split = {}
    for split, pairs in pair_tables.items():
        split_events = events.filter(pl.col("split") == split)
        labels = _counts(pairs, "label")
        per_split[split] = {
            "events": split_events.height,
            "pairs": pairs.height,
            "users": pairs["user_idx"].n_unique(),
            "items": pairs["item_idx"].n_unique(),
            "pairs_per_label": {names[int(k)]: v for k, v in labels.items()},
            "matured_share": float(pairs["matured"].mean()) if pairs.height else None,
            "seen_before_share": float(pairs["seen_before"].mean()) if pairs.height else None,
        }
    refunds = events.filter(pl.col("is_refund"))
    linked = events.filter(pl.col("is_cancel"))
    stats: dict[str, Any] = {
        "signal_map": smap.name,
        # the whole resolved map, so later stages (the serving fold-in) read online events
        # with the meaning the training data was built with
        "signal_map_spec": smap.model_dump(mode="json"),
        "inputs": [str(f) for f in files],
        "reconciliation": {
            "rows_in": rows_in,
            "rows_used": used,
            "quarantined": quarantined,
            "duplicates_removed": duplicates,
            "filtered": filtered_counts,
            "balanced": accounted == rows_in,
        },
        "quarantine_expected": {r: REASON_EXPECTED[r] for r in quarantined},
        "time_range": {"first": _ms_text(events["ts"].min()), "last": _ms_text(events["ts"].max())},
        "split": {"method": cfg.split.method},
        "events_per_signal": _counts(events, "event"),
        "splits": per_split,
        "cancellations": {
            "linked_by": _counts(linked.filter(pl.col("link").is_not_null()), "link"),
            "unlinked": int(linked["link"].is_null().sum()),
        },
        "delays_s": {
            "click_to_purchase": _quantiles(
                events.filter(pl.col("is_purchase"))["clock_delay_ms"] / 1000
            ),
            "purchase_to_refund": _quantiles(
                (refunds["ts"] - refunds["linked_ts"]).drop_nulls() / 1000
            ),
        },
        "vocabulary": {
            "users": users_vocab.height,
            "items": items_vocab.height,
        },
        "levels": {str(k): v for k, v in names.items()},
    }
    if windows is not None:
        stats["split"] |= {
            "valid_start": _ms_text(windows.valid_ms),
            "test_start": _ms_text(windows.test_ms),
            "end": _ms_text(windows.end),
        }
    return stats
