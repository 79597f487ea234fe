"""grpo.py: rewards, advantages and the clipped loss against values computed by hand."""
import math

import pytest
import torch

import asyncthink as A
import executor as E
import grpo


def rec(n_correct, eta, errors=(), task="countdown", k=4):
    return {"task": task, "k": k, "n_correct": n_correct, "concurrency": eta, "format_errors": list(errors)}


def test_reward_defaults_by_hand():
    # the defaults: tau = 0.75, lambda = 0.2, format penalty -0.5 (the module docstring's table)
    assert grpo.reward(rec(4, 2.0), 4).total == pytest.approx(1.0 + 0.2 * 0.5 / 0.75)
    assert grpo.reward(rec(0, 1.6), 4).concurrency == pytest.approx(0.4 / 0.75)
    assert grpo.reward(rec(0, 3.5), 4).concurrency == 1.0          # eta / c = 0.875 is past the cap
    # the SFT model's eta ~2.35 of c = 4 is below the cap: R_eta still grows with eta
    assert grpo.reward(rec(0, 2.4), 4).concurrency > grpo.reward(rec(0, 2.3), 4).concurrency
    assert grpo.reward(rec(4, 2.0, ["unjoined-fork: ..."]), 4).total == -0.5


def test_tool_cost_by_hand():
    # 3 tool calls at 0.05 each: 2 of 4 right at eta 1.5 -> 0.5 + 0.2 * (0.375 / 0.75) - 0.15 = 0.45;
    # a structure with a format error pays the penalty only
    r = grpo.reward({**rec(2, 1.5), "tool_calls": 3}, 4, tool_cost=0.05)
    assert r.total == pytest.approx(0.45) and r.accuracy == 0.5
    assert grpo.reward({**rec(2, 1.5, ["stray-tag: ..."]), "tool_calls": 3}, 4, tool_cost=0.05).total == -0.5


def test_reward_parts_by_hand():
    # tau = 0.5, lambda = 0.2, c = 4 (given explicitly)
    r = grpo.reward(rec(4, 2.0), 4, 0.5, 0.2)
    assert (r.accuracy, r.concurrency, r.format_error) == (1.0, 1.0, False) and r.total == pytest.approx(1.2)
    r = grpo.reward(rec(2, 1.0), 4, 0.5, 0.2)
    assert (r.accuracy, r.concurrency) == (0.5, 0.5) and r.total == pytest.approx(0.6)
    r = grpo.reward(rec(0, 1.6), 4, 0.5, 0.2)
    assert r.concurrency == pytest.approx(0.8) and r.total == pytest.approx(0.16)
    r = grpo.reward(rec(4, 3.9, ["pool-overflow: ..."]), 4, 0.5, 0.2, format_penalty=-1.0)
    assert r.format_error and r.total == -1.0
    r = grpo.reward(rec(7, 1.0), 4, 0.5, 0.0)  # more than k correct still counts k; lambda 0
    assert r.total == 1.0
    sudoku = grpo.reward(rec(1, 1.0, task="sudoku"), 4, 0.5, 0.2)
    assert sudoku.accuracy == 1.0 and sudoku.total == pytest.approx(1.0 + 0.2 * 0.5)


def test_advantages_by_hand():
    rewards = [1.2, 0.6, -1.0, 0.16]
    mean = 0.24
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 4)
    z = grpo.advantages(rewards, 4, "zscore")
    assert z == pytest.approx([(r - mean) / std for r in rewards])
    assert grpo.advantages(rewards, 4, "mean") == pytest.approx([0.96, 0.36, -1.24, -0.08])
    # two groups, the second without variance: zeros, so it is skipped
    assert grpo.advantages([1.0, 0.0, 0.5, 0.5], 2) == pytest.approx([1.0, -1.0, 0.0, 0.0])
    # a group that differs by noise only: std 1e-4 is floored at 0.1, so advantages are +-1e-3,
    # not the +-1 a bare z-score gives
    assert grpo.advantages([0.3001, 0.2999], 2) == pytest.approx([1e-3, -1e-3])
    assert grpo.advantages([0.3001, 0.2999], 2, std_floor=1e-9) == pytest.approx([1.0, -1.0])


def test_skipped_groups_counts_groups_with_every_advantage_zero():
    # group 1 all zero (skipped); group 2 starts with a zero but teaches (not skipped); group 3 skipped
    advs = [0.0, 0.0, 0.0, 0.0, 1.2, -1.2, 0.0, 0.0, 0.0]
    assert grpo.skipped_groups(advs, 3) == pytest.approx(2 / 3)
    assert grpo.skipped_groups([], 3) == 0.0


def test_policy_loss_by_hand():
    # two generated tokens and one masked: logits chosen so log-probs are known exactly
    V = 4
    logits = torch.zeros(1, 3, V)             # uniform: log p = -log 4 for every token
    y = torch.tensor([[2, 1, -1]])
    logp = -math.log(4)
    # token 0: old = logp -> ratio 1; token 1: old = logp - log 2 -> ratio 2 (clipped to 1.2)
    old = torch.tensor([[logp, logp - math.log(2), 0.0]])
    adv = torch.tensor([0.5])
    loss, kl, stats = grpo.policy_loss(logits, y, old, adv, clip_eps=0.2)
    # positive advantage: min(r*A, clip(r)*A) = 0.5*1 and min(2*0.5, 1.2*0.5) = 0.6
    assert loss.item() == pytest.approx(-(0.5 + 0.6))
    assert stats["clipped"] == 1 and stats["entropy"] == pytest.approx(2 * math.log(4))
    # negative advantage: min(2*-0.5, 1.2*-0.5) = -1.0 (the pessimistic side is not clipped)
    loss, _, _ = grpo.policy_loss(logits, y, old, torch.tensor([-0.5]), clip_eps=0.2)
    assert loss.item() == pytest.approx(-(-0.5 - 1.0))
    # KL to a reference equal to the policy is 0
    _, kl, _ = grpo.policy_loss(logits, y, old, adv, 0.2, ref_logp=grpo.target_logprobs(logits, y))
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    # a reference twice as likely on token 0 and half as likely on token 1 (k3 = r - log r - 1,
    # r = p_ref / p): (2 - log 2 - 1) + (0.5 + log 2 - 1) = 0.5; the masked token adds nothing
    ref_logp = torch.tensor([[logp + math.log(2), logp - math.log(2), 5.0]])
    _, kl, _ = grpo.policy_loss(logits, y, old, adv, 0.2, ref_logp=ref_logp)
    assert kl.item() == pytest.approx(0.5)
    # a huge reference log-prob at the masked position: exp(1000) * 0 would be NaN; it adds nothing
    ref_logp[0, 2] = 1000.0
    old[0, 2] = -1000.0  # and a masked old log-prob that would make the ratio overflow
    loss, kl, _ = grpo.policy_loss(logits, y, old, adv, 0.2, ref_logp=ref_logp)
    assert kl.item() == pytest.approx(0.5) and math.isfinite(loss.item())


def test_policy_loss_scores_the_tempered_policy():
    # logits (0, log 3) over 2 tokens: at T = 1, p = (1/4, 3/4); at T = 0.5, softmax(0, 2 log 3)
    # = (1/10, 9/10). Token 1 sampled with its tempered old log-prob: ratio 1, loss -A.
    logits = torch.tensor([[[0.0, math.log(3)]]])
    y, adv = torch.tensor([[1]]), torch.tensor([1.0])
    assert grpo.target_logprobs(logits, y, 0.5).item() == pytest.approx(math.log(0.9))
    loss, _, stats = grpo.policy_loss(logits, y, torch.tensor([[math.log(0.9)]]), adv, 0.2, temperature=0.5)
    assert loss.item() == pytest.approx(-1.0) and stats["clipped"] == 0
    # entropy of the tempered policy (0.1, 0.9)
    assert stats["entropy"] == pytest.approx(-(0.1 * math.log(0.1) + 0.9 * math.log(0.9)))
    # scored untempered against the same record, the ratio would be (3/4) / (9/10) = 5/6: clipped
    loss, _, stats = grpo.policy_loss(logits, y, torch.tensor([[math.log(0.9)]]), adv, 0.1)
    assert loss.item() == pytest.approx(-5 / 6) and stats["clipped"] == 1


def test_first_ratio_is_one_on_real_tempered_rollouts():
    """Rollouts sampled at T = 0.7 by the executor (cached decoding), then the update's full
    forward over the packed threads: the ratio of every generated token is 1 to float precision
    when both score softmax(logits / T), and visibly not 1 if the loss scored T = 1."""
    from test_executor import ROWS, tiny_model, tok
    model = tiny_model()
    cfg = E.RunConfig(mode="async", capacity=4, temperature=0.7, seed=3, max_worker_tokens=40,
                      max_organizer_tokens=60)
    eps = E.Executor(model, tok, cfg).run(ROWS * 8)
    batches = grpo.thread_batches(eps, [1.0] * len(eps), max_tokens=10_000)
    n = 0
    with torch.no_grad():
        for x, y, old, adv, seg in batches:
            mask = y != -1
            logits = model(x, segments=seg)
            new = grpo.target_logprobs(logits, y, 0.7)
            assert torch.allclose(new[mask], old[mask], atol=1e-4)
            assert (grpo.target_logprobs(logits, y, 1.0)[mask] - old[mask]).abs().max() > 1e-2
            n += int(mask.sum())
    assert n > 50


def test_thread_batches_mask_prompts_and_injected_tokens():
    """Every generated token of every thread gets the structure's advantage; prompts,
    injected join results and padding get none; old log-probs line up with targets.
    Oracle: each thread's own record (prompt, out, injected, logprobs), found segment by
    segment in the packed rows."""
    from test_executor import FORK_ALL, ROWS, scripted, tiny_model, tok
    cfg = E.RunConfig(mode="async", capacity=4)
    eps = E.Executor(tiny_model(), tok, cfg).run(ROWS * 2, force=scripted([FORK_ALL]))
    batches = grpo.thread_batches(eps, [0.7, 0.0], max_tokens=10_000)  # 2nd structure skipped
    n_trained = sum(int((y != -1).sum()) for _, y, _, _, _ in batches)
    ep = eps[0]
    assert n_trained == sum(th.generated for th in ep.threads)
    unmatched = [th for th in ep.threads if th.generated]
    for x, y, old, adv, seg in batches:
        for b in range(x.size(0)):
            for s in seg[b].unique().tolist():
                where = seg[b] == s
                if not y[b, where].ne(-1).any():
                    assert adv[b, where].eq(0).all()  # padding
                    continue
                assert adv[b, where].eq(0.7).all()
                row = x[b, where].tolist()
                th = next(t for t in unmatched if row == (t.prompt + t.out)[:-1])
                unmatched.remove(th)
                ys, olds = y[b, where], old[b, where]
                n_prompt = len(th.prompt)
                for k, (inj, lp) in enumerate(zip(th.injected, th.logprobs)):
                    target = ys[n_prompt + k - 1].item()
                    assert (target == -1) == inj
                    if not inj:
                        assert target == th.out[k] and olds[n_prompt + k - 1].item() == pytest.approx(lp)
    assert not unmatched  # every thread is in the batches, once


def test_only_the_first_k_answers_are_scored():
    # numbers 1 2 3 4, target 5, k = 2: a shotgun of five answers, two correct ones past the first k
    row = {"task": "countdown", "numbers": [1, 2, 3, 4], "target": 5, "k": 2}
    assert A.score(row, ["1+4", "1+1", "2+3", "4+1"]) == (1, False)   # "2+3" is third
    assert A.score(row, ["1+4", "2+3", "9", "1+1"]) == (2, True)
    sudoku = {"task": "sudoku", "puzzle": "1234341221434321"}
    assert A.score(sudoku, ["1234341221434321"]) == (1, True)
    assert A.score(sudoku, ["1111111111111111", "1234341221434321"]) == (0, False)  # first grid only
    assert A.score(sudoku, []) == (0, False)


def test_thread_credit_by_hand():
    """credit 'thread': workers with the same sub-query in the G structures of one question are
    ranked by their own verified <RETURN>; the organizer keeps the structure's advantage.
    Puzzle 1..6 -> 3. Structure 0: worker 1 ("a") returns 1+2 (right: +1), worker 2 ("b")
    returns none (0). Structure 1: worker 1 ("a") returns 2+4 (wrong: -1), worker 2 ("b")
    returns 6/2, 1+2 (two right: +2), worker 3 ("c", asked only here) returns 5-2 (+1).
    By hand: "a": rewards +1, -1 -> advantages +1, -1; "b": 0, +2 -> -1, +1; "c": alone -> 0."""
    from test_executor import ANSWER, ROWS, fork, join, scripted, tiny_model, tok, worker_script
    s0 = {0: fork(1, "a") + fork(2, "b") + join(1) + join(2) + ANSWER,
          1: worker_script(2, "1+2"), 2: worker_script(1, "none")}
    s1 = {0: fork(1, "a") + fork(2, "b") + fork(3, "c") + join(1) + join(2) + join(3) + ANSWER,
          1: worker_script(2, "2+4"), 2: worker_script(3, "6/2, 1+2"), 3: worker_script(0, "5-2")}
    cfg = E.RunConfig(mode="async", capacity=4)
    eps = E.Executor(tiny_model(), tok, cfg).run(ROWS * 2, force=scripted([s0, s1]))
    assert [grpo.worker_reward(th, ROWS[0], tok) for th in eps[1].threads[1:]] == [-1.0, 2.0, 1.0]
    # RL's log: of the five expressions returned (1+2 | 2+4, 6/2, 1+2, 5-2) four are right
    assert grpo.worker_precision(eps, tok) == pytest.approx(4 / 5)
    advs = grpo.thread_advantages(eps, [0.5, -0.5], 2, "thread", tok)
    assert advs[0] == pytest.approx([0.5, 1.0, -1.0])
    assert advs[1] == pytest.approx([-0.5, -1.0, 1.0, 0.0])
    assert grpo.thread_advantages(eps, [0.5, -0.5], 2, "shared", tok) == [[0.5] * 3, [-0.5] * 4]
    # the packed batches carry each thread's own advantage; the lone worker (0) is left out
    batches = grpo.thread_batches(eps, advs, max_tokens=10_000)
    got = sorted(round(a, 6) for *_, adv, seg in batches for b in range(seg.size(0))
                 for s in seg[b].unique().tolist() if (a := adv[b][seg[b] == s][0].item()) != 0.0)
    assert got == [-1.0, -1.0, -0.5, 0.5, 1.0, 1.0]


def test_copy_credit_by_hand():
    """credit 'copy': the organizer's answer is checked against what its workers returned.
    Puzzle 1..6 -> 3, k = 2. Structure 0: workers return 1+2 and 6/2 (two right), the answer
    copies both: copy score 2 - 2 = 0. Structure 1: the same returns, the answer mis-copies one
    (1+2, 6/3): 1 - 2 = -1. Structure 2: a worker returns 2+4 (wrong) and none; the answer 1+2
    is the organizer's own find: 1 - 0 = +1. Mean 0, std sqrt(2/3) = 0.816 -> floored at 1: the
    organizers get +0, -1, +1 on top of their shared advantages; workers keep theirs."""
    from test_executor import fork, join, scripted, text, tiny_model, tok, worker_script
    rows = [{"task": "countdown", "numbers": [1, 2, 3, 4, 5, 6], "target": 3, "k": 2}]
    answer = lambda s: [tok.answer] + text(s) + [tok.answer_end]
    org = lambda s: fork(1, "a") + fork(2, "b") + join(1) + join(2) + answer(s)
    s0 = {0: org("1+2, 6/2"), 1: worker_script(2, "1+2"), 2: worker_script(1, "6/2")}
    s1 = {0: org("1+2, 6/3"), 1: worker_script(2, "1+2"), 2: worker_script(1, "6/2")}
    s2 = {0: org("1+2"), 1: worker_script(2, "2+4"), 2: worker_script(1, "none")}
    cfg = E.RunConfig(mode="async", capacity=4)
    eps = E.Executor(tiny_model(), tok, cfg).run(rows * 3, force=scripted([s0, s1, s2]))
    recs = [A.record(ep, tok, cfg) for ep in eps]
    assert [grpo.copy_score(ep, rec, tok) for ep, rec in zip(eps, recs)] == [0.0, -1.0, 1.0]
    advs = grpo.thread_advantages(eps, [0.5, -0.5, 0.0], 3, "copy", tok, records=recs)
    assert advs == [pytest.approx([0.5, 0.5, 0.5]), pytest.approx([-1.5, -0.5, -0.5]),
                    pytest.approx([1.0, 0.0, 0.0])]
    broken = {**recs[0], "format_errors": ["unjoined"]}
    assert grpo.copy_score(eps[0], broken, tok) is None
