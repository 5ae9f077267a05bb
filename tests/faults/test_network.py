"""Network: with W&B configured and no server reachable, runs go offline and say so once."""
import subprocess
import sys
import time

import pytest

from tomdistill import tracking


@pytest.fixture
def no_wandb_server(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(tracking, "_announced", False)


def test_unreachable_server_means_offline_announced_once(no_wandb_server, capsys):
    started = time.perf_counter()
    assert tracking.resolve_wandb_mode("auto") == "offline"
    assert tracking.resolve_wandb_mode("auto") == "offline"
    assert time.perf_counter() - started < 10  # never a hang
    out = capsys.readouterr().out
    assert out.count("W&B: no network, logging offline") == 1


def test_explicit_wandb_mode_is_respected(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_wandb_mode("auto") == "disabled"


def test_online_without_credentials_falls_back_to_offline(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tracking, "_announced", False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tracking.resolve_wandb_mode("online") == "offline"
    assert "no API key" in capsys.readouterr().out


def test_train_py_with_wandb_and_no_network_runs_offline_and_says_so_once(tmp_path, catalogue):
    from helpers import write_teacher

    from .common import ENV, ROOT, describe

    teacher = write_teacher(tmp_path / "teacher", catalogue, n=2)
    output = tmp_path / "run"
    env = {k: v for k, v in ENV.items() if k != "WANDB_MODE"}
    env.update(WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="", HOME=str(tmp_path))  # no server, no key
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "train.py", "model=tiny_llama", "logger=wandb", "trainer.max_steps=1", "data.num_val_contexts=0",
         "trainer.enable_progress_bar=false", f"data.teacher={teacher}", f"output={output}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, describe(result)
    said = (result.stdout + result.stderr).count("W&B: no network, logging offline")
    assert said == 1, describe(result)
    assert list((output / "wandb").glob("offline-run-*")), sorted(p.name for p in (output / "wandb").iterdir())
    assert (output / "adapter" / "adapter_model.safetensors").exists()
    assert time.perf_counter() - started < 240
