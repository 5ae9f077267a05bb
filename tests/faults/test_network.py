"""Network: with W&B configured and no server reachable, runs go offline and say so once."""
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
