"""
Speed benchmarks of the batched Fork/Join executor: `python bench.py [--quick]`.

A model with random weights cannot be trusted to fork and join, so every episode follows a fixed
SCRIPT: `force(episode, thread)` hands the executor the next token instead of the sampled one (it
still costs a full decode step: forward, sampling, state machine). The default script, per episode:

    organizer  20 thinking tokens, then 4 x <FORK-i> + 20-token sub-query + </FORK-i>,
               20 more thinking tokens, <JOIN-1>..<JOIN-4>, <ANSWER>7</ANSWER>      135 tokens
    worker i   40 thinking tokens, <RETURN>7</RETURN>                            4 x 43 tokens

Four measurements, each printed as a table with its ratios:

  1. Throughput (generated tokens/s) at 1, 8, 32 concurrent episodes of three ways to decode the
     very same threads: the executor (one batched forward per step over every running thread);
     a per-thread loop (each thread alone on a 1-slot KV cache, one `forward_cached` per token);
     and the naive way (no cache: `model(prefix)` over the whole prefix for every token). All three
     push the same chunks (prompt, then each generated token with any join result injected after
     it) and sample one token per forward. The naive way is slow, so it runs on one episode's
     threads only; it decodes one thread at a time, so its tokens/s does not depend on the count.
  2. Bookkeeping: the executor's time per step vs replaying the exact same `forward_cached` calls
     (same rows, same slot lengths, same tokens) bare: no state machine, no sampling.
  3. One async episode vs the same number of tokens decoded by one thread in a row, against the
     speedup the protocol predicts: total tokens / critical path of the produced trajectory.
  4. The KV cache's size: `cache.nbytes()` vs 2 * n_layer * n_slots * max_len * n_embd * 4 bytes,
     and how much the process's resident memory grows when the cache is allocated and written.
  5. With --ckpt, real episodes: a trained checkpoint samples its own structures at RL's batch
     (16 episodes = 4 questions x G 4, temperature 0.7, the RL token limits), as the RL stage's
     rollouts do: tokens/s, the executor against the bare replay of its forwards, and how many
     cached keys the batched decode reads against how many its rows need (a forward reads its
     rows in runs of nearby slots, each slot of a run up to the run's longest row: model.read_runs).

    python bench.py --ckpt runs/countdown-async/sft.pt     # sections 1-4, then 5

Timings: the methods run side by side in each repeat (the machine is noisy), after a warm-up run,
and the median over repeats is reported. torch keeps its default thread count (--threads to set).
"""

import argparse
import gc
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import protocol as P
import tasks
from asyncthink import load_model, pick_device, trajectory
from executor import ANSWERED, Executor, RunConfig
from model import GPT, GPTConfig, KVCache, read_runs


@dataclass
class Script:
    think: int = 20         # organizer thinking tokens, before the forks and again before the joins
    query: int = 20         # tokens of each sub-query
    workers: int = 4        # forks per episode (pool capacity workers + 1)
    worker_think: int = 40  # worker thinking tokens before <RETURN>7</RETURN>


QUICK = Script(think=4, query=4, workers=2, worker_think=6)


def text(n, shift=0):
    """n ordinary text tokens (digit bytes): thinking that means nothing, which is fine here."""
    return [ord("0123456789"[(shift + j) % 10]) for j in range(n)]


def scripts(tok, s: Script):
    """(organizer tokens, worker tokens) of the scripted structure, generated tokens only."""
    org = text(s.think)
    for i in range(1, s.workers + 1):
        org += [tok.tag_id("fork", i)] + text(s.query, i) + [tok.tag_id("fork_end", i)]
    org += text(s.think, 5) + [tok.tag_id("join", i) for i in range(1, s.workers + 1)]
    org += [tok.answer, ord("7"), tok.answer_end]
    return org, text(s.worker_think, 3) + [tok.ret, ord("7"), tok.ret_end]


def forcer(org, worker):
    """force(episode, thread): thread.generated counts generated tokens only (a join's injected
    takeaway is not), so it indexes the script directly."""
    def force(ep, th):
        script = org if th.role == "organizer" else worker
        return script[th.generated] if th.generated < len(script) else None
    return force


# -----------------------------------------------------------------------------
# The three ways to decode, and the bare replay

class RecordingExecutor(Executor):
    """The executor, noting every forward it makes (slots, their lengths, tokens) for a replay."""

    def __init__(self, model, tok, cfg):
        super().__init__(model, tok, cfg)
        self.calls = []

    def forward(self, idx, slots, n_new):
        self.calls.append((slots, self.cache.lengths[slots].clone(), idx.clone(), n_new.clone()))
        return super().forward(idx, slots, n_new)


def sync(device):
    """Wait for the GPU: its kernels run asynchronously, so a timer must not stop before they end."""
    if "cuda" in str(device):
        torch.cuda.synchronize()


def matmul_peak(n=1024, repeats=10, device="cpu", dtype=torch.float32):
    """GFLOP/s of the best of several n x n matmuls (on a GPU use n = 8192: small ones cannot fill it)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def timed(fn, device):
    """Seconds fn() takes (on a GPU, until its queued work is done). Like timeit, with the garbage
    collector off: the executor's many small objects would otherwise trigger collections."""
    sync(device)
    gc.disable()
    t0 = time.perf_counter()
    try:
        fn()
        sync(device)
        return time.perf_counter() - t0
    finally:
        gc.enable()


def chunks(th):
    """What the executor pushed into th's cache slot, in order: the prompt, then each generated
    token together with the tokens injected right after it (a join's takeaway). The last generated
    token is never pushed (the thread ends on it), so there is one chunk per generated token."""
    out = [list(th.prompt)]
    for t, injected in zip(th.out, th.injected):
        if injected:
            out[-1].append(t)
        else:
            out.append([t])
    assert len(out) - 1 == th.generated
    return out[:-1]


def sample(logits, gen):
    return torch.multinomial(F.softmax(logits.float(), dim=-1), 1, generator=gen)


def decode_alone(model, threads, max_len, device):
    """The per-thread loop: every thread on its own 1-slot cache, one forward per chunk."""
    cache, slot = model.new_cache(1, max_len), torch.tensor([0])
    gen = torch.Generator(device=device).manual_seed(0)
    for th in threads:
        cache.reset()
        for chunk in chunks(th):
            logits = model.forward_cached(torch.tensor([chunk], device=device), cache, slot)
            sample(logits[0, -1], gen)


def decode_naive(model, threads, device):
    """The naive way: no cache; the whole prefix goes through the model for every token."""
    gen = torch.Generator(device=device).manual_seed(0)
    for th in threads:
        seq = []
        for chunk in chunks(th):
            seq += chunk
            sample(model(torch.tensor([seq], device=device))[0, -1], gen)


def replay_bare(model, calls, cache):
    """The executor's forwards without the executor: set the slots' lengths, call the model."""
    for slots, lengths, idx, n_new in calls:
        cache.lengths[slots] = lengths
        model.forward_cached(idx, cache, slots, n_new)


# -----------------------------------------------------------------------------
# Memory

def rss():
    """(resident memory now, peak resident memory) of this process, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB


def cache_memory(model, n_slots, max_len):
    """Allocate a cache and write every element, reading the resident memory the kernel reports
    before, after allocating and after writing (tracemalloc does not see torch's allocator). An
    allocation the program never writes need not be resident at all (the kernel maps pages on
    first touch), so the growth after writing is the figure that must match the formula."""
    gc.collect()
    rss0, peak0 = rss()
    cache = model.new_cache(n_slots, max_len)
    rss1 = rss()[0]
    cache.k.fill_(1.0)
    cache.v.fill_(1.0)
    rss2, peak2 = rss()
    c = model.config
    return dict(nbytes=cache.nbytes(), alloc=rss1 - rss0, touched=rss2 - rss0, peak=peak2 - peak0,
                formula=2 * c.n_layer * n_slots * max_len * c.n_embd * cache.k.element_size())


# -----------------------------------------------------------------------------
# The benchmark

def episode_counts(s):
    try:
        counts = [int(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"episode counts must be >= 1, got {s!r}")
    return sorted(set(counts))


def parse_args(argv):
    ap = cli.ArgumentParser(description="Executor speed benchmarks.")
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes (a few seconds)")
    ap.add_argument("--episodes", type=episode_counts, default=None,
                    help="concurrent episodes, comma-separated (default 1,8,32; quick 1,2)")
    ap.add_argument("--think", type=int, default=None, help="organizer thinking tokens (default 20)")
    ap.add_argument("--worker-think", type=int, default=None, help="worker thinking tokens (default 40)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default torch's; quick 1)")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    ap.add_argument("--ckpt", default=None, help="a trained checkpoint: also time its real episodes (5.)")
    ap.add_argument("--real-episodes", type=int, default=16, help="episodes at once for 5. (RL's batch: 16)")
    return ap.parse_args(argv)


def table(header, rows):
    """Print a Markdown table (so it pastes into BENCHMARKS.md as is)."""
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def verdict(ok):
    return "met" if ok else "MISSED"


mib = lambda n: f"{n / 2**20:.1f} MiB"


def main(argv=None):
    """Run and print the four benchmarks. --quick runs torch on one thread unless told otherwise:
    it only checks the code paths, and on a busy 2-core machine two threads' tiny ops stall."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads or (1 if args.quick else threads)))
    try:
        return bench(args)
    finally:
        torch.set_num_threads(threads)


@dataclass
class Setup:
    """What every timed method runs on: the model, the scripted episodes, and per episode count n
    setups[n] = {ex: an executor for n episodes, threads: their threads, steps, calls: its
    forwards for the bare replay, bare: the replay's cache, tokens: tokens generated}."""
    model: GPT
    device: str
    rows: list
    counts: list
    force: object
    setups: dict
    first: list          # the threads of episode 0 at the smallest count: the naive way's work
    one: Executor        # one async episode ...
    seq: Executor        # ... and the same number of tokens in one sequential thread
    seq_force: object
    total: int           # tokens of that async episode
    path: int            # its critical path
    mem: dict            # cache memory (Linux, CPU), or None


def check(episodes):
    stops = {ep.stop_reason for ep in episodes}
    assert stops == {ANSWERED}, f"a scripted episode did not end with its answer: {stops}"
    return episodes


def prepare(args, script, tok, cfg, max_len, device):
    """Build the model, run every method once (the warm-up), and record what the timed runs replay."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    org, worker = scripts(tok, script)
    capacity, force = script.workers + 1, forcer(org, worker)
    counts = args.episodes or ([1, 2] if args.quick else [1, 8, 32])
    rows = tasks.make_puzzles("countdown", "small", n=max(counts), seed=0)
    # (4) first, while the process's peak memory is still its current memory
    linux_cpu = device == "cpu" and os.path.exists("/proc/self/statm")
    mem = cache_memory(model, max(counts) * capacity, max_len) if linux_cpu else None

    def executor(mode, n, record=False):
        run_cfg = RunConfig(mode=mode, capacity=capacity if mode == "async" else 1,
                            batch_episodes=n, max_len=max_len)
        return (RecordingExecutor if record else Executor)(model, tok, run_cfg)

    setups = {}
    for n in counts:
        rec = executor("async", n, record=True)
        threads = [th for ep in check(rec.run(rows[:n], force=force)) for th in ep.threads]
        setups[n] = dict(ex=executor("async", n), threads=threads, steps=rec.clock, calls=rec.calls,
                         bare=model.new_cache(rec.n_slots, max_len),
                         tokens=sum(th.generated for th in threads))
        replay_bare(model, rec.calls, setups[n]["bare"])
        decode_alone(model, threads[:2], max_len, device)
    first = [th for th in setups[counts[0]]["threads"] if th.episode.index == 0]
    one, seq = executor("async", 1), executor("sequential", 1)
    ep1 = check(one.run(rows[:1], force=force))[0]
    total, path = sum(th.generated for th in ep1.threads), P.critical_path(trajectory(ep1, tok, one.cfg))
    seq_force = forcer(text(total - 3) + [tok.answer, ord("7"), tok.answer_end], [])
    check(seq.run(rows[:1], force=seq_force))
    return Setup(model, device, rows, counts, force, setups, first, one, seq, seq_force, total, path, mem)


def time_methods(b: Setup, repeats):
    """Every method side by side in each repeat (the machine is noisy); the median seconds of each."""
    times = {}
    bar = tqdm(total=repeats * (len(b.counts) + 1), desc="bench", unit="run", file=sys.stderr)
    for _ in range(repeats):
        for n in b.counts:
            st = b.setups[n]
            for key, fn in [("executor", lambda: st["ex"].run(b.rows[:n], force=b.force)),
                            ("bare", lambda: replay_bare(b.model, st["calls"], st["bare"])),
                            ("alone", lambda: decode_alone(b.model, st["threads"], st["bare"].max_len, b.device))]:
                times.setdefault((key, n), []).append(timed(fn, b.device))
            bar.update()
        for key, fn in [("naive", lambda: decode_naive(b.model, b.first, b.device)),
                        ("async1", lambda: b.one.run(b.rows[:1], force=b.force)),
                        ("seq1", lambda: b.seq.run(b.rows[:1], force=b.seq_force))]:
            times.setdefault(key, []).append(timed(fn, b.device))
        bar.update()
    bar.close()
    return {key: statistics.median(ts) for key, ts in times.items()}


def section_throughput(b: Setup, med):
    print("\n## 1. Throughput: batched executor vs per-thread loop vs naive (generated tokens/s)\n")
    N, counts = max(b.counts), b.counts
    tps = {(key, n): b.setups[n]["tokens"] / med[(key, n)] for key in ("executor", "alone") for n in counts}
    naive_tokens = sum(th.generated for th in b.first)
    naive = naive_tokens / med["naive"]
    table(["episodes", "tokens", "executor tok/s", "per-thread loop tok/s", "naive tok/s",
           "executor / loop", "executor / naive"],
          [[str(n), str(b.setups[n]["tokens"]), f"{tps['executor', n]:.0f}", f"{tps['alone', n]:.0f}",
            f"{naive:.0f}", f"{tps['executor', n] / tps['alone', n]:.2f}x",
            f"{tps['executor', n] / naive:.1f}x"] for n in counts])
    vs_loop, vs_naive = tps["executor", N] / tps["alone", N], tps["executor", N] / naive
    print(f"\nnaive: timed on the {len(b.first)} threads of one episode only ({naive_tokens} tokens); it "
          "decodes one thread at a time, so its tokens/s does not depend on the episode count.")
    print(f"target >= 5x the per-thread loop at {N} episodes: {vs_loop:.2f}x, {verdict(vs_loop >= 5)}; "
          f">= 20x naive: {vs_naive:.1f}x, {verdict(vs_naive >= 20)}")


def section_bookkeeping(b: Setup, med):
    print("\n## 2. Bookkeeping: executor step vs bare batched forward_cached of the same rows\n")
    lines = []
    for n in b.counts:
        st = b.setups[n]
        decode_rows = sum(len(slots) for slots, _, idx, _ in st["calls"] if idx.size(1) == 1)
        ex_ms, bare_ms = (1e3 * med[(key, n)] / st["steps"] for key in ("executor", "bare"))
        lines.append([str(n), str(st["steps"]), str(len(st["calls"])), f"{decode_rows / st['steps']:.1f}",
                      f"{ex_ms:.2f}", f"{bare_ms:.2f}", f"{100 * (ex_ms / bare_ms - 1):+.0f}%"])
    table(["episodes", "steps", "forward calls", "decode rows per step", "executor ms/step",
           "bare forward ms/step", "overhead"], lines)
    N = max(b.counts)
    over = med[("executor", N)] / med[("bare", N)] - 1
    print(f"\ntarget overhead <= 25% at {N} episodes: {100 * over:+.0f}%, {verdict(over <= 0.25)}")


def section_speedup(b: Setup, med):
    print("\n## 3. Async vs sequential: one episode, measured vs critical-path speedup\n")
    predicted, measured = b.total / b.path, med["seq1"] / med["async1"]
    off = max(measured / predicted, predicted / measured)
    table(["tokens", "critical path", "predicted speedup", "async s", "sequential s",
           "measured speedup", "predicted / measured"],
          [[str(b.total), str(b.path), f"{predicted:.2f}x", f"{med['async1']:.3f}", f"{med['seq1']:.3f}",
            f"{measured:.2f}x", f"{predicted / measured:.2f}"]])
    print(f"\ntarget measured speedup within 1.3x of predicted: off by {off:.2f}x, {verdict(off <= 1.3)}")


def section_memory(b: Setup, capacity, max_len):
    print("\n## 4. KV cache memory: cache.nbytes() vs 2 * n_layer * n_slots * max_len * n_embd * 4\n")
    if b.mem is None:
        print(f"(resident memory is measured on Linux and cpu only, not on {b.device})")
        return
    mem = b.mem
    table(["slots x max_len", "cache.nbytes()", "formula", "RSS growth after allocation",
           "after writing every element", "peak RSS growth"],
          [[f"{max(b.counts) * capacity} x {max_len}", mib(mem["nbytes"]), mib(mem["formula"]),
            mib(mem["alloc"]), mib(mem["touched"]), mib(mem["peak"])]])
    print("\nRSS: /proc/self/statm before and after (tracemalloc does not see torch's allocator); "
          "torch.zeros writes every page, so the cache is resident as soon as it is allocated.")


@torch.no_grad()
def bench(args):
    """Sections 1-4 on the scripted episodes (5 with --ckpt): prepare, time, report."""
    repeats = max(1, args.repeats or (1 if args.quick else 5))
    script = QUICK if args.quick else Script()
    if args.think is not None:
        script = replace(script, think=max(0, args.think))
    if args.worker_think is not None:
        script = replace(script, worker_think=max(0, args.worker_think))
    tok = P.Tokenizer.numbers()
    org, worker = scripts(tok, script)
    cfg = GPTConfig.preset("tiny" if args.quick else "small", tok.n_vocab)
    # a slot holds a prompt (< 64 tokens), every token (the sequential run's single thread decodes
    # them all) and the 64 free positions the executor keeps for a join result
    need = 128 + len(org) + script.workers * len(worker)
    max_len = min(cfg.block_size, 128 * -(-need // 128))
    try:
        device = pick_device(args.device)
        if need > cfg.block_size:
            raise ValueError(f"the script needs {need} positions per slot; the model has {cfg.block_size}")
    except ValueError as e:
        return cli.fail("bench.py", e)
    b = prepare(args, script, tok, cfg, max_len, device)
    med = time_methods(b, repeats)

    c = b.model.config
    print(f"bench.py: model {'tiny' if args.quick else 'small'} ({c.n_layer} layers, "
          f"n_embd {c.n_embd}, {b.model.num_params() / 1e6:.2f}M params, random weights), device "
          f"{device}, torch threads {torch.get_num_threads()}, median of {repeats} repeat(s)")
    print(f"script per episode: organizer {len(org)} tokens, {script.workers} workers x "
          f"{len(worker)} tokens (pool capacity {script.workers + 1}, slots of {max_len} tokens)")
    section_throughput(b, med)
    section_bookkeeping(b, med)
    section_speedup(b, med)
    section_memory(b, script.workers + 1, max_len)
    return bench_real(args, device, repeats) if args.ckpt else 0


def keys_read(calls, run_cost=KVCache.run_cost):
    """(cached keys the decode forwards read, keys their rows need): each forward reads its rows
    in runs of nearby slots (model.read_runs), a run every slot of its span, riders included, up
    to its longest row's length + 1; a row needs its own length + 1."""
    read = need = 0
    for slots, lengths, idx, n_new in calls:
        if idx.size(1) == 1:
            slots, keys = slots.tolist(), (lengths + 1).tolist()
            for rows in read_runs(slots, keys, run_cost):
                read += (slots[rows[-1]] - slots[rows[0]] + 1) * max(keys[r] for r in rows)
            need += int((lengths[n_new > 0] + 1).sum())
    return read, need


def decode_flops(model, threads):
    """FLOPs of decoding the threads' generated tokens one by one (what any decoder must compute,
    padding and prefills not counted): per token 2 x the weights it multiplies (the blocks and
    the output layer) plus 4 x n_layer x n_embd x its position (scores and values over the keys
    before it), as in bench_train.flops without the backward."""
    c = model.config
    weights = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h."))
    per_token = 2 * (weights + c.n_embd * c.vocab_size)
    total = 0
    for th in threads:
        for j, injected in enumerate(th.injected):
            if not injected:
                total += per_token + 4 * c.n_layer * c.n_embd * (len(th.prompt) + j)
    return total


def bench_real(args, device, repeats):
    """5. A trained checkpoint's own episodes at RL's batch, sampled as RL samples them."""
    try:
        model, tok = load_model(args.ckpt, device)
    except (ValueError, FileNotFoundError, OSError) as e:
        return cli.fail("bench.py", e)
    model.eval()
    n = max(1, args.real_episodes)
    rows = tasks.make_puzzles("countdown", "small", n=n, seed=0, split="train")
    cfg = RunConfig(mode="async", capacity=4, temperature=0.7, seed=0, batch_episodes=n,
                    max_organizer_tokens=900, max_worker_tokens=320)
    rec = RecordingExecutor(model, tok, cfg)
    episodes = rec.run(rows)  # the warm-up, and the forwards to replay
    tokens = sum(th.generated for ep in episodes for th in ep.threads)
    bare = model.new_cache(rec.n_slots, cfg.max_len)
    times = {"executor": [], "bare": []}
    for _ in range(repeats):  # the same seed: every repeat decodes the same episodes
        times["executor"].append(timed(lambda: Executor(model, tok, cfg).run(rows), device))
        times["bare"].append(timed(lambda: replay_bare(model, rec.calls, bare), device))
    ex_s, bare_s = (statistics.median(times[key]) for key in ("executor", "bare"))
    read, need = keys_read(rec.calls)
    gflops = decode_flops(model, [th for ep in episodes for th in ep.threads]) / ex_s / 1e9
    peak = matmul_peak(1024 if device == "cpu" else 8192, device=device)
    print(f"\n## 5. Real episodes: {args.ckpt}, {n} at once (temperature 0.7, RL's token limits)\n")
    table(["episodes", "tokens", "steps", "forward calls", "executor tok/s", "bare forward tok/s",
           "overhead", "keys read / keys needed", "decode GFLOP/s (of matmul peak)"],
          [[str(n), str(tokens), str(rec.clock), str(len(rec.calls)), f"{tokens / ex_s:.0f}",
            f"{tokens / bare_s:.0f}", f"{100 * (ex_s / bare_s - 1):+.0f}%", f"{read / need:.2f}",
            f"{gflops:.2f} ({100 * gflops / peak:.1f}% of {peak:.0f})"]])
    stops = sorted({ep.stop_reason for ep in episodes})
    print(f"\nhow the episodes ended: {', '.join(stops)}; their mean tokens: {tokens / n:.0f}; "
          "the peak is the best float32 matmul on this device (matmul_peak)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
