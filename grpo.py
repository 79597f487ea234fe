"""
Reinforcement learning for AsyncThink: a GRPO variant over whole organizer-worker structures.

One rollout is a whole STRUCTURE: the organizer's trace and every worker's trace, produced by
the executor (batched, on the KV cache). For each question we sample G structures, score each
with one reward, and turn the G rewards into group-relative advantages. The advantage of a
structure is shared by EVERY TOKEN THE MODEL GENERATED in it, in every thread; prompts and the
join results the executor injected get no loss.

Reward of one structure (paper, section "Reward"):

    R = R_FE                        if the trajectory has any format error (a penalty, -1)
    R = R_A + lambda * R_eta        otherwise
    R_A   = min(distinct correct, k) / k      (binary for Sudoku)
    R_eta = min(eta / c, tau) / tau            (concurrency, capped at tau against hacking)

Worked example, G = 4 structures of one countdown question (k = 4, c = 4, tau = 0.5, lambda = 0.2):

    structure  format  correct  eta    R_A   R_eta              R
    1          ok      4        2.0    1.0   min(.5,.5)/.5=1.0  1.0 + 0.2*1.0  = 1.20
    2          ok      2        1.0    0.5   .25/.5 = 0.5       0.5 + 0.2*0.5  = 0.60
    3          error   -        -      -     -                  -1.00
    4          ok      0        1.6    0.0   .4/.5 = 0.8        0.0 + 0.2*0.8  = 0.16
    mean 0.24, std (population) 0.806  ->  z-scored advantages  1.192  0.447  -1.539  -0.099

The policy loss is PPO's clipped surrogate on each generated token t with ratio
r_t = exp(logp_new - logp_old), logp_old being the log-probability the rollout recorded:

    L = - mean_t  min(r_t * A, clip(r_t, 1-eps, 1+eps) * A)   (+ kl_coef * KL to the SFT model)

Normalization across the threads of a structure: token-level. The mean runs over all generated
tokens of the batch, whatever thread they belong to, so each token counts once: a 500-token
organizer weighs 500 tokens, a 30-token worker 30. Averaging per thread first would give a
3-token worker the pull of the whole organizer and make short threads dominate the update.
"""

import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import asyncthink as A
import protocol as P


# -----------------------------------------------------------------------------
# Rewards and advantages

@dataclass
class Reward:
    total: float
    accuracy: float      # R_A
    concurrency: float   # R_eta
    format_error: bool


def reward(rec, capacity, tau=0.5, lam=0.2, format_penalty=-1.0):
    """The reward of one structure from its executor record (see the module docstring)."""
    if rec["format_errors"]:
        return Reward(format_penalty, 0.0, 0.0, True)
    k = rec.get("k", 1) if rec["task"] == "countdown" else 1
    r_a = min(rec["n_correct"], k) / k
    r_eta = min(rec["concurrency"] / capacity, tau) / tau
    return Reward(r_a + lam * r_eta, r_a, r_eta, False)


def advantages(rewards, group, kind="zscore", eps=1e-6):
    """Group-relative advantages: rewards come in consecutive groups of `group` structures of
    the same question. 'zscore': (R - mean) / std; 'mean': R - mean. A group whose rewards
    are all equal teaches nothing: its advantages are exactly 0 (and it is skipped).

    >>> [round(a, 3) for a in advantages([1.2, 0.6, -1.0, 0.16], 4)]
    [1.192, 0.447, -1.539, -0.099]
    """
    out = []
    for g in range(0, len(rewards), group):
        rs = torch.tensor(rewards[g:g + group], dtype=torch.float64)
        centered = rs - rs.mean()
        std = rs.std(unbiased=False)
        if std < eps:
            out += [0.0] * len(rs)
        else:
            out += (centered / std if kind == "zscore" else centered).tolist()
    return out


# -----------------------------------------------------------------------------
# The policy loss on padded batches of threads

def thread_batches(episodes, advs, max_tokens):
    """Every thread of every structure with a non-zero advantage, as padded micro-batches:
    x (B, T) input ids; y (B, T) target ids, -1 where there is no loss (prompt, injected,
    padding); old (B, T) the rollout's log-probs; adv (B,) the structure's advantage."""
    rows = []
    for ep, adv in zip(episodes, advs):
        if adv == 0.0:
            continue
        for th in ep.threads:
            if th.generated == 0:
                continue
            ids = th.prompt + th.out
            gen = [False] * len(th.prompt) + [not inj for inj in th.injected]
            old = [0.0] * len(th.prompt) + th.logprobs
            rows.append((ids, gen, old, adv))
    rows.sort(key=lambda r: len(r[0]))
    batches, group = [], []
    for r in rows:
        if group and (len(group) + 1) * len(r[0]) > max_tokens:
            batches.append(group)
            group = []
        group.append(r)
    if group:
        batches.append(group)
    out = []
    for group in batches:
        T = max(len(r[0]) for r in group) - 1
        x = torch.zeros((len(group), T), dtype=torch.long)
        y = torch.full((len(group), T), -1, dtype=torch.long)
        old = torch.zeros((len(group), T))
        for b, (ids, gen, lp, _) in enumerate(group):
            n = len(ids) - 1
            x[b, :n] = torch.tensor(ids[:-1])
            y[b, :n] = torch.where(torch.tensor(gen[1:]), torch.tensor(ids[1:]), torch.tensor(-1))
            old[b, :n] = torch.tensor(lp[1:])
        out.append((x, y, old, torch.tensor([r[3] for r in group])))
    return out


def policy_loss(logits, y, old, adv, clip_eps, ref_logits=None):
    """Clipped surrogate summed over generated tokens (divide by their count outside), and
    statistics: summed KL (k3 estimator, to the reference), clipped count, entropy."""
    mask = y != -1
    logp_all = F.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    ratio = torch.exp(logp - old)
    a = adv[:, None].to(logp.dtype)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    loss = -(surrogate * mask).sum()
    stats = {"clipped": ((ratio - 1).abs() > clip_eps)[mask].sum().item(),
             "entropy": -(logp_all.exp() * logp_all).sum(-1)[mask].sum().item()}
    kl = torch.zeros((), device=logits.device)
    if ref_logits is not None:
        ref = F.log_softmax(ref_logits.float(), dim=-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        kl = ((torch.exp(ref - logp) - (ref - logp) - 1) * mask).sum()
    return loss, kl, stats


# -----------------------------------------------------------------------------
# The RL stage (called by train.py --stage rl)

def load_policy(cfg, device):
    """(model, tokenizer, checkpoint or None, start path) for the RL stage: resume rl.pt,
    or start from the run folder's sft.pt, or (ablation) from random weights."""
    import train
    rl_path = os.path.join(cfg.run_dir, "rl.pt")
    sft_path = os.path.join(cfg.run_dir, "sft.pt")
    if cfg.resume and os.path.exists(rl_path):
        model, tok = A.load_model(rl_path, device)
        ckpt = torch.load(rl_path, map_location="cpu", weights_only=True)
        train.check_compatible(ckpt, cfg, rl_path)
        return model, tok, ckpt
    if cfg.from_scratch:
        tok = P.Tokenizer.bytes_level()
        model, _ = train.build_model(cfg, tok, device)
        return model, tok, None
    if not os.path.exists(sft_path):
        raise FileNotFoundError(f"no SFT checkpoint at {sft_path}: run `python train.py --stage sft` "
                                f"with the same --run-dir/--task/--mode first (or pass --from-scratch)")
    model, tok = A.load_model(sft_path, device)
    train.check_compatible(torch.load(sft_path, map_location="cpu", weights_only=True), cfg, sft_path)
    return model, tok, None


def rollout(model, tok, cfg, rows, seed):
    """G structures per question with the batched executor; rows are already grouped."""
    run = A.RunConfig(mode=cfg.mode, capacity=cfg.capacity, temperature=cfg.temperature, seed=seed,
                      max_organizer_tokens=cfg.max_organizer_tokens,
                      max_worker_tokens=cfg.max_worker_tokens, batch_episodes=len(rows))
    episodes = A.Executor(model, tok, run).run(rows)
    return episodes, [A.record(ep, tok, run) for ep in episodes]


def all_mean(values, world, device):
    """Means over all ranks of a dict of floats."""
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(values, t.tolist())}


def train_rl(cfg, rank, world, device, log):
    import train
    from tqdm import tqdm
    model, tok, ckpt = load_policy(cfg, device)
    path = os.path.join(cfg.run_dir, "rl.pt")
    ref = None
    if cfg.kl_coef > 0:  # the frozen starting policy, for the KL penalty
        ref = type(model)(model.config).to(device)
        ref.load_state_dict(model.state_dict())
        ref.eval().requires_grad_(False)
    optimizer = train.make_optimizer(model, cfg.rl_lr, 0.0)
    rng = random.Random(cfg.seed * 7919 + rank)  # each rank draws its own questions
    start = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        train.set_rng_state(rng, ckpt["rng"])
        if rank == 0:
            print(f"resuming RL from {path} at step {start}")
    ddp = DDP(model) if world > 1 else model
    fwd = torch.compile(ddp) if cfg.compile else ddp
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.dtype == "bfloat16" and "cuda" in str(device) else nullcontext()
    lam = 0.0 if cfg.no_concurrency_reward else cfg.lam
    per_rank = max(1, cfg.questions // world)
    stop = cfg.stop_at or cfg.rl_steps
    bar = tqdm(range(start, stop), desc="rl", disable=rank != 0, initial=start, total=stop, file=sys.stderr)
    for step in bar:
        # 1. rollouts: G structures for each of this rank's questions
        t0 = time.perf_counter()
        questions = [train.new_puzzle(cfg, train.task_of(cfg, rng), rng) for _ in range(per_rank)]
        rows = [q for q in questions for _ in range(cfg.group)]
        episodes, records = rollout(model, tok, cfg, rows, seed=cfg.seed * 100003 + step * world + rank)
        rewards = [reward(r, cfg.capacity, cfg.tau, lam, cfg.format_penalty) for r in records]
        advs = advantages([r.total for r in rewards], cfg.group, cfg.advantage)
        t_rollout = time.perf_counter() - t0

        # 2. updates: PPO-clipped surrogate, token-level mean over generated tokens
        model.train()
        batches = thread_batches(episodes, advs, cfg.micro_tokens)
        if not batches:  # every group had equal rewards: a zero-loss pass keeps DDP ranks in step
            batches = [(torch.zeros((1, 1), dtype=torch.long), torch.full((1, 1), -1), torch.zeros((1, 1)),
                        torch.zeros(1))]
        n_gen = max(1, sum(int((y != -1).sum()) for _, y, _, _ in batches))
        stats = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "entropy": 0.0}
        for inner in range(cfg.inner_updates):
            for j, (x, y, old, adv) in enumerate(batches):
                x, y, old, adv = x.to(device), y.to(device), old.to(device), adv.to(device)
                sync = nullcontext() if world == 1 or j == len(batches) - 1 else ddp.no_sync()
                with sync, autocast:
                    ref_logits = None
                    if ref is not None:
                        with torch.no_grad():
                            ref_logits = ref(x)
                    loss, kl, s = policy_loss(fwd(x), y, old, adv, cfg.clip_eps, ref_logits)
                    ((loss + cfg.kl_coef * kl) / n_gen).backward()
                if inner == cfg.inner_updates - 1:  # statistics of the last pass
                    stats["loss"] += loss.item() / n_gen
                    stats["kl"] += kl.item() / n_gen
                    stats["clipped"] += s["clipped"] / n_gen
                    stats["entropy"] += s["entropy"] / n_gen
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not (math.isfinite(stats["loss"] if inner == cfg.inner_updates - 1 else 0.0)
                    and math.isfinite(float(norm))):
                raise FloatingPointError(f"RL update is not finite at step {step} (grad norm {float(norm)}); "
                                         f"the last good checkpoint is kept at {path}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t_update = time.perf_counter() - t0 - t_rollout

        # 3. log
        n = len(records)
        gen_tokens = sum(r["tokens"] for r in records)
        row = all_mean({
            "reward": sum(r.total for r in rewards) / n,
            "reward_accuracy": sum(r.accuracy for r in rewards) / n,
            "reward_concurrency": sum(r.concurrency for r in rewards) / n,
            "format_error_rate": sum(r.format_error for r in rewards) / n,
            "accuracy": sum(rec["correct"] for rec in records) / n,
            "latency": sum(rec["latency"] for rec in records) / n,
            "eta": sum(rec["concurrency"] for rec in records) / n,
            "forks": sum(len(ep.organizer.children) for ep in episodes) / n,
            "skipped_groups": sum(a == 0.0 for a in advs[::cfg.group]) / max(1, len(advs[::cfg.group])),
            **stats,
            "rollout_tokens_per_s": gen_tokens / t_rollout,
            "rollout_s": t_rollout, "update_s": t_update}, world, device)
        row = {"stage": "rl", "step": step + 1, **{k: round(v, 4) for k, v in row.items()}}
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.2f}",
                        eta=f"{row['eta']:.2f}", fe=f"{row['format_error_rate']:.2f}")
        last = step + 1 == stop
        if cfg.eval_every and rank == 0 and ((step + 1) % max(1, cfg.eval_every // 10) == 0 or last):
            row.update(train.evaluate(model, tok, cfg, cfg.eval_n))
        log.write(row)
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or last):
            train.save(path, model, optimizer, step + 1, rng, cfg, train.tokenizer_spec(cfg))
    bar.close()
    return path
