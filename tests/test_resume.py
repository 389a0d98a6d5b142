"""What a resume may change (fsl_dist/resume.py): every config key has a kind, a change of what
is trained is refused without the flag, a schedule change that keeps the finished steps' rates
passes, and run.json's record keeps only what belongs to the steps that remain."""

import json

import pytest

from fsl_dist import resume
from fsl_dist.config import ConfigError, load_config, to_dict
from fsl_dist.trainer import outer_lr

from launching import ROOT


def config(*overrides: str):
    return load_config(ROOT / "configs" / "cnn_maml.yaml", list(overrides))


def test_every_config_key_has_a_kind_and_no_kind_names_a_missing_key():
    """A new config field cannot be forgotten: resume must know whether it changes the run."""
    fields = resume.config_fields()
    assert sorted(resume.KINDS) == sorted(fields)
    assert set(resume.KINDS.values()) == {resume.TRAINED, resume.SCHEDULE, resume.BOOKKEEPING}


def test_an_unchanged_config_has_no_changes():
    assert resume.check(to_dict(config()), config(), 4, allow=False, rate=outer_lr) == []


def test_a_change_of_what_is_trained_is_refused_naming_each_key_and_the_flag():
    old = to_dict(config())
    with pytest.raises(ConfigError) as refused:
        resume.check(old, config("algorithm.name=boil", "task.k_shot=1", "train.steps=9"), 4,
                     allow=False, rate=outer_lr)
    line = str(refused.value)
    assert 'algorithm.name "maml" -> "boil"' in line and "task.k_shot 5 -> 1" in line
    assert "train.steps" not in line  # bookkeeping: passes
    assert resume.ALLOW_FLAG in line and "\n" not in line


def test_allowed_and_harmless_changes_are_returned_with_their_step_and_kind():
    found = resume.check(to_dict(config()), config("algorithm.name=boil", "train.steps=9",
                                                   "logging.wandb=false"), 4, allow=True,
                         rate=outer_lr)
    by_key = {c["key"]: c for c in found}
    assert by_key["algorithm.name"] == {"key": "algorithm.name", "old": "maml", "new": "boil",
                                        "kind": resume.TRAINED, "step": 4}
    assert by_key["train.steps"]["kind"] == resume.BOOKKEEPING
    assert by_key["logging.wandb"]["kind"] == resume.BOOKKEEPING


@pytest.mark.parametrize("decay_at, passes", [(4, True), (6, True), (3, False)])
def test_a_step_decay_passes_only_where_the_finished_steps_keep_their_rates(decay_at, passes):
    old, new = to_dict(config()), config("optim.schedule=step", f"optim.decay_at=[{decay_at}]")
    if passes:
        kinds = {c["kind"] for c in resume.check(old, new, 4, allow=False, rate=outer_lr)}
        assert kinds == {f"{resume.SCHEDULE} (the finished steps keep their rates)"}
    else:
        with pytest.raises(ConfigError, match="optim.decay_at"):
            resume.check(old, new, 4, allow=False, rate=outer_lr)


def test_the_record_drops_what_belongs_to_steps_a_resume_from_an_older_checkpoint_redoes(
        tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({
        "segments": [{"step": 0, "world_size": 2}, {"step": 4, "world_size": 2},
                     {"step": 8, "world_size": 1}],
        "config_changes": [{"key": "train.steps", "step": 4}, {"key": "optim.lr", "step": 8}]}))
    new = [{"key": "train.seed", "step": 6}]
    record = resume.history(tmp_path, 6, new, world_size=1)
    assert record["segments"] == [{"step": 0, "world_size": 2}, {"step": 4, "world_size": 2},
                                  {"step": 6, "world_size": 1}]
    assert record["config_changes"] == [{"key": "train.steps", "step": 4}] + new
    # a fresh start (step 0) begins a new record
    assert resume.history(tmp_path, 0, [], world_size=1) == {
        "segments": [{"step": 0, "world_size": 1}], "config_changes": []}


def test_a_key_an_older_config_lacks_counts_as_its_default():
    old = to_dict(config())
    del old["algorithm"]["msl_steps"]  # as written before the key existed
    assert resume.changes(old, config(), 4) == []
    assert [c["key"] for c in resume.changes(old, config("algorithm.msl_steps=3"), 4)] == [
        "algorithm.msl_steps"]
