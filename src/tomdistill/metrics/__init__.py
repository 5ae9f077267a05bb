"""Metrics: propensities, the transfer metrics (`improvement`, `alignment`) and their statistics."""
from .propensity import PropensityError, answer_table, group_propensities, scenario_propensities
from .transfer import alignment, alignment_per_scenario, improvement, improvement_per_scenario

__all__ = [
    "PropensityError", "answer_table", "group_propensities", "scenario_propensities",
    "alignment", "alignment_per_scenario", "improvement", "improvement_per_scenario",
]
