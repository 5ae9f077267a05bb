"""Scenarios: the catalogue (games, contexts, splits), prompts, answer parsing and the oracle agent."""
from .catalogue import AUGMENT_SPLIT, HELDOUT_CONTEXT, REPORT_SPLITS, SPLITS, Catalogue, catalogue_from_config, CatalogueError, Context, Game, Scenario, load_catalogue
from .parsing import UNPARSED, parse_action, parse_motivation
from .prompts import (
    ANSWER_PREFIX,
    MOTIVATION_PREFIX,
    answer_text,
    build_messages,
    prompt_version,
    render_prompt,
    scenario_version,
)

__all__ = [
    "AUGMENT_SPLIT", "HELDOUT_CONTEXT", "REPORT_SPLITS", "SPLITS", "Catalogue", "catalogue_from_config", "CatalogueError", "Context", "Game", "Scenario", "load_catalogue",
    "UNPARSED", "parse_action", "parse_motivation", "ANSWER_PREFIX", "MOTIVATION_PREFIX",
    "answer_text", "build_messages", "prompt_version", "render_prompt", "scenario_version",
]
