"""The oracle teacher that `train.py` trains on when `data.teacher` is null: `sample.py sampler=oracle
role=teacher` run in-process over the whole catalogue, once per configuration, into a cache. The training
recipe runs it before it builds the datamodule and hands the directories over as the datamodule's `teacher`
and `teacher_probs` (training.build_datamodule); the datamodule only reads them.

The records, shards, `plan.json` and `manifest.json` come from the sampling stage's own code (the
`OracleBackend`, `runner.sample_into`), so each cached directory is what
`sample.py sampler=oracle role=teacher seed=<seed> sampler.n=<n> [sampler.mode=score]` writes for the same
catalogue. `oracle` is the `data.oracle` config node, `{seed, sampler}` as sample.py reads them
(conf/data/default.yaml composes conf/sampler/oracle.yaml into it).

Each directory is sampled into a hidden staging directory and renamed into place once its manifest is
written, so the cache never holds a half-written one; processes that start together (the ranks of one run)
each sample their own and keep whichever was renamed first (the records are the same).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

from ..records import read_manifest
from ..scenarios import Catalogue, prompt_version
from .backends import OracleBackend
from .distributed import World
from .manifest import build_plan
from .runner import elicits_with_answer_prefix, sample_into
from .settings import SamplerSettings, SamplingConfigError, settings_from_config

CACHE_FOLDER = "oracle_teacher"


def oracle_settings(oracle: Mapping, mode: str, key: str = "data.oracle") -> SamplerSettings:
    """The settings `sample.py role=teacher seed=<oracle.seed> sampler.mode=<mode>` takes from `oracle.sampler`,
    validated as sample.py validates them; errors name the key under `key`."""
    if not oracle or "sampler" not in oracle:
        raise SamplingConfigError(f"{key}: needs `seed` and `sampler` (conf/data/default.yaml composes "
                                  "conf/sampler/oracle.yaml into it)")
    config = {"role": "teacher", "seed": oracle.get("seed"), "adapter": None,
              "sampler": {**oracle["sampler"], "mode": mode}}
    try:
        settings = settings_from_config(config)
    except SamplingConfigError as err:
        raise SamplingConfigError(f"{key}.{err}") from None
    if settings.backend != "oracle":
        raise SamplingConfigError(
            f"{key}.sampler.backend={settings.backend!r}: the in-process teacher is the oracle; sample a language "
            "model teacher with sample.py and train on it with data.teacher=DIR")
    return settings


def cache_name(catalogue: Catalogue, plan: dict) -> str:
    """Readable (mode, prompt_version, oracle, n, seed, the augment split) and complete: a digest of the plan,
    which holds everything that decides the records."""
    name = f"{plan['mode']}-{plan['prompt_version']}-{plan['model']}-n{plan['n']}-s{plan['seed']}"
    augment = catalogue.augment_fingerprint()
    if augment:  # the training-only augment split is not part of prompt_version: named here
        name += f"-aug{augment}"
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def is_complete(directory: Path) -> bool:
    return directory.is_dir() and read_manifest(directory).get("complete") is True


def oracle_teacher(catalogue: Catalogue, cache_dir: str | Path, oracle: Mapping,
                   modes: Iterable[str] = ("generate", "score")) -> dict[str, Path]:
    """A samples directory of the oracle teacher per mode, sampled once into `cache_dir` and reused."""
    scenarios = catalogue.scenarios()  # every split, the augment split too when there is one
    directories = {}
    for mode in modes:
        settings = oracle_settings(oracle, mode)
        backend = OracleBackend(settings)
        version = prompt_version(catalogue, None, elicits_with_answer_prefix(settings))
        plan = build_plan(settings, backend.name, version, [s.id for s in scenarios])
        target = Path(cache_dir) / CACHE_FOLDER / cache_name(catalogue, plan)
        if not is_complete(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
            try:
                # the sample.yaml keys this run was given; plan.json lists the catalogue's scenarios
                config = {"role": "teacher", "seed": settings.seed, "adapter": None, "output": str(target),
                          "sampler": {**oracle["sampler"], "mode": mode}}
                if sample_into(staging, settings, scenarios, version, backend.name, World(),
                               open_backend=lambda: backend, config=config) is None:
                    raise RuntimeError(f"oracle teacher: {staging} is incomplete after sampling every shard")
                try:
                    os.replace(staging, target)
                except OSError:
                    if not is_complete(target):  # not another process's finished copy: something else is there
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        directories[mode] = target
    return directories
