"""chat.py: scripted sessions with a person in the organization. A tiny random model whose model
threads write scripted tokens (executor force), scripted standard input, timing counted by hand;
the saved record is checked with protocol.parse, the verifier and show_timeline."""
import io
import json
import os

import pytest
import torch

import asyncthink as A
import chat
import executor as E
import protocol as P
from model import GPT, GPTConfig, save_checkpoint

tok = P.Tokenizer.bytes_level(max_forks=8)
ROW = {"task": "countdown", "numbers": [1, 2, 3, 4, 5, 6], "target": 3, "k": 1}


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", tok.n_vocab)).eval()


def text(s):
    return tok.encode(s)


def worker_script(n_think, result="7"):
    return text("w" * n_think) + [tok.ret] + text(result) + [tok.ret_end]


def scripted(scripts):
    """force(): thread i (0 the organizer, i worker i) writes scripts[i] in order, then samples."""
    def force(ep, th):
        script = scripts.get(th.fork_id, [])
        return script[th.generated] if th.generated < len(script) else None
    return force


def session(gpt, scripts, human="organizer", row=ROW, steps_per_line=4, capacity=4, route="prefix"):
    out = []
    cfg = E.RunConfig(capacity=capacity, temperature=0.0, batch_episodes=1)
    s = chat.Session(gpt, tok, cfg, row, human, route, say=out.append, steps_per_line=steps_per_line,
                     force=scripted(scripts))
    return s, out


def talk(s, lines):
    chat.converse(s, chat.Script(lines))
    return s.record()


def test_a_person_organizes_forks_waits_at_a_join_and_answers(gpt):
    # worker 1 thinks 33 steps, worker 2 seven; each line arrives 4 steps after the one before
    s, out = session(gpt, {1: worker_script(30), 2: worker_script(2, "1+2")})
    rec = talk(s, ["fork 1 2 to 3", "fork 2 1 to 3", "join 1", "join 2", "answer 1+2"])
    assert rec["trace"]["organizer"] == ("<FORK-1>1 2 to 3</FORK-1><FORK-2>2 1 to 3</FORK-2>"
                                         "<JOIN-1>7</JOIN-1><JOIN-2>1+2</JOIN-2><ANSWER>1+2</ANSWER>")
    assert rec["trace"]["workers"] == {"1": "w" * 30 + "<RETURN>7</RETURN>", "2": "ww<RETURN>1+2</RETURN>"}
    assert rec["answers"] == ["1+2"] and rec["correct"] and rec["stop_reason"] == "answer"
    assert rec["human"] == [0] and rec["format_errors"] == [] and rec["tokens"] == 33 + 7
    # by hand: fork 1 at step 0 (worker 1 decodes 1..33), fork 2 at 4 (5..11), join 1 at 8 waits
    # until 33, the organizer resumes at 34, where join 2 and the answer land
    rows = {r["thread"]: r for r in rec["trace"]["timeline"]}
    assert [tuple(a) for a in rows["worker 1"]["active"]] == [(1, 33)] and rows["worker 1"]["join_step"] == 33
    assert [tuple(a) for a in rows["worker 2"]["active"]] == [(5, 11)] and rows["worker 2"]["join_step"] == 34
    assert [tuple(a) for a in rows["organizer"]["active"]] == [(1, 8), (34, 34)] and rows["organizer"]["human"]
    assert rec["latency"] == 34 and rec["concurrency"] == round((8 + 1 + 33 + 7) / 34, 4)
    assert [(e["step"], e["line"]) for e in rec["chat"]] == [
        (0, "fork 1 2 to 3"), (4, "fork 2 1 to 3"), (8, "join 1"), (34, "join 2"), (34, "answer 1+2")]
    assert rec["human_s"]["0"] >= 0 and rows["organizer"]["wall_s"] == rec["human_s"]["0"]
    # returns are shown as they arrive: worker 2's while the person waits for worker 1
    said = "\n".join(out)
    assert said.index("waiting for it") < said.index("worker 2 returned (step 11): 1+2") \
        < said.index("worker 1 returned (step 33): 7")
    assert "verifier: 1+2 ok: 1 of 1 correct" in said


def test_the_saved_record_parses_verifies_and_draws(gpt):
    s, _ = session(gpt, {1: worker_script(3, "1+2")})
    rec = talk(s, ["fork 1 2 to 3", "join 1", "answer 1+2"])
    workers = {int(i): w for i, w in rec["trace"]["workers"].items()}
    traj = P.parse_text(rec["trace"]["organizer"], workers, tok, capacity=4, task="countdown")
    assert traj.errors == [] and traj.answers == rec["answers"] == ["1+2"]
    assert P.plan_of(traj) == "F1 J1" and traj.organizer.children[1].result == "1+2"
    assert A.score(rec, traj.answers) == (1, True)
    lines = A.show_timeline(json.loads(json.dumps(rec))).splitlines()  # as read back from JSON
    assert lines[0].startswith(f"latency {rec['latency']} steps") and lines[1].startswith("organizer (human)|")
    assert lines[2].startswith("worker 1") and "#" in lines[2]


def test_bad_commands_get_a_one_line_hint_and_change_nothing(gpt):
    s, out = session(gpt, {1: worker_script(2, "1+2")})
    rec = talk(s, ["frok 1 2", "fork", "fork 1 2 to 3", "answer 1+2", "join 7", "join one", "wait x",
                   "answer 1+2", "join 1", "answer ???", "answer 1+2"])
    hints = [line for line in out if line.startswith("? ")]
    assert len(hints) == 8 and all("\n" not in h for h in hints)
    assert "unknown command 'frok'" in hints[0] and "fork what?" in hints[1]
    assert "join workers 1 first" in hints[2] and "forked and not joined: 1" in hints[3]
    assert "not a countdown answer" in hints[7]
    assert rec["trace"]["organizer"] == "<FORK-1>1 2 to 3</FORK-1><JOIN-1>1+2</JOIN-1><ANSWER>1+2</ANSWER>"
    assert rec["correct"] and rec["format_errors"] == []


def test_the_pool_is_the_capacity(gpt):
    s, out = session(gpt, {}, capacity=3)  # two workers at most; random workers never return
    talk(s, ["fork a", "fork b", "fork c", "quit"])
    assert any("the pool is full (c=3" in line for line in out)
    assert sorted(s.org.forked) == [1, 2] and s.ep.stop_reason == chat.PERSON_LEFT


def test_end_of_input_mid_session_keeps_the_record(gpt, tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), gpt, tokenizer=tok.spec())
    output = tmp_path / "sessions" / "chat.jsonl"
    out = []
    argv = ["--ckpt", str(path), "--output", str(output), "--steps-per-line", "5"]
    code = chat.main(argv, stdin=io.StringIO("countdown 1 of 1 2 3 4 5 6 to 3\nfork 1 2 to 3\n"), say=out.append)
    assert code == 0
    rec = json.loads(output.read_text())
    assert rec["stop_reason"] == chat.PERSON_LEFT and rec["numbers"] == ROW["numbers"]
    assert rec["trace"]["organizer"] == "<FORK-1>1 2 to 3</FORK-1>"
    assert "missing-answer" in P.error_names(rec["format_errors"])
    # the random worker decoded for the 5 steps of the line that never came
    assert rec["trace"]["timeline"][1]["tokens"] == 5 and rec["steps"] == 5
    assert "(end of input: the person leaves)" in out and any("organizer (human)|" in line for line in out)
    # a second session is appended; input that ends before a question saves nothing
    assert chat.main(argv, stdin=io.StringIO(""), say=out.append) == 0 and len(output.read_text().splitlines()) == 1
    assert chat.main(argv, stdin=["", "quit"], say=out.append) == 0  # an empty line draws a puzzle
    assert len(output.read_text().splitlines()) == 2 and any(line.startswith("a puzzle: countdown") for line in out)


def test_a_persons_return_arrives_at_the_model_organizers_join(gpt):
    # the model organizes: worker 1's sub-query starts 'human:', so the person is worker 1;
    # model worker 2 keeps decoding while the question waits for the person
    fork = lambda i, q: [tok.tag_id("fork", i)] + text(q) + [tok.tag_id("fork_end", i)]
    organizer = (fork(1, "human: 1 2 to 3") + fork(2, "q") + [tok.tag_id("join", 1), tok.tag_id("join", 2)]
                 + [tok.answer] + text("1+2") + [tok.answer_end])
    s, out = session(gpt, {0: organizer, 2: worker_script(20, "2+1")}, human="worker", steps_per_line=30)
    rec = talk(s, ["return 1+2"])
    assert rec["human"] == [1] and rec["route"] == "prefix" and rec["stop_reason"] == "answer"
    assert rec["trace"]["workers"]["1"] == "<RETURN>1+2</RETURN>"
    assert "<JOIN-1>1+2</JOIN-1><JOIN-2>2+1</JOIN-2><ANSWER>1+2</ANSWER>" in rec["trace"]["organizer"]
    assert rec["format_errors"] == [] and rec["correct"]
    assert "the organizer asks you (worker 1): human: 1 2 to 3" in out
    # by hand: the organizer closes fork 1 at step 17 (prompt: 17 tokens) and fork 2 at 20, joins
    # 1 at 21 and waits; worker 2 decodes 21..45 (25 tokens); the person's line lands at step 30
    rows = {r["thread"]: r for r in rec["trace"]["timeline"]}
    person, model_worker = rows["worker 1"], rows["worker 2"]
    assert person["human"] and person["fork_step"] == 17 and person["finish"] == person["join_step"] == 30
    assert [tuple(a) for a in person["active"]] == [(18, 30)] and person["tokens"] == 0
    assert [tuple(a) for a in model_worker["active"]] == [(21, 45)]
    assert rec["human_s"]["1"] == person["wall_s"] >= 0
    traj = P.parse_text(rec["trace"]["organizer"], {int(i): w for i, w in rec["trace"]["workers"].items()},
                        tok, 4, "countdown")
    assert traj.errors == [] and traj.organizer.children[1].result == "1+2"


def test_routing_rules():
    parent = E.Thread(None, "organizer", 0, [])
    every2 = chat.route_rule("every:2")
    asked = []
    for i in range(1, 7):
        asked.append(every2(parent, i, "q"))
        parent.children[i] = None
    assert asked == [False, True, False, True, False, True]
    assert chat.route_rule("prefix")(parent, 1, " human: 3 4") and not chat.route_rule("prefix")(parent, 1, "3 4")
    assert chat.route_rule("all")(parent, 1, "q")
    with pytest.raises(ValueError, match="--route must be"):
        chat.route_rule("sideways")


def test_a_worker_with_no_question_gets_a_hint(gpt):
    s, out = session(gpt, {}, human="worker", steps_per_line=2)
    talk(s, ["return 7", "quit"])
    assert "? no question for you yet: `wait` lets the model think" in out
    assert s.ep.stop_reason == chat.PERSON_LEFT and s.record()["human"] == []


def test_the_plan_the_person_edits_lands_in_the_prompt(gpt):
    out = []
    args = chat.parse_args(["--human", "worker", "--plan", "ask"])
    cfg = E.RunConfig(capacity=4, batch_episodes=1)
    lines = chat.Script(["countdown 1 of 1 2 3 4 5 6 to 3", "F1 F2 F3 F4 J1 J2 J3 J4", "F1 J2", "F1 F2 J2 J1"])
    s = chat.session_from_input(gpt, tok, cfg, lines, args, out.append)
    assert "proposed plan: " + chat.proposed_plan(4) in out
    assert "? pool-overflow: <FORK-4> while 3 workers run (c=4)" in out and any(
        line.startswith("? unknown-join") for line in out)
    assert tok.decode(s.org.prompt) == P.organizer_prompt("countdown 1 of 1 2 3 4 5 6 to 3", "F1 F2 J2 J1")
    assert s.record()["plan"] == "F1 F2 J2 J1"
    # enter accepts the proposal; `none` drops it
    s = chat.session_from_input(gpt, tok, cfg, chat.Script(["", ""]), args, out.append)
    assert f"plan {chat.proposed_plan(4)}\n" in tok.decode(s.org.prompt)
    s = chat.session_from_input(gpt, tok, cfg, chat.Script(["what is 7*6?", "none"]), args, out.append)
    assert tok.decode(s.org.prompt) == "<ORGANIZER>what is 7*6?\n"


def test_a_free_question_is_recorded_unverified(gpt):
    row = chat.parse_question("what is   7*6?")
    s, out = session(gpt, {1: worker_script(1, "42")}, row=row)
    rec = talk(s, ["fork 7*6", "join 1", "answer forty-two"])
    assert rec["question"] == "what is 7*6?" and rec["answers"] == ["forty-two"] and rec["correct"] is None
    assert rec["format_errors"] == [] and "<JOIN-1>42</JOIN-1>" in rec["trace"]["organizer"]


def test_questions_parse_or_say_what_is_wrong():
    assert chat.parse_question("countdown 3 4 5 to 12") == {"task": "countdown", "numbers": [3, 4, 5],
                                                            "target": 12, "k": 1}
    assert chat.parse_question("sudoku 1.3.....2..4...1") == {"task": "sudoku", "puzzle": "1.3.....2..4...1"}
    for bad in ("countdown 4 of 3 to 25", "countdown of 3 4 to", "sudoku 12345", "x" * 300):
        with pytest.raises(ValueError):
            chat.parse_question(bad)


@pytest.mark.parametrize("argv,message", [
    (["--route", "sideways"], "--route must be prefix, all or every:K"),
    (["--plan", "F1 J2"], "unknown-join"),
    (["--question", "countdown 2 of 5 to 3"], "a countdown reads"),
    (["--human", "boss"], "invalid choice"),
    (["--ckpt", "/nowhere.pt", "--question", "hi"], "/nowhere.pt"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    try:
        code = chat.main(argv, stdin=[])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("chat.py: error: ")


def test_a_live_terminal_is_read_without_blocking(gpt):
    # a pipe stands in for the terminal: lines already typed are taken between decode steps
    r, w = os.pipe()
    os.write(w, b"fork 1 2 to 3\njoin 1\nanswer 1+2\n")
    os.close(w)
    s, out = session(gpt, {1: worker_script(3, "1+2")})
    with os.fdopen(r) as stream:
        chat.converse(s, chat.Terminal(stream))
    rec = s.record()
    assert rec["correct"] and rec["trace"]["organizer"].endswith("<JOIN-1>1+2</JOIN-1><ANSWER>1+2</ANSWER>")
    assert [e["line"] for e in rec["chat"]] == ["fork 1 2 to 3", "join 1", "answer 1+2"]


def test_a_person_may_call_a_tool_and_its_answer_takes_its_step(gpt):
    out = []
    cfg = E.RunConfig(capacity=4, temperature=0.0, batch_episodes=1, tools=("calc", "check"))
    s = chat.Session(gpt, tok, cfg, ROW, "organizer", say=out.append, steps_per_line=0)
    rec = talk(s, ["fork calc: 12*9+4", "join 1", "fork check: 2+1", "join 2", "answer 2+1"])
    assert "<JOIN-1>112</JOIN-1>" in rec["trace"]["organizer"] and "<JOIN-2>ok</JOIN-2>" in rec["trace"]["organizer"]
    assert rec["tool_calls"] == 2 and rec["tokens"] == 0 and rec["correct"]
    # nothing decodes, so each join waits exactly the tool's one step (protocol.TOOL_STEPS)
    rows = {r["thread"]: r for r in rec["trace"]["timeline"]}
    assert (rows["worker 1 (calc)"]["fork_step"], rows["worker 1 (calc)"]["join_step"]) == (0, 1)
    assert (rows["worker 2 (check)"]["fork_step"], rows["worker 2 (check)"]["join_step"]) == (1, 2)
    assert rec["latency"] == 2
