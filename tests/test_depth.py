"""Recursive organizers (depth D > 1): the protocol's rules and timing on hand-counted depth-2
structures, and the executor's own steps against those hand counts (text 'x' or 'q' is one
token, every tag one token; injected takeaways cost nothing)."""
import pytest
import torch

import asyncthink as A
import executor as E
import protocol as P
from model import GPT, GPTConfig

tok = P.Tokenizer.bytes_level(max_forks=8)


def traj(org, workers, capacity=4, depth=2):
    return P.parse_text(org, workers, tok, capacity, task="countdown", depth=depth)


# A chain: the organizer forks worker 1, which forks 1.1 and waits for it.
#   organizer  <FORK-1>q</FORK-1> steps 1-3, <JOIN-1> step 4, waits until 13, answer 14-16
#   worker 1   <FORK-1>q</FORK-1> steps 4-6, <JOIN-1> step 7, waits for 1.1, return 11-13
#   worker 1.1 x<RETURN>7</RETURN> steps 7-10
CHAIN = ("<FORK-1>q</FORK-1><JOIN-1>5</JOIN-1><ANSWER>5</ANSWER>",
         {1: "<FORK-1>q</FORK-1><JOIN-1>7</JOIN-1><RETURN>5</RETURN>", "1.1": "x<RETURN>7</RETURN>"})

# Two sub-organizers at once, c = 5:
#   organizer  F1 1-3, F2 4-6, <JOIN-1> 7 waits until 16, <JOIN-2> 17 (2 is done), answer 18-20
#   worker 1   F1 4-6, <JOIN-1> 7 waits until 13, return 14-16
#   worker 1.1 xxxx<RETURN>1</RETURN> 7-13
#   worker 2   F1 7-9, x 10, <JOIN-1> 11 waits until 12, return 13-15
#   worker 2.1 <RETURN>2</RETURN> 10-12
# Places: organizer, 1 (3..16), 2 (6..17), 1.1 (6..13), 2.1 (9..12): 5 at steps 9-12.
TWO = ("<FORK-1>q</FORK-1><FORK-2>q</FORK-2><JOIN-1>1</JOIN-1><JOIN-2>2</JOIN-2><ANSWER>1</ANSWER>",
       {1: "<FORK-1>q</FORK-1><JOIN-1>1</JOIN-1><RETURN>1</RETURN>", "1.1": "xxxx<RETURN>1</RETURN>",
        2: "<FORK-1>q</FORK-1>x<JOIN-1>2</JOIN-1><RETURN>2</RETURN>", "2.1": "<RETURN>2</RETURN>"})


def test_a_join_waits_on_the_whole_subtree():
    t = traj(*CHAIN)
    assert t.errors == [] and t.answers == ["5"]
    spans = {s.name: s for s in P.timeline(t)}
    assert spans["organizer"].active == [(1, 4), (14, 16)]
    assert spans["worker 1"].active == [(4, 7), (11, 13)]
    assert (spans["worker 1.1"].fork_step, spans["worker 1.1"].active, spans["worker 1.1"].join_step) == (6, [(7, 10)], 10)
    assert spans["worker 1"].join_step == 13
    assert P.critical_path(t) == 16
    assert P.concurrency(t) == pytest.approx((7 + 7 + 4) / 16)


def test_two_sub_organizers_by_hand():
    t = traj(*TWO, capacity=5)
    assert t.errors == [] and P.critical_path(t) == 20
    spans = {s.name: s for s in P.timeline(t)}
    assert spans["worker 1"].active == [(4, 7), (14, 16)] and spans["worker 1"].join_step == 16
    assert spans["worker 2"].active == [(7, 11), (13, 15)] and spans["worker 2"].join_step == 17
    assert spans["worker 2.1"].active == [(10, 12)] and spans["worker 2.1"].join_step == 12
    assert spans["worker 1.1"].active == [(7, 13)]
    assert P.concurrency(t) == pytest.approx((11 + 7 + 7 + 8 + 3) / 20)


def test_the_pool_is_shared_across_levels():
    """At c = 4 the fifth place is taken by 2.1's fork at step 9: exactly that one overflows."""
    t = traj(*TWO, capacity=4)
    assert P.error_names(t.errors) == [P.POOL_OVERFLOW] and "worker 2.1" in t.errors[0]
    # forks of one step count in creation order: at step 6 the organizer's fork of 2 (its
    # parent was created first) comes before worker 1's fork of 1.1, so at c = 3 it is 1.1
    # that overflows there, and 2.1 too at step 9
    t = traj(*TWO, capacity=3)
    assert P.error_names(t.errors) == [P.POOL_OVERFLOW] * 2
    assert "worker 1.1 forked at step 6" in t.errors[0] and "worker 2.1" in t.errors[1]


@pytest.mark.parametrize("org, workers, depth, name", [
    # a fork at level D: worker 1.1 forks at depth 2 (at depth 1, worker 1's fork is wrong-role)
    (CHAIN[0], {**CHAIN[1], "1.1": "<FORK-1>q</FORK-1><RETURN>7</RETURN>"}, 2, P.TOO_DEEP),
    (CHAIN[0], CHAIN[1], 1, P.WRONG_ROLE),
    # worker 1 joins the organizer's worker 2 (its sibling)
    ("<FORK-1>q</FORK-1><FORK-2>q</FORK-2><JOIN-1>1</JOIN-1><JOIN-2>2</JOIN-2><ANSWER>1</ANSWER>",
     {1: "<JOIN-2>2</JOIN-2><RETURN>1</RETURN>", 2: "<RETURN>2</RETURN>"}, 2, P.FOREIGN_JOIN),
    # worker 1 joins 3, which its sibling 2 forked (2.3)
    ("<FORK-1>q</FORK-1><FORK-2>q</FORK-2><JOIN-2>2</JOIN-2><JOIN-1>1</JOIN-1><ANSWER>1</ANSWER>",
     {1: "xxxxxx<JOIN-3>2</JOIN-3><RETURN>1</RETURN>", 2: "<FORK-3>q</FORK-3><JOIN-3>2</JOIN-3><RETURN>2</RETURN>",
      "2.3": "<RETURN>2</RETURN>"}, 2, P.FOREIGN_JOIN),
    # an id nobody forked, and one joined twice, are unknown as at depth 1
    (CHAIN[0], {**CHAIN[1], 1: "<JOIN-4>7</JOIN-4><RETURN>5</RETURN>"}, 2, P.UNKNOWN_JOIN),
    (CHAIN[0], {**CHAIN[1], 1: "<FORK-1>q</FORK-1><JOIN-1>7</JOIN-1><JOIN-1>7</JOIN-1><RETURN>5</RETURN>"},
     2, P.UNKNOWN_JOIN),
    # worker 1 returns before joining 1.1
    (CHAIN[0], {**CHAIN[1], 1: "<FORK-1>q</FORK-1><RETURN>5</RETURN>"}, 2, P.UNJOINED_RETURN),
    # depth 3: 1.1 may fork 1.1.1, which may not fork
    (CHAIN[0], {**CHAIN[1], "1.1": "<FORK-2>q</FORK-2><JOIN-2>7</JOIN-2><RETURN>7</RETURN>",
                "1.1.2": "<FORK-1>q</FORK-1><RETURN>7</RETURN>"}, 3, P.TOO_DEEP),
])
def test_named_errors_of_recursion(org, workers, depth, name):
    t = traj(org, workers, capacity=8, depth=depth)
    assert P.error_names(t.errors).count(name) == (1 if depth > 1 else 2), t.errors  # depth 1: fork and join
    assert set(P.error_names(t.errors)) <= set(P.ERROR_NAMES + P.DEPTH_ERROR_NAMES)


def test_depth_3_is_valid_where_depth_2_is_too_deep():
    workers = {**CHAIN[1], "1.1": "<FORK-2>q</FORK-2><JOIN-2>7</JOIN-2><RETURN>7</RETURN>",
               "1.1.2": "<RETURN>7</RETURN>"}
    assert traj(CHAIN[0], workers, depth=3).errors == []
    spans = {s.name: s for s in P.timeline(traj(CHAIN[0], workers, depth=3))}
    assert "worker 1.1.2" in spans and spans["worker 1.1.2"].fork_step == 9  # 1.1 starts at 7
    assert P.error_names(traj(CHAIN[0], workers, depth=2).errors)[0] == P.TOO_DEEP


# -----------------------------------------------------------------------------
# The executor: its own steps equal the hand counts above

def forced(scripts):
    """force(): the thread at path p ('' the organizer) emits scripts[p] token by token."""
    ids = {path: tok.encode(text) for path, text in scripts.items()}
    def force(ep, th):
        s = ids.get(th.path, [])
        return s[th.generated] if th.generated < len(s) else ord("z")
    return force


def without_takeaways(text):
    """A thread's text as the model writes it: the executor injects each takeaway after <JOIN-i>."""
    import re
    return re.sub(r"(<JOIN-\d+>)[^<]*</JOIN-\d+>", r"\1", text)


def run_scripts(org, workers, capacity, n=3, depth=2):
    scripts = {"": without_takeaways(org), **{str(p): without_takeaways(t) for p, t in workers.items()}}
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", tok.n_vocab))
    cfg = E.RunConfig(capacity=capacity, depth=depth, batch_episodes=2, max_worker_tokens=64)
    rows = [{"task": "countdown", "numbers": [1, 2, 3, 4], "target": 5, "k": 1}] * n
    episodes = E.Executor(model, tok, cfg).run(rows, force=forced(scripts))
    return episodes, [A.record(ep, tok, cfg) for ep in episodes]


@pytest.mark.parametrize("structure, capacity, latency", [(CHAIN, 3, 16), (TWO, 5, 20)])
def test_executor_steps_are_the_protocols(structure, capacity, latency):
    episodes, records = run_scripts(*structure, capacity)
    for ep, rec in zip(episodes, records):
        assert rec["format_errors"] == [] and ep.stop_reason == "answer"
        assert rec["latency"] == latency and rec["steps"] == latency
        spans = {s.name: s for s in P.timeline(A.trajectory(ep, tok, E.RunConfig(capacity=capacity, depth=2)))}
        for row in rec["trace"]["timeline"]:
            s = spans[row["thread"]]
            assert [tuple(a) for a in row["active"]] == s.active, row["thread"]
            if row["thread"] != "organizer":
                assert (row["fork_step"], row["finish"], row["join_step"]) == (s.fork_step, s.finish, s.join_step)
    assert set(records[0]["trace"]["workers"]) == {str(p) for p in structure[1]}


def test_executor_stops_where_the_shared_pool_overflows():
    episodes, records = run_scripts(*TWO, capacity=4)
    for ep, rec in zip(episodes, records):
        assert ep.stop_reason == E.DUPLICATE_OR_OVERFLOW and rec["steps"] == 9
        assert P.error_names(rec["format_errors"]).count(P.POOL_OVERFLOW) == 1


@pytest.mark.parametrize("org, workers, reason, name", [
    (CHAIN[0], {**CHAIN[1], "1.1": "<FORK-1>q</FORK-1><RETURN>7</RETURN>"}, E.TOO_DEEP, P.TOO_DEEP),
    (CHAIN[0], {**CHAIN[1], 1: "<FORK-1>q</FORK-1><RETURN>5</RETURN>"}, E.UNJOINED_RETURN, P.UNJOINED_RETURN),
    ("<FORK-1>q</FORK-1><FORK-2>q</FORK-2><JOIN-1>1</JOIN-1><JOIN-2>2</JOIN-2><ANSWER>1</ANSWER>",
     {1: "xxx<JOIN-2>2</JOIN-2><RETURN>1</RETURN>", 2: "<RETURN>2</RETURN>"}, E.FOREIGN_JOIN, P.FOREIGN_JOIN),
])
def test_executor_names_each_error_of_recursion(org, workers, reason, name):
    episodes, records = run_scripts(org, workers, capacity=8, n=1)
    assert episodes[0].stop_reason == reason and name in P.error_names(records[0]["format_errors"])


def test_depth_needs_async_mode_and_a_slot_for_every_place():
    with pytest.raises(ValueError, match="async"):
        E.RunConfig(mode="parallel", depth=2).check()
    with pytest.raises(ValueError, match="n_slots"):
        E.RunConfig(depth=2, capacity=4, batch_episodes=4, n_slots=15).check()
    E.RunConfig(depth=2, capacity=4, batch_episodes=4, n_slots=16).check()


# -----------------------------------------------------------------------------
# Solver-written depth-2 traces: valid at every c, correct answers, and the executor replays
# them with the protocol's timing

import random  # noqa: E402

import tasks  # noqa: E402
import traces  # noqa: E402

num = P.Tokenizer.numbers()


@pytest.mark.parametrize("preset, capacity", [("small", 3), ("small", 4), ("small", 8), ("paper", 8), ("paper", 16)])
def test_tree_traces_are_valid_and_right(preset, capacity):
    rows = tasks.make_puzzles("countdown", preset, n=6, seed=3, split="train")
    for row in rows:
        trace = traces.make_trace(row, "async", random.Random(0), capacity, depth=2)
        t = trace.parse(num, capacity)
        assert t.errors == [] and t.answers == trace.answers  # pool_overflows included: none
        assert tasks.score_countdown(t.answers, row["numbers"], row["target"]) == len(t.answers)
        levels = {len(path.split(".")) for path in trace.workers}
        assert levels == {1, 2}  # sub-organizers and their pair workers
        # the shared pool by hand: at no step do more than c threads hold a place
        spans = P.timeline(t)
        for step in range(1, spans[0].finish + 1):
            held = 1 + sum(s.fork_step <= step <= (s.join_step or 10**9) for s in spans[1:])
            assert held <= capacity


def test_tree_traces_reach_pairs_one_organizer_cannot():
    """Paper preset: 66 pairs, one organizer's ids stop at 32; the tree tries more where the
    answers are rare, and finds at least as many, always correct."""
    rows = tasks.make_puzzles("countdown", "paper", n=8, seed=5, split="train")
    deeper = 0
    for row in rows:
        flat = traces.make_trace(row, "async", random.Random(0), 8, hint_share=0.0)
        tree = traces.make_trace(row, "async", random.Random(0), 8, depth=2)
        pair_workers = [p for p in tree.workers if "." in p]
        deeper += len(pair_workers) > P.MAX_FORKS
        assert len(tree.answers) >= len(flat.answers)
    assert deeper > 0


def test_the_executor_replays_a_tree_trace_with_the_protocols_timing():
    row = tasks.make_puzzles("countdown", "small", n=1, seed=7, split="train")[0]
    trace = traces.make_trace(row, "async", random.Random(0), 4, depth=2)
    scripts = {}
    for path, pieces in [("", trace.organizer), *trace.workers.items()]:
        ids, mask = traces.encode(pieces[1:], num)  # the model writes the trained tokens
        scripts[path] = [t for t, m in zip(ids, mask) if m]
    def force(ep, th):
        s = scripts.get(th.path, [])
        return s[th.generated] if th.generated < len(s) else num.pad
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", num.n_vocab, block_size=2048, n_layer=1))
    cfg = E.RunConfig(capacity=4, depth=2, batch_episodes=1, max_organizer_tokens=2000,
                      max_worker_tokens=2000, max_episode_tokens=20000, temperature=0)
    (ep,) = E.Executor(model, num, cfg).run([row], force=force)
    rec = A.record(ep, num, cfg)
    want = trace.parse(num, 4)
    assert rec["format_errors"] == [] and rec["answers"] == trace.answers
    assert rec["latency"] == rec["steps"] == P.critical_path(want)
    spans = {s.name: s for s in P.timeline(want)}
    for r in rec["trace"]["timeline"]:
        assert [tuple(a) for a in r["active"]] == spans[r["thread"]].active, r["thread"]
