"""Safety: no remote code unless configured, safetensors-only adapters, no `..` escapes."""
import pickle
from pathlib import Path

import pytest
import yaml

from tomdistill.model.loading import ModelLoadError, check_adapter_dir
from tomdistill.paths import UnsafePathError, safe_output_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config", sorted((ROOT / "conf/model").glob("*.yaml")), ids=lambda p: p.stem)
def test_trust_remote_code_is_off_in_every_model_config(config):
    assert yaml.safe_load(config.read_text())["trust_remote_code"] is False


def test_loader_passes_trust_remote_code_only_when_configured(monkeypatch):
    import transformers

    from tomdistill.model import loading

    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    for flag in (False, True):
        with pytest.raises(ModelLoadError):
            loading.load_causal_lm({"name_or_path": "/nonexistent", "trust_remote_code": flag})
        assert seen["trust_remote_code"] is flag
        assert seen["use_safetensors"] is True


def test_a_pickle_planted_where_an_adapter_should_be_is_refused(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"evil": "payload"}))
    with pytest.raises(ModelLoadError, match="refusing pickle"):
        check_adapter_dir(adapter)


def test_a_directory_without_adapter_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not a peft adapter directory"):
        check_adapter_dir(tmp_path)


def test_adapter_from_another_base_model_is_refused(tmp_path):
    from tomdistill.model.loading import tag_adapter

    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    tag_adapter(tmp_path, "tiny_llama")
    with pytest.raises(ModelLoadError, match="trained on base model 'tiny_llama'"):
        check_adapter_dir(tmp_path, "smollm2_135m")
    check_adapter_dir(tmp_path, "tiny_llama")


@pytest.mark.parametrize("path", ["runs/../../etc", "../outside", "a/b/../../.."])
def test_output_paths_cannot_climb_out_with_dotdot(path):
    with pytest.raises(UnsafePathError, match="contains '..'"):
        safe_output_dir(path)


def test_plain_output_paths_are_accepted(tmp_path):
    assert safe_output_dir(tmp_path / "run") == (tmp_path / "run").resolve()


# --- end to end, through the entry points ----------------------------------------------------------

@pytest.mark.parametrize("script, args", [
    ("sample.py", ["sampler=oracle", "sampler.n=1", "scenarios.games=[stag_hunt]", "scenarios.contexts=[team]"]),
    ("train.py", ["model=tiny_llama", "logger=csv"]),
    ("evaluate.py", ["teacher=reference:paper_published/teacher", "base=reference:paper_published/base",
                     "tuned=reference:paper_published/tuned"]),
], ids=["sample", "train", "evaluate"])
def test_entry_points_refuse_dotdot_in_output(tmp_path, script, args):
    from .common import describe, entry

    inside = tmp_path / "runs"
    inside.mkdir()
    result = entry(script, [*args, f"output={inside}/../escaped"], timeout=300)
    assert result.returncode == 2, describe(result)
    assert "contains '..'" in result.stderr and "Traceback" not in result.stderr, describe(result)
    assert not (tmp_path / "escaped").exists()


class _Planted:
    """Unpickling this would run code (touch a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_holding_a_pickled_object_is_refused_on_resume(tmp_path, catalogue):
    import torch

    from helpers import write_teacher

    from .common import describe, entry

    teacher = write_teacher(tmp_path / "teacher", catalogue, n=2)
    output, marker = tmp_path / "run", tmp_path / "code-ran"
    (output / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 0, "payload": _Planted(marker)}, output / "checkpoints/last.ckpt")
    result = entry("train.py", ["model=tiny_llama", "logger=csv", "trainer.max_steps=1", f"data.teacher={teacher}",
                                f"output={output}", "ckpt_path=last"], timeout=300)
    assert result.returncode == 2, describe(result)
    assert "refusing to load it, it holds pickled objects" in result.stderr, describe(result)
    assert not marker.exists()  # the planted code never ran
    assert not (output / "adapter").exists()
