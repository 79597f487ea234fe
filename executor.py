"""
The batched Fork/Join executor: organizers and workers decoding together on one KV cache.

The point of AsyncThink is that forked workers decode AT THE SAME TIME as their organizer, so the
critical path, not the total token count, sets the wall-clock time. This file makes that real.
`Executor.run` is a loop over `Executor.step`, and one step is five phases:

    1. admit    new episodes' organizers, then queued workers, take free cache slots
    2. push     every running thread's pending tokens go into the cache: one padded prefill for
                threads with several (a new worker's prompt, a join's takeaway), one batched
                decode forward for threads with one (the token sampled last step)
    3. sample   one token for every thread that has fresh logits
    4. advance  each thread's state machine on its token:

        organizer samples </FORK-i>  -> worker i is created on the sub-query and queued
        organizer samples <JOIN-i>   -> if worker i has returned: inject "takeaway</JOIN-i>"
                                        else the organizer waits (does not decode) until it returns
        worker samples </RETURN>     -> the worker is done, its slot is freed, a waiting parent wakes
        organizer samples </ANSWER>  -> the episode is over

    5. retire   episodes that ended leave the batch; their slots are free for the next step

A thread's state (QUEUED, RUNNING, WAITING, PARALLEL, DONE, STOPPED below) says which phase
touches it. Worked example, the organizer "<FORK-1>5 3 to 10</FORK-1>... <JOIN-1>" with capacity
3: in step s it samples </FORK-1>, worker 1 is queued; in step s+1 phase 1 gives W1 a slot and
phase 2 prefills its prompt, so W1 samples its first token in step s+1 beside the organizer; if the
organizer samples <JOIN-1> before W1 has sampled </RETURN>, it is WAITING and decodes nothing until
the step W1 returns, when the takeaway is injected (pushed in the next step's phase 2, for free).

Timing follows the protocol (protocol.timeline): a worker forked at step s samples its first
token at step s+1; an organizer that joins at step s a worker that finished at step f samples
again at step max(s, f)+1; injected tokens cost nothing. Each thread is one cache slot at its own
length. If the global slot pool is full, a new worker waits in the queue for a free slot; the
reported latency is still the protocol's critical path of the produced trajectory (the queue
is a property of this machine, not of the thinking), and the record also reports real steps.

Recursive organizers (RunConfig.depth D > 1, protocol.py): a worker below level D forks and
joins with the same tags, so `advance`, `fork_worker`, `join_worker` and `finish` run for every
thread, not only the organizer: a sub-organizer at <JOIN-i> is WAITING as an organizer is, and
its worker's </RETURN> wakes it. A thread is named by its path ("2.1": worker 1 of worker 2).
The pool c is one per episode, shared across levels: a fork that makes more than c threads
hold it (the organizer, and each worker from its fork to its join) ends the episode with a pool
overflow, checked as the fork closes. That rule reads steps, so at D > 1 nothing may wait for
a cache slot: RunConfig.check asks n_slots >= batch_episodes * c, and since an episode never
holds more threads than places, every thread gets a slot at once (no queue, no deadlock; a
waiting thread only ever waits on its own subtree, so no cycle of waiting can form).

Policy on format errors: the first one ends its episode at once (the trajectory is not
executable; RL gives it the format penalty anyway), so no model output can raise, deadlock or
run forever. The stop reasons below say why the executor stopped; the named format errors of
the record come from protocol.parse on what was produced.

Thinking modes, all producing the same episodes:
  sequential  the organizer alone (capacity 1: any fork is a pool overflow)
  parallel    the executor forks the question to N workers (injected, free), joins them all and
              aggregates: the union of distinct parseable expressions, first k kept (countdown),
              or the majority grid (sudoku). The organizer itself decodes nothing.
  async       the model organizes itself with pool capacity c (AsyncThink).
"""

import bisect
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import protocol as P
import tasks
import tools
from model import GPT

MODES = ("sequential", "parallel", "async")
PARALLEL_TEMPERATURE = 0.5  # greedy evaluation, except parallel workers: greedy ones would all
                            # write the same text from the same question

# A thread's states:  QUEUED -> RUNNING <-> WAITING -> DONE, or STOPPED when its episode ends
# first; a parallel-mode organizer is PARALLEL from the start (it never decodes) until DONE; a
# thread a person plays (chat.py) is HUMAN <-> WAITING -> DONE: no slot, never decodes.
QUEUED, RUNNING, WAITING, PARALLEL, DONE, STOPPED, HUMAN = \
    "queued", "running", "waiting", "parallel", "done", "stopped", "human"

# Why an episode stopped (Episode.stop_reason). Only ANSWERED is a normal end; each of the others
# leaves the format error that protocol.parse names in the record (in brackets).
ANSWERED = "answer"
UNCLOSED_FORK = "unclosed fork"                          # [unclosed-fork]
TAG_IN_RESULT = "tag inside a result"                    # [stray-tag]
WRONG_ROLE = "wrong role"                                # [wrong-role]
DUPLICATE_OR_OVERFLOW = "duplicate id or pool overflow"  # [duplicate-id] or [pool-overflow]
UNKNOWN_JOIN = "unknown join"                            # [unknown-join]
STRAY_TAG = "stray tag"                                  # [stray-tag]
ORGANIZER_LIMIT = "organizer token limit"                # [missing-answer], maybe more
WORKER_LIMIT = "worker token limit"                      # [missing-return], ...
EPISODE_LIMIT = "episode token limit"                    # [missing-answer], ...
CONTEXT_FULL = "context full"                            # a slot of the cache is full
MAX_STEPS = "max steps"                                  # RunConfig.max_steps decode steps
TOO_DEEP = "fork past depth"                             # [too-deep] (depth > 1)
FOREIGN_JOIN = "foreign join"                            # [foreign-join] (depth > 1)
UNJOINED_RETURN = "return before its joins"              # [unjoined-return] (depth > 1)


@dataclass
class RunConfig:
    mode: str = "async"
    capacity: int = 4                # c: the organizer plus at most c-1 running workers
    n_parallel: int | None = None    # parallel mode: N workers (default c-1)
    temperature: float = 1.0         # 0 means greedy (argmax): deterministic
    top_k: int | None = None
    seed: int = 0
    max_organizer_tokens: int = 1024  # generated tokens per organizer
    max_worker_tokens: int = 512     # generated tokens per worker
    max_episode_tokens: int = 4096   # generated tokens of all threads of an episode
    max_steps: int = 4096            # decode steps of one call of run()
    batch_episodes: int = 32         # episodes in flight at once
    n_slots: int | None = None       # KV cache slots (default batch_episodes * capacity)
    max_len: int | None = None       # tokens per slot (default the model's block_size)
    tools: tuple = ()                # tools a fork may call, e.g. ("calc", "check"): tools.py
    state_capacity: bool = False     # async: the organizer's prompt states c (train.py --capacities)
    depth: int = 1                   # D: workers down to level D; those above it may fork (1: the paper)

    def check(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.capacity < 1 or (self.mode != "sequential" and self.capacity < 2):
            raise ValueError(f"capacity must be >= 2 for {self.mode} mode, got {self.capacity}")
        if self.mode == "parallel" and not 1 <= self.workers_in_parallel() <= self.capacity - 1:
            raise ValueError(f"parallel mode needs 1 <= N <= c-1 = {self.capacity - 1}")
        for name in ("max_organizer_tokens", "max_worker_tokens", "max_episode_tokens",
                     "max_steps", "batch_episodes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.temperature < 0 or (self.top_k is not None and self.top_k <= 0):
            raise ValueError("temperature must be >= 0 and top_k positive")
        if set(self.tools) - set(P.TOOLS):
            raise ValueError(f"unknown tool {sorted(set(self.tools) - set(P.TOOLS))[0]!r}; "
                             f"the tools are {', '.join(P.TOOLS)}")
        least = 1 if self.mode == "sequential" else 2  # the organizer, and room for one worker
        if self.n_slots is not None and self.n_slots < least:
            raise ValueError(f"{self.mode} mode needs at least {least} cache slots")
        if self.depth < 1 or (self.depth > 1 and self.mode != "async"):
            raise ValueError(f"depth must be >= 1, and depth > 1 needs async mode (got {self.depth}, {self.mode})")
        if self.depth > 1 and self.n_slots is not None and self.n_slots < self.batch_episodes * self.capacity:
            raise ValueError(f"depth > 1 needs n_slots >= batch_episodes * capacity = "
                             f"{self.batch_episodes * self.capacity}: no thread may wait for a slot")

    def pool_capacity(self):
        """c as the protocol counts it: 1 in sequential mode (the organizer alone), else capacity."""
        return 1 if self.mode == "sequential" else self.capacity

    def workers_in_parallel(self):
        return self.n_parallel or self.capacity - 1


def sample(probs, gen):
    """One id per row of probs (B, V), drawn by inverse transform sampling: a uniform u in
    [0, 1) per row picks the first id whose cumulative probability exceeds u x the row's total.
    Worked example: probs [0.2, 0.5, 0.3] have cumulative [0.2, 0.7, 1.0]; u = 0.65 picks id 1.
    One random number per row, where torch.multinomial draws one per vocabulary entry (7-8% of
    a rollout of the small model, BENCHMARKS.md). An id of probability 0 is never
    picked: its cumulative probability equals the one before it."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand(probs.size(0), 1, generator=gen, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0]  # the number of ids with cdf <= u


# -----------------------------------------------------------------------------
# Threads and episodes

class Thread:
    """One organizer or worker: its cache slot, its output so far, its state machine."""

    def __init__(self, episode, role, fork_id, prompt_ids, parent=None, fork_step=0):
        self.episode, self.role, self.fork_id, self.parent = episode, role, fork_id, parent
        # level: 0 for the organizer, 1 for its workers, 2 for theirs; path: "" , "2", "2.1"
        self.level = 0 if parent is None else parent.level + 1
        self.path = "" if parent is None else f"{parent.path}.{fork_id}".lstrip(".")
        self.prompt = list(prompt_ids)
        # per output token: the id, whether the executor injected it, its log-prob (0 if injected)
        self.out, self.injected, self.logprobs = [], [], []
        self.feed = list(prompt_ids)   # tokens not yet in the cache (pushed in phase 2)
        self.slot, self.logits = None, None
        self.state = QUEUED
        self.waiting_on = None         # the fork id a WAITING organizer waits for
        self.generated = 0             # tokens this thread sampled
        self.open_fork, self.query = None, []    # inside <FORK-i>...</FORK-i>: i, the sub-query
        self.in_result, self.result = False, []  # inside <ANSWER>/<RETURN>: the result's ids
        self.forked, self.outstanding, self.children = set(), set(), {}  # ids; ids not joined; i -> Thread
        self.fork_step, self.start_step, self.finish_step, self.join_step = fork_step, None, None, None
        self.active = []  # [(first_step, last_step)] runs of consecutive decode steps
        self.tool = None  # a tool worker's tool name (Executor.call_tool)
        self.human = False  # a person plays this thread (chat.py): see HUMAN

    def inject(self, ids):
        self.out += ids
        self.injected += [True] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.feed += ids


class Episode:
    def __init__(self, index, row, prompt_ids):
        self.index, self.row = index, row
        self.organizer = Thread(self, "organizer", 0, prompt_ids)
        self.threads = [self.organizer]
        self.done, self.stop_reason = False, None
        self.generated = 0
        self.step0 = 0  # the executor's clock when this episode was admitted
        self.t_start, self.t_end = None, None


# -----------------------------------------------------------------------------
# The executor

class Executor:
    def __init__(self, model: GPT, tok: P.Tokenizer, cfg: RunConfig):
        cfg.check()
        self.model, self.tok, self.cfg = model, tok, cfg
        self.device = next(model.parameters()).device
        self.n_slots = cfg.n_slots or cfg.batch_episodes * cfg.capacity
        self.cache = model.new_cache(self.n_slots, cfg.max_len)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.ask_person = None  # chat.py: ask_person(parent, i, sub_query) -> True gives fork i to a person
        self.start([])

    @torch.no_grad()
    def run(self, rows, progress=None, force=None, on_end=None):
        """Run one episode per puzzle row; returns the episodes in row order (see
        asyncthink.record). `progress`: a tqdm bar, advanced as episodes end; `on_end(episode)`
        is called as each one ends. `force`, for tests and benchmarks: force(episode, thread) ->
        a token id to emit instead of sampling (it still counts as a decode step), or None."""
        self.model.eval()
        self.start(rows, force)
        while self.pending or self.active:
            for ep in self.step():
                if on_end is not None:
                    on_end(ep)
                if progress is not None:
                    progress.update(1)
        return sorted(self.finished, key=lambda ep: ep.index)

    def start(self, rows, force=None):
        """Reset the cache and the run's state: every row becomes a pending episode."""
        # a row may carry a plan: {"plan": "F1 F2 J1 ..."} (see protocol.organizer_prompt)
        stated = self.cfg.capacity if self.cfg.state_capacity and self.cfg.mode == "async" else None
        prompt = lambda row: self.tok.encode(P.organizer_prompt(P.question_text(row), row.get("plan"), stated))
        self.pending = [Episode(i, row, prompt(row)) for i, row in enumerate(rows)][::-1]  # pop() takes the first
        self.active, self.finished = [], []  # episodes in flight; episodes ended
        self.queue = []                      # threads waiting for a slot, first come first served
        self.cache.reset()
        self.free_slots = list(range(self.n_slots))
        self.force, self.clock = force, 0    # the clock counts decode steps

    @torch.no_grad()
    def step(self):
        """One decode step of every episode in flight; returns the episodes that ended in it."""
        self.admit()                                                       # 1.
        running = [th for ep in self.active for th in ep.threads if th.state == RUNNING]
        self.push_feeds(running)                                           # 2.
        self.clock += 1
        ready = [th for th in running if th.logits is not None and not th.feed]  # pushing changes no state
        if ready:
            self.sample_and_advance(ready)                                 # 3. and 4.
        return self.retire()                                               # 5.

    # ---- phase 1: admit episodes and queued threads into free slots
    def admit(self):
        # Keep a slot for workers: with at most n_slots-1 organizers, a worker can always
        # run, finish (its token limit is finite) and free its slot, so nothing deadlocks.
        max_active = min(self.cfg.batch_episodes, max(1, self.n_slots - 1))
        while self.pending and len(self.active) < max_active and self.free_slots:
            ep = self.pending.pop()
            ep.t_start, ep.step0 = time.perf_counter(), self.clock
            self.active.append(ep)
            if self.cfg.mode == "parallel":
                self.fork_parallel(ep)  # its organizer never decodes: no slot
            elif ep.organizer.human:  # a person organizes (chat.py): no slot either
                ep.organizer.state, ep.organizer.start_step = HUMAN, self.clock
            else:
                self.queue.insert(0, ep.organizer)  # new organizers go first
        while self.queue and self.free_slots:
            th = self.queue.pop(0)
            if not th.episode.done:
                th.slot, th.state, th.start_step = self.free_slots.pop(0), RUNNING, self.clock

    # ---- phase 2: push tokens into the cache
    def push_feeds(self, threads):
        """One batched decode forward for threads with a single pending token, one padded
        prefill for threads with several (new prompts, join results)."""
        decode = [th for th in threads if len(th.feed) == 1]
        prefill = [th for th in threads if len(th.feed) > 1]
        if decode:
            self.decode(decode)
        if prefill:
            T = max(len(th.feed) for th in prefill)
            if max(int(self.cache.lengths[th.slot]) for th in prefill) + T > self.cache.max_len:
                groups = [[th] for th in prefill]  # padding would overflow a slot: one at a time
            else:
                groups = [prefill]
            for group in groups:
                T = max(len(th.feed) for th in group)
                idx = torch.tensor([th.feed + [self.tok.pad] * (T - len(th.feed)) for th in group],
                                   device=self.device)  # (B, T), right-padded
                n_new = torch.tensor([len(th.feed) for th in group])
                logits = self.forward(idx, torch.tensor([th.slot for th in group]), n_new)
                for th, row, n in zip(group, logits, n_new.tolist()):
                    th.logits, th.feed = row[n - 1], []

    def decode(self, threads):
        """One token for each thread, in one batched forward. The model reads each thread's
        cached keys as a view of the cache (model.read_runs), and slots are handed out lowest
        first, so the threads of the batch stay close together in the cache."""
        threads = sorted(threads, key=lambda th: th.slot)  # rows in slot order: runs are slices
        ids = torch.tensor([th.feed[0] for th in threads])[:, None]  # (B, 1)
        logits = self.forward(ids, torch.tensor([th.slot for th in threads]), torch.ones(len(threads), dtype=torch.long))
        for th, row in zip(threads, logits):
            th.logits, th.feed = row[-1], []

    def forward(self, idx, slots, n_new):
        """The model's cached forward: idx (B, T) into slots (B,), n_new (B,) tokens each."""
        return self.model.forward_cached(idx.to(self.device), self.cache, slots, n_new)

    # ---- phases 3 and 4: sample, and run the state machines
    def sample_and_advance(self, threads):
        logits = torch.stack([th.logits for th in threads]).float()  # (B, V)
        if self.cfg.temperature == 0:
            logprobs = F.log_softmax(logits, dim=-1)
            ids = logits.argmax(dim=-1)
        else:
            # The log-probs recorded for RL are those of the distribution sampled from,
            # softmax(logits / T): the loss scores the same one (grpo.policy_loss), so the
            # rollout is on-policy and the first update's ratio is exactly 1 (RL samples
            # without a top_k cut, which these log-probs do not include).
            scaled = logits / self.cfg.temperature
            logprobs = F.log_softmax(scaled, dim=-1)
            if self.cfg.top_k is not None:
                kth = torch.topk(scaled, min(self.cfg.top_k, scaled.size(-1))).values[:, -1:]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            ids = sample(F.softmax(scaled, dim=-1), self.gen)
        ids = ids.tolist()
        if self.force:  # scripted tokens (bench.py, tests) replace the sampled ones
            forced = [self.force(th.episode, th) for th in threads]
            ids = [t if f is None else int(f) for t, f in zip(ids, forced)]
        chosen = logprobs[torch.arange(len(ids)), torch.tensor(ids)].tolist()  # one gather, not B
        for th, t, logprob in zip(threads, ids, chosen):
            if not th.episode.done:
                self.advance(th, t, logprob)

    def advance(self, th, t, logprob):
        """The state machine: one decoded token t of thread th."""
        ep, tok, cfg = th.episode, self.tok, self.cfg
        self.write_token(th, t, logprob)
        kind, i = tok.tag(t) or ("text", 0)
        if th.open_fork is not None:  # writing a sub-query
            if kind == "text":
                th.query.append(t)
            elif (kind, i) == ("fork_end", th.open_fork):
                self.fork_worker(th, th.open_fork)
                th.open_fork = None
            else:
                return self.end(ep, UNCLOSED_FORK)
        elif th.in_result:  # writing the answer / the takeaway
            end = "answer_end" if th.role == "organizer" else "return_end"
            if kind == end:
                self.finish(th)
            elif kind != "text":
                return self.end(ep, TAG_IN_RESULT)
            else:
                th.result.append(t)
        elif kind == "text":
            pass
        elif th.role == "worker" and (kind == "answer" or kind in ("fork", "join") and cfg.depth == 1):
            return self.end(ep, WRONG_ROLE)
        elif th.role == "organizer" and kind == "return":
            return self.end(ep, WRONG_ROLE)
        elif kind in ("answer", "return"):
            th.in_result = True
        elif kind == "fork":
            if th.level >= cfg.depth:
                return self.end(ep, TOO_DEEP)
            # depth 1: the organizer's own c-1 workers; deeper, the shared pool (fork_worker)
            if i in th.forked or (cfg.depth == 1 and len(th.outstanding) >= cfg.pool_capacity() - 1):
                return self.end(ep, DUPLICATE_OR_OVERFLOW)
            th.forked.add(i); th.outstanding.add(i)
            th.open_fork, th.query = i, []
        elif kind == "join":
            if i not in th.outstanding:
                return self.end(ep, FOREIGN_JOIN if self.foreign(th, i) else UNKNOWN_JOIN)
            th.outstanding.discard(i)
            self.join_worker(th, i)
        else:
            return self.end(ep, STRAY_TAG)
        if not ep.done:
            self.check_limits(th)

    def write_token(self, th, t, logprob):
        """Write decoded token t into th: its output, its log-prob, the next step's input, the
        token counts and th's decode-step intervals on the clock (for the timeline)."""
        th.out.append(t); th.injected.append(False); th.logprobs.append(logprob)
        th.feed.append(t)
        th.generated += 1
        th.episode.generated += 1
        th.logits = None
        if th.active and th.active[-1][1] == self.clock - 1:
            th.active[-1] = (th.active[-1][0], self.clock)
        else:
            th.active.append((self.clock, self.clock))

    def check_limits(self, th):
        """End th's episode if a token limit is reached or th's slot is full."""
        cfg, ep = self.cfg, th.episode
        limit = cfg.max_organizer_tokens if th.role == "organizer" else cfg.max_worker_tokens
        if ep.generated >= cfg.max_episode_tokens:
            self.end(ep, EPISODE_LIMIT)
        elif th.state == DONE:
            return
        elif th.generated >= limit:
            self.end(ep, ORGANIZER_LIMIT if th.role == "organizer" else WORKER_LIMIT)
        elif not self.fits(th):
            self.end(ep, CONTEXT_FULL)

    def foreign(self, th, i):
        """Whether <JOIN-i> in th names a worker its parent or a sibling forked, not one of its
        own (protocol.stray_join_errors, the same rule on the whole tree)."""
        if th.parent is None or i in th.children:
            return False
        return any(i in t.children for t in [th.parent, *th.parent.children.values()] if t is not th)

    def overflows(self, ep):
        """Depth > 1, as a fork closes: do more than c threads hold the episode's pool now? The
        organizer and every worker from its fork to its join (a join in this very step still
        holds its place: protocol.pool_overflows)."""
        if self.cfg.depth == 1:  # depth 1: advance counts the organizer's own c-1 workers
            return False
        held = 1 + sum(1 for w in ep.threads[1:] if w.join_step is None or w.join_step >= self.clock)
        return held > self.cfg.capacity

    def fits(self, th, extra=0):
        """Whether th's slot can take its pending tokens, `extra` more, and one more sample."""
        if th.slot is None:  # a person's thread: not in the cache
            return True
        return int(self.cache.lengths[th.slot]) + len(th.feed) + extra + 1 <= self.cache.max_len

    def fork_worker(self, parent, i):
        """</FORK-i> was decoded: create worker i on the sub-query; it waits for a slot
        (or, for a tool's sub-query, the tool answers at once: call_tool)."""
        call = P.tool_call(self.tok.decode(parent.query), self.cfg.tools) if self.cfg.tools else None
        if call is not None:
            return self.call_tool(parent, i, *call)
        if self.ask_person is not None and self.ask_person(parent, i, self.tok.decode(parent.query)):
            return self.person_worker(parent, i)
        prompt = self.worker_prompt(parent)
        if len(prompt) + 1 > self.cache.max_len:
            return self.end(parent.episode, CONTEXT_FULL)
        worker = Thread(parent.episode, "worker", i, prompt, parent, fork_step=self.clock)
        self.queue.append(worker)
        self.adopt(parent, i, worker)

    def worker_prompt(self, parent):
        """P.worker_prompt(sub_query), built from the sampled ids: never re-tokenize model text."""
        return [self.tok.worker] + parent.query + self.tok.encode("\n")

    def adopt(self, parent, i, worker):
        """Worker i (a model, a tool or a person) joins its parent's children and the episode;
        a fork that overflows the shared pool (depth > 1) ends the episode."""
        parent.children[i] = worker
        parent.episode.threads.append(worker)
        if self.overflows(parent.episode):
            self.end(parent.episode, DUPLICATE_OR_OVERFLOW)

    def call_tool(self, parent, i, name, argument):
        """Worker i is a tool: it answers during the next step (P.TOOL_STEPS) and is DONE from
        now, since no <JOIN-i> can come before that step; it decodes nothing, holds no slot."""
        worker = Thread(parent.episode, "worker", i, [], parent, fork_step=self.clock)
        worker.tool = name
        worker.inject(self.tok.encode_plain(tools.run_tool(name, argument, parent.episode.row)))
        worker.feed, worker.result = [], list(worker.out)
        worker.state, worker.start_step = DONE, self.clock
        worker.finish_step = self.clock + P.TOOL_STEPS
        worker.active = [(self.clock + 1, self.clock + P.TOOL_STEPS)]
        self.adopt(parent, i, worker)

    def person_worker(self, parent, i):
        """Worker i is a person (chat.py routes it with `ask_person`): HUMAN, no slot, nothing
        decoded, until chat.py writes the person's <RETURN> and calls finish()."""
        worker = Thread(parent.episode, "worker", i, self.worker_prompt(parent), parent, fork_step=self.clock)
        worker.feed, worker.human, worker.state, worker.start_step = [], True, HUMAN, self.clock
        self.adopt(parent, i, worker)

    def join_worker(self, th, i):
        """<JOIN-i> was decoded: continue with the takeaway now, or wait for worker i."""
        worker = th.children[i]
        if worker.state == DONE:
            takeaway = worker.result + [self.tok.tag_id("join_end", i)]
            if not self.fits(th, len(takeaway)):
                return self.end(th.episode, CONTEXT_FULL)
            worker.join_step = self.clock
            th.inject(takeaway)
        else:
            th.state, th.waiting_on = WAITING, i

    def finish(self, th):
        """</ANSWER> or </RETURN> was decoded: the thread is done (and may wake its parent)."""
        th.state, th.finish_step = DONE, self.clock
        th.result = list(th.result)
        self.release(th)
        if th.role == "organizer":
            return self.end(th.episode, ANSWERED)
        if th.outstanding:  # depth > 1: a sub-organizer returned before joining all its workers
            return self.end(th.episode, UNJOINED_RETURN)
        parent = th.parent
        if parent.state == WAITING and parent.waiting_on == th.fork_id:
            parent.state, parent.waiting_on = HUMAN if parent.human else RUNNING, None
            self.join_worker(parent, th.fork_id)
        elif parent.state == PARALLEL and all(w.state == DONE for w in parent.children.values()):
            self.aggregate(parent)

    def fork_parallel(self, ep):
        """Parallel mode: inject N forks of the whole question; the workers start at once."""
        org, question = ep.organizer, P.question_text(ep.row)
        org.query = self.tok.encode(question)
        for i in range(1, self.cfg.workers_in_parallel() + 1):
            fork, fork_end, _, _ = P.fork_tags(i)
            org.inject(self.tok.encode(f"{fork}{question}{fork_end}"))
            org.forked.add(i)
            self.fork_worker(org, i)
        org.state = PARALLEL  # never decodes: `aggregate` answers when every worker is done

    def aggregate(self, org):
        """Parallel mode: join every worker (injected) and answer by rule: countdown, the union
        of distinct parseable expressions in worker order, first k; sudoku, the majority grid."""
        tok, row, votes, union = self.tok, org.episode.row, Counter(), {}
        for i, worker in sorted(org.children.items()):
            worker.join_step = self.clock
            org.inject([tok.tag_id("join", i)] + worker.result + [tok.tag_id("join_end", i)])
            for part in P.parse_answer(tok.decode(worker.result), row["task"]) or []:
                if row["task"] == "sudoku":
                    votes[part] += 1
                else:
                    try:
                        union.setdefault(tasks.canonical(part), part)
                    except ValueError:
                        pass  # not an expression after all: not "correct-looking"
        parts = [votes.most_common(1)[0][0]] if votes else list(union.values())[:row.get("k", 1)]
        org.inject(tok.encode(P.answer_text(parts, labels=row["task"] == "countdown")))
        org.state, org.finish_step = DONE, self.clock
        self.end(org.episode, ANSWERED)

    def release(self, th):
        if th.slot is not None:
            self.cache.free(th.slot)
            bisect.insort(self.free_slots, th.slot)  # kept sorted: the lowest goes out first
            th.slot = None

    def end(self, ep, reason):
        """End an episode: stop all its threads and free their slots."""
        if ep.done:
            return
        ep.done, ep.stop_reason, ep.t_end = True, reason, time.perf_counter()
        for th in ep.threads:
            if th.state != DONE:
                th.state = STOPPED
                th.finish_step = self.clock
            self.release(th)

    # ---- phase 5: retire
    def retire(self):
        """End the episodes past max_steps; move every ended episode out of the batch."""
        for ep in self.active:
            if not ep.done and self.clock - ep.step0 >= self.cfg.max_steps:
                self.end(ep, MAX_STEPS)
        ended = [ep for ep in self.active if ep.done]
        self.active = [ep for ep in self.active if not ep.done]
        self.finished += ended
        return ended
