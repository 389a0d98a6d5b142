"""Smoke test of launch/bench.py --quick (the CI check of the benchmark): it runs, prints a
table with a row per method (numbers, or the reason a peer cannot run here), and every method
that ran agrees with fsl_dist's loop path on the meta-gradient. No timing is asserted."""

import json

from launching import run

METHODS = ["loop", "vmap", "default, bf16", "learn2learn", "higher", "torchopt"]


def test_bench_quick_prints_a_row_per_method(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench.py", ["--quick", "--models", "cnn", "--algorithms", "maml",
                              "--steps", "1", "--warmup", "0", "--threads", "2",
                              "--json", str(out)], timeout=240)
    table = [line for line in result.stdout.splitlines() if line.startswith("| cnn | maml |")]
    assert [line.split(" | ")[5] for line in table] == METHODS, result.stdout
    assert "Ceiling" in result.stdout and "float32" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == METHODS
    for r in rows:
        if r["method"] in ("loop", "vmap"):
            assert r["tasks_per_s"] > 0 and r["gflop_per_step"] > 0
        # every method ran, or (a peer) says why it cannot be imported here
        assert "error" not in r, r
        assert "tasks_per_s" in r or r.get("unavailable"), r
        if "max_rel_diff" in r and r["method"] != "default, bf16":
            assert r["max_rel_diff"] <= 1e-5, r
        if r["method"] == "default, bf16" and "cosine_float64" in r:
            assert r["cosine_float64"] > 0.9, r  # bf16 rounding, not different math
    assert json.loads(out.read_text())["complete"] is True

    # --resume keeps the cases already in the file instead of measuring them again
    again = run("bench.py", ["--quick", "--models", "cnn", "--algorithms", "maml",
                             "--steps", "1", "--warmup", "0", "--threads", "2",
                             "--json", str(out), "--resume"], timeout=120)
    assert json.loads(out.read_text())["rows"] == rows
    assert again.stdout.count("| cnn | maml |") == len(METHODS)


def test_bench_scaling_runs_each_layout_and_reports_the_all_reduce(packed, tmp_path):
    """launch/bench_scaling.py: one real accelerate launch per layout (1 process x 2 threads,
    2 gloo processes x 1 thread), world size checked, a table row per layout. No timing
    asserted beyond being measured."""
    out = tmp_path / "scaling.json"
    result = run("bench_scaling.py", [
        "--config", "configs/cnn_maml.yaml", "--steps", "4", "--warmup", "1",
        "--json", str(out), f"data.shards={packed('futurama')}", "model.width=8",
        "task.k_shot=1", "task.q_query=2", "train.meta_batch_size=4"], timeout=300)
    rows = json.loads(out.read_text())
    assert [(r["processes"], r["threads"], r["world_size"]) for r in rows] == [(1, 2, 1), (2, 1, 2)]
    for r in rows:
        assert r["steps_timed"] == 3 and r["tasks_per_s"] > 0
        assert 0 <= r["allreduce_share"] < 1
    assert result.stdout.count("| 1 x 2 |") == 1 and result.stdout.count("| 2 x 1 |") == 1
