"""
The puzzles AsyncThink learns on, each with an exact verifier (no judgement calls).

Multi-solution countdown
------------------------
Given numbers and a target, write k *different* expressions that hit the target.
Each expression uses at least two of the numbers, each at most once, the operators
+ - * / (and parentheses), and every intermediate result must be a positive integer
(so a-b needs a > b and a/b needs b to divide a). Example, k = 4:

    numbers [2, 3, 5, 7, 11, 13], target 24
    answers  11+13    3*(13-5)    2*(5+7)    5*7-11          all valid, score 4
    (7+5)*2 would not add a fifth: it is 2*(5+7) reordered.

Two answers count as one when they are the same up to reordering. Precisely, the
canonical form of an expression flattens every chain of + and - into the terms it
adds and the terms it subtracts, and every chain of * and / into the factors it
multiplies and the factors it divides by; each list is sorted (as strings, after
canonicalising the terms themselves) and written back with minimal parentheses:

    c+(a+b)  -> a+b+c        b*a-c -> a*b-c        a-(b-c) -> a+c-b
    3*(13-5) -> (13-5)*3     12/(6/2) -> 12*2/6    (sorted as strings: "(" < "1" < "2")

The canonical form is itself a valid answer (positive terms come first, so every
running total stays positive). Note that it is purely structural: with a 1 among
the numbers, x*1 and x/1 are two different answers.

4x4 sudoku
----------
Digits 1-4 in a 4x4 grid with 2x2 boxes, written row-major as 16 characters with '.'
for a blank, e.g. "2..33.2.....43.." . Every puzzle has exactly one solution.

Splits: a puzzle goes to train/val/test by a hash of its identity (see split_of), so
different seeds can never leak a test puzzle into training.

    python tasks.py make --task countdown --preset small --n 1000 --seed 0 > train.jsonl
"""
import argparse
import hashlib
import itertools
import json
import operator
import random
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

from tqdm import tqdm

import cli

TASKS = ("countdown", "sudoku")
SPLITS = ("train", "val", "test")

# ----------------------------------------------------------------------------
# Parsing. A node is either an int or a tuple (op, left, right), op in "+-*/".
# "(25-7)*3" -> ('*', ('-', 25, 7), 3)

MAX_CHARS, MAX_DEPTH, MAX_DIGITS = 500, 50, 12
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")


def _tokenize(text):
    """"(25-7) * 3" -> ['(', 25, '-', 7, ')', '*', 3]"""
    tokens, pos, text = [], 0, text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"unexpected character {text[pos:].lstrip()[0]!r}")
        number, symbol = match.groups()
        if number is not None and len(number) > MAX_DIGITS:
            raise ValueError(f"number longer than {MAX_DIGITS} digits")
        tokens.append(int(number) if number is not None else symbol)
        pos = match.end()
    return tokens


def parse_expression(text):
    """Parse integers, + - * / and parentheses into a node; ValueError on anything else.
    Grammar (left-associative, * / bind tighter than + -):
        sum := product (('+'|'-') product)*     product := atom (('*'|'/') atom)*
        atom := integer | '(' sum ')'
    """
    if not isinstance(text, str):
        raise ValueError("expression must be a string")
    if len(text) > MAX_CHARS:
        raise ValueError(f"expression longer than {MAX_CHARS} characters")
    tokens = _tokenize(text)
    if not tokens:
        raise ValueError("empty expression")
    node, pos = _parse(tokens, 0, "sum", 0)
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} after a complete expression")
    return node


def _parse(tokens, pos, rule, depth):
    """Parse one `rule` of the grammar starting at tokens[pos]; return (node, next pos)."""
    if rule == "atom":
        if pos == len(tokens):
            raise ValueError("unexpected end of expression")
        if isinstance(tokens[pos], int):
            return tokens[pos], pos + 1
        if tokens[pos] != "(":
            raise ValueError(f"expected a number or '(' but found {tokens[pos]!r}")
        if depth >= MAX_DEPTH:
            raise ValueError("parentheses nested too deeply")
        node, pos = _parse(tokens, pos + 1, "sum", depth + 1)
        if pos == len(tokens) or tokens[pos] != ")":
            raise ValueError("missing ')'")
        return node, pos + 1
    ops, operand = (("+", "-"), "product") if rule == "sum" else (("*", "/"), "atom")
    node, pos = _parse(tokens, pos, operand, depth)
    while pos < len(tokens) and tokens[pos] in ops:
        op = tokens[pos]
        right, pos = _parse(tokens, pos + 1, operand, depth)
        node = (op, node, right)
    return node, pos


def exact_value(node_or_text):
    """Exact value as a Fraction: exact_value("48/(3+1)") == Fraction(12)."""
    node = parse_expression(node_or_text) if isinstance(node_or_text, str) else node_or_text
    if isinstance(node, int):
        return Fraction(node)
    op, left, right = node
    a, b = exact_value(left), exact_value(right)
    if op == "/" and b == 0:
        raise ValueError("division by zero")
    return _APPLY[op](a, b)


# ----------------------------------------------------------------------------
# Flattened expressions: canonical form and readable text, built bottom-up.

class Expr(NamedTuple):
    """An expression as the solver and canonical() see it.
    kind: 'n' a number, '+' a chain of + and -, '*' a chain of * and /
    up:   sorted canonical strings of the terms added (for '*': factors multiplied)
    down: sorted canonical strings of the terms subtracted (for '*': divided by)
    key:  the canonical form, e.g. up=('12','3'), down=('7',) of kind '+' -> "12+3-7"
    text: readable text in the order it was built, minimal parentheses, e.g. "3+12-7"
    value: its value (the solver's int; None when only the shape matters)
    """
    value: object
    kind: str
    up: tuple
    down: tuple
    key: str
    text: str


def leaf(x):
    return Expr(x, "n", (str(x),), (), str(x), str(x))


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "n": 3}


def combine(op, a, b, value=None):
    """The Expr for `a op b`. Chains merge: if a is "x+y" and op is '-', a's terms
    stay terms of the new chain and b's terms switch side. Checks nothing."""
    chain = "+" if op in "+-" else "*"
    parts = []
    for e in (a, b):
        if e.kind == chain:
            parts.append((e.up, e.down))
        elif e.kind == "+":  # a sum used as a factor needs parentheses
            parts.append((("(" + e.key + ")",), ()))
        else:
            parts.append(((e.key,), ()))
    (a_up, a_down), (b_up, b_down) = parts
    if op in "+*":
        up, down = sorted(a_up + b_up), sorted(a_down + b_down)
    else:
        up, down = sorted(a_up + b_down), sorted(a_down + b_up)
    plus, minus = ("+", "-") if chain == "+" else ("*", "/")
    key = plus.join(up) + "".join(minus + t for t in down)
    # Parentheses: around a looser operand, and on the right of - or / at equal level.
    left = f"({a.text})" if _PRECEDENCE[a.kind] < _PRECEDENCE[op] else a.text
    wrap_right = _PRECEDENCE[b.kind] < _PRECEDENCE[op] or (b.kind == chain and op in "-/")
    right = f"({b.text})" if wrap_right else b.text
    return Expr(value, chain, tuple(up), tuple(down), key, left + op + right)


def _to_expr(node):
    if isinstance(node, int):
        return leaf(node)
    op, left, right = node
    return combine(op, _to_expr(left), _to_expr(right))


def canonical(text):
    """Canonical form (see module docstring), a string that is itself an expression:
    canonical("7+(2+5)") == "2+5+7", canonical("13-(5-3)") == "13+3-5"."""
    return _to_expr(parse_expression(text)).key


def format_expression(node_or_text):
    """Render with minimal parentheses, keeping the order: ('*', ('-', 25, 7), 3) -> "(25-7)*3"."""
    node = parse_expression(node_or_text) if isinstance(node_or_text, str) else node_or_text
    return _to_expr(node).text


# ----------------------------------------------------------------------------
# Countdown: verifier, scorer, solver, generator.

def _strict_value(node):
    """Value of node; ValueError naming the first intermediate that is not a positive integer."""
    if isinstance(node, int):
        return Fraction(node)
    op, left, right = node
    a, b = _strict_value(left), _strict_value(right)
    if op == "/" and b == 0:
        raise ValueError("divides by zero")
    value = _APPLY[op](a, b)
    if value <= 0 or value.denominator != 1:
        raise ValueError(f"non-positive or fractional intermediate {value}")
    return value


def _leaves(node):
    return [node] if isinstance(node, int) else _leaves(node[1]) + _leaves(node[2])


def check_countdown(expr, numbers, target):
    """None if expr is a valid answer, else the reason, e.g.
    check_countdown("(25-7)*3", [3, 7, 25], 54) -> None
    check_countdown("25*2", [3, 7, 25], 50)     -> "uses 2 which is not available"
    check_countdown("7/3*3", [3, 7, 25], 7)     -> "uses 3 twice"   (checked before values)"""
    try:
        node = parse_expression(expr)
    except ValueError as e:
        return f"malformed: {e}"
    available, used = Counter(numbers), Counter()
    for x in _leaves(node):
        used[x] += 1
        if available[x] == 0:
            return f"uses {x} which is not available"
        if used[x] > available[x]:
            return f"uses {x} twice" if available[x] == 1 else f"uses {x} more than {available[x]} times"
    if sum(used.values()) < 2:
        return "uses fewer than two numbers"
    try:
        value = _strict_value(node)
    except ValueError as e:
        return str(e)
    return None if value == target else f"equals {value} not {target}"


def score_countdown(answers, numbers, target):
    """Number of distinct (by canonical form) valid answers: ["2+3", "3+2", "6-1"] for 5 -> 2."""
    return len({canonical(a) for a in answers if check_countdown(a, numbers, target) is None})


def _splits(mask):
    """Unordered ways to cut a set of positions (a bitmask) into two non-empty parts."""
    low = mask & -mask
    sub = (mask - 1) & mask
    while sub:
        if sub & low:
            yield sub, mask ^ sub
        sub = (sub - 1) & mask


def _all_expressions(mask, table):
    """Every valid expression using exactly the numbers in mask: {value: {key: Expr}}."""
    found = defaultdict(dict)
    for a_mask, b_mask in _splits(mask):
        for a in (e for group in table[a_mask].values() for e in group.values()):
            for b in (e for group in table[b_mask].values() for e in group.values()):
                x, y = a.value, b.value
                candidates = [("+", a, b, x + y), ("*", a, b, x * y)]
                if x != y:
                    candidates.append(("-", a, b, x - y) if x > y else ("-", b, a, y - x))
                if x % y == 0:
                    candidates.append(("/", a, b, x // y))
                if y % x == 0:
                    candidates.append(("/", b, a, y // x))
                for op, left, right, value in candidates:
                    e = combine(op, left, right, value)
                    found[value].setdefault(e.key, e)
    return found


def _hitting_target(left, right, target):
    """Expressions `a op b` == target, a from one table and b from the other. Instead of
    trying every pair, look up the b each a needs: a+b=T needs b=T-a, b/a=T needs b=T*a..."""
    if len(left) > len(right):
        left, right = right, left
    for a, a_group in left.items():
        needs = [("+", target - a, True), ("-", a - target, True), ("-", target + a, False),
                 ("/", target * a, False)]
        if target % a == 0:
            needs.append(("*", target // a, True))
        if a % target == 0:
            needs.append(("/", a // target, True))
        for op, b, a_first in needs:
            for eb in right.get(b, {}).values():
                for ea in a_group.values():
                    yield combine(op, ea, eb, target) if a_first else combine(op, eb, ea, target)


def solve_countdown(numbers, target, limit=None):
    """All distinct solutions as {canonical: readable}, e.g. [3, 7, 25] -> 54 gives
    {"(25-7)*3": "3*(25-7)"}. Searches subsets of the numbers in increasing size; for
    each subset size s it first looks for the target (cheap lookups), then, only if it
    must go on, tabulates every expression on s numbers for use by larger subsets.
    With `limit`, stops as soon as that many are found (returns at most `limit`)."""
    n = len(numbers)
    table = {1 << i: {x: {str(x): leaf(x)}} for i, x in enumerate(numbers)}
    solutions = {}
    for size in range(2, n + 1):
        masks = [sum(1 << i for i in chosen) for chosen in itertools.combinations(range(n), size)]
        for mask in masks:
            for a_mask, b_mask in _splits(mask):
                for e in _hitting_target(table[a_mask], table[b_mask], target):
                    solutions.setdefault(e.key, e.text)
            if limit is not None and len(solutions) >= limit:
                return dict(itertools.islice(solutions.items(), limit))
        if size < n:
            for mask in masks:
                table[mask] = _all_expressions(mask, table)
    return solutions


@dataclass(frozen=True)
class CountdownPreset:
    n_numbers: int  # how many distinct numbers
    lo: int         # numbers are drawn from lo..hi
    hi: int
    target_lo: int  # target is drawn from target_lo..target_hi
    target_hi: int
    k: int          # answers asked for; puzzles with fewer solutions are rejected


COUNTDOWN_PRESETS = {
    # small: the CPU default, sized so the traces' two-number scan finds k answers for 93% of
    # puzzles; medium: the GPU preset (87%); paper: the paper's scale (the scan finds k for ~12%)
    "small": CountdownPreset(n_numbers=6, lo=1, hi=12, target_lo=10, target_hi=30, k=4),
    "medium": CountdownPreset(n_numbers=8, lo=1, hi=25, target_lo=10, target_hi=99, k=4),
    "paper": CountdownPreset(n_numbers=12, lo=1, hi=99, target_lo=100, target_hi=999, k=4),
}


def make_countdown(preset, rng, split=None):
    """Draw random puzzles until one has at least k solutions (and is in `split`, if given)."""
    preset = COUNTDOWN_PRESETS[preset] if isinstance(preset, str) else preset
    while True:
        numbers = sorted(rng.sample(range(preset.lo, preset.hi + 1), preset.n_numbers))
        target = rng.randint(preset.target_lo, preset.target_hi)
        row = {"task": "countdown", "numbers": numbers, "target": target, "k": preset.k}
        if split is not None and split_of(row) != split:
            continue  # hash first: it is much cheaper than solving
        if len(solve_countdown(numbers, target, limit=preset.k)) >= preset.k:
            return row


# ----------------------------------------------------------------------------
# 4x4 sudoku. Cell i sits at row i // 4, column i % 4, box (row // 2, column // 2).

UNITS = ([(f"row {r + 1}", [4 * r + c for c in range(4)]) for r in range(4)]
         + [(f"column {c + 1}", [4 * r + c for r in range(4)]) for c in range(4)]
         + [(f"box {b + 1}", [4 * (2 * (b // 2) + r) + 2 * (b % 2) + c for r in (0, 1) for c in (0, 1)])
            for b in range(4)])
PEERS = [sorted({j for _, unit in UNITS if i in unit for j in unit} - {i}) for i in range(16)]


def _check_puzzle_string(puzzle):
    if not isinstance(puzzle, str) or len(puzzle) != 16 or set(puzzle) - set(".1234"):
        raise ValueError("a sudoku puzzle is 16 characters from '.1234'")


def solve_sudoku(puzzle, limit=2):
    """Up to `limit` solutions by backtracking (fill the first blank with each digit
    that no peer already has). A uniquely solvable puzzle gives a list of one."""
    _check_puzzle_string(puzzle)
    cells = list(puzzle)
    if any(d != "." and any(cells[p] == d for p in PEERS[i]) for i, d in enumerate(cells)):
        return []  # the givens already clash
    solutions = []

    def fill():
        if "." not in cells:
            solutions.append("".join(cells))
            return
        i = cells.index(".")
        for d in "1234":
            if all(cells[p] != d for p in PEERS[i]):
                cells[i] = d
                fill()
                cells[i] = "."
                if len(solutions) >= limit:
                    return
    fill()
    return solutions


def check_sudoku(grid, puzzle):
    """None if grid (16 digits, whitespace ignored) solves puzzle, else the reason, e.g.
    "changes the given 3 at row 1 column 2" or "column 4 repeats 2"."""
    grid = "".join(grid.split()) if isinstance(grid, str) else ""
    if len(grid) != 16 or set(grid) - set("1234"):
        return "malformed: expected 16 digits from 1-4"
    for i, (g, p) in enumerate(zip(grid, puzzle)):
        if p != "." and g != p:
            return f"changes the given {p} at row {i // 4 + 1} column {i % 4 + 1}"
    for name, unit in UNITS:
        repeated = [d for d, count in Counter(grid[i] for i in unit).items() if count > 1]
        if repeated:
            return f"{name} repeats {repeated[0]}"
    return None


_ALL_GRIDS = []


def make_sudoku(rng, min_givens=4, max_givens=10, split=None):
    """Pick one of the 288 full grids, choose a number of givens uniformly in range, then
    blank cells in random order, keeping a blank only if the solution stays unique. If
    it gets stuck above that count (any further blank breaks uniqueness), retry with a
    fresh grid and order, so the number of givens stays uniform.
    Sudoku has one preset: 'small' and 'paper' are the same 4x4 puzzles."""
    if not _ALL_GRIDS:
        _ALL_GRIDS.extend(solve_sudoku("." * 16, limit=1000))
    wanted = rng.randint(min_givens, max_givens)
    while True:
        grid = rng.choice(_ALL_GRIDS)
        puzzle, givens = list(grid), 16
        for i in rng.sample(range(16), 16):
            if givens == wanted:
                break
            puzzle[i] = "."
            if len(solve_sudoku("".join(puzzle), limit=2)) == 1:
                givens -= 1
            else:
                puzzle[i] = grid[i]
        row = {"task": "sudoku", "puzzle": "".join(puzzle)}
        if givens == wanted and (split is None or split_of(row) == split):
            return row


# ----------------------------------------------------------------------------
# Splits, puzzle sets, files.

SPLIT_BUCKETS = {"train": range(0, 90), "val": range(90, 95), "test": range(95, 100)}


def puzzle_key(row):
    """What identifies a puzzle: "countdown 2,3,5,7,11,13 -> 24" or "sudoku 2..33.2.....43..".
    (k is not part of it: the same numbers and target are the same puzzle.)"""
    if row["task"] == "countdown":
        return f"countdown {','.join(map(str, sorted(row['numbers'])))} -> {row['target']}"
    return f"sudoku {row['puzzle']}"


def split_of(row):
    """train / val / test from sha1(puzzle_key) % 100: buckets 0-89 / 90-94 / 95-99."""
    bucket = int(hashlib.sha1(puzzle_key(row).encode()).hexdigest(), 16) % 100
    return next(name for name, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def make_puzzles(task, preset="small", n=100, seed=0, split="train", progress=False):
    """n distinct puzzles of `split`, reproducible from seed (sudoku ignores the preset)."""
    if task not in TASKS or preset not in COUNTDOWN_PRESETS or split not in SPLITS or n <= 0:
        raise ValueError(f"bad arguments: task={task!r} preset={preset!r} split={split!r} n={n}")
    rng, rows, seen = random.Random(seed), [], set()
    bar = tqdm(total=n, file=sys.stderr, desc=f"{task} {split}") if progress else None
    for attempt in itertools.count():
        if len(rows) == n:
            break
        if attempt > 100 * n + 1000:
            raise RuntimeError(f"could not find {n} distinct {task} puzzles for {split}")
        row = make_countdown(preset, rng, split) if task == "countdown" else make_sudoku(rng, split=split)
        if puzzle_key(row) not in seen:  # no duplicates within one set
            seen.add(puzzle_key(row))
            rows.append(row)
            if bar:
                bar.update()
    if bar:
        bar.close()
    return rows


def _row_problem(row):
    """What is wrong with a puzzle row, or None."""
    def ints(*xs):
        return all(type(x) is int for x in xs)  # (not bool)
    if not isinstance(row, dict) or row.get("task") not in TASKS:
        return f"expected an object whose 'task' is one of {list(TASKS)}"
    if row["task"] == "sudoku":
        puzzle = row.get("puzzle")
        ok = isinstance(puzzle, str) and len(puzzle) == 16 and not set(puzzle) - set(".1234")
        return None if ok else "'puzzle' must be 16 characters from '.1234'"
    numbers = row.get("numbers")
    if not isinstance(numbers, list) or len(numbers) < 2 or not ints(*numbers):
        return "'numbers' must be a list of at least two integers"
    if not ints(row.get("target"), row.get("k")) or row["k"] < 1:
        return "'target' must be an integer and 'k' a positive integer"
    return None


def load_jsonl(path):
    """Read puzzle rows, raising ValueError("path:line: what is wrong") on a bad line."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            problem = _row_problem(row)
            if problem:
                raise ValueError(f"{path}:{lineno}: {problem}")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------
# The chance floor: what guessing scores

def random_expression(numbers, rng: random.Random):
    """A countdown-looking expression over 2-4 of the numbers, true or not: "12+8-(2+7)"."""
    xs = [str(x) for x in rng.sample(numbers, rng.randint(2, min(4, len(numbers))))]
    ops = [rng.choice("+-*/") for _ in xs[1:]]
    if len(xs) >= 3 and rng.random() < 0.3:
        return "".join(x + o for x, o in zip(xs[:-2], ops)) + f"({xs[-2]}{ops[-1]}{xs[-1]})"
    return xs[0] + "".join(o + x for o, x in zip(ops, xs[1:]))


def chance(rows, draws=100, seed=0):
    """What guessing scores: the share of countdown puzzles with at least j distinct correct
    answers (ge1..gek) and all k correct, for a guesser that writes k random_expression()s per
    puzzle, averaged over `draws` guesses of every puzzle. The floor a trained model must clear:
    on the README's 100 test puzzles (small preset) it is >=1 3.6%, >=2 0.07%, all 0%.
    Numbers 1 and 2, target 3: one guess in four is "1+2" or "2+1" (the others are 1-2, 1*2, ...):

    >>> chance([{"task": "countdown", "numbers": [1, 2], "target": 3, "k": 1}], draws=50)
    {'ge1': 0.26, 'all': 0.26}
    """
    rng = random.Random(seed)
    rows = [r for r in rows if r.get("task", "countdown") == "countdown"]
    if not rows:
        return {}
    k = max(r["k"] for r in rows)
    hits = {j: 0 for j in range(1, k + 1)}
    n_all = 0
    for _ in range(draws):
        for r in rows:
            guesses = [random_expression(r["numbers"], rng) for _ in range(r["k"])]
            n = score_countdown(guesses, r["numbers"], r["target"])
            for j in range(1, n + 1):
                hits[j] += 1
            n_all += n >= r["k"]
    total = draws * len(rows)
    return {**{f"ge{j}": hits[j] / total for j in range(1, k + 1)}, "all": n_all / total}


# ----------------------------------------------------------------------------
# Command line.

def _positive_int(text):
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def main(argv=None):
    parser = cli.ArgumentParser(prog="tasks.py", description="Generate AsyncThink puzzles as JSONL.")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="print n puzzles as JSONL on stdout")
    make.add_argument("--task", choices=TASKS, required=True)
    make.add_argument("--preset", choices=sorted(COUNTDOWN_PRESETS), default="small")
    make.add_argument("--n", type=_positive_int, default=100)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--split", choices=SPLITS, default="train")
    args = parser.parse_args(argv)
    rows = make_puzzles(args.task, args.preset, args.n, args.seed, args.split, progress=args.n > 200)
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
