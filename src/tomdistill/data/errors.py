"""The data layer's error (a module of its own so the datamodule and the target kinds share it)."""
from __future__ import annotations

from ..records import SamplesError


class DataError(SamplesError):
    """Teacher data that cannot be trained on; raised before any model loads."""
