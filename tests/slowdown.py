"""Time-outs that hold on a loaded host.

A time-out here only turns a hang into a failure; it must never fail a test that is merely slow
because other jobs share the machine. Tests that run for minutes carry their own generous
`pytest.mark.timeout`, and `SPARSETRON_TEST_TIMEOUT_SCALE` (default 1) multiplies every test's
time-out and every spawn's (tests/distributed/harness.py) on a host known to be slower still.
"""

import os

SCALE_VAR = "SPARSETRON_TEST_TIMEOUT_SCALE"


def timeout_scale() -> float:
    raw = os.environ.get(SCALE_VAR, "1")
    try:
        scale = float(raw)
    except ValueError:
        scale = 0.0
    if not scale > 0:
        raise ValueError(f"{SCALE_VAR} must be a number > 0, got {raw!r}")
    return scale


def scaled(seconds: float) -> float:
    """`seconds` times this host's time-out scale."""
    return seconds * timeout_scale()
