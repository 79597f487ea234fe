"""
Synthetic organizer/worker traces for the cold-start format SFT.

The paper had GPT-4o write traces; here small solvers write them, so every line of arithmetic in
a trace is true. The design rule: every token a thread writes follows from what it has already
seen, by arithmetic on one or two numbers or by looking a number up; nothing is guessed. A small
model can learn to write such text exactly, and then its answers are right. (A first design
wrote the solver's hidden search result, "make 30: 12+21=33 33-3=30", which a 2M-parameter model
cannot guess: 0% correct after SFT. See BENCHMARKS.md.)

Countdown, worked example (numbers 2 3 4 5 9 12, target 30, k = 4). The building block is an
ATTEMPT at one first step on a pair: its value v, the distance d to the target written as an
equation, and a scan for d among the numbers left, or for d = c + e with two of them:

    12+9=21 30-21=9: 9-2=7 9-3=6 9-4=5 ok     9-2=7 is not left, 9-3=6 neither, 9-4=5 is
    -> 12+9+4+5                               the expression (attempts that fail end in "no")

A worker's job is one PAIR of numbers: first the numbers it may use ("below 2 3 4 5": those
below b, for a+b and a-b; "rest 2 3 4 5": all but a and b), then an attempt for each first step
on the pair (12+9, 12-9, 12*9, 12/9 when exact), then <RETURN> with what it found ("none" if
nothing).

* sequential: the organizer does every pair itself, largest pairs first ("12 9" on its own
  line, the attempts, then the tally: "ok" and the answers found so far, or "no"), until it
  has k.
* parallel: the organizer forks the whole question to N workers; each does the sequential search
  in its own random pair order; the organizer joins all and answers the union.
* async: the organizer forks one worker per pair, largest first ("12 9 of 2 3 4 5 9 12 to 30"),
  keeps up to c-1 running (fork, fork, fork, join, fork, join, ...), tallies each join ("ok" and
  the answers so far, or "no"), stops forking once it has k, and answers. With probability
  `hint_share` the trace follows a random action sequence written into the prompt ("plan F1 F2
  J1 ...") instead: structure initialization, so the model learns many topologies, not one.

    <ORGANIZER>countdown 4 of 2 3 4 5 9 12 to 30
    <FORK-1>12 9 of 2 3 4 5 9 12 to 30</FORK-1><FORK-2>12 5 of ...</FORK-2><FORK-3>...</FORK-3>
    <JOIN-1>12+9+4+5</JOIN-1> ok A12+9+4+5
    <FORK-4>...</FORK-4><JOIN-2>none</JOIN-2> no
    <FORK-5>...</FORK-5><JOIN-3>12*3-(2+4)</JOIN-3> ok A12+9+4+5, B12*3-(2+4)
    ...
    <ANSWER>A12+9+4+5, B12*3-(2+4), C..., D...</ANSWER>      (a copy of the last tally)

  The letters label the items of the running list so that copying it is unambiguous
  (protocol.labelled says why); the verifier reads the answer without them.

Recursive organizers (depth 2, `countdown_tree_trace`): the organizer splits the pairs by their
larger number: a sub-organizer per number a ("12 of 2 3 4 5 9 12 to 30": the pairs (12, b) for
every b < 12) forks one pair worker per pair exactly as the organizer does at depth 1, tallies,
and returns what it found; the organizer tallies the sub-organizers' returns. Ids are scoped,
so the tree reaches up to 32 x 32 pairs where one organizer stops at MAX_FORKS = 32 (the paper
preset has 66), and the sub-queries are written by several threads at once.

Sudoku 4x4 (cells r1c1..r4c4, grid row-major, '.' blank). An attempt fills one UNIT (a row):
for each blank cell it writes the digits the cell's row, column and box exclude and what is
left, "r2c3 x124 =3" (3 is forced) or "r2c3 x14 ?" (still open). Async forks one worker per row
with blanks, joins them, writes the merged grid ("grid 12.4....") and repeats rounds until the
grid is full. Sequential does the same rows itself; parallel forks the whole puzzle to N workers
(each solving it sequentially, rows in its own order) and answers the majority grid.

Traces need not be optimal: the scan misses solutions (about 7% of small puzzles have fewer than
k it can find) and hinted plans stop early, which leaves RL work to do.
"""

import random
import re
import sys
from dataclasses import dataclass

import cli
import protocol as P
import tasks
import tools

# -----------------------------------------------------------------------------
# Countdown: one attempt

def apply(a, op, b):
    """a op b if every rule holds (positive integer result), else None."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a > b else None
    return a // b if b > 0 and a % b == 0 else None


def first_steps(numbers):
    """Every first step a op b (a >= b for + and *, so each is listed once) with its value."""
    steps = []
    for i, a in enumerate(numbers):
        for j, b in enumerate(numbers):
            if i == j:
                continue
            for op in "+-*/":
                if op in "+*" and a < b:
                    continue
                v = apply(a, op, b)
                if v is not None:
                    steps.append((a, op, b, v))
    return steps


def countdown_attempt(first, rest, target):
    r"""One attempt: (text, expression or None). `first` is (a, op, b, v), a >= b.

    Every token of the text follows from what is already written, by arithmetic on two numbers
    side by side or by looking a number up in the lists at the top of the worker's text:
    nothing is guessed, so a small model can learn to write it exactly. The search it writes
    out: with v = a op b, the distance d = |target - v| as an equation ("27-17=10": both
    operands in view, not one of them far back in the prompt); is d itself left ("have"), or is
    d = c + e for two numbers left (try each c < d in order)?

    >>> countdown_attempt((9, "+", 8, 17), [2, 3, 5, 7], 27)
    ('9+8=17 27-17=10: 10-2=8 10-3=7 ok\n-> 9+8+3+7', '9+8+3+7')
    >>> countdown_attempt((9, "-", 8, 1), [2, 3, 5, 7], 9)
    ('9-8=1 9-1=8: 8-2=6 8-3=5 ok\n-> 9-8+3+5', '9-8+3+5')

    A distance beyond the two largest numbers left (here 5 + 7 = 12) needs no scan:

    >>> countdown_attempt((9, "*", 8, 72), [2, 3, 5, 7], 27)
    ('9*8=72 72-27=45: no', None)

    A sum of several numbers would be found once by every pair in it, so after a+b or a-b the
    search uses only numbers below b (the worker's "below" list): each sum is found by its two
    largest numbers, and workers never return the same solution twice (the organizer just
    counts). Here 9+7 may use only 2, 3 and 5, and 11 is beyond 3 + 5:

    >>> countdown_attempt((9, "+", 7, 16), [2, 3, 5, 8], 27)
    ('9+7=16 27-16=11: no', None)
    """
    a, op, b, v = first
    head = f"{a}{op}{b}"
    text = f"{head}={v}"
    found = lambda expr: (f"{text} ok\n-> {expr}", expr)
    if v == target:
        return found(head)
    if v < target:
        d, sign = target - v, "+"
        text += f" {target}-{v}={d}:"
    else:
        d, sign = v - target, "-"
        text += f" {v}-{target}={d}:"
    left = below(b, rest) if op in "+-" else rest
    if d in left:
        text += " have"
        return found(f"{head}{sign}{d}")
    if len(left) < 2 or d > left[-1] + left[-2]:
        return text + " no", None  # beyond the two largest numbers left: nothing to scan
    for c in left:
        if c >= d:
            break
        e = d - c
        text += f" {d}-{c}={e}"
        if e in left and e != c:
            return found(f"{head}+{c}+{e}" if sign == "+" else f"{head}-({c}+{e})")
    return text + " no", None


def below(b, rest):
    """The numbers left that a search after a+b or a-b may use: those below b."""
    return [x for x in rest if x < b]


# -----------------------------------------------------------------------------
# Sudoku: one attempt fills the forced cells of one row

def sudoku_attempt(grid, row):
    """Fill row `row` (0-based) of the grid where a cell has one candidate left.
    Returns (text, {cell: digit} of the cells it fixed, the takeaway: "r1c2=3 r1c4=1" or "none")."""
    lines, fixed = [], {}
    for cell in range(row * 4, row * 4 + 4):
        if grid[cell] != ".":
            continue
        seen = sorted({grid[p] for p in tasks.PEERS[cell] if grid[p] != "."})
        left = [d for d in "1234" if d not in seen]
        name = f"r{row + 1}c{cell % 4 + 1}"
        if len(left) == 1:
            fixed[cell] = left[0]
            lines.append(f"{name} x{''.join(seen)} ={left[0]}")
        else:
            lines.append(f"{name} x{''.join(seen)} ?")
    result = " ".join(f"r{c // 4 + 1}c{c % 4 + 1}={d}" for c, d in fixed.items()) or "none"
    return "\n".join(lines), fixed, result


def fill(grid, fixed):
    g = list(grid)
    for cell, d in fixed.items():
        g[cell] = d
    return "".join(g)


# -----------------------------------------------------------------------------
# A trace: the organizer's and each worker's text, marked trained or not

def encode(pieces, tok: P.Tokenizer):
    """(ids, trained_mask) of one thread's [(text, trained)] pieces."""
    ids, mask = [], []
    for text, trained in pieces:
        t = tok.encode(text)
        ids += t
        mask += [trained] * len(t)
    return ids, mask


@dataclass
class Trace:
    """Each thread is a list of (text, trained) pieces: prompts and the text the executor would
    inject after <JOIN-i> are not trained on; everything the model itself would write is."""
    row: dict
    mode: str
    organizer: list
    workers: dict  # fork id -> [(text, trained)]
    answers: list
    tools: dict = None  # fork id -> a tool's answer (the forks that called one: no worker text)
    depth: int = 1      # 2: workers keyed by path ("3", "3.1"), sub-organizers among them

    def threads(self):
        return [self.organizer] + [self.workers[i] for i in sorted(self.workers)]

    def sequences(self, tok: P.Tokenizer):
        """[(ids, trained_mask)] per thread with something to train on, ready for SFT (loss where
        the mask is True); the organizer always comes first."""
        return [encode(pieces, tok) for pieces in self.threads()
                if pieces is self.organizer or any(trained for _, trained in pieces)]

    def parse(self, tok: P.Tokenizer, capacity=4):
        """The trajectory as the protocol sees it (prompts stripped), for checks and metrics."""
        body = lambda pieces: "".join(text for text, _ in pieces[1:])
        threads = {i: body(w) for i, w in self.workers.items()}
        return P.parse_text(body(self.organizer), {**threads, **(self.tools or {})}, tok, capacity,
                            task=self.row["task"], tools=P.TOOLS if self.tools else (), depth=self.depth)

    def text(self):
        out = "".join(t for t, _ in self.organizer)
        for i in sorted(self.workers, key=lambda i: [int(j) for j in str(i).split(".")]):
            out += f"\n--- worker {i} ---\n" + "".join(t for t, _ in self.workers[i])
        return out


class Organizer:
    """Writes an organizer thread: forks, joins (with the injected result), its own text."""

    def __init__(self, prompt):
        self.pieces, self.workers, self.results, self.tools = [(prompt, False)], {}, {}, {}
        self.nested = {}  # depth 2: "i.j" -> the pieces of worker j of sub-organizer i

    def say(self, text):
        self.pieces.append((text, True))

    def fork(self, i, sub_query, worker_text, result, trained=True):
        """Fork worker i. trained=False: a worker whose takeaway the organizer reads but whose own
        thread is not trained on (check traces' deliberate mistakes)."""
        open_, close, _, _ = P.fork_tags(i)
        self.say(f"{open_}{sub_query}{close}")
        self.workers[i] = [(P.worker_prompt(sub_query), False),
                           (f"{worker_text}\n{P.RETURN}{result}{P.RETURN_END}", trained)]
        self.results[i] = result

    def delegate(self, i, sub_query, sub: "Organizer", result):
        """Fork worker i as a sub-organizer: its thread is `sub`'s (a worker prompt, its own forks
        and joins), ending in <RETURN>result</RETURN>; its workers j become i.j."""
        open_, close, _, _ = P.fork_tags(i)
        self.say(f"{open_}{sub_query}{close}")
        sub.say(f"{P.RETURN}{result}{P.RETURN_END}")
        self.workers[i], self.results[i] = sub.pieces, result
        self.nested.update({f"{i}.{j}": pieces for j, pieces in sub.workers.items()})

    def call(self, i, tool, argument, answer):
        """A fork to a tool (tools.py): the organizer writes the call, nothing is a worker's text."""
        open_, close, _, _ = P.fork_tags(i)
        self.say(f"{open_}{tool}: {argument}{close}")
        self.results[i], self.tools[i] = answer, answer

    def join(self, i):
        _, _, open_, close = P.fork_tags(i)
        self.say(open_)
        self.pieces.append((f"{self.results[i]}{close}", False))  # injected by the executor
        return self.results[i]

    def answer(self, parts, labels=False):
        self.say(P.answer_text(parts, labels))


def sequential_trace(row, text, answers):
    """The organizer alone: its search text, then the answer."""
    org = [(P.organizer_prompt(P.question_text(row)), False), (f"{text}\n{P.answer_text(answers, labels=row['task'] == 'countdown')}", True)]
    return Trace(row, "sequential", org, {}, answers)


def run_plan(org: Organizer, n_tasks, capacity, actions=None, on_fork=None, on_join=None,
                  done=lambda: False):
    """Drive forks and joins: follow `actions` (a plan) if given, else keep up to
    capacity-1 workers busy (fork, fork, fork, join, fork, ...) until `done()` or out of tasks."""
    if actions is not None:
        for a in actions:
            (on_fork if a[0] == "F" else on_join)(int(a[1:]))
        return
    outstanding, next_id = [], 1
    while True:
        if next_id <= n_tasks and len(outstanding) < capacity - 1 and not done():
            on_fork(next_id); outstanding.append(next_id); next_id += 1
        elif outstanding:
            on_join(outstanding.pop(0))
        else:
            return


# -----------------------------------------------------------------------------
# Countdown traces in the three modes

def pairs_in_order(numbers):
    """Every pair (a, b) with a > b, largest first: for 2 5 9 12 that is (12, 9), (12, 5),
    (12, 2), (9, 5), (9, 2), (5, 2). One fixed order the organizer can follow token by token;
    big pairs first, because their sums land nearest the targets."""
    desc = sorted(numbers, reverse=True)
    return [(a, b) for i, a in enumerate(desc) for b in desc[i + 1:]]


def pair_attempts(a, b, numbers, target):
    """A worker's job in async mode: every first step on the pair (a, b), one attempt each,
    under two lists it writes first, so each attempt looks numbers up in its own text: "rest"
    (the numbers other than a and b) and "below" (those below b, for a+b and a-b).
    Returns (text, [expressions found]).

    >>> print(pair_attempts(5, 3, [1, 2, 3, 5, 7], 16)[0])
    below 1 2
    rest 1 2 7
    5+3=8 16-8=8: no
    5-3=2 16-2=14: no
    5*3=15 16-15=1: have ok
    -> 5*3+1
    """
    rest = [x for x in numbers if x not in (a, b)]
    lists = [f"below {' '.join(map(str, below(b, rest))) or '-'}", f"rest {' '.join(map(str, rest))}"]
    blocks, found = [], []
    for first in first_steps([a, b]):
        text, expr = countdown_attempt(first, rest, target)
        blocks.append(text)
        if expr is not None:
            found.append(expr)
    return "\n".join(lists + blocks), found


def tally(found, exprs, k):
    """Add expressions to `found` (canonical form -> expression) and return the tally the
    organizer writes after reading them: "ok" and its answers so far (the first k), when
    something new came in, else "no". The running list keeps every copy short and unambiguous:
    a tally copies the previous tally and the join just read, and the final answer copies the
    last tally. (A first design wrote a count, "ok 2", and the answer copied each expression
    from its join far back: 70% of those copied tokens were right after SFT.)

    >>> found = {}
    >>> tally(found, ["12+9+4+5"], 4), tally(found, [], 4), tally(found, ["12*3-6", "12+5+4+9"], 4)
    ('ok A12+9+4+5', 'no', 'ok A12+9+4+5, B12*3-6')
    """
    before = list(found.values())[:k]
    for expr in exprs:
        found.setdefault(tasks.canonical(expr), expr)
    now = list(found.values())[:k]
    return f"ok {P.labelled(now)}" if now != before else "no"


def countdown_search(numbers, target, k, pairs):
    """The sequential search: the same work as the async workers, done in one thread, pair by
    pair ("12 9" on a line, its attempts, then the tally) until k are found.
    Returns (text, found) where found maps canonical form -> expression."""
    found, blocks = {}, []
    for a, b in pairs:
        text, got = pair_attempts(a, b, numbers, target)
        blocks.append(f"{a} {b}\n{text}\n{tally(found, got, k)}")
        if len(found) >= k:
            break
    return "\n".join(blocks), found


def tree_shape(capacity, sub_organizers=None):
    """(m, w): m sub-organizers at once, each with w pair workers at once, so that the shared
    pool can never overflow whatever the timing: 1 + m * (1 + w) <= c. The default m is the
    largest that still leaves each sub-organizer 2 workers (measured: `traces.py stats --depth
    2`, BENCHMARKS.md), at least 1: c = 4 -> (1, 2), c = 8 -> (2, 2), c = 16 -> (5, 2).

    >>> tree_shape(8), tree_shape(16), tree_shape(16, sub_organizers=3)
    ((2, 2), (5, 2), (3, 4))
    """
    m = sub_organizers or max(1, (capacity - 1) // 3)
    w = (capacity - 1) // m - 1
    if w < 1:
        raise ValueError(f"c = {capacity} has no room for {m} sub-organizers with a worker each")
    return m, w


def countdown_tree_trace(row, rng: random.Random, capacity=4, sub_organizers=None, state_capacity=False,
                         same_pairs=False):
    """Depth 2: a sub-organizer per larger number a of a pair (the groups in pairs_in_order's
    order, at most MAX_FORKS of them), m of them at once; each forks a pair worker per pair
    (a, b), w at once (tree_shape), tallies and stops at k, and returns its finds ("none" if
    nothing); the organizer tallies the returns, stops forking at k, and answers. same_pairs:
    only the first MAX_FORKS pairs, the ones a depth-1 organizer can reach (to compare latency
    on the same work).

        <ORGANIZER>countdown 4 of 2 3 4 5 9 12 to 30
        <FORK-1>12 of 2 3 4 5 9 12 to 30</FORK-1><FORK-2>9 of ...</FORK-2><JOIN-1>12+9+4+5</JOIN-1> ok ...
    worker 1 (a sub-organizer):
        <WORKER>12 of 2 3 4 5 9 12 to 30
        <FORK-1>12 9 of 2 3 4 5 9 12 to 30</FORK-1><FORK-2>12 5 of ...</FORK-2><JOIN-1>...</JOIN-1> ok ...
        <RETURN>12+9+4+5, ...</RETURN>
    worker 1.1: the pair worker of (12, 9), as at depth 1.
    """
    numbers, target, k = row["numbers"], row["target"], row["k"]
    m, w = tree_shape(capacity, sub_organizers)
    pairs = pairs_in_order(numbers)[:P.MAX_FORKS if same_pairs else None]
    groups = list(dict.fromkeys(a for a, _ in pairs))[:P.MAX_FORKS]
    everything = " ".join(map(str, numbers))
    org = Organizer(P.organizer_prompt(P.question_text(row), capacity=capacity if state_capacity else None))
    found = {}

    def sub_organizer(a):
        mine = [(x, b) for x, b in pairs if x == a][:P.MAX_FORKS]
        sub, own = Organizer(P.worker_prompt(f"{a} of {everything} to {target}")), {}
        def on_fork(j):
            text, got = pair_attempts(*mine[j - 1], numbers, target)
            sub.fork(j, f"{mine[j - 1][0]} {mine[j - 1][1]} of {everything} to {target}", text,
                     P.ANSWER_SEPARATOR.join(got) or "none")
        def on_join(j):
            sub.say(f" {tally(own, P.parse_answer(sub.join(j), 'countdown'), k)}\n")
        run_plan(sub, len(mine), w + 1, None, on_fork, on_join, lambda: len(own) >= k)
        return sub, P.ANSWER_SEPARATOR.join(list(own.values())[:k]) or "none"

    def on_fork(i):
        a = groups[i - 1]
        sub, result = sub_organizer(a)
        org.delegate(i, f"{a} of {everything} to {target}", sub, result)

    def on_join(i):
        org.say(f" {tally(found, P.parse_answer(org.join(i), 'countdown'), k)}\n")

    run_plan(org, len(groups), m + 1, None, on_fork, on_join, lambda: len(found) >= k)
    answers = list(found.values())[:k]
    org.answer(answers, labels=True)
    workers = {**{str(i): pieces for i, pieces in org.workers.items()}, **org.nested}
    return Trace(row, "async", org.pieces, workers, answers, depth=2)


def countdown_trace(row, mode, rng: random.Random, capacity=4, n_parallel=None, hint_share=0.5,
                    check_share=0.0, state_capacity=False, depth=1, sub_organizers=None, width_share=0.0):
    """Sequential: all pairs in order in one thread. Parallel: N workers each do that search
    on the whole question in their own random order, the organizer answers the union. Async:
    one worker per pair, at most c-1 at once, stop forking at k. With check_share, that share
    of the async traces without a plan hand every returned expression to the check tool
    (check_calls) and tally only those it calls "ok"; in those, WRONG_SHARE of the workers that
    found something return a wrong variant instead (and are not trained on), so the organizer
    sees what a "no" means. state_capacity: the async prompt states c ("capacity 6"). depth 2:
    countdown_tree_trace (sub-organizers). width_share: that share of the async traces without a
    plan keep fewer workers busy (see countdown_async_trace)."""
    if depth > 1:
        if mode != "async" or depth > 2:
            raise ValueError(f"depth {depth} traces: only async countdown at depth 2")
        return countdown_tree_trace(row, rng, capacity, sub_organizers, state_capacity)
    numbers, target, k = row["numbers"], row["target"], row["k"]
    pairs = pairs_in_order(numbers)[:P.MAX_FORKS]
    if mode == "sequential":
        text, found = countdown_search(numbers, target, k, pairs)
        return sequential_trace(row, text, list(found.values())[:k])

    if mode == "parallel":
        return countdown_parallel_trace(row, rng, pairs, n_parallel or capacity - 1)
    if mode != "async":
        raise ValueError(f"unknown mode {mode!r} (sequential, parallel, async)")
    return countdown_async_trace(row, rng, pairs, capacity, hint_share, check_share, state_capacity,
                                 width_share)


def countdown_parallel_trace(row, rng, pairs, n):
    """Parallel: n workers each search the whole question in their own random order of the
    pairs; the organizer joins them all and answers the union."""
    numbers, target, k = row["numbers"], row["target"], row["k"]
    question = P.question_text(row)
    org, found = Organizer(P.organizer_prompt(question)), {}
    for i in range(1, n + 1):
        own = pairs[:]
        rng.shuffle(own)
        text, got = countdown_search(numbers, target, k, own)
        org.fork(i, question, text, P.ANSWER_SEPARATOR.join(got.values()) or "none")
    for i in range(1, n + 1):
        joined = org.join(i)
        org.say(f" {tally(found, P.parse_answer(joined, 'countdown'), k)}\n")
    answers = list(found.values())[:k]
    org.answer(answers, labels=True)
    return Trace(row, "parallel", org.pieces, org.workers, answers)


def countdown_async_trace(row, rng, pairs, capacity, hint_share, check_share, state_capacity,
                          width_share=0.0):
    """Async: one worker per pair, at most c - 1 at once, stop forking at k (see
    countdown_trace for the plan hint, the check tool and the stated capacity).

    width_share: that share of the traces without a plan keep only w workers busy, w drawn from
    1..c - 2 (w = 1 at c = 4: fork, join, fork, join, ...; slower, the same answers). Nothing in
    the prompt says w, so a model trained on them chooses a width itself, by sampling: the
    diverse structures from which RL's concurrency reward can pick (the paper's structure
    initialization). 0 (the default): every trace keeps c - 1 busy."""
    numbers, target, k = row["numbers"], row["target"], row["k"]
    question = P.question_text(row)
    actions = None
    if rng.random() < hint_share:
        actions = P.sample_plan(rng, rng.randint(2, min(8, len(pairs))), capacity)
    org = Organizer(P.organizer_prompt(question, " ".join(actions) if actions else None,
                                       capacity if state_capacity else None))
    found, checks = {}, iter(range(P.MAX_FORKS, len(pairs), -1)) if actions is None and rng.random() < check_share else None

    def on_fork(i):
        a, b = pairs[i - 1]
        text, got = pair_attempts(a, b, numbers, target)
        # the sub-query copies the question's numbers whole: a contiguous copy is easy to learn,
        # and the worker skips a and b itself (a first design made the organizer write the
        # numbers left, a set difference the small model never learned to copy)
        right = checks is None or not got or rng.random() >= WRONG_SHARE
        if not right:  # a worker that returns a mistake (not trained on: see check_calls)
            got = got[:-1] + [wrong_variant(got[-1], rng)]
        org.fork(i, f"{a} {b} of {' '.join(map(str, numbers))} to {target}", text,
                 P.ANSWER_SEPARATOR.join(got) or "none", trained=right)

    def on_join(i):
        got = P.parse_answer(org.join(i), "countdown")
        if checks is not None:
            got = check_calls(org, got, row, checks)
        org.say(f" {tally(found, got, k)}\n")

    width = capacity - 1
    if actions is None and width_share and capacity > 2 and rng.random() < width_share:
        width = rng.randint(1, capacity - 2)
    run_plan(org, len(pairs), width + 1, actions, on_fork, on_join, lambda: len(found) >= k)
    answers = list(found.values())[:k]
    org.answer(answers, labels=True)
    return Trace(row, "async", org.pieces, org.workers, answers, tools=org.tools)


WRONG_SHARE = 0.2  # check traces: the share of finds a worker returns with one number changed


def wrong_variant(expr, rng: random.Random):
    """The mistake a small worker makes most: one number of its expression off by one
    (wrong_variant("12*2-5", random.Random(0)) -> "12*1-5")."""
    parts = re.split(r"(\d+)", expr)
    spots = [j for j, part in enumerate(parts) if part.isdigit()]
    j = spots[-1] if rng.random() < 0.5 else rng.choice(spots)
    parts[j] = str(max(1, int(parts[j]) + rng.choice([-1, 1])))
    return "".join(parts)


def check_calls(org, exprs, row, ids):
    """Right after a join: each returned expression goes to the check tool (fork ids from the
    top, MAX_FORKS down, so they never meet the pairs' ids), joined at once; the expressions it
    calls "ok" are returned. The solver's workers are always right, so the traces show only
    the "ok" path: what to do with a "no" (leave it out of the tally) is written in the rule,
    and a trained model meets real ones from its own wrong workers.

    >>> org = Organizer("")
    >>> check_calls(org, ["12*2-5"], {"task": "countdown", "numbers": [2, 5, 12], "target": 19}, iter([32]))
    ['12*2-5']
    >>> "".join(text for text, _ in org.pieces[1:])
    '<FORK-32>check: 12*2-5</FORK-32><JOIN-32>ok</JOIN-32>'
    """
    kept = []
    for expr in exprs:
        i = next(ids, None)
        if i is None:  # out of fork ids: keep it unchecked
            kept.append(expr)
            continue
        answer = tools.check(expr, row)
        org.call(i, "check", expr, answer)
        org.join(i)
        if answer == "ok":
            kept.append(expr)
    return kept


# -----------------------------------------------------------------------------
# Sudoku traces in the three modes

def sudoku_search(grid, rng, budget=16):
    """The sequential solver: rows with blanks in a random order, each filled where forced,
    the grid rewritten after each row. Returns (text, final grid)."""
    blocks = []
    for _ in range(budget):
        rows = [r for r in range(4) if "." in grid[r * 4:r * 4 + 4]]
        if not rows:
            break
        r = rng.choice(rows)
        text, fixed, _ = sudoku_attempt(grid, r)
        grid = fill(grid, fixed)
        blocks.append(f"row {r + 1}\n{text}\ngrid {grid}")
    return "\n".join(blocks), grid


def sudoku_trace(row, mode, rng: random.Random, capacity=4, budget=16, n_parallel=None,
                 hint_share=0.5, state_capacity=False):
    grid = row["puzzle"]
    question = P.question_text(row)
    if mode == "sequential":
        text, grid = sudoku_search(grid, rng, budget)
        return sequential_trace(row, text, [grid] if "." not in grid else [])

    if mode == "parallel":
        n = n_parallel or capacity - 1
        org, votes = Organizer(P.organizer_prompt(question)), {}
        for i in range(1, n + 1):
            text, final = sudoku_search(grid, rng, budget)
            org.fork(i, question, text, final if "." not in final else "none")
        for i in range(1, n + 1):
            joined = org.join(i)
            if joined != "none":
                votes[joined] = votes.get(joined, 0) + 1
            org.say(f" votes {max(votes.values(), default=0)}\n")
        answers = [max(votes, key=votes.get)] if votes else []
        org.answer(answers)
        return Trace(row, mode, org.pieces, org.workers, answers)

    if mode != "async":
        raise ValueError(f"unknown mode {mode!r} (sequential, parallel, async)")
    # Rounds: fork a worker per row with blanks (at most capacity-1 at once), join, merge.
    org, next_id = Organizer(P.organizer_prompt(question, capacity=capacity if state_capacity else None)), 1
    for _ in range(budget):
        rows = [r for r in range(4) if "." in grid[r * 4:r * 4 + 4]]
        if not rows or next_id + len(rows) > P.MAX_FORKS + 1:
            break
        rows = rows[:capacity - 1]
        ids, merged = [], {}
        for r in rows:
            text, fixed, result = sudoku_attempt(grid, r)
            org.fork(next_id, f"sudoku {grid} row {r + 1}", text, result)
            merged.update(fixed)
            ids.append(next_id)
            next_id += 1
        for i in ids:
            org.join(i)
        new = fill(grid, merged)
        org.say(f"\ngrid {new}\n")
        if new == grid:
            break  # stuck: no forced cell in any row
        grid = new
    answers = [grid] if "." not in grid else []
    org.answer(answers)
    return Trace(row, mode, org.pieces, org.workers, answers)


def make_trace(row, mode, rng: random.Random, capacity=4, **kw):
    """A trace for a puzzle row in a thinking mode ('sequential', 'parallel', 'async')."""
    build = {"countdown": countdown_trace, "sudoku": sudoku_trace}.get(row.get("task"))
    if build is None:
        raise ValueError(f"unknown task {row.get('task')!r}")
    return build(row, mode, rng, capacity, **kw)


# -----------------------------------------------------------------------------
# Copy drills: exact copying, taught on its own

def copy_drill(numbers, rng: random.Random, n_items=(2, 6)):
    r"""A thread that only copies: a list of expressions in its prompt, the same list written
    back. The organizer copies expressions all the time (tallies, the answer) and a worker copies
    its finds into <RETURN>; each copy is exact only once the model has an induction head (attend
    to the token after the earlier occurrence of what was just written, and copy it). The traces
    alone did not grow one in a 15-minute run: the default model predicted copied numbers from
    their values, not from the text (BENCHMARKS.md). A copy drill can only be solved by copying.

    >>> copy_drill([2, 5, 9], random.Random(0))
    [('copy 2/5*9, 9*2-5, 9+2+5, 5/2*9, 9/5\n', False), ('-> 2/5*9, 9*2-5, 9+2+5, 5/2*9, 9/5\n', True)]
    """
    items = [tasks.random_expression(numbers, rng) for _ in range(rng.randint(*n_items))]
    text = P.ANSWER_SEPARATOR.join(items)
    return [(f"copy {text}\n", False), (f"-> {text}\n", True)]


def tally_drill(numbers, rng: random.Random, n_items=(1, 4)):
    r"""The copy drill `--copy-drills N` trains on: two lists on two lines, written back as one,
    the way an organizer's tally joins what it had with what a worker returned. Each copied item sits a
    different distance above its copy, so only a head that looks up "the token after the one I
    just wrote" solves it (copy_drill's copy is always straight below its source, which a head
    can learn as a fixed offset: that copy head did not help the organizer, BENCHMARKS.md).

    >>> tally_drill([2, 5, 9], random.Random(0))
    [('copy 2/5*9, 9*2-5, 9+2+5, 5/2*9\nand 5+9+2, 9*2-5\n', False), ('-> 2/5*9, 9*2-5, 9+2+5, 5/2*9, 5+9+2, 9*2-5\n', True)]
    """
    def some_expressions():
        return P.ANSWER_SEPARATOR.join(tasks.random_expression(numbers, rng) for _ in range(rng.randint(*n_items)))
    a, b = some_expressions(), some_expressions()
    return [(f"copy {a}\nand {b}\n", False), (f"-> {a}{P.ANSWER_SEPARATOR}{b}\n", True)]


# -----------------------------------------------------------------------------
# Command line: look at traces, and measure them

def trace_stats(task, mode, n=200, seed=0, capacity=4, hint_share=0.5, check_share=0.0, preset="small",
                depth=1, same_pairs=False, width_share=0.0):
    """Token lengths, latency, eta and answer quality of n traces (the default tokenizer).
    depth 2: countdown_tree_trace (same_pairs: on the pairs a depth-1 organizer reaches)."""
    tok = P.Tokenizer.numbers()
    rng = random.Random(seed)
    org, work, lat, eta, full, found = [], [], [], [], 0, 0
    checks = dict(check_share=check_share) if check_share and task == "countdown" and mode == "async" else {}
    if width_share and task == "countdown" and mode == "async":
        checks["width_share"] = width_share
    for row in tasks.make_puzzles(task, preset, n=n, seed=seed, split="train"):
        if depth > 1:
            trace = countdown_tree_trace(row, rng, capacity, same_pairs=same_pairs)
        else:
            trace = make_trace(row, mode, rng, capacity, hint_share=hint_share, **checks)
        traj = trace.parse(tok, capacity)
        if traj.errors:
            raise AssertionError(f"a solver's trace breaks the protocol: {traj.errors[0]}")
        seqs = trace.sequences(tok)
        org.append(len(seqs[0][0]))
        work += [len(ids) for ids, _ in seqs[1:]]
        lat.append(P.critical_path(traj))
        eta.append(P.concurrency(traj))
        full += len(trace.answers) >= row.get("k", 1)
        found += len(trace.answers)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0
    return dict(task=task, mode=mode, organizer_mean=mean(org), organizer_max=max(org),
                worker_mean=mean(work), worker_max=max(work, default=0),
                workers_per_episode=len(work) / n, latency=mean(lat), eta=mean(eta), complete=full / n,
                answers=found / n, pairs=len(pairs_in_order(row["numbers"])) if task == "countdown" else 0)


def main(argv=None):
    ap = cli.ArgumentParser(description="Synthetic SFT traces: show one, or measure many.")
    ap.add_argument("command", choices=["show", "stats"])
    ap.add_argument("--task", choices=["countdown", "sudoku"], default="countdown")
    ap.add_argument("--mode", choices=["sequential", "parallel", "async"], default=None,
                    help="default: async for show, all three for stats")
    ap.add_argument("--capacity", type=int, default=4, help="pool capacity c (organizer included)")
    ap.add_argument("--n", type=int, default=200, help="puzzles to measure (stats)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hint-share", type=float, default=0.5, help="share of async traces with a plan in the prompt")
    ap.add_argument("--check-share", type=float, default=0.0,
                    help="share of async countdown traces that check each find with the check tool")
    ap.add_argument("--width-share", type=float, default=0.0,
                    help="share of async countdown traces without a plan that keep fewer than c-1 workers busy")
    ap.add_argument("--preset", choices=sorted(tasks.COUNTDOWN_PRESETS), default="small",
                    help="countdown puzzle size ('paper': 12 numbers, targets 100..999)")
    ap.add_argument("--depth", type=int, default=1, choices=[1, 2],
                    help="2: async countdown with sub-organizers (show), or depth 1 against depth 2 (stats)")
    args = ap.parse_args(argv)
    if args.depth == 2 and (args.task != "countdown" or args.mode not in (None, "async")):
        ap.error("--depth 2 traces are async countdown ones")
    if args.capacity < 2 or args.n <= 0 or not all(0 <= x <= 1 for x in (args.hint_share, args.check_share, args.width_share)):
        ap.error("need --capacity >= 2, --n > 0, and --hint-share, --check-share and --width-share in [0, 1]")
    if args.command == "show":
        row = tasks.make_puzzles(args.task, args.preset, n=1, seed=args.seed, split="train")[0]
        mode = args.mode or "async"
        checks = dict(check_share=args.check_share) if args.check_share and args.task == "countdown" else {}
        if args.width_share and args.task == "countdown" and mode == "async":
            checks["width_share"] = args.width_share
        if args.depth == 2:
            checks = dict(depth=2)
        print(make_trace(row, mode, random.Random(args.seed), args.capacity, hint_share=args.hint_share,
                         **checks).text())
        return 0
    if args.depth == 2:
        return depth_table(args)
    print(f"{args.n} small-preset puzzles per row, c={args.capacity}, tokens of the default tokenizer (prompts included)")
    print("| task | mode | organizer tokens mean/max | worker tokens mean/max | workers/episode "
          "| latency | eta | traces with all k answers |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in [args.mode] if args.mode else ["sequential", "parallel", "async"]:
        s = trace_stats(args.task, mode, args.n, args.seed, args.capacity, args.hint_share, args.check_share,
                        width_share=args.width_share)
        print(f"| {s['task']} | {mode} | {s['organizer_mean']:.0f} / {s['organizer_max']} "
              f"| {s['worker_mean']:.0f} / {s['worker_max']} | {s['workers_per_episode']:.1f} "
              f"| {s['latency']:.0f} | {s['eta']:.2f} | {100 * s['complete']:.0f}% |")
    return 0


def depth_table(args):
    """`stats --depth 2`: the same puzzles at depth 1 (the paper's organizer) and depth 2
    (sub-organizers), both at c = --capacity, measured on the solver-written traces."""
    m, w = tree_shape(args.capacity)
    print(f"{args.n} {args.preset}-preset countdown puzzles, c={args.capacity} (one shared pool; depth 2: "
          f"{m} sub-organizers x {w} pair workers at once), traces without plans")
    print("| structure | pairs in reach | workers/episode | latency | eta | answers found (of k) "
          "| traces with all k |")
    print("|---|---|---|---|---|---|---|")
    for name, kw in [("depth 1: organizer + pair workers", dict(depth=1)),
                     ("depth 2, the same first 32 pairs", dict(depth=2, same_pairs=True)),
                     ("depth 2, every pair", dict(depth=2))]:
        s = trace_stats("countdown", "async", args.n, args.seed, args.capacity, hint_share=0.0,
                        preset=args.preset, **kw)
        reach = min(P.MAX_FORKS, s["pairs"]) if kw["depth"] == 1 or kw.get("same_pairs") else s["pairs"]
        print(f"| {name} | {reach} | {s['workers_per_episode']:.1f} | {s['latency']:.0f} | {s['eta']:.2f} "
              f"| {s['answers']:.2f} | {100 * s['complete']:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
