"""The training recipe: LoRA-distil a student on a teacher's answers. Read top to bottom.

`train(cfg)` (cfg = conf/train.yaml, composed by Hydra):
  1. seed; output directory; the resolved config saved as OUTPUT/config.yaml
  2. data: teacher samples -> chat examples, validation on held-out contexts (errors here, before
     any model loads)
  3. module: the student + a LoRA adapter, trained by the loss (conf/module/, conf/loss/)
  4. callbacks (checkpoints, best adapter, early stopping, SIGTERM), logger (W&B | CSV), strategy
  5. `Trainer.fit(ckpt_path=...)`; the adapter is written to OUTPUT/adapter (peft format)
  6. return the objective (best `val/alignment`) for sweeps; OUTPUT/train_summary.json
Writes: OUTPUT/adapter/, OUTPUT/adapter_best/, OUTPUT/checkpoints/{last.ckpt,best-*.ckpt},
OUTPUT/config.yaml, OUTPUT/train_summary.json, OUTPUT/logs/ (CSV) or OUTPUT/wandb/.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import signal
import time
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from .errors import UserError
from .paths import UnsafePathError, multirun_trial, run_output_dir, safe_output_dir
from .scenarios.schema import REPORT_SPLITS

log = logging.getLogger(__name__)


class TrainingConfigError(ValueError, UserError):
    """A training configuration that cannot run; the message says which key to change."""


# a user's error (a bad key, unusable data, a non-finite loss, a rank that failed) derives from errors.UserError:
# train.py reports it as one line and exits 2 (errors.run_app)


def train(cfg: DictConfig) -> float:
    import pytorch_lightning as pl

    # 1. seed, output, checks: nothing a previous run wrote is touched before the inputs are checked ----
    pl.seed_everything(int(cfg.seed), workers=True)
    output = output_dir(cfg)
    fresh = not any(p.name not in HYDRA_RECORD for p in output.iterdir())  # made for this run (Hydra's record only)
    try:
        check_training_config(cfg)
        check_process_layout(cfg)
        check_quantization_strategy(cfg)
        check_sweep_measures_its_objective(cfg)
        ckpt_path = resume_path(cfg, output)
        resume_step = check_checkpoint(ckpt_path, cfg) if ckpt_path else None
        if ckpt_path is None and (output / "logs" / "metrics.csv").exists():
            # a run interrupted before its first checkpoint: it starts over, its rows move aside (loggers.py)
            log.warning("%s: a run interrupted before its first checkpoint; its rows move to %s", output / "logs" /
                        "metrics.csv", output / "logs" / "metrics_superseded.csv")
            resume_step = 0

        # 2. loss and data (all data errors surface here, before the model loads) --------------------
        loss = build_loss(cfg)
        datamodule = build_datamodule(cfg, loss)
        datamodule.setup("fit")
        save_resolved_config(cfg, output)

        # 3. module -----------------------------------------------------------------------------------
        module = build(cfg.module, "module", loss=loss, validation=validation_scenarios(datamodule, cfg))

        # 4. callbacks, logger, trainer ---------------------------------------------------------------
        has_validation = bool(datamodule.val_targets)
        loggers = build_loggers(cfg, resume_step)
        callbacks = build_callbacks(cfg, has_validation, training_record(datamodule, cfg), logged=bool(loggers))
        trainer = build_trainer(cfg, output, list(callbacks.values()), loggers, has_validation)
    except UserError:
        if fresh:  # a run that stopped before training leaves no half-made output directory behind
            remove_fresh_output(output)
        raise

    # 5. fit (resumes from ckpt_path: a path, or `last` = OUTPUT/checkpoints/last.ckpt) -----------
    started = time.perf_counter()
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    try:
        # weights_only=True: a checkpoint is tensors and plain containers; a pickled object in it is refused
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickled_checkpoint(ckpt_path, err) from err
    except SIGTERMException as err:  # pre-empted: CheckpointOnSigterm saved last.ckpt; not a finished run
        agreement = callbacks["step_agreement"]
        if agreement.preempted:
            # said before requeue(): under submitit its handler requeues and exits there, and never returns
            log.warning("pre-empted at global step %d, last.ckpt saved; the requeued run resumes from it",
                        trainer.global_step)
            log.warning("requeue: %s", agreement.requeue(trainer))
        else:
            log.warning("stopped by SIGTERM at global step %d; resume with `output=%s ckpt_path=last`",
                        trainer.global_step, output)
        raise SystemExit(128 + signal.SIGTERM) from err
    finally:
        finish_loggers(loggers)
    seconds = time.perf_counter() - started
    export = callbacks["adapter_export"]
    if not export.exported and trainer.state.status == "finished":
        # resumed from a checkpoint already at max_steps (killed between the last checkpoint and the export):
        # Lightning skips the loop and its on_train_end, so the adapter is exported here
        export.export_final(trainer, module)

    # 6. objective and summary ---------------------------------------------------------------------
    metric = cfg.get("optimized_metric") or "val/alignment"
    final = trainer.callback_metrics.get(metric)
    if metric == export.monitor and export.best_score is not None:  # the best adapter's, not the last step's
        objective = export.best_score
    else:  # e.g. transfer/alignment (callbacks.split_alignment), measured on the final adapter
        objective = float(final) if final is not None else math.nan
    if trainer.is_global_zero:
        summary = {
            "objective": metric, "value": objective, "best_step": export.best_step,
            "global_step": trainer.global_step, "epochs": trainer.current_epoch, "fit_seconds": round(seconds, 2),
            "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
            "data": datamodule.stats, "adapter": str(output / "adapter"),
        }
        (output / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        record_trial(summary, output)
        log.info("trained in %.1f s, %d steps; %s = %s; adapter: %s", seconds, trainer.global_step, metric,
                 objective, output / "adapter")
    return float(objective)


# the mass on the actions beside each split's alignment: a recipe can score on a split it no longer answers in the
# format of (docs/findings.md, the recipe search: temperature 2 and public goods)
TRIAL_COLUMNS = ("trial", "objective", "value", "transfer/alignment", "transfer/mass_shortfall", "best_step",
                 "global_step", "fit_seconds", "val_action_mass",
                 *(f"transfer/alignment/{split}" for split in REPORT_SPLITS),
                 *(f"transfer/action_mass/{split}" for split in REPORT_SPLITS), "overrides", "output")


def record_trial(summary: dict, output: Path) -> Path | None:
    """In a multirun (`train.py -m`, Optuna or grid), append this trial to SWEEP_DIR/trials.csv: the trial
    number, its overrides and its objective. One row per finished trial, appended under a file lock, so
    the table of a sweep is complete even when trials run in parallel or a sweep stops half way."""
    from hydra.core.hydra_config import HydraConfig

    if multirun_trial() is None:
        return None
    import csv
    import fcntl
    import io

    hydra_cfg = HydraConfig.get()
    table = Path(hydra_cfg.sweep.dir) / "trials.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    row = {
        "trial": hydra_cfg.job.get("num"), "objective": summary["objective"], "value": summary["value"],
        "best_step": summary["best_step"], "global_step": summary["global_step"],
        "fit_seconds": summary["fit_seconds"], "val_action_mass": summary["final_metrics"].get("val/action_mass"),
        **{key: summary["final_metrics"].get(key) for key in TRIAL_COLUMNS if key.startswith("transfer/")},
        "overrides": " ".join(hydra_cfg.overrides.task), "output": str(output),
    }
    with open(table, "a+", newline="") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # no flock on this filesystem (NFS without lockd, some Lustre mounts)
            from .locks import lock_refused

            raise lock_refused(table, err, "hydra.sweep.dir") from None
        handle.seek(0)
        header = next(csv.reader(handle), None)
        if header is None:
            header = list(TRIAL_COLUMNS)
            csv.DictWriter(handle, header).writeheader()
        missing = [column for column in TRIAL_COLUMNS if column not in header]
        if missing:  # a table begun by an older version (a resumed search) keeps its columns
            log.warning("%s was begun with other columns: this trial's %s are not in it (they are in the trial's "
                        "own train_summary.json and split_alignment.json)", table, ", ".join(missing))
        line = io.StringIO()
        csv.DictWriter(line, header, extrasaction="ignore").writerow(row)
        handle.seek(0, os.SEEK_END)
        handle.write(line.getvalue())
        handle.flush()
        os.fsync(handle.fileno())
    log.info("trial %s: %s = %s (table: %s)", row["trial"], row["objective"], row["value"], table)
    return table


# ------------------------------------------------------------------------------------------------
def output_dir(cfg: DictConfig) -> Path:
    """`output=` or the Hydra run directory (paths.run_output_dir: in a multirun, each trial its own), recorded in the
    config for the components."""
    path = run_output_dir(cfg.get("output"))
    path.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.output = str(path)
        cfg.paths.output_dir = str(path)
    return path


def processes_per_node(devices, accelerator: str) -> int:
    """How many processes Lightning starts on a node for `trainer.devices`: a count (`2`, `"2"`), `-1` or `"auto"`
    (every visible GPU; one process on CPU), or the devices themselves (`[0, 1]`, `"0,1"`)."""
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return max(torch.cuda.device_count(), 1) if accelerator == "gpu" else 1
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    try:
        return max(int(text), 1)
    except ValueError:
        raise TrainingConfigError(f"trainer.devices={devices!r}: expected a count, -1, 'auto' or a list of devices") \
            from None


def check_training_config(cfg: DictConfig) -> None:
    """Values that cannot train, named by key, before anything loads (a library traceback after the model has loaded
    is what they would give otherwise): the groups train.py reads against their schemas (config_schema.py:
    unknown keys, types, each group's own rules), then the top-level keys no group holds."""
    from .config_schema import APP_GROUPS, check_config

    try:
        check_config(cfg, APP_GROUPS["train"])
    except UserError as err:  # one error type for the callers of this check, the message as the schema wrote it
        raise TrainingConfigError(str(err)) from err
    requeues = OmegaConf.select(cfg, "max_requeues")
    if requeues is not None and (isinstance(requeues, bool) or not isinstance(requeues, int) or requeues < 0):
        raise TrainingConfigError(f"max_requeues={requeues!r}: expected a whole number ≥ 0 (0: never requeue)")


def check_process_layout(cfg: DictConfig) -> None:
    """Lightning relaunches ranks with this process's argv: under `-m` they would re-enter the sweep."""
    accelerator = resolve_accelerator(str(cfg.trainer.get("accelerator", "auto")))
    per_node = processes_per_node(cfg.trainer.devices, accelerator)
    processes = per_node * int(cfg.trainer.get("num_nodes", 1) or 1)
    external = any(k in os.environ for k in ("LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"))
    if multirun_trial() is not None and processes > 1 and not external:
        raise TrainingConfigError(
            f"trainer.devices={cfg.trainer.devices} ({processes} processes) inside a local multirun (-m): Lightning "
            "would relaunch the whole sweep in every rank. Run multi-process jobs through a launcher that creates the "
            "processes (hydra/launcher=slurm, srun, torchrun), or sweep single-process runs."
        )


def zero_stage(strategy_cfg) -> int | None:
    """The ZeRO stage of a `trainer.strategy` DeepSpeed config (None for any other strategy)."""
    if not isinstance(strategy_cfg, (dict, DictConfig)) or "deepspeed" not in str(strategy_cfg.get("_target_", "")):
        return None
    config = strategy_cfg.get("config")
    try:
        settings = json.loads(Path(config).read_text()) if isinstance(config, str) else dict(config or {})
    except (OSError, json.JSONDecodeError) as err:
        raise TrainingConfigError(f"trainer.strategy.config: cannot read DeepSpeed config {config}: {err}") from err
    return int(settings.get("zero_optimization", {}).get("stage", 0))


def check_quantization_strategy(cfg: DictConfig) -> None:
    """QLoRA's 4-bit weights (bitsandbytes) cannot be partitioned by ZeRO-3; refused before any model loads."""
    stage = zero_stage(cfg.trainer.get("strategy"))
    if cfg.model.get("quantization") == "4bit" and stage == 3:
        raise TrainingConfigError(
            f"model.quantization=4bit with trainer.strategy.config={cfg.trainer.strategy.config} (ZeRO stage 3): "
            "ZeRO-3 cannot partition bitsandbytes 4-bit weights. Use trainer=ddp or trainer=deepspeed_zero2 with "
            "4-bit, or model.quantization=null with ZeRO-3."
        )


# what Hydra writes into the run directory before the app starts (conf/base.yaml: hydra.run.dir is `output`)
HYDRA_RECORD = (".hydra", "train.log")


def remove_fresh_output(output: Path) -> None:
    """Remove an output directory that this run made and that holds nothing of a training run (a run refused
    before training); from global rank 0 only, the other ranks never started."""
    import shutil

    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0 and not any((output / name).exists() for name in RUN_FILES):
        shutil.rmtree(output, ignore_errors=True)


def save_resolved_config(cfg: DictConfig, output: Path) -> None:
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        partial = output / "config.yaml.partial"
        OmegaConf.save(cfg, partial, resolve=True)
        partial.replace(output / "config.yaml")


def build(node, key: str, **runtime):
    """Hydra's `instantiate` of the config at `key` (a `_target_` and its arguments) plus the objects only a run
    has (`runtime`). A constructor's own user error comes out unwrapped; any other failure names the key."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        # the runtime objects (a tokenizer, the catalogue) are passed to the constructor, not merged into the config
        factory = instantiate(node, _convert_="all", _partial_=True)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise TrainingConfigError(f"{key} ({node.get('_target_')}): {cause}") from err
        raise
    try:
        return factory(**runtime)
    except UserError:
        raise
    except (ValueError, TypeError) as err:
        raise TrainingConfigError(f"{key} ({node.get('_target_')}): {err}") from err


def build_loss(cfg: DictConfig):
    """The loss component of `conf/loss/<name>.yaml` (`_target_`: a tomdistill.losses class)."""
    if not OmegaConf.select(cfg, "loss._target_"):
        raise TrainingConfigError(f"loss: {OmegaConf.to_container(cfg.loss)} has no _target_; expected a conf/loss/*.yaml "
                                  "naming a tomdistill.losses class")
    return build(cfg.loss, "loss")


def build_datamodule(cfg: DictConfig, loss):
    """`conf/data/*.yaml` (`_target_`: the datamodule) with the student's tokenizer, the catalogue and the loss's
    kind of target (data/targets/, configured by the `data.*` keys it reads and `scenarios.augment`'s batching).
    Without `data.teacher` the oracle teacher is sampled into the cache first and the datamodule reads its
    directories (`oracle_teacher_directories`). The config is left as given: OUTPUT/config.yaml keeps `teacher: null`
    and `data.oracle`, which determine those directories, and the training record names the one trained on."""
    from .data.targets import TARGET_KEYS, build_target_kind
    from .model.loading import load_tokenizer
    from .scenarios.catalogue import catalogue_from_config

    data = OmegaConf.to_container(cfg.data, resolve=True)
    target_kind = build_target_kind(loss, {key: data.pop(key) for key in TARGET_KEYS if key in data},
                                    OmegaConf.select(cfg, "scenarios.augment"))
    catalogue = catalogue_from_config(cfg.scenarios)
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir, padding_side="right")
    oracle = data.pop("oracle", None)  # the recipe's, not the datamodule's: how to sample a teacher when none is given
    if not data.get("teacher"):
        data.update(oracle_teacher_directories(catalogue, target_kind.teacher_modes, oracle, data.get("cache_dir"),
                                               data.get("teacher_probs")))
    return build(data, "data", tokenizer=tokenizer, catalogue=catalogue, target_kind=target_kind)


def oracle_teacher_directories(catalogue, modes, oracle, cache_dir, teacher_probs=None) -> dict[str, str]:
    """`data.teacher=null`: the `teacher` and `teacher_probs` datasets `sample.py sampler=oracle role=teacher` would
    write, sampled by the sampling stage into `cache_dir` (sampling/oracle_teacher.py) with `data.oracle`'s seed and
    sampler. The exact choice probabilities (score mode) are the soft target and every loss's `val/alignment`
    reference; sampled answers (generate mode) only where `modes` (the loss's kind of target) asks for them."""
    from .data.datamodule import DataError
    from .sampling.oracle_teacher import oracle_teacher

    if not cache_dir:
        raise DataError("data.teacher is null (the oracle teacher) but no cache_dir to sample it into")
    if teacher_probs:
        raise DataError(f"data.teacher_probs={teacher_probs} with data.teacher=null: the in-process "
                        "oracle teacher scores itself; give data.teacher as well, or leave data.teacher_probs null")
    directories = oracle_teacher(catalogue, cache_dir, oracle, modes)
    log.info("data.teacher is null: training on the oracle teacher sampled in-process into %s",
             ", ".join(str(d) for d in directories.values()))
    return {"teacher": str(directories.get("generate", directories["score"])),
            "teacher_probs": str(directories["score"])}


def validation_scenarios(datamodule, cfg: DictConfig):
    from .metrics.propensity import choice_propensity
    from .model.lora_module import ValidationScenarios

    targets = datamodule.val_targets
    if not targets:
        log.warning("no validation contexts held out (data.num_val_contexts=0): no val/alignment, no early stopping")
        return None
    return ValidationScenarios(
        ids=[t.id for t in targets], items=[t.item for t in targets],
        teacher_propensity=[choice_propensity(t.teacher_probs) for t in targets], tokenizer=datamodule.tokenizer,
        batch_size=int(cfg.data.eval_batch_size),
    )


def teacher_labels(datamodule) -> dict:
    """How many teacher labels the training used: one choice distribution per trained scenario (losses on the
    distribution) and one sampled completion per training example (losses on tokens), with the trained
    scenarios per split (the `augment` split counts the payoff variants)."""
    return {
        **datamodule.target_kind.label_counts(len(datamodule.train_set), len(datamodule.train_targets)),
        "scenarios_by_split": dict(sorted(Counter(t.scenario.split for t in datamodule.train_targets).items())),
    }


def training_record(datamodule, cfg: DictConfig) -> dict:
    """What the adapter is trained on, saved beside it (tomdistill_adapter.json, `training`): evaluation
    reports in-sample transfer over exactly these scenarios and the held-out contexts apart."""
    return {
        "trained_scenarios": sorted(t.id for t in datamodule.train_targets),
        "teacher_labels": teacher_labels(datamodule),
        "validation_contexts": sorted(datamodule.val_context_names),
        "validation_scenarios": sorted(t.id for t in datamodule.val_targets),
        "prompt_version": datamodule.prompt_version,
        "teacher": str(datamodule.teacher),
        "teacher_models": datamodule.stats.get("teacher_models"),
        "loss": datamodule.loss.name,
        "target": cfg.data.target,
        "max_steps": int(cfg.trainer.get("max_steps", -1) or -1),
        "seed": int(cfg.seed),
    }


def build_callbacks(cfg: DictConfig, has_validation: bool, training: dict | None = None, logged: bool = True) -> dict:
    """`conf/callbacks/*.yaml`, by name: each built from its `_target_` (null leaves one out). Without held-out
    validation there is nothing to monitor (no best checkpoint, best adapter or early stopping); without a logger
    no learning-rate monitor; a divergence factor or early-stopping patience of 0 turns that one off."""
    from .model.loading import model_identity

    runtime = {"adapter_export": {"base_identity": model_identity(cfg.model), "training": training}}
    if not has_validation:
        runtime["model_checkpoint"] = {"monitor": None, "save_top_k": 0}
        runtime["adapter_export"]["best_dir"] = None
    callbacks = {}
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or not node.get("_target_"):
            continue
        off = ((name == "early_stopping" and (not has_validation or not node.get("patience")))
               or (name == "divergence" and not node.get("factor"))
               or (name == "split_alignment" and not node.get("splits"))
               or (name == "learning_rate_monitor" and not logged))
        if not off:
            callbacks[name] = build(node, f"callbacks.{name}", **runtime.get(name, {}))
    missing = [name for name in REQUIRED_CALLBACKS if name not in callbacks]
    if missing:
        raise TrainingConfigError(f"callbacks.{missing[0]} is null or has no _target_: the recipe needs it "
                                  f"({', '.join(REQUIRED_CALLBACKS)} are always on; see conf/callbacks/default.yaml)")
    return callbacks


# the recipe reads these after fit (the adapter, a pre-emption) and resumes from what they write
REQUIRED_CALLBACKS = ("adapter_export", "checkpoint_on_sigterm", "step_agreement")


def build_loggers(cfg: DictConfig, resume_step: int | None = None) -> list:
    """`conf/logger/*.yaml`: every entry with a `_target_` (none, one or several), each given the whole resolved
    config as its hyperparameters. A resumed run's CSV log continues from the checkpoint's step (loggers.py)."""
    from .loggers import ResumableCSVLogger

    loggers = [build(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()
               if node is not None and node.get("_target_")]
    for logger in loggers:
        if isinstance(logger, ResumableCSVLogger):
            logger.resume_step = resume_step
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)  # the whole resolved config, not only the module's
    return loggers


def finish_loggers(loggers: list) -> None:
    """Close the W&B run so the next multirun job starts its own (docs/design.md, "W&B between multirun jobs")."""
    from pytorch_lightning.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def build_strategy(strategy_cfg, accelerator: str, precision=None):
    """`trainer.strategy`: a name Lightning knows (`auto`), or a `_target_` config (conf/trainer/ddp.yaml,
    deepspeed_*.yaml); a config with an `accelerator` or `precision` key gets the resolved one (DeepSpeed follows
    the accelerator and keeps the batch's targets fp32: src/tomdistill/model/strategy.py)."""
    if strategy_cfg is None or isinstance(strategy_cfg, str):
        return strategy_cfg or "auto"
    if not strategy_cfg.get("_target_"):
        raise TrainingConfigError(f"trainer.strategy={dict(strategy_cfg)}: expected a strategy name "
                                  "(auto) or a config with a _target_ (see conf/trainer/)")
    resolved = {"accelerator": accelerator, "precision": precision}
    return build(strategy_cfg, "trainer.strategy", **{key: resolved[key] for key in resolved if key in strategy_cfg})


def resolve_accelerator(name: str) -> str:
    """`auto`: the GPU when torch sees one, else the CPU — unless GPUs were allocated and torch cannot see
    them (a torch build that does not match the driver): that stops with a message, never a silent CPU run."""
    from .devices import check_gpus_usable

    if name in ("auto", "gpu", "cuda"):
        check_gpus_usable(f"trainer.accelerator={name}")
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return name


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is emulated, slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


NATIVE_BF16 = "bf16-if-native"  # bf16-mixed where the hardware computes bf16 itself, else 32-true


def resolve_precision(precision, accelerator: str):
    """`auto`: bf16-mixed on a GPU that computes bf16 itself (Ampere and later), else 32-true. `bf16-if-native`:
    also bf16-mixed on a CPU with AVX512-BF16/AMX. Elsewhere bf16 is emulated (a V100 or T4; most CPUs), several
    times slower than fp32 (bench/README.md, soft_step)."""
    from .devices import gpu_computes_bf16

    if precision == "auto":
        return "bf16-mixed" if accelerator == "gpu" and gpu_computes_bf16() else "32-true"
    if precision == NATIVE_BF16:
        native = gpu_computes_bf16() if accelerator == "gpu" else cpu_has_native_bf16()
        return "bf16-mixed" if native else "32-true"
    if accelerator == "gpu" and str(precision).startswith("bf16") and not gpu_computes_bf16():
        log.warning("trainer.precision=%s on a GPU without native bf16 (compute capability below 8.0): bf16 is "
                    "emulated and slow; use trainer.precision=32-true (or auto)", precision)
    if accelerator == "cpu" and str(precision).startswith("bf16") and not cpu_has_native_bf16():
        log.warning("trainer.precision=%s on a CPU without AVX512-BF16/AMX: bf16 is emulated and may be slower "
                    "than trainer.precision=32-true", precision)
    return precision


def build_trainer(cfg: DictConfig, output: Path, callbacks: list, loggers: list, has_validation: bool):
    import pytorch_lightning as pl

    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    accelerator = resolve_accelerator(options.pop("accelerator"))
    precision = resolve_precision(options.pop("precision"), accelerator)
    strategy = build_strategy(options.pop("strategy"), accelerator, precision)
    if not has_validation:
        options["limit_val_batches"] = 0
    if options.get("enable_progress_bar", True):
        from .callbacks import StepProgressBar

        callbacks = [*callbacks, StepProgressBar()]
    plugins = []
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        # Lightning's SLURM auto-requeue saves a checkpoint inside its signal handler (collectives at a random
        # point of the step: a deadlock on several ranks); StepAgreement saves at a step boundary and requeues
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return pl.Trainer(
        accelerator=accelerator, strategy=strategy, precision=precision, callbacks=callbacks, logger=loggers or False,
        default_root_dir=str(output), use_distributed_sampler=False,  # the batch sampler is rank-aware
        plugins=plugins or None, **options,
    )


# what a training run leaves in its output directory: a directory holding any of these holds a run that can be
# resumed or is finished (metrics alone, a run killed before its first checkpoint, are moved aside instead)
RUN_FILES = ("checkpoints", "adapter", "adapter_best", "train_summary.json")


def resume_path(cfg: DictConfig, output: Path) -> str | None:
    """`ckpt_path`: a path, `last` (OUTPUT/checkpoints/last.ckpt), or null: a fresh run, unless the scheduler
    restarted this one (a requeued SLURM job, a torchrun restart) and it left a last.ckpt: then that, so a
    requeued job that reruns its own command goes on where it stopped. A fresh run into a directory that holds a
    run is refused (it would overwrite that run's adapter, checkpoints and metrics)."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from .distributed import restarted

    path = cfg.get("ckpt_path")
    if path in (None, ""):
        last = output / "checkpoints" / "last.ckpt"
        why = restarted()
        if why and last.exists():
            log.warning("%s: the scheduler restarted this run; resuming from %s", why, last)
            return str(last)
        found = [name for name in RUN_FILES if (output / name).exists()]
        # rank 0 decides: Lightning starts the other ranks once rank 0's run is under way in this directory
        if found and not why and rank_zero_only.rank == 0:
            resume = "resume it with ckpt_path=last, " if last.exists() else ""
            raise TrainingConfigError(
                f"output={output} holds a training run ({', '.join(found)}); {resume}or give another output= "
                "(or delete that directory) to start over")
        return None
    if path == "last":
        last = output / "checkpoints" / "last.ckpt"
        if not last.exists():
            raise TrainingConfigError(
                f"ckpt_path=last: no checkpoint at {last}; resume with the interrupted run's output "
                "(`output=DIR ckpt_path=last`) or give the checkpoint's path"
            )
        return str(last)
    if not Path(path).exists():
        raise TrainingConfigError(f"ckpt_path={path}: no such checkpoint")
    return str(path)


def pickled_checkpoint(ckpt_path, err: Exception) -> TrainingConfigError:
    return TrainingConfigError(f"ckpt_path={ckpt_path}: refusing to load it, it holds pickled objects (only plain "
                               f"weights are loaded: torch.load(weights_only=True)): {err}")


def check_checkpoint(path: str, cfg: DictConfig) -> int | None:
    """The checkpoint to resume from can be read, holding only weights and plain containers (torch.load with
    weights_only=True, memory-mapped: no tensor data is read); its global step. Checked before anything is written
    or loaded: a truncated or unsafe file gets one line naming it and what to do."""
    import pickle

    path = Path(path)
    others = sorted(str(p) for p in path.parent.glob("*.ckpt") if p != path)
    instead = (f"resume from another checkpoint (ckpt_path={others[-1]})" if others else
               "or start over in a new output directory")
    try:
        if path.is_dir():  # a DeepSpeed checkpoint: DeepSpeed's own files, with its data classes allowed
            from .model.strategy import check_deepspeed_checkpoint, use_deepspeed_accelerator

            use_deepspeed_accelerator(resolve_accelerator(str(cfg.trainer.get("accelerator", "auto"))))
            check_deepspeed_checkpoint(path)
            states = sorted(path.rglob("*model_states.pt"))
            state = torch.load(states[0], map_location="cpu", weights_only=True, mmap=True) if states else {}
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, OSError):  # not mappable (an old format, or damaged): read whole for the reason
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickled_checkpoint(cfg.get("ckpt_path"), err) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TrainingConfigError(f"ckpt_path={cfg.get('ckpt_path')}: {path} cannot be read ({reason}); it may be "
                                  f"truncated (a run killed while saving it): {instead}") from None
    step = state.get("global_step") if isinstance(state, dict) else None
    return int(step) if isinstance(step, int) else None


def check_sweep_measures_its_objective(cfg: DictConfig) -> None:
    """In a sweep the objective must be measured: a `val/*` objective needs a validation within the run's steps
    (otherwise the trial would record NaN)."""
    metric = str(cfg.get("optimized_metric") or "val/alignment")
    if multirun_trial() is None or not metric.startswith("val/"):
        return
    trainer = cfg.trainer
    steps = int(trainer.get("max_steps", -1) or -1)
    interval = trainer.get("val_check_interval")
    batches = steps * int(trainer.get("accumulate_grad_batches", 1) or 1)
    if int(OmegaConf.select(cfg, "data.num_val_contexts", default=1) or 0) == 0:
        raise TrainingConfigError(f"optimized_metric={metric} with data.num_val_contexts=0: no validation, so the "
                                  "sweep's objective would never be measured; hold out a context or sweep on another "
                                  "metric (optimized_metric=transfer/alignment with callbacks.split_alignment)")
    if steps > 0 and isinstance(interval, int) and not isinstance(interval, bool) and interval > batches:
        raise TrainingConfigError(
            f"trainer.val_check_interval={interval} with trainer.max_steps={steps}: validation never runs, so the "
            f"sweep's objective {metric} would not be measured; set trainer.val_check_interval ≤ {batches}")
