"""
Train AsyncThink end to end:  python train.py --stage sft   then   python train.py --stage rl

Stage 1, cold-start format SFT: the model imitates solver-written organizer and worker traces
(traces.py) of one thinking mode. Every thread is its own training sequence; prompts and the
join results the executor would inject get no loss (the trace marks them). The blocks' matrices
train with Muon, everything else with AdamW (muon.py).

Stage 2, RL (grpo.py): the executor rolls out G whole structures per question, a reward scores
each, and the group-relative advantage trains every generated token of every thread.

A run lives in one folder (default runs/<task>-<mode>): sft.pt, rl.pt, metrics.jsonl and
curves.png. The RL stage starts from that folder's sft.pt. Checkpoints are written atomically
and carry the model, optimizer, step, RNG states and config, so --resume continues a killed run
exactly where it stopped (same weights as a run that was never killed).

    python train.py --stage sft                       # the cpu recipe: small model, small countdown
    python train.py --stage rl
    python train.py --stage sft --preset gpu --device cuda --compile
    torchrun --nproc_per_node=2 train.py --stage sft  # DDP (gloo on CPU, NCCL on GPU)
"""

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import matplotlib.pyplot as plt
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import asyncthink as A
import cli
import executor as E
import grpo
import protocol as P
import tasks
import traces
from model import GPT, GPTConfig, init_number_embeddings, load_checkpoint, pack, save_checkpoint
from muon import MuonAdamW


@dataclass
class TrainConfig:
    stage: str = "sft"              # sft | rl
    preset: str = "cpu"             # a recipe from PRESETS: model, puzzles and budgets in one place
    mode: str = "async"             # thinking mode of the traces and rollouts
    task: str = "countdown"         # countdown | sudoku | mix
    run_dir: str = ""               # default runs/<task>-<mode>
    model: str = "small"            # model size (model.PRESETS)
    puzzles: str = "small"          # countdown size (tasks.COUNTDOWN_PRESETS)
    capacity: int = 4
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"          # float32 | bfloat16 (autocast, CUDA)
    compile: bool = False
    init: str = ""                  # start SFT from a pretrained GPT-2 folder
    number_init: str = "fourier"    # fourier | random: number embeddings (model.init_number_embeddings)
    resume: bool = False
    # SFT fills a wall-clock budget, not a step count: what the model learns depends steeply on
    # the steps it gets, and 2-core machines differ by 2x in speed (BENCHMARKS.md has the figures)
    sft_steps: int = 0              # 0: as many as fit in sft_minutes, timed on this machine
    sft_minutes: float = 18.0       # ~3,500 steps on the 2-core box (0.3 s each), where the
                                    # organizer's copies have formed on two seeds of two
                                    # (BENCHMARKS.md); the evaluations come on top
    sft_episodes: int = 2           # traces per step: many small steps beat few large ones
    micro_tokens: int = 8192        # tokens per forward (packed rows), gradient accumulated
    lr: float = 3e-3
    muon_lr: float = 0.02           # SFT: Muon for the blocks' matrices at this peak lr (muon.py);
                                    # 0: AdamW for all (BENCHMARKS.md "Muon" has the A/B)
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    hint_share: float = 0.5         # share of async traces that follow a random plan in the prompt
    organizer_weight: float = 1.0   # loss weight of the organizer's tokens (forks, tallies, answer)
    copy_drills: int = 0            # tally drills per countdown trace (traces.tally_drill): they
                                    # grow a copy head, but cost steps the budget lacks
    # RL: the defaults stay under 20 minutes on 2 CPU cores
    rl_steps: int = 36
    questions: int = 4              # questions per RL step (G structures each: 16 episodes)
    group: int = 4                  # G rollouts per question
    inner_updates: int = 2
    rl_lr: float = 3e-5             # at 1e-4 greedy accuracy fell on one of two SFT models, at
                                    # 3e-5 on neither (paired, 500 puzzles: BENCHMARKS.md)
    clip_eps: float = 0.2
    kl_coef: float = 0.1            # KL to the SFT model: without it the arithmetic fell apart
    temperature: float = 0.7        # rollouts: at 1.0 the SFT model breaks the format so often
                                    # that groups hold format penalties only
    tau: float = 0.75               # concurrency reward cap on eta / c (grpo.py: why not 0.5)
    lam: float = 0.2                # concurrency reward weight
    format_penalty: float = -0.5    # grpo.py: why not -1
    advantage: str = "zscore"       # zscore | mean | rft (rejection-sampling fine-tuning: the
                                    # baseline, grpo.rft_advantages)
    credit: str = "shared"          # shared (the paper: one advantage per structure) | thread
                                    # (each worker's <RETURN> verified: grpo.thread_advantages) |
                                    # copy (the organizer's answer checked against the returns)
    no_concurrency_reward: bool = False
    # tool workers (tools.py): forks to "calc: ..." / "check: ..." answered by a tool, not the model
    tools: str = ""                 # e.g. "check" or "calc,check": what rollouts and evaluations run
    check_share: float = 0.0        # share of async countdown traces that check each find (needs check)
    width_share: float = 0.0        # share of async countdown traces without a plan that keep fewer
                                    # than c - 1 workers busy (traces.countdown_async_trace): sampled
                                    # structures for RL's concurrency reward to choose from
    tool_cost: float = 0.0          # RL: reward minus this per tool call (0: calls are free)
    # capacity as an input: "2-16" writes each async trace for a c drawn from 2..16, stated in the
    # organizer's prompt ("capacity 6"), so `solve --capacity c` runs one model at any c in range
    capacities: str = ""            # "" (default): traces for --capacity only, c not stated
    # recursive organizers: depth 2 writes async countdown traces with sub-organizers
    # (traces.countdown_tree_trace) and runs rollouts and evaluations at depth 2
    depth: int = 1
    from_scratch: bool = False      # RL without SFT (ablation)
    max_organizer_tokens: int = 900
    max_worker_tokens: int = 320
    # evaluation (greedy; parallel workers sample, or they would all write the same text)
    eval_parallel_temperature: float = E.PARALLEL_TEMPERATURE
    eval_every: int = 2000          # SFT steps between evaluations (and at the last step); before
                                    # ~1500 steps the model is rarely valid
    eval_n: int = 32
    stop_at: int = 0                # stop (with a checkpoint) after this step: tests, split runs
    ckpt_every: int = 50


PRESETS = {
    # the CPU default: a ~1M-parameter model on small countdown; SFT <= 15 min, RL <= 20 min
    "cpu": dict(model="small", puzzles="small"),
    # one GPU: a ~25M model on medium countdown (8 numbers to 25, targets to 99), bf16
    "gpu": dict(model="medium", puzzles="medium", sft_steps=3000, sft_episodes=32, micro_tokens=32768,
                lr=6e-4, min_lr=6e-5, rl_steps=200, questions=32, group=8, dtype="bfloat16",
                eval_n=128, max_organizer_tokens=1800, max_worker_tokens=600),
    # tests: seconds on a CPU
    "tiny": dict(model="tiny", puzzles="small", sft_steps=4, sft_episodes=2, micro_tokens=2048,
                 rl_steps=2, questions=2, group=2, eval_every=0, eval_n=2,
                 max_organizer_tokens=48, max_worker_tokens=24),
}


# -----------------------------------------------------------------------------
# Data: puzzles -> traces -> (ids, loss mask) sequences -> packed micro-batches

def task_of(cfg, rng):
    return rng.choice(["countdown", "sudoku"]) if cfg.task == "mix" else cfg.task


def new_puzzle(cfg, task, rng, split="train"):
    if task == "countdown":
        return tasks.make_countdown(tasks.COUNTDOWN_PRESETS[cfg.puzzles], rng, split=split)
    return tasks.make_sudoku(rng, split=split)


def sft_sequences(cfg, tok, rng, n_episodes, block_size):
    """Threads of n_episodes fresh traces, as (ids, weights) pairs cut to the block size: a
    token's loss weight is 0 where it is not trained (prompts, injected join results),
    cfg.organizer_weight in the organizer's thread (the first of a trace), 1 elsewhere."""
    seqs = []
    for _ in range(n_episodes):
        row = new_puzzle(cfg, task_of(cfg, rng), rng)
        checks = dict(check_share=cfg.check_share) if row["task"] == "countdown" and cfg.check_share else {}
        if row["task"] == "countdown" and cfg.mode == "async" and cfg.width_share:
            checks["width_share"] = cfg.width_share
        capacity, stated = cfg.capacity, {}
        if cfg.capacities and cfg.mode == "async":
            capacity, stated = rng.randint(*P.capacity_range(cfg.capacities)), dict(state_capacity=True)
        deeper = dict(depth=cfg.depth) if cfg.depth > 1 else {}
        trace = traces.make_trace(row, cfg.mode, rng, capacity, hint_share=cfg.hint_share, **checks, **stated, **deeper)
        for j, (ids, mask) in enumerate(trace.sequences(tok)):
            w = cfg.organizer_weight if j == 0 else 1.0
            seqs.append((ids[:block_size + 1], [w * m for m in mask[:block_size + 1]]))
        if row["task"] == "countdown":
            seqs += [traces.encode(traces.tally_drill(row["numbers"], rng), tok) for _ in range(cfg.copy_drills)]
    return seqs


def micro_batches(seqs, micro_tokens, pad_id):
    """A step's (ids, weights) sequences packed into micro-batches (model.pack): [(x, y, w,
    segments)], each (B, T); y is x shifted by one within each sequence, -1 where there is no
    loss; w the loss weight of each target (0 where y is -1)."""
    triples = [(ids[:-1], [t if m else -1 for t, m in zip(ids[1:], w[1:])], [float(m) for m in w[1:]])
               for ids, w in seqs]
    return pack(triples, micro_tokens, (pad_id, -1, 0.0))


# -----------------------------------------------------------------------------
# Setup: device, distributed, model, optimizer, checkpoints

def setup_distributed(cfg):
    """(rank, world, device). Under torchrun: gloo on CPU, NCCL on GPU; otherwise (0, 1, dev)."""
    device = A.pick_device(cfg.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return rank, world, device


def make_optimizer(model, lr, weight_decay, muon_lr=0.0):
    """AdamW; weight decay on matrices only (not biases, LayerNorms). With muon_lr > 0 (SFT), the
    blocks' matrices go to Muon instead (muon.py), at muon_lr where AdamW is at lr: each group's
    lr_scale is what the schedule multiplies (train_sft)."""
    muon_ids = {id(p) for n, p in model.named_parameters()
                if muon_lr and n.startswith("transformer.h.") and p.dim() == 2}
    rest = [p for p in model.parameters() if id(p) not in muon_ids]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    if not muon_ids:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    matrices = [p for p in model.parameters() if id(p) in muon_ids]
    groups.append({"params": matrices, "muon": True, "lr_scale": muon_lr / lr})
    return MuonAdamW(groups, lr=lr, betas=(0.9, 0.95))


def rng_state(rng):
    """The data RNG (puzzles, traces) and torch's; numpy's is not used."""
    return {"python": rng.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(rng, state):
    rng.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save(path, model, optimizer, step, rng, cfg, tok_spec, extra=None):
    save_checkpoint(path, model, optimizer=optimizer.state_dict(), step=step, rng=rng_state(rng),
                    train_config=asdict(cfg), tokenizer=tok_spec, **(extra or {}))


TIMED_STEPS = 10, 80  # steps after the start that time an SFT step (sft_steps=0): 70 of them, since
                      # 20 misjudged the step by 20% either way (BENCHMARKS.md, "Labelled lists")


def steps_in_budget(seconds_so_far, seconds_per_step, done, minutes):
    """How many SFT steps a run of `minutes` holds, `done` steps and `seconds_so_far` into it:
    steps_in_budget(6.0, 0.2, 25, 12.0) -> 25 + (720 - 6) / 0.2 = 3595."""
    return done + max(0, int((60 * minutes - seconds_so_far) / seconds_per_step))


def plan_sft_steps(cfg, t_start, t_timed, done, world, device, bar):
    """cfg with sft_steps set to what fills cfg.sft_minutes, from the time the TIMED_STEPS took
    (ending now, `done` steps into the run); every rank takes rank 0's plan. Prints the plan."""
    now = time.perf_counter()
    per_step = (now - t_timed) / (TIMED_STEPS[1] - TIMED_STEPS[0])
    planned = torch.tensor(steps_in_budget(now - t_start, per_step, done, cfg.sft_minutes), device=device)
    if world > 1:
        dist.broadcast(planned, 0)
    cfg = replace(cfg, sft_steps=int(planned))
    if not bar.disable:  # rank 0's bar only
        bar.write(f"sft: {per_step:.3f} s per step here, so {cfg.sft_steps} steps fill "
                  f"--sft-minutes {cfg.sft_minutes:g} (to repeat this run: --sft-steps {cfg.sft_steps})")
    return cfg


def lr_at(step, cfg, total):
    """Linear warmup, then cosine decay to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# Evaluation with the executor

def evaluate(model, tok, cfg, n, seed=1234, mode=None):
    """Greedy episodes on fresh validation puzzles: the metrics the paper reports."""
    rng = random.Random(seed)
    rows = [new_puzzle(cfg, task_of(cfg, rng), rng, split="val") for _ in range(n)]
    mode = mode or cfg.mode
    # Parallel thinking is N independent samples of one question: greedy workers would all
    # write the same text, so they sample (seeded, reproducible).
    run = grpo.run_config(cfg, mode=mode, seed=seed, batch_episodes=min(32, n),
                          temperature=cfg.eval_parallel_temperature if mode == "parallel" else 0.0)
    records = A.solve(model, tok, rows, run, progress=False)
    model.train()
    return {f"eval_{key}": value for key, value in A.metrics(records).items()}


# -----------------------------------------------------------------------------
# Logging

class Log:
    """Appends one JSON row per step to metrics.jsonl in the run folder (rank 0 only)."""

    def __init__(self, run_dir, rank):
        self.path, self.rank = os.path.join(run_dir, "metrics.jsonl"), rank

    def write(self, row):
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def smooth(ys, window):
    """Trailing running mean over `window` points: smooth([1, 3, 5, 7], 2) -> [1, 2, 4, 6]."""
    return [sum(ys[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(ys))]


# (stage, title, y label, [(metric, legend)]): one panel each, drawn when its stage logged it
PANELS = [
    ("sft", "SFT: training loss", "nats per trained token", [("loss", "loss")]),
    ("sft", "SFT: greedy on validation puzzles", "share of puzzles",
     [("eval_format_ok", "format valid"), ("eval_ge1", ">=1 correct"), ("eval_all", "all correct")]),
    ("rl", "RL: accuracy", "share of puzzles",
     [("reward_accuracy", "R_A (sampled)"), ("worker_precision", "workers' returns right"),
      ("eval_ge1", ">=1 (greedy, val)"), ("eval_all", "all correct (greedy, val)")]),
    ("rl", "RL: reward and its parts", "reward",
     [("reward", "R (total)"), ("reward_accuracy", "R_A"), ("reward_concurrency", "R_eta")]),
    ("rl", "RL: structure", "eta / c", [("eta_over_c", "eta / c (sampled)")]),
    ("rl", "RL: length", "decode steps / tokens", [("latency", "latency (critical path)"), ("tokens", "tokens per episode")]),
    ("rl", "RL: tool calls", "calls per episode", [("tool_calls", "tool calls (sampled)")]),
    ("rl", "RL: format errors and dead groups", "share",
     [("format_error_rate", "format errors (sampled)"), ("skipped_groups", "groups with no signal")]),
    ("rl", "RL: policy drift", "nats per token", [("entropy", "entropy"), ("kl", "KL to SFT")]),
    ("rl", "RL: clipped ratios", "share of tokens", [("clipped", "clipped")]),
]


def plot_curves(run_dir):
    """curves.png: a grid of the run's curves against the step, raw (faint) and smoothed, so that
    a student sees what SFT and RL changed: SFT's loss and validation accuracy, then RL's
    accuracy, reward parts, eta / c, latency and tokens, format errors, entropy and KL."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = [json.loads(line) for line in open(path)]
    has = lambda stage, key: any(r.get("stage") == stage and key in r for r in rows)
    panels = [p for p in PANELS if any(has(p[0], key) for key, _ in p[3])]
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.3 * nrows), squeeze=False)
    for ax, (stage, title, ylabel, series) in zip(axes.flat, panels):
        for key, label in series:
            pts = [(r["step"], r[key]) for r in rows if r.get("stage") == stage and key in r]
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if len(pts) < 12 or key.startswith("eval_"):  # few points: each one drawn
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
            else:
                raw, = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
                ax.plot(xs, smooth(ys, max(3, len(ys) // 10)), color=raw.get_color(), label=label)
        if stage == "sft" and series[0][0] == "loss":
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"{stage.upper()} step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# -----------------------------------------------------------------------------
# Stage 1: SFT

def build_model(cfg, tok, device, resume_from=None):
    if resume_from:
        model, ckpt = load_checkpoint(resume_from)
        if model.config.vocab_size != tok.n_vocab:
            raise ValueError(f"{resume_from}: vocabulary {model.config.vocab_size} != tokenizer {tok.n_vocab}")
        return model.to(device), ckpt
    if cfg.init:
        return GPT.from_pretrained(cfg.init, vocab_size=tok.n_vocab).to(device), None
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig.preset(cfg.model, tok.n_vocab))
    if cfg.number_init == "fourier":
        init_number_embeddings(model, tok.number_values())
    return model.to(device), None


def check_compatible(ckpt, cfg, path, sft=False):
    """A checkpoint from another preset/model (or for SFT, another optimizer) refuses to resume,
    with one line."""
    old = ckpt.get("train_config", {})
    for key in ("model", "mode", "task", "puzzles"):
        if key in old and old[key] != getattr(cfg, key):
            raise ValueError(f"{path} was trained with {key}={old[key]!r}, this run has {getattr(cfg, key)!r}")
    if sft and bool(old.get("muon_lr", 0)) != bool(cfg.muon_lr):  # Muon's state is not AdamW's
        raise ValueError(f"{path} was trained with muon_lr={old.get('muon_lr', 0)}, this run has {cfg.muon_lr}")


def resume_from(ckpt, optimizer, rng, path, stage, rank):
    """Continue a stage from its checkpoint (optimizer state and data RNG); returns its step."""
    if ckpt is None:
        return 0
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(rng, ckpt["rng"])
    if rank == 0:
        print(f"resuming {stage} from {path} at step {ckpt['step']}")
    return ckpt["step"]


def wrap(model, cfg, world, device):
    """(net, autocast): net is what a training step calls, the model itself, under DDP when there
    are several processes and torch.compile'd with --compile (both share the model's
    parameters); autocast is a bf16 context with --dtype bfloat16 on CUDA, else a no-op."""
    net = DDP(model) if world > 1 else model
    if cfg.compile:
        net = torch.compile(net)
    bf16 = cfg.dtype == "bfloat16" and "cuda" in str(device)
    if cfg.dtype == "bfloat16" and not bf16 and int(os.environ.get("RANK", 0)) == 0:
        # CPUs without bf16 units run bf16 slower than float32, so autocast stays a CUDA thing
        print(f"note: --dtype bfloat16 autocasts on CUDA only; training in float32 on {device}")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    return net, autocast


def grad_sync(net, last):
    """DDP all-reduces the gradients at every backward; between one step's micro-batches that is
    wasted work, so only the last micro-batch syncs. A no-op without DDP."""
    inner = getattr(net, "_orig_mod", net)  # under torch.compile
    return inner.no_sync() if isinstance(inner, DDP) and not last else nullcontext()


def sft_step(net, optimizer, batches, cfg, device, autocast=nullcontext()):
    """One optimizer step over a step's micro-batches: the loss is the weighted sum over trained
    tokens divided by the sum of their weights (a weighted mean per token, whatever its batch;
    with every weight 1, the plain mean). Returns (weighted loss per token, grad norm)."""
    w_total = sum(float(w.sum()) for _, _, w, _ in batches)
    total = 0.0
    for j, (x, y, w, seg) in enumerate(batches):
        x, y, w, seg = x.to(device), y.to(device), w.to(device), seg.to(device)
        with grad_sync(net, j == len(batches) - 1), autocast:
            _, loss = net(x, y, reduction="none", segments=seg)
            loss = (loss * w).sum()
            (loss / w_total).backward()
        total += loss.item()
    if not math.isfinite(total):
        raise FloatingPointError(f"SFT loss is {total / w_total}")
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / w_total, norm


def train_sft(cfg, rank, world, device, log):
    """SFT in two parts. A timed run (--sft-steps 0, the default) first trains TIMED_STEPS[1]
    ordinary steps (in the warmup, where the learning rate does not depend on the total), timing
    the later ones, and plans the steps that fill --sft-minutes; then the fixed-length loop."""
    tok = P.load_gpt2_tokenizer(cfg.init) if cfg.init else P.Tokenizer.numbers()
    path = os.path.join(cfg.run_dir, "sft.pt")
    resume = path if cfg.resume and os.path.exists(path) else None
    model, ckpt = build_model(cfg, tok, device, resume)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.muon_lr)
    rng = random.Random(cfg.seed * 1009 + rank)  # each rank draws its own puzzles: a data shard
    if ckpt is not None:
        check_compatible(ckpt, cfg, path, sft=True)
    start = resume_from(ckpt, optimizer, rng, path, "SFT", rank)
    if not cfg.sft_steps and ckpt is not None:  # a resumed timed run keeps the steps it planned
        cfg = replace(cfg, sft_steps=ckpt.get("train_config", {}).get("sft_steps", 0))
    net, autocast = wrap(model, cfg, world, device)
    bar = tqdm(desc="sft", disable=rank != 0, initial=start, total=cfg.stop_at or cfg.sft_steps or None,
               file=sys.stderr)
    model.train()

    def train_step(step):
        """One SFT step (step counts from 0): train, log, evaluate and checkpoint when due."""
        t0 = time.perf_counter()
        stop = cfg.stop_at or cfg.sft_steps  # cfg.sft_steps is 0 while a timed run times its steps:
        for g in optimizer.param_groups:     # those are in the warmup, where the total is not used
            g["lr"] = lr_at(step, cfg, cfg.sft_steps or 10 ** 9) * g.get("lr_scale", 1.0)
        batches = micro_batches(sft_sequences(cfg, tok, rng, cfg.sft_episodes, model.config.block_size),
                                cfg.micro_tokens, tok.pad)
        try:
            loss_per_token, norm = sft_step(net, optimizer, batches, cfg, device, autocast)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} at step {step}; the last good checkpoint is kept at {path}")
        n_tokens = sum(x.numel() for x, *_ in batches)
        row = {"stage": "sft", "step": step + 1, "loss": round(loss_per_token, 4),
               "lr": optimizer.param_groups[0]["lr"], "grad_norm": round(float(norm), 3),
               "tokens_per_s": round(world * n_tokens / (time.perf_counter() - t0))}
        bar.set_postfix(loss=f"{loss_per_token:.3f}", tok_s=row["tokens_per_s"])
        bar.update()
        last = step + 1 == stop
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last) and rank == 0:
            row.update(evaluate(model, tok, cfg, cfg.eval_n))
            bar.write(f"step {step + 1}: " + " ".join(f"{k} {v:.3g}" for k, v in row.items()
                                                       if k.startswith("eval")))
        log.write(row)
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or last):
            save(path, model, optimizer, step + 1, rng, cfg, tok.spec())

    step = start
    if not cfg.sft_steps:  # 1. a timed run: time this machine's steps, then plan the budget
        step, cfg = timed_start(cfg, start, train_step, world, device, bar)
        if cfg.sft_steps and step >= bar.total and rank == 0:  # the budget ended in the timed steps
            save(path, model, optimizer, step, rng, cfg, tok.spec())
    for step in range(step, cfg.stop_at or cfg.sft_steps):  # 2. the fixed-length loop
        train_step(step)
    bar.close()
    return path


def timed_start(cfg, start, train_step, world, device, bar):
    """The first TIMED_STEPS[1] steps of a timed run (fewer under --stop-at), timing steps
    TIMED_STEPS[0] onwards; then the plan (plan_sft_steps). Returns (next step, cfg with the
    planned sft_steps, or unchanged when stopped before the plan)."""
    step, t_start = start, time.perf_counter()
    timed_from, first = start + TIMED_STEPS[0], start + TIMED_STEPS[1]
    while step < min(first, cfg.stop_at or first):
        if step == timed_from:
            t_timed = time.perf_counter()
        train_step(step)
        step += 1
    if step == first:
        cfg = plan_sft_steps(cfg, t_start, t_timed, step, world, device, bar)
        bar.total = cfg.stop_at or cfg.sft_steps
    return step, cfg


# -----------------------------------------------------------------------------
# Stage 2: RL (the GRPO pieces are in grpo.py)

def load_policy(cfg, device):
    """(model, tokenizer, checkpoint or None) for the RL stage: resume rl.pt,
    or start from the run folder's sft.pt, or (ablation) from random weights."""
    rl_path = os.path.join(cfg.run_dir, "rl.pt")
    sft_path = os.path.join(cfg.run_dir, "sft.pt")
    if cfg.resume and os.path.exists(rl_path):
        model, tok = A.load_model(rl_path, device)
        ckpt = torch.load(rl_path, map_location="cpu", weights_only=True)
        check_compatible(ckpt, cfg, rl_path)
        return model, tok, ckpt
    if cfg.from_scratch:
        tok = P.Tokenizer.numbers()
        model, _ = build_model(cfg, tok, device)
        return model, tok, None
    if not os.path.exists(sft_path):
        raise FileNotFoundError(f"no SFT checkpoint at {sft_path}: run `python train.py --stage sft` "
                                f"with the same --run-dir/--task/--mode first (or pass --from-scratch)")
    model, tok = A.load_model(sft_path, device)
    check_compatible(torch.load(sft_path, map_location="cpu", weights_only=True), cfg, sft_path)
    return model, tok, None


def reference_policy(cfg, model, device):
    """The frozen policy RL started from, for the KL penalty: the run's sft.pt (also when RL
    resumes from rl.pt: the reference must not move with the policy), else (--from-scratch)
    a copy of the starting weights, rebuilt from the seed on a resume."""
    sft_path = os.path.join(cfg.run_dir, "sft.pt")
    if not cfg.from_scratch and os.path.exists(sft_path):
        ref, _ = A.load_model(sft_path, device)
    elif cfg.from_scratch and cfg.resume:
        ref, _ = build_model(cfg, P.Tokenizer.numbers(), device)
    else:
        ref = type(model)(model.config).to(device)
        ref.load_state_dict(model.state_dict())
    return ref.eval().requires_grad_(False)


def all_mean(values, world, device):
    """Means over all ranks of a dict of floats."""
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(values, t.tolist())}


def rl_update(net, optimizer, ref, batches, cfg, device, autocast):
    """cfg.inner_updates optimizer steps on one RL step's rollouts: the PPO-clipped surrogate plus
    the KL to the reference, a token-level mean over the generated tokens. batches are
    grpo.thread_batches (x, y, old log-probs, advantages, segments). Returns the last pass's
    loss, kl, clipped share and entropy, per generated token."""
    net.train()
    if not batches:  # every group had equal rewards: a zero-loss pass keeps DDP ranks in step
        batches = [(torch.zeros((1, 1), dtype=torch.long), torch.full((1, 1), -1), torch.zeros((1, 1)),
                    torch.zeros((1, 1)), torch.zeros((1, 1), dtype=torch.long))]
    n_gen = max(1, sum(int((y != -1).sum()) for _, y, _, _, _ in batches))
    batches = [tuple(t.to(device) for t in batch) for batch in batches]
    T = cfg.temperature
    ref_logp = [None] * len(batches)
    if ref is not None:  # the reference's log-probs, once for all inner updates
        with torch.no_grad(), autocast:
            ref_logp = [grpo.target_logprobs(ref(x, segments=seg), y, T) for x, y, _, _, seg in batches]
    if cfg.dtype != "float32":
        # Rollouts decode in float32; under bf16 autocast the update's forward would read
        # the same tokens ~1e-2 differently, so its first ratio would not be 1. Recompute
        # the old log-probs with the update's own forward (once, before any change).
        with torch.no_grad(), autocast:
            batches = [(x, y, grpo.target_logprobs(net(x, segments=seg), y, T), adv, seg)
                       for x, y, _, adv, seg in batches]
    stats = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "entropy": 0.0}
    for inner in range(cfg.inner_updates):
        for j, (x, y, old, adv, seg) in enumerate(batches):
            with grad_sync(net, j == len(batches) - 1), autocast:
                loss, kl, s = grpo.policy_loss(net(x, segments=seg), y, old, adv, cfg.clip_eps,
                                               ref_logp[j], temperature=T)
                ((loss + cfg.kl_coef * kl) / n_gen).backward()
            if inner == cfg.inner_updates - 1:  # statistics of the last pass
                stats["loss"] += loss.item() / n_gen
                stats["kl"] += kl.item() / n_gen
                stats["clipped"] += s["clipped"] / n_gen
                stats["entropy"] += s["entropy"] / n_gen
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        if not math.isfinite(float(norm)):  # a NaN or inf anywhere in the loss reaches the norm
            raise FloatingPointError(f"RL update is not finite (grad norm {float(norm)})")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return stats


def rl_metrics(cfg, episodes, records, rewards, tok, advs):
    """The whole RL picture of one step's rollouts: reward parts, accuracy, format errors,
    structure (latency, eta, forks, tokens), the workers' returns, the groups that carried no
    signal and (with --tools) the tool calls per episode."""
    n = len(records)
    mean = lambda values: sum(values) / n
    return {
        "reward": mean(r.total for r in rewards),
        "reward_accuracy": mean(r.accuracy for r in rewards),
        "reward_concurrency": mean(r.concurrency for r in rewards),
        "format_error_rate": mean(r.format_error for r in rewards),
        "accuracy": mean(rec["correct"] for rec in records),
        "latency": mean(rec["latency"] for rec in records),
        "eta": mean(rec["concurrency"] for rec in records),
        "eta_over_c": mean(rec["concurrency"] for rec in records) / cfg.capacity,
        "tokens": mean(rec["tokens"] for rec in records),
        "forks": mean(len(ep.organizer.children) for ep in episodes),
        "worker_precision": grpo.worker_precision(episodes, tok),
        "skipped_groups": grpo.skipped_groups(advs, cfg.group),
        **({"tool_calls": mean(rec.get("tool_calls", 0) for rec in records)} if cfg.tools else {})}


def train_rl(cfg, rank, world, device, log):
    """RL, one step at a time: 1. roll out G structures per question and score them; 2. update
    the policy on them (rl_update); 3. log, evaluate and checkpoint when due."""
    model, tok, ckpt = load_policy(cfg, device)
    path = os.path.join(cfg.run_dir, "rl.pt")
    ref = reference_policy(cfg, model, device) if cfg.kl_coef > 0 else None
    optimizer = make_optimizer(model, cfg.rl_lr, 0.0)
    rng = random.Random(cfg.seed * 7919 + rank)  # each rank draws its own questions
    start = resume_from(ckpt, optimizer, rng, path, "RL", rank)
    net, autocast = wrap(model, cfg, world, device)
    lam = 0.0 if cfg.no_concurrency_reward else cfg.lam
    per_rank = max(1, cfg.questions // world)
    stop = cfg.stop_at or cfg.rl_steps
    bar = tqdm(range(start, stop), desc="rl", disable=rank != 0, initial=start, total=stop, file=sys.stderr)
    for step in bar:
        # 1. rollouts: G structures for each of this rank's questions
        t0 = time.perf_counter()
        questions = [new_puzzle(cfg, task_of(cfg, rng), rng) for _ in range(per_rank)]
        rows = [q for q in questions for _ in range(cfg.group)]
        episodes, records = grpo.rollout(model, tok, cfg, rows, seed=cfg.seed * 100003 + step * world + rank)
        rewards = [grpo.reward(r, cfg.capacity, cfg.tau, lam, cfg.format_penalty, cfg.tool_cost) for r in records]
        if cfg.advantage == "rft":
            advs = grpo.rft_advantages(rewards)
        else:
            advs = grpo.advantages([r.total for r in rewards], cfg.group, cfg.advantage)
        thread_advs = grpo.thread_advantages(episodes, advs, cfg.group, cfg.credit, tok, records=records)
        t_rollout = time.perf_counter() - t0

        # 2. updates
        batches = grpo.thread_batches(episodes, thread_advs, cfg.micro_tokens)
        try:
            stats = rl_update(net, optimizer, ref, batches, cfg, device, autocast)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} at step {step}; the last good checkpoint is kept at {path}")
        t_update = time.perf_counter() - t0 - t_rollout

        # 3. log
        gen_tokens = sum(r["tokens"] for r in records)
        row = all_mean({**rl_metrics(cfg, episodes, records, rewards, tok, advs), **stats,
                        "rollout_tokens_per_s": gen_tokens / t_rollout,
                        "rollout_s": t_rollout, "update_s": t_update}, world, device)
        row = {"stage": "rl", "step": step + 1, **{k: round(v, 4) for k, v in row.items()}}
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.2f}",
                        eta=f"{row['eta']:.2f}", fe=f"{row['format_error_rate']:.2f}")
        last = step + 1 == stop
        if cfg.eval_every and rank == 0 and ((step + 1) % max(1, cfg.eval_every // 10) == 0 or last):
            row.update(evaluate(model, tok, cfg, cfg.eval_n))
        log.write(row)
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or last):
            save(path, model, optimizer, step + 1, rng, cfg, tok.spec())
    bar.close()
    return path


# -----------------------------------------------------------------------------
# Entry point

def parse_args(argv=None):
    ap = cli.ArgumentParser(description="Train AsyncThink: --stage sft, then --stage rl.")
    d = TrainConfig()
    ap.add_argument("--stage", choices=["sft", "rl"], default="sft")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--mode", choices=E.MODES, default=d.mode)
    ap.add_argument("--task", choices=["countdown", "sudoku", "mix"], default=d.task)
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=d.device)
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    ap.add_argument("--init", default="", help="start SFT from a pretrained GPT-2 folder")
    ap.add_argument("--resume", action="store_true", help="continue this stage from its checkpoint")
    ap.add_argument("--no-concurrency-reward", action="store_true", help="ablation: lambda = 0")
    ap.add_argument("--from-scratch", action="store_true", help="ablation: RL without format SFT")
    # every other TrainConfig field can be set too, e.g. --sft-steps 100 --lr 1e-3 --group 8
    skip = {"stage", "preset", "mode", "task", "run_dir", "device", "compile", "init", "resume",
            "no_concurrency_reward", "from_scratch"}
    for f in fields(TrainConfig):
        if f.name not in skip:
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    args = ap.parse_args(argv)
    names = {f.name for f in fields(TrainConfig)}
    # defaults < the preset's values < flags given on the command line
    values = {**asdict(d), **PRESETS[args.preset]}
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    cfg = TrainConfig(**values)
    cfg.run_dir = cfg.run_dir or os.path.join("runs", f"{cfg.task}-{cfg.mode}")
    if cfg.mode == "parallel" and args.max_worker_tokens is None:
        # a parallel worker thinks through the whole question, as long as a sequential thinker
        cfg.max_worker_tokens = cfg.max_organizer_tokens
    check_flags(cfg, ap.error)
    return cfg


def check_flags(cfg, error):
    """Every value a flag may not take: error(message) (argparse's: one line, exit 2)."""
    if cfg.sft_steps < 0 or cfg.sft_minutes <= 0:
        error("--sft-steps must be >= 0 (0: fill --sft-minutes) and --sft-minutes > 0")
    for name in ("sft_episodes", "micro_tokens", "rl_steps", "questions", "group",
                 "inner_updates", "eval_n", "ckpt_every", "organizer_weight"):
        if getattr(cfg, name) <= 0:
            error(f"--{name.replace('_', '-')} must be positive")
    for name in ("copy_drills", "eval_every", "stop_at", "warmup", "kl_coef", "lam", "muon_lr"):
        if getattr(cfg, name) < 0:
            error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    for name in ("hint_share", "check_share", "width_share"):
        if not 0 <= getattr(cfg, name) <= 1:
            error(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(cfg, name)}")
    try:
        tools = P.parse_tools(cfg.tools)
    except ValueError as e:
        error(f"--tools: {e}")
    if cfg.capacities:
        try:
            lo, hi = P.capacity_range(cfg.capacities)
        except ValueError as e:
            error(str(e))
        if not lo <= cfg.capacity <= hi:
            error(f"--capacity {cfg.capacity} (evaluation, RL) must lie in --capacities {cfg.capacities}")
    if (cfg.check_share and "check" not in tools) or cfg.tool_cost < 0:
        error("--check-share needs --tools check, and --tool-cost must be >= 0")
    if cfg.width_share and (cfg.mode != "async" or cfg.depth > 1):
        error("--width-share shapes depth-1 async traces: it needs --mode async and --depth 1")
    if cfg.dtype not in ("float32", "bfloat16"):
        error(f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.credit not in ("shared", "thread", "copy") or cfg.advantage not in ("zscore", "mean", "rft"):
        error("--credit must be shared, thread or copy, and --advantage zscore, mean or rft")
    if cfg.number_init not in ("fourier", "random"):
        error(f"--number-init must be fourier or random, got {cfg.number_init!r}")
    if cfg.capacity < 2 and cfg.mode != "sequential":
        error("--capacity must be >= 2 for parallel and async modes")
    if cfg.depth not in (1, 2) or (cfg.depth == 2 and (cfg.mode != "async" or cfg.task != "countdown")):
        error("--depth must be 1, or 2 with --mode async --task countdown (the traces with sub-organizers)")
    if cfg.depth == 2 and (cfg.capacity < 3 or cfg.capacities and P.capacity_range(cfg.capacities)[0] < 3):
        error("--depth 2 needs every capacity >= 3: the organizer, a sub-organizer and its pair worker")


def main(argv=None):
    cfg = parse_args(argv)
    rank, world, device = 0, 1, "cpu"
    try:
        rank, world, device = setup_distributed(cfg)
        os.makedirs(cfg.run_dir, exist_ok=True)
        log = Log(cfg.run_dir, rank)
        if cfg.stage == "sft":
            path = train_sft(cfg, rank, world, device, log)
        else:
            path = train_rl(cfg, rank, world, device, log)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        return cli.fail("train.py", e)
    finally:
        if dist.is_initialized():
            dist.barrier()  # no rank tears the group down while another still uses it
            dist.destroy_process_group()
    if rank == 0:
        png = plot_curves(cfg.run_dir)
        if png:
            print(f"curves: {png}")
        print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
