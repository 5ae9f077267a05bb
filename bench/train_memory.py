"""Where a soft training step's memory goes, and what brought the demo's under 4 GB, beside today's recipe.

    python -m bench.train_memory [--model smollm2_135m] [--augment 1] [--precision fp32] [--steps 3] [--threads 1]
    python -m bench.train_memory --demo-steps 3   # also the demo's training itself (train.py +experiment=demo)
    python -m bench.train_memory --demo-steps 2 --demo-only --experiment demo_long   # demo_long's training alone

One training step (forward, backward, AdamW) of the soft loss on the demo's batch (`bench.soft_step.demo_batch`:
the 16 in-sample scenarios plus `--augment` payoff variants per game: 32 prompts at 1, the demo's step),
SmolLM2-135M-Instruct with the demo's LoRA (r16 on q, k, v, o of every layer), per setting:

| setting | suffix passes | gradient checkpointing | freed memory |
|---|---|---|---|
| today | one, padded to the longest | off | glibc's default (kept in its heap) |
| suffix passes by length | `plan_suffix_passes` | off | glibc's default |
| + freed memory returned | by length | off | returned (`return_freed_memory`) |
| + checkpointing (the demo's recipe) | by length | on, shared prefixes kept | returned |
| checkpointing, glibc's default | by length | on | glibc's default |

Memory: each setting runs in a fresh process (a peak cannot be reset in one); the table gives its peak resident
memory (ru_maxrss) after loading, after the first forward pass and after the step, and what the step holds by part
(tensors the autograd graph saves for the backward pass, by the module that saved them; parameters; AdamW's state),
the rest being transient buffers and the allocator's. Time: the settings' steps alternate in one process
(`--steps` each, the first a warm-up), their median relative to today's. `--demo-steps N` runs the demo's training
(Lightning, validation, the adapter saved) for N steps with and without checkpointing and reports each one's peak.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass

from bench.common import ROOT, machine, median, model_config, peak_rss_mib, set_threads

# glibc's default dynamic mmap threshold stops rising at 32 MB (malloc.h, DEFAULT_MMAP_THRESHOLD_MAX): the setting
# "glibc's default" restores that level when settings alternate in one process
GLIBC_DEFAULT_MAX_THRESHOLD = 32 * 2**20
MIB = 2**20


@dataclass(frozen=True)
class Setting:
    name: str
    suffix_passes: bool      # False: every suffix in one pass, padded to the longest (today's)
    checkpointing: bool
    return_freed: bool       # return_freed_memory() before the step


SETTINGS = (
    Setting("today: one suffix pass, no checkpointing", False, False, False),
    Setting("suffix passes by length", True, False, False),
    Setting("+ freed memory returned", True, False, True),
    Setting("+ checkpointing (the demo's recipe)", True, True, True),
    Setting("checkpointing, glibc's default", True, True, False),
)
TIMED = (SETTINGS[0], SETTINGS[2], SETTINGS[3])  # today, the fastest, the demo's recipe


def build(model_name: str, setting: Setting):
    """The demo's LoRA module for `setting` (seed 0)."""
    import torch

    from bench.soft_step import ATTENTION
    from tomdistill.losses import SoftLabelLoss
    from tomdistill.model.lora_module import LoRADistillModule

    torch.manual_seed(0)
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ATTENTION}
    return LoRADistillModule(model_config(model_name), lora, {"lr": 2e-3}, SoftLabelLoss(),
                             cache_dir=str(ROOT / ".cache"), gradient_checkpointing=setting.checkpointing)


def apply(setting: Setting) -> None:
    """The process-wide parts of `setting`: the suffix passes' plan and the allocator's threshold."""
    from tomdistill.model import shared_prefix
    from tomdistill.model.lora_module import MMAP_THRESHOLD_BYTES, return_freed_memory

    shared_prefix.PASS_COST_TOKENS = 128 if setting.suffix_passes else 10**9  # 10**9: never a second pass
    if setting.return_freed:
        return_freed_memory(MMAP_THRESHOLD_BYTES)


def part_of(module_name: str) -> str:
    """The part of the model a saved tensor belongs to, from the innermost module that saved it."""
    for key, part in (("lora_", "LoRA adapters' inputs"), ("mlp", "MLP (frozen)"), ("norm", "RMS norms"),
                      ("self_attn", "attention: q, key/values (prefixes' included), output")):
        if key in module_name:
            return part
    if ".layers." in module_name:
        return "checkpointed layers' inputs"
    return "embeddings, kept logits, loss"


def saved_by_part(module, run):
    """run() under a saved-tensor hook: ({part: MiB the autograd graph holds for backward}, run's result). Each
    storage counted once; parameters left out."""
    import torch

    stack: list[str] = []

    def enter(name):
        return lambda *_: stack.append(name)

    def leave(*_) -> None:  # a forward hook's return value would replace the module's output
        stack.pop()

    handles = []
    for name, sub in module.model.named_modules():
        handles += [sub.register_forward_pre_hook(enter(name)), sub.register_forward_hook(leave)]
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: set[int] = set()
    parts: Counter = Counter()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            parts[part_of(stack[-1] if stack else "")] += storage.nbytes() / MIB
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            result = run()
    finally:
        for handle in handles:
            handle.remove()
    return dict(parts), result


def child(setting: Setting, model_name: str, augment: int, precision: str, steps: int) -> dict:
    """One setting in this (fresh) process: peak RSS along the first step, what it holds by part, loss, gradient
    norm and each step's seconds."""
    import contextlib

    import torch

    from bench.soft_step import demo_batch

    batch = demo_batch(model_name, augment)
    apply(setting)
    module = build(model_name, setting)
    for parameter in module.parameters():  # read once: weights mapped from the model's file count from here on
        parameter.detach().sum()
    loaded = peak_rss_mib()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=2e-3)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    seconds, peaks = [], {}
    for step in range(max(steps, 1)):
        start = time.perf_counter()
        with autocast:
            if step == 0:
                saved, out = saved_by_part(module, lambda: module.compute_losses(batch))
                peaks["forward"] = peak_rss_mib()
            else:
                out = module.compute_losses(batch)
        out["loss"].backward()
        norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in module.parameters() if p.grad is not None))
        loss = out["loss"].item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        if step == 0:
            peaks["step"] = peak_rss_mib()
            first = {"loss": loss, "grad_norm": norm.item()}
    adapter = [p for p in module.parameters() if p.requires_grad]
    held = {"parameters (frozen model and adapter; loaded)": sum(p.numel() * p.element_size() for p in module.parameters()) / MIB,
            **saved,
            "AdamW state (the adapter's two moments)": 2 * sum(p.numel() * p.element_size() for p in adapter) / MIB}
    return {"setting": setting.name, "loaded_mib": loaded, **{f"{k}_mib": v for k, v in peaks.items()}, **first,
            "held_mib": held, "seconds": seconds, "passes": _passes(module, batch),
            "scenarios": int(batch["input_ids"].shape[0]), "tokens": int(batch["attention_mask"].sum())}


def _passes(module, batch) -> int:
    """Decoder passes a step runs (prefixes, suffixes, plain rows)."""
    import torch

    calls = []
    decoder = module.model.get_base_model().get_decoder()
    handle = decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            module.compute_losses(batch)
    finally:
        handle.remove()
    return len(calls)


def memory(model_name: str, augment: int, precision: str, threads: int, settings=SETTINGS) -> list[dict]:
    """`child` of each setting, each in a fresh `python -m bench.train_memory --child` process."""
    results = []
    for setting in settings:
        arguments = json.dumps({"setting": asdict(setting), "model_name": model_name, "augment": augment,
                                "precision": precision, "steps": 1})
        done = subprocess.run([sys.executable, "-m", "bench.train_memory", "--child", arguments, "--threads",
                               str(threads)], cwd=ROOT, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            raise RuntimeError(f"{setting.name}: exit {done.returncode}\n{done.stderr[-3000:]}")
        results.append(json.loads(lines[-1]))
    return results


def step_times(model_name: str, augment: int, precision: str, steps: int, settings=TIMED) -> dict[str, list[float]]:
    """{setting: seconds of each step}, the settings' steps alternating in this process (forward, backward)."""
    import contextlib

    import torch

    from bench.soft_step import demo_batch

    batch = demo_batch(model_name, augment)
    modules = {s: build(model_name, s) for s in settings}
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    from tomdistill.model.lora_module import return_freed_memory

    times: dict[str, list[float]] = {s.name: [] for s in settings}
    for _ in range(max(steps, 2)):
        for setting, module in modules.items():
            apply(setting)
            if not setting.return_freed:
                return_freed_memory(GLIBC_DEFAULT_MAX_THRESHOLD)
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with autocast():
                loss = module.compute_losses(batch)["loss"]
            loss.backward()
            times[setting.name].append(time.perf_counter() - start)
    return times


def demo_peaks(steps: int, experiment: str = "demo") -> dict[str, float]:
    """{run: peak RSS MiB} of an experiment's training (train.py +experiment=…, `steps` steps, validated and saved),
    with gradient checkpointing and without it (the demos' `auto` picks one by the machine's memory): each run's own
    peak (`os.wait4`: the child's rusage alone)."""
    import os

    peaks = {}
    for name, extra in (("with checkpointing", ["model.gradient_checkpointing=true"]),
                        ("without checkpointing", ["model.gradient_checkpointing=false"])):
        with tempfile.TemporaryDirectory() as output, open(f"{output}.log", "w+") as log:
            command = [sys.executable, "train.py", f"+experiment={experiment}", f"trainer.max_steps={steps}",
                       f"trainer.val_check_interval={steps}", "logger=csv", f"output={output}", *extra]
            child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(child.pid, 0)
            if os.waitstatus_to_exitcode(status):
                log.seek(0)
                raise RuntimeError(f"{' '.join(command)}: exit {os.waitstatus_to_exitcode(status)}\n{log.read()[-3000:]}")
            peaks[name] = usage.ru_maxrss / 1024  # KiB on Linux
        os.unlink(f"{output}.log")
    return peaks


def render(results: list[dict], times: dict[str, list[float]] | None):
    from rich.table import Table

    tables = []
    if results:
        first = results[0]
        title = (f"one soft training step, {first['scenarios']} prompts, {first['tokens']} tokens: peak resident MiB, "
                 "each setting in a fresh process")
        peaks = Table(title=title)
        for column in ("setting", "passes", "loaded", "after forward", "after step", "loss", "grad norm"):
            peaks.add_column(column, justify="left" if column == "setting" else "right")
        for r in results:
            peaks.add_row(r["setting"], str(r["passes"]), f"{r['loaded_mib']:.0f}", f"{r['forward_mib']:.0f}",
                          f"{r['step_mib']:.0f}", f"{r['loss']:.7f}", f"{r['grad_norm']:.7f}")
        held = Table(title="what the step holds, MiB (saved for backward: by the module that saved it)")
        held.add_column("part")
        for r in results:
            held.add_column(r["setting"], justify="right")
        parts = list(dict.fromkeys(part for r in results for part in r["held_mib"]))
        for part in parts:
            held.add_row(part, *(f"{r['held_mib'].get(part, 0.0):.0f}" for r in results))
        held.add_row("the rest: transient buffers, the allocator's free memory",
                     *(f"{r['step_mib'] - r['loaded_mib'] - sum(v for k, v in r['held_mib'].items() if 'loaded' not in k):.0f}"
                       for r in results))
        tables = [peaks, held]
    if times:
        timing = Table(title="step time (forward + backward), settings alternating in one process")
        for column in ("setting", "s / step (median)", "each step", "vs today"):
            timing.add_column(column, justify="left" if column == "setting" else "right")
        reference = median(next(iter(times.values()))[1:])
        for name, seconds in times.items():
            timing.add_row(name, f"{median(seconds[1:]):.1f}", ", ".join(f"{s:.1f}" for s in seconds),
                           f"{reference / median(seconds[1:]):.2f}×")
        tables.append(timing)
    return tables


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--augment", type=int, default=1, help="payoff variants per in-sample game (1: the demo's 32)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (the first is warm-up); 0: none")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = all cores)")
    parser.add_argument("--demo-steps", type=int, default=0, help="also the demo's training for this many steps")
    parser.add_argument("--experiment", default="demo", help="--demo-steps: the experiment trained (e.g. demo_long)")
    parser.add_argument("--demo-only", action="store_true", help="--demo-steps alone, without the step settings")
    parser.add_argument("--times-only", action="store_true", help="the step times alone, without the fresh-process peaks")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(Setting(**spec.pop("setting")), **spec)))
        return
    from rich.console import Console

    console = Console(width=160)
    console.print(machine())
    if args.times_only:
        for table in render([], step_times(args.model, args.augment, args.precision, args.steps)):
            console.print(table)
    elif not args.demo_only:
        results = memory(args.model, args.augment, args.precision, args.threads)
        times = step_times(args.model, args.augment, args.precision, args.steps) if args.steps else None
        for table in render(results, times):
            console.print(table)
    if args.demo_steps:
        for name, peak in demo_peaks(args.demo_steps, args.experiment).items():
            console.print(f"{args.experiment} training, {args.demo_steps} steps, {name}: peak {peak:.0f} MiB")


if __name__ == "__main__":
    main()
