"""ETL frame helpers: `join_columns` (a left join that adds columns without copying the
frame's own), `filter_consuming` (a filter that releases each column as it goes) and the
sort-based first-occurrence check behind de-duplication."""

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from recfb.etl.frames import filter_consuming, join_columns


def test_adds_the_right_columns_in_the_frames_row_order():
    frame = pl.DataFrame({"k": [3, 1, 2, 1, 9], "x": ["a", "b", "c", "d", "e"]})
    right = pl.DataFrame({"k": [1, 2, 3], "v": [10, 20, 30]})
    got = join_columns(frame, right, "k")
    expected = pl.DataFrame(
        {"k": [3, 1, 2, 1, 9], "x": ["a", "b", "c", "d", "e"], "v": [30, 10, 20, 10, None]}
    )
    assert_frame_equal(got, expected)


def test_joins_on_several_keys():
    frame = pl.DataFrame({"a": [1, 1, 2], "b": [1, 2, 1]})
    right = pl.DataFrame({"a": [1, 2], "b": [2, 1], "v": ["x", "y"]})
    assert join_columns(frame, right, ["a", "b"])["v"].to_list() == [None, "x", "y"]


def test_repeated_right_keys_are_refused():
    frame = pl.DataFrame({"k": [1, 2]})
    right = pl.DataFrame({"k": [1, 1], "v": [1, 2]})
    with pytest.raises(ValueError, match="repeat"):
        join_columns(frame, right, "k")


@pytest.mark.parametrize("ids", ["int", "text"])
def test_first_occurrence_agrees_with_polars_is_first_distinct(ids: str):
    from recfb.etl.pipeline import _first_occurrence

    rng = np.random.default_rng(7)
    n = 5_000
    frame = pl.DataFrame(
        {
            "event_id": rng.integers(0, 3_000, n),
            "user_id": rng.integers(0, 20, n),
            "item_id": rng.integers(0, 20, n),
            "ts": rng.integers(0, 5, n),
        }
    )
    if ids == "text":
        frame = frame.with_columns(pl.col("event_id", "user_id").cast(pl.String))
    for keys in (["event_id"], ["user_id", "item_id", "ts"]):
        expected = frame.select(pl.struct(keys).is_first_distinct()).to_series()
        got = _first_occurrence(frame, keys)
        assert got.sum() < n  # the data has repeats, so the check is not trivial
        assert got.to_list() == expected.to_list()


def test_filter_consuming_keeps_the_masked_rows_and_empties_the_frame():
    frame = pl.DataFrame({"a": [1, 2, 3, 4], "b": ["w", None, "y", "z"], "c": [0.5, 1.5, None, 2]})
    mask = pl.Series([True, False, True, True])
    expected = pl.DataFrame({"a": [1, 3, 4], "b": ["w", "y", "z"], "c": [0.5, None, 2.0]})
    got = filter_consuming(frame, mask)
    assert_frame_equal(got, expected)
    assert frame.width == 0  # the input's columns were released as they were filtered


@pytest.mark.parametrize("ids", ["int", "negative", "text"])
def test_first_occurrence_sorted_in_parts_agrees_with_polars(ids: str, monkeypatch):
    """With parts of 700 rows (key modulo 8 picks the part), as at tens of millions."""
    import recfb.etl.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_DEDUPE_ROWS", 700)
    rng = np.random.default_rng(11)
    n = 5_000
    frame = pl.DataFrame(
        {
            "event_id": rng.integers(-1_500, 1_500, n),
            "user_id": rng.integers(0, 20, n),
            "ts": rng.integers(0, 5, n),
        }
    )
    if ids == "int":
        frame = frame.with_columns(pl.col("event_id").abs())
    if ids == "text":
        frame = frame.with_columns(pl.col("event_id").cast(pl.String))
    for keys in (["event_id"], ["user_id", "ts"], ["event_id", "ts"]):
        expected = frame.select(pl.struct(keys).is_first_distinct()).to_series()
        got = pipeline._first_occurrence(frame, keys)
        assert got.sum() < n
        assert got.to_list() == expected.to_list()


def test_join_columns_in_slices_keeps_the_row_order(monkeypatch):
    import recfb.etl.frames as frames

    monkeypatch.setattr(frames, "_JOIN_ROWS", 3)
    frame = pl.DataFrame({"k": [3, 1, 2, 1, 9, 2, 3], "x": list("abcdefg")})
    right = pl.DataFrame({"k": [1, 2, 3], "v": [10, 20, 30]})
    got = join_columns(frame, right, "k")
    assert got["v"].to_list() == [30, 10, 20, 10, None, 20, 30]
    assert got["x"].to_list() == list("abcdefg")
    with pytest.raises(ValueError, match="repeat"):
        join_columns(frame, pl.DataFrame({"k": [9, 9], "v": [1, 2]}), "k")
