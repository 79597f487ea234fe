"""
The batched Fork/Join executor: organizers and workers decoding together on one KV cache.

The point of AsyncThink is that forked workers decode AT THE SAME TIME as their organizer, so the
critical path, not the total token count, sets the wall-clock time. This file makes that real:

    every step:  1. push pending tokens into the cache  (prefills: new workers' prompts,
                                                          join results; then one batched decode
                                                          forward over all threads' last token)
                 2. sample one token for every runnable thread of every episode, and run each
                    thread's little state machine on it:

    organizer samples </FORK-i>  -> worker i is created with prompt <WORKER>sub-query\\n
    organizer samples <JOIN-i>   -> if worker i has returned: inject "takeaway</JOIN-i>"
                                    else the organizer waits (does not decode) until it returns
    worker samples </RETURN>     -> the worker is done, its slot is freed, a waiting parent wakes
    organizer samples </ANSWER>  -> the episode is over

Timing follows the protocol (protocol.timeline): a worker forked at step s samples its first
token at step s+1; an organizer that joins at step s a worker that finished at step f samples
again at step max(s, f)+1; injected tokens cost nothing. Each thread is one cache slot at its own
length. If the global slot pool is full, a new worker waits in a queue for a free slot; the
reported latency is still the protocol's critical path of the produced trajectory (the queue
is a property of this machine, not of the thinking), and the record also reports real steps.

Policy on format errors: the first one ends its episode at once (the trajectory is not
executable; RL gives it the format penalty anyway), so no model output can raise, deadlock or
run forever. The named errors in the record come from protocol.parse on what was produced.

Thinking modes, all producing the same record:
  sequential  the organizer alone (capacity 1: any fork is a pool overflow)
  parallel    the executor forks the question to N workers (injected, free), joins them all and
              aggregates: the union of distinct parseable expressions, first k kept (countdown),
              or the majority grid (sudoku). The organizer itself decodes nothing.
  async       the model organizes itself with pool capacity c (AsyncThink).
"""

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import compare
import protocol as P
import tasks
import traces
from model import GPT, load_checkpoint

MODES = ("sequential", "parallel", "async")


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
        if self.n_slots is not None and self.n_slots < (1 if self.mode == "sequential" else 2):
            raise ValueError(f"{self.mode} mode needs at least {1 if self.mode == 'sequential' else 2} cache slots")

    def workers_in_parallel(self):
        return self.n_parallel or self.capacity - 1


# -----------------------------------------------------------------------------
# Threads and episodes

class Thread:
    """One organizer or worker: its cache slot, its output so far, its state machine."""

    def __init__(self, episode, role, fork_id, prompt_ids, parent=None, fork_step=0):
        self.episode, self.role, self.fork_id, self.parent = episode, role, fork_id, parent
        self.prompt = list(prompt_ids)
        self.out, self.injected, self.logprobs = [], [], []  # per output token
        self.feed = list(prompt_ids)   # tokens not yet in the cache
        self.slot, self.logits = None, None
        self.state = "queued"          # queued -> running <-> waiting -> done
        self.waiting_on = None         # fork id this organizer waits for
        self.generated = 0
        self.open_fork, self.query = None, []  # inside <FORK-i>...</FORK-i>
        self.in_result, self.result = False, []  # inside <ANSWER>/<RETURN>
        self.forked, self.outstanding, self.children = set(), set(), {}
        self.fork_step, self.start_step, self.finish_step, self.join_step = fork_step, None, None, None
        self.active = []  # [(first_step, last_step)] runs of consecutive decode steps

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
        self.step0 = 0  # the executor's step when this episode was admitted
        self.t_start, self.t_end = None, None


# -----------------------------------------------------------------------------
# The executor

class Executor:
    min_split_keys = 4096  # see length_buckets

    def __init__(self, model: GPT, tok: P.Tokenizer, cfg: RunConfig):
        cfg.check()
        self.model, self.tok, self.cfg = model, tok, cfg
        self.device = next(model.parameters()).device
        self.n_slots = cfg.n_slots or cfg.batch_episodes * cfg.capacity
        self.cache = model.new_cache(self.n_slots, cfg.max_len)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)

    # ---- the public entry point
    @torch.no_grad()
    def run(self, rows, progress=None, force=None):
        """Run one episode per puzzle row; returns the episodes (see `record`).
        `force`, for tests and benchmarks: force(episode, thread) -> a token id to emit instead
        of sampling (it still counts as a decode step), or None to sample."""
        cfg, tok = self.cfg, self.tok
        self.model.eval()
        self.cache.reset()
        self.free_slots = list(range(self.n_slots))
        self.force, self.step = force, 0
        # a row may carry a structure hint: {"plan": "F1 F2 J1 ..."} (see protocol.organizer_prompt)
        pending = [Episode(i, row, tok.encode(P.organizer_prompt(P.question_text(row), row.get("plan"))))
                   for i, row in enumerate(rows)]
        pending.reverse()
        active, finished, queue = [], [], []
        # Keep a slot for workers: with at most n_slots-1 organizers, a worker can always
        # run, finish (its token limit is finite) and free its slot, so nothing deadlocks.
        max_active = min(cfg.batch_episodes, max(1, self.n_slots - 1))
        while pending or active:
            while pending and len(active) < max_active and self.free_slots:
                ep = pending.pop()
                ep.t_start, ep.step0 = time.perf_counter(), self.step
                active.append(ep)
                if cfg.mode == "parallel":
                    self.fork_parallel(ep, queue)  # its organizer never decodes: no slot
                else:
                    queue.insert(0, ep.organizer)
            while queue and self.free_slots:  # FIFO, new organizers were put first
                th = queue.pop(0)
                if not th.episode.done:
                    th.slot, th.state, th.start_step = self.free_slots.pop(0), "running", self.step
            self.push_feeds([th for ep in active for th in ep.threads if th.state == "running"])
            self.step += 1
            runnable = [th for ep in active for th in ep.threads
                        if th.state == "running" and th.logits is not None and not th.feed]
            if runnable:
                self.sample_and_advance(runnable, queue)
            for ep in active:
                if not ep.done and self.step - ep.step0 >= cfg.max_steps:
                    self.end(ep, "max steps")
            for ep in [ep for ep in active if ep.done]:
                active.remove(ep)
                finished.append(ep)
                if progress is not None:
                    progress.update(1)
        finished.sort(key=lambda ep: ep.index)
        return finished

    # ---- step 1: push tokens into the cache
    def push_feeds(self, threads):
        """One padded prefill for threads with several pending tokens (new prompts, join
        results), one batched decode forward for threads with a single pending token."""
        decode = [th for th in threads if len(th.feed) == 1]
        prefill = [th for th in threads if len(th.feed) > 1]
        for group in self.length_buckets(decode):
            idx = torch.tensor([th.feed for th in group], device=self.device)  # (B, 1)
            logits = self.forward(idx, group)
            for th, row in zip(group, logits[:, -1]):
                th.logits, th.feed = row, []
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
                logits = self.forward(idx, group, n_new)
                for th, row, n in zip(group, logits, n_new.tolist()):
                    th.logits, th.feed = row[n - 1], []

    def length_buckets(self, threads):
        """Decode threads in one forward, or in two split by cache length when that reads at
        least a quarter fewer cached keys. A batched decode reads every row's keys up to the
        LONGEST row (L), so one 900-token organizer makes forty 100-token workers read 900
        keys each, a copy in every layer. Sorted by length, a split at i costs
        i * L_short + (B - i) * L_long key reads instead of B * L_long: with 10 organizers
        at 900 and 30 workers at 100, 30 * 100 + 10 * 900 = 12,000 instead of 36,000.
        A second forward has a fixed cost of its own (on a CPU about what reading a few thousand
        cached keys costs), so a split must also save min_split_keys reads: one episode of five
        short threads stays in one forward."""
        if len(threads) < 2:
            return [threads] if threads else []
        held = self.cache.lengths[torch.tensor([th.slot for th in threads])].tolist()
        order = sorted(range(len(threads)), key=held.__getitem__)
        threads, L = [threads[i] for i in order], [held[i] + 1 for i in order]  # keys after this step
        B = len(threads)
        cost = lambda i: i * L[i - 1] + (B - i) * L[-1]
        best = min(range(1, B), key=cost)
        saved = B * L[-1] - cost(best)
        if saved < max(0.25 * B * L[-1], self.min_split_keys):
            return [threads]
        return [threads[:best], threads[best:]]

    def forward(self, idx, threads, n_new=None):
        slots = torch.tensor([th.slot for th in threads])
        return self.model.forward_cached(idx, self.cache, slots, n_new)

    # ---- step 2: sample and run the state machines
    def sample_and_advance(self, threads, queue):
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
            ids = torch.multinomial(F.softmax(scaled, dim=-1), 1, generator=self.gen)[:, 0]
        ids = ids.tolist()
        for b, th in enumerate(threads):
            forced = self.force(th.episode, th) if self.force else None
            t = ids[b] if forced is None else int(forced)
            if not th.episode.done:
                self.advance(th, t, float(logprobs[b, t]), queue)

    def advance(self, th, t, logprob, queue):
        """The state machine: one decoded token t of thread th."""
        ep, tok, cfg = th.episode, self.tok, self.cfg
        th.out.append(t); th.injected.append(False); th.logprobs.append(logprob)
        th.feed.append(t)
        th.generated += 1
        ep.generated += 1
        th.logits = None
        if th.active and th.active[-1][1] == self.step - 1:
            th.active[-1] = (th.active[-1][0], self.step)
        else:
            th.active.append((self.step, self.step))
        kind, i = tok.tag(t) or ("text", 0)
        if th.open_fork is not None:  # writing a sub-query
            if kind == "text":
                th.query.append(t)
            elif (kind, i) == ("fork_end", th.open_fork):
                self.fork_worker(th, th.open_fork, queue)
                th.open_fork = None
            else:
                return self.end(ep, "unclosed fork")
        elif th.in_result:  # writing the answer / the takeaway
            end = "answer_end" if th.role == "organizer" else "return_end"
            if kind == end:
                self.finish(th)
            elif kind != "text":
                return self.end(ep, "tag inside a result")
            else:
                th.result.append(t)
        elif kind == "text":
            pass
        elif th.role == "worker" and kind in ("fork", "join", "answer"):
            return self.end(ep, "wrong role")
        elif th.role == "organizer" and kind == "return":
            return self.end(ep, "wrong role")
        elif kind in ("answer", "return"):
            th.in_result = True
        elif kind == "fork":
            capacity = 1 if cfg.mode == "sequential" else cfg.capacity
            if i in th.forked or len(th.outstanding) >= capacity - 1:
                return self.end(ep, "duplicate id or pool overflow")
            th.forked.add(i); th.outstanding.add(i)
            th.open_fork, th.query = i, []
        elif kind == "join":
            if i not in th.outstanding:
                return self.end(ep, "unknown join")
            th.outstanding.discard(i)
            self.join_worker(th, i)
        else:
            return self.end(ep, "stray tag")
        if ep.done:
            return
        limit = cfg.max_organizer_tokens if th.role == "organizer" else cfg.max_worker_tokens
        if ep.generated >= cfg.max_episode_tokens:
            self.end(ep, "episode token limit")
        elif th.state == "done":
            return
        elif th.generated >= limit:
            self.end(ep, f"{th.role} token limit")
        elif not self.fits(th):
            self.end(ep, "context full")

    def fits(self, th, extra=0):
        """Whether th's slot can take its pending tokens, `extra` more, and one more sample."""
        return int(self.cache.lengths[th.slot]) + len(th.feed) + extra + 1 <= self.cache.max_len

    def fork_worker(self, parent, i, queue):
        """</FORK-i> was decoded: create worker i on the sub-query; it waits for a slot."""
        # P.worker_prompt(sub_query), built from the sampled ids: never re-tokenize model text
        prompt = [self.tok.worker] + parent.query + self.tok.encode("\n")
        if len(prompt) + 1 > self.cache.max_len:
            return self.end(parent.episode, "context full")
        worker = Thread(parent.episode, "worker", i, prompt, parent, fork_step=self.step)
        parent.children[i] = worker
        parent.episode.threads.append(worker)
        queue.append(worker)

    def join_worker(self, th, i):
        """<JOIN-i> was decoded: continue with the takeaway now, or wait for worker i."""
        worker = th.children[i]
        if worker.state == "done":
            takeaway = worker.result + [self.tok.tag_id("join_end", i)]
            if not self.fits(th, len(takeaway)):
                return self.end(th.episode, "context full")
            worker.join_step = self.step
            th.inject(takeaway)
        else:
            th.state, th.waiting_on = "waiting", i

    def finish(self, th):
        """</ANSWER> or </RETURN> was decoded: the thread is done."""
        th.state, th.finish_step = "done", self.step
        th.result = list(th.result)
        self.release(th)
        if th.role == "organizer":
            return self.end(th.episode, "answer")
        parent = th.parent
        if parent.state == "waiting" and parent.waiting_on == th.fork_id:
            parent.state, parent.waiting_on = "running", None
            self.join_worker(parent, th.fork_id)
        elif parent.state == "parallel" and all(w.state == "done" for w in parent.children.values()):
            self.aggregate(parent)

    def fork_parallel(self, ep, queue):
        """Parallel mode: inject N forks of the whole question; the workers start at once."""
        org, question = ep.organizer, P.question_text(ep.row)
        org.query = self.tok.encode(question)
        for i in range(1, self.cfg.workers_in_parallel() + 1):
            fork, fork_end, _, _ = P.fork_tags(i)
            org.inject(self.tok.encode(f"{fork}{question}{fork_end}"))
            org.forked.add(i)
            self.fork_worker(org, i, queue)
        org.state = "parallel"  # never decodes: `aggregate` answers when every worker is done

    def aggregate(self, org):
        """Parallel mode: join every worker (injected) and answer by rule: countdown, the union
        of distinct parseable expressions in worker order, first k; sudoku, the majority grid."""
        tok, row, votes, union = self.tok, org.episode.row, Counter(), {}
        for i, worker in sorted(org.children.items()):
            worker.join_step = self.step
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
        org.inject(tok.encode(P.answer_text(parts)))
        org.state, org.finish_step = "done", self.step
        self.end(org.episode, "answer")

    def release(self, th):
        if th.slot is not None:
            self.cache.free(th.slot)
            self.free_slots.append(th.slot)
            th.slot = None

    def end(self, ep, reason):
        """End an episode: stop all its threads and free their slots."""
        if ep.done:
            return
        ep.done, ep.stop_reason, ep.t_end = True, reason, time.perf_counter()
        for th in ep.threads:
            if th.state != "done":
                th.state = "stopped"
                th.finish_step = self.step
            self.release(th)


# -----------------------------------------------------------------------------
# Results: the trajectory as the protocol sees it, metrics, and the record

def trajectory(ep: Episode, tok: P.Tokenizer, cfg: RunConfig):
    """protocol.parse of what the episode produced (the executor knows which tokens it injected)."""
    org = ep.organizer
    workers = {i: w.out for i, w in org.children.items()}
    capacity = 1 if cfg.mode == "sequential" else cfg.capacity
    return P.parse(org.out, workers, tok, capacity, task=ep.row["task"], injected=org.injected)


def score(row, answers):
    """(number of distinct correct answers, whether the puzzle is fully solved). Only the
    first k answers count (the first grid for Sudoku): an answer that lists every expression
    it can think of would otherwise be a free lottery ticket for the verifier and the reward.

    >>> row = {"task": "countdown", "numbers": [1, 2, 3], "target": 3, "k": 2}
    >>> score(row, ["1+2", "2+1", "3*1", "3/1"])   # 2+1 is 1+2 again; 3*1 is past the first k
    (1, False)
    """
    if row["task"] == "countdown":
        n = tasks.score_countdown(answers[:row["k"]], row["numbers"], row["target"])
        return n, n >= row["k"]
    ok = bool(answers) and tasks.check_sudoku(answers[0], row["puzzle"]) is None
    return int(ok), ok


def timeline_rows(ep: Episode):
    """The executor's own timeline, in steps since the episode began: when each thread was
    forked, got its slot, decoded (active runs), finished and was joined."""
    rel = lambda s: None if s is None else max(0, s - ep.step0)
    rows = []
    for th in ep.threads:
        name = "organizer" if th.role == "organizer" else f"worker {th.fork_id}"
        rows.append(dict(thread=name, fork_step=rel(th.fork_step), start=rel(th.start_step),
                         finish=rel(th.finish_step), join_step=rel(th.join_step), tokens=th.generated,
                         active=[(rel(a), rel(b)) for a, b in th.active]))
    return rows


def record(ep: Episode, tok: P.Tokenizer, cfg: RunConfig):
    """The result row of one episode: the input row plus mode, answers, verdict and metrics."""
    traj = trajectory(ep, tok, cfg)
    n_correct, solved = score(ep.row, traj.answers)
    org = ep.organizer
    steps = max(th.finish_step or 0 for th in ep.threads) - ep.step0
    # An episode that answered has the protocol's critical path as its latency. One stopped
    # before its answer may have stopped in a worker while the organizer waited (its path would
    # read 0): it counts the steps it ran.
    latency = P.critical_path(traj)
    if ep.stop_reason != "answer":
        latency = max(latency, steps)
    return {**ep.row, "mode": cfg.mode, "answers": traj.answers, "n_correct": n_correct,
            "correct": solved, "latency": latency,
            "concurrency": round(P.concurrency(traj), 4),
            "tokens": sum(th.generated for th in ep.threads),
            "format_errors": traj.errors, "stop_reason": ep.stop_reason,
            "steps": steps,
            "wall_s": round((ep.t_end or 0) - (ep.t_start or 0), 4),
            "trace": {"organizer": tok.decode(org.out),
                      "workers": {str(i): tok.decode(w.out) for i, w in sorted(org.children.items())},
                      "timeline": timeline_rows(ep)}}


def show_timeline(rec, width=72):
    """An ASCII view of who thought when: '#' decoding, '.' waiting on a join, F/J fork/join.

    organizer |##F##F####J.......J##|
    worker 1  |   ##########         |
    """
    rows = rec["trace"]["timeline"]
    T = max(r["finish"] or 0 for r in rows) or 1
    scale = min(1.0, width / T)
    col = lambda step: min(width - 1, int((step - 1) * scale)) if step else 0
    lines = [f"latency {rec['latency']} steps (critical path), eta {rec['concurrency']:.2f}, "
             f"{rec['tokens']} tokens, errors: {', '.join(rec['format_errors']) or 'none'}"]
    n = col(T) + 1
    for r in rows:
        cells = [" "] * n
        if r["active"]:  # waiting between its first and last decode shows as '.'
            for s in range(r["active"][0][0], r["active"][-1][1] + 1):
                cells[col(s)] = "."
        for a, b in r["active"]:
            for s in range(a, b + 1):
                cells[col(s)] = "#"
        if r["thread"] != "organizer":
            if r["fork_step"]:
                cells[col(r["fork_step"])] = "F"
            if r["join_step"]:
                cells[col(r["join_step"])] = "J"
        lines.append(f"{r['thread']:<10}|{''.join(cells)}|")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Loading a model, running many puzzles, the summary table

def load_model(path, device="cpu"):
    """(model, tokenizer) from a checkpoint file (train.py, or `asyncthink.py init`) or from a
    pretrained GPT-2 folder (config.json + weights + tokenizer files). One-line errors."""
    import os
    if os.path.isdir(path):
        tok = P.load_gpt2_tokenizer(path)
        model = GPT.from_pretrained(path, vocab_size=tok.n_vocab)
    else:
        model, ckpt = load_checkpoint(path)
        tok = P.Tokenizer.from_spec(ckpt.get("tokenizer"))
        if model.config.vocab_size != tok.n_vocab:
            raise ValueError(f"{path}: model vocabulary {model.config.vocab_size} does not match "
                             f"its tokenizer's {tok.n_vocab}")
    return model.to(device), tok


def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    return name


def solve(model, tok, rows, cfg: RunConfig, progress=True):
    """Run every row in `cfg.mode`; returns the records (see `record`)."""
    from tqdm import tqdm
    bar = tqdm(total=len(rows), desc=f"solve {cfg.mode}", unit="ep", disable=not progress,
               file=sys.stderr)
    episodes = Executor(model, tok, cfg).run(rows, progress=bar)
    bar.close()
    return [record(ep, tok, cfg) for ep in episodes]


def metrics(records):
    """The paper's metrics over episode records, as fractions and means:

        ge1..gek   share with at least j distinct correct answers (countdown; k = 1 for Sudoku)
        all        share entirely correct (all k answers right)
        format_ok  share with no format error
        latency    mean critical path (decoding steps); eta: mean concurrency; tokens: mean total
    """
    n = len(records)
    k = max(r.get("k", 1) for r in records)
    mean = lambda key: sum(r[key] for r in records) / n
    out = {f"ge{j}": sum(r["n_correct"] >= j for r in records) / n for j in range(1, k + 1)}
    out.update(all=mean("correct"), format_ok=sum(not r["format_errors"] for r in records) / n,
               latency=mean("latency"), eta=mean("concurrency"), tokens=mean("tokens"))
    return out


def accuracy_text(m):
    """'>=1  50.0% >=2  10.0%  all  10.0%' from metrics() (or traces.chance()); no >=j when k = 1."""
    k = sum(key.startswith("ge") for key in m)
    ge = " ".join(f">={j} {100 * m[f'ge{j}']:5.1f}%" for j in range(1, k + 1) if k > 1)
    return f"{ge}  all {100 * m['all']:5.1f}%"


def summary(records, seconds=None):
    """One line of metrics per mode: accuracy >=1..>=k and all, latency, eta, tokens, errors."""
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in records):
        rs = [r for r in records if r["mode"] == mode]
        m = metrics(rs)
        line = (f"{mode:<10} n={len(rs)}  {accuracy_text(m)}  "
                f"latency {m['latency']:7.1f}  eta {m['eta']:.2f}  tokens "
                f"{m['tokens']:7.1f}  format errors {100 * (1 - m['format_ok']):5.1f}%")
        if seconds:
            line += f"  {len(rs) / seconds:.2f} episodes/s"
        lines.append(line)
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Command line

def add_run_flags(ap):
    d = RunConfig()
    ap.add_argument("--mode", choices=MODES, default=d.mode)
    ap.add_argument("--capacity", type=int, default=d.capacity, help="pool capacity c (organizer included)")
    ap.add_argument("--n-parallel", type=int, default=None, help="parallel mode: workers N (default c-1)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="0 = greedy; default greedy, 0.5 in parallel mode (greedy workers would "
                         "all write the same text), as train.py evaluates")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--max-organizer-tokens", type=int, default=d.max_organizer_tokens)
    ap.add_argument("--max-worker-tokens", type=int, default=d.max_worker_tokens)
    ap.add_argument("--max-episode-tokens", type=int, default=d.max_episode_tokens)
    ap.add_argument("--max-steps", type=int, default=d.max_steps)
    ap.add_argument("--batch", type=int, default=d.batch_episodes, help="episodes decoded at once")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])


def run_config(args):
    temperature = args.temperature
    if temperature is None:
        temperature = 0.5 if args.mode == "parallel" else 0.0
    cfg = RunConfig(mode=args.mode, capacity=args.capacity, n_parallel=args.n_parallel,
                    temperature=temperature, top_k=args.top_k, seed=args.seed,
                    max_organizer_tokens=args.max_organizer_tokens,
                    max_worker_tokens=args.max_worker_tokens,
                    max_episode_tokens=args.max_episode_tokens, max_steps=args.max_steps,
                    batch_episodes=args.batch)
    cfg.check()
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description="AsyncThink: run the Fork/Join executor.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("solve", help="solve puzzles from a JSONL file (rows of `tasks.py make`)")
    s.add_argument("--ckpt", required=True, help="checkpoint file, or a pretrained GPT-2 folder")
    s.add_argument("--input", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--show", type=int, default=0, help="print the timeline of the first N episodes")
    add_run_flags(s)
    i = sub.add_parser("init", help="write a randomly initialised checkpoint (to try the executor)")
    i.add_argument("--preset", default="small")
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    sub.add_parser("bench", help="speed benchmarks (see bench.py)", add_help=False)
    sub.add_parser("compare", help="paired comparison of two solve outputs (see compare.py)", add_help=False)
    argv = argv if argv is not None else sys.argv[1:]
    if argv[:1] == ["bench"]:
        import bench
        return bench.main(argv[1:])
    if argv[:1] == ["compare"]:
        return compare.main(argv[1:])
    args = ap.parse_args(argv)
    try:
        if args.command == "init":
            from model import GPTConfig, save_checkpoint
            torch.manual_seed(args.seed)
            tok = P.Tokenizer.numbers()
            model = GPT(GPTConfig.preset(args.preset, tok.n_vocab))
            save_checkpoint(args.out, model, tokenizer=tok.spec())
            print(f"checkpoint: {args.out} ({model.num_params() / 1e6:.2f}M parameters, random weights)")
            return 0
        cfg = run_config(args)
        rows = tasks.load_jsonl(args.input)
        if not rows:
            raise ValueError(f"{args.input}: no puzzles")
        model, tok = load_model(args.ckpt, pick_device(args.device))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"asyncthink.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    records = solve(model, tok, rows, cfg)
    seconds = time.perf_counter() - t0
    with open(args.output, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    for r in records[:args.show]:
        print(show_timeline(r))
    print(summary(records, seconds))
    guess = traces.chance(rows)
    if guess:  # the floor: what k random expressions per puzzle score on the same puzzles
        n = sum(r.get("task", "countdown") == "countdown" for r in rows)
        print(f"{'chance':<10} n={n}  {accuracy_text(guess)}  (k random expressions per puzzle, 100 draws)")
    print(f"wrote {len(records)} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
