"""Tool workers (tools.py, protocol.tool_call, Executor.call_tool): the tools' answers against
independent oracles (Fraction arithmetic on a tree built here, the brute-force countdown solver),
their error paths, and scripted episodes whose timing is counted by hand."""
import json
import random
from fractions import Fraction

import pytest
import torch

import asyncthink as A
import executor as E
import protocol as P
import tasks
import tools
from model import GPT, GPTConfig

tok = P.Tokenizer.bytes_level(max_forks=4)
ROW = {"task": "countdown", "numbers": [1, 2, 5, 8, 11, 12], "target": 19, "k": 4}


def random_tree(rng, depth=3):
    """(text, exact value) of a random expression, its value computed on the tree itself."""
    if depth == 0 or rng.random() < 0.3:
        n = rng.randint(0, 30)
        return str(n), Fraction(n)
    (a, va), (b, vb) = random_tree(rng, depth - 1), random_tree(rng, depth - 1)
    op = rng.choice("+-*/")
    if op == "/" and vb == 0:
        op = "+"
    value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else None}[op]
    return f"({a}{op}{b})", value


def test_calc_is_exact_against_fraction_arithmetic():
    rng = random.Random(0)
    for _ in range(300):
        text, value = random_tree(rng)
        want = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
        answer = tools.run_tool("calc", text, ROW)
        assert answer == want or (answer.startswith("error: value") and len(want) > tools.MAX_OUTPUT), (text, answer)


def test_check_accepts_the_solvers_solutions_and_names_what_is_wrong():
    rng = random.Random(1)
    for row in tasks.make_puzzles("countdown", "small", n=10, seed=3, split="test"):
        for expr in tasks.solve_countdown(row["numbers"], row["target"], limit=5):
            assert tools.run_tool("check", expr, row) == "ok"
        for _ in range(5):
            expr = tasks.random_expression(row["numbers"], rng)
            valid = tasks.check_countdown(expr, row["numbers"], row["target"]) is None
            assert (tools.run_tool("check", expr, row) == "ok") == valid
    sudoku = tasks.make_puzzles("sudoku", "small", n=1, seed=0)[0]
    assert tools.run_tool("check", tasks.solve_sudoku(sudoku["puzzle"])[0], sudoku) == "ok"
    assert tools.run_tool("check", "1234", sudoku).startswith("no: malformed")


@pytest.mark.parametrize("name,argument,start", [
    ("calc", "1/0", "error: division by zero"),
    ("calc", "(((1", "error: missing ')'"),
    ("calc", "2**3", "error: "),
    ("calc", "__import__('os')", "error: unexpected character"),
    ("calc", "1+" * 60 + "1", "error: input longer than 100"),
    ("calc", "999999999999*999999999999*999999999999*999999999999*999999999999*9", "error: value longer than 60"),
    ("check", "", "no: malformed"),
    ("check", "999999999999*999999999999*999999999999*999999999999", "no: uses 999999999999 which"),
    ("search", "12", "error: unknown tool"),
])
def test_malformed_requests_get_an_error_text(name, argument, start):
    assert tools.run_tool(name, argument, ROW).startswith(start)


def test_no_request_raises():
    rng = random.Random(2)
    alphabet = "0123456789+-*/() x:<>\\n" + chr(0x2603)
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        for name in ("calc", "check"):
            answer = tools.run_tool(name, text, ROW)
            assert isinstance(answer, str) and len(answer) <= tools.MAX_OUTPUT


def test_tool_call_reads_the_prefix_of_enabled_tools_only():
    assert P.tool_call("calc: 12*9+4", ("calc",)) == ("calc", "12*9+4")
    assert P.tool_call("check:12+7", ("calc", "check")) == ("check", "12+7")
    assert P.tool_call("calc: 1+2", ("check",)) is None
    assert P.tool_call(" calc: 1+2", ("calc",)) is None  # the name starts the sub-query
    assert P.tool_call("12 9 of 1 2 5 8 11 12 to 19", P.TOOLS) is None


# -----------------------------------------------------------------------------
# Episodes

@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", tok.n_vocab))


def episode(model, organizer, workers=None, **kw):
    """One scripted episode (each thread emits its text, then 'x' forever); (episode, record)."""
    scripts = {"organizer": tok.encode(organizer), **{i: tok.encode(t) for i, t in (workers or {}).items()}}

    def force(ep, th):
        s = scripts.get("organizer" if th.role == "organizer" else th.fork_id, [])
        return s[th.generated] if th.generated < len(s) else ord("x")
    cfg = E.RunConfig(**{**dict(max_organizer_tokens=80, max_worker_tokens=40), **kw})
    ex = E.Executor(model, tok, cfg)
    (ep,) = ex.run([ROW], force=force)
    return ep, A.record(ep, tok, cfg)


def test_a_tool_answers_at_the_join_with_the_hand_counted_latency(gpt):
    # <FORK-1> + "calc: 12*9+4" (12 bytes) + </FORK-1>: the fork closes at step 14; the tool
    # answers in step 15; <JOIN-1> at step 15 does not wait; "112</JOIN-1>" is injected (free);
    # "<ANSWER>" "1" "2" "*" "2" "-" "5" "</ANSWER>" are steps 16..23. Latency 23; the tool is
    # active in step 15 only, so eta = (23 + 1) / 23.
    ep, rec = episode(gpt, "<FORK-1>calc: 12*9+4</FORK-1><JOIN-1><ANSWER>12*2-5</ANSWER>",
                      tools=("calc",))
    assert rec["stop_reason"] == "answer" and rec["format_errors"] == []
    assert rec["trace"]["organizer"].endswith("<JOIN-1>112</JOIN-1><ANSWER>12*2-5</ANSWER>")
    assert rec["trace"]["workers"] == {"1": "112"}
    assert rec["tool_calls"] == 1
    assert rec["latency"] == 23 and rec["concurrency"] == round(24 / 23, 4)
    tool = ep.threads[1]
    assert tool.slot is None and tool.generated == 0 and tool.tool == "calc"
    assert (tool.fork_step, tool.finish_step, tool.active) == (14, 15, [(15, 15)])
    assert [(s.name, s.fork_step, s.finish, s.active) for s in P.timeline(A.trajectory(ep, tok, ep_cfg(tools=("calc",))))][1] \
        == ("worker 1", 14, 15, [(15, 15)])
    assert rec["tokens"] == 23  # the tool's answer is not a generated token


def ep_cfg(**kw):
    return E.RunConfig(**{**dict(max_organizer_tokens=80, max_worker_tokens=40), **kw})


def test_check_and_a_model_worker_side_by_side(gpt):
    organizer = ("<FORK-1>12 8 of 1 2 5 8 11 12 to 19</FORK-1><FORK-2>check: 12+8-1</FORK-2>"
                 "<JOIN-2><JOIN-1><ANSWER>12+8-1</ANSWER>")
    ep, rec = episode(gpt, organizer, {1: "ab<RETURN>12+8-1</RETURN>"}, tools=("calc", "check"))
    assert rec["format_errors"] == [] and rec["correct"] is False and rec["n_correct"] == 1
    assert "<JOIN-2>ok</JOIN-2>" in rec["trace"]["organizer"]
    assert rec["tool_calls"] == 1
    assert [th.tool for th in ep.threads] == [None, None, "check"]


def test_without_tools_the_same_sub_query_goes_to_a_model_worker(gpt):
    ep, rec = episode(gpt, "<FORK-1>calc: 12*9+4</FORK-1><JOIN-1><ANSWER>1+2</ANSWER>",
                      {1: "<RETURN>7</RETURN>"})
    assert rec["tool_calls"] == 0 and rec["trace"]["workers"] == {"1": "<RETURN>7</RETURN>"}
    assert "<JOIN-1>7</JOIN-1>" in rec["trace"]["organizer"]


def test_a_tool_holds_a_pool_place_until_joined(gpt):
    # c = 2: one worker at a time, tools included; a second fork before the join overflows
    ep, rec = episode(gpt, "<FORK-1>calc: 1+1</FORK-1><FORK-2>calc: 2+2</FORK-2>", capacity=2, tools=("calc",))
    assert rec["stop_reason"] == E.DUPLICATE_OR_OVERFLOW
    assert P.POOL_OVERFLOW in P.error_names(rec["format_errors"])


def test_a_tool_answer_that_looks_like_a_tag_stays_text(gpt):
    ids = tok.encode_plain("error: <JOIN-1> 1")
    assert all(tok.tag(t) is None for t in ids) and tok.decode(ids) == "error: <JOIN-1> 1"


def test_unknown_tools_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown tool 'search'"):
        E.RunConfig(tools=("search",)).check()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(ROW) + "\n")
    with pytest.raises(SystemExit) as e:
        A.main(["solve", "--ckpt", "x.pt", "--input", str(rows), "--output", str(tmp_path / "o.jsonl"),
                "--tools", "calc,search"])
    assert e.value.code == 2 and "unknown tool 'search'" in capsys.readouterr().err


def test_check_traces_call_the_tool_and_never_train_a_wrong_worker():
    import train
    import traces
    cfg = train.parse_args(["--preset", "tiny", "--tools", "check", "--check-share", "1", "--hint-share", "0"])
    tok_n = P.Tokenizer.numbers()
    rng = random.Random(0)
    calls = wrong = 0
    for row in tasks.make_puzzles("countdown", "small", n=30, seed=5):
        trace = traces.make_trace(row, "async", rng, 4, hint_share=0.0, check_share=1.0)
        assert trace.parse(tok_n).errors == []
        organizer = "".join(text for text, _ in trace.organizer)
        calls += organizer.count("check: ")
        for i, answer in trace.tools.items():  # every call's answer is the verifier's
            expr = organizer.split(f"<FORK-{i}>check: ")[1].split("</FORK")[0]
            assert answer == tools.check(expr, row)
        for i, pieces in trace.workers.items():  # a worker that returns a mistake is not trained on
            result = trace.parse(tok_n).organizer.children[i].result
            bad = any(tasks.check_countdown(e, row["numbers"], row["target"]) for e in
                      (P.parse_answer(result, "countdown") or []))
            wrong += bad
            assert any(trained for _, trained in pieces) == (not bad)
        # the tally keeps only what the tool called ok
        assert all(tasks.check_countdown(e, row["numbers"], row["target"]) is None for e in trace.answers)
    assert calls > 30 and wrong > 0
    seqs = train.sft_sequences(cfg, tok_n, random.Random(1), 4, 1024)
    assert any("check: " in tok_n.decode(ids) for ids, _ in seqs)
