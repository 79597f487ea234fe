"""Capacity as an input (train.py --capacities LO-HI): traces written for any c in 2..16 with c
stated in the organizer's prompt, the executor stating it, and the command line's checks. The
traces are checked by protocol.parse at their own c (an independent reading of the pool rule)."""
import json
import random

import pytest
import torch

import asyncthink as A
import executor as E
import protocol as P
import tasks
import traces
import train
from model import GPT, GPTConfig, save_checkpoint

tok = P.Tokenizer.numbers()


@pytest.mark.parametrize("c", range(2, 17))
def test_traces_for_every_capacity_state_it_and_use_the_pool_without_overflow(c):
    rng = random.Random(c)
    widest = 0
    for row in tasks.make_puzzles("countdown", "small", n=12, seed=c) + tasks.make_puzzles("sudoku", "small", n=3, seed=c):
        trace = traces.make_trace(row, "async", rng, c, hint_share=0.5, state_capacity=True)
        assert trace.organizer[0][0].split("\n")[1] == f"capacity {c}"
        traj = trace.parse(tok, c)
        assert traj.errors == []  # a fork past c-1 running workers would be a pool overflow
        running = 0
        for ev in traj.organizer.events:
            running += 1 if ev.kind == "fork" else -1
            widest = max(widest, running)
    assert widest == c - 1  # and the traces do fill the pool (15 pairs: enough for c = 16)


def test_the_executor_states_the_capacity_only_when_asked():
    model = GPT(GPTConfig.preset("tiny", tok.n_vocab))
    row = tasks.make_puzzles("countdown", "small", n=1, seed=0)[0]
    for state, mode, want in [(True, "async", "capacity 6"), (False, "async", None), (True, "parallel", None)]:
        cfg = E.RunConfig(mode=mode, capacity=6, state_capacity=state, max_organizer_tokens=2,
                          max_worker_tokens=2, batch_episodes=1)
        ex = E.Executor(model, tok, cfg)
        ex.start([row])
        prompt = tok.decode(ex.pending[0].organizer.prompt)
        assert (want in prompt) if want else "capacity" not in prompt


def test_sft_draws_a_capacity_per_trace_from_the_range():
    cfg = train.parse_args(["--preset", "tiny", "--capacities", "2-9"])
    seen = set()
    for ids, _ in train.sft_sequences(cfg, tok, random.Random(0), 60, 1024):
        text = tok.decode(ids)
        if text.startswith("<ORGANIZER>"):
            seen.add(int(text.split("\n")[1].split()[1]))
    assert seen <= set(range(2, 10)) and len(seen) >= 6


@pytest.mark.parametrize("flags,message", [
    (["--capacities", "1-4"], "--capacities must be LO-HI with 2 <= LO <= HI <= 16"),
    (["--capacities", "4"], "--capacities must be LO-HI"),
    (["--capacities", "2-8", "--capacity", "10"], "--capacity 10 (evaluation, RL) must lie in --capacities 2-8"),
])
def test_bad_capacity_flags_are_refused_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_solve_refuses_a_capacity_the_model_was_not_trained_for(tmp_path, capsys):
    model = GPT(GPTConfig.preset("tiny", tok.n_vocab))
    ckpt = tmp_path / "m.pt"
    save_checkpoint(str(ckpt), model, tokenizer=tok.spec(), train_config={"capacities": "2-8"})
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(tasks.make_puzzles("countdown", "small", n=1, seed=0)[0]) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["solve", "--ckpt", str(ckpt), "--input", str(rows), "--output", str(out), "--device", "cpu",
            "--max-organizer-tokens", "3", "--max-worker-tokens", "3"]
    assert A.main(args + ["--capacity", "12"]) == 2
    assert "was trained for capacities 2-8, not --capacity 12" in capsys.readouterr().err
    assert A.main(args + ["--capacity", "6"]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["stop_reason"]  # it ran, at c = 6
