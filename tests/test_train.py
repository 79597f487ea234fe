"""train.py end to end on the tiny preset: smoke runs of both stages, exact resume, refusal of
foreign checkpoints, atomic saves, and DDP with two CPU processes."""
import os
import random
import re
import socket
import subprocess
import sys

import pytest
import torch

import model as M
import protocol as P
import train

TINY = ["--preset", "tiny", "--eval-every", "0"]


def run(*args, env=None):
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, env=env)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    r = run("--stage", "sft", *TINY, "--run-dir", str(d), "--sft-steps", "4")
    assert r.returncode == 0, r.stderr
    return d, r


def test_sft_then_rl_smoke(sft_run):
    d, r = sft_run
    assert r.stdout.strip().splitlines()[-1] == f"checkpoint: {d / 'sft.pt'}"
    assert (d / "metrics.jsonl").exists() and (d / "curves.png").exists()
    r = run("--stage", "rl", *TINY, "--run-dir", str(d), "--rl-steps", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"checkpoint: {d / 'rl.pt'}"
    rows = [__import__("json").loads(line) for line in open(d / "metrics.jsonl")]
    rl = [row for row in rows if row["stage"] == "rl"]
    assert len(rl) == 2 and {"reward", "accuracy", "latency", "eta", "kl", "entropy",
                             "format_error_rate", "rollout_s", "update_s"} <= set(rl[0])


def test_sft_resume_gives_the_same_weights(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run("--stage", "sft", *TINY, "--run-dir", str(straight), "--sft-steps", "4").returncode == 0
    assert run("--stage", "sft", *TINY, "--run-dir", str(split), "--sft-steps", "4", "--stop-at", "2").returncode == 0
    r = run("--stage", "sft", *TINY, "--run-dir", str(split), "--sft-steps", "4", "--resume")
    assert r.returncode == 0 and "resuming SFT" in r.stdout
    a, b = weights(straight / "sft.pt"), weights(split / "sft.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rl_resume_gives_the_same_weights(sft_run, tmp_path):
    d, _ = sft_run
    runs = {}
    for name in ("straight", "split"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        (runs[name] / "sft.pt").write_bytes((d / "sft.pt").read_bytes())
    assert run("--stage", "rl", *TINY, "--run-dir", str(runs["straight"]), "--rl-steps", "3").returncode == 0
    assert run("--stage", "rl", *TINY, "--run-dir", str(runs["split"]), "--rl-steps", "3", "--stop-at", "1").returncode == 0
    assert run("--stage", "rl", *TINY, "--run-dir", str(runs["split"]), "--rl-steps", "3", "--resume").returncode == 0
    a, b = weights(runs["straight"] / "rl.pt"), weights(runs["split"] / "rl.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_foreign_and_corrupt_checkpoints_are_refused(sft_run, tmp_path):
    d, _ = sft_run
    other = tmp_path / "other"
    other.mkdir()
    (other / "sft.pt").write_bytes((d / "sft.pt").read_bytes())
    r = run("--stage", "sft", *TINY, "--run-dir", str(other), "--model", "small", "--resume")
    assert r.returncode == 2 and "model='tiny'" in r.stderr and "Traceback" not in r.stderr
    r = run("--stage", "sft", *TINY, "--run-dir", str(other), "--muon-lr", "0", "--resume")  # Muon's state
    assert r.returncode == 2 and "muon_lr=0.02, this run has 0.0" in r.stderr and "Traceback" not in r.stderr
    (other / "sft.pt").write_bytes(b"not a checkpoint at all")
    r = run("--stage", "sft", *TINY, "--run-dir", str(other), "--resume")
    assert r.returncode == 2 and "not a readable checkpoint" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run("--stage", "rl", *TINY, "--run-dir", str(tmp_path / "empty"))
    assert r.returncode == 2 and "run `python train.py --stage sft`" in r.stderr
    r = run("--stage", "sft", *TINY, "--sft-episodes", "0")
    assert r.returncode == 2 and "must be positive" in r.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--copy-drills", "-1", "--copy-drills must be >= 0"),
    ("--ckpt-every", "0", "--ckpt-every must be positive"),
    ("--hint-share", "1.5", "--hint-share must lie in [0, 1]"),
    ("--dtype", "float16", "--dtype must be float32 or bfloat16"),
    ("--credit", "organizer", "--credit must be shared, thread or copy"),
    ("--advantage", "best", "--advantage zscore, mean or rft"),
    ("--organizer-weight", "0", "--organizer-weight must be positive"),
    ("--muon-lr", "-0.1", "--muon-lr must be >= 0"),
    ("--tools", "calc,search", "--tools: unknown tool 'search'"),
    ("--check-share", "0.5", "--check-share needs --tools check"),
    ("--check-share", "1.5", "--check-share must lie in [0, 1]"),
    ("--width-share", "1.5", "--width-share must lie in [0, 1]"),
])
def test_out_of_range_flags_are_refused_with_one_line(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args([flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_width_share_needs_depth_1_async(capsys):
    for other in (["--mode", "parallel"], ["--depth", "2"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(["--width-share", "0.5", *other])
        assert e.value.code == 2 and "--width-share shapes depth-1 async traces" in capsys.readouterr().err
    assert train.parse_args(["--width-share", "0.5"]).width_share == 0.5


def test_a_save_killed_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model = M.GPT(M.GPTConfig.preset("tiny", 300))
    path = tmp_path / "ckpt.pt"
    M.save_checkpoint(str(path), model, step=1)
    before = path.read_bytes()

    def dies_halfway(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is killed while writing
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        M.save_checkpoint(str(path), model, step=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_nan_loss_stops_cleanly_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    d = tmp_path / "run"
    assert train.main(["--stage", "sft", *TINY, "--run-dir", str(d), "--sft-steps", "2"]) == 0
    good = weights(d / "sft.pt")
    forward = M.GPT.forward

    def nan_forward(self, idx, targets=None, reduction="mean", segments=None):
        logits, loss = forward(self, idx, targets, reduction, segments)
        return logits, loss * float("nan")
    monkeypatch.setattr(M.GPT, "forward", nan_forward)
    code = train.main(["--stage", "sft", *TINY, "--run-dir", str(d), "--sft-steps", "4", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "SFT loss is nan" in err and "last good checkpoint is kept" in err
    after = weights(d / "sft.pt")
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_ddp_two_cpu_processes(tmp_path):
    d = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port, so parallel runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                "train.py"]

    def launch(*args):
        """One torchrun; a second try only if the first failed (on a loaded 2-core box gloo's
        rendezvous or teardown has failed once in ~20 runs), with both outputs if both fail."""
        first = subprocess.run(torchrun + list(args), capture_output=True, text=True, env=env, timeout=300)
        if first.returncode == 0:
            return first
        second = subprocess.run(torchrun + list(args), capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 0, first.stderr[-3000:] + "\n---- retry ----\n" + second.stderr[-3000:]
        return second

    r = launch("--stage", "sft", *TINY, "--run-dir", str(d), "--sft-steps", "2")
    assert r.stdout.count("checkpoint: ") == 1  # one writer
    r = launch("--stage", "rl", *TINY, "--run-dir", str(d), "--rl-steps", "2")
    assert (d / "rl.pt").exists()


def test_micro_batches_pack_every_trained_token_once_and_keep_sequences_apart():
    """The packed batches hold each sequence's (input, target) pairs exactly once, within one
    segment, with the loss mask of the sequence (oracle: the pairs read off the sequences)."""
    seqs = [([1, 2, 3, 4, 5, 6], [False, False, True, True, True, True]),
            ([7, 8, 9], [False, True, True]), ([10, 11], [False, True]),
            ([12, 13, 14, 15], [False, False, True, False])]
    batches = train.micro_batches(seqs, micro_tokens=10, pad_id=0)
    expected = sorted((ids[t], ids[t + 1] if mask[t + 1] else -1) for ids, mask in seqs
                      for t in range(len(ids) - 1))
    got, padding = [], 0
    for x, y, w, seg in batches:
        assert x.shape == y.shape == w.shape == seg.shape and x.shape[1] <= 5  # rows no longer than the longest
        assert ((w > 0) == (y != -1)).all()  # a weight where there is a loss, 0 elsewhere
        for b in range(x.shape[0]):
            for s in seg[b].unique().tolist():
                where = (seg[b] == s).nonzero().flatten()
                assert (where == torch.arange(where[0], where[-1] + 1)).all()  # contiguous
                if s == len(seqs):
                    padding += len(where)
                    assert (y[b, where] == -1).all()
                else:
                    got += list(zip(x[b, where].tolist(), y[b, where].tolist()))
    assert sorted(got) == expected
    assert padding == sum(x.numel() for x, _, _, _ in batches) - len(expected) == 0  # 5 | 3 2 | 1


def test_organizer_weight_weighs_the_organizer_thread_only():
    """--organizer-weight 3: every trained token of each trace's organizer (its first thread,
    the one whose prompt is <ORGANIZER>) has weight 3, every worker token 1, prompts 0; and the
    step's loss is the weighted mean (by hand: per-token losses 1 and 2 at weights 3 and 1 give
    (3 + 2) / 4)."""
    tok = P.Tokenizer.numbers()
    cfg = train.parse_args(["--preset", "tiny", "--organizer-weight", "3"])
    seqs = train.sft_sequences(cfg, tok, random.Random(0), 2, 1024)
    for ids, w in seqs:
        organizer = tok.decode(ids).startswith(P.ORGANIZER)
        assert set(w) == {0.0, 3.0 if organizer else 1.0}
    assert sum(tok.decode(ids).startswith(P.ORGANIZER) for ids, _ in seqs) == 2

    class Fixed(torch.nn.Module):  # per-token losses 1 and 2, whatever the input
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.ones(()))
        def forward(self, x, y, reduction, segments):
            return None, self.p * torch.tensor([[1.0, 2.0, 5.0]])
    m = Fixed()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    batch = (torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1, 1, -1]]), torch.tensor([[3.0, 1.0, 0.0]]),
             torch.zeros(1, 3, dtype=torch.long))
    loss, _ = train.sft_step(m, opt, [batch], cfg, "cpu")
    assert loss == pytest.approx(5 / 4)


def test_evaluations_do_not_change_what_sft_trains(tmp_path):
    """Evaluating mid-run (its own seeded puzzles and sampler) leaves the trained weights
    bit-identical to a run that evaluates only at the end: the default's one evaluation
    changes timing, never the model."""
    for every in (2, 4):
        assert train.main(["--stage", "sft", "--preset", "tiny", "--sft-steps", "4", "--eval-n", "2",
                           "--eval-every", str(every), "--run-dir", str(tmp_path / str(every))]) == 0
    a, b = weights(tmp_path / "2" / "sft.pt"), weights(tmp_path / "4" / "sft.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_copy_drills_join_each_countdown_trace():
    """--copy-drills N adds N drill threads per countdown trace: their prompt says "copy" and
    is untrained, their trained text is the prompt's two lists joined."""
    tok = P.Tokenizer.numbers()
    cfg = train.parse_args(["--preset", "tiny", "--copy-drills", "3"])
    seqs = train.sft_sequences(cfg, tok, random.Random(0), 2, 1024)
    is_drill = "".join("d" if tok.decode(ids).startswith("copy ") else "t" for ids, _ in seqs)
    assert re.fullmatch(r"t+dddt+ddd", is_drill), is_drill  # organizer and workers, then 3 drills
    drills = [(ids, mask) for (ids, mask), kind in zip(seqs, is_drill) if kind == "d"]
    for ids, mask in drills:  # tally drills: "copy A\nand B\n" is untrained, "-> A, B\n" trained
        a, b = tok.decode([i for i, m in zip(ids, mask) if not m]).removeprefix("copy ").rstrip("\n").split("\nand ")
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == f"-> {a}, {b}\n"


def test_steps_in_budget_by_hand():
    # 25 steps done in 6 s at 0.2 s per step: (13 * 60 - 6) / 0.2 = 3870 more
    assert train.steps_in_budget(6.0, 0.2, 25, 13.0) == 25 + 3870
    assert train.steps_in_budget(100.0, 0.2, 25, 1.0) == 25  # over budget already: stop now


def test_timed_sft_plans_its_steps_and_a_resume_keeps_the_plan(tmp_path):
    """--sft-steps 0 times the first steps and fills --sft-minutes: the plan is printed with the
    flag that repeats it, saved in the checkpoint's config, and kept by --resume (a new timing
    would change the learning-rate schedule half way)."""
    d = tmp_path / "timed"
    first = train.TIMED_STEPS[1]  # the plan is made after the timed steps
    r = run("--stage", "sft", *TINY, "--run-dir", str(d), "--sft-steps", "0", "--sft-minutes", "1",
            "--stop-at", str(first + 5))
    assert r.returncode == 0, r.stderr
    plan = re.search(r"so (\d+) steps fill --sft-minutes 1 \(to repeat this run: --sft-steps (\d+)\)", r.stdout)
    assert plan and plan.group(1) == plan.group(2), r.stdout
    planned = int(plan.group(1))
    assert planned > first + 5  # the tiny model takes well under 0.5 s per step
    ckpt = torch.load(d / "sft.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == first + 5 and ckpt["train_config"]["sft_steps"] == planned
    r = run("--stage", "sft", *TINY, "--run-dir", str(d), "--sft-steps", "0", "--resume", "--stop-at", str(first + 7))
    assert r.returncode == 0, r.stderr
    assert "steps fill" not in r.stdout + r.stderr  # no second timing
    ckpt = torch.load(d / "sft.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == first + 7 and ckpt["train_config"]["sft_steps"] == planned
    # a budget that ends during the timed steps stops right after them, with a checkpoint
    d = tmp_path / "short"
    r = run("--stage", "sft", *TINY, "--run-dir", str(d), "--sft-steps", "0", "--sft-minutes", "0.0001")
    assert r.returncode == 0, r.stderr
    assert torch.load(d / "sft.pt", map_location="cpu", weights_only=True)["step"] == first
    for flags in (["--sft-minutes", "0"], ["--sft-steps", "-1"]):  # refused before any training
        r = run("--stage", "sft", *TINY, "--run-dir", str(tmp_path / "refused"), *flags)
        assert r.returncode == 2 and "--sft-steps must be >= 0" in r.stderr
        assert not (tmp_path / "refused").exists()


def test_rl_reference_is_the_sft_model_also_on_resume(sft_run, tmp_path):
    """The KL reference is sft.pt, whether RL starts or resumes from rl.pt (whose weights
    have moved): a resumed run must not pull toward its own last checkpoint."""
    d, _ = sft_run
    (tmp_path / "sft.pt").write_bytes((d / "sft.pt").read_bytes())
    moved, _ = M.load_checkpoint(str(tmp_path / "sft.pt"))
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.5)
    cfg = train.TrainConfig(stage="rl", preset="tiny", model="tiny", run_dir=str(tmp_path), resume=True)
    ref = train.reference_policy(cfg, moved, "cpu")
    sft = weights(tmp_path / "sft.pt")
    assert all(torch.equal(v, sft[k]) for k, v in ref.state_dict().items())
    assert not any(p.requires_grad for p in ref.parameters())


def test_rl_with_thread_credit_and_rft_runs(sft_run, tmp_path):
    """The RL options (credit, RFT, a tool cost) run end to end on the tiny preset and log the
    per-step picture."""
    d, _ = sft_run
    for flags in (["--credit", "thread"], ["--credit", "copy"], ["--advantage", "rft"],
                  ["--tools", "check", "--tool-cost", "0.05"]):
        run_dir = tmp_path / flags[1]
        run_dir.mkdir()
        (run_dir / "sft.pt").write_bytes((d / "sft.pt").read_bytes())
        r = run("--stage", "rl", *TINY, "--run-dir", str(run_dir), "--rl-steps", "1", *flags)
        assert r.returncode == 0, r.stderr
        row = __import__("json").loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert {"eta_over_c", "tokens", "skipped_groups", "worker_precision"} <= set(row)
        assert ("tool_calls" in row) == ("--tools" in flags)  # logged (and drawn) with tools only
