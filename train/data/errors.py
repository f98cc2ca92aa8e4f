"""The one error type of the data pipeline."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad or missing training data; the message names the file, key or size at fault."""
