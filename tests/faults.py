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
    Fault("eval_way_with_head", "`eval.n_way` other than `task.n_way` for the MAML family "
          "(its head fixes N)", 2, "but maml's head fixes N", "nothing is written"),
    Fault("memory_budget", "`train.memory_budget_gb` below what the process needs "
          "(`=0.05`)", 4, "no way to run a meta-step fits train.memory_budget_gb",
          "nothing of the run is written: refused before step 1"),
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
    # Write failures, told apart by errno (tests/test_write_faults.py).
    Fault("train_denied", "`train.py` on a run folder this user may not write", 77,
          "permission denied writing", "the folder as it was"),
    Fault("train_read_only", "`train.py` on a small read-only file system", 73,
          "is on a read-only file system", "the file system as it was; not taken for a full "
          "disk; on several processes, one line from the main one"),
    Fault("train_denied_midway", "the run folder's write permission is taken away while "
          "training", 77, "permission denied writing", "the checkpoints and metrics written "
          "before, byte for byte; `--resume auto` continues once it is writable"),
    Fault("run_dir_in_a_file", "`--run-dir notes.txt/run` (a file in the path)", 2,
          "is a file, not a folder", "the file"),
    Fault("train_packs_read_only", "missing Omniglot shards that the trainer packs, onto a "
          "read-only file system", 73, "is on a read-only file system", "nothing is written"),
    Fault("tensorboard_is_a_file", "`logging.tensorboard=true` with a file named `tensorboard` "
          "in the run folder", 2, "tensorboard is a file, not a folder", "the file"),
    Fault("evaluate_denied", "`evaluate.py` on a run folder this user may not write", 77,
          "permission denied writing", "the run folder as it was; checked before the "
          "evaluation runs"),
    Fault("evaluate_read_only", "`evaluate.py` on a run folder on a read-only mount", 73,
          "is on a read-only file system", "the run folder as it was; checked before the "
          "evaluation runs"),
    Fault("pack_full", "packing onto a full disk", 74, "no space left on the device writing",
          "what was on the disk, byte for byte; no half-written set or staging folder"),
    Fault("pack_in_a_file", "`pack.py --out notes.txt/shards` (a file in the path)", 2,
          "is a file, not a folder", "the file"),
    Fault("predict_out_in_a_file", "`fsl-predict --out notes.txt/labels.csv`", 2,
          "is a file, not a folder", "the file; checked before the predictions"),
    Fault("predict_out_denied", "`fsl-predict --out` in a folder this user may not write", 77,
          "permission denied writing", "the folder as it was; checked before the predictions"),
    Fault("compare_read_only", "`compare.py --plot` on a read-only mount", 73,
          "is on a read-only file system", "the folder as it was; checked before the tables"),
    Fault("evaluate_model_import", "`evaluate.py` on a run of a model of your own "
          "(`model.name: module:function`) where its module cannot be imported", 2,
          "cannot import", "the run folder as it was"),
    Fault("signal_stop", "SIGTERM to the trainer", 75,
          "stopped by a signal at step", "a checkpoint at that step; the exported model "
          "records it"),
    Fault("pack_out_is_source", "`pack.py folder my-images --out my-images` (`--out` is the "
          "source)", 2, "is the source folder", "every image, byte for byte: refused before "
          "one is read"),
    Fault("pack_out_holds_source", "`pack.py --out` names a parent of the source that holds "
          "other files (a thesis draft)", 2, "holds the source folder", "every file there, "
          "byte for byte"),
    Fault("pack_out_in_source", "`pack.py --out` inside the source folder", 2,
          "is inside the source folder", "the source as it was; nothing is written"),
    Fault("pack_out_foreign", "`pack.py --out` names a folder holding anything but a shard set "
          "(a set plus a user's file, a folder of documents)", 2,
          "not part of a shard set", "every file there, byte for byte (a shard set alone, or "
          "an empty folder, is replaced)"),
    Fault("pack_os_junk", "`Thumbs.db`, `desktop.ini`, `.DS_Store` or `._*` files in class "
          "folders", 0, "packed", "the images; those files are skipped, as hidden ones are"),
    Fault("stream_shard_gone", "a shard deleted while a `data.mode=stream` run reads it", 2,
          "disappeared while the run was reading its set", "what the run wrote so far: put the "
          "shard back or re-pack, then `--resume auto`"),
    # A run is one run (issue 38): tests/test_run_resume.py
    Fault("resume_finished_no_checkpoint", "`--resume auto` on a finished run whose "
          "`checkpoints/` was removed", 2, "holds a finished run",
          "the run's files, byte for byte (only `--overwrite` starts it afresh)"),
    Fault("resume_started_over", "`--resume auto` on a run that stopped before its first "
          "checkpoint", 0, "starting over; its files were moved to",
          "the earlier attempt, whole, in `<run-dir>.old-<time>`; no rows mix"),
    Fault("resume_config_changed", "`--resume auto` with a config that changes what is trained "
          "(`algorithm.name=boil`, `train.meta_batch_size`, `train.seed`, `optim.lr`, a "
          "`optim.decay_at` before the resume step, ...)", 2, "pass --allow-config-change",
          "the run's files, byte for byte"),
    Fault("resume_config_allowed", "the same with `--allow-config-change`", 0,
          "resume: from step", "the run, continued; run.json's `config_changes` records each "
          "change and its step; `evaluate` and `compare` show them"),
    Fault("resume_steps_extended", "`--resume auto` with more `train.steps`, or "
          "`optim.decay_at=[N]` at the resume step N (the README's resumes)", 0,
          "resume: from step", "the run, continued; the changes recorded in run.json"),
    Fault("resume_other_image_size", "`--resume auto` on shards of another image size", 2,
          "do not hold the images this run was trained on", "the run's files, byte for byte"),
    Fault("stop_in_validation", "Ctrl-C to `accelerate launch` (one process) during a "
          "validation longer than the launcher's 5 s", 130, "stopped by a signal at step",
          "a checkpoint of the last finished step; the resume validates it first, each row once"),
    Fault("stop_in_final_evaluation", "Ctrl-C to `accelerate launch` (one process) during the "
          "held-out evaluation at the end", 130,
          "stopped by a signal during the held-out evaluation", "the last step's checkpoint and "
          "the exported model; `--resume auto` evaluates again"),
    Fault("evaluate_in_progress", "`evaluate.py --checkpoint latest` on a run still training", 0,
          "the run is still training", "the run goes on; `eval-test.json` records "
          "`training_in_progress`"),
    # Pre-training and model.init_from (issue 41): tests/test_pretrain.py
    Fault("init_from_mismatch", "`model.init_from=RUN` where RUN's body has another "
          "architecture (another width)", 2, "its body does not fit the configured model",
          "RUN and the run folder as they were: refused before step 1, naming keys and shapes"),
    Fault("init_from_missing", "`model.init_from=PATH` where PATH does not exist", 2,
          "does not exist; give a run folder", "nothing is written"),
)
BY_KEY = {fault.key: fault for fault in FAULTS}


def render_table() -> str:
    rows = ["| what happened | exit code | the line says (in part) | what is kept |",
            "|---|---:|---|---|"]
    rows += [f"| {f.what} | {f.code} | \"{f.seen}\" | {f.kept} |" for f in FAULTS]
    return "\n".join(rows) + "\n"
