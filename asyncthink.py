"""
AsyncThink's commands and records: run the executor on puzzles and say what happened.

executor.py decodes the episodes (organizers and workers together on one KV cache); this file
turns an ended episode into what the rest of the project reads:

    trajectory(ep)  protocol.parse of what the episode produced: the named format errors
    record(ep)      one JSON-able dict per episode: answers, correct, latency (the critical path,
                    protocol.timeline), eta, tokens, format errors, the stop reason, the texts
                    and the executor's timeline (RL reads its tokens from the episode itself)
    metrics         the mean of records: >=1 .. all correct, latency, eta, format errors

and the command line:

    python asyncthink.py solve --ckpt runs/countdown-async/rl.pt --input test.jsonl --output out.jsonl
    python asyncthink.py init --out random.pt        # a random checkpoint, to try the executor
    python asyncthink.py compare A.jsonl B.jsonl     # paired comparison (compare.py)
    python asyncthink.py chat --human organizer      # a person in the organization (chat.py)
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from tqdm import tqdm

import cli
import compare
import protocol as P
import tasks
from executor import ANSWERED, MODES, PARALLEL_TEMPERATURE, Episode, Executor, RunConfig
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint

# -----------------------------------------------------------------------------
# Results: the trajectory as the protocol sees it, metrics, and the record

def trajectory(ep: Episode, tok: P.Tokenizer, cfg: RunConfig):
    """protocol.parse of what the episode produced (the executor knows which tokens it injected)."""
    org = ep.organizer
    workers = {w.path: w.out for w in ep.threads[1:]}  # "2", and "2.1" for worker 1 of worker 2
    task = ep.row["task"] if ep.row["task"] in tasks.TASKS else None  # a chat's free question: unverified
    return P.parse(org.out, workers, tok, cfg.pool_capacity(), task=task, injected=org.injected,
                   tools=cfg.tools, depth=cfg.depth)


def score(row, answers):
    """(number of distinct correct answers, whether the puzzle is fully solved). Only the
    first k answers count (the first grid for Sudoku): an answer that lists every expression
    it can think of would otherwise be a free lottery ticket for the verifier and the reward.

    >>> row = {"task": "countdown", "numbers": [1, 2, 3], "target": 3, "k": 2}
    >>> score(row, ["1+2", "2+1", "3*1", "3/1"])   # 2+1 is 1+2 again; 3*1 is past the first k
    (1, False)
    """
    if row["task"] not in tasks.TASKS:  # a chat's free question: nothing to verify it with
        return 0, False
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
        name = "organizer" if th.role == "organizer" else f"worker {th.path}"
        name += f" ({th.tool})" if th.tool else ""
        rows.append(dict(thread=name, fork_step=rel(th.fork_step), start=rel(th.start_step),
                         finish=rel(th.finish_step), join_step=rel(th.join_step), tokens=th.generated,
                         active=[(rel(a), rel(b)) for a, b in th.active]))
        if th.human:  # a person's thread (chat.py): active is the steps it was not waiting
            rows[-1]["human"] = True
    return rows


def path_key(th):
    """Sort workers by path: 1, 1.1, 1.2, 2, ..., 10 (numbers, not strings)."""
    return tuple(int(i) for i in th.path.split("."))


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
    if ep.stop_reason != ANSWERED:
        latency = max(latency, steps)
    return {**ep.row, "mode": cfg.mode, "answers": traj.answers, "n_correct": n_correct,
            "correct": solved, "latency": latency,
            "concurrency": round(P.concurrency(traj), 4),
            "tokens": sum(th.generated for th in ep.threads),
            "tool_calls": sum(th.tool is not None for th in ep.threads),
            "format_errors": traj.errors, "stop_reason": ep.stop_reason,
            "steps": steps,
            "wall_s": round((ep.t_end or 0) - (ep.t_start or 0), 4),
            "trace": {"organizer": tok.decode(org.out),
                      "workers": {w.path: tok.decode(w.out) for w in sorted(ep.threads[1:], key=path_key)},
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
    label = lambda r: r["thread"] + (" (human)" if r.get("human") else "")
    n, width_name = col(T) + 1, max(10, max(len(label(r)) for r in rows))
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
        lines.append(f"{label(r):<{width_name}}|{''.join(cells)}|")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Loading a model, running many puzzles, the summary table

def load_model(path, device="cpu"):
    """(model, tokenizer) from a checkpoint file (train.py, or `asyncthink.py init`) or from a
    pretrained GPT-2 folder (config.json + weights + tokenizer files). One-line errors."""
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


def trained_with(path):
    """The TrainConfig a checkpoint was trained with, as a dict ({} for a GPT-2 folder or an
    `init` checkpoint): `solve` runs the tools it learned to call (--tools) and states the
    capacity in the prompt if it learned to read it (--capacities)."""
    if os.path.isdir(path):
        return {}
    _, ckpt = load_checkpoint(path)
    return ckpt.get("train_config", {})


def as_trained(cfg: RunConfig, trained, path, tools_given=False, depth_given=False):
    """Run a checkpoint as it was trained: the tools it learned to call (unless --tools was
    given), the depth it learned to organize at (unless --depth was given), and, if it learned
    to read c in its prompt, c stated there (a c outside the range it was trained for raises a
    one-line ValueError)."""
    if not tools_given:
        cfg.tools = P.parse_tools(trained.get("tools", ""))
    if not depth_given and cfg.mode == "async":
        cfg.depth = trained.get("depth", 1)
        cfg.check()
    if trained.get("capacities") and cfg.mode == "async":
        lo, hi = P.capacity_range(trained["capacities"])
        if not lo <= cfg.capacity <= hi:
            raise ValueError(f"{path} was trained for capacities {lo}-{hi}, not --capacity {cfg.capacity}")
        cfg.state_capacity = True


def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    return name


def solve(model, tok, rows, cfg: RunConfig, progress=True, out=None):
    """Run every row in `cfg.mode`; returns the records (see `record`) in row order. With `out`
    (a text file), each record is also written to it as a JSON line as soon as its episode
    ends, so a run that is killed keeps the episodes it finished."""
    bar = tqdm(total=len(rows), desc=f"solve {cfg.mode}", unit="ep", disable=not progress,
               file=sys.stderr)
    records = {}

    def keep(ep):
        records[ep.index] = record(ep, tok, cfg)
        if out is not None:
            out.write(json.dumps(records[ep.index]) + "\n")
            out.flush()

    Executor(model, tok, cfg).run(rows, progress=bar, on_end=keep)
    bar.close()
    return [records[i] for i in range(len(rows))]


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
    """'>=1  50.0% >=2  10.0%  all  10.0%' from metrics() (or tasks.chance()); no >=j when k = 1."""
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
    ap.add_argument("--tools", type=tool_list, default=None,
                    help=f"tools a fork may call by prefix, comma-separated ({','.join(P.TOOLS)}; "
                         "tools.py); default: those the checkpoint was trained with ('' for none)")
    ap.add_argument("--depth", type=int, default=None,
                    help="async: D, workers down to level D may be forked, those above it fork "
                         "their own (1: the paper's; default: the depth the checkpoint was trained at)")


def tool_list(text):
    """--tools "calc,check" -> ("calc", "check"); an unknown name is a one-line usage error."""
    try:
        return P.parse_tools(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def run_config(args):
    temperature = args.temperature
    if temperature is None:
        temperature = PARALLEL_TEMPERATURE if args.mode == "parallel" else 0.0
    cfg = RunConfig(mode=args.mode, capacity=args.capacity, n_parallel=args.n_parallel,
                    temperature=temperature, top_k=args.top_k, seed=args.seed,
                    max_organizer_tokens=args.max_organizer_tokens,
                    max_worker_tokens=args.max_worker_tokens,
                    max_episode_tokens=args.max_episode_tokens, max_steps=args.max_steps,
                    batch_episodes=args.batch, tools=args.tools or (), depth=1 if args.depth is None else args.depth)
    cfg.check()
    return cfg


def build_parser():
    """The command line: solve, init, compare and chat."""
    ap = cli.ArgumentParser(description="AsyncThink: run the Fork/Join executor.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("solve", help="solve puzzles from a JSONL file (rows of `tasks.py make`)")
    s.add_argument("--ckpt", required=True, help="checkpoint file, or a pretrained GPT-2 folder")
    s.add_argument("--input", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--show", type=int, default=0, help="print the timeline of the first N episodes")
    add_run_flags(s)
    i = sub.add_parser("init", help="write a randomly initialised checkpoint (to try the executor)")
    i.add_argument("--preset", default="small", help="model size (model.PRESETS)")
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    sub.add_parser("compare", help="paired comparison of two solve outputs (see compare.py)", add_help=False)
    sub.add_parser("chat", help="a person as organizer or worker beside the model (runs chat.py)", add_help=False)
    return ap


def init_command(args):
    """`init`: a randomly initialised checkpoint of a model preset, to try the executor."""
    torch.manual_seed(args.seed)
    tok = P.Tokenizer.numbers()
    model = GPT(GPTConfig.preset(args.preset, tok.n_vocab))
    save_checkpoint(args.out, model, tokenizer=tok.spec())
    print(f"checkpoint: {args.out} ({model.num_params() / 1e6:.2f}M parameters, random weights)")
    return 0


def main(argv=None):
    ap = build_parser()
    argv = argv if argv is not None else sys.argv[1:]
    if argv[:1] == ["compare"]:
        return compare.main(argv[1:])
    if argv[:1] == ["chat"]:  # chat.py imports this file: it runs as its own process, imports stay one-way
        chat = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.py")
        return subprocess.call([sys.executable, chat, *argv[1:]])
    args = ap.parse_args(argv)
    try:
        if args.command == "init":
            return init_command(args)
        cfg = run_config(args)
        rows = tasks.load_jsonl(args.input)
        if not rows:
            raise ValueError(f"{args.input}: no puzzles")
        model, tok = load_model(args.ckpt, pick_device(args.device))
        as_trained(cfg, trained_with(args.ckpt), args.ckpt, tools_given=args.tools is not None,
                   depth_given=args.depth is not None)
        # Records go to OUTPUT.partial as their episodes end (in the order they end), and become
        # OUTPUT, in row order, when all are done: a killed run keeps its finished episodes in
        # the .partial file, and an existing OUTPUT is replaced only by a complete one.
        partial = args.output + ".partial"
        out = open(partial, "w")
    except (ValueError, FileNotFoundError, OSError) as e:
        return cli.fail(f"asyncthink.py {args.command}", e)
    t0 = time.perf_counter()
    with out:
        records = solve(model, tok, rows, cfg, out=out)
    seconds = time.perf_counter() - t0
    with open(partial, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(partial, args.output)
    for r in records[:args.show]:
        print(show_timeline(r))
    print(summary(records, seconds))
    guess = tasks.chance(rows)
    if guess:  # the floor: what k random expressions per puzzle score on the same puzzles
        n = sum(r.get("task", "countdown") == "countdown" for r in rows)
        print(f"{'chance':<10} n={n}  {accuracy_text(guess)}  (k random expressions per puzzle, 100 draws)")
    print(f"wrote {len(records)} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
