"""W&B mode selection: offline by itself without an API key, never a prompt."""

import pytest

from fsl_dist.tracking import MetricsFile, read_metrics, wandb_mode


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    return tmp_path


def test_offline_without_an_api_key(no_wandb_credentials):
    assert wandb_mode() == "offline"


def test_online_with_an_api_key_or_netrc_entry(no_wandb_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = no_wandb_credentials / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    assert wandb_mode() == "online"


def test_an_explicit_mode_wins(no_wandb_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "disabled"


def test_metrics_file_drops_rows_after_the_resumed_step(tmp_path):
    metrics = MetricsFile(tmp_path, enabled=True)
    for step in (1, 2, 3, 4):
        metrics.write({"step": step, "train/loss": float(step)})
    metrics.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
