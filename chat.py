"""
Humans in the organization: a person plays one of the roles, beside model threads.

AsyncThink's organizer forks sub-queries to workers and joins their takeaways; nothing in the
protocol says a thread must be a model. `python chat.py` lets a person be one:

    --human organizer   the person organizes: types a question, then `fork <sub-query>`,
                        `join <i>`, `answer <text>`; model workers decode while the person types
    --human worker      the model organizes; forks routed to the person (--route) show the
                        sub-query on the terminal, and the person's `return <takeaway>` becomes
                        that worker's <RETURN>; the model's other threads keep decoding meanwhile

A session (the person organizes, the workers are a trained small checkpoint; `> ` lines are
the person's, scripted input, so each arrives 8 decode steps after the one before):

    question> countdown 2 of 3 4 5 6 9 10 to 25
    > fork 10 9 of 3 4 5 6 9 10 to 25
    forked worker 1: 10 9 of 3 4 5 6 9 10 to 25
    > fork 10 6 of 3 4 5 6 9 10 to 25
    forked worker 2: 10 6 of 3 4 5 6 9 10 to 25
    > fork 5 4 of 3 4 5 6 9 10 to 25
    forked worker 3: 5 4 of 3 4 5 6 9 10 to 25
    > join 1
    worker 1 is still thinking: waiting for it
    worker 1 returned (step 83): 10+9+6
    worker 3 returned (step 84): none
    joined worker 1: 10+9+6
    > join 2
    worker 2 is still thinking: waiting for it
    worker 2 returned (step 103): 10+6+4+5
    joined worker 2: 10+6+4+5
    > join 3
    joined worker 3: none
    > answer 10+9+6, 10+6+4+5
    the organizer answers: 10+9+6, 10+6+4+5  (verifier: 10+9+6 ok; 10+6+4+5 ok: 2 of 2 correct)

The organizer's thread is written exactly as a model organizer's would be
(`<FORK-1>9 10 of ...</FORK-1>`, `<JOIN-1>takeaway</JOIN-1>`, `<ANSWER>...</ANSWER>`), so the
saved record is an ordinary one: protocol.parse reads it, asyncthink.show_timeline draws it and
the puzzle's verifier scores it.

Time. The executor's clock counts decode steps; a person has no decode steps, so:
  - Live (a terminal): the executor steps while anything can decode, and reads the person's
    line without blocking between steps (select); when nothing can decode, it waits for the line.
  - Scripted (a pipe, a file, a list of lines in tests): each line arrives --steps-per-line
    decode steps after the previous one (sooner if nothing can decode meanwhile), so a session
    replays step for step.
  - In both, `join i` on a worker still running steps the executor until it returns (a model
    organizer waits the same way), and `wait [n]` lets the model think: n steps, or until the
    next thing happens (a fork, a return, a question for you, the answer).
A person's thread is on the step clock like any other: a person organizer is active on every
step it is not waiting on a join, a person worker from its fork to its return; so latency is
the step the organizer answered at and eta counts the person as a thread. `tokens` counts model
tokens only. Beside the steps the record keeps wall-clock seconds: `human_s` per person's thread,
`wall_s` on its timeline row, and `chat`, every line the person typed with its second and step.

Routing to a person (--human worker, --route): `prefix` (default) sends sub-queries that start
with `human:` (a model can learn to ask); `every:K` sends every K-th fork of the episode (for a
model trained without people, like rl.pt); `all` sends every fork. A tool call (--tools) stays a tool.

The plan (--plan): the organizer's prompt may carry a structure hint, `plan F1 F2 J1 J2` (fork
worker 1, fork worker 2, join 1, join 2; protocol.organizer_prompt), which a model trained with
plans follows. `--plan ask` proposes one before the session starts (protocol.window_plan: c-1
workers busy, the oldest joined first); the person accepts it (enter), drops it (`none`) or types
another, checked with protocol.parse's named errors. `--plan "F1 F2 J1 J2"` gives it at once.

The question: a countdown puzzle (`countdown K of N N N ... to T`, K = 1 if left out) or a
sudoku (`sudoku 1.3.....2..4...1`) is verified; an empty line draws a countdown puzzle; any other
text is a free question, recorded unverified (correct: null).

Ending: `answer` (person organizer) or the model's </ANSWER> ends the episode; `quit`, Ctrl-D
(end of input) or Ctrl-C end it with stop reason "person left", record kept. Every session is
appended as one JSON line to --output. A bad command gets a one-line hint and the session goes on.
With random weights (no --ckpt) the mechanics work, but a model worker rarely writes </RETURN>:
it runs to its token limit, which ends the episode as it does everywhere in the executor.
"""

import argparse
import json
import os
import re
import select
import sys
import time

import torch

import asyncthink as A
import cli
import protocol as P
import tasks
import tools
from executor import ANSWERED, DONE, HUMAN, QUEUED, RUNNING, WAITING, Executor, RunConfig
from model import GPT, GPTConfig

ROLES = ("organizer", "worker")
PERSON_LEFT = "person left"  # the stop reason of a session the person ended (quit, Ctrl-D, Ctrl-C)
PREFIX = "human:"            # --route prefix: a sub-query that starts with this goes to the person
MAX_TEXT = 200               # characters of a typed question, sub-query, takeaway or answer
NOTHING = object()           # Terminal.poll: no line yet (None is the end of input)

HELP = {
    "organizer": ["fork <sub-query>   start a model worker on it (ids 1, 2, ... in order)",
                  "join <i>           take worker i's takeaway (waits while it still thinks)",
                  "answer <text>      the final answer, after every join (countdown: a, b, c)",
                  "wait [n]           let the workers think: n steps, or until one returns",
                  "status / help / quit"],
    "worker": ["return <takeaway>  answer the oldest question the organizer asked you",
               "wait [n]           let the model think: n steps, or until something happens",
               "status / help / quit       (an empty line waits too)"],
}


# -----------------------------------------------------------------------------
# The person's input: scripted lines, or a live terminal read without blocking

class Script:
    """Lines from a list, a file or io.StringIO: each one 'arrives' steps_per_line steps later."""
    live = False

    def __init__(self, lines):
        self.lines = iter(lines)

    def read(self):
        line = next(self.lines, None)
        return None if line is None else line.rstrip("\r\n")


class Terminal:
    """A terminal: poll() returns a line only if the person has finished typing one. It reads the
    file descriptor itself (select sees bytes there, not those a file object has buffered)."""
    live = True

    def __init__(self, stream):
        self.fd, self.pending, self.eof = stream.fileno(), "", False

    def poll(self):
        if "\n" not in self.pending and not self.eof and select.select([self.fd], [], [], 0)[0]:
            self.fill()
        return self.take()

    def read(self):
        while (line := self.take()) is NOTHING:
            self.fill()
        return line

    def fill(self):
        chunk = os.read(self.fd, 4096)
        self.eof = not chunk
        self.pending += chunk.decode(errors="replace")

    def take(self):
        """The next whole line, None at the end of input, NOTHING while a line is unfinished."""
        if "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            return line.rstrip("\r")
        if self.eof:
            line, self.pending = self.pending, ""
            return line or None
        return NOTHING


def source_for(stream):
    """A Terminal for an interactive terminal (where select works), else a Script of its lines."""
    return Terminal(stream) if stream.isatty() and os.name == "posix" else Script(stream)


# -----------------------------------------------------------------------------
# The question and the plan

def parse_question(text):
    """The row a typed question asks: a countdown or sudoku puzzle (verified), else free text.

    >>> parse_question("countdown 2 of 3 4 5 6 9 10 to 25")
    {'task': 'countdown', 'numbers': [3, 4, 5, 6, 9, 10], 'target': 25, 'k': 2}
    >>> parse_question("what is 7*6?")
    {'task': 'question', 'question': 'what is 7*6?'}
    """
    text = " ".join(text.split())
    if len(text) > MAX_TEXT:
        raise ValueError(f"a question has at most {MAX_TEXT} characters")
    if text.startswith("countdown"):
        m = re.fullmatch(r"countdown (?:(\d+) of )?((?:\d+ ){2,})to (\d+)", text)
        if not m or int(m[1] or 1) < 1:
            raise ValueError("a countdown reads `countdown K of N N N ... to TARGET`, "
                             "e.g. countdown 2 of 3 4 5 6 9 10 to 25")
        return {"task": "countdown", "numbers": [int(n) for n in m[2].split()],
                "target": int(m[3]), "k": int(m[1] or 1)}
    if text.startswith("sudoku"):
        if not re.fullmatch(r"sudoku [.1-4]{16}", text):
            raise ValueError("a sudoku reads `sudoku` and 16 characters from .1234, row-major")
        return {"task": "sudoku", "puzzle": text.split()[1]}
    return {"task": "question", "question": text}


def check_plan(plan, capacity, tok):
    """What is wrong with a plan such as 'F1 F2 J1 J2', as protocol.parse names it, or None:
    the plan is written out as an organizer's trajectory and parsed.

    >>> check_plan("F1 F2 F3 F4 J1 J2 J3 J4", 4, P.Tokenizer.numbers())
    'pool-overflow: <FORK-4> while 3 workers run (c=4)'
    """
    words = plan.split()
    if not words or not all(re.fullmatch(r"[FJ][1-9][0-9]*", w) for w in words):
        return "a plan is words F<i> (fork worker i) and J<i> (join it), e.g. F1 F2 J1 J2"
    if max(int(w[1:]) for w in words) > tok.max_forks:
        return f"fork ids run 1..{tok.max_forks}"
    text = "".join(f"<FORK-{w[1:]}>q</FORK-{w[1:]}>" if w[0] == "F" else f"<JOIN-{w[1:]}>r</JOIN-{w[1:]}>"
                   for w in words)
    errors = P.parse_text(text + P.answer_text([]), {}, tok, capacity).errors
    return errors[0] if errors else None


def proposed_plan(capacity):
    """The plan --plan ask proposes: the sliding window over 2(c-1) workers."""
    return " ".join(P.window_plan(2 * (capacity - 1), capacity))


# -----------------------------------------------------------------------------
# A session: one episode, one person in it

class Session:
    """One episode on the executor with a person in it. handle(line) applies a command; think(n)
    steps the executor; record() is the episode's record. Output goes through `say`."""

    def __init__(self, model, tok, cfg, row, human, route="prefix", say=print, now=time.perf_counter,
                 steps_per_line=8, force=None):
        self.tok, self.cfg, self.row, self.human = tok, cfg, row, human
        self.say, self.now, self.steps_per_line = say, now, steps_per_line
        self.ex = Executor(model, tok, cfg)
        self.ex.start([row], force)
        self.ep = self.ex.pending[-1]
        self.org = self.ep.organizer
        self.t0 = now()
        self.log = []          # the person's lines: {"s": seconds, "step": clock, "line": text}
        self.shown = set()     # the events already reported
        self.asked_at = {}     # person's thread (fork id, 0 the organizer) -> when it began, seconds
        self.seconds = {}      # person's thread -> its wall-clock seconds, once it is done
        self.join_at = {}      # person organizer: fork id -> the step of its join command
        if human == "organizer":
            self.org.human = True
            self.ex.admit()    # the person's organizer takes its place now: HUMAN, no cache slot
            self.ep.t_start, self.asked_at[0] = self.t0, self.t0
        else:
            self.route = route_rule(route)
            self.ex.ask_person = self.route

    # ---- the clock
    def over(self):
        return self.ep.done

    def can_decode(self):
        return not self.ep.done and (bool(self.ex.pending) or any(
            th.state in (QUEUED, RUNNING) for th in self.ep.threads))

    def step(self):
        self.ex.step()
        self.report()

    def think(self, n=None):
        """Step while something can decode: n steps, or (n None) until the next event is shown."""
        shown, steps = len(self.shown), 0
        while self.can_decode() and (steps < n if n is not None else len(self.shown) == shown):
            self.step()
            steps += 1
        return steps

    # ---- what happened: forks, returns, questions for the person, the answer
    def report(self):
        for th in self.ep.threads[1:]:
            i, name = th.fork_id, f"worker {th.fork_id}" + (f" ({th.tool})" if th.tool else "")
            if ("fork", i) not in self.shown:
                self.shown.add(("fork", i))
                if th.human:
                    self.asked_at[i] = self.now()
                    self.say(f"the organizer asks you (worker {i}): {self.sub_query(i)}")
                    self.say("  reply with: return <takeaway>")
                elif not self.org.human:
                    self.say(f"the organizer forks {name}: {self.sub_query(i)}")
            if th.state == DONE and ("done", i) not in self.shown and not th.human:
                self.shown.add(("done", i))
                self.say(f"{name} returned (step {self.rel(th.finish_step)}): {self.tok.decode(th.result)}")
        if self.org.state == WAITING and ("wait", self.org.waiting_on) not in self.shown and not self.org.human:
            self.shown.add(("wait", self.org.waiting_on))
            self.say(f"the organizer waits for worker {self.org.waiting_on}")
        if self.ep.done and "end" not in self.shown:
            self.shown.add("end")
            self.say(self.verdict())

    def verdict(self):
        if self.ep.stop_reason != ANSWERED:
            return f"the episode stopped: {self.ep.stop_reason} (step {self.rel(self.ex.clock)})"
        answer = self.tok.decode(self.org.result)
        line = f"the organizer answers: {answer}"
        parts = P.parse_answer(answer, self.row["task"]) if self.row["task"] in tasks.TASKS else None
        if parts:
            n, _ = A.score(self.row, parts)
            checks = "; ".join(f"{p} {tools.check(p, self.row)}" for p in parts)
            line += f"  (verifier: {checks}: {n} of {self.row.get('k', 1)} correct)"
        return line

    def sub_query(self, i):
        return self.tok.decode(self.org.children[i].prompt[1:]).rstrip("\n")

    def rel(self, step):
        return step - self.ep.step0

    # ---- the person's commands
    def handle(self, line):
        """Apply one typed line; a bad one gets a one-line hint and changes nothing."""
        self.log.append({"s": round(self.now() - self.t0, 3), "step": self.rel(self.ex.clock), "line": line})
        word, _, rest = line.strip().partition(" ")
        if not word:
            return self.wait("")
        commands = ({"fork": self.fork, "join": self.join, "answer": self.answer} if self.human == "organizer"
                    else {"return": self.give_return})
        commands.update({"wait": self.wait, "status": self.status, "help": self.help, "quit": self.quit})
        command = commands.get(word.lower())
        if command is None:
            return self.hint(f"unknown command {word[:20]!r}: try {', '.join(commands)} (help explains)")
        rest = rest.strip()
        if len(rest) > MAX_TEXT:
            return self.hint(f"at most {MAX_TEXT} characters, please")
        command(rest)

    def hint(self, text):
        self.say(f"? {text}")

    def help(self, _=""):
        for line in HELP[self.human]:
            self.say(f"  {line}")

    def fork(self, text):
        org, c = self.org, self.cfg.pool_capacity()
        i = len(org.forked) + 1
        if not text:
            return self.hint("fork what? e.g. fork 9 10 of 3 4 5 6 9 10 to 25")
        if len(org.outstanding) >= c - 1:
            return self.hint(f"the pool is full (c={c}: {c - 1} workers not joined yet): join one first")
        if i > self.tok.max_forks:
            return self.hint(f"no fork ids left (1..{self.tok.max_forks})")
        ids = self.tok.encode_plain(text)
        self.write([self.tok.tag_id("fork", i)] + ids + [self.tok.tag_id("fork_end", i)])
        org.forked.add(i)
        org.outstanding.add(i)
        org.query = ids
        self.ex.fork_worker(org, i)  # a model worker is queued (a tool answers at once)
        self.say(f"forked worker {i}: {text}")
        self.report()

    def join(self, text):
        org = self.org
        if not text.isdigit() or int(text) not in org.outstanding:
            running = ", ".join(map(str, sorted(org.outstanding))) or "none"
            return self.hint(f"join which worker? forked and not joined: {running}")
        i = int(text)
        while org.children[i].tool and org.children[i].finish_step > self.ex.clock:
            self.ex.step()  # a tool answers within the step after its fork (protocol.TOOL_STEPS)
        self.join_at[i] = self.ex.clock
        self.write([self.tok.tag_id("join", i)])
        org.outstanding.discard(i)
        self.ex.join_worker(org, i)  # the takeaway now, or WAITING until worker i returns
        if org.state == WAITING:
            self.say(f"worker {i} is still thinking: waiting for it")
            while org.state == WAITING and not self.ep.done:
                self.step()
            if not self.ep.done:  # it resumes the step after its worker's last, as a model organizer does
                self.step()
        if not self.ep.done:
            self.say(f"joined worker {i}: {self.tok.decode(org.children[i].result)}")

    def answer(self, text):
        org, task = self.org, self.row["task"]
        if org.outstanding:
            return self.hint("join workers " + ", ".join(map(str, sorted(org.outstanding)))
                             + " first: an answer comes after every join")
        if not text:
            return self.hint("answer what?")
        if task in tasks.TASKS and P.parse_answer(text, task) is None:
            form = "expressions separated by ', '" if task == "countdown" else "16 digits 1-4"
            return self.hint(f"not a {task} answer: {form} (or none)")
        ids = self.tok.encode_plain(text)
        self.write([self.tok.answer] + ids + [self.tok.answer_end])
        org.result = ids
        self.seconds[0] = self.now() - self.asked_at[0]
        self.ex.finish(org)  # the organizer is done: the episode ends, answered
        self.report()

    def give_return(self, text):
        asked = [th for th in self.ep.threads if th.human and th.state == HUMAN]
        if not asked:
            return self.hint("no question for you yet: `wait` lets the model think")
        if not text:
            return self.hint("return what? e.g. return 9+10+6")
        th, ids = asked[0], self.tok.encode_plain(text)
        th.inject([self.tok.ret] + ids + [self.tok.ret_end])
        th.feed, th.result = [], ids  # nothing to push: a person's thread is not in the cache
        self.seconds[th.fork_id] = self.now() - self.asked_at[th.fork_id]
        self.ex.finish(th)  # DONE; a organizer waiting on it resumes at the next step
        self.say(f"returned to the organizer as worker {th.fork_id}")
        self.report()

    def write(self, ids):
        """Tokens the person wrote into the organizer's thread (injected: they cost no decode step)."""
        self.org.inject(ids)
        self.org.feed = []  # never pushed: a person's thread is not in the cache

    def wait(self, text):
        if text and not text.isdigit():
            return self.hint("wait takes a number of steps, or nothing")
        if not self.can_decode():
            return self.hint("nothing is thinking: " + ("fork, join or answer" if self.human == "organizer"
                                                         else "the organizer waits for you: return <takeaway>"))
        steps = self.think(int(text) if text else None)
        self.say(f"(step {self.rel(self.ex.clock)}, {steps} steps later)")

    def status(self, _=""):
        self.say(f"step {self.rel(self.ex.clock)}, {self.now() - self.t0:.1f} s")
        for th in self.ep.threads:
            name = "organizer" if th.role == "organizer" else f"worker {th.fork_id}"
            who = "you" if th.human else (th.tool or "model")
            text = self.tok.decode(th.out[-60:]).replace("\n", " ")
            self.say(f"  {name} ({who}): {th.state}, {th.generated} tokens: ...{text}")

    def quit(self, _=""):
        self.leave()

    def leave(self):
        """The person left before the episode ended: stop it, keep the record."""
        if not self.ep.done:
            if self.ep.t_start is None:
                self.ep.t_start = self.t0
            self.ex.end(self.ep, PERSON_LEFT)
            self.report()

    # ---- the record
    def record(self):
        """asyncthink.record of the episode, on the executor's clock, with the person marked:
        `human` lists the person's threads by fork id (0 the organizer), `human_s` their seconds."""
        ep, org = self.ep, self.org
        end = self.now()
        for i, t in self.asked_at.items():
            self.seconds.setdefault(i, end - t)  # a thread the person never finished
        self.person_active()
        rec = A.record(ep, self.tok, self.cfg)
        rows = rec["trace"]["timeline"]
        T = rec["steps"]
        busy = sum(max(0, min(b, T) - a + 1) for r in rows for a, b in r["active"])
        human = [th.fork_id for th in ep.threads if th.human]
        for r, th in zip(rows, ep.threads):
            if th.human:
                r["wall_s"] = round(self.seconds.get(th.fork_id, 0.0), 3)
        rec.update(latency=T, concurrency=round(busy / T, 4) if T else 0.0, human=human,
                   human_s={str(i): round(self.seconds.get(i, 0.0), 3) for i in human}, chat=self.log)
        if self.human == "worker":
            rec["route"] = self.route.spec
        if self.row["task"] not in tasks.TASKS:  # a free question: its answer as typed, unverified
            rec.update(answers=[self.tok.decode(org.result)] if ep.stop_reason == ANSWERED else [],
                       correct=None)
        return rec

    def person_active(self):
        """The steps each person's thread was active on: a worker from its fork to its return,
        the organizer on every step it was not waiting on a join."""
        for th in self.ep.threads:
            if not th.human:
                continue
            start, finish = th.start_step + 1, th.finish_step
            waits = [(self.join_at[i] + 1, (w.join_step or finish)) for i, w in th.children.items()
                     if i in self.join_at] if th.role == "organizer" else []
            runs, t = [], start
            for a, b in sorted(waits):
                if a > t:
                    runs.append((t, a - 1))
                t = max(t, b + 1)
            if finish >= t:
                runs.append((t, finish))
            th.active = runs


def route_rule(spec):
    """--route: which of the model organizer's forks go to the person, as ask_person(parent, i,
    sub_query) -> bool. 'prefix': a sub-query starting with 'human:'; 'every:K': the K-th, 2K-th,
    ... fork of the episode; 'all': every fork."""
    if spec == "prefix":
        rule = lambda parent, i, query: query.strip().startswith(PREFIX)
    elif spec == "all":
        rule = lambda parent, i, query: True
    elif re.fullmatch(r"every:[1-9][0-9]*", spec):
        k = int(spec.split(":")[1])
        rule = lambda parent, i, query: (len(parent.children) + 1) % k == 0
    else:
        raise ValueError(f"--route must be prefix, all or every:K, got {spec!r}")
    rule.spec = spec
    return rule


# -----------------------------------------------------------------------------
# The conversation loop and the command line

def ask(source, prompt, say):
    """One line before the session starts (the question, the plan); None at the end of input."""
    if source.live:
        print(prompt, end="", flush=True)
        return source.read()
    line = source.read()
    if line is not None:
        say(f"{prompt}{line}")
    return line


def agree_question(source, say, seed):
    while True:
        line = ask(source, "question> ", say)
        if line is None:
            return None
        if not line.strip():
            row = tasks.make_puzzles("countdown", "small", n=1, seed=seed, split="test")[0]
            say(f"a puzzle: {P.question_text(row)}")
            return row
        try:
            return parse_question(line)
        except ValueError as e:
            say(f"? {e}")


def agree_plan(source, say, capacity, tok):
    """--plan ask: propose a plan; the person accepts it, drops it or types another."""
    proposal = proposed_plan(capacity)
    say(f"proposed plan: {proposal}")
    say("  enter accepts it, `none` drops it, or type your own (F<i> forks worker i, J<i> joins it)")
    while True:
        line = ask(source, "plan> ", say)
        if line is None:
            return None, False
        line = " ".join(line.split())
        if not line:
            return proposal, True
        if line == "none":
            return None, True
        error = check_plan(line, capacity, tok)
        if error is None:
            return line, True
        say(f"? {error}")


def converse(session, source):
    """The loop: the executor steps while the person reads and types (see the docstring's Time)."""
    say = session.say
    say("commands: " + "; ".join(h.split("  ")[0] for h in HELP[session.human]))
    while not session.over():
        if not source.live:
            session.think(session.steps_per_line)  # the person types the next line meanwhile
            if session.over():
                break
            line = source.read()
            if line is not None:
                say(f"> {line}")
        elif session.can_decode():
            session.step()
            line = source.poll()  # a line only if the person finished one: no blocking
            if line is NOTHING:
                continue
        else:  # nothing can think until the person acts: wait for the line
            print("> ", end="", flush=True)
            line = source.read()
        if line is None:  # Ctrl-D, or the script ran out
            say("(end of input: the person leaves)")
            session.leave()
            break
        session.handle(line)


def session_from_input(model, tok, cfg, source, args, say=print, force=None):
    """Agree on the question and the plan, then the Session; None if the input ended first."""
    row = parse_question(args.question) if args.question else agree_question(source, say, args.seed)
    if row is None:
        return None
    plan = args.plan
    if plan == "ask":
        plan, agreed = agree_plan(source, say, cfg.pool_capacity(), tok)
        if not agreed:
            return None
    elif plan == "none":
        plan = None
    if plan:
        row = {**row, "plan": plan}
        say(f"plan: {plan}")
    return Session(model, tok, cfg, row, args.human, args.route, say, steps_per_line=args.steps_per_line,
                   force=force)


def load(args):
    """(model, tok, cfg): a checkpoint as it was trained, or a random small model (--ckpt none)."""
    cfg = RunConfig(mode="async", capacity=args.capacity, temperature=args.temperature, seed=args.seed,
                    batch_episodes=1, max_worker_tokens=args.max_worker_tokens, tools=args.tools or ())
    cfg.check()
    if args.ckpt:
        model, tok = A.load_model(args.ckpt, "cpu")
        A.as_trained(cfg, A.trained_with(args.ckpt), args.ckpt, tools_given=args.tools is not None)
    else:
        torch.manual_seed(args.seed)
        tok = P.Tokenizer.numbers()
        model = GPT(GPTConfig.preset("small", tok.n_vocab))
    return model.eval(), tok, cfg


def parse_args(argv=None):
    ap = cli.ArgumentParser(prog="chat.py", description="A session with a person in the organization.")
    ap.add_argument("--human", choices=ROLES, default="organizer", help="the role the person plays")
    ap.add_argument("--ckpt", default="", help="a trained checkpoint; default random weights (the mechanics)")
    ap.add_argument("--question", default="", help="the question (else asked for first; empty draws a puzzle)")
    ap.add_argument("--plan", default="none", help="'none', 'ask' (propose one, let the person edit it), "
                                                    "or a plan such as 'F1 F2 J1 J2'")
    ap.add_argument("--route", default="prefix", help="--human worker: which forks go to the person: "
                                                       "prefix (sub-queries starting 'human:'), every:K, all")
    ap.add_argument("--capacity", type=int, default=4, help="pool capacity c (the organizer included)")
    ap.add_argument("--tools", type=A.tool_list, default=None, help="tools a fork may call (calc,check)")
    ap.add_argument("--temperature", type=float, default=0.0, help="model threads: 0 = greedy")
    ap.add_argument("--max-worker-tokens", type=int, default=RunConfig.max_worker_tokens)
    ap.add_argument("--steps-per-line", type=int, default=8,
                    help="scripted input (not a terminal): decode steps between two lines")
    ap.add_argument("--output", default="chat.jsonl", help="each session is appended here as one record")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        route_rule(args.route)
        if args.steps_per_line < 0:
            raise ValueError("--steps-per-line must be >= 0")
        if args.question:
            parse_question(args.question)
        if args.plan not in ("none", "ask") and (error := check_plan(args.plan, args.capacity, P.Tokenizer.numbers())):
            raise ValueError(f"--plan {args.plan!r}: {error}")
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv=None, stdin=None, say=print, force=None):
    args = parse_args(argv)
    try:
        model, tok, cfg = load(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        return cli.fail("chat.py", e)
    source = source_for(stdin or sys.stdin) if not isinstance(stdin, list) else Script(stdin)
    say(f"you are the {args.human}; the model: {args.ckpt or 'random weights'}, capacity {cfg.capacity}")
    session = session_from_input(model, tok, cfg, source, args, say, force)
    if session is None:
        say("(no question: nothing to save)")
        return 0
    try:
        converse(session, source)
    except KeyboardInterrupt:
        say("(interrupted: the person leaves)")
        session.leave()
    rec = session.record()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError as e:
        return cli.fail("chat.py", e)
    say(A.show_timeline(rec))
    say(f"saved the session to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
