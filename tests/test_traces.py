"""traces.py: every synthetic trace is a valid trajectory, its arithmetic is true, its answers
are correct by the exact verifiers, and its SFT masks train only what the model would write."""
import random
import re

import pytest

import protocol as P
import tasks
import traces

tok = P.Tokenizer.bytes_level()
MODES = ("sequential", "parallel", "async")


@pytest.fixture(scope="module")
def rows():
    return {task: tasks.make_puzzles(task, "small", n=25, seed=3, split="train")
            for task in ("countdown", "sudoku")}


@pytest.mark.parametrize("task", ["countdown", "sudoku"])
@pytest.mark.parametrize("mode", MODES)
def test_traces_are_valid_and_correct(rows, task, mode):
    rng = random.Random(0)
    for row in rows[task]:
        for capacity in (2, 3, 4):
            trace = traces.make_trace(row, mode, rng, capacity=capacity)
            traj = trace.parse(tok, capacity)
            assert traj.errors == [], (traj.errors, trace.text())
            assert traj.answers == trace.answers
            if task == "countdown":
                # every answer verified independently, and all distinct
                for expr in trace.answers:
                    assert tasks.check_countdown(expr, row["numbers"], row["target"]) is None
                assert tasks.score_countdown(trace.answers, row["numbers"], row["target"]) == len(trace.answers)
                assert len(trace.answers) <= row["k"]
            else:
                for grid in trace.answers:
                    assert tasks.check_sudoku(grid, row["puzzle"]) is None
            if mode == "sequential":
                assert trace.workers == {}
            else:
                assert trace.workers and P.concurrency(traj) > 1.0


def test_arithmetic_written_in_traces_is_true(rows):
    """Every 'a op b=c' a thread writes holds (the traces teach true arithmetic)."""
    step = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")
    checked = 0
    for row in rows["countdown"][:10]:
        for mode in MODES:
            text = traces.make_trace(row, mode, random.Random(1)).text()
            for a, op, b, c in step.findall(text):
                a, b, c = int(a), int(b), int(c)
                assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c, (a, op, b, c)
                checked += 1
    assert checked > 100


def test_sudoku_forced_cells_are_right(rows):
    """'r2c3 x124 =3': the excluded digits are those of the cell's peers, and a forced digit
    is the solution's digit."""
    for row in rows["sudoku"][:10]:
        solution = tasks.solve_sudoku(row["puzzle"])[0]
        text = traces.make_trace(row, "async", random.Random(2)).text()
        for r, c, d in re.findall(r"r(\d)c(\d) x\d* =(\d)", text):
            assert solution[(int(r) - 1) * 4 + int(c) - 1] == d


def test_structure_hints_are_followed(rows):
    rng = random.Random(5)
    hinted = 0
    for row in rows["countdown"]:
        trace = traces.make_trace(row, "async", rng, capacity=3, hint_share=1.0)
        prompt = trace.organizer[0][0]
        hint = re.search(r"plan (.*)\n", prompt).group(1)
        assert P.plan_of(trace.parse(tok, 3)) == hint
        hinted += 1
    assert hinted == len(rows["countdown"])


def test_default_async_topology_keeps_the_pool_busy(rows):
    """Without a hint the organizer forks up to c-1 workers before its first join."""
    trace = traces.make_trace(rows["countdown"][0], "async", random.Random(0), capacity=4, hint_share=0.0)
    assert P.plan_of(trace.parse(tok, 4)).startswith("F1 F2 F3 J1")


def test_narrow_async_traces_keep_w_workers_busy_and_find_the_same_answers(rows):
    """width_share 1 at c = 4: every trace without a plan keeps w = 1 or 2 workers busy (the
    plan's running count of forks minus joins never passes w, and the first join comes after
    exactly w forks), both widths occur, and the answers are those of the full-width trace."""
    widths = set()
    for j, row in enumerate(rows["countdown"]):
        wide = traces.make_trace(row, "async", random.Random(j), capacity=4, hint_share=0.0)
        narrow = traces.make_trace(row, "async", random.Random(j), capacity=4, hint_share=0.0, width_share=1.0)
        plan = P.plan_of(narrow.parse(tok, 4)).split()
        busy = [sum(1 if a[0] == "F" else -1 for a in plan[:n + 1]) for n in range(len(plan))]
        w = plan.index(next(a for a in plan if a[0] == "J"))
        assert max(busy) == w and w in (1, 2) and plan[:w] == [f"F{i}" for i in range(1, w + 1)]
        assert narrow.answers == wide.answers
        widths.add(w)
    assert widths == {1, 2}


def test_sft_masks(rows):
    """Prompts and injected join results get no loss; the tags the model writes do."""
    trace = traces.make_trace(rows["countdown"][0], "async", random.Random(0), hint_share=0.0)
    (org_ids, org_mask), *workers = trace.sequences(tok)
    assert len(org_ids) == len(org_mask) and not org_mask[0]  # <ORGANIZER> is prompt
    join_open, join_close = tok.tag_id("join", 1), tok.tag_id("join_end", 1)
    a, b = org_ids.index(join_open), org_ids.index(join_close)
    assert org_mask[a] and not any(org_mask[a + 1:b + 1])  # <JOIN-1> trained, result injected
    assert org_mask[-1] and org_ids[-1] == tok.answer_end
    for ids, mask in workers:
        assert ids[0] == tok.worker and not mask[0]
        n_prompt = ids.index(tok.encode("\n")[0]) + 1
        assert not any(mask[:n_prompt]) and all(mask[n_prompt:])
        assert ids[-1] == tok.ret_end


def test_unknown_mode_and_task():
    row = {"task": "countdown", "numbers": [2, 3, 5, 7], "target": 10, "k": 2}
    with pytest.raises(ValueError, match="unknown mode"):
        traces.make_trace(row, "telepathic", random.Random(0))
    with pytest.raises(ValueError, match="unknown task"):
        traces.make_trace({"task": "chess"}, "async", random.Random(0))


def test_worker_search_helpers():
    text, expr = traces.countdown_attempt((25, "-", 7, 18), [3, 12, 19, 21], 48)
    assert text == "25-7=18 48-18=30: no" and expr is None  # after a-b only numbers below b: just 3
    text, expr = traces.countdown_attempt((25, "*", 2, 50), [3, 12, 19, 21], 48)
    assert text == "25*2=50 50-48=2: no" and expr is None  # 2 is below the smallest number: the scan stops
    text, expr = traces.countdown_attempt((25, "*", 2, 50), [3, 12, 19, 21], 10)
    assert text == "25*2=50 50-10=40: 40-3=37 40-12=28 40-19=21 ok\n-> 25*2-(19+21)" and expr == "25*2-(19+21)"
    text, expr = traces.countdown_attempt((12, "+", 9, 21), [2, 3, 4, 5], 30)
    assert text == "12+9=21 30-21=9: 9-2=7 9-3=6 9-4=5 ok\n-> 12+9+4+5" and expr == "12+9+4+5"
    assert tasks.check_countdown(expr, [2, 3, 4, 5, 9, 12], 30) is None
    assert traces.countdown_attempt((6, "*", 4, 24), [1, 2, 3], 24) == ("6*4=24 ok\n-> 6*4", "6*4")
    assert traces.countdown_attempt((6, "*", 4, 24), [1, 2, 3], 21)[1] == "6*4-3"  # have
    assert traces.pairs_in_order([2, 9, 5]) == [(9, 5), (9, 2), (5, 2)]


def test_async_workers_never_return_the_same_solution_twice():
    """A sum is found only by the pair of its two largest numbers, so the organizer's tally is
    a plain count: every expression every worker returns is new (checked on whole traces)."""
    for row in tasks.make_puzzles("countdown", "small", n=60, seed=4, split="train"):
        numbers, target = row["numbers"], row["target"]
        seen = {}
        for a, b in traces.pairs_in_order(numbers):
            for expr in traces.pair_attempts(a, b, numbers, target)[1]:
                assert tasks.check_countdown(expr, numbers, target) is None
                seen.setdefault(tasks.canonical(expr), []).append((a, b, expr))
        assert all(len(v) == 1 for v in seen.values()), [v for v in seen.values() if len(v) > 1]

def test_worker_lists_and_running_tally():
    """A worker writes the numbers it may use before its attempts; the organizer's tally is the
    running list of answers, and its final answer is a copy of the last tally."""
    text, found = traces.pair_attempts(12, 9, [2, 3, 4, 5, 9, 12], 30)
    assert text.split("\n")[:2] == ["below 2 3 4 5", "rest 2 3 4 5"]
    assert traces.pair_attempts(5, 2, [1, 2, 5, 9], 16)[0].split("\n")[:2] == ["below 1", "rest 1 9"]
    assert traces.pair_attempts(2, 1, [1, 2, 5, 9], 16)[0].split("\n")[:2] == ["below -", "rest 5 9"]
    rng = random.Random(5)
    for row in tasks.make_puzzles("countdown", "small", n=20, seed=5, split="train"):
        for mode in ("sequential", "parallel", "async"):
            trace = traces.make_trace(row, mode, rng, 4, hint_share=0.0)
            org = "".join(text for text, _ in trace.organizer)
            # a tally line: "ok ..." (sequential) or "<JOIN-i>...</JOIN-i> ok ..." (the others)
            tallies = [line.split("ok ", 1)[1] for line in org.split("\n")
                       if line.startswith("ok ") or re.search(r"</JOIN-\d+> ok ", line)]
            answer = org.split("<ANSWER>")[1].split("</ANSWER>")[0]
            assert tallies and tallies[-1] == answer, (mode, tallies, answer)
            assert P.parse_answer(answer, "countdown") == trace.answers
            # each item after its letter, A, B, C, ... (protocol.labelled)
            assert [item[0] for item in answer.split(", ")] == [chr(65 + j) for j in range(len(trace.answers))] or answer == "none"


def test_copy_drills_train_only_the_copy_and_the_copy_is_exact():
    rng = random.Random(5)
    numbers = [1, 4, 5, 7, 8, 12]
    for _ in range(50):
        pieces = traces.copy_drill(numbers, rng)
        (prompt, p_trained), (copy, c_trained) = pieces
        assert (p_trained, c_trained) == (False, True)
        listed = prompt.removeprefix("copy ").rstrip("\n")
        assert copy == f"-> {listed}\n"
        for expr in listed.split(P.ANSWER_SEPARATOR):  # numbers of the puzzle, each used once
            used = [int(x) for x in re.findall(r"\d+", expr)]
            assert 2 <= len(used) <= 4 and len(set(used)) == len(used) and set(used) <= set(numbers)
        ids, mask = traces.encode(pieces, tok)
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == copy
        assert tok.decode([i for i, m in zip(ids, mask) if not m]) == prompt


def test_tally_drills_join_two_lists_and_train_only_the_copy():
    rng = random.Random(6)
    numbers = [2, 3, 6, 9, 11, 25]
    lengths = set()
    for _ in range(50):
        pieces = traces.tally_drill(numbers, rng)
        (prompt, p_trained), (copy, c_trained) = pieces
        assert (p_trained, c_trained) == (False, True)
        m = re.fullmatch(r"copy (.+)\nand (.+)\n", prompt)
        first, second = m.group(1).split(", "), m.group(2).split(", ")
        assert copy == "-> " + ", ".join(first + second) + "\n"
        lengths.add((len(first), len(second)))
        ids, mask = traces.encode(pieces, tok)
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == copy
    assert {n for pair in lengths for n in pair} == {1, 2, 3, 4}  # both lists vary, 1-4 items
