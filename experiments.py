"""
The paper's experiment in miniature: sequential vs parallel vs AsyncThink, the ablations,
Sudoku, and a capacity sweep. One command trains every model, evaluates them all on the same
fresh test puzzles, and writes RESULTS.md with its tables and plots (nothing typed by hand).

    python experiments.py                      # CPU default (the cpu recipe), about 100 minutes
    python experiments.py --budget quick       # minutes, tiny models: a smoke test of the pipeline
    python experiments.py --budget gpu --device cuda
    python experiments.py --rewrite-report     # RESULTS.md again from results/results.json, in seconds

What it runs (the paper's tables, ../shared/paper.md, on a model you can train on a laptop):
  1. main table, countdown: one model per thinking mode, same size, same SFT and RL steps;
     sequential and parallel each at two token budgets (the paper's L1K / L2K rows)
  2. ablations of the async model: no concurrency reward, no format SFT, no RL
  3. Sudoku 4x4: the three modes trained on Sudoku, and the countdown async model zero-shot
  4. capacity sweep: the async model run with c = 2, 3, 4, 6, 8 at inference
  5. RL dynamics of the async model, and the timeline of one real async episode

Every trained model lives in results/<name>/ (train.py's run folder, with its log). Training
runs go two at a time by default (--jobs), one per core. A finished model is not trained again
and a half-trained one resumes, so a killed experiment continues where it stopped; delete the
folder to start over.
"""

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import matplotlib.pyplot as plt
import torch

import asyncthink as A
import cli
import executor as E
import protocol as P
import tasks
import train

# Steps per stage, and tally drills per countdown trace (train.py --copy-drills). "cpu" is
# train.py's CPU recipe at a fixed 3500 SFT steps (what the README's seeds were measured at: before
# ~3000 the small model rarely gets all four answers right) and its default 36 RL steps. On 2
# cores, two jobs at a time, the whole run takes about 100 minutes: the parallel model's SFT is the
# long pole (its traces carry ~2.7x the tokens per step: ~1 hour on one core).
BUDGETS = {
    "cpu": dict(preset="cpu", sft_steps=3500, rl_steps=36, sudoku_sft_steps=500, sudoku_rl_steps=4,
                  copy_drills=0, n_test=100, token_budgets=(450, 900), sweep_forks=8),
    "quick": dict(preset="tiny", sft_steps=20, rl_steps=2, sudoku_sft_steps=10, sudoku_rl_steps=1,
                  copy_drills=0, n_test=8, token_budgets=(24, 48), sweep_forks=3),
    "gpu": dict(preset="gpu", sft_steps=3000, rl_steps=200, sudoku_sft_steps=1500, sudoku_rl_steps=100,
                copy_drills=0, n_test=400, token_budgets=(900, 1800), sweep_forks=12),
}
CAPACITIES = (2, 3, 4, 6, 8)

# The paper's numbers (../shared/paper.md), for the tables' last column.
PAPER = {
    "sequential": "88.0 / 83.8 / 80.0 / 70.5",
    "parallel": "97.1 / 92.8 / 86.2 / 68.6",
    "async": "99.5 / 98.8 / 96.8 / 89.0, η/c 64.7%, latency 4525",
    "no R_η": "all 85.3, η/c 61.3%, latency 6251",
    "no format SFT": "all 64.8, η/c 50.0%, latency 3434",
    "no RL": "all 0.0, η/c 49.2%, latency 1988",
    "sudoku sequential": "65.7% / 2056 tokens (zero-shot)",
    "sudoku parallel": "84.2% / 3695 tokens (zero-shot)",
    "sudoku async": "89.4% / 2853 tokens (zero-shot)",
}


# -----------------------------------------------------------------------------
# Training: train.py's stages as subprocesses, several at once, skipped when already done

def finished_steps(ckpt):
    """The step a checkpoint was saved at (0 if there is none)."""
    if not os.path.exists(ckpt):
        return 0
    return torch.load(ckpt, map_location="cpu", weights_only=True).get("step", 0)


def train_job(budget, out, name, stage, task, mode, steps, extra=(), device="cpu"):
    """The train.py command line for one stage into out/name (budget: one of BUDGETS), or None
    when it is done already.
    A stage killed half way has a checkpoint of an earlier step: it is resumed, not restarted."""
    run_dir = os.path.join(out, name)
    done = finished_steps(os.path.join(run_dir, f"{stage}.pt"))
    if done >= steps:
        print(f"[experiments] {name} {stage}: reusing {run_dir}/{stage}.pt ({done} steps)")
        return None
    steps_flag = "--sft-steps" if stage == "sft" else "--rl-steps"
    argv = ["--stage", stage, "--preset", budget["preset"], "--task", task, "--mode", mode,
            "--run-dir", run_dir, steps_flag, str(steps), "--eval-every", "0", "--device", device,
            "--copy-drills", str(budget["copy_drills"]),
            *extra, *(["--resume"] if done else [])]
    return name, stage, argv


class TrainingFailed(Exception):
    """A train.py job exited with an error (its log names it)."""


def run_chains(chains, n_parallel):
    """Run chains of train.py jobs, n_parallel chains at a time (each process with 1/n_parallel of
    the CPU threads). A chain runs in order (an RL stage after the SFT stage it starts from); its
    items are functions that make their job when its turn comes (train_job: None when the stage is
    done already) or do a step of their own. Each job's output goes to its run folder's
    train-<stage>.log. Returns [(name, stage, seconds)]."""
    env = dict(os.environ)
    if n_parallel > 1:  # two 1-thread processes beat one 2-thread process on 2 cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n_parallel))

    def one(job):
        name, stage, argv = job
        log = os.path.join(argv[argv.index("--run-dir") + 1], f"train-{stage}.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        print(f"[experiments] start python train.py {' '.join(argv)}  (log: {log})", flush=True)
        t0 = time.perf_counter()
        with open(log, "a" if "--resume" in argv else "w") as f:  # a resumed stage keeps its first part's log
            code = subprocess.run([sys.executable, "train.py", *argv], stdout=f, stderr=subprocess.STDOUT,
                                  env=env, cwd=os.path.dirname(os.path.abspath(__file__))).returncode
        seconds = time.perf_counter() - t0
        if code != 0:
            raise TrainingFailed(f"{name} {stage} failed (exit {code}); see {log}")
        print(f"[experiments] done {name} {stage} in {seconds / 60:.1f} min", flush=True)
        return name, stage, seconds

    def run_chain(chain):
        jobs = (make() for make in chain)
        return [one(job) for job in jobs if job is not None]

    with ThreadPoolExecutor(max_workers=max(1, n_parallel)) as pool:
        return [timing for timings in pool.map(run_chain, chains) for timing in timings]


# -----------------------------------------------------------------------------
# Evaluation: every model on the same test puzzles

_loaded = {}  # (checkpoint path, its mtime, device) -> (model, tokenizer)


def evaluate(ckpt, rows, mode, capacity=4, organizer_tokens=900, worker_tokens=320,
             temperature=0.0, device="cpu", seed=0):
    """Metrics of one model in one mode on `rows`, and the episode records."""
    key = (ckpt, os.path.getmtime(ckpt), device)  # the capacity sweep evaluates one model 5 times
    if key not in _loaded:
        _loaded[key] = A.load_model(ckpt, device)
    model, tok = _loaded[key]
    run = E.RunConfig(mode=mode, capacity=capacity, temperature=temperature, seed=seed,
                      max_organizer_tokens=organizer_tokens, max_worker_tokens=worker_tokens,
                      batch_episodes=32)
    run.check()
    t0 = time.perf_counter()
    records = A.solve(model, tok, rows, run, progress=True)
    seconds = time.perf_counter() - t0
    m = A.metrics(records)
    row = dict(task=rows[0]["task"], mode=mode, capacity=capacity, n=len(records),
               organizer_tokens=organizer_tokens, worker_tokens=worker_tokens,
               **{key: 100 * v for key, v in m.items() if key.startswith("ge")},
               all_correct=100 * m["all"], latency=m["latency"], eta=m["eta"],
               eta_over_c=100 * m["eta"] / run.pool_capacity(),
               tokens=m["tokens"], format_error_rate=100 * (1 - m["format_ok"]),
               wall_s=sum(r["wall_s"] for r in records) / len(records), seconds=seconds)
    return row, records


# -----------------------------------------------------------------------------
# Plots

def plot_frontier(rows, path):
    """All-correct accuracy against latency, one point per countdown configuration."""
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"sequential": "tab:blue", "parallel": "tab:orange", "async": "tab:green"}
    for r in rows:
        ax.scatter(r["latency"], r["all_correct"], color=colors.get(r["mode"], "gray"), s=40)
        ax.annotate(r["name"], (r["latency"], r["all_correct"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("latency (critical-path decoding steps)")
    ax.set_ylabel("all correct (%)")
    ax.set_title("Countdown: accuracy vs latency (test split)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_capacity(rows, path):
    fig, ax1 = plt.subplots(figsize=(6, 4))
    cs = [r["capacity"] for r in rows]
    ax1.plot(cs, [r["all_correct"] for r in rows], "o-", color="tab:green", label="all correct (%)")
    ax1.plot(cs, [r["ge1"] for r in rows], "s--", color="tab:olive", label="≥1 correct (%)")
    ax1.set_xlabel("capacity c (threads, organizer included)")
    ax1.set_ylabel("accuracy (%)")
    ax2 = ax1.twinx()
    ax2.plot(cs, [r["latency"] for r in rows], "^-", color="tab:red", label="latency")
    ax2.set_ylabel("latency (decoding steps)")
    fig.legend(loc="upper right", fontsize=8)
    ax1.set_title("AsyncThink capacity sweep (inference, countdown test)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rl(metrics_path, path):
    """Reward, accuracy, latency and eta of the async model across RL steps."""
    rows = [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) else []
    rows = [r for r in rows if r.get("stage") == "rl"]
    if not rows:
        return False
    panels = [("reward", "reward"), ("accuracy", "all correct (fraction)"),
              ("latency", "latency (steps)"), ("eta", "concurrency η (threads)")]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, (key, label) in zip(axes, panels):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".")
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.set_title(f"RL: {key}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_timeline(rec, path):
    """A Gantt chart of one episode: a row per thread, bars where it decodes, arrows for
    forks (organizer -> worker) and joins (worker -> organizer)."""
    rows = rec["trace"]["timeline"]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    for y, r in enumerate(rows):
        ax.broken_barh([(a, b - a + 1) for a, b in r["active"]], (y - 0.35, 0.7),
                       color="tab:blue" if y == 0 else "tab:green")
        if y and r["fork_step"] is not None:
            ax.annotate("", (r["fork_step"], y - 0.35), (r["fork_step"], 0.35),
                        arrowprops=dict(arrowstyle="->", color="gray", lw=0.8))
        if y and r["join_step"] is not None:
            ax.annotate("", (r["join_step"], 0.35), (r["finish"] or r["join_step"], y - 0.35),
                        arrowprops=dict(arrowstyle="->", color="tab:red", lw=0.8))
    ax.set_yticks(range(len(rows)), [r["thread"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("decoding step")
    ax.set_title(f"One AsyncThink episode: latency {rec['latency']} steps, η {rec['concurrency']:.2f}, "
                 f"{rec['n_correct']} correct")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# RESULTS.md

def fmt(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


def table(rows):
    head = "| model | mode | c | budget (org/worker) | ≥1 | ≥2 | ≥3 | all | latency | η | η/c | tokens | format err | wall s/ep | paper |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(f"| {r['name']} | {r['mode']} | {r['capacity']} | {r['organizer_tokens']}/{r['worker_tokens']} "
                   f"| {fmt(r.get('ge1'))} | {fmt(r.get('ge2'))} | {fmt(r.get('ge3'))} | {fmt(r['all_correct'])} "
                   f"| {fmt(r['latency'], 0)} | {fmt(r['eta'], 2)} | {fmt(r['eta_over_c'], 0)}% | {fmt(r['tokens'], 0)} "
                   f"| {fmt(r['format_error_rate'])}% | {fmt(r['wall_s'], 2)} | {PAPER.get(r.get('paper', ''), '')} |")
    return "\n".join(out)


def most_accurate(rows, mode):
    """The row of `mode` the headline compares with: most all-correct, ties broken by >=3, >=2,
    >=1 and then fewer format errors, so a tie at 0% all-correct picks the budget that solved
    something, not one whose episodes were mostly cut off at the token limit."""
    return max((r for r in rows if r["mode"] == mode),
               key=lambda r: (r["all_correct"], r.get("ge3") or 0, r.get("ge2") or 0, r.get("ge1") or 0,
                              -r["format_error_rate"]))


def verdict(ours, others, what, higher=True, n=None):
    """Does AsyncThink beat the best other mode on this metric, as in the paper? With n, the
    metric is a percentage of n puzzles, and the counts behind it are said too."""
    best = max(others) if higher else min(others)
    counts = f" ({round(ours * n / 100)} vs {round(best * n / 100)} of {n} puzzles)" if n else ""
    if ours == best:
        return f"{what}: a tie ({fmt(ours)} both), so neither agrees nor disagrees with the paper"
    agrees = ours > best if higher else ours < best
    return f"{what}: {fmt(ours)} vs {fmt(best)}{counts}, **{'agrees' if agrees else 'does not agree'}** with the paper"


def budget_of(res):
    """The steps a run's results were measured at (older results.json files name only the budget)."""
    return res.get("steps") or BUDGETS[res["budget"]]


def discussion(res, asy, best_seq, best_par):
    """Plain statements derived from the measured rows (rerunning the command rewrites them)."""
    rows = res["main"] + res["ablations"]
    best_all = max(r["all_correct"] for r in rows)
    lines = [
        f"- Format: {fmt(asy['format_error_rate'])}% of AsyncThink episodes had a format error "
        f"(sequential {fmt(best_seq['format_error_rate'])}%, parallel {fmt(best_par['format_error_rate'])}%). "
        "An episode with any format error scores zero, so format validity bounds accuracy.",
        f"- Concurrency: AsyncThink kept η = {fmt(asy['eta'], 2)} threads busy on average "
        f"(η/c = {fmt(asy['eta_over_c'], 0)}%; paper 64.7%).",
    ]
    if best_all < 20:
        lines.append(
            f"- Accuracy is low everywhere (best all-correct {fmt(best_all)}%): at this budget the "
            f"{budget_of(res)['preset']} model "
            + ("writes mostly valid structures but not yet " if asy["format_error_rate"] < 50 else
               "has not yet learned to write valid structures reliably, nor ")
            + "exact copying and arithmetic over a whole episode, and one wrong number in a "
            "thread's scan loses that answer. The paper starts from a pretrained 4B model; here "
            "every skill is learned from scratch in minutes. The orderings above are therefore "
            "weak evidence; the latency and η columns, which depend on structure rather than "
            "correctness, are the more reliable comparison.")
    n = res["n_test"]
    lines.append(
        f"- Noise: each percentage above is over {n} puzzles, so it carries up to about "
        f"±{100 * 1.96 * math.sqrt(0.25 / n):.0f} points (95%, at 50%); the rows share their puzzles, "
        "but a difference of a few points between two rows is not evidence (`python asyncthink.py "
        "compare` pairs two models' answers puzzle by puzzle on more puzzles).")
    lines.append(
        "- Latency: AsyncThink's critical path is its organizer's own text (a sub-query per fork, a "
        "tally per join), while sequential pays every worker's text in a row and parallel pays its "
        "longest whole-question worker; see the solver-written traces in BENCHMARKS.md for the "
        "latencies a perfect imitation would reach.")
    return lines


def report_header(res, command, seconds, asy, best_seq, best_par):
    """RESULTS.md's opening: how it was measured, then the headline verdicts."""
    budget = budget_of(res)
    return [
        "# RESULTS: the paper's experiment in miniature",
        "",
        f"Written by `{command}` — do not edit by hand; rerun the command.",
        "",
        f"- budget `{res['budget']}`: train.py recipe `--preset {budget['preset']}`, SFT {budget['sft_steps']} steps and "
        f"RL {budget['rl_steps']} steps per countdown model (Sudoku: {budget['sudoku_sft_steps']} / "
        f"{budget['sudoku_rl_steps']}), one training seed ({res['seed']}); "
        f"{res['n_test']} fresh test-split puzzles per row, the same puzzles for every model",
        f"- hardware: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores, "
        f"device `{res['device']}`, torch {torch.__version__}, Python {platform.python_version()}",
        f"- wall time of this invocation: {seconds / 60:.1f} min (training {res['train_seconds'] / 60:.1f} min; "
        "stages finished by an earlier, interrupted invocation are reused and not counted)",
        "- greedy decoding, except parallel workers (independent samples at temperature "
        f"{res['parallel_temperature']}); latency = critical path in decoding steps; "
        "η = mean active threads over it; wall s/ep = an episode's start-to-finish time inside a batch of 32",
        "",
        "## Headline",
        "",
        "- each mode's most accurate row (all correct, ties broken by ≥3, ≥2, ≥1, then fewer format errors): "
        f"{best_seq['name']} {fmt(best_seq['all_correct'])}% all correct (latency {fmt(best_seq['latency'], 0)}), "
        f"{best_par['name']} {fmt(best_par['all_correct'])}% (latency {fmt(best_par['latency'], 0)}), "
        f"AsyncThink {fmt(asy['all_correct'])}% (latency {fmt(asy['latency'], 0)}, η {fmt(asy['eta'], 2)})",
        f"- {verdict(asy['all_correct'], [best_seq['all_correct'], best_par['all_correct']], 'AsyncThink most accurate (all correct, %)', n=res['n_test'])}",
        f"- {verdict(asy['ge1'], [best_seq['ge1'], best_par['ge1']], 'AsyncThink most accurate (≥1 correct, %; the paper reports it too)', n=res['n_test'])}",
        f"- {verdict(asy['latency'], [best_seq['latency'], best_par['latency']], 'AsyncThink lowest latency (steps)', higher=False)}",
        "",
    ]


def write_report(report, out, res, command, seconds):
    """RESULTS.md from the measured rows (every number below comes from `res`)."""
    budget = budget_of(res)
    main_rows, ablation_rows = res["main"], res["ablations"]
    best_seq, best_par = most_accurate(main_rows, "sequential"), most_accurate(main_rows, "parallel")
    asy = next(r for r in main_rows if r["name"] == "AsyncThink")
    pic = lambda name: os.path.join(os.path.relpath(out, os.path.dirname(os.path.abspath(report))), name)
    lines = report_header(res, command, seconds, asy, best_seq, best_par) + [
        "## 1. Countdown: thinking modes (paper: ≥1 / ≥2 / ≥3 / all)",
        "",
        table(main_rows),
        "",
        f"![accuracy vs latency]({pic('frontier.png')})",
        "",
        "## 2. Ablations of the async model",
        "",
        table([asy] + ablation_rows),
        "",
        "## 3. Sudoku 4×4",
        "",
        "Models trained on Sudoku (the paper's numbers are zero-shot after countdown training), and "
        "the countdown async model zero-shot.",
        "",
        table(res["sudoku"]),
        "",
        "## 4. Capacity sweep (async model, inference only)",
        "",
        f"The model was trained at c = 4 and its prompt does not say c. Each row gives it a plan in "
        f"its prompt (the plans SFT taught it to follow): the sliding window over "
        f"{budget['sweep_forks']} forks that keeps c−1 workers busy. Plans with more than 3 workers "
        f"at once never occurred in training (SFT plans respect c = 4).",
        "",
        table(res["capacity"]),
        "",
        f"![capacity sweep]({pic('capacity.png')})",
        "",
        "## 5. RL dynamics of the async model",
        "",
        f"![RL curves]({pic('rl_curves.png')})" if res["rl_plot"] else "(no RL steps were logged)",
        "",
        "One real async episode from the test split:",
        "",
        f"![timeline]({pic('timeline.png')})" if res["timeline"] else "(no async episode to show)",
        "",
        "## Reading these results",
        "",
        *discussion(res, asy, best_seq, best_par),
        "",
        "## Training time per model",
        "",
        "| model | stage | seconds |",
        "|---|---|---|",
        *[f"| {n} | {st} | {fmt(s, 0) if s is not None else 'reused'} |" for n, st, s in res["timings"]],
        "",
    ]
    with open(report, "w") as f:
        f.write("\n".join(lines))


# -----------------------------------------------------------------------------
# The experiment

def command_line(budget):
    """The command that reproduces a report, as RESULTS.md states it."""
    return "python experiments.py" + (f" --budget {budget}" if budget != "cpu" else "")


def rewrite_report(args):
    """The report again from the rows and timings a finished run saved: no training, no evaluation."""
    path = os.path.join(args.out, "results.json")
    try:
        with open(path) as f:
            res = json.load(f)
        write_report(args.report, args.out, res, command_line(res["budget"]), res["seconds"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return cli.fail("experiments.py", f"{path} is not a results.json a finished run wrote "
                                          f"({type(e).__name__}: {e})")
    print(f"[experiments] rewrote {args.report} from {path} (the run's own rows and times)")
    return 0


def train_all(budget, out, seed, device, jobs):
    """Every model the report needs, trained (or reused): three countdown modes, the ablations,
    three Sudoku modes. One chain per SFT model, its RL stages after it, the longest chain first
    (parallel traces carry the most tokens): a chain's RL starts as soon as its own SFT is done, so
    no core waits for the slowest SFT. Returns ({row name: checkpoint}, timings)."""
    steps = {("countdown", "sft"): budget["sft_steps"], ("countdown", "rl"): budget["rl_steps"],
             ("sudoku", "sft"): budget["sudoku_sft_steps"], ("sudoku", "rl"): budget["sudoku_rl_steps"]}
    stage = lambda name, st, task, mode, *extra: lambda: train_job(  # made when its turn comes
        budget, out, name, st, task, mode, steps[task, st], ["--seed", str(seed), *extra], device)
    no_eta = os.path.join(out, "countdown-async-no-eta")

    def copy_async_sft():  # the no-R_η ablation: the same SFT model, another RL
        os.makedirs(no_eta, exist_ok=True)
        if not os.path.exists(os.path.join(no_eta, "sft.pt")):
            shutil.copy(os.path.join(out, "countdown-async", "sft.pt"), os.path.join(no_eta, "sft.pt"))

    chains = [[stage("countdown-parallel", "sft", "countdown", "parallel"),
               stage("countdown-parallel", "rl", "countdown", "parallel")],
              [stage("countdown-async", "sft", "countdown", "async"),
               stage("countdown-async", "rl", "countdown", "async"), copy_async_sft,
               stage("countdown-async-no-eta", "rl", "countdown", "async", "--no-concurrency-reward")],
              [stage("countdown-sequential", "sft", "countdown", "sequential"),
               stage("countdown-sequential", "rl", "countdown", "sequential")],
              [stage("countdown-async-scratch", "rl", "countdown", "async", "--from-scratch")],
              *[[stage(f"sudoku-{m}", "sft", "sudoku", m), stage(f"sudoku-{m}", "rl", "sudoku", m)]
                for m in E.MODES]]
    timings = run_chains(chains, jobs)
    ckpt = {mode: os.path.join(out, f"countdown-{mode}", "rl.pt") for mode in E.MODES}
    ckpt.update({f"sudoku {m}": os.path.join(out, f"sudoku-{m}", "rl.pt") for m in E.MODES})
    ckpt["async sft"] = os.path.join(out, "countdown-async", "sft.pt")
    ckpt["no R_η"] = os.path.join(no_eta, "rl.pt")
    ckpt["no format SFT"] = os.path.join(out, "countdown-async-scratch", "rl.pt")
    return ckpt, timings


def evaluate_all(budget, ckpt, cfg, seed, device):
    """Every model on the same fresh test puzzles: the rows of the report's four tables, and
    the async model's episode records."""
    n, (L1, L2) = budget["n_test"], budget["token_budgets"]
    countdown = tasks.make_puzzles("countdown", cfg.puzzles, n=n, seed=seed, split="test")
    sudoku = tasks.make_puzzles("sudoku", "small", n=n, seed=seed, split="test")
    org, wrk = cfg.max_organizer_tokens, cfg.max_worker_tokens

    def ev(name, path, rows, mode, paper="", capacity=4, organizer_tokens=org, worker_tokens=wrk):
        print(f"[experiments] evaluating {name}")
        temp = cfg.eval_parallel_temperature if mode == "parallel" else 0.0
        row, records = evaluate(path, rows, mode, E.RunConfig(mode=mode, capacity=capacity).pool_capacity(),
                                organizer_tokens, worker_tokens, temp, device, seed)
        return {"name": name, "paper": paper, **row}, records

    main_rows = [ev(f"sequential L{L}", ckpt["sequential"], countdown, "sequential", "sequential",
                    organizer_tokens=L)[0] for L in (L1, L2)]
    main_rows += [ev(f"parallel L{L}", ckpt["parallel"], countdown, "parallel", "parallel",
                     worker_tokens=L)[0] for L in (L1, L2)]
    row, async_records = ev("AsyncThink", ckpt["async"], countdown, "async", "async")
    main_rows.append(row)
    ablations = [ev(name, ckpt[name], countdown, "async", name)[0] for name in ("no R_η", "no format SFT")]
    ablations.append(ev("no RL", ckpt["async sft"], countdown, "async", "no RL")[0])
    sudoku_rows = [ev(f"sudoku {m}", ckpt[f"sudoku {m}"], sudoku, m, f"sudoku {m}",
                      worker_tokens=org if m == "parallel" else wrk)[0] for m in E.MODES]
    sudoku_rows.append(ev("countdown async, zero-shot", ckpt["async"], sudoku, "async", "sudoku async")[0])
    # The model was trained at c = 4 and its prompt does not say c, so at inference each c comes
    # with a plan (which SFT taught it to follow): the sliding window that
    # keeps c-1 workers busy, over a fixed number of forks.
    capacity_rows = []
    for c in CAPACITIES:
        plan = " ".join(P.window_plan(budget["sweep_forks"], c))
        rows = [{**row, "plan": plan} for row in countdown]
        capacity_rows.append(ev(f"AsyncThink c={c}, plan", ckpt["async"], rows, "async", capacity=c)[0])
    return dict(main=main_rows, ablations=ablations, sudoku=sudoku_rows, capacity=capacity_rows), async_records


def main(argv=None):
    ap = cli.ArgumentParser(description="The paper's experiment in miniature; writes RESULTS.md.")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--out", default="results", help="run folders, plots and results.json")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    ap.add_argument("--seed", type=int, default=0, help="training seed; the test puzzles use it too")
    ap.add_argument("--jobs", type=int, default=2, help="training runs at once (default 2: one per core)")
    ap.add_argument("--report", default="RESULTS.md", help="where the tables go")
    ap.add_argument("--rewrite-report", action="store_true",
                    help="only rewrite the report from <out>/results.json (after editing the report code)")
    args = ap.parse_args(argv)
    if args.rewrite_report:
        return rewrite_report(args)
    budget, device = BUDGETS[args.budget], A.pick_device(args.device)
    cfg = train.parse_args(["--preset", budget["preset"]])  # the preset's puzzles and token budgets
    out, t_start = args.out, time.perf_counter()
    os.makedirs(out, exist_ok=True)
    try:  # 1. train
        ckpt, timings = train_all(budget, out, args.seed, device, args.jobs)
    except TrainingFailed as e:
        return cli.fail("experiments.py", e)
    train_seconds = time.perf_counter() - t_start
    rows, async_records = evaluate_all(budget, ckpt, cfg, args.seed, device)  # 2. evaluate

    # 3. plots and the report
    plot_frontier(rows["main"] + rows["ablations"], os.path.join(out, "frontier.png"))
    plot_capacity(rows["capacity"], os.path.join(out, "capacity.png"))
    rl_plot = plot_rl(os.path.join(out, "countdown-async", "metrics.jsonl"), os.path.join(out, "rl_curves.png"))
    shown = sorted(async_records, key=lambda r: (r["correct"], len(r["trace"]["timeline"])), reverse=True)
    if shown:
        plot_timeline(shown[0], os.path.join(out, "timeline.png"))
        with open(os.path.join(out, "timeline.txt"), "w") as f:
            f.write(A.show_timeline(shown[0]) + "\n\n" + shown[0]["trace"]["organizer"] + "\n")
    res = dict(budget=args.budget, steps=budget, seed=args.seed, n_test=budget["n_test"], device=str(device),
               parallel_temperature=cfg.eval_parallel_temperature, **rows, timings=timings,
               train_seconds=train_seconds, rl_plot=rl_plot, timeline=bool(shown))
    res["seconds"] = seconds = time.perf_counter() - t_start
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**res, "rows": [r for name in ("main", "ablations", "sudoku", "capacity") for r in rows[name]]},
                  f, indent=1)
    write_report(args.report, out, res, command_line(args.budget), seconds)
    print(f"[experiments] {seconds / 60:.1f} min; wrote {args.report} and {out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
