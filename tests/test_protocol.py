"""protocol.py: tokenizer, named format errors, and the reference latency on hand-worked
examples (every number below was counted by hand, token by token; text 'x' is one token)."""
import json
import random

import pytest

import protocol as P

tok = P.Tokenizer.bytes_level()


def worker(n_tokens):
    """A worker output of exactly n_tokens decode steps: x...x<RETURN>7</RETURN>."""
    assert n_tokens >= 3
    return "x" * (n_tokens - 3) + "<RETURN>7</RETURN>"


# ---------------------------------------------------------------- tokenizer

def test_every_tag_and_digit_is_one_token():
    for name in P.special_token_names():
        assert len(tok.encode(name)) == 1, name
    for d in "0123456789":
        assert len(tok.encode(d)) == 1
    assert len(tok.encode("1234567")) == 7
    text = "<FORK-3>17*4 then 2 9 to 80</FORK-3><JOIN-3>x</JOIN-3> ok 1 é"
    assert tok.decode(tok.encode(text)) == text
    assert tok.tag(tok.encode("<JOIN-12>")[0]) == ("join", 12)
    assert tok.tag(tok.encode("a")[0]) is None


def test_tag_ids_out_of_range_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        tok.tag_id("fork", P.MAX_FORKS + 1)
    with pytest.raises(ValueError, match="out of range"):
        tok.tag_id("join", 0)
    with pytest.raises(ValueError):
        P.Tokenizer.bytes_level(max_forks=0)
    small = P.Tokenizer.bytes_level(max_forks=4)
    assert small.n_vocab == 256 + 7 + 4 * 4
    assert small.tag_id("join_end", 4) == small.encode("</JOIN-4>")[0]


def naive_number_pieces(text):
    """Oracle for the numbers tokenizer, written as a plain scan instead of a regex: a run of
    1-3 digits with no digit or '.' on either side is one piece; every other digit is a piece
    alone."""
    pieces, i = [], 0
    while i < len(text):
        if text[i].isdigit():
            k = i
            while k < len(text) and text[k].isdigit():
                k += 1
            alone = (k - i <= 3 and (i == 0 or text[i - 1] not in "0123456789.")
                     and (k == len(text) or text[k] != "."))
            if alone:
                pieces.append(text[i:k]); i = k; continue
            pieces.append(text[i]); i += 1; continue
        i += 1
    return pieces


def test_numbers_tokenizer_gives_each_number_one_token():
    num = P.Tokenizer.numbers(max_forks=4)
    for n in list(range(0, 1000, 7)) + [999]:
        assert len(num.encode(str(n))) == 1 and num.encode(f" {n}") == num.encode(" ") + num.encode(str(n)), n
    for word in P.WORDS:
        assert len(num.encode(word)) == 1 and len(num.encode(f" {word}")) == 2, word
    assert len(num.encode("nope")) == 3  # 'no', 'p', 'e': other text stays bytes
    rng = random.Random(0)
    alphabet = "0123456789 .+-*/=:x\n"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = num.encode(text)
        assert num.decode(ids) == text
        digit_tokens = [num.decode([i]) for i in ids if any(c.isdigit() for c in num.decode([i]))]
        assert digit_tokens == naive_number_pieces(text), text
    text = "<FORK-3>17 4 of 2 9 17 to 80</FORK-3><JOIN-3>x</JOIN-3> ok 1 é grid 12.4"
    assert num.decode(num.encode(text)) == text
    n_word_prefixes = len({w[:e] for w in P.WORDS for e in range(2, len(w) + 1)})
    assert num.n_vocab == 256 + 1110 - 10 + n_word_prefixes + 7 + 4 * 4  # 1-3 digit runs, words


def test_tokenizer_spec_round_trip(tmp_path):
    for t in (P.Tokenizer.bytes_level(5), P.Tokenizer.numbers(6)):
        back = P.Tokenizer.from_spec(t.spec())
        assert (back.kind, back.max_forks, back.n_vocab) == (t.kind, t.max_forks, t.n_vocab)
    assert P.Tokenizer.from_spec(None).kind == "bytes"  # checkpoints from before the spec
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        P.Tokenizer.from_spec({"kind": "morse"})


def test_gpt2_tokenizer_files_match_transformers(tmp_path):
    """A tiny GPT-2-format BPE (256 bytes + a few merges), read by tiktoken's loader, encodes
    like transformers' GPT2Tokenizer reading the same files; protocol tags come after it."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers import GPT2Tokenizer
    byte_char = bytes_to_unicode()  # GPT-2's byte -> printable character table, in rank order
    encoder = {ch: i for i, ch in enumerate(byte_char.values())}
    merges = ["Ġ t", "h e", "Ġt he", "1 2", "o r"]
    for m in merges:
        encoder["".join(m.split())] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    (tmp_path / "vocab.json").write_text(json.dumps(encoder))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges))  # no final newline
    ours = P.load_gpt2_tokenizer(str(tmp_path))
    oracle = GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for text in ["the 12 order", "hello there, 1212!", " the  the\nthe"]:
        assert ours.encode(text) == oracle.encode(text), text
    assert ours.encode("<|endoftext|>") == [261]
    assert ours.encode("<ORGANIZER>") == [262]
    assert ours.n_vocab == 262 + len(P.special_token_names())


def test_gpt2_tokenizer_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer files"):
        P.load_gpt2_tokenizer(str(tmp_path))


# ---------------------------------------------------------------- prompts and structures

def test_prompts():
    q = P.question_text({"task": "countdown", "numbers": [2, 3, 5, 7], "target": 10, "k": 2})
    assert P.organizer_prompt(q) == "<ORGANIZER>countdown 2 of 2 3 5 7 to 10\n"
    assert P.organizer_prompt(q, "F1 J1").endswith("\nplan F1 J1\n")
    assert P.worker_prompt("7*2 then 3 to 11") == "<WORKER>7*2 then 3 to 11\n"
    with pytest.raises(ValueError):
        P.question_text({"task": "chess"})


@pytest.mark.parametrize("capacity", [2, 3, 4, 6])
def test_sampled_structures_are_valid(capacity):
    rng = random.Random(capacity)
    for _ in range(200):
        n = rng.randint(1, 8)
        actions = P.sample_plan(rng, n, capacity)
        running, forked = set(), []
        for a in actions:
            i = int(a[1:])
            if a[0] == "F":
                assert len(running) < capacity - 1 and i not in forked
                running.add(i); forked.append(i)
            else:
                running.remove(i)
        assert not running and forked == list(range(1, n + 1))


@pytest.mark.parametrize("capacity", [2, 3, 4, 8])
def test_window_plan_keeps_the_pool_full(capacity):
    """Oracle: simulate the pool; every fork happens when a slot is free, and a join happens
    only when the pool is full (or at the end), so c-1 workers are busy whenever possible."""
    for n in range(1, 10):
        actions = P.window_plan(n, capacity)
        running, forked = [], []
        for a in actions:
            i = int(a[1:])
            if a[0] == "F":
                assert len(running) < capacity - 1
                running.append(i); forked.append(i)
            else:
                assert i == running[0]  # the oldest first
                assert len(running) == capacity - 1 or len(forked) == n
                running.pop(0)
        assert not running and forked == list(range(1, n + 1))
    assert P.window_plan(3, 8) == ["F1", "F2", "F3", "J1", "J2", "J3"]


# ---------------------------------------------------------------- latency, hand-worked

def traj(org, workers, capacity=4, task="countdown"):
    return P.parse_text(org, workers, tok, capacity, task)


def test_join_of_a_finished_worker_does_not_wait():
    # organizer: xxx <FORK-1> q </FORK-1> (fork closes at token 6), 10 x, <JOIN-1> (token 17),
    # injected "7</JOIN-1>", <ANSWER> 7 </ANSWER>: 20 decode steps. Worker: 5 tokens, steps 7..11.
    t = traj("xxx<FORK-1>q</FORK-1>" + "x" * 10 + "<JOIN-1>7</JOIN-1><ANSWER>7</ANSWER>", {1: worker(5)})
    assert t.errors == [] and t.answers == ["7"]
    assert t.organizer.generated == 20 and t.organizer.children[1].generated == 5
    assert P.critical_path(t) == 20
    assert P.concurrency(t) == pytest.approx(25 / 20)
    org, w = P.timeline(t)
    assert (w.fork_step, w.finish, w.join_step, w.active) == (6, 11, 17, [(7, 11)])


def test_join_waits_on_a_slow_worker():
    # same organizer; the worker has 20 tokens (steps 7..26). <JOIN-1> is decoded at step 17,
    # the organizer waits until 26 and decodes its last 3 tokens at 27..29.
    t = traj("xxx<FORK-1>q</FORK-1>" + "x" * 10 + "<JOIN-1>7</JOIN-1><ANSWER>7</ANSWER>", {1: worker(20)})
    assert P.critical_path(t) == 29
    assert P.concurrency(t) == pytest.approx(40 / 29)
    org, w = P.timeline(t)
    assert org.active == [(1, 17), (27, 29)] and w.join_step == 26


def test_fork_all_then_join_all():
    # F1 (tokens 1-3) F2 (4-6) J1 (7) J2 (8) answer (9-11): 11 organizer tokens.
    # w1: 10 tokens, steps 4..13; w2: 4 tokens, steps 7..10. The organizer decodes <JOIN-1> at
    # step 7, waits for w1 until 13, <JOIN-2> at 14 (w2 long done), answer at 15..17.
    org = "<FORK-1>q</FORK-1><FORK-2>q</FORK-2><JOIN-1>7</JOIN-1><JOIN-2>7</JOIN-2><ANSWER>7</ANSWER>"
    t = traj(org, {1: worker(10), 2: worker(4)}, capacity=3)
    assert t.errors == [] and P.plan_of(t) == "F1 F2 J1 J2"
    assert P.critical_path(t) == 17
    assert P.concurrency(t) == pytest.approx((11 + 10 + 4) / 17)


def test_interleaved_fork_join():
    # F1 (1-3) F2 (4-6) J1 (7) F3 (8-10) J2 (11) J3 (12) answer (13-15): 15 organizer tokens.
    # w1 5 tokens: steps 4..8. w2 20 tokens: steps 7..26. <JOIN-1> at step 7 waits until 8;
    # F3 at steps 9..11, so w3 (3 tokens) runs 12..14; <JOIN-2> at 12 waits until 26;
    # <JOIN-3> at 27; answer at 28..30.
    org = ("<FORK-1>q</FORK-1><FORK-2>q</FORK-2><JOIN-1>7</JOIN-1><FORK-3>q</FORK-3>"
           "<JOIN-2>7</JOIN-2><JOIN-3>7</JOIN-3><ANSWER>7</ANSWER>")
    t = traj(org, {1: worker(5), 2: worker(20), 3: worker(3)}, capacity=3)
    assert t.errors == [] and P.plan_of(t) == "F1 F2 J1 F3 J2 J3"
    assert P.critical_path(t) == 30
    assert P.concurrency(t) == pytest.approx((15 + 5 + 20 + 3) / 30)
    spans = {s.name: s for s in P.timeline(t)}
    assert spans["worker 3"].fork_step == 11 and spans["worker 3"].finish == 14
    assert spans["worker 2"].join_step == 26


def test_sequential_thread_has_concurrency_one():
    t = traj("xxxx<ANSWER>1+2</ANSWER>", {})
    assert P.critical_path(t) == 9 and P.concurrency(t) == 1.0 and t.answers == ["1+2"]


# ---------------------------------------------------------------- named format errors

@pytest.mark.parametrize("org, workers, capacity, name", [
    ("<FORK-1>q</FORK-1><JOIN-1>7</JOIN-1><FORK-1>q</FORK-1><JOIN-1>7</JOIN-1><ANSWER>7</ANSWER>",
     {1: worker(3)}, 4, P.DUPLICATE_ID),
    ("<FORK-1>q</FORK-1><FORK-2>q</FORK-2><JOIN-1>7</JOIN-1><JOIN-2>7</JOIN-2><ANSWER>7</ANSWER>",
     {1: worker(3), 2: worker(3)}, 2, P.POOL_OVERFLOW),
    ("<JOIN-5>7</JOIN-5><ANSWER>7</ANSWER>", {}, 4, P.UNKNOWN_JOIN),
    ("<FORK-1>q</FORK-1><ANSWER>7</ANSWER>", {1: worker(3)}, 4, P.UNJOINED_FORK),
    ("<FORK-1>q</FORK-1><JOIN-1>7</JOIN-1><ANSWER>7</ANSWER>", {1: "<FORK-2>q</FORK-2><RETURN>7</RETURN>"},
     4, P.WRONG_ROLE),
    ("<RETURN>7</RETURN><ANSWER>7</ANSWER>", {}, 4, P.WRONG_ROLE),
    ("<FORK-1>q<ANSWER>7</ANSWER>", {}, 4, P.UNCLOSED_FORK),
    ("<FORK-1>qqq", {}, 4, P.UNCLOSED_FORK),
    ("</FORK-2><ANSWER>7</ANSWER>", {}, 4, P.STRAY_TAG),
    ("<FORK-1>q</FORK-1><JOIN-1>7</JOIN-1><ANSWER>7</ANSWER>", {1: "xyz"}, 4, P.MISSING_RETURN),
    ("thinking forever", {}, 4, P.MISSING_ANSWER),
    ("<ANSWER>seven", {}, 4, P.MISSING_ANSWER),
    ("<ANSWER>seven</ANSWER>", {}, 4, P.BAD_ANSWER),
])
def test_named_format_errors(org, workers, capacity, name):
    t = traj(org, workers, capacity)
    assert name in P.error_names(t.errors), t.errors
    assert set(P.error_names(t.errors)) <= set(P.ERROR_NAMES)


def test_valid_trajectories_have_no_errors_and_answers_parse():
    assert P.parse_answer("5+3+2, 7+3", "countdown") == ["5+3+2", "7+3"]
    assert P.parse_answer("none", "countdown") == []
    assert P.parse_answer("5+, x", "countdown") is None
    assert P.parse_answer("1234341221434321", "sudoku") == ["1234341221434321"]
    assert P.parse_answer("12343412214343", "sudoku") is None
    t = traj("<ANSWER>1234341221434321</ANSWER>", {}, task="sudoku")
    assert t.errors == [] and t.answers == ["1234341221434321"]


def test_tokens_after_the_answer_are_not_counted():
    t = traj("x<ANSWER>7</ANSWER>garbage<FORK-1>", {})
    assert t.errors == [] and P.critical_path(t) == 4
