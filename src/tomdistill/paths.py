"""Output paths from configs: never allowed to climb out of where they point with `..`."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError


class UnsafePathError(ValueError, UserError):
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


def hydra_run_dir() -> Path | None:
    """The Hydra run directory of this app, or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def run_output_dir(output: str | Path | None, key: str = "output") -> Path:
    """The output-directory rule of every app: `output=` when given, else the Hydra run directory; never a path
    that climbs out with `..` (`safe_output_dir`)."""
    if output in (None, ""):
        output = hydra_run_dir()
        if output is None:
            raise UnsafePathError(f"{key}: not set, and there is no Hydra run directory to default to; pass {key}=DIR")
    return safe_output_dir(output, key)


def register_resolvers() -> None:
    """`${if_null:a,b}`: a unless it is null (conf/base.yaml: the Hydra run directory is `output=` when given)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("if_null"):
        OmegaConf.register_new_resolver("if_null", lambda value, default: default if value in (None, "") else value)


def refuse_unsafe_output_override(argv: list[str]) -> None:
    """`output=...` on the command line with `..` is refused before Hydra creates its run directory there
    (conf/base.yaml points hydra.run.dir at `output`); `run_output_dir()` checks the composed config again."""
    import sys

    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "output" and value not in ("", "null"):
            try:
                safe_output_dir(value)
            except UnsafePathError as err:
                print(f"error: {err}", file=sys.stderr, flush=True)
                sys.exit(2)
