"""Per-tile maps: the TileMap contract, attribution on models with a known answer, orientation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mirror_model import TileMap


def _map(values, signed):
    return TileMap(name="m", values=values, label="M", description="d", signed=signed,
                   method="test", units="u")


def test_tilemap_is_frozen_float64_and_read_only():
    m = _map([1, 2, 3], signed=False)
    assert m.values.dtype == np.float64 and m.n_tiles == 3
    with pytest.raises(ValueError):
        m.values[0] = 5.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.name = "other"


def test_display_range_signed_is_symmetric_and_robust_to_one_outlier():
    v = np.linspace(-1.0, 1.0, 1001)
    v[0] = -1000.0  # one extreme tile must not squash the colour range
    lo, hi = _map(v, signed=True).display_range(99.0)
    assert lo == -hi and 0.97 < hi < 1.0
    lo, hi = _map(np.arange(101.0), signed=False).display_range(99.0)
    assert (lo, hi) == pytest.approx((1.0, 99.0))
    # constant and empty maps still give a range of positive width
    assert _map(np.zeros(5), signed=True).display_range() == (-1.0, 1.0)
    lo, hi = _map(np.full(4, 0.25), signed=False).display_range()
    assert lo == 0.25 and hi > lo
    assert _map(np.zeros(0), signed=False).display_range() == (0.0, 1.0)
