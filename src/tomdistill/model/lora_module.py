"""`LoRADistillModule`: a causal LM with a peft LoRA adapter, trained toward the teacher.

The loss is a component (`tomdistill.losses`, built from `conf/loss/*.yaml`): it says which positions
it reads (the teacher's next tokens, the answer position or both) and computes itself from their logits.
Only the logits that a loss needs are projected onto the vocabulary (`logits_to_keep`): the
prompt's hidden states never meet the (large) output layer.

With `model.lora.top_layers=k` the layers below the adapted ones are frozen, so their output for
a given token sequence never changes: with `model.lora.cache_frozen_layers` (the default) it is
computed once per training example and reused every later epoch/step, and each step runs only the
top k layers (`FrozenLayerCache`). The first use checks the cached path against a full forward
pass and falls back to full passes (with a warning) for an architecture where they differ.

Each validation epoch: `val/alignment` of the student's exact action probabilities
(`scoring.action_logprobs`) toward the teacher on the held-out scenarios, against the base
student's (adapter disabled, computed once); and `val/action_mass`, the mass on the action tokens.
The model is built in `__init__` (not `configure_model`: under ZeRO-3 Lightning wraps that in
`deepspeed.zero.Init` and `from_pretrained` breaks).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..errors import UserError
from ..losses.base import IGNORE_INDEX
from ..metrics.transfer import alignment
from ..scoring import ScoringItem, action_distribution, action_logprobs
from .loading import ModelLoadError, load_causal_lm
from .shared_prefix import checkpointing_keeps_caches, shared_prefix_logits

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError, UserError):
    """A NaN or inf loss; the message names the rank, step and batch (train.py reports it in one line)."""



@dataclass
class ValidationScenarios:
    """What `val/alignment` needs: scoring items, the teacher's propensities, and a pad id."""

    ids: list[str]
    items: list[ScoringItem]
    teacher_propensity: list[float]
    tokenizer: Any
    batch_size: int = 16


def _plain(value):
    """OmegaConf containers to plain Python (peft and hparams want lists and dicts)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def local_rank(environ=None) -> int:
    """This process's GPU index on its node, before Lightning has set anything up.

    torchrun and Lightning's own launcher set LOCAL_RANK; under `srun` only SLURM sets SLURM_LOCALID
    (Lightning reads it later, in `trainer.fit`); neither: one process, GPU 0.
    """
    import os

    environ = os.environ if environ is None else environ
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if environ.get(name, "").strip():
            return int(environ[name])
    return 0


# model.lora.init -> peft's init_lora_weights. lora: B = 0, so the adapter starts as no change. pissa: A and B start as
# the top-r singular directions of each adapted weight and the base keeps the residual (peft rewrites it), so training
# starts with gradients on both factors. lora_ga: A and B start on the top singular directions of the loss's gradient
# for each adapted weight on the first training batch (LoRA-GA; `LoRADistillModule.start_on_the_gradient`), the base
# again keeps the residual. Both residual starts save their adapter as the equivalent plain LoRA (`residual_as_lora`).
LORA_INITS = {"lora": True, "pissa": "pissa", "lora_ga": "lora_ga"}
RESIDUAL_INITS = ("pissa", "lora_ga")
LORA_GA_START_KEY = "lora_ga_initial_adapter"  # the checkpoint's copy of LoRA-GA's starting adapter


def residual_as_lora(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A residual start's (PiSSA, LoRA-GA) adapter as a plain LoRA on the original base weights: W = W_res + B0 A0 and the tuned weight is
    W_res + B A, so the change is B A - B0 A0 = [B | -B0] [A ; A0], a rank-2r LoRA of the same scale."""
    converted = {}
    for name, value in trained.items():
        if ".lora_A." in name:
            converted[name] = torch.cat([value, initial[name].to(value)], dim=0)
        elif ".lora_B." in name:
            converted[name] = torch.cat([value, -initial[name].to(value)], dim=1)
        else:
            converted[name] = value
    return converted


# model.gradient_checkpointing=auto: on where the memory training runs in (the GPU's, else the machine's) is below
# this. The demo's step holds 2.5 GB with it and 7.6 GB without, and is 1.4x slower with it on a CPU that computes
# bf16 (bench/README.md, "Where the memory goes"): a laptop gets the small step, a larger machine the fast one.
AUTO_CHECKPOINTING_BELOW_GIB = 16


def gradient_checkpointing_for(setting, memory_bytes: int | None = None) -> bool:
    """`model.gradient_checkpointing` as a bool: true, false, or auto (true below AUTO_CHECKPOINTING_BELOW_GIB of
    `memory_bytes`, by default the training device's total memory)."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ModelLoadError(f"model.gradient_checkpointing={setting!r}: expected true, false or auto")
    if memory_bytes is None:
        memory_bytes = training_memory_bytes()
    return memory_bytes < AUTO_CHECKPOINTING_BELOW_GIB * 2**30


def training_memory_bytes() -> int:
    """The total memory of this rank's GPU where there is one, else the machine's physical memory."""
    import os

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(local_rank() % torch.cuda.device_count()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_lora_model(model_cfg: dict, lora: dict, gradient_checkpointing: bool = False, cache_dir=None):
    """The base causal LM (optionally 4-bit) with a fresh LoRA adapter; only the adapter trains."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    quantization = model_cfg.get("quantization")
    device_map = None
    if quantization == "4bit":  # bitsandbytes places the weights at load time: on this rank's own GPU
        device_map = {"": local_rank()}
    model = load_causal_lm(model_cfg, cache_dir=cache_dir, device_map=device_map)
    model.config.use_cache = False
    checkpointing_kwargs = {"use_reentrant": False}  # reentrant checkpointing + frozen embeddings = no grads
    if quantization == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing_kwargs)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        model.enable_input_require_grads()
    targets = lora.get("target_modules", "all-linear")
    layers = None
    if lora.get("top_layers"):
        # adapt only the top k decoder layers: backpropagation then stops there (the frozen lower
        # layers need no backward pass), which makes a CPU step several times cheaper
        n_layers = model.config.num_hidden_layers
        k = int(lora["top_layers"])
        if not 0 < k <= n_layers:
            raise ModelLoadError(f"model.lora.top_layers={k}: must be between 1 and the model's {n_layers} layers")
        layers = list(range(n_layers - k, n_layers))
        if targets == "all-linear":  # peft wants explicit names together with layers_to_transform
            output_layer = model.get_output_embeddings()
            targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) and module is not output_layer})
    init = lora.get("init", "lora")
    if init not in LORA_INITS:
        raise ModelLoadError(f"model.lora.init={init!r}: expected one of {'|'.join(LORA_INITS)}")
    if init in RESIDUAL_INITS and quantization:
        raise ModelLoadError(f"model.lora.init={init}: not with model.quantization={quantization} (it rewrites "
                             "the base weights it adapts, which a quantized base cannot hold exactly)")
    extra = {}
    if init == "lora_ga":  # peft starts it at B = 0 until the gradients are attached (start_on_the_gradient)
        import peft

        if not hasattr(peft, "LoraGAConfig"):  # requirements.txt allows peft releases from before LoRA-GA
            raise ModelLoadError(f"model.lora.init=lora_ga: peft {peft.__version__} has no LoRA-GA (LoraGAConfig); "
                                 "install a peft that has it (0.21 is tested) or choose model.lora.init=lora|pissa")
        extra["lora_ga_config"] = peft.LoraGAConfig()
    config = LoraConfig(
        r=int(lora.get("r", 16)), lora_alpha=float(lora.get("alpha", 32)), lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else list(targets), bias="none", task_type="CAUSAL_LM",
        layers_to_transform=layers, use_rslora=bool(lora.get("use_rslora", False)), init_lora_weights=LORA_INITS[init],
        **extra,
    )
    if not isinstance(targets, str):
        # checked here, not by peft after it has wrapped half the model: one line naming the key and the choices
        # (the output layer counts: "all-linear" leaves it out, but naming it adapts it)
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        unknown = sorted(set(targets) - set(linear))
        if unknown:
            raise ModelLoadError(f"model.lora.target_modules: {unknown} name no linear module of this model; "
                                 f"expected all-linear or some of {linear}")
    model = get_peft_model(model, config)
    model.train()  # from_pretrained returns eval mode; Lightning does not switch submodules back
    return model


# glibc's malloc serves a block below its mmap threshold (which it raises up to 32 MB as large blocks are freed) from
# its heap, where freed activations stay resident: ~2 GB of the demo's checkpointed step (bench/README.md, "Where the
# memory goes"). At 4 MB every activation of a layer is mapped on its own and returned to the OS when freed.
MMAP_THRESHOLD_BYTES = 4 * 2**20


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have the C library map every block of `threshold` bytes or more on its own, so that freeing it returns it to
    the OS (glibc's mallopt M_MMAP_THRESHOLD, process-wide); False where the C library has no mallopt."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return False
    return bool(mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD (malloc.h)


def _native_mask_slicing() -> bool:
    """Whether transformers projects only the True positions of a boolean 2-D `logits_to_keep` (5.21 and later;
    older versions raise IndexError on it)."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__.split("+")[0]) >= Version("5.21")


NATIVE_MASK_SLICING = _native_mask_slicing()


def kept_logits(model, keep: torch.Tensor, **inputs) -> torch.Tensor:
    """(kept positions, vocab): the logits of the True positions of the boolean mask `keep` (batch, length),
    row-major, as `model(**inputs, logits_to_keep=keep).logits` gives them on transformers ≥ 5.21. On older
    versions the decoder's hidden states are sliced and projected here, the same computation."""
    if NATIVE_MASK_SLICING:
        return model(**inputs, logits_to_keep=keep).logits
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(**inputs).last_hidden_state
    return base.get_output_embeddings()(hidden[keep])


class _Captured(Exception):
    """Stops a forward pass once the input of the first adapted layer has been captured."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


class FrozenLayerCache:
    """The input of the first adapted decoder layer, per token sequence (exact: the layers below are frozen).

    `logits(model, input_ids, attention_mask, keep)` returns what
    `model(input_ids, attention_mask, logits_to_keep=keep).logits` returns, running only the layers
    from `first_layer` up on cached hidden states (computed without gradients on first sight of a
    sequence). Works for decoders whose layer stack is `get_decoder().layers` and whose forward accepts
    `inputs_embeds` unchanged (Llama, Mistral, Qwen2, ...); `verify` checks that once.
    """

    def __init__(self, first_layer: int, max_bytes: int):
        self.first_layer, self.max_bytes = first_layer, max_bytes
        self.entries: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0
        self.verified: bool | None = None  # None: not checked yet

    @staticmethod
    def _decoder(model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.get_decoder()

    @torch.no_grad()
    def _lower(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        layer = self._decoder(model).layers[self.first_layer]

        def capture(_module, args, kwargs):
            raise _Captured(args[0] if args else kwargs["hidden_states"])

        handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
        except _Captured as captured:
            return captured.hidden.detach()
        finally:
            handle.remove()
        raise RuntimeError("the first adapted layer never ran")  # pragma: no cover

    def hidden(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, width, d): the first adapted layer's input, cached rows reused, new rows computed."""
        lengths = attention_mask.sum(-1).tolist()
        keys = [input_ids[r, :n].cpu().numpy().tobytes() for r, n in enumerate(lengths)]
        missing = [r for r, k in enumerate(keys) if k not in self.entries]
        computed = {}
        if missing:
            self.misses += len(missing)
            rows = torch.tensor(missing, device=input_ids.device)
            lower = self._lower(model, input_ids[rows], attention_mask[rows])
            for i, r in enumerate(missing):
                computed[keys[r]] = lower[i, : lengths[r]]
                size = computed[keys[r]].numel() * computed[keys[r]].element_size()
                if self.bytes + size <= self.max_bytes:
                    self.entries[keys[r]] = computed[keys[r]]
                    self.bytes += size
        self.hits += len(keys) - len(missing)
        rows = [self.entries.get(k, computed.get(k)) for k in keys]
        out = rows[0].new_zeros((len(rows), input_ids.shape[1], rows[0].shape[-1]))
        for r, h in enumerate(rows):
            out[r, : h.shape[0]] = h
        return out

    def logits(self, model, input_ids, attention_mask, keep) -> torch.Tensor:
        hidden = self.hidden(model, input_ids, attention_mask)
        decoder = self._decoder(model)
        layers = decoder.layers
        decoder.layers = torch.nn.ModuleList(list(layers)[self.first_layer:])  # only the adapted layers run
        try:
            return kept_logits(model, keep, inputs_embeds=hidden, attention_mask=attention_mask)
        finally:
            decoder.layers = layers

    def verify(self, model, input_ids, attention_mask, keep, tolerance: float = 1e-3) -> bool:
        """Whether the cached path gives the full forward pass's logits (checked once, on one row)."""
        if self.verified is None:
            with torch.no_grad():
                row = slice(0, 1)
                full = kept_logits(model, keep[row], input_ids=input_ids[row], attention_mask=attention_mask[row])
                cached = self.logits(model, input_ids[row], attention_mask[row], keep[row])
            difference = (full.float() - cached.float()).abs().max().item() if full.numel() else 0.0
            self.verified = full.shape == cached.shape and difference <= tolerance * max(1.0, full.abs().max().item())
            if not self.verified:
                log.warning("model.lora.cache_frozen_layers: the cached path differs from a full forward pass by %.3g "
                            "for this architecture; running full forward passes instead", difference)
            self.entries.clear()
            self.bytes = self.hits = self.misses = 0
        return self.verified


class LoRADistillModule(pl.LightningModule):
    def __init__(
        self,
        model_cfg: dict,
        lora: dict,
        optim: dict,
        loss,
        gradient_checkpointing: bool | str = False,
        cache_dir: str | None = None,
        validation: ValidationScenarios | None = None,
        shared_prefix: bool = True,
    ):
        super().__init__()
        model_cfg, lora, optim = (_plain(x) for x in (model_cfg, lora, optim))
        resolved = gradient_checkpointing_for(gradient_checkpointing)
        if gradient_checkpointing == "auto":
            log.info("model.gradient_checkpointing=auto: %s (on below %d GiB of the training device's memory)",
                     "on" if resolved else "off", AUTO_CHECKPOINTING_BELOW_GIB)
        gradient_checkpointing = resolved
        # configs only: never a model object (docs/design.md, "Optimizer parameters and hyperparameters")
        self.save_hyperparameters({"model_cfg": model_cfg, "lora": lora, "optim": optim, "loss": loss.hparams(),
                                   "gradient_checkpointing": gradient_checkpointing})
        self.model = build_lora_model(model_cfg, lora, gradient_checkpointing, cache_dir)
        self.lora_init = lora.get("init", "lora")
        # a residual start's adapter: the base model is the base weights plus it (base_weights, save_adapter). PiSSA's
        # is deterministic and recomputed on resume; LoRA-GA's depends on the data and travels in the checkpoint
        self.initial_adapter: dict[str, torch.Tensor] | None = None
        if self.lora_init == "pissa":
            self.initial_adapter = self._adapter_copy()
        self.loss = loss  # a tomdistill.losses.DistillationLoss
        self.target_kind = loss.target_kind()  # which logits it reads and how its inputs are filled (data/targets/)
        self.optim_cfg = optim
        self.validation = validation
        self.strict_loading = False  # checkpoints hold the adapter only (see on_save_checkpoint)
        vocab = self.model.get_input_embeddings().num_embeddings
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes=vocab, average="micro", ignore_index=IGNORE_INDEX, validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes=vocab, average="micro", ignore_index=IGNORE_INDEX, validate_args=False)
        self._base_propensity: list[float] | None = None
        self._batch_start = 0.0
        # ZeRO-3 gathers each layer's weights collectively in every forward pass: every rank must run as many
        # forward passes as every other, so a soft batch runs padded in one pass there (on_fit_start)
        self._one_forward_per_batch = False
        # a batch's common prompt prefixes run once (model/shared_prefix.py), under gradient checkpointing too where
        # transformers lets a checkpointed layer keep the key/value cache that carries them (else full passes)
        self.shared_prefix = bool(shared_prefix) and (not gradient_checkpointing or checkpointing_keeps_caches())
        self.frozen_cache: FrozenLayerCache | None = None
        if lora.get("top_layers") and lora.get("cache_frozen_layers", True):
            first = self.model.get_base_model().config.num_hidden_layers - int(lora["top_layers"])
            if first > 0:
                self.frozen_cache = FrozenLayerCache(first, int(float(lora.get("cache_max_mb", 2048)) * 2**20))

    # ---------------------------------------------------------------- losses
    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Forward once, keeping the logits of the positions the loss reads (its kind of target says which and fills
        its inputs: data/targets/); return its total and parts (plus accuracy inputs where it reads next tokens)."""
        kind = self.target_kind
        keep = kind.positions(batch)
        if self.shared_prefix and self.frozen_cache is None and not self._one_forward_per_batch:
            logits = shared_prefix_logits(kept_logits, self.model, keep, batch["input_ids"], batch["attention_mask"])
        elif kind.one_prompt_per_scenario and not self._one_forward_per_batch:  # few lengths
            logits = self._logits_by_length(batch["input_ids"], batch["attention_mask"], keep)
        else:
            logits = self._logits(batch["input_ids"], batch["attention_mask"], keep)  # (kept positions, vocab), row-major
        inputs = kind.loss_inputs(batch, logits, keep)
        out = self.loss(inputs)
        out.update(kind.accuracy_inputs(inputs, logits))
        return out

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        cache = self.frozen_cache
        if cache is not None and cache.verify(self.model, input_ids, attention_mask, keep):
            return cache.logits(self.model, input_ids, attention_mask, keep)
        return kept_logits(self.model, keep, input_ids=input_ids, attention_mask=attention_mask)

    def _logits_by_length(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """`_logits` run once per distinct sequence length, each on unpadded rows (a soft-loss batch holds a
        few prompt lengths: padding them to the longest wasted ~12% of the demo's compute). The number of
        passes depends on the batch, so not under ZeRO-3 (`_one_forward_per_batch`)."""
        lengths = attention_mask.sum(-1)
        distinct = lengths.unique()
        if len(distinct) == 1:
            width = int(distinct[0])
            return self._logits(input_ids[:, :width], attention_mask[:, :width], keep[:, :width])
        kept_rows = keep.nonzero(as_tuple=True)[0]
        out = None
        for width in distinct.tolist():
            rows = (lengths == width).nonzero(as_tuple=True)[0]  # ascending: the kept order matches the full batch's
            part = self._logits(input_ids[rows, :width], attention_mask[rows, :width], keep[rows, :width])
            if out is None:
                out = part.new_empty((len(kept_rows), part.shape[-1]))
            out[torch.isin(kept_rows, rows)] = part
        return out

    def on_fit_start(self) -> None:
        return_freed_memory()
        self._one_forward_per_batch = bool(getattr(self.trainer.strategy, "zero_stage_3", False))
        from pytorch_lightning.strategies import DeepSpeedStrategy

        if self.lora_init in RESIDUAL_INITS and isinstance(self.trainer.strategy, DeepSpeedStrategy):
            # base_weights copies whole adapter tensors in and out, which ZeRO's partitioned parameters are not
            raise ModelLoadError(f"model.lora.init={self.lora_init}: not under DeepSpeed (trainer.strategy); use ddp "
                                 "or model.lora.init=lora")
        if self.frozen_cache is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy):
            # ZeRO partitions the layers' weights: the cached path's direct layer calls are not set up for that
            log.info("model.lora.cache_frozen_layers: off under %s", type(self.trainer.strategy).__name__)
            self.frozen_cache = None

    def on_train_start(self) -> None:
        if self.lora_init == "lora_ga" and self.initial_adapter is None:  # a resumed run's came with its checkpoint
            batch = next(iter(self.trainer.datamodule.train_dataloader()))  # its own loader: the run's order is kept
            self.start_on_the_gradient(self.trainer.strategy.batch_to_device(batch))

    def _adapter_copy(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu").clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _lora_layers(self) -> list:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def start_on_the_gradient(self, batch: dict) -> None:
        """LoRA-GA: the loss's gradient for each adapted weight on `batch` (the mean over the ranks), then peft's
        `lora_ga_init` puts A and B on its top singular directions and takes their product out of the base weight,
        so the student starts unchanged and the first step moves along the full fine-tuning gradient."""
        layers = self._lora_layers()
        weights = [layer.get_base_layer().weight for layer in layers]
        requires_grad = {p: p.requires_grad for p in self.model.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        try:
            with torch.enable_grad():
                self.compute_losses(batch)["loss"].backward()
        finally:
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
        world = self._world_size()
        config = self.model.peft_config["default"].lora_ga_config
        for layer, weight in zip(layers, weights):
            grad = weight.grad.detach()
            weight.grad = None
            if world > 1:
                torch.distributed.all_reduce(grad)
                grad = grad / world
            layer.get_base_layer()._peft_loraga_grad = grad
            layer.lora_ga_init("default", config)
        self.initial_adapter = self._adapter_copy()

    def _take_start_out_of_base(self) -> None:
        """A resumed LoRA-GA run: the base weight freshly loaded, less its checkpointed starting adapter's product
        (as `lora_ga_init` left it), so the restored adapter trains on the residual it started on."""
        from peft.utils.other import transpose

        start = {name.replace(".default.weight", ""): value for name, value in self.initial_adapter.items()}
        for name, layer in self.model.named_modules():
            if f"{name}.lora_A" not in start:
                continue
            a, b = (start[f"{name}.lora_{x}"].float() for x in "AB")
            base = layer.get_base_layer()
            offset = transpose(layer.scaling["default"] * (b @ a), layer.fan_in_fan_out)
            with torch.no_grad():
                base.weight.copy_((base.weight.float() - offset.to(base.weight.device)).to(base.weight.dtype))

    @contextlib.contextmanager
    def base_weights(self):
        """The untuned student inside the block: the adapter switched off, or for PiSSA (whose base weights are a
        residual) the adapter set back to its starting values."""
        if self.initial_adapter is None:
            with self.model.disable_adapter():
                yield
            return
        trained = {n: p for n, p in self.model.named_parameters() if n in self.initial_adapter}
        kept = {n: p.detach().clone() for n, p in trained.items()}
        try:
            with torch.no_grad():
                for name, param in trained.items():
                    param.copy_(self.initial_adapter[name])
            yield
        finally:
            with torch.no_grad():
                for name, param in trained.items():
                    param.copy_(kept[name])

    def on_train_end(self) -> None:
        if self.frozen_cache is not None:
            cache = self.frozen_cache
            log.info("frozen-layer cache: %d hits, %d misses, %.1f MB", cache.hits, cache.misses, cache.bytes / 2**20)

    def _check_finite(self, loss: torch.Tensor, stage: str, batch_idx: int, batch: dict) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self._non_finite_message(loss, stage, batch_idx, batch))

    def _non_finite_message(self, loss: torch.Tensor, stage: str, batch_idx: int, batch: dict) -> str:
        world = self._world_size()
        where = f" on rank {self.global_rank} of {world}" if world > 1 else ""
        return (f"non-finite {stage} loss ({loss.item()}){where} at global step {self.global_step}, batch {batch_idx} "
                f"(scenario indices {batch['scenario'].tolist()}); lower optim.lr or check the data")

    def _world_size(self) -> int:
        from ..distributed import world_size

        return world_size() if self._trainer is not None else 1

    def _agree_finite(self, loss: torch.Tensor, batch_idx: int, batch: dict) -> torch.Tensor:
        """The training loss to log: on several ranks their mean (the global batch's loss), after every rank
        agreed that all losses are finite, before backward. A non-finite loss on any rank raises on every rank
        (naming the rank); raised on that rank alone, the others would wait in backward for the collective
        timeout."""
        if self._world_size() == 1:
            self._check_finite(loss, "training", batch_idx, batch)
            return loss.detach()
        from ..distributed import agree, describe

        finite = bool(torch.isfinite(loss))
        message = None if finite else self._non_finite_message(loss, "training", batch_idx, batch)
        failures, _, mean = agree(message, loss.device, value=loss)
        if failures:
            if message is not None:
                raise NonFiniteLossError(message)
            raise NonFiniteLossError(f"stopping rank {self.global_rank} with the others: {describe(failures)}")
        return mean.to(loss.device, loss.dtype)

    # ---------------------------------------------------------------- training
    def on_train_batch_start(self, batch, batch_idx):
        self._batch_start = time.perf_counter()
        # Lightning logs training rows at `_batches_that_stepped`, which one optimizer keeps equal to global_step at a
        # batch's start; on a restart it adds one, assuming the checkpoint was saved before its increment (pytorch_lightning
        # training_epoch_loop.py, reset): true of ModelCheckpoint's, not of the SIGTERM one (callbacks.py), which would
        # leave a hole in a resumed run's metrics.csv (src/tomdistill/loggers.py continues it by global step)
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "data_error" in batch:  # a loader error on several ranks; distributed.StepAgreement raises it first
            raise batch["data_error"]
        out = self.compute_losses(batch)
        loss = self._agree_finite(out["loss"], batch_idx, batch)
        size = batch["input_ids"].shape[0]
        self.train_loss(loss)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        for part, value in out.items():
            if part not in ("loss", "preds", "targets"):
                self.log(f"train/{part}_loss", value.detach(), on_step=True, batch_size=size)
        if "preds" in out:
            self.train_acc(out["preds"], out["targets"])
            self.log("train/token_acc", self.train_acc, on_step=True, on_epoch=False, batch_size=size)
        mask = batch["attention_mask"]
        self.log("train/padding_frac", 1.0 - mask.float().mean(), on_step=True, batch_size=size)
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        seconds = max(time.perf_counter() - self._batch_start, 1e-9)
        world = self.trainer.world_size if self._trainer is not None else 1
        tokens = int(batch["attention_mask"].sum()) * world
        self.log("train/tokens_per_s", tokens / seconds, on_step=True, batch_size=1)
        self.log("train/samples_per_s", batch["input_ids"].shape[0] * world / seconds, on_step=True, batch_size=1)
        self.log("train/step_s", seconds, on_step=True, batch_size=1)
        if torch.cuda.is_available() and self.device.type == "cuda":
            self.log("train/gpu_mem_gb", torch.cuda.max_memory_allocated(self.device) / 2**30, on_step=True, batch_size=1)

    def on_train_epoch_end(self):
        self.log("train/loss_epoch", self.train_loss.compute(), sync_dist=True)
        self.train_loss.reset()

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.compute_losses(batch)
        size = batch["input_ids"].shape[0]
        self.val_loss.update(out["loss"], weight=size)
        if "preds" in out:
            self.val_acc(out["preds"], out["targets"])

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count:
            self.log("val/loss", self.val_loss.compute(), sync_dist=True)
            self.val_loss.reset()
        if self.val_acc.update_count:
            self.log("val/token_acc", self.val_acc.compute(), sync_dist=True)
            self.val_acc.reset()
        if self.validation is None or not self.validation.items:
            return
        if self._base_propensity is None:
            with self.base_weights():
                self._base_propensity, base_mass = self.score_validation()
            self._base_mass = base_mass
        tuned, mass = self.score_validation()
        value = alignment(self._base_propensity, tuned, self.validation.teacher_propensity)
        # every rank scored every validation scenario: the values agree, no reduction needed
        self.log("val/alignment", float(value), prog_bar=True)
        self.log("val/action_mass", mass)
        self.log("val/base_action_mass", self._base_mass)
        self.log("val/propensity_gap", float(np.mean(np.abs(np.array(tuned) - self.validation.teacher_propensity))))

    def score_validation(self) -> tuple[list[float], float]:
        """The student's propensity on each validation scenario and its mean mass on the actions."""
        v = self.validation
        propensities, masses = self.score_items(v.items, v.tokenizer, v.batch_size)
        return propensities, float(np.mean(masses))

    @torch.no_grad()
    def score_items(self, items: list[ScoringItem], tokenizer, batch_size: int) -> tuple[list[float], list[float]]:
        """The student's propensity on each scoring item and its mass on the actions, by the same rule as
        sample.py's score mode (complete answers, renormalised); NaN where no mass is on an action."""
        from ..metrics.propensity import choice_propensity

        propensities, masses = [], []
        for lp in action_logprobs(self.model, tokenizer, items, batch_size):
            probs, mass = action_distribution(lp)
            masses.append(mass)
            propensities.append(choice_propensity(probs) if mass > 0 else float("nan"))
        return propensities, masses

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        from transformers import get_scheduler, get_wsd_schedule

        cfg = self.optim_cfg
        lr = float(cfg.get("lr", 2e-4))
        # the adapter only (docs/design.md, "Optimizer parameters and hyperparameters")
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        ratio = float(cfg.get("lora_plus_ratio") or 1.0)
        if ratio == 1.0:
            params = [p for _, p in named]
        else:  # LoRA+ (Hayou et al., 2024): B, which starts at zero, learns `ratio` times faster than A
            params = [{"params": [p for n, p in named if "lora_B" not in n], "lr": lr},
                      {"params": [p for n, p in named if "lora_B" in n], "lr": lr * ratio}]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=float(cfg.get("weight_decay", 0.0)),
                                      betas=tuple(cfg.get("betas", (0.9, 0.999))))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(round(float(cfg.get("warmup_ratio", 0.0)) * total))
        name = cfg.get("scheduler", "cosine")
        if name == "wsd":  # warm-up, a constant lr, then a cosine decay over the last `decay_ratio` of the steps
            decay = max(int(round(float(cfg.get("decay_ratio", 0.2)) * total)), 1)
            scheduler = get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_decay_steps=decay,
                                         num_training_steps=total)
        else:
            scheduler = get_scheduler({"constant": "constant_with_warmup"}.get(name, name), optimizer,
                                      num_warmup_steps=warmup, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints
    def trainable_state_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the adapter in Lightning checkpoints: the frozen base model is reloaded from its source."""
        if "state_dict" in checkpoint:
            keep = self.trainable_state_names()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        if self.lora_init == "lora_ga" and self.initial_adapter is not None:
            checkpoint[LORA_GA_START_KEY] = self.initial_adapter

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.lora_init == "lora_ga" and LORA_GA_START_KEY in checkpoint:
            self.initial_adapter = checkpoint[LORA_GA_START_KEY]
            self._take_start_out_of_base()

    def _save_residual_as_lora(self, directory: str | Path, state: dict[str, torch.Tensor]) -> None:
        """Save a residual start's (PiSSA, LoRA-GA) adapter as the plain rank-2r LoRA of the same change on the
        original base weights
        (`residual_as_lora`; peft's own conversion needs the starting adapter on disk and cannot take a gathered
        state dict), so plain peft reloads it onto the unchanged base model."""
        config = self.model.peft_config["default"]
        # the plain LoRA saved carries no LoRA-GA settings (a peft without LoRA-GA has no such field)
        fields = ["r", "lora_alpha", "init_lora_weights"]
        if hasattr(config, "lora_ga_config"):
            fields.append("lora_ga_config")
        saved = {field: getattr(config, field) for field in fields}
        # r doubles; alpha follows so that the scale (alpha / r, or alpha / sqrt(r) with rsLoRA) stays the same
        config.r, config.lora_alpha = 2 * config.r, config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2)
        config.init_lora_weights = True
        if "lora_ga_config" in saved:
            config.lora_ga_config = None
        try:
            self.model.save_pretrained(str(directory), state_dict=residual_as_lora(state, self.initial_adapter),
                                       safe_serialization=True)
        finally:
            for field, value in saved.items():
                setattr(config, field, value)

    def save_adapter(self, directory: str | Path) -> None:
        """Write the adapter in plain peft format. Collective: call on every rank.

        Under ZeRO-3 the LoRA parameters are partitioned; they are gathered on all ranks
        (`GatheredParameters`) and rank 0 writes them (an un-gathered save is empty: peft #453).
        """
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        gathered = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gathered:
            state = {n: p.detach().to("cpu").clone() for n, p in named}

        def write() -> None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            if self.initial_adapter is None:
                self.model.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
            else:
                self._save_residual_as_lora(directory, state)

        from ..distributed import rank_zero_writes

        # rank 0 writes; every rank learns whether it could (a failed write stops all ranks, none waits on it)
        rank_zero_writes(write, self.device, f"writing the adapter to {directory}")
