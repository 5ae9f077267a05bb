"""The soft-label training step, seven ways, side by side: what made the demo's training affordable.

    python -m bench.soft_step [--model smollm2_135m] [--steps 3] [--threads 0] [--top-layers 15] [--augment K]

One optimizer-free training step (forward + backward of the soft loss) on the demo's full batch:
the 16 in-sample scenarios of four contexts (the oracle teacher's exact choice probabilities;
`business` held out as in the demo), plus with `--augment K` the K payoff variants per game
(`scenarios.augment.variants`), SmolLM2-135M-Instruct with LoRA r16.

| setting | precision | LoRA on | frozen-layer cache | shared prompt prefixes |
|---|---|---|---|---|
| fp32, every layer (session-1 recipe) | fp32 | all linear, all layers | — | off |
| bf16, every layer (the demo until 2026-12-01) | bf16 autocast | all linear, all layers | — | off |
| bf16, top k, recomputed | bf16 autocast | all linear, top k layers | off: the frozen layers run every step | off |
| bf16, top k, cached | bf16 autocast | all linear, top k layers | on: the frozen layers ran once | off |
| bf16, attention, every layer | bf16 autocast | q, k, v, o of all layers | — | off (one pass per length) |
| bf16, attention, shared prefixes (the demo's recipe) | bf16 autocast | q, k, v, o of all layers | — | on: run once per group |
| fp32, attention, shared prefixes | fp32 | q, k, v, o of all layers | — | on: run once per group |

Each setting builds its module from the same seed and runs `--steps` steps on the same batch; the
first (warm-up, and the cache fill) is left out of the median. Settings alternate in one process.
Last lines: each setting's step time relative to the fp32 every-layer step. bf16 autocast needs a
CPU with AVX512-BF16 or AMX to be fast (emulated elsewhere); the machine line says which CPU ran.
"""
from __future__ import annotations

import argparse
import time

from bench.common import ROOT, machine, median, model_config, oracle_config, set_threads


def demo_batch(model_name: str, augment: int = 0):
    """The demo's soft-loss training batch (all training scenarios) and the datamodule behind it."""
    from tomdistill import CATALOGUE_DIR
    from tomdistill.data.datamodule import TeacherQADataModule
    from tomdistill.losses import SoftLabelLoss
    from tomdistill.model.loading import load_tokenizer
    from tomdistill.scenarios import load_catalogue
    from tomdistill.training import oracle_teacher_directories

    catalogue = load_catalogue(CATALOGUE_DIR, augment={"variants": augment})
    splits = ["in_sample", "augment"] if augment else ["in_sample"]
    cache = ROOT / ".cache"
    tokenizer = load_tokenizer(model_config(model_name), cache, padding_side="right")
    # data.teacher=null: train.py's in-process oracle teacher, sampled by the recipe before the datamodule reads it
    loss = SoftLabelLoss()
    teacher = oracle_teacher_directories(catalogue, loss.target_kind().teacher_modes, oracle_config(n=2), cache)
    datamodule = TeacherQADataModule(teacher["teacher"], tokenizer, catalogue, teacher_probs=teacher["teacher_probs"],
                                     target_kind=loss.target_kind(), num_val_contexts=1, cache_dir=cache, splits=splits)
    datamodule.setup("fit")
    collate = datamodule._collator()
    return collate([datamodule.train_set[i] for i in range(len(datamodule.train_set))])


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def step_seconds(model_name: str, batch: dict, precision: str, top_layers: int | None, cache: bool,
                 steps: int, targets="all-linear", shared_prefix: bool = False) -> list[float]:
    import contextlib

    import torch

    from tomdistill.model.lora_module import LoRADistillModule
    from tomdistill.losses import SoftLabelLoss

    torch.manual_seed(0)
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": targets, "top_layers": top_layers,
            "cache_frozen_layers": cache}
    module = LoRADistillModule(model_config(model_name), lora, {"lr": 2e-3}, SoftLabelLoss(),
                               cache_dir=str(ROOT / ".cache"), shared_prefix=shared_prefix)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    times = []
    for _ in range(steps):
        module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with autocast():
            loss = module.compute_losses(batch)["loss"]
        loss.backward()
        times.append(time.perf_counter() - start)
    return times


def measure(model_name: str, steps: int = 3, top_layers: int = 15, augment: int = 0) -> dict:
    """{setting: median seconds per step} over the seven settings, plus the batch's shape."""
    batch = demo_batch(model_name, augment)
    k = top_layers
    settings = [  # name, precision, top layers, frozen-layer cache, adapted modules, shared prefixes
        ("fp32, every layer (session-1 recipe)", "fp32", None, False, "all-linear", False),
        ("bf16, every layer (the demo until 2026-12-01)", "bf16", None, False, "all-linear", False),
        (f"bf16, top {k}, frozen layers recomputed", "bf16", k, False, "all-linear", False),
        (f"bf16, top {k}, frozen layers cached", "bf16", k, True, "all-linear", False),
        ("bf16, attention, every layer, one pass per length", "bf16", None, False, ATTENTION, False),
        ("bf16, attention, shared prefixes (the demo's recipe)", "bf16", None, False, ATTENTION, True),
        ("fp32, attention, shared prefixes", "fp32", None, False, ATTENTION, True),
    ]
    steps = max(steps, 2)
    seconds = {name: median(step_seconds(model_name, batch, precision, top, cache, steps, targets, shared)[1:])
               for name, precision, top, cache, targets, shared in settings}
    return {"seconds": seconds, "scenarios": int(batch["input_ids"].shape[0]),
            "tokens": int(batch["attention_mask"].sum()), "timed_steps": steps - 1, "model": model_name}


def render(result: dict):
    from rich.table import Table

    table = Table(title=f"soft-label step, {result['scenarios']} scenarios, {result['tokens']} tokens "
                        f"({result['model']}); median of {result['timed_steps']} step(s) after a warm-up")
    for column in ("setting", "s / step", "tokens / s", "vs fp32 every layer"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    reference = next(iter(result["seconds"].values()))
    for name, seconds in result["seconds"].items():
        table.add_row(name, f"{seconds:.2f}", f"{result['tokens'] / seconds:.0f}", f"{reference / seconds:.2f}×")
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=3, help="steps per setting (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--top-layers", type=int, default=15)
    parser.add_argument("--augment", type=int, default=0, help="payoff variants per in-sample game (K)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    from rich.console import Console

    result = measure(args.model, args.steps, args.top_layers, args.augment)
    console = Console(width=120)
    console.print(machine())
    console.print(render(result))


if __name__ == "__main__":
    main()
