"""`join_columns`: a left join that adds columns without copying the frame's own."""

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from recfb.etl.frames import join_columns


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
