"""Optuna search spaces whose knobs depend on the loss chosen in the trial (define-by-run).

`soft_weight` exists only for `sft_soft`, `temperature` only for the soft-labelled losses
(`conf/loss/*.yaml`); a flat search space would override a key the chosen loss does not have.
An `hparams_search` config names `tomdistill.sweeps.loss_knobs` as the sweeper's
`custom_search_space` and lists each loss's knobs under `loss_search_space`, in the sweeper's own
syntax (`interval(a, b)`, `choice(...)`, `tag(log, ...)`).
"""
from __future__ import annotations


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
