"""
Is model B better than model A? A paired comparison of two `asyncthink.py solve` outputs.

Two models that each score "40% all-correct" on 100 puzzles may differ by 10 points on the next
100: a percentage of n puzzles carries about +-1/sqrt(n) of noise (+-10 points at n = 100, 95%).
Running both models on the SAME puzzles and looking at the difference per puzzle removes most of
it, because most puzzles are easy or hard for both. This file pairs the rows of two outputs by
puzzle and reports, for every metric, A's mean, B's mean, the mean difference B - A and its 95%
interval from a paired bootstrap (resample puzzles with replacement, recompute the mean
difference, take the 2.5th and 97.5th percentiles). For the yes/no metrics it adds McNemar's
exact test, which reads only the discordant puzzles:

    puzzles solved by B only: 9, by A only: 2   ->   under "no difference" each discordant
    puzzle is a fair coin, so p = P(|heads - 5.5| >= 3.5 of 11 flips) = 2 * P(X <= 2) = 0.065

A claim that B helps needs the interval of B - A above zero (and p < 0.05), on >= 500 fresh
test puzzles; BENCHMARKS.md records each such claim with the command that printed it:

    python asyncthink.py compare runs/sft.jsonl runs/rl.jsonl
"""

import math

import numpy as np

import cli
import tasks

BINARY = ["all", "ge1", "ge2", "ge3", "format_error"]   # yes/no per puzzle: McNemar applies
MEANS = ["latency", "eta", "tokens"]
RECORD_KEYS = ("correct", "n_correct", "format_errors", "latency", "concurrency", "tokens")


def per_puzzle(row, k):
    """The metrics of one record (an output row of `solve`), as numbers."""
    m = {"all": float(row["correct"]), "format_error": float(bool(row["format_errors"])),
         "latency": float(row["latency"]), "eta": float(row["concurrency"]), "tokens": float(row["tokens"])}
    for j in range(1, k + 1):
        m[f"ge{j}"] = float(row["n_correct"] >= j)
    return m


def pair(a_rows, b_rows):
    """Rows of A and B with the same puzzle, in A's order: (a_pairs, b_pairs, only_a, only_b)."""
    def by_key(rows, name):
        out = {}
        for r in rows:
            key = tasks.puzzle_key(r)
            if key in out:
                raise ValueError(f"{name} holds the puzzle {key!r} twice (several modes in one file?): "
                                 f"compare outputs of one `solve` each")
            out[key] = r
        return out
    a, b = by_key(a_rows, "A"), by_key(b_rows, "B")
    common = [key for key in a if key in b]
    return [a[k] for k in common], [b[k] for k in common], len(a) - len(common), len(b) - len(common)


def mcnemar(b_only, a_only):
    """Exact two-sided McNemar p-value: the discordant pairs as fair coin flips.

    >>> round(mcnemar(9, 2), 4)
    0.0654
    >>> mcnemar(0, 0)
    1.0
    """
    n, m = b_only + a_only, min(b_only, a_only)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(m + 1)) / 2 ** n)


def bootstrap_interval(diff, n_boot=10_000, seed=0):
    """95% interval of mean(diff) from a paired bootstrap over puzzles (diff: (n,) array)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(a_rows, b_rows, n_boot=10_000, seed=0):
    """{metric: dict(a, b, diff, low, high[, a_only, b_only, p])} over the paired puzzles."""
    a_rows, b_rows, only_a, only_b = pair(a_rows, b_rows)
    if not a_rows:
        raise ValueError("the two files have no puzzle in common")
    k = max(r.get("k", 1) if r["task"] == "countdown" else 1 for r in a_rows)
    keys = [m for m in BINARY if not m.startswith("ge") or int(m[2:]) <= k] + MEANS
    A = np.array([[per_puzzle(r, k)[m] for m in keys] for r in a_rows])  # (n, metrics)
    B = np.array([[per_puzzle(r, k)[m] for m in keys] for r in b_rows])
    out = {"n": len(a_rows), "only_a": only_a, "only_b": only_b}
    for j, m in enumerate(keys):
        diff = B[:, j] - A[:, j]
        low, high = bootstrap_interval(diff, n_boot, seed)
        res = dict(a=A[:, j].mean(), b=B[:, j].mean(), diff=diff.mean(), low=low, high=high)
        if m in BINARY:
            res["b_only"], res["a_only"] = int((diff > 0).sum()), int((diff < 0).sum())
            res["p"] = mcnemar(res["b_only"], res["a_only"])
        out[m] = res
    return out


NAMES = {"all": "all correct", "ge1": ">=1 correct", "ge2": ">=2 correct", "ge3": ">=3 correct",
         "format_error": "format errors", "latency": "latency", "eta": "eta", "tokens": "tokens"}


def report(result, a_name, b_name):
    """The table `compare` prints: percentages in points for yes/no metrics, plain means else."""
    lines = [f"paired on {result['n']} puzzles  A = {a_name}  B = {b_name}"]
    if result["only_a"] or result["only_b"]:
        lines.append(f"(left out: {result['only_a']} puzzles only in A, {result['only_b']} only in B)")
    lines.append(f"{'metric':<14} {'A':>8} {'B':>8} {'B - A':>8}   95% interval        McNemar")
    for m, name in NAMES.items():
        if m not in result:
            continue
        r, pct = result[m], 100 if m in BINARY else 1
        line = (f"{name:<14} {pct * r['a']:8.1f} {pct * r['b']:8.1f} {pct * r['diff']:+8.1f}   "
                f"[{pct * r['low']:+7.1f}, {pct * r['high']:+7.1f}]")
        if "p" in r:
            line += f"  p={r['p']:.3g} (B only {r['b_only']}, A only {r['a_only']})"
        lines.append(line)
    lines.append("yes/no metrics in % of puzzles (differences in points); an interval above 0 means B is higher")
    return "\n".join(lines)


def main(argv):
    ap = cli.ArgumentParser(prog="asyncthink.py compare",
                                 description="paired comparison of two `solve` outputs on the same puzzles")
    ap.add_argument("a", help="JSONL written by `asyncthink.py solve` (the baseline, e.g. sft.pt's)")
    ap.add_argument("b", help="JSONL written by `asyncthink.py solve` (the candidate, e.g. rl.pt's)")
    ap.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        if args.bootstrap < 100:
            raise ValueError("--bootstrap must be at least 100")
        rows = []
        for path in (args.a, args.b):
            rs = tasks.load_jsonl(path)
            missing = sorted({key for r in rs for key in RECORD_KEYS if key not in r})
            if not rs or missing:
                raise ValueError(f"{path}: not an output of `asyncthink.py solve` "
                                 f"({'empty' if not rs else 'no ' + ', '.join(missing)})")
            rows.append(rs)
        result = compare(*rows, n_boot=args.bootstrap, seed=args.seed)
    except (ValueError, OSError) as e:
        return cli.fail("asyncthink.py compare", e)
    print(report(result, args.a, args.b))
    return 0
