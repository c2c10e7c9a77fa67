"""The request path's small-array shortcuts give numpy's own answers (issue 18)."""

from __future__ import annotations

import numpy as np

from recfb.rank.features import sorted_unique
from recfb.rank.online import _among


def test_sorted_unique_is_np_unique():
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 300, 5000):
        values = rng.integers(-5, 400, n)
        got, want = sorted_unique(values), np.unique(values)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_excluded_rows_found_as_np_isin_finds_them():
    rng = np.random.default_rng(1)
    for _ in range(500):
        rows = rng.integers(0, 60, rng.integers(0, 40))
        excluded = set(rng.integers(0, 60, rng.integers(1, 12)).tolist())
        want = np.isin(rows, np.fromiter(excluded, np.int64))
        np.testing.assert_array_equal(_among(rows, excluded), want)
