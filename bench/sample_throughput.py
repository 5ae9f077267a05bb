"""Sampling throughput: tomdistill's `hf` backend vs a naive `generate` loop.

    python -m bench.sample_throughput [--n 32] [--naive-samples 1] [--scenarios 20] [--repetitions 3] [--threads 1]

Both sides use one model object (SmolLM2-135M-Instruct on CPU, fp32), the same prompts (the 20
in-sample scenarios, student role, rendered and prefilled with `Answer:` exactly as sample.py
does), temperature 1, no top-k/top-p, and the student's max_new_tokens (8).

- tomdistill: `HFBackend.generate` — the class sample.py uses — for `n` samples of every scenario:
  left-padded batches, each prompt encoded once and its key/value cache shared by its samples.
- naive: the loop such studies are usually scripted as — one `model.generate` call per
  (scenario, sample), `do_sample=True`. Its cost per completion does not depend on `n` (every
  call is independent), so each repetition times `--naive-samples` samples of every scenario
  rather than all `n` (20 × 32 sequential calls would take most of an hour on 2 cores).

Repetitions alternate (naive, tomdistill, naive, …); the table shows medians. The last line is the
headline ratio of completions per second. `--threads` (default 1) is explained in bench/common.py.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from bench.common import generation_prompt, hf_backend, in_sample_scenarios, machine, median, set_threads, timed


@dataclass
class SideResult:
    name: str
    completions: int          # per repetition
    new_tokens: list[int]     # per repetition (up to and including the end-of-sequence token)
    seconds: list[float]      # wall time per repetition

    @property
    def completions_per_s(self) -> float:
        return self.completions / median(self.seconds)

    @property
    def new_tokens_per_s(self) -> float:
        return median(self.new_tokens) / median(self.seconds)


def naive_loop(backend, settings, prompts: list[str], seeds_per_prompt: list[list[int]]) -> int:
    """One `model.generate` call per (prompt, seed): the usual hand-written sampling script."""
    import torch

    from tomdistill.sampling.backends import _new_token_counts

    model, tokenizer = backend.model, backend.tokenizer
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    new_tokens = 0
    for prompt, seeds in zip(prompts, seeds_per_prompt):
        for seed in seeds:
            encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            torch.manual_seed(seed)
            with torch.no_grad():
                output = model.generate(
                    **encoded, do_sample=True, temperature=settings.temperature, top_k=0, top_p=settings.top_p,
                    repetition_penalty=settings.repetition_penalty, max_new_tokens=settings.max_new_tokens,
                    pad_token_id=backend.pad_token_id, eos_token_id=eos,
                )
            new = output[:, encoded["input_ids"].shape[1]:]
            tokenizer.batch_decode(new, skip_special_tokens=True)  # as the backend does: text is the product
            new_tokens += _new_token_counts(new, eos)[0]
    return new_tokens


def tomdistill_generate(backend, scenarios, prompts: list[str], seeds_per_prompt: list[list[int]]) -> int:
    """`HFBackend.generate` on all (scenario, n seeds) requests, as the runner passes them."""
    from tomdistill.sampling.backends import GenerationRequest

    requests = [GenerationRequest(s, p, seeds, seeds[0]) for s, p, seeds in zip(scenarios, prompts, seeds_per_prompt)]
    return sum(c.new_tokens for completions in backend.generate(requests) for c in completions)


def measure(model_name: str = "smollm2_135m", n: int = 32, naive_samples: int = 1, scenario_count: int = 20,
            repetitions: int = 3, max_new_tokens: int | None = None) -> dict:
    """Time both sides, alternating; returns {"naive": SideResult, "tomdistill": SideResult, …}."""
    overrides = {"n": n} if max_new_tokens is None else {"n": n, "max_new_tokens": max_new_tokens}
    backend, settings = hf_backend(model_name, role="student", **overrides)
    scenarios = in_sample_scenarios(scenario_count)
    prompts = [generation_prompt(backend, settings, s) for s in scenarios]
    naive = SideResult("naive generate loop", len(scenarios) * naive_samples, [], [])
    ours = SideResult("tomdistill hf backend", len(scenarios) * n, [], [])
    for repetition in range(repetitions):
        # fresh seeds each repetition; a (scenario, sample) seed is the same on both sides
        seeds = [[1_000_003 * i + 10_000 * repetition + j for j in range(n)] for i in range(len(scenarios))]
        seconds, tokens = timed(naive_loop, backend, settings, prompts, [s[:naive_samples] for s in seeds])
        naive.seconds.append(seconds)
        naive.new_tokens.append(tokens)
        seconds, tokens = timed(tomdistill_generate, backend, scenarios, prompts, seeds)
        ours.seconds.append(seconds)
        ours.new_tokens.append(tokens)
    return {"naive": naive, "tomdistill": ours, "settings": settings, "scenarios": len(scenarios),
            "ratio": ours.completions_per_s / naive.completions_per_s,
            "token_ratio": ours.new_tokens_per_s / naive.new_tokens_per_s}


def render(result: dict, title: str):
    from rich.table import Table

    table = Table(title=title)
    for column in ("side", "completions / rep", "new tokens / rep", "wall s (median)", "wall s (each rep)",
                   "completions/s", "new tokens/s"):
        table.add_column(column, justify="left" if column == "side" else "right")
    for side in (result["naive"], result["tomdistill"]):
        table.add_row(side.name, str(side.completions), f"{median(side.new_tokens):.0f}", f"{median(side.seconds):.1f}",
                      ", ".join(f"{s:.1f}" for s in side.seconds), f"{side.completions_per_s:.2f}",
                      f"{side.new_tokens_per_s:.1f}")
    table.add_row("ratio tomdistill/naive", "", "", "", "", f"{result['ratio']:.1f}×", f"{result['token_ratio']:.1f}×")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model config name")
    parser.add_argument("--n", type=int, default=32, help="samples per scenario (tomdistill side)")
    parser.add_argument("--naive-samples", type=int, default=1, help="samples per scenario timed on the naive side")
    parser.add_argument("--scenarios", type=int, default=20, help="first K in-sample scenarios")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, both sides (0 = torch default)")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    from rich.console import Console

    console = Console(width=160)
    console.print(f"machine: {machine()}")
    result = measure(args.model, args.n, args.naive_samples, args.scenarios, args.repetitions)
    s = result["settings"]
    console.print(render(result, f"Sampling {args.model} on CPU · {result['scenarios']} scenarios · student role · "
                                 f"T={s.temperature:g} · max_new_tokens={s.max_new_tokens} · n={args.n} "
                                 f"(naive: {args.naive_samples}/scenario) · median of {args.repetitions}"))
    console.print(f"machine after: {machine()}")
    print(f"headline: tomdistill/naive = {result['ratio']:.1f}x completions/s")


if __name__ == "__main__":
    main()
