"""Training throughput: tomdistill's Lightning + LoRA path vs TRL's `SFTTrainer`.

    python -m bench.train_throughput [--steps 6] [--repetitions 2] [--batch-size 8] [--threads 1]

Both sides fine-tune SmolLM2-135M-Instruct on CPU (fp32) with the same peft `LoraConfig` (the one
tomdistill builds from conf/train.yaml: r=16, alpha=32, all linear layers; TRL receives a copy of
it), on the same teacher Q&A examples (the oracle teacher's 16 answers + motivations for each of
the 20 in-sample scenarios, data.target=answer_motivation), with completion-only loss, the same
micro-batch (8), the same sequence limit (512 tokens), AdamW at lr 2e-3 with gradient clipping 1.0,
no gradient checkpointing, no checkpoint saving, and the same number of optimizer steps.

- tomdistill: `TeacherQADataModule` (loss=sft: length-grouped batches, prompt masked out) and
  `LoRADistillModule` (only the answer positions are projected onto the vocabulary) in a
  Lightning `Trainer`, as train.py builds them (minus checkpoints and loggers).
- TRL: `SFTTrainer` on conversational prompt/completion records (completion-only loss, TRL's
  defaults otherwise: random batches padded to the longest).

Measured per optimizer step (from the step's start to its end, data loading outside), over
every step but each run's first (warm-up): useful tokens/s, where useful = tokens with a label
(not padding, not the masked prompt); the padding fraction of the batches; and the peak RSS of
the process while the side trains (psutil, sampled every 20 ms), beside its growth over the run.
Runs alternate (tomdistill, TRL, tomdistill, …); the table shows medians. Last line: the ratio of
useful tokens/s.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ROOT, machine, median, model_config, oracle_config, set_threads

IGNORE_INDEX = -100
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}      # conf/train.yaml model.lora
OPTIM = {"lr": 2.0e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_ratio": 0.05, "scheduler": "cosine"}


@dataclass
class BatchStats:
    useful: int      # label tokens (completion, not padding)
    real: int        # non-padding tokens
    padded: int      # batch × width


@dataclass
class RunResult:
    step_seconds: list[float] = field(default_factory=list)
    batches: list[BatchStats] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    rss_growth_mib: float = 0.0

    def steady(self) -> tuple[list[float], list[BatchStats]]:
        """Every step but the first (warm-up: lazy allocations, optimizer state)."""
        n = len(self.step_seconds)
        return self.step_seconds[1:n], self.batches[1:n]

    @property
    def useful_tokens_per_s(self) -> float:
        seconds, batches = self.steady()
        return sum(b.useful for b in batches) / sum(seconds)

    @property
    def padding_fraction(self) -> float:
        _, batches = self.steady()
        return 1 - sum(b.real for b in batches) / sum(b.padded for b in batches)


class PeakRSS:
    """Peak resident memory of this process while the block runs (a sampling thread)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def stats_of(labels, attention_mask) -> BatchStats:
    return BatchStats(int((labels != IGNORE_INDEX).sum()), int(attention_mask.sum()), int(attention_mask.numel()))


# ------------------------------------------------------------------------------------ the data
def teacher_data(model_name: str, cache_dir: Path, samples_per_scenario: int):
    """The oracle teacher's in-sample answers + motivations (a samples directory) and the catalogue."""
    from tomdistill import CATALOGUE_DIR
    from tomdistill.sampling.oracle_teacher import oracle_teacher
    from tomdistill.scenarios import load_catalogue

    catalogue = load_catalogue(CATALOGUE_DIR)
    teacher = oracle_teacher(catalogue, cache_dir, oracle_config(samples_per_scenario), ("generate",))["generate"]
    return teacher, catalogue


def trl_records(teacher_dir: Path, catalogue) -> list[dict]:
    """The same examples as the datamodule's SFT rows, as TRL conversational prompt/completion records."""
    from tomdistill.records import load_samples
    from tomdistill.scenarios import UNPARSED, answer_text, build_messages

    records = []
    for row in load_samples(teacher_dir, "teacher"):
        if row["split"] != "in_sample" or row["action_probs"] not in (None, "") or row["action"] == UNPARSED:
            continue
        scenario = catalogue.scenario(row["game"], row["context"])
        records.append({"prompt": build_messages(scenario, "student"),
                        "completion": [{"role": "assistant", "content": answer_text(row["action"], row["motivation"])}]})
    return records


# ------------------------------------------------------------------------------------ tomdistill
def run_tomdistill(model_name: str, teacher_dir: Path, catalogue, steps: int, batch_size: int, max_length: int,
                   cache_dir: Path, seed: int):
    """Lightning + LoRADistillModule + TeacherQADataModule (loss=sft); returns (RunResult, LoraConfig)."""
    import pytorch_lightning as pl

    from tomdistill.data.datamodule import TeacherQADataModule
    from tomdistill.losses import SFTLoss
    from tomdistill.model.loading import load_tokenizer
    from tomdistill.model.lora_module import LoRADistillModule

    model_cfg = model_config(model_name)
    datamodule = TeacherQADataModule(
        teacher_dir, load_tokenizer(model_cfg, padding_side="right"), catalogue, splits=["in_sample"],
        target_kind=SFTLoss().target_kind(target="answer_motivation", batch_size=batch_size), num_val_contexts=0,
        max_length=max_length,
        group_by_length=True, seed=seed, cache_dir=cache_dir,
    )
    datamodule.setup("fit")
    result = RunResult()

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.started = time.perf_counter()
            result.batches.append(stats_of(batch["labels"], batch["attention_mask"]))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            result.step_seconds.append(time.perf_counter() - self.started)

    pl.seed_everything(seed, verbose=False)
    with PeakRSS() as memory:
        module = LoRADistillModule(model_cfg, LORA, OPTIM, SFTLoss(), cache_dir=None)
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, precision="32-true", max_steps=steps, gradient_clip_val=1.0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[StepTimer()],
        )
        trainer.fit(module, datamodule=datamodule)
    result.peak_rss_mib, result.rss_growth_mib = memory.peak / 2**20, (memory.peak - memory.start) / 2**20
    lora_config = copy.deepcopy(module.model.peft_config["default"])
    del trainer, module
    return result, lora_config


# ------------------------------------------------------------------------------------ TRL
def run_trl(model_name: str, records: list[dict], lora_config, steps: int, batch_size: int, max_length: int,
            seed: int) -> RunResult:
    """TRL `SFTTrainer` with the same LoraConfig, examples, micro-batch, length limit and steps."""
    import datasets
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tomdistill.model.loading import load_causal_lm, load_tokenizer

    model_cfg = model_config(model_name)
    result = RunResult()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            result.step_seconds.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as output, PeakRSS() as memory:
        config = SFTConfig(
            output_dir=output, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, max_steps=steps,
            learning_rate=OPTIM["lr"], weight_decay=OPTIM["weight_decay"], lr_scheduler_type=OPTIM["scheduler"],
            warmup_steps=OPTIM["warmup_ratio"], max_grad_norm=1.0, optim="adamw_torch",
            max_length=max_length, completion_only_loss=True, packing=False, gradient_checkpointing=False,
            use_cpu=True, bf16=False, report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
            disable_tqdm=True, seed=seed, data_seed=seed, dataloader_num_workers=0,
        )
        model = load_causal_lm(model_cfg)
        tokenizer = load_tokenizer(model_cfg, padding_side="right")
        trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=tokenizer, peft_config=copy.deepcopy(lora_config), callbacks=[StepTimer()])
        collate = trainer.data_collator

        def counting_collator(examples):  # the batches actually built (the loader may fetch one ahead)
            batch = collate(examples)
            result.batches.append(stats_of(batch["labels"], batch["attention_mask"]))
            return batch

        trainer.data_collator = counting_collator
        trainer.remove_callback(PrinterCallback)  # no log dict printed per step
        trainer.train()
    result.peak_rss_mib, result.rss_growth_mib = memory.peak / 2**20, (memory.peak - memory.start) / 2**20
    result.batches = result.batches[: len(result.step_seconds)]
    del trainer, model
    return result


# ------------------------------------------------------------------------------------ benchmark
def measure(model_name: str = "smollm2_135m", steps: int = 6, repetitions: int = 2, batch_size: int = 8,
            max_length: int = 512, samples_per_scenario: int = 16, cache_dir: Path | None = None) -> dict:
    cache_dir = Path(cache_dir or ROOT / ".cache")
    teacher_dir, catalogue = teacher_data(model_name, cache_dir, samples_per_scenario)
    records = trl_records(teacher_dir, catalogue)
    ours, theirs = [], []
    for repetition in range(repetitions):
        result, lora_config = run_tomdistill(model_name, teacher_dir, catalogue, steps, batch_size, max_length,
                                             cache_dir, seed=repetition)
        ours.append(result)
        theirs.append(run_trl(model_name, records, lora_config, steps, batch_size, max_length, seed=repetition))
    summary = {name: summarise(runs) for name, runs in (("tomdistill", ours), ("trl", theirs))}
    summary["ratio"] = summary["tomdistill"]["useful_tokens_per_s"] / summary["trl"]["useful_tokens_per_s"]
    summary.update(examples=len(records), steps=steps, repetitions=repetitions, batch_size=batch_size,
                   max_length=max_length, lora=lora_config)
    return summary


def summarise(runs: list[RunResult]) -> dict:
    steady = [run.steady() for run in runs]
    return {
        "useful_tokens_per_s": median(run.useful_tokens_per_s for run in runs),
        "step_s": median(s for seconds, _ in steady for s in seconds),
        "useful_per_step": median(b.useful for _, batches in steady for b in batches),
        "real_per_step": median(b.real for _, batches in steady for b in batches),
        "padding_fraction": median(run.padding_fraction for run in runs),
        "peak_rss_mib": max(run.peak_rss_mib for run in runs),
        "rss_growth_mib": median(run.rss_growth_mib for run in runs),
        "per_run": [f"{run.useful_tokens_per_s:.0f}" for run in runs],
    }


def render(result: dict, title: str):
    from rich.table import Table

    table = Table(title=title)
    for column in ("side", "useful tok/s (median)", "each run", "s / step", "useful tok / step", "tokens / step",
                   "padding", "peak RSS MiB", "RSS growth MiB"):
        table.add_column(column, justify="left" if column == "side" else "right")
    for name, label in (("tomdistill", "tomdistill (Lightning + LoRA)"), ("trl", "TRL SFTTrainer")):
        s = result[name]
        table.add_row(label, f"{s['useful_tokens_per_s']:.1f}", ", ".join(s["per_run"]), f"{s['step_s']:.2f}",
                      f"{s['useful_per_step']:.0f}", f"{s['real_per_step']:.0f}", f"{100 * s['padding_fraction']:.1f}%",
                      f"{s['peak_rss_mib']:.0f}", f"{s['rss_growth_mib']:.0f}")
    table.add_row("ratio tomdistill/TRL", f"{result['ratio']:.2f}×", "", "", "", "", "", "", "")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model config name")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--repetitions", type=int, default=2, help="runs per side, alternating")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    import logging
    import warnings

    from rich.console import Console

    import datasets

    warnings.filterwarnings("ignore")
    datasets.disable_progress_bars()
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "transformers", "trl", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    console = Console(width=170)
    console.print(f"machine: {machine()}")
    result = measure(args.model, args.steps, args.repetitions, args.batch_size, args.max_length)
    lora = result["lora"]
    console.print(render(result, f"LoRA SFT of {args.model} on CPU · {result['examples']} teacher examples · batch "
                                 f"{args.batch_size} · ≤{args.max_length} tokens · LoRA r={lora.r}, alpha={lora.lora_alpha:g} on "
                                 f"{len(lora.target_modules)} linear layers · {args.steps} steps × {args.repetitions} runs each"))
    console.print(f"machine after: {machine()}")
    print(f"headline: tomdistill/TRL = {result['ratio']:.2f}x useful tokens/s")


if __name__ == "__main__":
    main()
