"""Weights & Biases set-up that never hangs: offline automatically when the server is unreachable."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_announced = False


def wandb_reachable(timeout: float = 2.0) -> bool:
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    parsed = urlparse(url)
    host, port = parsed.hostname or "api.wandb.ai", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str | None = "auto") -> str:
    """`auto`: WANDB_MODE if set, else online when the server answers within 2 s, else offline.

    Sets WANDB_MODE so every wandb call in this process (and its children) agrees, and says once
    when it falls back to offline.
    """
    global _announced
    if mode in (None, "auto"):
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_reachable() else "offline")
        if mode == "offline" and not _announced and "WANDB_MODE" not in os.environ:
            print("W&B: no network, logging offline (upload later with `wandb sync <run dir>`).", flush=True)
            _announced = True
    if mode == "online" and not os.environ.get("WANDB_API_KEY") and not _has_netrc_login():
        if not _announced:
            print("W&B: no API key found, logging offline (upload later with `wandb sync <run dir>`).", flush=True)
            _announced = True
        mode = "offline"
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    return mode


def _has_netrc_login() -> bool:
    netrc = os.path.expanduser("~/.netrc")
    return os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read()


def wandb_logger(save_dir: str, project: str = "tomdistill", entity: str | None = None, group: str | None = None,
                 tags=(), mode: str | None = "auto", job_type: str = "train", name: str | None = None):
    """Lightning's `WandbLogger` in a mode that never hangs (`resolve_wandb_mode`); the run is named after its
    output directory unless `name` is given (conf/logger/wandb.yaml)."""
    from pathlib import Path

    from pytorch_lightning.loggers import WandbLogger

    return WandbLogger(project=project, entity=entity, group=group, tags=list(tags or []), save_dir=str(save_dir),
                       name=name or Path(save_dir).name, mode=resolve_wandb_mode(mode), job_type=job_type)
