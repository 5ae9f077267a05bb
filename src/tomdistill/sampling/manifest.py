"""`plan.json` and `manifest.json`: what a samples directory holds and whether it is complete.

- `plan.json` is written when a run starts and names everything that decides the records (model,
  adapter, role, mode, n, seed, sampler settings, prompt_version, scenarios; sampler=recorded: the
  source and a sha256 of its content). A rerun into the same directory must match it, so a resumed
  run never mixes records of two configurations.
- `manifest.json` is written once every shard of the plan exists, with `complete: true`; its
  absence means the run is unfinished (rerun the same command to resume).
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from .. import PROJECT_ROOT, __version__
from ..records import MANIFEST
from .settings import SamplerSettings, SamplingConfigError
from .shards import write_json_atomic
from .summary import ScenarioSummary

PLAN = "plan.json"
# settings that change no record (where and how fast it runs, and with which interpreter) stay out of the plan
_RUNTIME_ONLY = ("batch_size", "score_batch_size", "device", "device_map", "progress", "tensor_parallel_size",
                 "gpu_memory_utilization", "python")


def git_commit(root: Path = PROJECT_ROOT) -> dict:
    """The source revision, best effort (None outside a git checkout)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True).stdout
    try:
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain").strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def build_plan(settings: SamplerSettings, model: str, prompt_version: str, scenario_ids: list[str]) -> dict:
    record_settings = {k: v for k, v in settings.to_dict().items() if k not in _RUNTIME_ONLY}
    if record_settings.get("adapter"):
        record_settings["adapter"] = str(Path(record_settings["adapter"]).resolve())
    del record_settings["source"], record_settings["model_name"]  # the recorded backend's; `model` holds the name
    if settings.backend == "recorded":  # where the answers came from, and a hash: a changed recording is another plan
        from .recorded import provenance

        record_settings.update(provenance(settings.source))
    return {"model": model, "prompt_version": prompt_version, **record_settings, "scenarios": scenario_ids}


def check_or_write_plan(directory: Path, plan: dict) -> None:
    """Refuse to resume into a directory sampled with another configuration."""
    path = directory / PLAN
    if path.exists():
        previous = json.loads(path.read_text())
        differing = sorted(k for k in set(plan) | set(previous) if plan.get(k) != previous.get(k))
        if differing:
            details = "; ".join(f"{k}: {previous.get(k)!r} there, {plan.get(k)!r} now" for k in differing[:5])
            raise SamplingConfigError(
                f"output: {directory} already holds samples of another configuration ({details}); "
                "choose a new output directory, or rerun with the same settings to resume"
            )
        return
    write_json_atomic(path, plan)


def adapter_training(adapter: str | Path) -> dict | None:
    """The training record an adapter carries (`training` in its tomdistill_adapter.json), if any."""
    from ..model.loading import ADAPTER_META

    path = Path(adapter) / ADAPTER_META
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("training")


def recording_provenance(source: str) -> dict:
    """The recorded backend's source as the manifest names it: where, what kind, and its sha256."""
    from .recorded import canonical_source, source_kind, source_sha256

    return {"source": canonical_source(source), "kind": source_kind(source), "sha256": source_sha256(source)}


def build_manifest(*, config: dict, settings: SamplerSettings, model: str, prompt_version: str,
                   summaries: list[ScenarioSummary], shard_count: int, world_size: int,
                   written_by_rank: list[list[str]] | None) -> dict:
    return {
        "complete": True,
        "mode": settings.mode,
        "role": settings.role,
        "n": settings.samples_per_scenario,
        "seed": settings.seed,
        "backend": settings.backend,
        "model": model,
        "adapter": str(Path(settings.adapter).resolve()) if settings.adapter else None,
        # what the adapter was trained on (its tomdistill_adapter.json): evaluation splits in-sample by it
        "adapter_training": adapter_training(settings.adapter) if settings.adapter else None,
        "prompt_version": prompt_version,
        **({"recording": recording_provenance(settings.source)} if settings.backend == "recorded" else {}),
        "git": git_commit(),
        "tomdistill_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "records": sum(s.records for s in summaries),
        "unparsed": sum(s.unparsed for s in summaries),
        "counts": {s.id: s.records for s in summaries},
        "unparsed_by_scenario": {s.id: s.unparsed for s in summaries},
        "scenarios": [s.to_dict() for s in summaries],
        "shards": shard_count,
        "world_size": world_size,
        # which rank wrote which shards in the run that completed the directory (None: ranks not linked)
        "written_by_rank": written_by_rank,
        "config": config,
    }


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = directory / MANIFEST
    write_json_atomic(path, manifest)
    return path
