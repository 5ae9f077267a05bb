"""What every sampling backend is (`Backend`) and what passes through it (requests, completions, scores); the
backends themselves are in backends.py and recorded.py."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..scenarios import Scenario, build_messages
from .settings import SamplerSettings


@dataclass
class GenerationRequest:
    """Draw one completion per seed for a scenario's prompt."""
    scenario: Scenario
    prompt: str
    seeds: list[int]       # one per sample (hf, oracle)
    request_seed: int      # one per request (vllm draws all of a request's samples from one seed)
    indices: list[int] | None = None  # the samples' indices in their scenario (recorded: the i-th recorded answer)


@dataclass
class Completion:
    text: str
    new_tokens: int


@dataclass
class ScoredScenario:
    prompt: str
    probs: dict[str, float]  # renormalised over the scenario's actions
    mass: float              # raw probability on the action continuations


class Backend(ABC):
    name: str  # what records carry in their `model` field

    def __init__(self, settings: SamplerSettings, shuffle_seed: int | None = None):
        self.settings = settings
        self.shuffle_seed = shuffle_seed

    def messages(self, scenario: Scenario) -> list[dict[str, str]]:
        return build_messages(scenario, self.settings.role, self.shuffle_seed)

    @abstractmethod
    def prompt(self, scenario: Scenario) -> str:
        """The prompt text as this backend's model sees it."""

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """One completion per seed of each request, in order."""

    @abstractmethod
    def score(self, scenarios: list[Scenario]) -> list[ScoredScenario]:
        """Exact action probabilities, one forward pass per scenario."""

    def close(self) -> None:
        pass
