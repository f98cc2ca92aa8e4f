"""SPARSETRON_TEST_TIMEOUT_SCALE multiplies time-outs; a value that is not a positive number is named."""

import pytest
from slowdown import SCALE_VAR, scaled, timeout_scale


def test_the_scale_multiplies_and_defaults_to_one(monkeypatch):
    monkeypatch.delenv(SCALE_VAR, raising=False)
    assert timeout_scale() == 1 and scaled(600) == 600
    monkeypatch.setenv(SCALE_VAR, "2.5")
    assert scaled(600) == 1500


@pytest.mark.parametrize("raw", ["0", "-1", "fast", "nan"])
def test_a_bad_scale_is_refused_by_name(monkeypatch, raw):
    monkeypatch.setenv(SCALE_VAR, raw)
    with pytest.raises(ValueError, match=f"{SCALE_VAR} must be a number > 0, got '{raw}'"):
        timeout_scale()


def test_this_test_runs_under_the_scaled_default(request):
    """The conftest hook put the scaled time-out on every test (a marker only when the scale is not 1)."""
    marker = request.node.get_closest_marker("timeout")
    default = float(request.config.getini("timeout"))
    assert (marker.args[0] if marker else default) == scaled(default)
