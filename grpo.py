"""
Reinforcement learning for AsyncThink: a GRPO variant over whole organizer-worker structures.

This file holds the pieces; train.py's RL stage runs them. One rollout is a whole STRUCTURE:
the organizer's trace and every worker's trace, produced by the executor (batched, on the KV
cache). For each question we sample G structures, score each with one reward, and turn the G
rewards into group-relative advantages. The advantage of a
structure is shared by EVERY TOKEN THE MODEL GENERATED in it, in every thread; prompts and the
join results the executor injected get no loss.

Reward of one structure (paper, section "Reward"):

    R = R_FE                        if the trajectory has any format error (a penalty, -0.5)
    R = R_A + lambda * R_eta        otherwise
    R_A   = min(distinct correct, k) / k      (binary for Sudoku; only the first k answers count)
    R_eta = min(eta / c, tau) / tau            (concurrency, capped at tau against hacking)

The constants (the paper does not publish its own) are chosen so that each part says something
at the start of RL. tau = 0.75: the SFT model already runs at eta ~2.35 of c = 4 (eta / c ~0.59),
so tau = 0.5 paid R_eta = 1 to almost every structure and told RL nothing about structure; at
0.75 the cap is eta = 3, above where the model starts. R_FE = -0.5: two answers' worth below a
valid structure with none right (the paper's sign, not its size); -1 was four correct answers'
worth, paid on T = 0.7 samples that break the format far more often than greedy ones, so fewer
forks and shorter episodes were the cheapest way up the reward.

Worked example, G = 4 structures of one countdown question (k = 4, c = 4, tau = 0.75, lambda = 0.2):

    structure  format  correct  eta    R_A   R_eta               R
    1          ok      4        2.0    1.0   min(.5,.75)/.75=.667  1.0 + 0.2*.667 = 1.133
    2          ok      2        1.0    0.5   .25/.75 = .333        0.5 + 0.2*.333 = 0.567
    3          error   -        -      -     -                     -0.500
    4          ok      0        1.6    0.0   .4/.75 = .533         0.0 + 0.2*.533 = 0.107
    mean 0.327, std (population) 0.600  ->  z-scored advantages  1.344  0.400  -1.378  -0.367

A group whose rewards differ only by noise (eta 2.3401 against 2.3399, everything else tied)
must not get full-size advantages, as a bare z-score would give it: the std is floored at
STD_FLOOR = 0.1 (about the spread of one correct answer more in one of four structures), so such
a group's advantages stay near 0 while real differences are z-scored as usual.

The policy loss is PPO's clipped surrogate on each generated token t with ratio
r_t = exp(logp_new - logp_old), logp_old being the log-probability the rollout recorded:

    L = - mean_t  min(r_t * A, clip(r_t, 1-eps, 1+eps) * A)   (+ kl_coef * KL to the SFT model)

Rollouts sample at a temperature T (0.7 by default: an SFT model exact at T = 0 breaks its own
format far more often at T = 1), so the policy being trained IS the tempered one,
softmax(logits / T): the executor records its log-probabilities, and the loss, the entropy and
the KL all score logits / T. Scoring the untempered softmax(logits) instead would follow neither
policy's gradient: it sharpens every uncertain token where A > 0 and flattens it where A < 0, a
drift that grows step after step while the accuracy signal averages out. Greedy evaluation is
unchanged (the argmax of logits / T is the argmax of logits), and the first inner update's ratio
is exactly 1 (tests/test_grpo.py).

Normalization across the threads of a structure: token-level. The mean runs over all generated
tokens of the batch, whatever thread they belong to, so each token counts once: a 500-token
organizer weighs 500 tokens, a 30-token worker 30. Averaging per thread first would give a
3-token worker the pull of the whole organizer and make short threads dominate the update.

Three options beside the paper's one shared reward, for comparison at equal wall time:
`thread_advantages` (train.py --credit thread: each worker's <RETURN> is verified on its own,
~7 signals per structure instead of 1), `copy_advantages` (--credit copy: the organizer's answer
is checked against what its workers returned, the list copy that loses most answers) and
`rft_advantages` (--advantage rft: rejection-sampling fine-tuning on the model's own entirely
correct structures, the baseline GRPO must beat).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import asyncthink as A
import executor as E
import protocol as P
import tasks
from model import pack


# -----------------------------------------------------------------------------
# Rewards and advantages

@dataclass
class Reward:
    total: float
    accuracy: float      # R_A
    concurrency: float   # R_eta
    format_error: bool


def reward(rec, capacity, tau=0.75, lam=0.2, format_penalty=-0.5, tool_cost=0.0):
    """The reward of one structure from its executor record (see the module docstring); with
    tool workers (tools.py), tool_cost is taken off a valid structure per call, so RL can learn
    when a call is worth it."""
    if rec["format_errors"]:
        return Reward(format_penalty, 0.0, 0.0, True)
    k = rec.get("k", 1) if rec["task"] == "countdown" else 1
    r_a = min(rec["n_correct"], k) / k
    r_eta = min(rec["concurrency"] / capacity, tau) / tau
    return Reward(r_a + lam * r_eta - tool_cost * rec.get("tool_calls", 0), r_a, r_eta, False)


STD_FLOOR = 0.1  # see the module docstring: noise-level differences get near-0 advantages


def advantages(rewards, group, kind="zscore", std_floor=STD_FLOOR):
    """Group-relative advantages: rewards come in consecutive groups of `group` structures of
    the same question. 'zscore': (R - mean) / max(std, std_floor); 'mean': R - mean. A group
    whose rewards are all equal teaches nothing: its advantages are exactly 0 (and it is skipped).

    >>> [round(a, 3) for a in advantages([1.1333, 0.5667, -0.5, 0.1067], 4)]
    [1.344, 0.4, -1.378, -0.367]
    >>> [round(a, 4) for a in advantages([0.5001, 0.4999], 2)]   # noise: (R - mean) / 0.1
    [0.001, -0.001]
    """
    out = []
    for g in range(0, len(rewards), group):
        rs = torch.tensor(rewards[g:g + group], dtype=torch.float64)
        centered = rs - rs.mean()
        if bool((rs == rs[0]).all()):
            out += [0.0] * len(rs)
        else:
            out += (centered / rs.std(unbiased=False).clamp(min=std_floor) if kind == "zscore"
                    else centered).tolist()
    return out


def rft_advantages(rewards):
    """Rejection-sampling fine-tuning as a special case of the same loss, the baseline GRPO must
    beat: advantage 1 for every structure that is valid and entirely correct (R_A = 1), 0 for
    the rest. At the first inner update the ratio is 1, so the clipped surrogate's gradient is
    the SFT gradient on the kept structures' tokens: supervised learning on the model's own
    correct samples, with no contrast against its wrong ones.

    >>> rft_advantages([Reward(1.13, 1.0, 0.67, False), Reward(0.95, 0.75, 1.0, False), Reward(-0.5, 0.0, 0.0, True)])
    [1.0, 0.0, 0.0]
    """
    return [1.0 if r.accuracy == 1.0 and not r.format_error else 0.0 for r in rewards]


def skipped_groups(advs, group):
    """The share of groups that teach nothing: every advantage of the group is 0."""
    groups = [advs[g:g + group] for g in range(0, len(advs), group)]
    return sum(all(a == 0.0 for a in g) for g in groups) / max(1, len(groups))


def worker_reward(th, row, tok):
    """Per-thread credit for one countdown worker that returned: +1 for every distinct correct
    expression in its <RETURN>, -1 for every wrong one (checked against the episode's own
    puzzle, not the sub-query the organizer wrote), -1 if the return does not parse; "none"
    scores 0. None for a worker that never returned (stopped with its episode): it keeps the
    structure's shared advantage."""
    if th.state != "done":
        return None
    parts = P.parse_answer(tok.decode(th.result), "countdown")
    if parts is None:
        return -1.0
    right = correct_set(parts, row)
    return float(len(right) - sum(tasks.check_countdown(p, row["numbers"], row["target"]) is not None
                                  for p in parts))


def worker_precision(episodes, tok):
    """The share of the expressions countdown workers returned that are right (each checked
    against its episode's puzzle; "none" returns nothing): how often a worker's claim is true.
    0.0 when no worker returned an expression. Workers return 12+8-1 and 12+8+1 for target
    19 from 1 4 5 7 8 12: one of two right, 0.5."""
    right = returned = 0
    for ep in episodes:
        if ep.row["task"] != "countdown":
            continue
        for th in ep.threads[1:]:
            if th.role != "worker" or th.tool is not None or th.state != "done":
                continue
            parts = P.parse_answer(tok.decode(th.result), "countdown") or []
            returned += len(parts)
            right += sum(tasks.check_countdown(p, ep.row["numbers"], ep.row["target"]) is None for p in parts)
    return right / returned if returned else 0.0


def correct_set(parts, row):
    """The distinct correct countdown expressions among parts (canonical forms)."""
    return {tasks.canonical(p) for p in parts if tasks.check_countdown(p, row["numbers"], row["target"]) is None}


def copy_score(ep, rec, tok):
    """How faithfully a countdown organizer delivered what its workers found: the distinct
    correct expressions in its answer (the record's n_correct, at most k) minus the distinct
    correct expressions its workers returned (at most k). 0: it delivered all that came back;
    -2: it dropped or mis-copied two. None for a structure with a format error (it has no answer
    to check) or another task.

    Workers return 12+8-1 and 12+5+2 (both right, k = 4); the answer copies 12+8-1 and writes
    12+5-2 (wrong): 1 - 2 = -1."""
    if rec["format_errors"] or rec["task"] != "countdown":
        return None
    found = set()
    for th in ep.threads[1:]:
        if th.state == "done":
            found |= correct_set(P.parse_answer(tok.decode(th.result), "countdown") or [], rec)
    k = rec.get("k", 1)
    return float(min(rec["n_correct"], k) - min(len(found), k))


def thread_advantages(episodes, advs, group, credit, tok, std_floor=STD_FLOOR, records=None):
    """[[advantage of each thread] per episode]. credit 'shared' (the paper): every thread of a
    structure gets the structure's advantage. credit 'thread': the organizer keeps it, and each
    countdown worker that returned is scored by `worker_reward` against the workers of the same
    question with the SAME sub-query in the other G - 1 structures (largest pairs are forked
    first, so most sub-queries recur G times): (r - mean) / max(std, std_floor), 0 for a worker
    whose sub-query no other structure asked. The organizer's answer is checked by the shared
    reward; the workers' arithmetic gets a signal of its own, ~7 per structure instead of 1.

    Worked example, G = 2 structures, both fork "12 8 of ..." (worker rewards +1 and -1: one
    returned 12+8-1, the other 12+8+1) and one forks "9 3 of ..." alone: advantages +1 and -1
    for the two (mean 0, std 1), 0 for the third."""
    out = [[adv] * len(ep.threads) for ep, adv in zip(episodes, advs)]
    if credit == "shared":
        return out
    if credit == "copy":
        return copy_advantages(episodes, records, out, group, tok)
    for g in range(0, len(episodes), group):
        by_query = {}  # sub-query ids -> [(episode, thread index, reward)]
        for e in range(g, min(g + group, len(episodes))):
            ep = episodes[e]
            if ep.row["task"] != "countdown":
                continue
            for j, th in enumerate(ep.threads):
                r = worker_reward(th, ep.row, tok) if th.role == "worker" and th.tool is None else None
                if r is not None:
                    by_query.setdefault(tuple(th.prompt), []).append((e, j, r))
        for members in by_query.values():
            rs = torch.tensor([r for _, _, r in members], dtype=torch.float64)
            a = (rs - rs.mean()) / rs.std(unbiased=False).clamp(min=std_floor)
            for (e, j, _), value in zip(members, a.tolist()):
                out[e][j] = value
    return out


def copy_advantages(episodes, records, out, group, tok):
    """credit 'copy': every thread keeps the structure's advantage, and each organizer's tokens
    also get the rank of its copy_score among the valid structures of its question,
    (s - mean) / max(std, 1): the organizer is paid for delivering what came back, apart from
    the workers' luck in finding it. Scores are whole answers, so a spread below one answer is
    not blown up.

    Worked example, G = 4, copy scores 0, 0, -1 and None (a format error): mean -1/3, std 0.47
    -> floored at 1 -> the organizers get +0.33, +0.33, -0.67 and 0 added to their advantage."""
    for g in range(0, len(episodes), group):
        members = [(e, s) for e in range(g, min(g + group, len(episodes)))
                   if (s := copy_score(episodes[e], records[e], tok)) is not None]
        if len(members) < 2:
            continue
        ss = torch.tensor([s for _, s in members], dtype=torch.float64)
        ranks = (ss - ss.mean()) / ss.std(unbiased=False).clamp(min=1.0)
        for (e, _), value in zip(members, ranks.tolist()):
            out[e][0] += value
    return out


# -----------------------------------------------------------------------------
# Batches of threads, packed (model.pack), and the policy loss

def thread_batches(episodes, advs, max_tokens):
    """Every thread with a non-zero advantage, packed into micro-batches: x (B, T) input ids;
    y (B, T) target ids, -1 where there is no loss (prompt, injected, padding); old (B, T) the
    rollout's log-probs; adv (B, T) the thread's advantage at each of its tokens; segments
    (B, T) (see model.pack). advs: one advantage per episode (every thread shares it), or a list per
    episode with one per thread (thread_advantages)."""
    seqs = []
    for ep, adv in zip(episodes, advs):
        per_thread = adv if isinstance(adv, list) else [adv] * len(ep.threads)
        for th, a in zip(ep.threads, per_thread):
            if th.generated == 0 or a == 0.0:
                continue
            ids = th.prompt + th.out
            gen = [False] * len(th.prompt) + [not inj for inj in th.injected]
            old = [0.0] * len(th.prompt) + th.logprobs
            y = [t if g else -1 for t, g in zip(ids[1:], gen[1:])]
            seqs.append((ids[:-1], y, old[1:], [a] * (len(ids) - 1)))
    return pack(seqs, max_tokens, (0, -1, 0.0, 0.0)) if seqs else []


def target_logprobs(logits, y, temperature=1.0):
    """log p(y_t) at every position (B, T) under softmax(logits / temperature), logits (B, T, V);
    -1 targets read token 0."""
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp_all.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def policy_loss(logits, y, old, adv, clip_eps, ref_logp=None, temperature=1.0):
    """Clipped surrogate summed over generated tokens (divide by their count outside), and
    statistics: summed KL (k3 estimator, to the reference model whose target_logprobs are
    ref_logp: they do not change between inner updates, so they are computed once), clipped
    count, entropy. Everything scores the sampled policy softmax(logits / temperature)."""
    mask = y != -1
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    ratio = torch.exp((logp - old).masked_fill(~mask, 0.0))  # masked positions: ratio 1, never inf
    a = (adv[:, None] if adv.dim() == 1 else adv).to(logp.dtype)  # one per row (B,) or per token (B, T)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    loss = -(surrogate * mask).sum()
    stats = {"clipped": ((ratio - 1).abs() > clip_eps)[mask].sum().item(),
             "entropy": -(logp_all.exp() * logp_all).sum(-1)[mask].sum().item()}
    kl = torch.zeros((), device=logits.device)
    if ref_logp is not None:
        # masked positions get a log-ratio of 0 BEFORE exp: exp(big) * 0 would be inf * 0 = NaN
        log_r = (ref_logp - logp).masked_fill(~mask, 0.0)
        kl = (torch.exp(log_r) - log_r - 1).sum()
    return loss, kl, stats


def run_config(cfg, **kw):
    """The executor's RunConfig for a training config (train.TrainConfig): its mode, capacity,
    token limits, tools, stated capacity and depth (async only); kw sets or overrides the rest
    (temperature, seed...)."""
    run = {**dict(mode=cfg.mode, capacity=cfg.capacity, max_organizer_tokens=cfg.max_organizer_tokens,
                  max_worker_tokens=cfg.max_worker_tokens, tools=P.parse_tools(cfg.tools),
                  state_capacity=bool(cfg.capacities)), **kw}
    run.setdefault("depth", cfg.depth if run["mode"] == "async" else 1)
    return E.RunConfig(**run)


def rollout(model, tok, cfg, rows, seed):
    """G structures per question with the batched executor; rows are already grouped."""
    run = run_config(cfg, temperature=cfg.temperature, seed=seed, batch_episodes=len(rows))
    episodes = E.Executor(model, tok, run).run(rows)
    return episodes, [A.record(ep, tok, run) for ep in episodes]
