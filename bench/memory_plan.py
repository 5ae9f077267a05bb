"""Memory plan: per-GPU memory of LoRA training under ZeRO-2 / ZeRO-3 / ZeRO-3 offload, and of
sharded 70b sampling, for LLaMa2-7b/13b/70b on 1, 8 and 16 GPUs.

    python -m bench.memory_plan

Model-state memory for LoRA is computed from the models' shapes (frozen bf16 base weights, bf16
LoRA weights and gradients, fp32 Adam states for the LoRA parameters only), partitioned the way
each ZeRO stage partitions them. DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_
needs_all_cold`) assume every parameter is trained: they are printed beside ours as the
full-fine-tuning reference. Activations use the standard per-layer estimate for a transformer
with gradient checkpointing (one layer's activations kept live plus one hidden state per layer).
The last line is the headline: the smallest setup that trains the 70b student on 80 GB GPUs.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class LlamaShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        kv = self.kv_heads * self.head_dim
        attention = self.hidden * (self.hidden + 2 * kv + self.hidden)
        mlp = 3 * self.hidden * self.intermediate
        return attention + mlp + 2 * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden + self.hidden

    def lora_params(self, r: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> int:
        kv = self.kv_heads * self.head_dim
        shapes = {"q_proj": (self.hidden, self.hidden), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                  "o_proj": (self.hidden, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                  "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}
        return self.layers * sum(r * (i + o) for i, o in (shapes[t] for t in targets))


LLAMA2 = [
    LlamaShape("llama2_7b", hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008),
    LlamaShape("llama2_13b", hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824),
    LlamaShape("llama2_70b", hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672),
]


def lora_model_states(shape: LlamaShape, strategy: str, gpus: int, r: int = 8) -> float:
    """Bytes per GPU for weights, LoRA gradients and optimizer states under a ZeRO strategy."""
    base = 2 * shape.params              # frozen bf16 weights
    lora = shape.lora_params(r)
    lora_weights, lora_grads, adam = 2 * lora, 2 * lora, 12 * lora  # fp32 master + m + v
    if strategy == "zero2":  # optimizer states and gradients partitioned, weights replicated
        return base + lora_weights + (lora_grads + adam) / gpus
    gathered = 2 * 2 * shape.layer_params  # ZeRO-3 gathers a layer (and prefetches the next)
    if strategy == "zero3":
        return (base + lora_weights + lora_grads + adam) / gpus + gathered
    if strategy == "zero3_offload":  # parameters and optimizer states live in CPU memory
        return lora_grads / gpus + gathered
    raise ValueError(strategy)


def activations(shape: LlamaShape, batch: int = 4, seq: int = 512) -> float:
    """bf16 activations with gradient checkpointing: one hidden state per layer + one full layer."""
    per_layer_checkpoint = 2 * batch * seq * shape.hidden
    full_layer = batch * seq * (34 * shape.hidden + 5 * shape.heads * seq)  # Korthikanti et al. 2022
    logits = 4 * batch * seq * shape.vocab
    return shape.layers * per_layer_checkpoint + full_layer + logits


def sampling_memory(shape: LlamaShape, gpus: int, batch: int = 32, tokens: int = 1200) -> float:
    """bf16 weights split over the GPUs (device_map=auto or tensor parallel) + the KV cache."""
    kv_cache = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2 * batch * tokens
    return (2 * shape.params + kv_cache) / gpus


def deepspeed_full_finetune(shape: LlamaShape, strategy: str, gpus: int) -> float | None:
    """DeepSpeed's own estimator (all parameters trained), bytes per GPU."""
    try:
        if strategy == "zero2":
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            _, gpu = estimate_zero2_model_states_mem_needs(shape.params, num_gpus_per_node=min(gpus, 8),
                                                           num_nodes=max(1, gpus // 8), cpu_offload=False)
        else:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            largest_layer = max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate)
            _, gpu, _ = estimate_zero3_model_states_mem_needs(shape.params, largest_layer,
                                                              num_gpus_per_node=min(gpus, 8),
                                                              num_nodes=max(1, gpus // 8),
                                                              cpu_offload=strategy == "zero3_offload")
        return float(gpu)
    except Exception:  # noqa: BLE001 - DeepSpeed not installed or its API moved
        return None


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    gpu_counts = (1, 8, 16)
    table = Table(title="LoRA training (r=8, q/v; batch 4 × 512 tokens, gradient checkpointing): GiB per GPU")
    table.add_column("model")
    table.add_column("params")
    table.add_column("strategy")
    for gpus in gpu_counts:
        table.add_column(f"{gpus} GPU", justify="right")
    table.add_column("DeepSpeed full-FT estimate (8 GPU)", justify="right")
    fits = []
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's estimators print their own tables
        reference = {(s.name, st): deepspeed_full_finetune(s, st, 8)
                     for s in LLAMA2 for st in ("zero2", "zero3", "zero3_offload")}
    for shape in LLAMA2:
        for strategy in ("zero2", "zero3", "zero3_offload"):
            cells = []
            for gpus in gpu_counts:
                total = lora_model_states(shape, strategy, gpus) + activations(shape)
                cells.append(f"{total / GIB:.1f}")
                if total < 78 * GIB:
                    fits.append((gpus, strategy, shape.name))
            ref = reference[(shape.name, strategy)]
            table.add_row(shape.name, f"{shape.params / 1e9:.1f}B", strategy, *cells,
                          f"{ref / GIB:.1f}" if ref else "—")
    console.print(table)
    sampling = Table(title="Sampling, bf16 weights sharded over the GPUs + KV cache (batch 32 × 1200 tokens): GiB per GPU")
    sampling.add_column("model")
    for gpus in (1, 2, 4, 8):
        sampling.add_column(f"{gpus} GPU", justify="right")
    for shape in LLAMA2:
        sampling.add_row(shape.name, *[f"{sampling_memory(shape, g) / GIB:.1f}" for g in (1, 2, 4, 8)])
    console.print(sampling)
    smallest = min((g for g, st, name in fits if name == "llama2_70b"), default=None)
    strategies = sorted({st for g, st, name in fits if name == "llama2_70b" and g == smallest})
    print(f"headline: LoRA on llama2_70b fits 78 GiB GPUs from {smallest} GPU(s) with {', '.join(strategies)}")


if __name__ == "__main__":
    main()
