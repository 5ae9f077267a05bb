"""Output paths from configs: never allowed to climb out of where they point with `..`."""
from __future__ import annotations

from pathlib import Path


class UnsafePathError(ValueError):
    """A configured path that would write outside its directory."""


def safe_output_dir(path: str | Path, key: str = "output") -> Path:
    """`path` as a directory to write into; refuses `..` components (a config cannot escape the
    run directory by climbing out of it) and an existing non-directory."""
    raw = Path(str(path)).expanduser()
    if ".." in raw.parts:
        raise UnsafePathError(f"config key {key!r}: path {str(path)!r} contains '..'; give a path without it")
    if raw.exists() and not raw.is_dir():
        raise UnsafePathError(f"config key {key!r}: {raw} exists and is not a directory")
    return raw.resolve()
