"""The Optuna sweeper of `hydra-optuna-sweeper`, resumable: with a storage (the `hparams_search` configs keep
the study in SQLite in the sweep directory), rerunning the same command goes on where the last run stopped
(`tomdistill.sweeps.resume_point`). A relative SQLite path (`sqlite:///optuna.db`) is a file in the sweep
directory. Hydra finds sweepers only in the `hydra_plugins` package."""
from __future__ import annotations

import logging

from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    def sweep(self, arguments):
        impl = self.sweeper  # hydra_optuna_sweeper._impl.OptunaSweeperImpl
        if impl.storage:
            from tomdistill.errors import run_app
            from tomdistill.sweeps import check_study_objective, resume_point, sqlite_in_sweep_dir

            # the storage cannot name the sweep directory by interpolation: Hydra builds the sweeper before
            # HydraConfig exists; the sweeper's setup() has resolved the directory by now
            impl.storage = sqlite_in_sweep_dir(impl.storage, str(impl.sweep_dir))
            run_app("train.py", check_study_objective, impl.storage, impl.study_name,
                    str(impl.config.get("optimized_metric")), impl._get_directions())
            remaining, next_trial = resume_point(impl.storage, impl.study_name, impl.n_trials)
            if next_trial:
                log.info("study %s: %d trials stored, %d of n_trials=%d still to run, from trial %d",
                         impl.study_name, next_trial, remaining, impl.n_trials, next_trial)
                # the sampler's seed moves on with the stored trials: seeded as at the start, its random draws
                # (TPE's first n_startup_trials) would repeat the first run's trials
                sampler = impl.config.hydra.sweeper.sampler
                if sampler.get("seed") is not None:
                    impl.sampler = instantiate(sampler, seed=int(sampler.seed) + next_trial)
            impl.n_trials, impl.job_idx = remaining, next_trial
        return super().sweep(arguments)
