"""diagnose.py: each kind of token is recognised, every trained token is counted once, and the
episode funnel counts what hand-built solve records hold."""
import random

import pytest
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


def test_episode_funnel_counts_by_hand():
    worker = "12+9=21 30-21=9: 9-4=5 ok\n-> 12+9+4+5\n<RETURN>12+9+4+5, 12*2+3</RETURN>"
    records = [
        # async: two returns (12+9+4+5 = 30 right, 12*2+3 = 27 wrong), one answer copied, one not
        dict(task="countdown", numbers=[2, 3, 4, 5, 9, 12], target=30, k=2, format_errors=[],
             trace={"organizer": "...", "workers": {"1": worker, "2": "<RETURN>none</RETURN>"}},
             answers=["12+9+4+5", "12+9+5+3"], n_correct=1, correct=False),
        # a format error counts as an episode only
        dict(task="countdown", numbers=[1, 2], target=3, k=1, format_errors=["unclosed fork: 1"],
             trace={"organizer": "<FORK-1>", "workers": {}}, answers=[], n_correct=0, correct=False),
        # sequential: the organizer's own "-> " lines are its returns; 2+1 right, 2*1 wrong, and
        # its equation 2*1=3 is off by one
        dict(task="countdown", numbers=[1, 2], target=3, k=1, format_errors=[],
             trace={"organizer": "2+1=3 ok\n-> 2+1\n2*1=3 ok\n-> 2*1\n", "workers": {}},
             answers=["2+1"], n_correct=1, correct=True),
    ]
    assert diagnose.episode_funnel(records) == {
        "episodes": 3, "valid format": 2, "returned": 4, "returned correct": 2,
        "workers found k": 1, "answers": 3, "answers copied exactly": 2, "answers correct": 2,
        "all correct": 1, "equations": 5, "equations wrong": 1, "equations off by 1": 1,
        "wrong: first step wrong": 1}
    assert "of them correct 2 (50%)" in diagnose.funnel_table(diagnose.episode_funnel(records))


def test_list_copies_count_by_hand():
    org = ("<JOIN-1>12+8-1</JOIN-1> ok 12+8-1\n"                  # the first list: nothing copied
           "<JOIN-2>12+5+2</JOIN-2> ok 12+8-1, 12+5+2\n"          # 1-item copy, exact
           "<JOIN-3>none</JOIN-3> no\n"
           "<JOIN-4>12*2-5</JOIN-4> ok 12+8-1, 12+8-1, 12*2-5\n"  # 2-item copy, not exact
           "<ANSWER>12+8-1, 12+8-1, 12*2-5</ANSWER>")              # 3-item answer copy, exact
    record = dict(task="countdown", mode="async", format_errors=[], trace={"organizer": org, "workers": {}})
    broken = dict(record, format_errors=["missing-answer: x"])    # not counted
    f = diagnose.list_copies([record, broken])
    assert dict(f) == {("tally", 1): [1, 1], ("tally", 2): [1, 0], ("answer", 3): [1, 1]}
    assert "2 items   tally 0 of 1 (0%)" in diagnose.copies_table(f)


def test_copy_confusions_by_hand():
    """Two wrong copies worked out token by token (A, 12, +, 8, -, 1, ",", " ", B, 12, +, 7): the
    tally copies B12+7 as B12+8, and "B 12 +" is the shortest run no 8 follows elsewhere (n = 3);
    the answer copies A12+8-1 as A12-8-1, and no "12" is followed by "-" anywhere (n = 1)."""
    org = ("<JOIN-1>12+8-1</JOIN-1> ok A12+8-1, B12+7\n"
           "<JOIN-2>12*2-5</JOIN-2> ok A12+8-1, B12+8, C12*2-5\n"
           "<JOIN-3>none</JOIN-3> no\n"
           "<ANSWER>A12-8-1, B12+8, C12*2-5</ANSWER>")
    record = dict(task="countdown", mode="async", format_errors=[], trace={"organizer": org, "workers": {}})
    f = diagnose.copy_confusions([record], P.Tokenizer.numbers())
    assert dict(f) == {3: 1, 1: 1}
    assert "(2), by the run" in diagnose.confusions_table(f) and "3 tokens 1" in diagnose.confusions_table(f)


def test_episodes_flag_refuses_a_file_that_is_not_solve_output(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "countdown"}\n')
    assert diagnose.main(["--episodes", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diagnose.py: error: ") and "not a file asyncthink.py solve wrote" in err


@pytest.mark.parametrize("attempt, cause", [
    ("2*1=3 ok", "first step wrong"),                        # 2*1 is 2
    ("12+9=21 ok", "claimed v = target"),                    # 21 is not the target 30
    ("12+9=21 30-21=8: have ok", "distance wrong"),          # 30-21 is 9
    ("12+9=21 30-22=8: have ok", "distance wrong"),          # the wrong operand
    ("12+9=21 30-21=9: have ok", "claimed have, not left"),  # 9 is the pair itself, not left
    ("12*3=36 36-30=6: 6-2=5 ok", "scan subtraction wrong"),
    ("12*3=36 36-30=6: 6-2=4 ok", "claimed scan ok, not left"),  # 4 is not among 2 5 9
    ("12*3=36 36-30=6: 6-1=5 ok", "claimed scan ok, not left"),  # 1 is not there either
    ("12*3=36 36-30=6: have ok", "claimed have, not left"),
    ("12*2=24 30-24=6: 6-... ", "claimed scan ok, not left"),    # no scan at all
    ("12+5=17 30-17=13: 13-2=11 13-9=4 ok", "claimed scan ok, not left"),  # below 5 only: 2
    ("9*2=18 30-18=12: have ok", "expression copied wrong"),  # every claim holds: the copy failed
    ("", "no attempt above"),
])
def test_wrong_find_cause_names_the_first_false_claim(attempt, cause):
    # numbers 2 3 5 9 12, target 30: after 12 and 3 the rest is 2 5 9; after 9*2 it is 3 5 12
    assert diagnose.wrong_find_cause(attempt, [2, 3, 5, 9, 12], 30) == cause


def test_worker_divergence_finds_the_first_token_off_the_solver_text():
    # numbers 1 2 3 5 7, target 16; the solver's worker for the pair 5 3 (traces.pair_attempts)
    exact = ("below 1 2\nrest 1 2 7\n5+3=8 16-8=8: no\n5-3=2 16-2=14: no\n"
             "5*3=15 16-15=1: have ok\n-> 5*3+1\n<RETURN>5*3+1</RETURN>")
    wrong_distance = exact.replace("16-2=14", "16-2=13")
    organizer = ("<FORK-1>5 3 of 1 2 3 5 7 to 16</FORK-1><FORK-2>5 3 of 1 2 3 5 7 to 16</FORK-2>"
                 "<FORK-3>5 5 of 1 2 3 5 7 to 16</FORK-3><FORK-4>7 3 of 1 2 3 5 to 16</FORK-4>")
    record = dict(task="countdown", numbers=[1, 2, 3, 5, 7], target=16, k=4, trace={
        "organizer": organizer, "workers": {"1": exact, "2": wrong_distance, "3": exact, "4": exact}})
    f = diagnose.worker_divergence([record], P.Tokenizer.numbers())
    # worker 3's pair repeats a number, worker 4's sub-query miscopies the puzzle's numbers
    assert f == {"workers": 4, "exact": 1, "sub-query invalid": 2, "first off: wrk distance result": 1}
    assert "writing the solver's text exactly 1" in diagnose.divergence_table(f)
