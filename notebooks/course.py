"""
Small helpers the course notebooks share: drawing a timeline, running train.py, reading metrics.

Nothing here is part of the method; the notebooks call the project's own modules for that.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder
QUICK = os.environ.get("ASYNCTHINK_QUICK") == "1"  # CI: fewer steps, smaller sizes


def gantt(spans, title, ax=None):
    """Draw who decoded when. `spans` is protocol.timeline(...) (Span objects) or the executor's
    record["trace"]["timeline"] (dicts with the same fields; `thread` instead of `name`).

    A thread decodes its token of step s in the cell (s-1, s]: solid bars. Between its first and
    its last decode the organizer may wait on a join: a hatched band. Arrows: a fork (organizer ->
    worker, at the step its </FORK-i> was decoded) and a join (worker -> organizer, at the step the
    organizer got the takeaway)."""
    import matplotlib.pyplot as plt
    rows = [dict(name=getattr(s, "name", None) or s["thread"],
                 **{k: (getattr(s, k) if not isinstance(s, dict) else s[k])
                    for k in ("fork_step", "finish", "join_step", "active")}) for s in spans]
    y = {r["name"]: len(rows) - 1 - j for j, r in enumerate(rows)}  # organizer on top
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.7 * len(rows) + 1.4))
    for r in rows:
        color = "tab:blue" if r["name"] == "organizer" else "tab:orange"
        start = r["active"][0][0] - 1 if r["active"] else r["fork_step"]  # alive from here to finish
        if r["finish"] and r["finish"] > start:
            ax.broken_barh([(start, r["finish"] - start)], (y[r["name"]] - 0.15, 0.3),
                           facecolors="none", edgecolors="grey", hatch="///", linewidth=0)
        ax.broken_barh([(a - 1, b - a + 1) for a, b in r["active"]], (y[r["name"]] - 0.3, 0.6),
                       facecolors=color)
        if r["name"] == "organizer":
            continue
        parent = r["name"].rsplit(".", 1)[0] if "." in r["name"] else "organizer"
        arrow = dict(arrowstyle="->", lw=1.5)
        ax.annotate("", xy=(r["fork_step"], y[r["name"]] + 0.3), xytext=(r["fork_step"], y[parent] - 0.3),
                    arrowprops={**arrow, "color": "green"})
        if r["join_step"] is not None:
            ax.annotate("", xy=(r["join_step"], y[parent] - 0.3), xytext=(r["join_step"], y[r["name"]] + 0.3),
                        arrowprops={**arrow, "color": "red"})
    ax.set_yticks(list(y.values()), list(y.keys()))
    ax.set_ylim(-0.6, len(rows) - 0.4)
    end = max((r["finish"] or 0) for r in rows)
    ax.set_xlim(0, end + 1)
    ax.set_xlabel("decode step (global clock, one token per thread per step)")
    ax.set_ylabel("thread")
    ax.set_title(title)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color="tab:blue", label="organizer decodes"),
                       Patch(color="tab:orange", label="worker decodes"),
                       Patch(facecolor="none", edgecolor="grey", hatch="///", label="waiting on a join"),
                       Line2D([], [], color="green", marker=">", label="fork"),
                       Line2D([], [], color="red", marker=">", label="join")],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return ax


def train(*args, echo=3):
    """Run `python train.py ARGS` (the command a user types) from the project's folder; print the
    last `echo` lines it wrote. Raises if it fails, with its error output."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"train.py failed ({r.returncode}):\n{r.stderr[-2000:]}")
    print("$ python train.py " + " ".join(map(str, args)))
    for line in r.stdout.strip().splitlines()[-echo:]:
        print(line)
    return r


def metrics(run_dir, stage=None):
    """The rows of run_dir/metrics.jsonl (one per training step), optionally of one stage."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if stage is None or r.get("stage") == stage]
