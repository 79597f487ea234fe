"""diagnose.py: each kind of token is recognised, and every trained token is counted once."""
import random

import torch

import diagnose
import protocol as P
import tasks
import traces
from model import GPT, GPTConfig


def test_kinds_of_a_worker_line_by_hand():
    kind = lambda line, token: diagnose.kind_of("worker", line, token)
    assert kind("12+9=", "21") == "wrk op result"
    assert kind("12+9=21 ", "30") == "wrk distance operands (or ok)"
    assert kind("12+9=21 30-", "21") == "wrk distance operands (or ok)"
    assert kind("12+9=21 30-21=", "9") == "wrk distance result"
    assert kind("12+9=21 30-21=9: ", "9") == "wrk scan verdict or distance copy"
    assert kind("12+9=21 30-21=9: 9-", "2") == "wrk scan next number"
    assert kind("12+9=21 30-21=9: 9-2=", "7") == "wrk scan subtraction"
    assert kind("12+9=21 30-21=9: 9-2=7 ", "ok") == "wrk scan verdict or distance copy"
    assert kind("below 2 3", "4") == "wrk lists"
    assert kind("-> 12+9", "+") == "wrk expression copy"
    assert kind("12+9=21 30-21=9:", " ") == "spaces"
    org = lambda line, token: diagnose.kind_of("organizer", line, token)
    assert org("<JOIN-1>12+9+4+5</JOIN-1> ", "ok") == "org tally verdict (ok/no)"
    assert org("<JOIN-1>12+9+4+5</JOIN-1> ok 12+", "9") == "org tally copy"
    assert org("<ANSWER>12+9+4+5, ", "12") == "org answer copy"
    assert org("<FORK-2>12 5 of 2 3 ", "4") == "org sub-query copy"


def test_every_trained_token_is_counted_once():
    tok = P.Tokenizer.numbers()
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", tok.n_vocab))
    stats = diagnose.diagnose(model, tok, n=3, seed=5)
    rng = random.Random(5)
    trained = 0
    for _ in range(3):
        row = tasks.make_countdown(tasks.COUNTDOWN_PRESETS["small"], rng, split="val")
        trace = traces.make_trace(row, "async", rng, 4, hint_share=0.0)
        trained += sum(sum(mask[1:model.config.block_size + 1]) for _, mask in trace.sequences(tok))
    assert sum(n for n, _ in stats.values()) == trained
    assert all(0 <= c <= n for n, c in stats.values())
    assert "| kind of token |" in diagnose.table(stats)
