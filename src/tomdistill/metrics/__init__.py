"""Metrics: propensities, the transfer metrics (`improvement`, `alignment`), null students and their statistics."""
from .null_students import NULL_STUDENTS, null_propensities, null_transfer, uniform_amounts_propensity
from .propensity import PropensityError, answer_table, group_propensities, scenario_propensities
from .transfer import (
    MIN_FORMAT_MASS, alignment, alignment_per_scenario, format_verdict, improvement, improvement_per_scenario,
)

__all__ = [
    "PropensityError", "answer_table", "group_propensities", "scenario_propensities",
    "alignment", "alignment_per_scenario", "improvement", "improvement_per_scenario",
    "MIN_FORMAT_MASS", "format_verdict",
    "NULL_STUDENTS", "null_propensities", "null_transfer", "uniform_amounts_propensity",
]
