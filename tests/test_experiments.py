"""experiments.py end to end on the quick budget (tiny models): every table and plot is written
from measured rows, and a second run reuses the trained checkpoints instead of retraining."""
import json
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "experiments.py", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    r = run("--budget", "quick", "--out", str(d / "results"), "--report", str(d / "RESULTS.md"), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    return d, r


def test_quick_experiment_writes_every_table_and_plot(quick):
    d, _ = quick
    report = (d / "RESULTS.md").read_text()
    for heading in ("## Headline", "## 1. Countdown", "## 2. Ablations", "## 3. Sudoku", "## 4. Capacity sweep",
                    "## 5. RL dynamics", "## Training time per model"):
        assert heading in report
    for name in ("frontier.png", "capacity.png", "rl_curves.png", "timeline.png"):
        assert (d / "results" / name).stat().st_size > 1000
        assert f"](results/{name})" in report  # links relative to the report
    res = json.loads((d / "results" / "results.json").read_text())
    names = [r["name"] for r in res["rows"]]
    for name in ("sequential L24", "sequential L48", "parallel L24", "parallel L48", "AsyncThink", "no R_η",
                 "no format SFT", "no RL", "sudoku sequential", "sudoku parallel", "sudoku async",
                 "countdown async, zero-shot", "AsyncThink c=2, plan", "AsyncThink c=8, plan"):
        assert name in names
    for r in res["rows"]:  # every row was measured on the same number of test puzzles
        assert r["n"] == 8 and 0 <= r["all_correct"] <= r["ge1"] <= 100
        assert f"| {r['name']} | {r['mode']} | {r['capacity']} |" in report
    seq = next(r for r in res["rows"] if r["name"] == "sequential L24")
    assert seq["capacity"] == 1 and seq["organizer_tokens"] == 24 and seq["latency"] <= 24


def test_second_run_reuses_checkpoints(quick):
    d, _ = quick
    r = run("--budget", "quick", "--out", str(d / "results"), "--report", str(d / "RESULTS.md"), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("reusing") == 14  # 3 modes x 2 stages, 2 ablations, 3 sudoku x 2 stages
    assert "python train.py" not in r.stdout


def test_rewrite_report_reproduces_the_report_from_results_json(quick, tmp_path):
    d, _ = quick
    again = tmp_path / "AGAIN.md"
    r = run("--rewrite-report", "--out", str(d / "results"), "--report", str(again))
    assert r.returncode == 0, r.stderr[-2000:]
    strip_links = lambda text: text.replace("](" + str(d / "results"), "](results")
    original = (d / "RESULTS.md").read_text()
    assert "python train.py" not in r.stdout and "evaluating" not in r.stdout
    # the same tables and times; only the plots' relative links differ (the report moved)
    assert strip_links(again.read_text()).split("![")[0] == original.split("![")[0]
    assert again.read_text().count("|") == original.count("|")


def test_rewrite_report_refuses_a_folder_without_results(tmp_path):
    r = run("--rewrite-report", "--out", str(tmp_path), "--report", str(tmp_path / "R.md"))
    assert r.returncode == 2 and "is not a results.json a finished run wrote" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "R.md").exists()


@pytest.mark.parametrize("budget", ["cpu", "gpu"])
def test_every_budget_writes_train_commands_that_train_py_accepts(budget, tmp_path):
    """The gpu budget cannot run here, but each of its train.py command lines must parse, with the
    gpu recipe's model, puzzles and dtype (a typo in a flag would only show on the GPU)."""
    import experiments
    import train
    b = experiments.BUDGETS[budget]
    jobs = [experiments.train_job(b, str(tmp_path), f"{task}-{mode}", stage, task, mode, steps, ["--seed", "0", *extra], "cuda")
            for stage, extra in [("sft", []), ("rl", []), ("rl", ["--no-concurrency-reward"]), ("rl", ["--from-scratch"])]
            for task, steps in [("countdown", b["sft_steps"]), ("sudoku", b["sudoku_sft_steps"])]
            for mode in ("sequential", "parallel", "async")]
    for _, _, argv in jobs:
        cfg = train.parse_args(argv)
        assert cfg.device == "cuda" and cfg.model == train.PRESETS[b["preset"]]["model"]
    if budget == "gpu":
        assert (cfg.model, cfg.puzzles, cfg.dtype) == ("medium", "medium", "bfloat16")
