"""`run(cfg)`: sample every scenario, shard by shard, into a datasets-loadable directory.

1. Validate the settings, load the catalogue, choose the scenarios, plan the shards.
2. Take this rank's shards (i % world_size == rank) that do not exist yet; batch them through the
   backend; parse each completion; write each shard atomically as soon as it is done.
3. Once every shard of the plan exists: write `manifest.json` (`complete: true`) and print the
   summary table. A killed run leaves no manifest; rerunning the same command resumes it.
`sample_into` does steps 2 and 3 but the printing; train.py's in-process oracle teacher (oracle_teacher.py) runs it too.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from ..model.loading import check_adapter_dir
from ..paths import run_output_dir, safe_output_dir
from ..records import load_samples, mass_warning
from ..scenarios import ANSWER_PREFIX, Scenario, catalogue_from_config, parse_action, parse_motivation, prompt_version
from .backends import Backend, GenerationRequest, backend_model_name, make_backend
from .distributed import World, setup_world
from .manifest import build_manifest, build_plan, check_or_write_plan, write_manifest
from .settings import MODEL_FREE_BACKENDS, SamplerSettings, SamplingConfigError, settings_from_config
from .shards import Shard, missing_shards, plan_shards, remove_stale_temps, shards_for_rank, write_shard
from .summary import summarise, summary_table

log = logging.getLogger(__name__)


def select_scenarios(cfg, shuffle_seed: int | None = None, answer_prefix: bool = False) -> tuple[list[Scenario], str]:
    """The configured scenarios and the prompt_version of their prompts."""
    sc = cfg.scenarios
    catalogue = catalogue_from_config(sc)
    for key, known in (("games", catalogue.games), ("contexts", catalogue.contexts)):
        wanted = sc.get(key)
        unknown = sorted(set(wanted or []) - set(known))
        if unknown:
            raise SamplingConfigError(f"scenarios.{key}: unknown {key} {unknown}; the catalogue has {sorted(known)}")
    splits = sc.get("splits")
    scenarios = catalogue.scenarios(
        list(splits) if splits is not None else None,
        list(sc.games) if sc.get("games") else None,
        list(sc.contexts) if sc.get("contexts") else None,
    )
    excluded = list(sc.get("exclude") or [])
    if excluded:  # scenarios a dataset to compare with lacks (a recorded teacher's), left out of every split
        selected = {f"{s.game.name}/{s.context.name}" for s in catalogue.scenarios(None)}
        unknown = [pair for pair in excluded if pair not in selected]
        if unknown:
            raise SamplingConfigError(f"scenarios.exclude: {unknown} are no scenario of the catalogue; expected "
                                      "game/context pairs such as public_goods/athletes")
        scenarios = [s for s in scenarios if f"{s.game.name}/{s.context.name}" not in set(excluded)]
    if not scenarios:
        raise SamplingConfigError(
            f"scenarios: the filters (splits={list(splits or [])}, games={sc.get('games')}, "
            f"contexts={sc.get('contexts')}) select no scenario"
        )
    return scenarios, prompt_version(catalogue, shuffle_seed, answer_prefix)


def resolve_output_dir(cfg, world: World) -> Path:
    """`output`, else the Hydra run directory (rank 0's, shared with the other ranks)."""
    output = cfg.get("output")
    if output is None:
        if world.world_size > 1 and not world.connected:
            raise SamplingConfigError(
                "output: set output=DIR when several ranks run without torch.distributed "
                "(each would otherwise write to its own Hydra run directory)"
            )
        if world.is_main:  # every rank writes where rank 0's Hydra run directory is
            output = str(run_output_dir(None))
        directory = safe_output_dir(world.broadcast(output))
    else:
        directory = run_output_dir(output)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def resolved_config(cfg, output_dir: Path) -> dict:
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)) if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    cfg.output = str(output_dir)
    if "paths" in cfg and "output_dir" in cfg.paths:
        try:
            cfg.paths.output_dir = str(cfg.paths.output_dir)
        except Exception:  # noqa: BLE001 - ${hydra:...} outside a Hydra app
            cfg.paths.output_dir = str(output_dir)
    return OmegaConf.to_container(cfg, resolve=True)


def prefilled(settings: SamplerSettings) -> bool:
    """Language-model backends start the assistant turn with `Answer:` (as score mode and the
    training targets do), so a small model answers in the format instead of chatting."""
    return settings.answer_prefill and settings.mode == "generate" and settings.backend not in MODEL_FREE_BACKENDS


def elicits_with_answer_prefix(settings: SamplerSettings) -> bool:
    """Whether the model's answer follows a given `Answer:` (score mode always; generation when prefilled)."""
    return settings.mode == "score" or prefilled(settings)


def shuffle_seed_of(cfg, settings: SamplerSettings) -> int | None:
    return settings.seed if cfg.scenarios.get("shuffle_outcomes") else None


def generation_records(backend: Backend, settings: SamplerSettings, shard: Shard, prompt: str,
                       completions, version: str, model: str) -> list[dict]:
    scenario = shard.scenario
    records = []
    for index, completion in zip(shard.indices, completions):
        text = completion.text
        if prefilled(settings):  # the model continued after "Answer:"; record the whole turn
            text = f"{ANSWER_PREFIX} {text}"
        # a recorded answer (sampling/recorded.py) comes parsed, its motivation perhaps recorded beside it
        action, motivation = getattr(completion, "action", None), getattr(completion, "motivation", None)
        records.append(_record(scenario, settings, model, version, index, prompt, text,
                               parse_action(text, scenario.game) if action is None else action,
                               ("" if settings.role != "teacher" else
                                parse_motivation(text) if motivation is None else motivation)))
    return records


def _record(scenario: Scenario, settings: SamplerSettings, model: str, version: str, index: int, prompt: str,
            completion: str, action: str, motivation: str, action_probs: str = "", action_mass: float = math.nan):
    return {
        "model": model, "role": settings.role, "game": scenario.game.name, "context": scenario.context.name,
        "split": scenario.split, "sample_index": index, "seed": settings.seed, "prompt_version": version,
        "prompt": prompt, "completion": completion, "action": action, "motivation": motivation,
        "action_probs": action_probs, "action_mass": action_mass,
    }


class _Progress:
    """A rich progress bar: samples, scenarios finished, generated tokens per second."""

    def __init__(self, shards: list[Shard], pending: list[Shard], world: World, enabled: bool, label: str):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.remaining = Counter(s.scenario.id for s in pending)
        self.scenarios_total = len({s.scenario.id for s in shards})
        self.tokens = 0
        self.started = time.perf_counter()
        rank = f"rank {world.rank}/{world.world_size} " if world.world_size > 1 else ""
        self.progress = Progress(
            SpinnerColumn(), TextColumn(f"{rank}{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
            TextColumn("· {task.fields[scenarios]} scenarios · {task.fields[rate]} tok/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
        )
        self.task = self.progress.add_task(
            "sampling", total=sum(s.count for s in pending), scenarios=self._scenarios(), rate="—")

    def _scenarios(self) -> str:
        return f"{self.scenarios_total - len(+self.remaining)}/{self.scenarios_total}"

    def shard_done(self, shard: Shard, tokens: int) -> None:
        self.remaining[shard.scenario.id] -= 1
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=shard.count, scenarios=self._scenarios(),
                             rate=f"{rate:.0f}" if self.tokens else "—")  # score mode generates none

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def _batches(pending: list[Shard], settings: SamplerSettings) -> list[list[Shard]]:
    """Shards per backend call: about `batch_size` samples (score mode: `score_batch_size` scenarios)."""
    limit = settings.batch_size if settings.mode == "generate" else settings.score_batch_size
    batches, current, rows = [], [], 0
    for shard in pending:
        if current and rows + shard.count > limit:
            batches.append(current)
            current, rows = [], 0
        current.append(shard)
        rows += shard.count
    if current:
        batches.append(current)
    return batches


def sampled_shards(backend: Backend, settings: SamplerSettings, pending: list[Shard],
                   version: str) -> Iterator[tuple[Shard, list[dict], int]]:
    """Each of `pending` with its records and the tokens generated for it, one backend call per batch."""
    prompts: dict[str, str] = {}
    for batch in _batches(pending, settings):
        for shard in batch:
            if shard.scenario.id not in prompts:
                prompts[shard.scenario.id] = backend.prompt(shard.scenario) + (
                    ANSWER_PREFIX if prefilled(settings) else "")
        if settings.mode == "generate":
            requests = [GenerationRequest(s.scenario, prompts[s.scenario.id], s.sample_seeds(settings.seed),
                                          s.shard_seed(settings.seed), list(s.indices)) for s in batch]
            outputs = backend.generate(requests)
            for shard, completions in zip(batch, outputs):
                records = generation_records(backend, settings, shard, prompts[shard.scenario.id], completions,
                                             version, backend.name)
                yield shard, records, sum(c.new_tokens for c in completions)
        else:
            for shard, scored in zip(batch, backend.score([s.scenario for s in batch])):
                problem = mass_warning(shard.scenario.id, scored.mass)
                if problem:
                    log.warning("action mass: %s", problem)
                best = max(scored.probs, key=scored.probs.get)
                record = _record(shard.scenario, settings, backend.name, version, 0, scored.prompt,
                                 ANSWER_PREFIX, best, "", json.dumps(scored.probs), float(scored.mass))
                yield shard, [record], 0  # score mode generates no token


def sample_shards(backend: Backend, settings: SamplerSettings, pending: list[Shard], output_dir: Path,
                  version: str, progress: _Progress) -> list[str]:
    """Sample and write `pending`, each shard as soon as its batch is done; the names of the shards written."""
    written = []
    for shard, records, tokens in sampled_shards(backend, settings, pending, version):
        write_shard(output_dir, shard, records)
        written.append(shard.filename)
        progress.shard_done(shard, tokens)
    return written


def run(cfg) -> Path:
    """Sample the configured scenarios into `output` (default: the Hydra run directory); return it."""
    settings = settings_from_config(cfg)
    shuffle_seed = shuffle_seed_of(cfg, settings)
    scenarios, version = select_scenarios(cfg, shuffle_seed, elicits_with_answer_prefix(settings))
    if settings.backend == "recorded":  # the scenarios the recording covers, and `n` as recorded when not given
        from .recorded import serve_recording

        settings, scenarios = serve_recording(cfg, settings, scenarios)
    # vLLM builds its own tensor-parallel process group: its ranks share only the output directory
    world = setup_world(connect=settings.backend != "vllm")
    try:
        output_dir = resolve_output_dir(cfg, world)
        model = backend_model_name(cfg, settings)
        finished = sample_into(
            output_dir, settings, scenarios, version, model, world,
            open_backend=lambda: make_backend(cfg, settings, shuffle_seed, world.local_rank,
                                              OmegaConf.select(cfg, "paths.cache_dir", default=None), world.world_size),
            config=resolved_config(cfg, output_dir))
        if finished is not None:
            print_summary(settings, model, output_dir, *finished)
    finally:
        world.close()
    return output_dir


def sample_into(output_dir: Path, settings: SamplerSettings, scenarios: list[Scenario], version: str, model: str,
                world: World, open_backend: Callable[[], Backend], config: dict) -> tuple[dict, list] | None:
    """Sample this rank's missing shards of `scenarios` into `output_dir`; once every shard exists, write the
    manifest (`config`: what the run was given). Returns the manifest and the per-scenario summaries where this
    process wrote the manifest, else None. `open_backend` is only called when a shard is missing."""
    plan = plan_shards(scenarios, settings.samples_per_scenario, settings.shard_size)
    if settings.adapter:  # a wrong adapter is refused before plan.json pins the directory to it
        check_adapter_dir(settings.adapter, model)
    check_or_write_plan(output_dir, build_plan(settings, model, version, [s.id for s in scenarios]))
    mine = shards_for_rank(plan, world.rank, world.world_size)
    pending = missing_shards(output_dir, mine)
    written: list[str] = []
    if pending:
        backend = open_backend()
        label = f"{model} · {settings.mode} · {settings.role}"
        try:
            with _Progress(mine, pending, world, settings.progress, label) as progress:
                written = sample_shards(backend, settings, pending, output_dir, version, progress)
        finally:
            backend.close()
    world.barrier()
    written_by_rank = world.all_gather(written)
    missing = missing_shards(output_dir, plan)
    if missing:
        if world.is_main or not world.connected:
            print(f"{len(plan) - len(missing)} of {len(plan)} shards in {output_dir}; {len(missing)} still missing "
                  "(other ranks still running, or a crash): rerun the same command to resume.")
        return None
    finished = None
    if world.is_main or not world.connected:
        finished = finish(config, settings, scenarios, model, version, plan, output_dir, world, written_by_rank)
    world.barrier()
    return finished


def finish(config, settings, scenarios, model, version, plan, output_dir, world, written_by_rank) -> tuple[dict, list]:
    """Every shard exists: summarise and write the manifest; return it and the summaries."""
    remove_stale_temps(output_dir)
    dataset = load_samples(output_dir, name=f"{settings.role} samples")
    amount_games = {s.game.name for s in scenarios if s.game.kind == "public_goods"}
    order = {s.id: i for i, s in enumerate(scenarios)}  # catalogue order, not file order
    summaries = sorted(summarise(dataset, settings.mode, amount_games), key=lambda s: order.get(s.id, len(order)))
    manifest = build_manifest(
        config=config, settings=settings, model=model, prompt_version=version,
        summaries=summaries, shard_count=len(plan), world_size=world.world_size, written_by_rank=written_by_rank,
    )
    write_manifest(output_dir, manifest)
    return manifest, summaries


def print_summary(settings: SamplerSettings, model: str, output_dir: Path, manifest: dict, summaries: list) -> None:
    """The summary table of a finished directory, on the console."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for a row of nine contexts
        console = Console(width=max(console.width, 140))
    console.print(summary_table(summaries, f"{model} · {settings.role} · {settings.mode} · "
                                           f"{manifest['records']} records"))
    if manifest["unparsed"]:
        console.print(f"[red]{manifest['unparsed']} unparsed answer(s)[/red] kept with action='unparsed'.")
    console.print(f"samples: {output_dir}")
