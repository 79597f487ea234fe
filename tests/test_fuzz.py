"""Fuzzing the executor: whatever the model emits, `Executor.run` never raises, never deadlocks,
always ends, and `record` names every format error (names from protocol.ERROR_NAMES).

Three sources of model output, all run through the real executor:
  1. random models sampled by the executor: the tiny GPT with randomly scaled weights and a
     random bias toward the protocol's tags, and `GrammarModel`, a stub language model that
     mostly follows the protocol (so forks, waits on joins, answers and queued workers happen
     often) with a little random noise. All three modes, capacities 1..4, tiny slot pools.
  2. adversarial token streams drawn by hypothesis and forced with `force(ep, thread)`.
  3. named hand-written scenarios, each with the error it must report.

Every episode is checked by `check_run` against independent facts: the limits from RunConfig,
protocol.parse of what was produced, and, for episodes that answered without queueing,
protocol.timeline (the reference latency) against the executor's own step counts.

The three executor bugs this fuzzing found have regression tests at the end of this file.

Long mode: `ASYNCTHINK_FUZZ=long python -m pytest tests/test_fuzz.py` draws 5,000 adversarial
cases (more than 10,000 episodes; about ten minutes on 2 cores) instead of CI's 400.
"""
import contextlib
import json
import math
import os
import random
import signal

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncthink as A
import executor as E
import protocol as P
import tasks
from model import GPT, GPTConfig

tok = P.Tokenizer.bytes_level(max_forks=4)  # few fork ids, so random models hit tags often
V = tok.n_vocab
TAGS = sorted(tok.tags)
NEWLINE = tok.encode("\n")[0]
FILLER = ord("x")
FORK, FORK_END, JOIN, JOIN_END = ({i: tok.tag_id(kind, i) for i in range(1, tok.max_forks + 1)}
                                  for kind in ("fork", "fork_end", "join", "join_end"))
ROWS = (tasks.make_puzzles("countdown", "small", n=32, seed=11, split="test")
        + tasks.make_puzzles("sudoku", "small", n=32, seed=11, split="test"))
random.Random(0).shuffle(ROWS)
RECORD_KEYS = {"answers", "correct", "latency", "concurrency", "tokens", "format_errors", "trace",
               "steps", "stop_reason"}
# stop reason -> the error names of which protocol.parse must report at least one
EXPECTED_ERRORS = {
    "unknown join": {P.UNKNOWN_JOIN},
    "duplicate id or pool overflow": {P.DUPLICATE_ID, P.POOL_OVERFLOW},
    "wrong role": {P.WRONG_ROLE},
    "unclosed fork": {P.UNCLOSED_FORK},
    "tag inside a result": {P.STRAY_TAG},
    "stray tag": {P.STRAY_TAG},
    "worker token limit": {P.MISSING_RETURN},
    "fork past depth": {P.TOO_DEEP},
    "foreign join": {P.FOREIGN_JOIN},
    "return before its joins": {P.UNJOINED_RETURN},
}
FATAL = {P.DUPLICATE_ID, P.POOL_OVERFLOW, P.UNKNOWN_JOIN, P.WRONG_ROLE, P.STRAY_TAG, *P.DEPTH_ERROR_NAMES}


def fatal_errors(errors):
    """The errors that make a trajectory not executable: the executor must stop right there.
    (An unclosed fork is fatal when a tag interrupts it, not when a limit cuts it.)"""
    return [e for e in errors if e.split(":", 1)[0] in FATAL
            or e.startswith(P.UNCLOSED_FORK) and "interrupted" in e]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches are ~50x faster on one thread than on two busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def watchdog(seconds=60):
    """Fail (instead of hanging the suite) if the executor never returns."""
    def boom(signum, frame):
        raise TimeoutError(f"Executor.run still running after {seconds}s: deadlock or runaway loop")
    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def ids(text):
    """Token ids of text with tags, e.g. ids('<FORK-1>ab</FORK-1>') -> 4 ids."""
    return tok.encode(text)


# -----------------------------------------------------------------------------
# Models

def random_gpt(seed):
    """The tiny GPT with its (tied) embedding scaled by a random factor (peaky, context-dependent
    logits) and a random output bias favouring tags, so forks, joins and answers are frequent."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = GPT(GPTConfig.preset("tiny", V))
    bias = torch.zeros(V)
    bias[list(b"0123456789")] = rng.uniform(0, 2)
    tag_mean = rng.uniform(0.5, 3.0)
    for t in TAGS:
        bias[t] = rng.gauss(tag_mean, 1.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(math.exp(rng.uniform(0, math.log(60))))
    model.lm_head.bias = nn.Parameter(bias)
    return model


class StubCache:
    """What the executor uses of a KVCache: per-slot lengths, max_len, free, reset. Each slot
    also keeps the protocol state of the sequence written into it (GrammarModel reads it)."""

    def __init__(self, n_slots, max_len):
        self.n_slots, self.max_len = n_slots, max_len
        self.lengths = torch.zeros(n_slots, dtype=torch.long)
        self.states = [None] * n_slots

    def free(self, slot):
        self.lengths[slot] = 0
        self.states[slot] = None

    def reset(self):
        self.lengths.zero_()
        self.states = [None] * self.n_slots


class SlotState:
    """A sequence's protocol state, updated token by token (prompt, then output)."""

    def __init__(self):
        self.role, self.in_prompt, self.level = None, True, 0
        self.open_fork, self.n_query = None, 0
        self.in_result, self.n_result = False, 0
        self.in_join = None
        self.forked, self.outstanding, self.n_out = set(), [], 0

    def push(self, t):
        kind, i = tok.tag(t) or ("text", 0)
        if self.role is None:
            self.role = "organizer" if kind == "organizer" else "worker"
        elif self.in_prompt:
            if self.role == "worker" and self.level == 0:  # the sub-query's first token: its level
                self.level = t - ord("a") + 1 if ord("a") <= t <= ord("c") else 1
            self.in_prompt = t != NEWLINE
        elif self.in_join is not None:  # the executor's injected takeaway
            self.in_join = None if kind == "join_end" else self.in_join
        else:
            self.n_out += 1
            if self.open_fork is not None:
                self.n_query += 1
                self.open_fork = self.open_fork if kind == "text" else None
            elif self.in_result:
                self.n_result += 1
                self.in_result = kind == "text"
            elif kind == "fork":
                self.forked.add(i)
                self.outstanding.append(i)
                self.open_fork, self.n_query = i, 0
            elif kind == "join":
                if i in self.outstanding:
                    self.outstanding.remove(i)
                self.in_join = i
            elif kind in ("answer", "return"):
                self.in_result, self.n_result = True, 0


class GrammarModel(nn.Module):
    """A stub language model that mostly speaks the protocol: the organizer thinks, forks new
    ids (some models: beyond capacity, or an id again), joins outstanding ones (any order),
    answers with digits; workers think and return.
    With probability `chaos` per token it emits a uniformly random token instead.
    Implements what the executor calls: parameters(), eval(), new_cache, forward_cached (with
    the real model's argument checks, so a cache misuse by the executor raises here too)."""

    def __init__(self, seed, capacity, depth=1):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        rng = random.Random(seed)
        self.capacity, self.depth = capacity, depth
        self.think, self.fork, self.join = (rng.uniform(0.2, 2.0) for _ in range(3))
        self.answer, self.ret, self.end = rng.uniform(0.05, 0.6), rng.uniform(0.1, 0.5), rng.uniform(0.2, 0.6)
        self.overflow, self.dup = rng.choice([0.0, 0.0, 0.05]), rng.choice([0.0, 0.05, 0.3])
        self.chaos = rng.choice([0.0, 0.0, 0.003, 0.03])
        self.text = list(b"0123456789") + list(b"abcdefgh +")
        self.deep, self.foreign = 0.0, 0.0  # recursion: how often a worker at level D forks anyway,
        if depth > 1:                       # or a sub-organizer joins an id that is not its own
            self.deep, self.foreign = rng.choice([0.0, 0.02, 0.1]), rng.choice([0.0, 0.02, 0.1])

    def new_cache(self, n_slots, max_len=None, device=None, dtype=None):
        return StubCache(n_slots, max_len or 256)

    def forward_cached(self, idx, cache, slots, n_new=None):
        B, T = idx.size()
        slots = torch.as_tensor(slots, dtype=torch.long)
        assert slots.shape == (B,) and slots.unique().numel() == B, slots
        assert 0 <= int(slots.min()) and int(slots.max()) < cache.n_slots, slots
        n_new = torch.full((B,), T) if n_new is None else torch.as_tensor(n_new)
        assert 0 <= int(n_new.min()) and int(n_new.max()) <= T and int(n_new.max()) >= 1, n_new
        start = cache.lengths[slots]
        if int((start + T)[n_new > 0].max()) > cache.max_len:  # the real model's error
            raise ValueError(f"KV cache overflow: appending {T} tokens to slots {slots.tolist()} "
                             f"with lengths {start.tolist()} exceeds max_len {cache.max_len}")
        assert 0 <= int(idx.min()) and int(idx.max()) < V, idx
        rows = []
        for b, (slot, n) in enumerate(zip(slots.tolist(), n_new.tolist())):
            if n == 0:  # riding along: writes nothing, and its logits are never read
                rows.append(torch.zeros(V))
                continue
            if cache.states[slot] is None or int(cache.lengths[slot]) == 0:
                cache.states[slot] = SlotState()
            for t in idx[b, :n].tolist():
                cache.states[slot].push(t)
            rows.append(self.next_logits(cache.states[slot]))
        cache.lengths[slots] = start + n_new
        return torch.stack(rows)[:, None, :].expand(B, T, V)

    def next_logits(self, s):
        p = torch.zeros(V)
        def spread(tokens, mass):
            p[tokens] += mass / len(tokens)
        if s.open_fork is not None and self.depth > 1 and not s.n_query:
            p[ord("a") + s.level] += 1.0  # the sub-query starts with the worker's level: a, b, c
        elif s.open_fork is not None:
            end = self.end if s.n_query else 0.0
            p[FORK_END[s.open_fork]] += end
            spread(self.text, 1 - end)
        elif s.in_result:
            end = self.end if s.n_result else 0.0
            p[tok.answer_end if s.role == "organizer" else tok.ret_end] += end
            spread(list(b"0123456789+"), 1 - end)
        elif s.role == "worker" and s.level >= self.depth:  # a leaf (at depth 1: every worker)
            p[tok.ret] += self.ret
            if self.depth > 1:
                p[FORK[1]] += self.deep
            spread(self.text, 1 - self.ret - self.deep)
        else:  # the organizer, or a worker above level D: a sub-organizer
            w = {tok.answer: self.answer * (0.1 if s.outstanding else 1.0)} if s.role == "organizer" else \
                {tok.ret: self.ret * (0.5 if s.outstanding else 1.0)}  # sometimes before its joins
            if self.depth > 1 and s.role == "worker" and 1 not in s.outstanding:
                w[JOIN[1]] = self.foreign  # the parent's worker 1, or one joined before
            new = [i for i in FORK if i not in s.forked]
            if new:
                room = len(s.outstanding) < self.capacity - 1 - s.level
                w[FORK[new[0]]] = self.fork * (1.0 if room else self.overflow)
            for i in s.outstanding:
                w[JOIN[i]] = self.join / len(s.outstanding)
            if s.forked:  # an id used before: a duplicate fork
                w[FORK[min(s.forked)]] = w.get(FORK[min(s.forked)], 0) + self.dup
            total = sum(w.values()) + self.think
            for t, x in w.items():
                p[t] += x / total
            spread(self.text, self.think / total)
        p = (1 - self.chaos) * p / p.sum() + self.chaos / V
        return p.clamp_min(1e-30).log()


# -----------------------------------------------------------------------------
# Running and checking

def run(model, cfg, rows, force=None):
    """Run the executor (with a watchdog) and check every invariant; returns (episodes, records,
    number of episodes whose timing matched protocol.timeline exactly)."""
    ex = E.Executor(model, tok, cfg)
    with watchdog():
        episodes = ex.run(rows, force=force)
    records = check_run(ex, cfg, rows, episodes)
    exact = sum(check_timing(ep, rec, cfg) for ep, rec in zip(episodes, records))
    return episodes, records, exact


def check_run(ex, cfg, rows, episodes):
    assert len(episodes) == len(rows)
    assert [ep.index for ep in episodes] == list(range(len(rows)))
    assert all(ep.row is row for ep, row in zip(episodes, rows))
    # every slot went back to the pool, once, and holds nothing
    assert sorted(ex.free_slots) == list(range(ex.n_slots)), ex.free_slots
    assert int(ex.cache.lengths.abs().sum()) == 0
    assert ex.clock <= len(rows) * cfg.max_steps
    records = [A.record(ep, tok, cfg) for ep in episodes]
    for ep, rec in zip(episodes, records):
        check_episode(ep, rec, cfg)
    return records


def check_episode(ep, rec, cfg):
    assert ep.done and isinstance(ep.stop_reason, str) and ep.stop_reason
    json.loads(json.dumps(rec))
    assert RECORD_KEYS <= set(rec), RECORD_KEYS - set(rec)
    # limits
    org, workers = ep.organizer, ep.threads[1:]
    for th in ep.threads:
        assert th.slot is None and th.state in ("done", "stopped", "queued")
        assert len(th.out) == len(th.injected) == len(th.logprobs)
        assert th.generated == sum(not inj for inj in th.injected)
    assert org.generated <= cfg.max_organizer_tokens
    assert all(w.generated <= cfg.max_worker_tokens for w in workers)
    assert rec["tokens"] == sum(th.generated for th in ep.threads)
    assert rec["tokens"] <= cfg.max_episode_tokens
    if cfg.mode == "parallel":
        assert org.generated == 0 and len(workers) == cfg.workers_in_parallel()
    if cfg.mode == "sequential":
        assert not workers
    assert 0 <= rec["steps"] <= cfg.max_steps
    assert isinstance(rec["latency"], int) and 0 <= rec["latency"] <= rec["steps"]
    assert rec["concurrency"] >= 0
    # the injected takeaways are exactly what the workers returned (sub-organizers' too)
    for th in ep.threads if cfg.mode != "parallel" else [org]:
        i = 0
        while i < len(th.out):
            kind, f = tok.tag(th.out[i]) or ("text", 0)
            if kind == "join" and not th.injected[i] and i + 1 < len(th.out):
                w = th.children[f]
                chunk = w.result + [JOIN_END[f]]
                assert th.out[i + 1:i + 1 + len(chunk)] == chunk and all(th.injected[i + 1:i + 1 + len(chunk)])
                assert w.state == "done"
                i += len(chunk)
            i += 1
    # the named errors: exactly protocol.parse's, named from ERROR_NAMES, and consistent with
    # the reason the executor stopped
    traj = A.trajectory(ep, tok, cfg)
    assert rec["format_errors"] == traj.errors
    names = P.error_names(rec["format_errors"])
    assert set(names) <= set(P.ERROR_NAMES + (P.DEPTH_ERROR_NAMES if cfg.depth > 1 else ())), names
    # the executor stops at the first fatal error, so there is exactly one, of the right name
    fatal = fatal_errors(rec["format_errors"])
    if ep.stop_reason in EXPECTED_ERRORS and ep.stop_reason != "worker token limit":
        assert len(fatal) == 1 and P.error_names(fatal)[0] in EXPECTED_ERRORS[ep.stop_reason], \
            (ep.stop_reason, rec["format_errors"])
    else:
        assert not fatal, (ep.stop_reason, rec["format_errors"])
    if ep.stop_reason == "answer":
        assert P.MISSING_ANSWER not in names
        # (deeper, a sub-organizer left running when the organizer answered may be mid-fork)
        assert set(names) <= {P.BAD_ANSWER, P.UNJOINED_FORK, P.MISSING_RETURN} | ({P.UNCLOSED_FORK} if cfg.depth > 1 else set()), names
        assert not {P.MISSING_RETURN, P.UNCLOSED_FORK} & set(names) or P.UNJOINED_FORK in names, names
        if cfg.mode == "parallel":
            assert not names, names
    else:
        assert P.MISSING_ANSWER in names, (ep.stop_reason, names)
        expected = EXPECTED_ERRORS.get(ep.stop_reason)
        assert expected is None or expected & set(names), (ep.stop_reason, names)
    assert rec["correct"] in (True, False)
    assert not rec["correct"] or not names


def check_timing(ep, rec, cfg):
    """For an episode that answered: the record's latency is protocol.critical_path, and if no
    thread waited for a slot the executor's own steps are exactly protocol.timeline's.
    Returns whether the exact comparison was made."""
    if ep.stop_reason != "answer":
        return False
    traj = A.trajectory(ep, tok, cfg)
    assert rec["latency"] == P.critical_path(traj)
    org, rel = ep.organizer, lambda s: s - ep.step0
    queued = any(w.start_step != w.fork_step for w in ep.threads[1:])
    queued |= cfg.mode != "parallel" and org.start_step != ep.step0
    assert rel(org.finish_step) >= rec["latency"]  # waiting for slots only adds steps
    if queued:
        return False
    assert rel(org.finish_step) == rec["latency"]
    spans = {s.name: s for s in P.timeline(traj)}
    assert [(rel(a), rel(b)) for a, b in org.active] == spans["organizer"].active
    for w in ep.threads[1:]:
        if w.state == "done":
            s = spans[f"worker {w.path}"]
            assert (rel(w.fork_step), rel(w.finish_step)) == (s.fork_step, s.finish)
            assert [(rel(a), rel(b)) for a, b in w.active] == s.active
            if w.join_step is not None and cfg.mode == "async":  # parallel: all joined at once
                assert rel(w.join_step) == s.join_step
    return True


# -----------------------------------------------------------------------------
# 1. Random models, sampled by the executor

def part1_configs():
    """(model kind, RunConfig kwargs): every mode and capacity, plentiful and tiny slot pools,
    sampling variants. Limits are small so thousands of episodes run in seconds."""
    out, rng = [], random.Random(1)
    modes = [("sequential", 1)] + [(m, c) for m in ("async", "parallel") for c in (2, 3, 4)]
    pools = [dict(batch_episodes=64), dict(batch_episodes=8, n_slots=2),
             dict(batch_episodes=4, n_slots=5), dict(batch_episodes=16, n_slots=9)]
    sampling = [dict(), dict(top_k=5), dict(temperature=0.0), dict(temperature=1.5, top_k=20)]
    for kind in ("grammar", "gpt"):
        for mode, capacity in modes:
            for p, pool in enumerate(pools):
                if kind == "gpt" and p % 2:
                    continue
                extra = {}
                if mode == "parallel" and rng.random() < 0.4:
                    extra["n_parallel"] = rng.randint(1, capacity - 1)
                extra["max_len"] = rng.choice([128, 256])  # 128: "context full" happens too
                out.append((kind, dict(mode=mode, capacity=capacity, seed=len(out), **pool,
                                       **rng.choice(sampling), **extra)))
    return out


LIMITS = dict(max_organizer_tokens=40, max_worker_tokens=20, max_episode_tokens=120)


@pytest.mark.parametrize("kind,kw", part1_configs(),
                         ids=lambda x: x if isinstance(x, str) else
                         "-".join(f"{k}={v}" for k, v in x.items() if k != "seed"))
def test_random_models_never_break_the_executor(kind, kw):
    cfg = E.RunConfig(**LIMITS, **kw)
    model = random_gpt(cfg.seed) if kind == "gpt" else GrammarModel(cfg.seed, cfg.capacity)
    episodes, records, exact = run(model, cfg, ROWS)
    if kind == "grammar" and cfg.mode != "sequential" and "n_slots" not in kw and cfg.temperature:
        # the grammar model answers often, through forks and joins: the exact timing check ran
        assert exact > 0
        assert any(ep.stop_reason == "answer" and len(ep.threads) > 1 for ep in episodes)


def test_random_models_reach_every_outcome():
    """The fuzz is not vacuous: the models above produce every kind of ending and error."""
    reasons, names, waits, queued = set(), set(), 0, 0
    for kind, kw in part1_configs()[::2]:
        cfg = E.RunConfig(**LIMITS, **kw)
        model = random_gpt(cfg.seed) if kind == "gpt" else GrammarModel(cfg.seed, cfg.capacity)
        episodes, records, _ = run(model, cfg, ROWS[:24])
        for ep, rec in zip(episodes, records):
            reasons.add(ep.stop_reason)
            names |= set(P.error_names(rec["format_errors"]))
            runs = ep.organizer.active
            waits += any(a2 > b1 + 1 for (_, b1), (a2, _) in zip(runs, runs[1:]))
            queued += any(w.start_step is None or w.start_step > w.fork_step for w in ep.threads[1:])
    # ('context full' needs long contexts: test_long_takeaway_after_a_wait_... reaches it)
    assert {"answer", "unknown join", "stray tag", "wrong role", "unclosed fork",
            "worker token limit", "duplicate id or pool overflow"} <= reasons, reasons
    assert names == set(P.ERROR_NAMES), set(P.ERROR_NAMES) - names
    assert waits > 0 and queued > 0


# -----------------------------------------------------------------------------
# 2. Adversarial streams, forced

text_token = st.one_of(st.sampled_from(list(b"0123456789+*-() ")), st.integers(0, 255))
texts = st.lists(text_token, max_size=4)
fork_id = st.integers(1, tok.max_forks)
chunk = st.one_of(
    texts,
    st.builds(lambda i, q: [FORK[i]] + q + [FORK_END[i]], fork_id, texts),  # a fork
    st.builds(lambda i, q: [FORK[i]] + q, fork_id, texts),                  # left open
    st.builds(lambda i, name, q: [FORK[i]] + list(f"{name}: ".encode()) + q + [FORK_END[i]],
              fork_id, st.sampled_from(P.TOOLS), texts),                    # a tool call
    fork_id.map(lambda i: [JOIN[i]]),                                       # known or not
    texts.map(lambda q: [tok.answer] + q + [tok.answer_end]),              # garbage or not
    texts.map(lambda q: [tok.ret] + q + [tok.ret_end]),
    st.sampled_from(TAGS).map(lambda t: [t]),  # any tag anywhere: </JOIN-i>, <PAD>, <ORGANIZER>...
)
stream = st.lists(chunk, max_size=10).map(lambda cs: [t for c in cs for t in c])
sub_query = st.one_of(texts, st.builds(lambda name, q: list(f"{name}: ".encode()) + q,  # maybe a tool's
                                       st.sampled_from(P.TOOLS), texts))
random_script = st.fixed_dictionaries({
    "organizer": stream, "workers": st.lists(stream, min_size=tok.max_forks, max_size=tok.max_forks),
    "tail": st.sampled_from(["text", "model"])})


@st.composite
def perturbed_script(draw, capacity):
    """A valid trajectory at this capacity (random fork/join structure, workers that think then
    return, an answer), then up to two edits in any thread: a token deleted, any tag written
    anywhere, a fork of any id inserted, or the thread's first fork repeated later."""
    thought = st.lists(st.sampled_from(list(b"abc 123")), max_size=8)
    seed, c = draw(st.integers(0, 2**16)), max(2, capacity)
    n_forks = 0 if capacity == 1 else draw(st.integers(0, tok.max_forks))
    organizer = []
    for action in P.sample_plan(random.Random(seed), n_forks, c):
        i = int(action[1:])
        organizer += draw(thought) + ([FORK[i]] + draw(sub_query) + [FORK_END[i]] if action[0] == "F"
                                      else [JOIN[i]])
    answer = draw(st.lists(st.sampled_from(list(b"12+")), max_size=4))
    organizer += draw(thought) + [tok.answer] + answer + [tok.answer_end]
    threads = [organizer] + [draw(thought) + [tok.ret] + draw(texts) + [tok.ret_end]
                             for _ in range(tok.max_forks)]
    edit = st.one_of(st.none(), st.sampled_from(TAGS).map(lambda t: [t]),   # delete / a tag
                     fork_id.map(lambda i: [FORK[i], ord("q"), FORK_END[i]]),  # a fork
                     st.just("again"))  # the thread's first fork, again, later
    for which, pos, ins in draw(st.lists(st.tuples(st.sampled_from([0, 0, 0, 1, 2, 3, 4]),
                                                   st.integers(0, 40), edit), max_size=2)):
        ids_ = threads[which]
        pos = min(pos, len(ids_))
        if ins == "again":
            forks = [(k, ids_.index(FORK_END[tok.tag(t)[1]], k)) for k, t in enumerate(ids_)
                     if tok.tag(t) and tok.tag(t)[0] == "fork" and FORK_END[tok.tag(t)[1]] in ids_[k:]]
            if not forks:
                continue
            (start, end), *_ = forks
            ins, pos = ids_[start:end + 1], max(pos, end + 1)
        threads[which] = ids_[:pos] + ids_[pos + 1:] if ins is None else ids_[:pos] + ins + ids_[pos:]
    return {"organizer": threads[0], "workers": threads[1:], "tail": draw(st.sampled_from(["text", "model"]))}


@st.composite
def run_configs(draw):
    mode = draw(st.sampled_from(E.MODES))
    capacity = 1 if mode == "sequential" else draw(st.integers(2, 4))
    n_parallel = draw(st.integers(1, capacity - 1)) if mode == "parallel" else None
    batch = draw(st.integers(1, 4))
    pick = lambda *values: draw(st.sampled_from(values))  # mostly roomy limits, some tiny ones
    return E.RunConfig(mode=mode, capacity=capacity, n_parallel=n_parallel, batch_episodes=batch,
                       n_slots=pick(None, None, 2, 3, 5),
                       max_organizer_tokens=pick(60, 60, 60, 30, 12, 5, 2, 1),
                       max_worker_tokens=pick(30, 30, 30, 8, 3, 1),
                       max_episode_tokens=pick(150, 150, 150, 40, 10, 1),
                       max_steps=pick(300, 300, 15), max_len=pick(128, 256),
                       temperature=pick(0.0, 1.0), top_k=pick(None, 3), seed=draw(st.integers(0, 3)),
                       tools=pick((), P.TOOLS))


@st.composite
def cases(draw):
    """A RunConfig and 1-4 episode scripts: random token soup, or valid trajectories at the
    run's capacity (sometimes another one) with a few edits."""
    cfg = draw(run_configs())
    c = cfg.capacity if draw(st.integers(0, 3)) else draw(st.integers(1, 4))
    script = st.one_of(random_script, perturbed_script(c))
    return cfg, draw(st.lists(script, min_size=1, max_size=4))


def forcer(scripts):
    """force(ep, th): the scripted token for this thread's next decode step; past the script,
    filler text (a thread that never ends by itself) or None (the grammar model samples)."""
    def force(ep, th):
        s = scripts[ep.index]
        ids_ = s["organizer"] if th.role == "organizer" else s["workers"][th.fork_id - 1]
        if th.generated < len(ids_):
            return ids_[th.generated]
        return FILLER if s["tail"] == "text" else None
    return force


LONG = os.environ.get("ASYNCTHINK_FUZZ") == "long"
FORCED_EPISODES = []  # how many episodes the forced-stream fuzz ran (checked in long mode)


@settings(max_examples=5000 if LONG else 400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_forced_streams_never_break_the_executor(case):
    cfg, scripts = case
    rows = ROWS[:len(scripts)]
    episodes, records, _ = run(GrammarModel(cfg.seed, cfg.capacity), cfg, rows, forcer(scripts))
    FORCED_EPISODES.append(len(episodes))
    for ep, s in zip(episodes, scripts):  # every thread emitted exactly its script
        for th in ep.threads:
            want = s["organizer"] if th.role == "organizer" else s["workers"][th.fork_id - 1]
            got = [t for t, inj in zip(th.out, th.injected) if not inj]
            assert got[:len(want)] == want[:len(got)]
            if s["tail"] == "text":
                assert all(t == FILLER for t in got[len(want):])


def test_tool_calls_keep_the_protocols_timing_exactly():
    """Valid trajectories whose forks go to a tool or to a model worker at random: every episode
    answers, and the executor's steps equal protocol.timeline's exactly (check_timing)."""
    rng = random.Random(7)
    scripts = []
    for _ in range(32):
        organizer = []
        for action in P.sample_plan(rng, rng.randint(1, tok.max_forks), 4):
            i = int(action[1:])
            organizer += list(b"ab"[:rng.randint(0, 2)])
            query = rng.choice([b"calc: 2+3", b"check: 12+7", b"calc: 1/0", b"q"])
            organizer += [FORK[i]] + list(query) + [FORK_END[i]] if action[0] == "F" else [JOIN[i]]
        organizer += [tok.answer] + list(b"1+2") + [tok.answer_end]
        workers = [list(b"xyz"[:rng.randint(0, 3)]) + [tok.ret, ord("7"), tok.ret_end] for _ in range(tok.max_forks)]
        scripts.append({"organizer": organizer, "workers": workers, "tail": "text"})
    cfg = E.RunConfig(capacity=4, tools=P.TOOLS, batch_episodes=8, max_organizer_tokens=300,
                      max_worker_tokens=20, max_episode_tokens=1000)
    rows = [row for row in ROWS if row["task"] == "countdown"][:len(scripts)]
    episodes, records, exact = run(GrammarModel(0, 4), cfg, rows, forcer(scripts))
    assert all(rec["stop_reason"] == "answer" and rec["format_errors"] == [] for rec in records)
    assert exact == len(scripts)
    assert sum(rec["tool_calls"] for rec in records) > 20


@pytest.mark.skipif(not LONG, reason="long mode only (ASYNCTHINK_FUZZ=long)")
def test_long_mode_ran_ten_thousand_forced_episodes():
    assert sum(FORCED_EPISODES) >= 10_000, sum(FORCED_EPISODES)


# -----------------------------------------------------------------------------
# 3. Named scenarios

@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", V))


def scenario(model, organizer, workers=None, tail=FILLER, **kw):
    """Run one episode whose organizer emits `organizer` (text with tags) and whose worker i
    emits workers[i], each followed by `tail` forever. Returns (episode, record)."""
    scripts = {"organizer": ids(organizer), **{i: ids(t) for i, t in (workers or {}).items()}}
    def force(ep, th):
        s = scripts.get("organizer" if th.role == "organizer" else th.fork_id, [])
        return s[th.generated] if th.generated < len(s) else tail
    cfg = E.RunConfig(**{**dict(max_organizer_tokens=30, max_worker_tokens=15, max_episode_tokens=200), **kw})
    row = {"task": "countdown", "numbers": [2, 3, 5, 7], "target": 10, "k": 2}
    (ep,), (rec,), _ = run(model, cfg, [row], force)
    return ep, rec


SCENARIOS = {  # name: (organizer, workers, RunConfig kwargs, expected error, stop reason contains)
    "unknown join": ("ab<JOIN-2>", {}, {}, P.UNKNOWN_JOIN, "unknown join"),
    "join twice": ("<FORK-1>q</FORK-1><JOIN-1><JOIN-1>", {1: "<RETURN>7</RETURN>"}, {},
                   P.UNKNOWN_JOIN, "unknown join"),
    "duplicate fork": ("<FORK-1>a</FORK-1><FORK-1>b</FORK-1>", {}, {}, P.DUPLICATE_ID, "duplicate"),
    "fork in a worker": ("<FORK-1>a</FORK-1><JOIN-1>", {1: "x<FORK-2>b</FORK-2>"}, {},
                         P.WRONG_ROLE, "wrong role"),
    "answer in a worker": ("<FORK-1>a</FORK-1><JOIN-1>", {1: "<ANSWER>1</ANSWER>"}, {},
                           P.WRONG_ROLE, "wrong role"),
    "return in the organizer": ("<RETURN>1</RETURN>", {}, {}, P.WRONG_ROLE, "wrong role"),
    "unclosed fork at the token limit": ("<FORK-1>sub-query", {}, {}, P.UNCLOSED_FORK,
                                         "organizer token limit"),
    "fork interrupted by a tag": ("<FORK-1>a<FORK-2>", {}, {}, P.UNCLOSED_FORK, "unclosed fork"),
    "worker never returns": ("<FORK-1>a</FORK-1><JOIN-1>", {1: "thinking"}, {},
                             P.MISSING_RETURN, "worker token limit"),
    "no answer": ("thinking", {}, {}, P.MISSING_ANSWER, "organizer token limit"),
    "no answer, episode limit": ("thinking", {}, dict(max_episode_tokens=7), P.MISSING_ANSWER,
                                 "episode token limit"),
    "pool overflow at c=2": ("<FORK-1>a</FORK-1><FORK-2>b</FORK-2>", {}, dict(capacity=2),
                             P.POOL_OVERFLOW, "pool overflow"),
    "fork in sequential mode": ("<FORK-1>a</FORK-1>", {}, dict(mode="sequential", capacity=1),
                                P.POOL_OVERFLOW, "pool overflow"),
    "unjoined fork": ("<FORK-1>a</FORK-1><ANSWER>5+3</ANSWER>", {}, {}, P.UNJOINED_FORK, "answer"),
    "garbage answer": ("<ANSWER>hello!</ANSWER>", {}, {}, P.BAD_ANSWER, "answer"),
    "tag inside the answer": ("<ANSWER>1<JOIN-1>", {}, {}, P.STRAY_TAG, "tag inside"),
    "tag inside the takeaway": ("<FORK-1>a</FORK-1><JOIN-1>", {1: "<RETURN>1</ANSWER>"}, {},
                                P.STRAY_TAG, "tag inside"),
    "closing join generated": ("</JOIN-1>", {}, {}, P.STRAY_TAG, "stray"),
    "pad generated": ("<PAD>", {}, {}, P.STRAY_TAG, "stray"),
    "organizer marker generated": ("a<ORGANIZER>", {}, {}, P.STRAY_TAG, "stray"),
    "closing return in a worker": ("<FORK-1>a</FORK-1><JOIN-1>", {1: "</RETURN>"}, {},
                                   P.STRAY_TAG, "stray"),
    "worker marker generated": ("<FORK-1>a</FORK-1><JOIN-1>", {1: "xy<WORKER>"}, {},
                                P.STRAY_TAG, "stray"),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_named_scenario(gpt, name):
    organizer, workers, kw, error, reason = SCENARIOS[name]
    for mode_kw in ([kw] if "mode" in kw else [kw, {**kw, "n_slots": 2, "batch_episodes": 1}]):
        ep, rec = scenario(gpt, organizer, workers, **mode_kw)
        assert error in P.error_names(rec["format_errors"]), rec["format_errors"]
        assert reason in ep.stop_reason, ep.stop_reason


def test_a_valid_episode_has_no_errors_and_the_hand_counted_latency(gpt):
    """F1 a b /F1 at steps 1-4; the worker decodes <RETURN>7</RETURN> at steps 5-7 while the
    organizer decodes <JOIN-1> at 5 and waits; it resumes at 8: <ANSWER>5+3</ANSWER> is 8-12."""
    ep, rec = scenario(gpt, "<FORK-1>ab</FORK-1><JOIN-1><ANSWER>5+3</ANSWER>",
                       {1: "<RETURN>7</RETURN>"})
    assert rec["format_errors"] == [] and ep.stop_reason == "answer"
    assert rec["latency"] == 12 and ep.organizer.finish_step - ep.step0 == 12
    assert rec["tokens"] == 10 + 3 and rec["answers"] == ["5+3"]
    assert rec["trace"]["organizer"] == "<FORK-1>ab</FORK-1><JOIN-1>7</JOIN-1><ANSWER>5+3</ANSWER>"


def test_every_episode_ends_within_max_steps(gpt):
    big = dict(max_organizer_tokens=10**6, max_worker_tokens=10**6, max_episode_tokens=10**6)
    ep, rec = scenario(gpt, "", max_steps=50, **big)
    assert ep.stop_reason == "max steps" and rec["steps"] == 50
    assert P.MISSING_ANSWER in P.error_names(rec["format_errors"])
    # a waiting organizer and a worker that thinks forever: max steps too
    ep, rec = scenario(gpt, "<FORK-1>a</FORK-1><JOIN-1>", max_steps=40, **big)
    assert ep.stop_reason == "max steps" and rec["steps"] == 40
    assert {P.MISSING_RETURN, P.MISSING_ANSWER} <= set(P.error_names(rec["format_errors"]))


def test_a_pool_without_room_for_a_worker_is_refused():
    """n_slots=1 in async mode would leave a forked worker without a slot (its organizer
    holds the only one): RunConfig refuses it up front."""
    with pytest.raises(ValueError, match="at least 2 cache slots"):
        E.RunConfig(mode="async", n_slots=1).check()
    E.RunConfig(mode="sequential", n_slots=1).check()


def test_many_episodes_share_a_tiny_pool(gpt):
    """32 episodes, each forking two workers and joining them in reverse order, through a
    plentiful pool and through 3 slots (2 organizers at a time, workers queue for the third).
    All answer without errors, and the latency is the protocol's, queued or not:
    F1 a /F1 at 1-3, worker 1 (7 tokens) at 4-10; F2 b /F2 at 4-6, worker 2 (3 tokens) at 7-9;
    x y at 7-8; <JOIN-2> at 9 (worker 2 ends at 9, same step); <JOIN-1> at 10 (worker 1 ends
    at 10); <ANSWER>5+3</ANSWER> at 11-15: latency 15."""
    org = ids("<FORK-1>a</FORK-1><FORK-2>b</FORK-2>xy<JOIN-2><JOIN-1><ANSWER>5+3</ANSWER>")
    workers = {1: ids("1234<RETURN>7</RETURN>"), 2: ids("<RETURN>8</RETURN>")}
    def force(ep, th):
        s = org if th.role == "organizer" else workers[th.fork_id]
        return s[th.generated] if th.generated < len(s) else FILLER
    rows = [r for r in ROWS if r["task"] == "countdown"]
    for n_slots, steps in ((None, 15), (3, None)):
        cfg = E.RunConfig(capacity=3, n_slots=n_slots, batch_episodes=4, max_organizer_tokens=30,
                          max_worker_tokens=15, max_episode_tokens=200)
        episodes, records, exact = run(gpt, cfg, rows, force)
        assert all(ep.stop_reason == "answer" for ep in episodes)
        assert all(rec["format_errors"] == [] for rec in records)
        assert all(rec["latency"] == 15 for rec in records)
        if steps:  # no queueing: the executor's own steps are the protocol's
            assert exact == len(rows) and all(rec["steps"] == steps for rec in records)
        else:
            assert max(rec["steps"] for rec in records) > 15


# -----------------------------------------------------------------------------
# Regressions: bugs this fuzzing found, fixed in asyncthink.py

def test_long_takeaway_after_a_wait_ends_the_episode_cleanly(gpt):
    """A takeaway injected when a waited-on worker returns must fit the organizer's slot;
    it once overflowed the cache (ValueError). Now the episode ends with 'context full'."""
    ep, rec = scenario(gpt, "<FORK-1>q</FORK-1>" + "x" * 130 + "<JOIN-1>",
                       {1: "y" * 50 + "<RETURN>" + "7" * 100 + "</RETURN>"},
                       max_organizer_tokens=1000, max_worker_tokens=1000, max_episode_tokens=5000)
    assert ep.stop_reason == "context full" and P.MISSING_ANSWER in P.error_names(rec["format_errors"])


def test_non_utf8_sub_query_keeps_its_ids(gpt):
    """The worker prompt is built from the sampled ids, not by re-encoding decoded text
    (invalid bytes once became 3-byte U+FFFD and overflowed the worker's slot)."""
    scripts = {"organizer": [FORK[1]] + [0x80] * 100 + [FORK_END[1]]}
    def force(ep, th):
        s = scripts["organizer"] if th.role == "organizer" else []
        return s[th.generated] if th.generated < len(s) else FILLER
    cfg = E.RunConfig(max_organizer_tokens=1000, max_worker_tokens=1000, max_episode_tokens=5000)
    ep = run(gpt, cfg, ROWS[:1], force)[0][0]
    worker = ep.organizer.children[1]
    assert worker.prompt[1:101] == [0x80] * 100 and len(worker.prompt) == 102


def test_episode_token_limit_holds_after_a_return(gpt):
    # organizer <FORK-1>q</FORK-1> at steps 1-3, <JOIN-1> at 4 (waits); the worker's <RETURN>
    # at 4 and </RETURN> at 5 are episode tokens 5 and 6 = the limit: the episode ends there
    ep, rec = scenario(gpt, "<FORK-1>q</FORK-1><JOIN-1>", {1: "<RETURN></RETURN>"},
                       max_episode_tokens=6)
    assert rec["tokens"] == 6 and ep.stop_reason == "episode token limit"


# -----------------------------------------------------------------------------
# Recursion (depth D > 1): sub-organizers fork, join and wait; the pool is shared across levels

def depth_configs():
    """The grammar model and the random GPT at depths 2 and 3, capacities 2..6, with the
    smallest slot pool depth allows (batch * c: no thread ever waits for a slot)."""
    out, rng = [], random.Random(2)
    for kind in ("grammar", "grammar", "gpt"):
        for depth in (2, 3):
            for capacity in (2, 3, 4, 6):
                batch = rng.choice([4, 16])
                out.append((kind, dict(depth=depth, capacity=capacity, batch_episodes=batch, seed=len(out),
                                       n_slots=rng.choice([None, batch * capacity]),
                                       max_len=rng.choice([128, 256]), **rng.choice([{}, dict(top_k=5)]))))
    return out


@pytest.mark.parametrize("kind,kw", depth_configs(),
                         ids=lambda x: x if isinstance(x, str) else
                         "-".join(f"{k}={v}" for k, v in x.items() if k != "seed"))
def test_random_models_never_break_the_recursive_executor(kind, kw):
    cfg = E.RunConfig(**{**LIMITS, "max_episode_tokens": 200}, **kw)
    model = random_gpt(cfg.seed) if kind == "gpt" else GrammarModel(cfg.seed, cfg.capacity, cfg.depth)
    episodes, records, exact = run(model, cfg, ROWS)
    # nothing ever waits for a slot at depth > 1, so every episode that answered is exact
    assert exact == sum(ep.stop_reason == "answer" for ep in episodes)


def test_recursive_models_reach_every_outcome():
    """Sub-organizers that answer through their own workers, and each recursion error."""
    reasons, names, nested_answers = set(), set(), 0
    for kind, kw in depth_configs()[:16]:
        if kind != "grammar":
            continue
        cfg = E.RunConfig(**{**LIMITS, "max_episode_tokens": 200}, **kw)
        episodes, records, _ = run(GrammarModel(cfg.seed, cfg.capacity, cfg.depth), cfg, ROWS[:24])
        for ep, rec in zip(episodes, records):
            reasons.add(ep.stop_reason)
            names |= set(P.error_names(rec["format_errors"]))
            nested_answers += ep.stop_reason == "answer" and any(th.level == 2 for th in ep.threads)
    assert {"answer", "fork past depth", "foreign join", "return before its joins",
            "duplicate id or pool overflow", "unknown join"} <= reasons, reasons
    assert set(P.DEPTH_ERROR_NAMES) | {P.POOL_OVERFLOW} <= names
    assert nested_answers > 0  # (the forced trees below answer through sub-organizers often)


@st.composite
def recursive_script(draw, capacity, depth):
    """A tree of valid-looking threads by path: the organizer and each worker above level D
    follow a random plan (sample_plan at c), others think and return; then up to two edits (a
    token deleted or any tag written) in random threads. Timing decides whether the shared pool
    holds, so some overflow."""
    thought = st.lists(st.sampled_from(list(b"abc 123")), max_size=6)
    rng = random.Random(draw(st.integers(0, 2**16)))
    scripts = {}

    def write(path, level):
        ids_ = []
        n_forks = rng.randint(0, 3) if level < depth and rng.random() < 0.7 else 0
        for action in P.sample_plan(rng, n_forks, max(2, capacity - level)):
            i = int(action[1:])
            if action[0] == "F":
                ids_ += draw(thought) + [FORK[i], ord("q"), FORK_END[i]]
                write(f"{path}.{i}".lstrip("."), level + 1)
            else:
                ids_ += draw(thought) + [JOIN[i]]
        end = (tok.answer, tok.answer_end) if level == 0 else (tok.ret, tok.ret_end)
        scripts[path] = ids_ + draw(thought) + [end[0], ord("7"), end[1]]
    write("", 0)
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from(sorted(scripts)))
        ids_ = scripts[path]
        pos = draw(st.integers(0, len(ids_)))
        tag = draw(st.one_of(st.none(), st.sampled_from(TAGS)))
        scripts[path] = ids_[:pos] + ids_[pos + 1:] if tag is None else ids_[:pos] + [tag] + ids_[pos:]
    return scripts


@st.composite
def recursive_cases(draw):
    depth, capacity, batch = draw(st.integers(2, 3)), draw(st.integers(2, 6)), draw(st.integers(1, 4))
    pick = lambda *values: draw(st.sampled_from(values))
    cfg = E.RunConfig(capacity=capacity, depth=depth, batch_episodes=batch,
                      n_slots=pick(None, batch * capacity), max_organizer_tokens=pick(60, 60, 12),
                      max_worker_tokens=pick(40, 40, 5), max_episode_tokens=pick(300, 300, 30),
                      max_steps=pick(300, 300, 15), temperature=pick(0.0, 1.0), tools=pick((), P.TOOLS))
    scripts = draw(st.lists(st.one_of(recursive_script(capacity, depth),
                                      random_script.map(lambda s: {"": s["organizer"], **{
                                          p: s["workers"][int(p[-1]) - 1] for p in
                                          ("1", "2", "3", "4", "1.1", "1.2", "2.1", "2.2", "1.1.1")}})),
                            min_size=1, max_size=4))
    return cfg, scripts


def path_forcer(scripts):
    """force(ep, th): thread th emits scripts[ep.index][th.path] ('' the organizer), then filler."""
    def force(ep, th):
        s = scripts[ep.index].get(th.path, [])
        return s[th.generated] if th.generated < len(s) else FILLER
    return force


@settings(max_examples=1500 if LONG else 150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=recursive_cases())
def test_forced_recursive_streams_never_break_the_executor(case):
    cfg, scripts = case
    episodes, records, exact = run(GrammarModel(cfg.seed, cfg.capacity, cfg.depth), cfg,
                                   ROWS[:len(scripts)], path_forcer(scripts))
    assert exact == sum(ep.stop_reason == "answer" for ep in episodes)
    for ep, s in zip(episodes, scripts):  # every thread emitted exactly its script
        for th in ep.threads:
            want = s.get(th.path, [])
            got = [t for t, inj in zip(th.out, th.injected) if not inj]
            assert got[:len(want)] == want[:len(got)] and all(t == FILLER for t in got[len(want):])


RECURSIVE_SCENARIOS = {  # name: (threads by path, RunConfig kwargs, expected error, stop reason)
    # cycles of waiting cannot form (a thread waits only on its own workers): the nearest
    # thing, a chain of waits three levels deep, answers; a join of a sibling is refused
    "a chain of waits": ({"": "<FORK-1>a</FORK-1><JOIN-1><ANSWER>7</ANSWER>",
                          "1": "<FORK-1>b</FORK-1><JOIN-1><RETURN>7</RETURN>",
                          "1.1": "<FORK-1>c</FORK-1><JOIN-1><RETURN>7</RETURN>",
                          "1.1.1": "xxxxx<RETURN>7</RETURN>"}, dict(depth=3), None, "answer"),
    "siblings waiting on each other": ({"": "<FORK-1>a</FORK-1><FORK-2>a</FORK-2><JOIN-1><JOIN-2><ANSWER>7</ANSWER>",
                                        "1": "xxxx<JOIN-2><RETURN>7</RETURN>", "2": "xxxx<JOIN-1><RETURN>7</RETURN>"},
                                       dict(depth=2), P.FOREIGN_JOIN, "foreign join"),
    "a sub-organizer joins its parent's worker": ({"": "<FORK-1>a</FORK-1><FORK-2>a</FORK-2><JOIN-1><JOIN-2><ANSWER>7</ANSWER>",
                                                   "1": "xx<FORK-3>b</FORK-3><JOIN-2><RETURN>7</RETURN>"},
                                                  dict(depth=2, capacity=6), P.FOREIGN_JOIN, "foreign join"),
    "a sub-organizer that never joins returns": ({"": "<FORK-1>a</FORK-1><JOIN-1><ANSWER>7</ANSWER>",
                                                  "1": "<FORK-1>b</FORK-1>xx<RETURN>7</RETURN>"},
                                                 dict(depth=2), P.UNJOINED_RETURN, "return before"),
    "a sub-organizer that never joins thinks on": ({"": "<FORK-1>a</FORK-1><JOIN-1><ANSWER>7</ANSWER>",
                                                    "1": "<FORK-1>b</FORK-1>"},
                                                   dict(depth=2), P.MISSING_RETURN, "worker token limit"),
    "a pool full of sub-organizers": ({"": "<FORK-1>a</FORK-1><FORK-2>a</FORK-2><FORK-3>a</FORK-3><JOIN-1><JOIN-2><JOIN-3><ANSWER>7</ANSWER>",
                                       "1": "xxxxxxxx<FORK-1>b</FORK-1><JOIN-1><RETURN>7</RETURN>",
                                       "2": "xxxxxxxx<FORK-1>b</FORK-1><JOIN-1><RETURN>7</RETURN>"},
                                      dict(depth=2, capacity=4), P.POOL_OVERFLOW, "pool overflow"),
    "sub-organizers waiting while their workers run": ({"": "<FORK-1>a</FORK-1><FORK-2>a</FORK-2><JOIN-1><JOIN-2><ANSWER>7</ANSWER>",
                                                        "1": "<FORK-1>b</FORK-1><JOIN-1><RETURN>7</RETURN>",
                                                        "2": "<FORK-1>b</FORK-1><JOIN-1><RETURN>7</RETURN>",
                                                        "1.1": "xxxxxxxxxx<RETURN>7</RETURN>",
                                                        "2.1": "xxxx<RETURN>7</RETURN>"},
                                                       dict(depth=2, capacity=5, batch_episodes=1), None, "answer"),
    "a fork at level D": ({"": "<FORK-1>a</FORK-1><JOIN-1><ANSWER>7</ANSWER>", "1": "<FORK-1>b</FORK-1><JOIN-1><RETURN>7</RETURN>",
                           "1.1": "x<FORK-1>c</FORK-1>"}, dict(depth=2), P.TOO_DEEP, "fork past depth"),
}


@pytest.mark.parametrize("name", RECURSIVE_SCENARIOS)
def test_recursive_scenario(gpt, name):
    threads, kw, error, reason = RECURSIVE_SCENARIOS[name]
    scripts = [{p: ids(t) for p, t in threads.items()}]
    cfg = E.RunConfig(**{**dict(max_organizer_tokens=40, max_worker_tokens=20, max_episode_tokens=300), **kw})
    row = {"task": "countdown", "numbers": [2, 3, 5, 7], "target": 10, "k": 2}
    (ep,), (rec,), exact = run(gpt, cfg, [row], path_forcer(scripts))
    assert reason in ep.stop_reason, ep.stop_reason
    if error is None:
        assert rec["format_errors"] == [] and exact == 1
    else:
        assert error in P.error_names(rec["format_errors"]), rec["format_errors"]
