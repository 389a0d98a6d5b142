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


def test_online_with_an_api_key(no_wandb_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"


def test_online_with_a_netrc_entry(no_wandb_credentials):
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


def test_logged_throughput_covers_every_step_since_the_last_row():
    """The logged step also measures accuracy before adaptation and is slower; the logged
    tasks/s must be the window's (all steps weighed as trained), not that one step's."""
    from fsl_dist.trainer import StepWindow
    window = StepWindow()
    for step_time in (1.0, 1.0, 1.0, 2.0):  # three plain steps, then the logged one
        window.add(step_time)
    assert window.take(tasks_per_step=8) == (32 / 5.0, 5.0 / 4)
    window.add(0.5)
    assert window.take(tasks_per_step=8) == (16.0, 0.5)  # the window starts again after a row
