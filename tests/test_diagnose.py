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
    assert sum(n for kind, (n, _) in stats.items() if kind != "copy drill (pure copying)") == trained
    assert all(0 <= c <= n for n, c in stats.values())
    assert "| kind of token |" in diagnose.table(stats)


def test_copy_drill_tokens_are_counted_apart():
    tok = P.Tokenizer.numbers()
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", tok.n_vocab))
    stats = diagnose.diagnose(model, tok, n=3, seed=5)
    rng, drill_rng = random.Random(5), random.Random(6)
    copied = 0
    for _ in range(3):
        row = tasks.make_countdown(tasks.COUNTDOWN_PRESETS["small"], rng, split="val")
        traces.make_trace(row, "async", rng, 4, hint_share=0.0)
        ids, mask = traces.encode(traces.copy_drill(row["numbers"], drill_rng), tok)
        copied += sum(m and not tok.decode([i]).isspace() for i, m in zip(ids, mask))
    assert stats["copy drill (pure copying)"][0] == copied


def test_attention_weights_reproduce_the_attention_output():
    """Oracle: the recomputed weights times the values equal what the layer's SDPA computed."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", 64, rope=True)).eval()
    attn, x = model.transformer.h[0].attn, torch.randn(1, 9, model.config.n_embd)
    pos = torch.arange(9)
    w = diagnose.attention_weights(attn, x, pos)  # (1, nh, T, T)
    _, _, v = (t.transpose(1, 2) for t in attn.qkv(x, pos))
    y = (w @ v).transpose(1, 2).reshape(1, 9, -1)
    assert torch.allclose(attn.c_proj(y), attn(x, pos), atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(1, w.size(1), 9)) and (w.triu(1) == 0).all()


def test_copy_attention_is_a_share_per_head():
    tok = P.Tokenizer.numbers()
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", tok.n_vocab))
    scores = diagnose.copy_attention(model, tok, n=3)
    assert scores.shape == (model.config.n_layer, model.config.n_head)
    assert ((scores >= 0) & (scores <= 1)).all()
