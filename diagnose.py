"""
Where does a countdown model go wrong? Teacher-forced next-token accuracy, by kind of token.

A trained model fails an episode when one token of it is wrong: a digit of a distance, a number
copied into the answer. Sampling whole episodes says THAT it fails; this says WHERE. We feed the
solver-written async traces of fresh validation puzzles to the model (teacher forcing: every
prefix is the correct one) and ask, at each trained token, whether its most likely next token is
the right one. Tokens are grouped by what writing them takes:

    wrk op result         12+9=|21          arithmetic on the pair (a small table)
    wrk distance          ... 30-21=|9      target minus value (a large table)
    wrk scan              ...: 9-2=|7 9-|3  the scan: subtractions, next number, verdict
    wrk lists / copies    below |2 3 4 5    copying numbers the worker was given
    org tally / answer    ok |12+9+4+5, ... copying expressions the organizer was handed
    spaces, structure     everything that follows from the format alone
    copy drill            -> |12+9+4+5, ... a list copied from the prompt, nothing else to do

    python diagnose.py --ckpt runs/countdown-async/sft.pt          # 40 puzzles, ~20 s on a CPU

Whole episodes, sampled by the model itself, fail where teacher forcing never looks: a wrong
number early sends the rest of the thread off its path. `--episodes` reads what `asyncthink.py
solve` wrote and follows each answer from the worker that found it to the organizer's <ANSWER>:

    python diagnose.py --episodes runs/answers.jsonl   # no model needed, instant

    episodes with a valid format        87 of 100
    expressions the workers returned    439, of them correct 102 (23%)
    episodes whose workers found k      3   (distinct correct returns >= k: all-correct is possible)
    answers the organizer wrote         344, exact copies of a returned one 26 (8%), correct 15
    episodes all correct                0
    equations the threads wrote         4926, wrong 783 (16%), of them off by one 492 (63%)
    wrong expressions the threads found ("-> ..."), by the first false claim of their attempt:
          129  distance wrong
           88  claimed scan ok, not left
           42  claimed have, not left
           29  first step wrong
           ...

(an example output: read it as "the workers rarely find k answers, the organizer rarely copies
what they found, and a wrong find starts most often at a distance"; BENCHMARKS.md keeps the runs).
Then the organizer's running list: how often each tally and the answer copy the list before them
exactly, by its length ("3 items   tally 150 of 308 (49%)   answer 12 of 56 (21%)"), and for the
wrong copies the run of tokens it takes to tell the right item from the one copied ("4 tokens 59":
a head that matches three tokens cannot; see copy_confusions).
Last, every async worker's text is compared with the one the solver writes for its sub-query,
and the first token where they part is named by kind (a distance result, a verdict, a copy).
"""

import json
import random
import re
import sys
from collections import Counter, defaultdict

import torch

import asyncthink as A
import cli
import protocol as P
import tasks
import traces

H = r"\d+[-+*/]\d+=\d+"  # the head of an attempt: "12+9=21"


def kind_of(role, line, token):
    """The kind of `token`, written after `line` (the text of its thread's current line)."""
    if token.isspace():
        return "spaces"
    if role == "organizer":
        if "<ANSWER>" in line:
            return "org answer copy"
        if re.search(r"</JOIN-\d+> ok", line):
            return "org tally copy"
        if re.search(r"</JOIN-\d+> ?$", line):
            return "org tally verdict (ok/no)"
        if re.search(r"<FORK-\d+>[^<]*$", line):
            return "org sub-query copy"
        return "org structure"
    if line.startswith(("below", "rest")):
        return "wrk lists"
    if line.startswith("->") or "<RETURN>" in line:
        return "wrk expression copy"
    if re.fullmatch(r"\d+[-+*/]\d+=", line):
        return "wrk op result"
    if re.fullmatch(H + r" \d+-\d+=", line):
        return "wrk distance result"
    if re.fullmatch(H + r" (\d+-)?", line):
        return "wrk distance operands (or ok)"
    if re.search(r":.*\d+-\d+=$", line):
        return "wrk scan subtraction"
    if re.search(r":.*\d+-$", line):
        return "wrk scan next number"
    if re.search(r": (.* )?$", line):
        return "wrk scan verdict or distance copy"
    return "wrk structure"


@torch.no_grad()
def diagnose(model, tok, preset="small", n=40, seed=777, capacity=4):
    """{kind: [tokens, correct]} over the threads of n fresh async traces (no structure hints)."""
    model.eval()
    rng, drill_rng = random.Random(seed), random.Random(seed + 1)
    stats = defaultdict(lambda: [0, 0])
    for _ in range(n):
        row = tasks.make_countdown(tasks.COUNTDOWN_PRESETS[preset], rng, split="val")
        trace = traces.make_trace(row, "async", rng, capacity, hint_share=0.0)
        for t_idx, (ids, mask) in enumerate(trace.sequences(tok)):
            ids, mask = ids[:model.config.block_size + 1], mask[:model.config.block_size + 1]
            pred = model(torch.tensor([ids[:-1]]))[0].argmax(-1).tolist()
            role = "organizer" if t_idx == 0 else "worker"
            start = mask.index(True) if role == "worker" else 0  # a worker's lines start after its prompt
            for t in range(1, len(ids)):
                if not mask[t]:
                    continue
                line = tok.decode(ids[start:t]).split("\n")[-1]
                s = stats[kind_of(role, line, tok.decode([ids[t]]))]
                s[0] += 1
                s[1] += pred[t - 1] == ids[t]
        # the copy skill alone: a copy drill (traces.copy_drill) of this puzzle's numbers, drawn
        # from its own generator so the traces stay those of earlier tables
        ids, mask = traces.encode(traces.copy_drill(row["numbers"], drill_rng), tok)
        pred = model(torch.tensor([ids[:-1]]))[0].argmax(-1).tolist()
        s = stats["copy drill (pure copying)"]
        for t in range(1, len(ids)):
            if mask[t] and not tok.decode([ids[t]]).isspace():
                s[0] += 1
                s[1] += pred[t - 1] == ids[t]
    return dict(stats)


@torch.no_grad()
def copy_attention(model, tok, preset="small", n=40, seed=777):
    """(n_layer, n_head): how much of each head's attention, while the model writes a copy,
    lands on the source of what it copies. In a copy drill "copy L\n-> L\n" the two L's are D
    tokens apart: the copied token t first occurred at t - D, and the token to write next sits
    at t - D + 1. A head that copies attends there, or one token either side (a neighbour can
    carry the same token, moved by an earlier head); we add up those three keys. Near 1: the
    head is a copy (induction) head. Near 0 everywhere: the model guesses copied numbers."""
    model.eval()
    rng = random.Random(seed)
    total, count = 0, 0
    for _ in range(n):
        row = tasks.make_countdown(tasks.COUNTDOWN_PRESETS[preset], rng, split="val")
        ids, mask = traces.encode(traces.copy_drill(row["numbers"], rng), tok)
        source = len(tok.encode("copy "))               # where the list starts, and its copy
        copy = mask.index(True) + len(tok.encode("-> "))
        D = copy - source
        queries = torch.arange(copy, len(ids) - 2)      # copied tokens, but the last
        weights = []
        hook = lambda mod, inp, out: weights.append(attention_weights(mod, *inp[:2]))
        handles = [b.attn.register_forward_hook(hook) for b in model.transformer.h]
        model(torch.tensor([ids]))
        for h in handles:
            h.remove()
        w = torch.stack(weights)[:, 0]                  # (n_layer, n_head, T, T)
        total = total + sum(w[:, :, queries, queries - D + o].sum(-1) for o in (0, 1, 2))
        count += len(queries)
    return total / count


def attention_weights(attn, x, pos):
    """The (B, nh, T, T) causal attention weights of one attention layer, recomputed."""
    q, k, _ = (t.transpose(1, 2) for t in attn.qkv(x, pos))
    T = q.size(2)
    scores = (q @ k.transpose(-1, -2)) / q.size(-1) ** 0.5
    return scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


RETURNED = re.compile(r"<RETURN>(.*?)</RETURN>", re.S)
EQUATION = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")  # "30-21=9", anywhere in a thread


def wrong_find_cause(attempt, numbers, target):
    """Why a thread's "-> expression" line, found wrong by the verifier, is wrong: the first
    false claim in the attempt line above it, checked step by step like the trace writes it.

    >>> wrong_find_cause("12+8=21 30-21=9: have ok", [2, 3, 8, 9, 12], 30)
    'first step wrong'
    >>> wrong_find_cause("12+8=20 30-20=11: 11-2=9 ok", [2, 3, 9, 8, 12], 30)
    'distance wrong'
    >>> wrong_find_cause("12+8=20 30-20=10: have ok", [2, 3, 8, 9, 12], 30)
    'claimed have, not left'
    >>> wrong_find_cause("12*3=36 36-30=6: 6-2=4 ok", [2, 3, 5, 12], 30)
    'claimed scan ok, not left'
    """
    m = re.match(r"(\d+)([-+*/])(\d+)=(\d+)(.*)", attempt)
    if not m:
        return "no attempt above"
    a, op, b, v, tail = int(m[1]), m[2], int(m[3]), int(m[4]), m[5]
    if traces.apply(a, op, b) != v:
        return "first step wrong"
    if tail.strip() == "ok":
        return "claimed v = target" if v != target else "expression copied wrong"
    d = re.match(r" (\d+)-(\d+)=(\d+):(.*)", tail)
    if not d or sorted((int(d[1]), int(d[2]))) != sorted((v, target)) or int(d[3]) != abs(target - v):
        return "distance wrong"
    rest = [x for x in numbers if x not in (a, b)]  # as traces.pair_attempts lists them
    left, dist = (traces.below(b, rest) if op in "+-" else rest), abs(target - v)
    if "have" in d[4]:
        return "claimed have, not left" if dist not in left else "expression copied wrong"
    scans = re.findall(r"(\d+)-(\d+)=(\d+)", d[4])
    if any(int(x) - int(y) != int(z) for x, y, z in scans):
        return "scan subtraction wrong"
    if not scans or int(scans[-1][1]) not in left or int(scans[-1][2]) not in left:
        return "claimed scan ok, not left"
    return "expression copied wrong"


def episode_funnel(records):
    """Follow the answers of solved countdown episodes (asyncthink.py solve's JSONL records) from
    the workers to the <ANSWER>: a Counter {what: count}, summed over the episodes.
    Workers' expressions are what they put in <RETURN>; a sequential thinker has no workers,
    so its own "-> expression" lines stand in for them."""
    f = Counter()
    for r in records:
        f["episodes"] += 1
        if r["format_errors"]:
            continue
        f["valid format"] += 1
        if r["trace"]["workers"]:
            found = [e for text in r["trace"]["workers"].values() for m in RETURNED.findall(text)
                     for e in P.parse_answer(m, "countdown") or []]
        else:
            found = re.findall(r"^-> (.+)$", r["trace"]["organizer"], re.M)
        correct = [e for e in found if tasks.check_countdown(e, r["numbers"], r["target"]) is None]
        f["returned"] += len(found)
        f["returned correct"] += len(correct)
        f["workers found k"] += len({tasks.canonical(e) for e in correct}) >= r["k"]
        f["answers"] += len(r["answers"])
        f["answers copied exactly"] += sum(a in found for a in r["answers"])
        f["answers correct"] += r["n_correct"]
        f["all correct"] += bool(r["correct"])
        thinking = r["trace"]["workers"].values() or [r["trace"]["organizer"]]
        for lines in (text.split("\n") for text in thinking):
            for above, line in zip([""] + lines, lines):
                if line.startswith("-> ") and tasks.check_countdown(line[3:], r["numbers"], r["target"]):
                    f["wrong: " + wrong_find_cause(above, r["numbers"], r["target"])] += 1
        for a, op, b, v in (m for text in thinking for m in EQUATION.findall(text)):
            a, b, v = int(a), int(b), int(v)
            true = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
            f["equations"] += 1
            f["equations wrong"] += v != true
            f["equations off by 1"] += true is not None and abs(v - true) == 1
    return f


SUB_QUERY = re.compile(r"(\d+) (\d+) of ([\d ]+) to (\d+)")  # "12 9 of 2 3 4 5 9 12 to 30"


def worker_divergence(records, tok):
    """Where sampled workers first leave the solver's text: each async worker's text is rebuilt
    by traces.pair_attempts from its own sub-query, and the kind (kind_of) of the first token
    where the two differ is counted. A Counter: "workers", "sub-query invalid" (not a pair of
    the puzzle's numbers, or the numbers miscopied), "exact", and "first off: <kind>"."""
    f = Counter()
    for r in records:
        for i, text in r["trace"]["workers"].items():
            f["workers"] += 1
            fork = re.search(rf"<FORK-{i}>(.*?)</FORK-{i}>", r["trace"]["organizer"])
            q = fork and SUB_QUERY.fullmatch(fork[1])
            a, b = (int(q[1]), int(q[2])) if q else (0, 0)
            if not q or q[3].split() != [str(x) for x in r["numbers"]] or int(q[4]) != r["target"] \
                    or a == b or a not in r["numbers"] or b not in r["numbers"]:
                f["sub-query invalid"] += 1
                continue
            body, found = traces.pair_attempts(a, b, r["numbers"], r["target"])
            ref = tok.encode(f"{body}\n{P.RETURN}{P.ANSWER_SEPARATOR.join(found) or 'none'}{P.RETURN_END}")
            out = tok.encode(text)
            k = next((j for j, (x, y) in enumerate(zip(out, ref)) if x != y), min(len(out), len(ref)))
            if k == len(ref):
                f["exact"] += 1
                continue
            line = tok.decode(ref[:k]).split("\n")[-1]
            f["first off: " + kind_of("worker", line, tok.decode(ref[k:k + 1]))] += 1
    return f


TALLY = re.compile(r"</JOIN-\d+> ok (.*)\n")  # "<JOIN-3>12+5+2</JOIN-3> ok 12+8-1, 12+5+2"
ANSWERED = re.compile(r"<ANSWER>(.*?)</ANSWER>", re.S)


def list_copies(records):
    """How faithfully the organizer copies its running list (traces.tally): every "ok" tally
    starts with a copy of the list before it, and the answer copies the last one. A Counter of
    ("tally" | "answer", items in the list copied) -> [copies, exact copies]. Copying the list
    ["12+8-1", "12+5+2"] into "ok 12+8-1, 12+5+2, 12*2-5" is one exact 2-item tally copy."""
    f = defaultdict(lambda: [0, 0])
    for r in records:
        if r["format_errors"] or r.get("mode") != "async":
            continue
        org = r["trace"]["organizer"]
        lists = [m.split(P.ANSWER_SEPARATOR) for m in TALLY.findall(org)]
        for before, now in zip(lists, lists[1:]):
            f["tally", len(before)][0] += 1
            f["tally", len(before)][1] += now[:len(before)] == before
        answer = ANSWERED.search(org)
        if lists and answer:
            f["answer", len(lists[-1])][0] += 1
            f["answer", len(lists[-1])][1] += answer[1].split(P.ANSWER_SEPARATOR) == lists[-1]
    return f


def copy_confusions(records, tok):
    """Why a copy of the organizer's list goes wrong: does the wrong token follow the same tokens
    somewhere else in the list? A Counter of n -> wrong copies, n being the shortest run of tokens
    before the first wrong one that nowhere else in the list comes before the wrong token. Copying
    "A12+8-1, B12+7" as "A12+8-1, B12+8", the wrong token is the last "8": "+" comes before an 8
    in "A12+8", so does "12 +", but "B 12 +" does not: n = 3. A copying head that matches m tokens
    (the current one and m - 1 before it, through the model's smear: model.GPT.embed) can make
    this mistake when n > m, and needs another cause when n <= m (the 8 of "A12-8" copied as
    "A12+8" has n = 1: no "12" comes before a "+"). n = 99: no run tells them apart. Copies cut
    short (a prefix of the list) are not counted."""
    f = Counter()
    for r in records:
        if r["format_errors"] or r.get("mode") != "async":
            continue
        org = r["trace"]["organizer"]
        lists = TALLY.findall(org)
        answer = ANSWERED.search(org)
        copies = list(zip(lists, lists[1:])) + ([(lists[-1], answer[1])] if lists and answer else [])
        for before, now in copies:
            src, copy = tok.encode(before), tok.encode(now)
            i = next((j for j in range(min(len(src), len(copy))) if src[j] != copy[j]), None)
            if i is None:
                continue  # exact, or cut short
            follows = lambda n: any(j != i and src[j - n:j] == src[i - n:i] and src[j] == copy[i]
                                    for j in range(n, len(src)))
            f[next((n for n in range(1, i + 1) if not follows(n)), 99)] += 1
    return f


def confusions_table(f):
    shown = ", ".join(f"{n} {'tokens' if n > 1 else 'token'} {f[n]}" for n in sorted(f) if n < 99)
    return (f"wrong list copies ({sum(f.values())}), by the run of tokens before the wrong one that "
            f"tells its item apart: {shown}" + (f", none {f[99]}" if f[99] else ""))


def copies_table(f):
    cell = lambda key: f"{f[key][1]} of {f[key][0]} ({100 * f[key][1] / f[key][0]:.0f}%)" if f[key][0] else "-"
    sizes = sorted({n for _, n in f})
    return "\n".join(["the organizer's list copied exactly, by its items (into the next tally / the answer):",
                      *(f"    {n:2d} items   tally {cell(('tally', n)):18s}  answer {cell(('answer', n))}"
                        for n in sizes)])


def funnel_table(f):
    share = lambda a, b: f"{100 * f[a] / max(1, f[b]):.0f}%"
    return "\n".join([
        f"episodes with a valid format        {f['valid format']} of {f['episodes']}",
        f"expressions the workers returned    {f['returned']}, of them correct "
        f"{f['returned correct']} ({share('returned correct', 'returned')})",
        f"episodes whose workers found k      {f['workers found k']}   "
        "(distinct correct returns >= k: all-correct is possible)",
        f"answers the organizer wrote         {f['answers']}, exact copies of a returned one "
        f"{f['answers copied exactly']} ({share('answers copied exactly', 'answers')}), "
        f"correct {f['answers correct']}",
        f"episodes all correct                {f['all correct']}",
        f"equations the threads wrote         {f['equations']}, wrong {f['equations wrong']} "
        f"({share('equations wrong', 'equations')}), of them off by one "
        f"{f['equations off by 1']} ({share('equations off by 1', 'equations wrong')})",
        "wrong expressions the threads found (\"-> ...\"), by the first false claim of their attempt:",
        *(f"    {n:5d}  {key[len('wrong: '):]}" for key, n in f.most_common() if key.startswith("wrong: "))])


def divergence_table(f):
    checked = f["workers"] - f["sub-query invalid"]
    return "\n".join([
        f"workers                             {f['workers']}, with a valid sub-query {checked}, "
        f"writing the solver's text exactly {f['exact']}",
        "where the others first leave it (the kind of the solver's token there):",
        *(f"    {n:5d}  {key[len('first off: '):]}" for key, n in f.most_common() if key.startswith("first off: "))])


def table(stats):
    """A markdown table, the kinds with the most errors first."""
    errors = sum(n - c for n, c in stats.values()) or 1
    lines = ["| kind of token | tokens | accuracy | share of all errors |", "|---|---|---|---|"]
    for kind, (n, c) in sorted(stats.items(), key=lambda kv: kv[1][1] - kv[1][0]):
        lines.append(f"| {kind} | {n} | {100 * c / n:.1f}% | {100 * (n - c) / errors:.0f}% |")
    return "\n".join(lines)


def main(argv=None):
    ap = cli.ArgumentParser(description="Where a countdown model goes wrong: teacher-forced accuracy "
                                 "by kind of token (--ckpt), or whole solved episodes (--episodes).")
    ap.add_argument("--ckpt", help="a checkpoint written by train.py")
    ap.add_argument("--episodes", help="instead: the JSONL asyncthink.py solve wrote (countdown)")
    ap.add_argument("--preset", choices=sorted(tasks.COUNTDOWN_PRESETS), default="small")
    ap.add_argument("--n", type=int, default=40, help="validation puzzles")
    ap.add_argument("--seed", type=int, default=777)
    args = ap.parse_args(argv)
    if args.n <= 0:
        ap.error("--n must be positive")
    if args.episodes:
        try:
            with open(args.episodes) as fh:
                records = [json.loads(line) for line in fh if line.strip()]
            countdown = [r for r in records if r.get("task") == "countdown"]
            tables = [funnel_table(episode_funnel(countdown)),
                      copies_table(list_copies(countdown)),
                      confusions_table(copy_confusions(countdown, P.Tokenizer.numbers())),
                      divergence_table(worker_divergence(countdown, P.Tokenizer.numbers()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return cli.fail("diagnose.py", f"{args.episodes} is not a file asyncthink.py solve wrote "
                                           f"({type(e).__name__}: {e})")
        print("\n".join(tables))  # outside the try: a closed pipe (| head) is not a bad file
        return 0
    if not args.ckpt:
        ap.error("give --ckpt (a checkpoint) or --episodes (a solve output)")
    try:
        model, tok = A.load_model(args.ckpt)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        return cli.fail("diagnose.py", e)
    print(table(diagnose(model, tok, args.preset, args.n, args.seed)))
    scores = copy_attention(model, tok, args.preset, args.n, args.seed)
    print("\ncopy attention per head: the share of its attention on the source of a copy "
          "(copy drills; near 1 = a copy head)")
    for layer, row in enumerate(scores.tolist()):
        print(f"layer {layer}: " + "  ".join(f"{s:.2f}" for s in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
