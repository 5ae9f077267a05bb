"""Exact scoring vs Monte Carlo: cooperation propensities from score mode vs from N sampled answers.

    python -m bench.score_vs_sample [--n 300] [--scenarios 20] [--repetitions 3] [--mc-repetitions 1] [--threads 1]

One `hf` backend (SmolLM2-135M-Instruct on CPU, student role, the sampler's defaults: temperature
1, no top-p, max_new_tokens 8) answers the 20 in-sample scenarios two ways:

- score mode (`HFBackend.score`): P(C) from the next-token probabilities after `Answer:`, one
  forward pass per scenario;
- Monte Carlo (`HFBackend.generate`, generate mode as sample.py runs it, prompt prefilled with
  `Answer:`): `n` sampled answers per scenario, parsed as the runner parses them.

The Monte-Carlo propensity is the share of C among the *parsed* answers (SmolLM2 leaves some
unparsed; the parsed share is reported). Its standard error is sqrt(p(1-p)/parsed) with p the
exact score-mode probability (the binomial SE under "both estimate the same p"; it is never 0).
Score mode is repeated `--repetitions` times around the Monte-Carlo run(s) (the expensive side:
20 × 300 completions), alternating; wall times are medians. Last line: the speed ratio.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from bench.common import generation_prompt, hf_backend, in_sample_scenarios, machine, median, set_threads, timed


@dataclass
class ScenarioEstimate:
    game: str
    context: str
    p_score: float         # exact P(C), renormalised over the actions
    action_mass: float     # raw probability on the action tokens
    p_sampled: float       # share of C among parsed answers (nan when none parsed)
    parsed: int
    sampled: int

    @property
    def standard_error(self) -> float:
        p = self.p_score
        return math.sqrt(p * (1 - p) / self.parsed) if self.parsed else math.nan

    @property
    def z(self) -> float:
        return abs(self.p_sampled - self.p_score) / self.standard_error if self.parsed else math.nan


def monte_carlo(backend, settings, scenarios, n: int, seed_offset: int = 0) -> list[tuple[float, int]]:
    """(share of C among parsed answers, parsed count) per scenario from `n` sampled answers."""
    from tomdistill.sampling.backends import GenerationRequest
    from tomdistill.sampling.runner import prefilled
    from tomdistill.scenarios import ANSWER_PREFIX, UNPARSED, parse_action

    prompts = [generation_prompt(backend, settings, s) for s in scenarios]
    requests = [GenerationRequest(s, p, [seed_offset + 1_000_003 * i + j for j in range(n)], i)
                for i, (s, p) in enumerate(zip(scenarios, prompts))]
    out = []
    for scenario, completions in zip(scenarios, backend.generate(requests)):
        # the runner records the whole assistant turn, prefill included, and parses that
        texts = [f"{ANSWER_PREFIX} {c.text}" if prefilled(settings) else c.text for c in completions]
        actions = [parse_action(t, scenario.game) for t in texts]
        parsed = [a for a in actions if a != UNPARSED]
        out.append((parsed.count("C") / len(parsed) if parsed else math.nan, len(parsed)))
    return out


def measure(model_name: str = "smollm2_135m", n: int = 300, scenario_count: int = 20, repetitions: int = 3,
            mc_repetitions: int = 1) -> dict:
    backend, settings = hf_backend(model_name, role="student", n=n)
    scenarios = in_sample_scenarios(scenario_count)
    if any("C" not in s.game.actions for s in scenarios):
        raise ValueError("propensity = P(C): every scenario must be a C/D game")
    score_seconds, sample_seconds = [], []
    scored = sampled = None
    for repetition in range(max(repetitions, mc_repetitions)):
        if repetition < repetitions:
            seconds, scored = timed(backend.score, scenarios)
            score_seconds.append(seconds)
        if repetition < mc_repetitions:
            seconds, sampled = timed(monte_carlo, backend, settings, scenarios, n, 10_000 * repetition)
            sample_seconds.append(seconds)
    estimates = [ScenarioEstimate(s.game.name, s.context.name, sc.probs["C"], sc.mass, p, parsed, n)
                 for s, sc, (p, parsed) in zip(scenarios, scored, sampled)]
    compared = [e for e in estimates if e.parsed]
    mean_abs_diff = sum(abs(e.p_sampled - e.p_score) for e in compared) / len(compared) if compared else math.nan
    mean_se = sum(e.standard_error for e in compared) / len(compared) if compared else math.nan
    return {
        "estimates": estimates, "score_seconds": score_seconds, "sample_seconds": sample_seconds,
        "speedup": median(sample_seconds) / median(score_seconds), "mean_abs_diff": mean_abs_diff,
        "mean_se": mean_se, "diff_in_se": mean_abs_diff / mean_se if mean_se > 0 else math.nan,
        "within_2se": sum(e.z <= 2 for e in compared), "compared": len(compared),
        "parsed_share": sum(e.parsed for e in estimates) / sum(e.sampled for e in estimates), "n": n,
    }


def render(result: dict, title: str):
    from rich.table import Table

    summary = Table(title=title)
    for column in ("method", "model calls", "wall s (median)", "wall s (each rep)", "s / scenario"):
        summary.add_column(column, justify="left" if column == "method" else "right")
    count = len(result["estimates"])
    summary.add_row("score mode (exact P(C))", f"{count} forward passes", f"{median(result['score_seconds']):.1f}",
                    ", ".join(f"{s:.1f}" for s in result["score_seconds"]),
                    f"{median(result['score_seconds']) / count:.2f}")
    summary.add_row(f"Monte Carlo (n={result['n']} samples)", f"{count * result['n']} completions",
                    f"{median(result['sample_seconds']):.1f}", ", ".join(f"{s:.1f}" for s in result["sample_seconds"]),
                    f"{median(result['sample_seconds']) / count:.2f}")
    summary.add_row("ratio Monte Carlo / score", "", f"{result['speedup']:.1f}×", "", "")

    agreement = Table(title=f"P(C): score mode vs Monte Carlo over parsed answers "
                            f"(parsed {100 * result['parsed_share']:.0f}% of {count * result['n']})")
    for column in ("game", "context", "P(C) score", "action mass", "P(C) sampled", "parsed", "MC s.e.", "|diff| / s.e."):
        agreement.add_column(column, justify="left" if column in ("game", "context") else "right")
    for e in result["estimates"]:
        agreement.add_row(e.game, e.context, f"{e.p_score:.3f}", f"{e.action_mass:.3f}", f"{e.p_sampled:.3f}",
                          f"{e.parsed}/{e.sampled}", f"{e.standard_error:.3f}", f"{e.z:.2f}")
    agreement.add_row("mean", "", "", "", "", "", f"{result['mean_se']:.3f}",
                      f"MAD {result['mean_abs_diff']:.3f} = {result['diff_in_se']:.2f} s.e.")
    return summary, agreement


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model config name")
    parser.add_argument("--n", type=int, default=300, help="sampled answers per scenario (Monte Carlo)")
    parser.add_argument("--scenarios", type=int, default=20, help="first K in-sample scenarios")
    parser.add_argument("--repetitions", type=int, default=3, help="score-mode repetitions")
    parser.add_argument("--mc-repetitions", type=int, default=1, help="Monte-Carlo repetitions (each is n × scenarios completions)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    from rich.console import Console

    console = Console(width=160)
    console.print(f"machine: {machine()}")
    result = measure(args.model, args.n, args.scenarios, args.repetitions, args.mc_repetitions)
    summary, agreement = render(result, f"Cooperation propensities of {args.model} (student role, CPU): "
                                        f"exact scoring vs {args.n} samples per scenario")
    console.print(summary)
    console.print(agreement)
    console.print(f"mean |P_score - P_MC| = {result['mean_abs_diff']:.3f} vs mean MC s.e. {result['mean_se']:.3f} "
                  f"({result['diff_in_se']:.2f} s.e.; {result['within_2se']}/{result['compared']} "
                  f"scenarios within 2 s.e.); MC propensities over parsed answers only")
    console.print(f"machine after: {machine()}")
    print(f"headline: score mode is {result['speedup']:.1f}x faster than {args.n}-sample Monte Carlo; "
          f"propensities differ by {result['diff_in_se']:.2f} MC s.e. on average")


if __name__ == "__main__":
    main()
