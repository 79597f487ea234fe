"""Tests for tasks.py, checked against oracles written independently here:
- countdown: a brute force over every expression tree on every ordered subset of the
  numbers (split the sequence at each point, try each operator), with its own
  canonicaliser (nested sorted tuples) and Python's own `ast` to read tasks.py's output;
- sudoku: all 288 full grids enumerated from permutations of rows.
"""
import ast
import itertools
import json
import os
import subprocess
import sys
import time
from fractions import Fraction
from functools import lru_cache

import pytest
from hypothesis import given, settings, strategies as st

import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------
# Independent countdown oracle. A tree is an int or (op, left, right).

OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def apply(op, x, y):
    x, y = Fraction(x), Fraction(y)
    return {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]


@lru_cache(maxsize=None)
def trees_on(seq):
    """Every (value, tree) using the numbers of seq in that order, each intermediate a
    positive integer."""
    if len(seq) == 1:
        return [(seq[0], seq[0])]
    out = []
    for i in range(1, len(seq)):
        for x, lt in trees_on(seq[:i]):
            for y, rt in trees_on(seq[i:]):
                out += [(x + y, ("+", lt, rt)), (x * y, ("*", lt, rt))]
                if x > y:
                    out.append((x - y, ("-", lt, rt)))
                if x % y == 0:
                    out.append((x // y, ("/", lt, rt)))
    return out


def shape(tree):
    """Order-free structure: a +/- chain (or */ chain) becomes (family, sorted positive
    parts, sorted negative parts); parts are shapes themselves."""
    if isinstance(tree, int):
        return tree
    family = "+-" if tree[0] in "+-" else "*/"
    pos, neg = [], []

    def walk(t, positive):
        if not isinstance(t, int) and t[0] in family:
            walk(t[1], positive)
            walk(t[2], positive if t[0] in "+*" else not positive)
        else:
            (pos if positive else neg).append(shape(t))
    walk(tree, True)
    return (family, tuple(sorted(pos, key=repr)), tuple(sorted(neg, key=repr)))


def oracle_solutions(numbers, target, stop_at=None):
    """Shapes of all solutions, over ordered subsets of growing size (stop early if asked)."""
    found = set()
    for size in range(2, len(numbers) + 1):
        for seq in itertools.permutations(numbers, size):
            found |= {shape(t) for v, t in trees_on(seq) if v == target}
            if stop_at is not None and len(found) >= stop_at:
                return found
    return found


def ast_tree(text):
    """Read an expression with Python's parser (integers and + - * / only)."""
    def convert(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        assert isinstance(node, ast.BinOp) and type(node.op) in OPS, ast.dump(node)
        return (OPS[type(node.op)], convert(node.left), convert(node.right))
    return convert(ast.parse(text, mode="eval").body)


def oracle_valid(tree, numbers, target):
    leaves = []

    def value(t):
        if isinstance(t, int):
            leaves.append(t)
            return Fraction(t)
        v = apply(t[0], value(t[1]), value(t[2]))
        if v is None or v <= 0 or v.denominator != 1:
            raise ArithmeticError
        return v
    try:
        v = value(tree)
    except ArithmeticError:
        return False
    available = list(numbers)
    for x in leaves:
        if x not in available:
            return False
        available.remove(x)
    return len(leaves) >= 2 and v == target


# ----------------------------------------------------------------------------
# Parsing, evaluation, formatting.

def test_parse_evaluate_format():
    assert tasks.parse_expression("(25-7)*3") == ("*", ("-", 25, 7), 3)
    assert tasks.parse_expression(" 1 - 2 - 3 ") == ("-", ("-", 1, 2), 3)
    assert tasks.exact_value("48 / (3 + 1)") == 12
    assert tasks.exact_value("7/2") == Fraction(7, 2)
    assert tasks.exact_value(("+", 1, ("*", 2, 3))) == 7
    assert tasks.format_expression(("*", ("-", 25, 7), 3)) == "(25-7)*3"
    assert tasks.format_expression("((25-7)+12)") == "25-7+12"
    assert tasks.format_expression("48/(3+1)") == "48/(3+1)"
    assert tasks.format_expression("25-(7+12)") == "25-(7+12)"
    assert tasks.format_expression("24/(6/2)") == "24/(6/2)"
    assert tasks.format_expression("2*(3*4)") == "2*3*4"


BAD_EXPRESSIONS = ["2**3", "1+", "(1+2", "abc", "__import__('os')", "", "   ", "x+1", "1 2",
                   "-3+5", "2^3", "3.5", "1e3", "()", "1+2)", "\u0663+1", "1//2", "[1]",
                   "9" * 5000, "(" * 200 + "1" + ")" * 200, "+".join(["1"] * 400)]


@pytest.mark.parametrize("text", BAD_EXPRESSIONS)
def test_malformed_expressions(text):
    with pytest.raises(ValueError):
        tasks.parse_expression(text)
    reason = tasks.check_countdown(text, [1, 2, 3, 5], 6)
    assert reason.startswith("malformed: ") and "\n" not in reason


def test_non_string_answers_are_malformed():
    for answer in (None, 5, ["1+2"]):
        assert tasks.check_countdown(answer, [1, 2], 3).startswith("malformed")


# ----------------------------------------------------------------------------
# Canonical form.

@pytest.mark.parametrize("a,b,c", [(7, 5, 3), (12, 4, 2), (20, 19, 1), (9, 3, 25)])
def test_canonical_equivalences(a, b, c):
    same = [(f"{a}+{b}+{c}", f"{c}+({a}+{b})"), (f"{a}*{b}-{c}", f"{b}*{a}-{c}"),
            (f"{a}-({b}-{c})", f"{a}+{c}-{b}"), (f"({a}-{b})-{c}", f"{a}-({b}+{c})"),
            (f"{a}*({b}/{c})", f"{a}*{b}/{c}"), (f"{a}/({b}/{c})", f"{c}*{a}/{b}"),
            (f"({a}+{b})*{c}", f"{c}*({b}+{a})")]
    for x, y in same:
        assert tasks.canonical(x) == tasks.canonical(y), (x, y)
        assert shape(ast_tree(x)) == shape(ast_tree(y))
    different = [(f"{a}*{b}+{c}", f"{a}*({b}+{c})"), (f"{a}-{b}-{c}", f"{a}-({b}-{c})"),
                 (f"{a}/{b}/{c}", f"{a}/({b}/{c})"), (f"{a}+{b}", f"{a}*{b}")]
    for x, y in different:
        assert tasks.canonical(x) != tasks.canonical(y), (x, y)


def test_canonical_examples_from_docstring():
    assert tasks.canonical("7+(2+5)") == "2+5+7"
    assert tasks.canonical("13-(5-3)") == "13+3-5"
    assert tasks.canonical("12/(6/2)") == "12*2/6"


@st.composite
def trees(draw, pool=(1, 2, 3, 5, 7, 8, 12, 25), max_leaves=5):
    numbers = draw(st.permutations(pool))[: draw(st.integers(1, max_leaves))]

    def build(xs):
        if len(xs) == 1:
            return xs[0]
        i = draw(st.integers(1, len(xs) - 1))
        return (draw(st.sampled_from("+-*/")), build(xs[:i]), build(xs[i:]))
    return build(list(numbers))


@settings(max_examples=300, deadline=None)
@given(trees())
def test_canonical_properties(tree):
    text = tasks.format_expression(tree)
    key = tasks.canonical(text)
    assert shape(ast_tree(text)) == shape(tree)          # minimal parentheses keep the structure
    assert tasks.canonical(key) == key                    # idempotent
    assert shape(ast_tree(key)) == shape(tree)            # same structure, reordered
    try:
        value = tasks.exact_value(tree)
    except ValueError:
        return                                            # division by zero somewhere
    assert tasks.exact_value(key) == value == tasks.exact_value(text)
    pool = [1, 2, 3, 5, 7, 8, 12, 25]
    valid = oracle_valid(ast_tree(text), pool, value)  # (the text can be valid when the tree
    assert (tasks.check_countdown(text, pool, value) is None) == valid  # is not: 1+(2+(3-5)))
    if oracle_valid(tree, pool, value):  # a valid tree keeps valid text and canonical form
        assert tasks.check_countdown(text, pool, value) is None
        assert tasks.check_countdown(key, pool, value) is None


# ----------------------------------------------------------------------------
# Verifier and scorer.

def test_check_countdown_reasons():
    numbers, target = [3, 7, 12, 25], 48
    assert tasks.check_countdown("(25-7)*3-12+6", numbers, target) == "uses 6 which is not available"
    assert tasks.check_countdown("(25-7)*3-12+12", numbers, target) == "uses 12 twice"
    assert tasks.check_countdown("48", [48, 2], 48) == "uses fewer than two numbers"
    assert tasks.check_countdown("(25-7)*3/12", numbers, 4) == "non-positive or fractional intermediate 9/2"
    assert tasks.check_countdown("7-25+12*3", numbers, 18) == "non-positive or fractional intermediate -18"
    assert tasks.check_countdown("3-(25-25)", [3, 25, 25], 3) == "non-positive or fractional intermediate 0"
    assert tasks.check_countdown("25+12+7+3", numbers, target) == "equals 47 not 48"
    assert tasks.check_countdown("(25-7)*3-12+3", numbers + [3], 45) is None
    assert tasks.check_countdown("3*12+7*25", numbers, 211) is None
    assert tasks.check_countdown("25 + 12 + 7 + 3", numbers, 47) is None


def test_score_countdown():
    numbers, target = [2, 3, 5, 7, 11, 13], 24
    answers = ["11+13", "13+11", "3*(13-5)", "(13-5)*3", "2*(5+7)", "5*7-11", "5*7-11+0", "oops", "24"]
    assert tasks.score_countdown(answers, numbers, target) == 4
    assert tasks.score_countdown([], numbers, target) == 0


# ----------------------------------------------------------------------------
# Solver against the brute-force oracle.

@pytest.mark.parametrize("numbers,target", [([1, 2, 3, 4], 10), ([2, 3, 7, 9], 24), ([1, 5, 6, 8], 7),
                                            ([3, 4, 12, 25], 48), ([2, 3, 4, 8], 6), ([3, 5, 7, 11, 13], 26)])
def test_solver_matches_oracle(numbers, target):
    solutions = tasks.solve_countdown(numbers, target)
    expected = oracle_solutions(numbers, target)
    got = {shape(ast_tree(text)) for text in solutions.values()}
    assert got == expected and len(solutions) == len(expected)
    for key, text in solutions.items():
        assert tasks.canonical(text) == key
        assert tasks.check_countdown(text, numbers, target) is None
        assert tasks.check_countdown(key, numbers, target) is None
        assert oracle_valid(ast_tree(text), numbers, target)


def test_solver_limit_and_no_solution():
    assert tasks.solve_countdown([1, 2], 100) == {}
    some = tasks.solve_countdown([2, 3, 5, 7, 11, 13], 24, limit=3)
    assert len(some) == 3
    assert set(some) <= set(tasks.solve_countdown([2, 3, 5, 7, 11, 13], 24))
    assert tasks.solve_countdown([3, 7, 25], 54) == {"(25-7)*3": "3*(25-7)"}


def test_generated_small_puzzles_have_k_solutions():
    preset = tasks.COUNTDOWN_PRESETS["small"]
    rows = tasks.make_puzzles("countdown", "small", n=30, seed=7)
    for row in rows:
        numbers, target = row["numbers"], row["target"]
        assert row == {"task": "countdown", "numbers": sorted(set(numbers)), "target": target, "k": 4}
        assert len(numbers) == 6 and all(preset.lo <= x <= preset.hi for x in numbers)
        assert preset.target_lo <= target <= preset.target_hi
        assert len(oracle_solutions(numbers, target, stop_at=row["k"])) >= row["k"]


def test_paper_puzzles_fast_and_solvable():
    start = time.time()
    rows = tasks.make_puzzles("countdown", "paper", n=5, seed=3)
    assert time.time() - start < 10
    for row in rows:
        numbers, target = row["numbers"], row["target"]
        assert len(numbers) == 12 == len(set(numbers)) and 100 <= target <= 999
        solutions = tasks.solve_countdown(numbers, target, limit=4)
        shapes = {shape(ast_tree(text)) for text in solutions.values()}
        assert len(shapes) == 4
        assert all(oracle_valid(ast_tree(text), numbers, target) for text in solutions.values())


# ----------------------------------------------------------------------------
# Sudoku against all 288 grids.

def all_grids():
    rows = list(itertools.permutations("1234"))
    grids = []
    for r1, r2, r3, r4 in itertools.product(rows, repeat=4):
        cols_ok = all(len({r1[c], r2[c], r3[c], r4[c]}) == 4 for c in range(4))
        boxes_ok = all(len({a[c], a[c + 1], b[c], b[c + 1]}) == 4 for a, b in ((r1, r2), (r3, r4)) for c in (0, 2))
        if cols_ok and boxes_ok:
            grids.append("".join(r1 + r2 + r3 + r4))
    return grids


GRIDS = all_grids()


def matching(puzzle):
    return [g for g in GRIDS if all(p in (".", d) for p, d in zip(puzzle, g))]


def test_sudoku_oracle_and_solver_agree_on_the_empty_grid():
    assert len(GRIDS) == 288
    assert sorted(tasks.solve_sudoku("." * 16, limit=1000)) == sorted(GRIDS)


def test_generated_sudoku_unique():
    rows = tasks.make_puzzles("sudoku", "small", n=60, seed=11)
    givens = [16 - row["puzzle"].count(".") for row in rows]
    assert min(givens) == 4 and max(givens) == 10
    for row in rows:
        puzzle = row["puzzle"]
        assert set(row) == {"task", "puzzle"} and row["task"] == "sudoku"
        solutions = matching(puzzle)
        assert len(solutions) == 1
        assert tasks.solve_sudoku(puzzle) == solutions
        assert tasks.check_sudoku(solutions[0], puzzle) is None


def test_check_sudoku_reasons():
    puzzle = "2..33.2.....43.."
    (solution,) = matching(puzzle)
    assert tasks.check_sudoku(solution, puzzle) is None
    assert tasks.check_sudoku(" ".join(solution[i:i + 4] for i in range(0, 16, 4)), puzzle) is None
    swapped = solution.translate(str.maketrans("12", "21"))  # still a sudoku, breaks a given
    assert tasks.check_sudoku(swapped, puzzle) == "changes the given 2 at row 1 column 1"
    row_swap = solution[0:4][::-1] + solution[4:]  # row 1 reversed: columns now repeat
    assert tasks.check_sudoku(row_swap, "." * 16).split()[0] in ("column", "box")
    for bad in ("123", solution[:15] + "5", None, solution + "1"):
        assert tasks.check_sudoku(bad, puzzle).startswith("malformed")
    assert tasks.solve_sudoku("11" + "." * 14) == []
    with pytest.raises(ValueError):
        tasks.solve_sudoku("12345")


# ----------------------------------------------------------------------------
# Splits, files, command line.

@pytest.mark.parametrize("task,n", [("countdown", 40), ("sudoku", 60)])
def test_splits_disjoint(task, n):
    keys = {}
    for seed, split in enumerate(tasks.SPLITS):
        rows = tasks.make_puzzles(task, "small", n=n, seed=seed, split=split)
        assert all(tasks.split_of(row) == split for row in rows)
        keys[split] = {tasks.puzzle_key(row) for row in rows}
        assert len(keys[split]) == n  # no duplicates within a call
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    assert tasks.make_puzzles(task, "small", n=5, seed=0) == tasks.make_puzzles(task, "small", n=5, seed=0)


def test_split_buckets_cover_0_to_99():
    assert sorted(b for r in tasks.SPLIT_BUCKETS.values() for b in r) == list(range(100))


def test_load_jsonl(tmp_path):
    good = tmp_path / "good.jsonl"
    rows = [{"task": "countdown", "numbers": [1, 2, 3], "target": 6, "k": 2}, {"task": "sudoku", "puzzle": "1..4....2..3...."}]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert tasks.load_jsonl(good) == rows
    bad_lines = ['{"task": "countdown", "numbers": [1, 2], "target": 3', '{"task": "chess"}',
                 '{"task": "countdown", "numbers": [1, "2"], "target": 3, "k": 1}',
                 '{"task": "countdown", "numbers": [1, 2], "target": 3.0, "k": 1}',
                 '{"task": "countdown", "numbers": [1, 2], "target": 3}',
                 '{"task": "countdown", "numbers": [1, true], "target": 3, "k": 1}',
                 '{"task": "sudoku", "puzzle": "1..4....2..3..."}', '{"task": "sudoku", "puzzle": "1..4....2..3...5"}', "[1, 2]"]
    for bad in bad_lines:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(rows[0]) + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=rf"^{path}:2: "):
            tasks.load_jsonl(path)


def run_cli(*args):
    return subprocess.run([sys.executable, "tasks.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_cli_make():
    result = run_cli("make", "--task", "countdown", "--preset", "small", "--n", "5", "--seed", "-3", "--split", "val")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 5 and all(r["task"] == "countdown" and tasks.split_of(r) == "val" for r in rows)
    result = run_cli("make", "--task", "sudoku", "--preset", "paper", "--n", "3")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and len(rows) == 3 and all(len(matching(r["puzzle"])) == 1 for r in rows)


@pytest.mark.parametrize("args", [["make", "--task", "countdown", "--n", "0"],
                                  ["make", "--task", "countdown", "--preset", "huge"],
                                  ["make", "--task", "chess"], ["make", "--n", "3"], ["make", "--task", "sudoku", "--n", "x"],
                                  ["frobnicate"], []])
def test_cli_bad_input(args):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


def test_chance_matches_the_hand_computed_probability():
    # numbers 1 and 2: random_expression takes both, in one of 2 orders, with one of 4 ops,
    # all 8 equally likely; "1+2" and "2+1" make 3, so one guess in four is right.
    row = {"task": "countdown", "numbers": [1, 2], "target": 3, "k": 1}
    guess = tasks.chance([row], draws=4000, seed=3)
    assert set(guess) == {"ge1", "all"}
    assert abs(guess["ge1"] - 0.25) < 0.03 and guess["all"] == guess["ge1"]
    # target 5 is out of reach of 1 and 2: nothing can be right
    unreachable = dict(row, target=5, k=2)
    assert tasks.chance([unreachable], draws=50) == {"ge1": 0.0, "ge2": 0.0, "all": 0.0}
    # two answers asked for: both 1+2 and 2+1 are the same canonical answer, so never 2 distinct
    two = dict(row, k=2)
    guess = tasks.chance([two], draws=2000, seed=4)
    assert guess["ge2"] == 0.0 and guess["all"] == 0.0
    assert abs(guess["ge1"] - (1 - 0.75 ** 2)) < 0.04  # at least one of the two guesses right
    assert tasks.chance([{"task": "sudoku", "puzzle": "." * 16}]) == {}
