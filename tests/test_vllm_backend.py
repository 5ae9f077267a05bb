"""The vLLM backend's set-up, without vLLM installed: its settings checked against vLLM's rules, each rank's
engine on its own GPUs with no inherited process group, bf16 for Llama-2, adapters through LoRARequest."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def compose_sample(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("sample", overrides=["paths.root_dir=" + str(ROOT), "sampler=vllm", *overrides])


def test_greedy_with_several_samples_is_refused_naming_both_keys():
    from tomdistill.sampling.settings import SamplingConfigError, settings_from_config

    with pytest.raises(SamplingConfigError, match=r"sampler.temperature=0 \(greedy\) with sampler.n=4"):
        settings_from_config(compose_sample("sampler.temperature=0", "sampler.n=4"))
    assert settings_from_config(compose_sample("sampler.temperature=0", "sampler.n=1")).n == 1
    assert settings_from_config(compose_sample("sampler.temperature=0", "sampler.n=4", "sampler.mode=score")).n == 4
    # the hf backend draws several greedy answers without complaint (they are equal)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        hf = compose("sample", overrides=["sampler.temperature=0", "sampler.n=4"])
    assert settings_from_config(hf).n == 4


@pytest.mark.parametrize("override, key", [("sampler.device=cpu", "sampler.device=cpu"),
                                           ("sampler.device_map=auto", "sampler.device_map=auto")])
def test_vllm_places_the_model_itself(override, key):
    from tomdistill.sampling.settings import SamplingConfigError, settings_from_config

    with pytest.raises(SamplingConfigError, match=f"^{key}: the vllm backend runs on GPUs only"):
        settings_from_config(compose_sample(override))


def test_sample_py_refuses_greedy_n_before_anything_loads(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "sampler=vllm", "sampler.temperature=0",
                             "sampler.n=3", f"output={tmp_path / 'out'}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert "sample.py: error: sampler.temperature=0 (greedy) with sampler.n=3" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "plan.json").exists()


@pytest.mark.parametrize("rank, expected", [(1, 1), (8, 8), (9, 16), (16, 16), (200, 256), (300, 320), (512, 512)])
def test_max_lora_rank_is_one_vllm_allows(rank, expected):
    from tomdistill.sampling.settings import VLLM_LORA_RANKS, vllm_max_lora_rank

    assert vllm_max_lora_rank(rank) == expected and expected in VLLM_LORA_RANKS


@pytest.mark.parametrize("rank", [0, 513, "8", None])
def test_a_lora_rank_vllm_cannot_serve_is_refused(rank):
    from tomdistill.sampling.settings import SamplingConfigError, vllm_max_lora_rank

    with pytest.raises(SamplingConfigError, match=r"^adapter=/a: .*r="):
        vllm_max_lora_rank(rank, "adapter=/a")


def test_dtype_auto_is_bf16_as_the_hf_backend_on_gpu(monkeypatch):
    from tomdistill import devices
    from tomdistill.sampling.settings import vllm_dtype

    monkeypatch.setattr(devices, "gpu_computes_bf16", lambda: True)
    assert vllm_dtype("auto", "auto") == "bfloat16"  # Llama-2's checkpoint says fp16; vLLM's auto would take it
    assert vllm_dtype("auto", None) == "bfloat16"
    monkeypatch.setattr(devices, "gpu_computes_bf16", lambda: False)  # a V100 or T4: bf16 would be emulated
    assert vllm_dtype("auto", "auto") == "float16"
    assert vllm_dtype("auto", "float32") == "float32"  # the model config's own choice
    assert vllm_dtype("fp16", "auto") == "float16" and vllm_dtype("bf16", "float32") == "bfloat16"


@pytest.mark.parametrize("visible, local_rank, world, tp, expected", [
    (None, 0, 1, 4, None),              # one rank: vLLM takes the first tp GPUs it sees
    ("0,1,2,3,4,5,6,7", 0, 1, 8, None),
    (None, 1, 4, 2, "2,3"),             # torchrun on a node: local rank × tp
    (None, 3, 4, 2, "6,7"),
    ("4,5,6,7", 1, 2, 2, "6,7"),        # a slice of what SLURM or the user made visible
    ("3", 5, 8, 1, None),               # srun --gpus-per-task already gave this task its own GPU
    ("2,5", 1, 2, 2, None),
])
def test_each_rank_sees_only_its_own_gpus(visible, local_rank, world, tp, expected):
    from tomdistill.sampling.settings import vllm_visible_devices

    assert vllm_visible_devices(visible, local_rank, world, tp) == expected


def test_too_few_gpus_for_the_ranks_is_refused_naming_tensor_parallel_size():
    from tomdistill.sampling.settings import SamplingConfigError, vllm_visible_devices

    with pytest.raises(SamplingConfigError, match=r"^sampler.tensor_parallel_size=4: local rank 1 needs GPUs 4..7 of "
                                                  r"CUDA_VISIBLE_DEVICES=0,1,2,3,4,5 \(6 GPU\(s\)\); run at most 1"):
        vllm_visible_devices("0,1,2,3,4,5", 1, 2, 4)


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` module recording what the engine was built with and the process it was built in."""
    import torch.distributed as dist

    built = {}

    class LLM:
        def __init__(self, **kwargs):
            built.update(kwargs, visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
                         torchrun={k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
                         group=dist.is_initialized())

        def get_tokenizer(self):
            return types.SimpleNamespace(chat_template=None)

    class LoRARequest:
        def __init__(self, name, lora_id, path):
            self.name, self.lora_id, self.path = name, lora_id, path

    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    return built


def test_the_engine_starts_on_this_ranks_gpus_without_torchrun_state(tmp_path, monkeypatch, fake_vllm):
    import torch.distributed as dist

    from tomdistill import devices
    from tomdistill.sampling.backends import VLLMBackend
    from tomdistill.sampling.settings import settings_from_config

    monkeypatch.setattr(devices, "gpu_computes_bf16", lambda: True)  # an Ampere or later GPU
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    for name, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29511", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}.items():
        monkeypatch.setenv(name, value)
    # a process group as sample.py's data-parallel ranks would have made one (gloo, this process alone)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = compose_sample("model=llama2_7b", "sampler.tensor_parallel_size=2", f"adapter={adapter}")
        backend = VLLMBackend(cfg, settings_from_config(cfg), local_rank=1, world_size=4)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert fake_vllm["visible"] == "2,3" and fake_vllm["tensor_parallel_size"] == 2
    assert fake_vllm["torchrun"] == dict.fromkeys(("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    assert fake_vllm["group"] is False
    assert fake_vllm["dtype"] == "bfloat16" and fake_vllm["model"] == "meta-llama/Llama-2-7b-chat-hf"
    assert fake_vllm["enable_lora"] is True and fake_vllm["max_lora_rank"] == 16
    assert backend.lora_request.path == str(adapter.resolve())


def test_without_vllm_the_error_says_where_it_lives(monkeypatch):
    from tomdistill.model.loading import ModelLoadError
    from tomdistill.sampling.backends import VLLMBackend
    from tomdistill.sampling.settings import settings_from_config

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    cfg = compose_sample("model=llama2_7b")
    with pytest.raises(ModelLoadError, match=r"scripts/setup_vllm.sh.*sampler.python=.venv-vllm/bin/python"):
        VLLMBackend(cfg, settings_from_config(cfg))


def test_vllm_has_its_own_pinned_environment():
    """vLLM is pinned in requirements-vllm.txt only (its torch/transformers pins conflict with the training stack's
    transformers range), and the set-up script that builds .venv-vllm parses."""
    import re

    vllm_lines = [line.split("#")[0].strip() for line in (ROOT / "requirements-vllm.txt").read_text().splitlines()]
    assert any(re.fullmatch(r"vllm==\d+\.\d+\.\d+", line) for line in vllm_lines)
    for other in ("requirements.txt", "requirements-gpu.txt"):
        assert not any(line.split("#")[0].strip().startswith("vllm") for line in (ROOT / other).read_text().splitlines())
    script = ROOT / "scripts" / "setup_vllm.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "-r requirements-vllm.txt" in text and "--no-deps -e ." in text and ".venv-vllm" in text
