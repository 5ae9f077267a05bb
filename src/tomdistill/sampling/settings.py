"""The sampler's settings: read from the Hydra config and validated, every error naming its key.

`sampler.*` holds how to sample (backend, mode, n, temperature, …); `role`, `seed` and `adapter`
are top-level keys shared with the other entry points (conf/base.yaml).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..settings_fields import setting
from ..errors import UserError

BACKENDS = ("hf", "vllm", "oracle", "recorded")
# not language models: no tokenizer, no adapter, no `Answer:` prefill (the oracle; answers recorded elsewhere)
MODEL_FREE_BACKENDS = ("oracle", "recorded")
MODES = ("generate", "score")
ROLES = ("teacher", "student")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
# The student answers in one line; the teacher adds a motivation of a few sentences.
DEFAULT_MAX_NEW_TOKENS = {"student": 8, "teacher": 200}


class SamplingConfigError(ValueError, UserError):
    """A bad sampling config value; the message names the key."""


@dataclass(frozen=True)
class SamplerSettings:
    """How sample.py samples: the backend, its decoding settings and where it runs (conf/sampler/*.yaml)."""

    backend: str = setting("hf: transformers; vllm: vLLM on GPUs (its own environment, conf/sampler/vllm.yaml); "
                           "oracle: the analytic reference agent; recorded: answers recorded elsewhere")
    mode: str = setting("generate: n sampled answers per scenario; score: the exact P(action), one record per "
                        "scenario")
    role: str = setting("teacher: the answer and its motivation; student: the answer alone (the top-level `role`)")
    seed: int = setting("the sampling seed (the top-level `seed`)")
    # None only for the recorded backend until the recording says how many it holds
    n: int | None = setting("samples per scenario (generate mode); recorded: null = as many as were recorded")
    temperature: float = setting("sampling temperature; 0 = greedy")
    top_p: float = setting("nucleus sampling: the smallest set of tokens holding this much probability, in (0, 1]; "
                           "1 = off")
    repetition_penalty: float = setting("penalty on tokens already generated, > 0; 1 = none")
    max_new_tokens: int = setting("the longest answer in tokens; null: by role (student 8, teacher 200)")
    batch_size: int = setting("sequences per generate call (vllm: requests handed to vLLM at once)")
    score_batch_size: int = setting("score mode: prompts per forward pass (the logits of whole prompts are held in "
                                    "memory)")
    device: str = setting("auto | cpu | cuda | cuda:<i>; auto = this rank's GPU if there is one, else the CPU")
    device_map: str | None = setting("auto: shard one large model over all GPUs of the node (accelerate); null = "
                                     "one device")
    dtype: str = setting("the model's dtype; auto = model.dtype, whose auto is bf16 on a GPU, fp32 on the CPU")
    shard_size: int = setting("samples per output shard (the unit of resume and of data-parallel work)")
    precision: float = setting("oracle only: the logit precision λ, P(C) = σ(λ (EU_C − EU_D))")
    tensor_parallel_size: int = setting("vllm only: GPUs one model is split over")
    gpu_memory_utilization: float = setting("vllm only: the share of each GPU's memory vLLM may take, in (0, 1]")
    progress: bool = setting("a rich progress bar on the console")
    adapter: str | None = setting("a peft adapter directory the model samples with (the top-level `adapter`); "
                                  "null = the base model")
    answer_prefill: bool = setting("start the assistant turn with \"Answer:\" (as score mode and the training "
                                   "targets do)", default=True)
    source: str | None = setting(
        "recorded only, required: reference:paper_published/teacher|base|tuned (the paper's published counts), a "
        ".csv of answer counts or a .csv/.parquet/.jsonl of answers (conf/sampler/recorded.yaml)", default=None)
    model_name: str | None = setting("recorded only: the records' `model`; null = the reference's "
                                     "(llama2-70b-chat, …) or the file's stem", default=None)
    python: str | None = setting("the interpreter the pipeline runs sample.py with (e.g. .venv-vllm/bin/python); "
                                 "null = its own", default=None)

    @property
    def samples_per_scenario(self) -> int:
        """Score mode writes one record per scenario, whatever `n` says."""
        return self.n if self.mode == "generate" else 1

    def to_dict(self) -> dict:
        return asdict(self)


def _get(cfg: Mapping | Any, key: str, default=None):
    if cfg is None:
        return default
    try:
        return cfg.get(key, default)
    except AttributeError:
        return getattr(cfg, key, default)


def _choice(value, key: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise SamplingConfigError(f"{key}: must be one of {'|'.join(options)}, got {value!r}")
    return str(value)


def _int(value, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SamplingConfigError(f"{key}: must be a whole number ≥ {minimum}, got {value!r}")
    return int(value)


def _number(value, key: str, low: float, high: float | None = None, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '≥'} {low}" + (f" and ≤ {high}" if high is not None else "")
        raise SamplingConfigError(f"{key}: must be a number {bound}, got {value!r}")
    return float(value)


def resolve_device(value: str, key: str = "sampler.device", local_rank: int = 0) -> str:
    """`auto`: this rank's GPU when there is one, else the CPU."""
    import torch

    if value == "auto":
        from ..devices import check_gpus_usable

        check_gpus_usable(key + "=auto")  # allocated GPUs that torch cannot see: an error, not a CPU run
        return f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return "cpu"
    if isinstance(value, str) and value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SamplingConfigError(f"{key}: {value!r} asked for, but no CUDA GPU is visible (use auto or cpu)")
        return f"cuda:{local_rank % torch.cuda.device_count()}" if value == "cuda" else value
    raise SamplingConfigError(f"{key}: must be auto, cpu, cuda or cuda:<index>, got {value!r}")


# vLLM's own rules (vllm/config LoRAConfig and SamplingParams), checked here so a wrong setting fails before the
# engine loads a 70b model: the LoRA ranks it accepts, and no greedy decoding with several samples per request.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# what torchrun leaves in the environment of a rank; vLLM reads these (RANK, WORLD_SIZE, MASTER_*) when it sets
# up its own tensor-parallel group, so an engine started from a data-parallel rank must not inherit them
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                      "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def vllm_max_lora_rank(rank, key: str = "adapter") -> int:
    """The smallest of vLLM's allowed `max_lora_rank` values that holds an adapter of rank `rank`."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SamplingConfigError(f"{key}: adapter_config.json has LoRA rank r={rank!r}; expected a whole number ≥ 1")
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise SamplingConfigError(f"{key}: LoRA rank r={rank} is above vLLM's largest max_lora_rank "
                              f"({VLLM_LORA_RANKS[-1]}; allowed {list(VLLM_LORA_RANKS)}); use sampler=hf")


def vllm_dtype(sampler_dtype: str, model_dtype: str | None) -> str:
    """vLLM's dtype: `auto` there means the checkpoint's (fp16 for Llama-2), so say what the hf backend takes on
    this GPU (model/loading.py `resolve_dtype`: bf16 where it is native, else fp16)."""
    from ..devices import gpu_computes_bf16

    name = sampler_dtype if sampler_dtype != "auto" else (model_dtype or "auto")
    return {"auto": "bfloat16" if gpu_computes_bf16() else "float16", "fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
            "fp16": "float16", "float16": "float16"}[str(name)]


def vllm_visible_devices(visible: str | None, local_rank: int, world_size: int, tensor_parallel_size: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for this rank's vLLM engine: GPUs local_rank × tp … + tp − 1 of what the node shows,
    so data-parallel ranks on one node do not all start on GPU 0. None: leave it as it is (one rank, or the
    scheduler already gave this task exactly its own tp GPUs, e.g. srun --gpus-per-task)."""
    tp = tensor_parallel_size
    if world_size <= 1:
        return None
    ids = [i.strip() for i in visible.split(",") if i.strip()] if visible not in (None, "") else None
    if ids is not None and len(ids) == tp:
        return None
    start = local_rank * tp
    if ids is None:
        return ",".join(str(i) for i in range(start, start + tp))
    if start + tp > len(ids):
        raise SamplingConfigError(
            f"sampler.tensor_parallel_size={tp}: local rank {local_rank} needs GPUs {start}..{start + tp - 1} of "
            f"CUDA_VISIBLE_DEVICES={visible} ({len(ids)} GPU(s)); run at most {len(ids) // tp} rank(s) per node")
    return ",".join(ids[start:start + tp])


def check_vllm_settings(settings: "SamplerSettings") -> None:
    """vLLM's rules for what tomdistill sends it (see VLLM_LORA_RANKS above)."""
    if settings.mode == "generate" and settings.temperature == 0 and settings.n > 1:
        raise SamplingConfigError(
            f"sampler.temperature=0 (greedy) with sampler.n={settings.n}: vLLM refuses several samples per request "
            "under greedy decoding, and they would all be the same answer; set sampler.n=1 or a temperature > 0")
    if settings.device == "cpu" or settings.device_map:
        key = "sampler.device=cpu" if settings.device == "cpu" else f"sampler.device_map={settings.device_map}"
        raise SamplingConfigError(f"{key}: the vllm backend runs on GPUs only and places the model itself "
                                  "(sampler.tensor_parallel_size); use sampler=hf for the CPU or device_map")


def _recorded_keys(sampler, backend: str) -> tuple[str | None, str | None]:
    """`sampler.source` (required by the recorded backend, refused by the others) and `sampler.model_name`."""
    values = {}
    for key in ("source", "model_name"):
        value = _get(sampler, key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise SamplingConfigError(f"sampler.{key}: must be a non-empty string, got {value!r}")
        if value is not None and backend != "recorded":
            raise SamplingConfigError(f"sampler.{key}: only sampler=recorded reads it (this run's backend is "
                                      f"{backend})")
        values[key] = value.strip() if value is not None else None
    if backend == "recorded" and values["source"] is None:
        raise SamplingConfigError("sampler.source: sampler=recorded needs the recording to serve: "
                                  "reference:paper_published/teacher|base|tuned, a .csv of answer counts "
                                  "(game,context,action,count) or a .csv/.parquet/.jsonl of answers "
                                  "(game,context,answer[,motivation])")
    return values["source"], values["model_name"]


def settings_from_config(cfg) -> SamplerSettings:
    """Validated settings from a composed `sample.yaml` config."""
    sampler = _get(cfg, "sampler")
    if sampler is None:
        raise SamplingConfigError("sampler: missing (choose one with sampler=hf|vllm|oracle|recorded)")
    role = _choice(_get(cfg, "role"), "role", ROLES)
    mode = _choice(_get(sampler, "mode"), "sampler.mode", MODES)
    backend = _choice(_get(sampler, "backend"), "sampler.backend", BACKENDS)
    max_new_tokens = _get(sampler, "max_new_tokens")
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS[role] if max_new_tokens is None else _int(max_new_tokens, "sampler.max_new_tokens", 1)
    device_map = _get(sampler, "device_map")
    if device_map is not None and not isinstance(device_map, str):
        raise SamplingConfigError(f"sampler.device_map: must be null or a string such as auto, got {device_map!r}")
    device = _get(sampler, "device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise SamplingConfigError(f"sampler.device: must be auto, cpu, cuda or cuda:<index>, got {device!r}")
    adapter = _get(cfg, "adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise SamplingConfigError(f"adapter: must be a path to a peft adapter directory, got {adapter!r}")
    if adapter is not None and backend in MODEL_FREE_BACKENDS:
        raise SamplingConfigError(f"adapter: the {backend} backend is not a language model and takes no adapter")
    source, model_name = _recorded_keys(sampler, backend)
    n = _get(sampler, "n")
    n = None if n is None and backend == "recorded" else _int(n, "sampler.n", 1)  # recorded: null = as recorded
    progress = _get(sampler, "progress", True)
    if not isinstance(progress, bool):
        raise SamplingConfigError(f"sampler.progress: must be true or false, got {progress!r}")
    python = _get(sampler, "python")  # read by the pipeline (pipeline.sampler_python), which runs sample.py with it
    if python is not None and not isinstance(python, str):
        raise SamplingConfigError(f"sampler.python: must be null or the path of a Python interpreter, got {python!r}")
    settings = SamplerSettings(
        backend=backend,
        mode=mode,
        role=role,
        seed=_int(_get(cfg, "seed"), "seed", 0),
        n=n,
        temperature=_number(_get(sampler, "temperature"), "sampler.temperature", 0.0),
        top_p=_number(_get(sampler, "top_p"), "sampler.top_p", 0.0, 1.0, low_open=True),
        repetition_penalty=_number(_get(sampler, "repetition_penalty"), "sampler.repetition_penalty", 0.0, low_open=True),
        max_new_tokens=max_new_tokens,
        batch_size=_int(_get(sampler, "batch_size"), "sampler.batch_size", 1),
        score_batch_size=_int(_get(sampler, "score_batch_size", 8), "sampler.score_batch_size", 1),
        device=device,
        device_map=device_map,
        dtype=_choice(_get(sampler, "dtype", "auto"), "sampler.dtype", DTYPES),
        shard_size=_int(_get(sampler, "shard_size"), "sampler.shard_size", 1),
        precision=_number(_get(sampler, "precision"), "sampler.precision", 0.0, low_open=True),
        tensor_parallel_size=_int(_get(sampler, "tensor_parallel_size", 1), "sampler.tensor_parallel_size", 1),
        gpu_memory_utilization=_number(
            _get(sampler, "gpu_memory_utilization", 0.9), "sampler.gpu_memory_utilization", 0.0, 1.0, low_open=True
        ),
        progress=progress,
        answer_prefill=bool(_get(sampler, "answer_prefill", True)),
        adapter=adapter,
        source=source,
        model_name=model_name,
        python=python or None,
    )
    if backend == "vllm":
        check_vllm_settings(settings)
    return settings
