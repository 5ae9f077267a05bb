"""What a user can fix, as one error type, and the one way the entry points report it.

Every error a user can act on (a bad key, a file that is not what it should be, a run that cannot go
on) derives from `UserError` as well as from the built-in type it is; `run_app` prints its message as
one line, `<app>: error: <message>`, and exits with code 2, so a typo never ends in a traceback. It also
spares each app's process the interpreter's slow last collection at exit (`skip_the_final_collection_at_exit`).
"""
from __future__ import annotations

import atexit
import functools
import gc
import logging
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Input, configuration or run state the user can fix; the message names the file, key or value."""


def run_app(name: str, function: Callable[..., T], *args) -> T:
    """`function(*args)`; a `UserError` or a missing mandatory config value becomes one line on stderr and exit 2."""
    from omegaconf.errors import MissingMandatoryValue

    skip_the_final_collection_at_exit()
    try:
        return function(*args)
    except UserError as err:
        message = str(err)
    except MissingMandatoryValue as err:
        message = f"missing config value {err.full_key!r} (set it on the command line, e.g. {err.full_key}=...)"
    logging.getLogger(name).error("%s", message)  # the run's log file too
    print(f"{name}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


@functools.cache
def skip_the_final_collection_at_exit() -> None:
    """At exit the interpreter's last cyclic collection walks every object torch, Lightning and transformers made:
    2-3 s per process (each rank, each sweep trial, each test's subprocess; 0.3 s frozen). `gc.freeze` as the first
    atexit handler registered by the app runs after the later-registered ones (W&B, checkpoint writers); it changes
    nothing before exit, so a multirun's in-process jobs are still collected between jobs."""
    atexit.register(gc.freeze)
