"""The study as chained cluster jobs: every pipeline stage its own submitit job.

    python -m tomdistill.pipeline +experiment=paper pipeline.launcher=slurm

`pipeline.launcher=slurm` submits each unfinished stage as a SLURM job with the resources of its kind
(`pipeline.cluster.{teacher,student,train,evaluate}`), depending (`afterok`) on the jobs of the stages
whose outputs it reads, and a last CPU job that writes `study.json`; the pipeline then exits. A stage
whose outputs are complete is skipped, exactly as in the local pipeline (and one made by another
configuration refused there, before anything is submitted), so rerunning the same command
after a failure submits only what is missing; a stage whose job is still queued or running (recorded in
`<folder>/jobs.json`, asked of `squeue`) is not submitted twice, its job becomes the dependency.
`pipeline.launcher=submitit_local` runs the same jobs through submitit's local executor, one after the
other (it has no job dependencies): the CPU test of the chain.

Inside a job, `StageJob` runs the stage's own command (sample.py, train.py, evaluate.py) as a child, on
every task srun started (a training job of N nodes × G tasks is N·G Lightning ranks, read from SLURM).
Pre-emption: SLURM's warning (`--signal=USR2@pipeline.cluster.signal_delay_s`) reaches train.py, which
saves `last.ckpt` at a step boundary and requeues the job itself (src/tomdistill/callbacks.py); for
sampling and evaluation the job stops the child (shards already written stay) and requeues. The
requeued job runs the same pickled `StageJob`, which resumes the stage (`ckpt_path=last`, missing shards).
Every job requeues itself at most `max_requeues` times (conf/base.yaml, counted by SLURM_RESTART_COUNT), the
cap that `hydra/launcher=slurm` and the `slurm/` scripts honour too (docs/cluster.md).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from . import PROJECT_ROOT

# the driver's progress goes to the console and the study's pipeline.log (pipeline.py); a job's own lines stay prints,
# in its submitit log
log = logging.getLogger(__name__)

KINDS = ("teacher", "student", "train", "evaluate")
RESOURCE_KEYS = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min")
LAUNCHERS = ("local", "slurm", "submitit_local")
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


class ClusterConfigError(ValueError, UserError):
    """A bad `pipeline.cluster.*` setting; the message names the key."""


def requeue_cap(cluster) -> int:
    """`pipeline.cluster.max_requeues` (by default the shared `max_requeues`), validated."""
    value = cluster.get("max_requeues", 3)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ClusterConfigError(f"max_requeues (pipeline.cluster.max_requeues): must be a whole number ≥ 0 "
                                 f"(0: never requeue), got {value!r}")
    return value


class StageFailed(RuntimeError):
    """A stage's job ended without complete outputs."""


@dataclass
class Resources:
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    mem_gb: int | None
    timeout_min: int


def resources(cluster, kind: str) -> Resources:
    """`pipeline.cluster.<kind>`, validated."""
    section = cluster.get(kind)
    if section is None:
        raise ClusterConfigError(f"pipeline.cluster.{kind}: missing (keys: {', '.join(RESOURCE_KEYS)})")
    unknown = sorted(set(section) - set(RESOURCE_KEYS))
    if unknown:
        raise ClusterConfigError(f"pipeline.cluster.{kind}: unknown key(s) {unknown}; expected {list(RESOURCE_KEYS)}")
    values = {}
    for key in RESOURCE_KEYS:
        value = section.get(key)
        minimum = 0 if key in ("gpus_per_node", "mem_gb") else 1
        if value is None and key == "mem_gb":  # the partition's default memory
            values[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ClusterConfigError(f"pipeline.cluster.{kind}.{key}: must be a whole number ≥ {minimum}, got {value!r}")
        values[key] = value
    return Resources(**values)


def check_layout(stage, res: Resources, stage_cfg) -> None:
    """Refuse a job whose task and GPU layout cannot run the stage (checked before anything is submitted)."""
    where = f"pipeline.cluster.{stage.kind}"
    if stage.script == "train.py":
        if res.gpus_per_node and res.gpus_per_node != res.tasks_per_node:
            raise ClusterConfigError(
                f"{where}: gpus_per_node ({res.gpus_per_node}) must equal tasks_per_node ({res.tasks_per_node}): "
                "training runs one task per GPU (docs/design.md, \"SLURM task layout\")")
        return
    if stage.script != "sample.py" or stage_cfg is None:
        return
    sampler = stage_cfg.sampler
    if sampler.backend == "vllm":
        tp = int(sampler.get("tensor_parallel_size", 1))
        if res.gpus_per_node != tp * res.tasks_per_node:
            raise ClusterConfigError(
                f"{where} for '{stage.name}': sampler.tensor_parallel_size ({tp}) × tasks_per_node "
                f"({res.tasks_per_node}) must equal gpus_per_node ({res.gpus_per_node}): each task's vLLM engine "
                "takes its own tensor-parallel GPUs")
    elif sampler.get("device_map") and res.tasks_per_node != 1:
        raise ClusterConfigError(
            f"{where} for '{stage.name}': sampler.device_map={sampler.device_map} spreads one model over every GPU "
            f"of the node, so tasks_per_node must be 1, got {res.tasks_per_node}")


@dataclass
class StageJob:
    """What a cluster job runs: one stage's command (see the module docstring). Pickled by submitit."""
    stage: object  # pipeline.Stage
    common: list
    extra: list
    max_requeues: int = 3

    def __call__(self) -> str:
        from .study import stage_command

        stage = self.stage
        if stage.complete():  # a requeued or duplicate job of a finished stage
            return f"{stage.name}: complete, skipped"
        command = stage_command(stage, list(self.common), list(self.extra))
        env = {**os.environ, "PROJECT_ROOT": str(PROJECT_ROOT)}
        started = time.perf_counter()
        print(f"{stage.name}: running {' '.join(command)}", flush=True)
        children: list[subprocess.Popen] = []
        received: list[int] = []  # what reached the job before its child existed, sent to it once started
        preempted: list[int] = []

        def forward(signum, _frame=None):
            if children:
                children[0].send_signal(signum)
            else:
                received.append(signum)

        def on_preempt(signum, _frame):
            # train.py checkpoints at a step boundary and requeues the job itself on this warning; the
            # samplers and the evaluation are stopped (written shards stay) and the job requeued below
            preempted.append(signum)
            forward(signum if stage.script == "train.py" else signal.SIGTERM)

        preempt = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
        handlers = {signal.SIGTERM: forward, signal.SIGINT: forward, preempt: on_preempt}
        # the handlers come before the child: a signal between the two would otherwise take its default action
        # (SIGUSR2's ends the job with no checkpoint and no requeue)
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            children.append(subprocess.Popen(command, env=env))
            for signum in received:
                children[0].send_signal(signum)
            returncode = children[0].wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if preempted and not (returncode == 0 and stage.complete()):  # the warning came as the stage finished: done
            raise StageFailed(f"{stage.name}: pre-empted; {self._requeue()}")
        if returncode != 0:
            raise StageFailed(f"{stage.name}: exit {returncode}; command:\n  {' '.join(command)}")
        if _global_rank() != 0:
            return f"{stage.name}: rank {_global_rank()} done"
        if not stage.complete():
            raise StageFailed(f"{stage.name}: finished but its outputs are incomplete in {stage.output}")
        return f"{stage.name}: done in {time.perf_counter() - started:.0f} s"

    def _requeue(self) -> str:
        if self.stage.script == "train.py":
            return "train.py saved last.ckpt and requeued the job"
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return "not a SLURM job: rerun the pipeline to resume"
        if _global_rank() != 0:
            return "requeue left to rank 0"
        from .distributed import requeue_slurm_job, slurm_restarts

        restarts = slurm_restarts()
        if restarts >= self.max_requeues:
            return (f"not requeued: restarted {restarts} times already (max_requeues={self.max_requeues}); "
                    "rerun the pipeline to resume")
        return f"requeued SLURM job {job}" if requeue_slurm_job(job) else f"requeue of {job} failed"


def _global_rank() -> int:
    for name in ("SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return 0


@dataclass
class StudyJob:
    """The last job: the comparison table of every variant (study.json), once the evaluations are done."""
    study_dir: Path
    variants: list
    seeds: list

    def __call__(self) -> str:
        from .study import write_study

        write_study(Path(self.study_dir), list(self.variants), list(self.seeds))
        return str(Path(self.study_dir) / "study.json")


def _write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def active_job(job_id: str) -> bool:
    """Whether SLURM still has the job queued or running (`squeue`; a finished job is no longer listed)."""
    try:
        out = subprocess.run(["squeue", "--noheader", f"--jobs={job_id}", "--format=%T"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(line.strip() in ACTIVE_STATES for line in out.stdout.splitlines())


def _job_name(cluster, stage) -> str:
    short = stage.output.name  # teacher, base, train_sft, ... (unique within the study)
    return f"{cluster.get('job_prefix') or 'tomdistill'}-{short}"


def make_executor(launcher: str, folder: Path, cluster, res: Resources, name: str, dependency: str | None,
                  srun_args: list[str]):
    """A submitit executor for one job; the job's wrapper runs with this interpreter (it unpickles `StageJob`),
    the stage's own command with the stage's (`sampler.python`)."""
    import submitit

    # submitit's own requeue (its handler, before StageJob installs the job's) counts time-outs against this; the
    # local executor takes no slurm_ key
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm" if launcher == "slurm" else "local",
                                     slurm_max_num_timeout=requeue_cap(cluster))
    additional = {"requeue": True, "kill-on-invalid-dep": "yes", **dict(cluster.get("additional") or {})}
    if dependency:
        additional["dependency"] = dependency
    # srun of Slurm 22.05 (up to 23.02) does not inherit sbatch's --cpus-per-task: each task would get one CPU.
    # submitit's srun line holds only --output/--error and slurm_srun_args, so it is passed here (docs/cluster.md)
    srun_args = [*srun_args, f"--cpus-per-task={res.cpus_per_task}"]
    parameters = dict(
        name=name, timeout_min=res.timeout_min, nodes=res.nodes, tasks_per_node=res.tasks_per_node,
        cpus_per_task=res.cpus_per_task, gpus_per_node=res.gpus_per_node or None, mem_gb=res.mem_gb,
        slurm_partition=cluster.get("partition"), slurm_account=cluster.get("account"), slurm_qos=cluster.get("qos"),
        slurm_signal_delay_s=int(cluster.get("signal_delay_s", 120)), slurm_setup=list(cluster.get("setup") or []),
        slurm_srun_args=srun_args, slurm_additional_parameters=additional,
    )
    if launcher != "slurm":  # the local executor takes only the generic keys (and no node count above 1)
        parameters = {k: v for k, v in parameters.items() if not k.startswith("slurm_") and k != "mem_gb"}
    executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    return executor


def submit_study(cfg, stages: list, common: list[str], study_dir: Path, stage_configs: dict) -> int:
    """Submit every unfinished stage as its own job (module docstring). Returns an exit code."""
    launcher = cfg.pipeline.launcher
    cluster = cfg.pipeline.cluster
    if launcher == "slurm":
        missing = [tool for tool in ("sbatch", "srun", "squeue") if shutil.which(tool) is None]
        if missing:
            raise ClusterConfigError(f"pipeline.launcher=slurm: {', '.join(missing)} not found on PATH; submit from "
                                     "a SLURM login node (or use pipeline.launcher=local|submitit_local)")
    max_requeues = requeue_cap(cluster)
    folder = Path(cluster.get("folder") or study_dir / ".submitit").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    layouts = {}
    for stage in stages:  # every layout checked before the first job is submitted
        res = resources(cluster, stage.kind)
        check_layout(stage, res, stage_configs.get(stage.name))
        layouts[stage.name] = res
    record_path = folder / "jobs.json"
    previous = json.loads(record_path.read_text()) if record_path.exists() and launcher == "slurm" else {}
    record: dict[str, str] = dict(previous)  # kept until replaced: a crash below must not forget a queued job
    jobs: dict[str, str] = {}       # stage name -> job id this stage's dependents wait for
    handles: dict[str, object] = {}  # local executor: the jobs to wait for
    total = len(stages)
    for index, stage in enumerate(stages, 1):
        if stage.complete():
            log.info(f"[{index}/{total}] {stage.name}: complete, skipped ({stage.output})")
            continue
        old = previous.get(stage.name)
        if old and active_job(old):
            jobs[stage.name] = record[stage.name] = old
            log.info(f"[{index}/{total}] {stage.name}: job {old} is still queued or running, not resubmitted")
            continue
        needs = [jobs[name] for name in stage.needs if name in jobs]
        if launcher == "submitit_local":  # no scheduler to hold the job: wait for what it reads
            for name in stage.needs:
                if name in handles:
                    _wait(handles[name], name)
        res = layouts[stage.name]
        extra = []
        if stage.script == "train.py":  # Lightning's ranks must match the allocation, or training hangs
            extra = [f"trainer.num_nodes={res.nodes}", f"trainer.devices={res.tasks_per_node}",
                     f"max_requeues={max_requeues}"]  # train.py requeues itself, under the same cap
        srun_args = ["--kill-on-bad-exit=1"] if res.nodes * res.tasks_per_node > 1 else []
        executor = make_executor(launcher, folder, cluster, res, _job_name(cluster, stage),
                                 f"afterok:{':'.join(needs)}" if needs and launcher == "slurm" else None, srun_args)
        if stage.name in stage_configs:  # its record, as the local pipeline writes it when the stage starts (study.py)
            from .study import write_record

            write_record(stage, stage_configs[stage.name], common)
        job = executor.submit(StageJob(stage, list(common), extra, max_requeues))
        jobs[stage.name] = record[stage.name] = str(job.job_id)
        handles[stage.name] = job
        if launcher == "slurm":  # at once: a failure further down must not lead a rerun to submit this twice
            _write_json_atomic(record_path, record)
        after = f" after {', '.join(needs)}" if needs and launcher == "slurm" else ""
        log.info(f"[{index}/{total}] {stage.name}: submitted job {job.job_id}{after} → {stage.output}")
    from .study import seeds, variants, write_study

    if launcher == "submitit_local":
        for name, job in handles.items():
            _wait(job, name)
        write_study(study_dir, list(variants(cfg)), seeds(cfg), show=True)
        return 0
    if not jobs:
        write_study(study_dir, list(variants(cfg)), seeds(cfg), show=True)
        return 0
    old = previous.get("study table")
    if not handles and old and active_job(old):  # nothing new: the queued table job still waits for the same jobs
        record["study table"] = old
        _write_json_atomic(record_path, record)
        log.info(f"study table: job {old} is still queued, not resubmitted")
        return 0
    res = layouts[next(s.name for s in stages if s.kind == "evaluate")]
    executor = make_executor(launcher, folder, cluster, Resources(1, 1, 0, 1, res.mem_gb, 30),
                             f"{cluster.get('job_prefix') or 'tomdistill'}-study",
                             f"afterok:{':'.join(sorted(set(jobs.values()), key=str))}", [])
    job = executor.submit(StudyJob(study_dir, list(variants(cfg)), seeds(cfg)))
    record["study table"] = str(job.job_id)
    _write_json_atomic(record_path, record)
    log.info(f"study table: submitted job {job.job_id} → {study_dir / 'study.json'}\n"
             f"Jobs and logs: {folder}. Follow them with `squeue --me`; after a failure, fix it and rerun the same "
             "command: finished stages are skipped, queued ones are not resubmitted.")
    return 0


def _wait(job, name: str, _reported: set = set()) -> None:  # noqa: B006 - each job's result printed once
    try:
        result = job.result()
        if job.job_id not in _reported:
            _reported.add(job.job_id)
            log.info("%s", result)
    except Exception as err:  # noqa: BLE001 - submitit re-raises the job's error with its traceback
        message = str(err).strip().splitlines()
        raise StageFailed(f"{name}: job {job.job_id} failed: {message[-1] if message else err} "
                          f"(log: {job.paths.stderr})") from None
