"""What the benchmarks share: an offline CPU environment, the model configs, the hf backend as
sample.py builds it, the 20 in-sample scenarios, medians and the machine's load."""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                      ("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("DS_ACCELERATOR", "cpu"),
                      ("TOKENIZERS_PARALLELISM", "false"), ("CUDA_VISIBLE_DEVICES", "")):
    os.environ.setdefault(_name, _value)

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def model_config(name: str) -> dict:
    """A model group config (conf/model/<name>.yaml): smollm2_135m, tiny_llama, …"""
    return yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())


def sampler_config(**overrides) -> dict:
    """conf/sampler/hf.yaml with overrides (the defaults sample.py runs with)."""
    sampler = yaml.safe_load((CONF / "sampler" / "hf.yaml").read_text())
    sampler.update(progress=False, **overrides)
    return sampler


def oracle_config(n: int, seed: int = 0) -> dict:
    """`data.oracle` (train.py's in-process oracle teacher): conf/sampler/oracle.yaml over hf.yaml, n answers each."""
    oracle = yaml.safe_load((CONF / "sampler" / "oracle.yaml").read_text())
    oracle.pop("defaults")
    return {"seed": seed, "sampler": sampler_config(**{**oracle, "n": n})}


def hf_backend(model_name: str, role: str = "student", seed: int = 0, **sampler_overrides):
    """The `hf` backend exactly as sample.py makes it (same class, same settings validation)."""
    from omegaconf import OmegaConf

    from tomdistill.sampling.backends import HFBackend
    from tomdistill.sampling.settings import settings_from_config

    cfg = OmegaConf.create({"model": model_config(model_name), "role": role, "seed": seed, "adapter": None,
                            "sampler": sampler_config(**sampler_overrides)})
    settings = settings_from_config(cfg)
    return HFBackend(cfg, settings), settings


def in_sample_scenarios(limit: int | None = None):
    """The 20 in-sample scenarios (4 games × 5 contexts) of the default catalogue, in catalogue order."""
    from tomdistill import CATALOGUE_DIR
    from tomdistill.scenarios import load_catalogue

    scenarios = load_catalogue(CATALOGUE_DIR).scenarios(["in_sample"])
    return scenarios[:limit] if limit else scenarios


def generation_prompt(backend, settings, scenario) -> str:
    """The prompt the runner hands the backend in generate mode (with the `Answer:` prefill)."""
    from tomdistill.sampling.runner import prefilled
    from tomdistill.scenarios import ANSWER_PREFIX

    return backend.prompt(scenario) + (ANSWER_PREFIX if prefilled(settings) else "")


def set_threads(threads: int) -> int:
    """Torch's CPU threads for both sides of a benchmark (0 = torch's default: all cores).

    On a shared machine every op of a multi-threaded forward waits at an OpenMP barrier for a
    worker the scheduler has parked (~10 ms a time slice): under a load of 4-5 on 2 cores, one
    thread ran SmolLM2's prefill and decode steps 2-3x faster than two. The benchmarks therefore
    default to one thread; pass 0 on an idle machine.
    """
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def median(values) -> float:
    return float(statistics.median(values))


def machine() -> str:
    """CPU model, cores, torch threads and the load average now (the machine is often shared)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu} · {os.cpu_count()} cores · torch {torch.__version__} on {torch.get_num_threads()} threads · load {load}"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
