"""Run train.py as `python train.py ARGS...` would, then print what the fit really did on stderr.

    python tests/gpu/train_probe.py train.py trainer=deepspeed_zero3 ...

The last stderr line is `GPU_PROBE=<json>` (gpu_runs.probe_report reads it): the resolved accelerator and
precision, ZeRO-3's parameter state (partitioned before use, gathered in the forward pass), gradient checkpointing
and accumulation at work, and which logits path of src/tomdistill/model/lora_module.py (`kept_logits`) ran.
It only observes: one Lightning callback added to the Trainer, counting wrappers and hooks; the command line and
the environment are the user's. pytorch_lightning is patched when train.py imports it (not imported earlier, so
logging is set up as in a plain run). The script's own exit status is kept.
"""
import atexit
import importlib.util
import json
import os
import runpy
import sys

REPORT: dict = {}


def _numel_state(params) -> dict:
    """ZeRO-3 state of (name, parameter) pairs: how many are partitioned away (ds_status NOT_AVAILABLE, local
    numel 0) and how many ZeRO keeps whole on every rank (ds_persist: below stage3_param_persistence_threshold)."""
    zero = [(n, p) for n, p in params if hasattr(p, "ds_id")]
    if not zero:
        return {"zero3_params": 0}
    return {
        "zero3_params": len(zero),
        "partitioned": sum(p.ds_status.name == "NOT_AVAILABLE" and p.numel() == 0 for _, p in zero),
        "persistent": sum(bool(getattr(p, "ds_persist", False)) for _, p in zero),
        "numel": sum(int(p.ds_numel) for _, p in zero),
    }


def _make_callback():
    import torch
    from pytorch_lightning.callbacks import Callback

    class Probe(Callback):
        def __init__(self):
            self.batches = 0
            self.start_step = 0
            self.gathered: set[str] = set()
            self.ckpt_calls = 0
            self.kept_calls = 0
            self.mask_forwards = 0

        def on_fit_start(self, trainer, pl_module):  # after strategy.setup: DeepSpeed has partitioned the model
            REPORT["accelerator"] = type(trainer.accelerator).__name__
            REPORT["root_device"] = str(trainer.strategy.root_device)
            REPORT["precision"] = str(trainer.precision)
            REPORT["strategy"] = type(trainer.strategy).__name__
            config = getattr(trainer.strategy, "config", None) or {}
            zero_cfg = config.get("zero_optimization", {}) if isinstance(config, dict) else {}
            REPORT["zero_stage"] = zero_cfg.get("stage")
            REPORT["persistence_threshold"] = zero_cfg.get("stage3_param_persistence_threshold")
            REPORT["accumulate_grad_batches"] = int(trainer.accumulate_grad_batches)
            named = list(pl_module.named_parameters())
            trainable = [(n, p) for n, p in named if p.requires_grad]
            REPORT["zero3_at_fit_start"] = {"all": _numel_state(named), "trainable": _numel_state(trainable)}
            REPORT["trainable_params"] = len(trainable)
            by_module = {}
            for module_name, module in pl_module.named_modules():
                for name, param in module.named_parameters(recurse=False):
                    if param.requires_grad:
                        by_module.setdefault(id(module), (module, []))[1].append((f"{module_name}.{name}", param))
            for module, params in by_module.values():
                # registered after DeepSpeed's own pre-forward hook (engine set-up): runs once it has fetched
                def seen(_module, _args, params=params):
                    for name, param in params:
                        if hasattr(param, "ds_id") and param.numel() == param.ds_numel > 0:
                            self.gathered.add(name)
                module.register_forward_pre_hook(seen)
            self._count_checkpointing(pl_module)
            self._count_logits(pl_module)

        def _count_checkpointing(self, pl_module):
            """Wrap every `_gradient_checkpointing_func` transformers set (model.gradient_checkpointing_enable)."""
            layers = [m for m in pl_module.modules()
                      if getattr(m, "gradient_checkpointing", False) is True and callable(
                          getattr(m, "_gradient_checkpointing_func", None))]
            REPORT["checkpointed_modules"] = len(layers)
            for module in layers:
                original = module._gradient_checkpointing_func

                def counted(*args, original=original, **kwargs):
                    self.ckpt_calls += 1
                    return original(*args, **kwargs)
                module._gradient_checkpointing_func = counted

        def _count_logits(self, pl_module):
            """Which path of lora_module.kept_logits runs: the causal LM called with a 2-D boolean logits_to_keep
            (transformers >= 5.21) or the decoder + output layer called by kept_logits itself (the fallback)."""
            import transformers
            from tomdistill.model import lora_module

            REPORT["transformers"] = transformers.__version__
            REPORT["transformers_file"] = transformers.__file__
            REPORT["native_mask_slicing"] = bool(lora_module.NATIVE_MASK_SLICING)
            original = lora_module.kept_logits

            def counted(*args, **kwargs):
                self.kept_calls += 1
                return original(*args, **kwargs)
            lora_module.kept_logits = counted
            model = pl_module.model
            base = model.get_base_model() if hasattr(model, "get_base_model") else model

            def mask(_module, _args, kwargs):
                keep = kwargs.get("logits_to_keep")
                if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and keep.dim() == 2:
                    self.mask_forwards += 1
            base.register_forward_pre_hook(mask, with_kwargs=True)

        def on_train_start(self, trainer, pl_module):
            self.start_step = int(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches += 1
            if self.batches == 1:  # after the first step's backward: ZeRO-3 has released the parameters again
                named = list(pl_module.named_parameters())
                REPORT["zero3_after_first_batch"] = {"all": _numel_state(named), "trainable": _numel_state(
                    [(n, p) for n, p in named if p.requires_grad])}

        def on_train_end(self, trainer, pl_module):
            self.report(trainer)

        def report(self, trainer=None):
            if trainer is not None:
                REPORT["optimizer_steps"] = int(trainer.global_step) - self.start_step
            REPORT["train_batches"] = self.batches
            REPORT["trainable_gathered_in_forward"] = len(self.gathered)
            REPORT["checkpoint_calls"] = self.ckpt_calls
            REPORT["kept_logits_calls"] = self.kept_calls
            REPORT["bool_mask_forwards"] = self.mask_forwards

    return Probe()


def _patch(module) -> None:
    trainer_cls = module.Trainer
    original = trainer_cls.__init__

    def init(self, *args, **kwargs):
        probe = _make_callback()
        REPORT["_probe"] = probe
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), probe]
        original(self, *args, **kwargs)

    trainer_cls.__init__ = init


class _PatchLightningOnImport:
    """A meta-path finder that patches pytorch_lightning right after its first import, by whoever imports it."""

    def find_spec(self, name, path=None, target=None):
        if name != "pytorch_lightning":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _report() -> None:
    probe = REPORT.pop("_probe", None)
    if probe is not None and "train_batches" not in REPORT:
        probe.report()  # the fit failed or was stopped: what it had done so far
    print(f"GPU_PROBE={json.dumps(REPORT, sort_keys=True)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: train_probe.py SCRIPT [ARGS...]")
    atexit.register(_report)
    sys.meta_path.insert(0, _PatchLightningOnImport())
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` sets it
    runpy.run_path(script, run_name="__main__")
