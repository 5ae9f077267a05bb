"""The one-command study: teacher samples → base student → train → tuned student → evaluate.

    python -m tomdistill.pipeline +experiment=demo

Each stage runs the project's own entry point (sample.py, train.py, evaluate.py) in a child
process, with the pipeline's command-line overrides (e.g. `+experiment=demo seed=1`) followed by
the stage's own overrides from `pipeline.*` in the config. A stage whose outputs are complete is
skipped, so an interrupted study resumes at the stage it stopped in (and sampling and training
resume inside the stage). Several training variants (e.g. `sft`, `soft`, `sft_soft`) can share
the same teacher and base samples; the study ends with one table comparing them (`study.json`, beside each stage's
time and peak resident memory, which `pipeline.log` prints as each stage ends). A stage whose
outputs were made by another configuration (its `stage.json`) is refused, or with `pipeline.overwrite=true`
run again with the stages that read it. The plan, the commands, the records and the table are
`study.py`; `pipeline.launcher=slurm` runs the same stages as SLURM jobs
(`cluster.py`).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import PROJECT_ROOT
from .errors import UserError
from .locks import held_by_this_process
from .paths import refuse_unsafe_output_override, register_resolvers
from .study import (  # noqa: F401
    Stage, check_stages, plan, print_study, refuse_evaluation_only, run_name, seeds, stage_command, study_table,
    variants, write_record, write_study, write_usage,
)

# the study's progress goes through logging, so it is on the console and in the study's own pipeline.log (Hydra's file
# handler), which a print leaves empty
log = logging.getLogger(__name__)


def run_stage(stage: Stage, common: list[str], index: int, total: int, config: DictConfig | None = None) -> dict:
    """Run one stage's command; `config` (what the command composes) is recorded first as the stage's stage.json,
    its time and peak resident memory last as its usage.json (returned)."""
    if config is not None:
        write_record(stage, config, common)
    command = stage_command(stage, common)
    log.info(f"[{index}/{total}] {stage.name}: running → {stage.output}")
    started = time.perf_counter()
    env = {**os.environ, "PROJECT_ROOT": str(PROJECT_ROOT)}
    child = subprocess.Popen(command, env=env)
    # forward SIGTERM/SIGINT (SLURM pre-emption, Ctrl-C) to the stage, so it checkpoints and stops too
    previous = {sig: signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # wait4, not wait: the child's own resource usage, whose ru_maxrss (KiB on Linux) is its peak resident memory
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = returncode = os.waitstatus_to_exitcode(status)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    result = subprocess.CompletedProcess(command, returncode)
    if result.returncode != 0:
        log.error(f"[{index}/{total}] {stage.name}: FAILED (exit {result.returncode}); command:\n  {' '.join(command)}")
        raise SystemExit(result.returncode)
    if not stage.complete():
        log.error(f"[{index}/{total}] {stage.name}: finished but its outputs are incomplete in {stage.output}")
        raise SystemExit(1)
    return write_usage(stage, time.perf_counter() - started, usage.ru_maxrss * 1024)


class PipelineConfigError(ValueError, UserError):
    """A bad `pipeline.*` (or stage) setting; the message names the key."""


def stage_config(stage: Stage, common: list[str]) -> DictConfig:
    """The config the stage's command composes (inside the pipeline's Hydra app, or an initialised compose API)."""
    from hydra import compose

    config = {"sample.py": "sample", "train.py": "train", "evaluate.py": "evaluate"}[stage.script]
    return compose(config, overrides=[*common, *stage.overrides, f"output={stage.output}"])


def sampler_python(value, where: str) -> str:
    """`sampler.python`: the interpreter that runs sample.py (e.g. the vLLM environment's); null = this one."""
    if value in (None, ""):
        return sys.executable
    path = Path(str(value)).expanduser()
    path = path if path.is_absolute() else PROJECT_ROOT / path
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise PipelineConfigError(f"sampler.python ({where}): {path} is not an executable Python interpreter "
                                  "(bash scripts/setup_vllm.sh creates .venv-vllm/bin/python)")
    return str(path)


def resolve_interpreters(stages: list[Stage], common: list[str]) -> dict[str, DictConfig]:
    """Set each sampling stage's interpreter from its own `sampler.python`; the composed sample configs by stage name."""
    configs = {}
    for stage in stages:
        if stage.script == "sample.py":
            configs[stage.name] = cfg = stage_config(stage, common)
            stage.python = sampler_python(cfg.sampler.get("python"), stage.name)
    return configs


# the schema groups each stage's script checks (config_schema.APP_GROUPS); evaluate.py reads none of them
STAGE_APPS = {"sample.py": "sample", "train.py": "train"}


def check_stage_configs(stages: list[Stage], configs: dict[str, DictConfig]) -> None:
    """Each sampling and training stage's composed config against its script's schemas, the error prefixed by the
    stage's name: a bad key in a stage list (pipeline.teacher, pipeline.variants.<name>) fails the study before its
    first stage runs, not hours later when that stage starts."""
    from .config_schema import APP_GROUPS, check_config

    for stage in stages:
        if stage.script in STAGE_APPS:
            check_config(configs[stage.name], APP_GROUPS[STAGE_APPS[stage.script]], where=stage.name)


def _pipeline_overrides() -> list[str]:
    """The overrides this pipeline was started with, passed on to every stage."""
    return [o for o in HydraConfig.get().overrides.task if not o.startswith(("pipeline.", "hydra.", "output="))]


@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from .errors import run_app

    run_app("pipeline", run_study, cfg)


def run_study(cfg: DictConfig) -> None:
    from .cluster import LAUNCHERS

    refuse_evaluation_only(cfg, "the pipeline")
    launcher = cfg.pipeline.get("launcher") or "local"
    if launcher not in LAUNCHERS:
        raise PipelineConfigError(f"pipeline.launcher={launcher!r}: expected one of {'|'.join(LAUNCHERS)}")
    study_dir = Path(cfg.output or cfg.pipeline.study_dir).resolve()
    study_dir.mkdir(parents=True, exist_ok=True)
    # one pipeline at a time per study: a second one would train the same stages into the same directories
    with held_by_this_process(study_dir / ".pipeline.lock", f"study {study_dir}"):
        _run_stages(cfg, launcher, study_dir)


def _run_stages(cfg: DictConfig, launcher: str, study_dir: Path) -> None:
    from .cluster import StageFailed, submit_study

    common = _pipeline_overrides()
    stages = plan(cfg, study_dir)
    stage_configs = resolve_interpreters(stages, common)
    for stage in stages:  # what each stage's command composes: recorded as it starts, compared before it is skipped
        if stage.name not in stage_configs:
            stage_configs[stage.name] = stage_config(stage, common)
    check_stage_configs(stages, stage_configs)
    check_stages(stages, stage_configs, common, overwrite=bool(cfg.pipeline.get("overwrite")))
    tmp = study_dir / "pipeline.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=False))
    os.replace(tmp, study_dir / "pipeline.yaml")
    started = time.perf_counter()
    if launcher != "local":
        try:
            code = submit_study(cfg, stages, common, study_dir, stage_configs)
        except StageFailed as err:
            raise SystemExit(f"pipeline: error: {err}") from None
        if launcher == "submitit_local":
            log.info(f"Study complete in {time.perf_counter() - started:.0f} s: {study_dir}")
        raise SystemExit(code)
    for index, stage in enumerate(stages, 1):
        if stage.complete():
            log.info(f"[{index}/{len(stages)}] {stage.name}: complete, skipped ({stage.output})")
            continue
        usage = run_stage(stage, common, index, len(stages), stage_configs[stage.name])
        log.info(f"[{index}/{len(stages)}] {stage.name}: done in {usage['seconds']:.0f} s, "
                 f"peak {usage['peak_rss_gb']:.2f} GB resident")
    write_study(study_dir, list(variants(cfg)), seeds(cfg), show=True, stages=stages)
    log.info(f"Study complete in {time.perf_counter() - started:.0f} s: {study_dir}")


if __name__ == "__main__":
    os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
    register_resolvers()
    # before Hydra creates its run directory (the study) at `output`
    refuse_unsafe_output_override(sys.argv[1:], "pipeline")
    main()
