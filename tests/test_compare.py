"""compare.py: the paired comparison, against values computed by hand."""
import json
import subprocess
import sys

import numpy as np
import pytest

import compare


def rec(i, n_correct, latency=100, errors=(), k=4):
    return {"task": "countdown", "numbers": [1, 2, 3, 4, 5, i + 6], "target": 10 + i, "k": k,
            "n_correct": n_correct, "correct": n_correct >= k, "format_errors": list(errors),
            "latency": latency, "concurrency": 2.0, "tokens": 500}


def test_mcnemar_by_hand():
    # 6 discordant pairs, 1 of them for A: 2 * P(X <= 1), X ~ Bin(6, 1/2) = 2 * 7/64
    assert compare.mcnemar(5, 1) == pytest.approx(14 / 64)
    assert compare.mcnemar(1, 5) == pytest.approx(14 / 64)
    assert compare.mcnemar(3, 3) == 1.0
    assert compare.mcnemar(20, 0) == pytest.approx(2 / 2 ** 20)


def test_constant_difference_has_a_zero_width_interval():
    diff = np.full(50, -10.0)
    assert compare.bootstrap_interval(diff, 500) == (-10.0, -10.0)


def test_bootstrap_interval_matches_the_normal_approximation():
    # 400 puzzles, difference +1 on 120, -1 on 40, 0 else: mean 0.2, sd sqrt(0.4 - 0.04) = 0.6,
    # so the 95% interval is about 0.2 +- 1.96 * 0.6 / 20 = [0.141, 0.259]
    diff = np.array([1.0] * 120 + [-1.0] * 40 + [0.0] * 240)
    low, high = compare.bootstrap_interval(diff, 20_000)
    assert low == pytest.approx(0.2 - 1.96 * 0.03, abs=0.006)
    assert high == pytest.approx(0.2 + 1.96 * 0.03, abs=0.006)


def test_compare_pairs_by_puzzle_not_by_line():
    # A: puzzles 0..9, correct on 0 and 1. B (in reverse order, with one extra puzzle): correct
    # on 0, 2, 3, 4, 5, 6 -> B only 5, A only 1 (puzzle 1); all-correct 20% -> 60%
    a = [rec(i, 4 if i in (0, 1) else 1, latency=200) for i in range(10)]
    b = [rec(i, 4 if i in (0, 2, 3, 4, 5, 6) else 0, latency=150) for i in range(11)][::-1]
    r = compare.compare(a, b, n_boot=1000)
    assert (r["n"], r["only_a"], r["only_b"]) == (10, 0, 1)
    assert r["all"]["a"] == pytest.approx(0.2) and r["all"]["b"] == pytest.approx(0.6)
    assert (r["all"]["b_only"], r["all"]["a_only"]) == (5, 1)
    assert r["all"]["p"] == pytest.approx(14 / 64)
    assert r["ge1"]["diff"] == pytest.approx(-0.4)       # A had >= 1 everywhere, B on 6 of 10
    assert (r["latency"]["diff"], r["latency"]["low"], r["latency"]["high"]) == (-50, -50, -50)


def test_duplicate_puzzles_and_disjoint_files_are_refused():
    with pytest.raises(ValueError, match="twice"):
        compare.compare([rec(0, 1), rec(0, 2)], [rec(0, 1)])
    with pytest.raises(ValueError, match="no puzzle in common"):
        compare.compare([rec(0, 1)], [rec(1, 1)])


def test_command_line(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(rec(i, 4 if i < 2 else 0)) + "\n" for i in range(10)))
    b.write_text("".join(json.dumps(rec(i, 4 if i < 7 else 0)) + "\n" for i in range(10)))
    run = lambda *args: subprocess.run([sys.executable, "asyncthink.py", "compare", *map(str, args)],
                                       capture_output=True, text=True)
    r = run(a, b)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("all correct"))
    assert line.split()[2:5] == ["20.0", "70.0", "+50.0"] and "B only 5, A only 0" in line
    # bad input: one line on stderr, exit 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "countdown", "numbers": [1, 2], "target": 3}\n')  # puzzles, not records
    for args in [(a, tmp_path / "missing.jsonl"), (a, bad), (a, b, "--bootstrap", "5")]:
        r = run(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr
