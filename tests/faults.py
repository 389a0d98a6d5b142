"""The faults and bad inputs a user can meet, with the exit code and the line they see: the one
list that tests/test_run_faults.py reproduces and asserts, and that docs/faults.md shows (a
fast test checks that the document is this list, rendered)."""

from __future__ import annotations

from typing import NamedTuple


class Fault(NamedTuple):
    key: str
    what: str  # what the user did, or what happened
    code: int  # the exit code
    seen: str  # a fragment of the one line they see (stderr for errors)
    kept: str  # what is kept intact


FAULTS = (
    Fault("busy", "a second trainer started on a run folder in use", 2,
          "is in use by PID", "the first run's files, byte for byte"),
    Fault("occupied", "a new run (no `--resume`) on a folder that holds a run", 2,
          "already holds a run", "the old run's files, byte for byte"),
    Fault("overwrite", "`--overwrite` on a folder that holds a run", 0,
          "the old run was moved to", "the old run, whole, in `<run-dir>.old-<time>`"),
    Fault("stale_lock", "`--resume auto` after the trainer was killed (`kill -9`)", 0,
          "took over the lock left by PID", "the run, resumed from its newest checkpoint"),
    Fault("run_dir_file", "`--run-dir` names a file", 2,
          "is a file, not a folder", "the file"),
    Fault("lr_inf", "`optim.lr=.inf`", 2,
          "`optim.lr` = inf must be a finite number", "nothing is written"),
    Fault("inner_lr_zero", "`algorithm.inner_lr=0`", 2,
          "`algorithm.inner_lr` = 0.0 must be positive", "nothing is written"),
    Fault("nonfinite_steps", "every step non-finite (`algorithm.inner_lr=1e30`)", 3,
          "non-finite gradients or losses and were skipped", "a checkpoint of the last finite "
          "weights; no model is exported"),
    Fault("loss_climb", "the training loss climbs, or starts far above chance "
          "(`algorithm.inner_lr=1e6`: losses of 1e11)", 0,
          "the run may be diverging", "the run goes on (a warning, printed once per climb)"),
    Fault("test_shard_flipped", "a flipped byte in a test shard", 2,
          "fails its SHA-256 check", "nothing is trained or written: checked before step 1"),
    Fault("truncated_checkpoint", "`--resume auto` with the newest checkpoint truncated", 0,
          "it cannot be read", "the run, resumed from the newest checkpoint that loads"),
    Fault("bad_resume_path", "`--resume FILE` with FILE damaged", 2,
          "cannot be read", "the run folder as it was"),
    Fault("disk_full", "the disk fills while checkpointing", 74,
          "no space left on the device writing", "the earlier checkpoints, intact; "
          "`--resume auto` continues once there is space"),
    Fault("evaluate_bad_checkpoint", "`evaluate.py --checkpoint FILE` with FILE damaged", 2,
          "cannot be read", "the run folder as it was"),
    Fault("evaluate_stopped", "`evaluate.py` on a run stopped early", 0,
          "training stopped early", "`eval-test.json` records `trained_steps` of "
          "`planned_steps`"),
    Fault("evaluate_model_import", "`evaluate.py` on a run of a model of your own "
          "(`model.name: module:function`) where its module cannot be imported", 2,
          "cannot import", "the run folder as it was"),
    Fault("signal_stop", "SIGTERM to the trainer", 75,
          "stopped by a signal at step", "a checkpoint at that step; the exported model "
          "records it"),
)
BY_KEY = {fault.key: fault for fault in FAULTS}


def render_table() -> str:
    rows = ["| what happened | exit code | the line says (in part) | what is kept |",
            "|---|---:|---|---|"]
    rows += [f"| {f.what} | {f.code} | \"{f.seen}\" | {f.kept} |" for f in FAULTS]
    return "\n".join(rows) + "\n"
