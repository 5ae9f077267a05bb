"""Optuna search spaces whose knobs depend on the loss chosen in the trial (define-by-run).

`soft_weight` exists only for `sft_soft`, `temperature` only for the soft-labelled losses
(`conf/loss/*.yaml`); a flat search space would override a key the chosen loss does not have.
An `hparams_search` config names `tomdistill.sweeps.loss_knobs` as the sweeper's
`custom_search_space` and lists each loss's knobs under `loss_search_space`, in the sweeper's own
syntax (`interval(a, b)`, `choice(...)`, `tag(log, ...)`).
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError


def loss_knobs(config, trial) -> None:
    """Suggest the knobs of the loss this trial chose (`trial.params["loss"]`, else the configured one)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    space = config.get("loss_search_space") or {}
    loss = trial.params.get("loss", config.loss.name)
    knobs = space.get(loss) or {}
    parser = OverridesParser.create()
    for override in parser.parse_overrides([f"{key}={value}" for key, value in knobs.items()]):
        # the sweeper suggests its flat `params` the same way (hydra_optuna_sweeper._impl)
        trial._suggest(override.get_key_element(), create_optuna_distribution_from_override(override))


SQLITE = "sqlite:///"


def sqlite_in_sweep_dir(storage: str, sweep_dir: str) -> str:
    """A relative SQLite storage (`sqlite:///optuna.db`) as the file in the sweep directory, which is created
    (SQLite creates the file, not its directory); any other storage as it is."""
    if not storage.startswith(SQLITE):
        return storage
    path = Path(storage[len(SQLITE):])
    path = path if path.is_absolute() else Path(sweep_dir).absolute() / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return SQLITE + str(path)


def resume_point(storage: str, study_name: str, n_trials: int) -> tuple[int, int]:
    """Where a search stored in `storage` goes on: (trials still to run, the next trial's number).

    A rerun of a search counts its finished trials against `n_trials`; a trial left RUNNING was killed with
    its sweep (nothing told the study its end) and is marked FAIL, so the rerun neither waits for it nor
    counts it. The next trial's number is also its job number, so trial N keeps the directory SWEEP_DIR/N.
    """
    import optuna
    from optuna.trial import TrialState

    stored = optuna.storages.get_storage(storage)
    try:
        study_id = stored.get_study_id_from_name(study_name)
    except KeyError:  # a new search
        return n_trials, 0
    trials = stored.get_all_trials(study_id, deepcopy=False)
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            stored.set_trial_state(stored.get_trial_id_from_study_id_trial_number(study_id, trial.number),
                                   TrialState.FAIL)
    complete = sum(trial.state == TrialState.COMPLETE for trial in trials)
    return max(n_trials - complete, 0), len(trials)


class StudyObjectiveError(ValueError, UserError):
    """A stored search is resumed with another objective than the one its trials were scored by."""


def check_study_objective(storage: str, study_name: str, optimized_metric: str, directions: list[str]) -> None:
    """Record the metric a stored search optimises (the study's user attribute `optimized_metric`) and refuse to go
    on with another, or with a study that has trials but no record of it (stored before it was recorded): new
    trials' values would be ranked against old ones of perhaps another quantity."""
    import optuna

    study = optuna.create_study(study_name=study_name, storage=storage, directions=directions, load_if_exists=True)
    stored = study.user_attrs.get("optimized_metric")
    where = f"study {study_name} in {storage}"
    if stored is None and study.trials:
        raise StudyObjectiveError(
            f"{where} has {len(study.trials)} trials but does not record the metric they were scored by (stored "
            f"before it was recorded): if it is optimized_metric={optimized_metric}, record it with python -c "
            f"\"import optuna; optuna.load_study(study_name='{study_name}', storage='{storage}')"
            f".set_user_attr('optimized_metric', '{optimized_metric}')\"; else begin a new search "
            "(hydra.sweeper.study_name=...)")
    if stored is not None and stored != optimized_metric:
        raise StudyObjectiveError(
            f"{where} was scored by optimized_metric={stored}, this run's is {optimized_metric}: resume it with "
            f"optimized_metric={stored}, or begin a new search (hydra.sweeper.study_name=...)")
    study.set_user_attr("optimized_metric", optimized_metric)
