"""Output paths from configs: never allowed to climb out of where they point with `..`, refused early where they
cannot be written."""
from __future__ import annotations

import contextlib
import os
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


def multirun_trial() -> int | None:
    """This job's number in a Hydra multirun (`-m`, a sweep), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return int(HydraConfig.get().job.num)


def run_output_dir(output: str | Path | None, key: str = "output") -> Path:
    """The output-directory rule of every app: `output=` when given, else the Hydra run directory; in a multirun
    `output=DIR` is `DIR/<job number>` (one directory for every job would be overwritten by each); never a path
    that climbs out with `..` (`safe_output_dir`)."""
    if output in (None, ""):
        output = hydra_run_dir()
        if output is None:
            raise UnsafePathError(f"{key}: not set, and there is no Hydra run directory to default to; pass {key}=DIR")
    elif multirun_trial() is not None:
        output = Path(str(output)) / str(multirun_trial())
    return safe_output_dir(output, key)


def register_resolvers() -> None:
    """`${if_null:a,b}`: a unless it is null (conf/base.yaml: the Hydra run directory is `output=` when given)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("if_null"):
        OmegaConf.register_new_resolver("if_null", lambda value, default: default if value in (None, "") else value)


def unwritable(path: str | Path) -> str | None:
    """Why a directory at `path` could not be created or written into, or None: its nearest existing ancestor (itself
    when it exists) must be a writable directory. A check before the fact; the write itself may still fail."""
    target = Path(os.path.abspath(Path(str(path)).expanduser()))
    existing = target
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return f"{existing} is not writable ({'read-only filesystem' if read_only else 'permission denied'})"


def output_override_error(value: str) -> str | None:
    """What is wrong with `output=value` given on the command line, or None (the directory could be made)."""
    try:
        safe_output_dir(value)
    except UnsafePathError as err:
        return str(err)
    why = unwritable(value)
    if why is None:
        # the check above trusts permissions, which root and special filesystems (/proc) overrule: make the missing
        # directories, then take them away again (a config error after this must leave nothing behind)
        target = Path(os.path.abspath(Path(str(value)).expanduser()))
        missing = [d for d in (target, *target.parents) if not d.exists()]
        try:
            target.mkdir(parents=True, exist_ok=True)
            return None
        except OSError as err:
            why = err.strerror or str(err)
        finally:
            for directory in missing:  # deepest first
                with contextlib.suppress(OSError):
                    directory.rmdir()
    action = "cannot write into it" if Path(str(value)).expanduser().is_dir() else "cannot create it"
    return f"output={value}: {action}: {why}"


def refuse_unsafe_output_override(argv: list[str], app: str | None = None) -> None:
    """`output=...` on the command line with `..`, or where no directory can be made, is refused with one line and exit
    code 2 before Hydra creates its run directory there (conf/base.yaml points hydra.run.dir at `output`; Hydra's own
    error would be a traceback); `run_output_dir()` checks the composed config again."""
    import sys

    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "output" and value not in ("", "null"):
            message = output_override_error(value)
            if message:
                print(f"{app + ': ' if app else ''}error: {message}", file=sys.stderr, flush=True)
                sys.exit(2)
