import numpy as np
import pytest

from gum_ray import bands
from gum_ray.errors import InputError


def _export(h=4, w=5, n=11):
    x = np.zeros((n, h, w), np.float32)
    x[0:4] = 0.2
    x[4:8] = -10.0
    x[8] = 100.0
    x[9] = 45.0
    x[10] = 180.0
    return x


def test_preprocess_follows_the_notebook():
    x = _export()
    x[0, 0, 0] = 1.7           # S2 above 1 -> clipped to 1
    x[1, 0, 0] = -0.3          # below 0 -> 0
    x[4, 0, 0] = -40.0         # S1 below -25 dB -> 0.0
    x[5, 0, 0] = 3.0           # above 0 dB -> 1.0
    x[6, 0, 0] = np.nan        # missing S1 -> 0 dB -> 1.0 (the notebook's NaN -> 0 before the S1 step)
    x[7, 0, 0] = np.inf
    x[9, 0, 0] = 120.0         # slope / 90 clipped
    x[10, 0, 0] = np.nan       # aspect NaN -> 0
    y = bands.preprocess(x)
    assert y.shape == (10, 4, 5) and y.dtype == np.float32
    assert y[0, 0, 0] == 1.0 and y[1, 0, 0] == 0.0
    assert y[4, 0, 0] == 0.0 and y[5, 0, 0] == 1.0
    assert y[6, 0, 0] == 1.0 and y[7, 0, 0] == 1.0
    assert y[8, 0, 0] == 1.0 and y[9, 0, 0] == 0.0
    np.testing.assert_allclose(y[4, 1, 1], (-10 + 25) / 25, rtol=1e-6)
    np.testing.assert_allclose(y[8, 1, 1], 0.5, rtol=1e-6)
    np.testing.assert_allclose(y[9, 1, 1], 0.5, rtol=1e-6)
    np.testing.assert_allclose(y[0:4, 1, 1], 0.2, rtol=1e-6)


def test_products_variant():
    x = _export(n=14)
    x[11:14] = 1.0
    y = bands.preprocess(x)
    assert y.shape[0] == 13 and (y[10:13] == 1.0).all()
    y10 = bands.preprocess(x, with_products=False)
    assert y10.shape[0] == 10
    with pytest.raises(InputError, match="14-band"):
        bands.preprocess(_export(), with_products=True)


def test_validity_is_sentinel2_presence():
    x = _export()
    x[2, 1, 2] = np.nan
    x[5, 3, 3] = np.nan  # missing S1 does not make a pixel invalid
    v = bands.validity_mask(x)
    assert not v[1, 2] and v[3, 3] and v.sum() == 19


@pytest.mark.parametrize("n", [3, 10, 12, 13, 15])
def test_wrong_band_count_is_a_clear_error(n):
    with pytest.raises(InputError, match="11 .* or 14"):
        bands.preprocess(np.zeros((n, 2, 2), np.float32))


def test_compact_encoding_round_trip():
    rng = np.random.default_rng(1)
    x = _export(8, 9, 14)
    x[0:4] = np.round(rng.uniform(0, 1, (4, 8, 9)), 4)
    x[4:8] = np.round(rng.uniform(-30, 5, (4, 8, 9)), 2)
    x[9] = np.round(rng.uniform(0, 90, (8, 9)), 2)
    x[10] = np.round(rng.uniform(0, 360, (8, 9)), 2)  # aspect up to 360 deg fits the int16 encoding
    x[10, 0, 0], x[10, 0, 1] = 0.0, 359.99
    x[11:14] = rng.integers(0, 2, (3, 8, 9))
    x[4:8, 2, 3] = np.nan
    x[0:4, 5, 5] = np.nan
    parts = bands.encode_compact(x)
    assert parts["s2"].dtype == np.uint16 and parts["s1"].dtype == np.int16
    y = bands.decode_compact(parts)
    np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
    np.testing.assert_allclose(np.nan_to_num(y), np.nan_to_num(x), atol=1e-4)
