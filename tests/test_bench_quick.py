"""Smoke test of launch/bench.py --quick (the CI check of the benchmark): it runs, prints a
table with a row per method (numbers, or the reason a peer cannot run here), and every method
that ran agrees with fsl_dist's loop path on the meta-gradient; --resume keeps the measured cases,
also those outside its selection, and refuses another machine's run. No timing is asserted."""

import json
import statistics

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

    # resuming with another selection measures it and keeps the rows already in the file
    other_case = run("bench.py", ["--quick", "--models", "cnn", "--algorithms", "boil",
                                  "--methods", "loop", "--steps", "1", "--warmup", "0",
                                  "--threads", "2", "--json", str(out), "--resume"], timeout=120)
    widened = json.loads(out.read_text())["rows"]
    assert widened[:len(rows)] == rows
    assert [(r["algorithm"], r["method"]) for r in widened[len(rows):]] == [("boil", "loop")]
    assert other_case.stdout.count("| cnn | maml |") == len(METHODS)

    # --report prints the saved run's tables, with the per-case line against the best peer
    saved = run("bench.py", ["--report", "--json", str(out)], timeout=60)
    assert saved.stdout.count("| cnn | maml |") == len(METHODS)
    summary = [line for line in saved.stdout.splitlines()
               if line.startswith("| Conv-4 MAML, 5w1s15q, 1 step, meta-batch 8 |")]
    assert len(summary) == 1, saved.stdout
    rate = {r["method"]: r["tasks_per_s"] for r in rows if "tasks_per_s" in r}
    peers = [m for m in ("learn2learn", "higher", "torchopt") if m in rate]
    if peers:
        best = max(peers, key=rate.get)
        cells = summary[0].split(" | ")
        assert cells[2] == f"{rate[best]:.2f} ({best})"
        assert cells[3] == f"{rate['loop'] / rate[best]:.2f}x"

    # --resume refuses a run measured on another machine, and leaves its file as it was
    other = tmp_path / "other.json"
    saved_run = json.loads(out.read_text())
    other.write_text(json.dumps(saved_run | {"machine": "another CPU, 2 CPUs"}))
    before = other.read_bytes()
    refused = run("bench.py", ["--quick", "--models", "cnn", "--algorithms", "maml", "--steps", "1",
                               "--warmup", "0", "--threads", "2", "--json", str(other), "--resume"],
                  timeout=60, check=False)
    assert refused.returncode != 0
    assert str(other) in refused.stderr and "another CPU" in refused.stderr, refused.stderr
    assert saved_run["machine"] in refused.stderr
    assert other.read_bytes() == before


def test_bench_rounds_interleave_the_methods_and_pool_their_steps(tmp_path):
    """--rounds 2: every method is timed in two fresh processes, its row pools both rounds'
    steps, and the loop row carries its ratio to the best peer within each round."""
    out = tmp_path / "bench.json"
    result = run("bench.py", ["--quick", "--models", "cnn", "--algorithms", "maml",
                              "--methods", "loop", "torchopt", "--rounds", "2",
                              "--steps", "2", "--warmup", "0", "--threads", "2",
                              "--no-float64-check", "--json", str(out)], timeout=240)
    saved = json.loads(out.read_text())
    assert saved["rounds"] == 2
    rows = {r["method"]: r for r in saved["rows"]}
    assert "tasks_per_s" in rows["loop"]
    peer_ran = "tasks_per_s" in rows["torchopt"]  # the peer is installed here
    for method in ("loop", "torchopt") if peer_ran else ("loop",):
        row = rows[method]
        assert row["rounds"] == 2 and len(row["round_tasks_per_s"]) == 2, row
        assert len(row["step_times"]) == row["steps"] == 2, row
        assert row["tasks_per_s"] == 8 / statistics.median(row["step_times"])
    assert "in 2 rounds" in result.stdout
    if peer_ran:
        assert rows["torchopt"]["max_rel_diff"] <= 1e-5  # the check ran once, in the first round
        ratios = rows["loop"]["x_best_peer_rounds"]
        assert ratios == [a / b for a, b in zip(rows["loop"]["round_tasks_per_s"],
                                                 rows["torchopt"]["round_tasks_per_s"])]
        summary = [line for line in result.stdout.splitlines()
                   if line.startswith("| Conv-4 MAML, 5w1s15q, 1 step, meta-batch 8 |")]
        assert summary[0].split(" | ")[4] == " / ".join(f"{x:.2f}" for x in ratios)


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


def test_bench_predict_prints_a_row_per_case(tmp_path):
    out = tmp_path / "predict.json"
    result = run("bench_predict.py", ["--cases", "cnn_maml", "resnet_boil", "--seconds", "0.05",
                                      "--json", str(out)], timeout=240)
    assert result.stdout.startswith("machine: ")
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| cnn_maml", "| resnet_boil"]
    for row in json.loads(out.read_text())["rows"]:
        assert row["inner_steps"] == 3 and row["query_batch"] == 25
        assert min(row["adapt_ms"], row["images_per_s"], row["images_per_s_one"],
                   row["images_per_s_png"]) > 0


def test_bench_mamlpp_prints_a_row_per_option(tmp_path):
    out = tmp_path / "mamlpp.json"
    result = run("bench_mamlpp.py", ["--algorithms", "anil", "--inner-steps", "2", "--steps", "1",
                                     "--rounds", "1", "--width", "8", "--json", str(out)],
                 timeout=240)
    assert result.stdout.startswith("machine: ")
    rows = json.loads(out.read_text())["rows"]
    assert [r["option"] for r in rows] == ["second order", "MSL", "DA first-order phase", "LSLR",
                                           "BNWB", "BNWB + BNRS", "MSL + LSLR + BNWB + BNRS"]
    assert rows[0]["x_second_order"] == 1.0 and all(r["ms_per_step"] > 0 for r in rows)
