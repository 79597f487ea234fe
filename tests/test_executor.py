"""asyncthink.py: the executor against independent oracles — a full uncached forward for every
log-probability, protocol.timeline for every step, brute-force expectations for the modes."""
import io
import json
import subprocess
import sys

import pytest
import torch

import asyncthink as A
import executor as E
import protocol as P
from model import GPT, GPTConfig, save_checkpoint

tok = P.Tokenizer.bytes_level(max_forks=8)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", tok.n_vocab)).eval()


def text(s):
    return tok.encode(s)


def fork(i, query):
    return [tok.tag_id("fork", i)] + text(query) + [tok.tag_id("fork_end", i)]


def join(i):
    return [tok.tag_id("join", i)]


def worker_script(n_think, result="7"):
    return text("w" * n_think) + [tok.ret] + text(result) + [tok.ret_end]


ANSWER = [tok.answer] + text("1+2") + [tok.answer_end]
ROWS = [{"task": "countdown", "numbers": [1, 2, 3, 4, 5, 6], "target": 3, "k": 1}]


def scripted(scripts):
    """force(): episode e's thread (0 organizer, i worker i) emits scripts[e][i] in order."""
    def force(ep, th):
        script = scripts[ep.index % len(scripts)][th.fork_id]
        return script[th.generated] if th.generated < len(script) else None
    return force


# interleaved F1 F2 J1 F3 J2 J3, workers of lengths 5, 20, 3 (as in the protocol tests)
INTERLEAVED = {0: text("ab") + fork(1, "q1") + fork(2, "q22") + text("c") + join(1) + fork(3, "q")
               + join(2) + join(3) + ANSWER,
               1: worker_script(2), 2: worker_script(17), 3: worker_script(0)}
# fork all then join all, a slow first worker
FORK_ALL = {0: fork(1, "a") + fork(2, "b") + fork(3, "c") + join(1) + join(2) + join(3) + ANSWER,
            1: worker_script(30), 2: worker_script(4), 3: worker_script(9)}
SEQUENTIAL = {0: text("thinking alone ") + ANSWER}


def run(scripts, n=6, **kw):
    cfg = E.RunConfig(**{"mode": "async", "capacity": 4, "batch_episodes": 8, **kw})
    ex = E.Executor(tiny_model(), tok, cfg)
    eps = ex.run(ROWS * n, force=scripted(scripts))
    return ex, cfg, eps


@pytest.mark.parametrize("scripts", [[INTERLEAVED], [FORK_ALL], [INTERLEAVED, FORK_ALL, SEQUENTIAL]])
def test_latency_equals_the_protocol_reference(scripts):
    ex, cfg, eps = run(scripts)
    for ep in eps:
        rec = A.record(ep, tok, cfg)
        assert rec["format_errors"] == [] and ep.stop_reason == "answer"
        traj = A.trajectory(ep, tok, cfg)
        # the executor's own clock vs the pure function, thread by thread
        spans = {s.name: s for s in P.timeline(traj)}
        assert ep.organizer.finish_step - ep.step0 == P.critical_path(traj) == rec["latency"]
        for row in rec["trace"]["timeline"]:
            span = spans[row["thread"]]
            assert (row["fork_step"], row["finish"], row["tokens"]) == (span.fork_step, span.finish, span.tokens)
            assert [tuple(a) for a in row["active"]] == span.active
            if row["thread"] != "organizer":
                assert row["join_step"] == span.join_step
    # counted by hand: interleaved, the organizer waits at <JOIN-2> (step 17) for worker 2
    # (steps 12..31) and answers at 33..37; fork-all, it waits at <JOIN-1> (step 10) for
    # worker 1 (steps 4..36), joins 2 and 3 at 37, 38 and answers at 39..43
    assert A.record(eps[0], tok, cfg)["latency"] == (37 if scripts[0] is INTERLEAVED else 43)


def test_logprobs_match_a_full_forward_without_cache():
    """Every recorded log-probability equals the one from re-running the whole prefix (prompt,
    generated and injected tokens) through the model without a cache."""
    model = tiny_model()
    cfg = E.RunConfig(mode="async", capacity=4, batch_episodes=3, n_slots=4)  # workers queue
    eps = E.Executor(model, tok, cfg).run(ROWS * 3, force=scripted([INTERLEAVED, FORK_ALL, SEQUENTIAL]))
    checked = 0
    for ep in eps:
        for th in ep.threads:
            ids = torch.tensor([th.prompt + th.out])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids)[0], dim=-1)  # (T, V)
            for k, (t, inj, lp) in enumerate(zip(th.out, th.injected, th.logprobs)):
                if not inj:
                    ref = logp[len(th.prompt) + k - 1, t].item()
                    assert abs(ref - lp) < 1e-4, (th.role, k)
                    checked += 1
    assert checked > 100


def test_queueing_changes_steps_not_results():
    _, cfg, roomy = run([FORK_ALL], n=4)
    _, cfg2, tight = run([FORK_ALL], n=4, n_slots=3)  # 3 slots: workers wait in the queue
    for a, b in zip(roomy, tight):
        ra, rb = A.record(a, tok, cfg), A.record(b, tok, cfg2)
        assert ra["trace"]["organizer"] == rb["trace"]["organizer"]
        assert ra["latency"] == rb["latency"] and rb["format_errors"] == []
    assert max(A.record(e, tok, cfg2)["steps"] for e in tight) > A.record(roomy[0], tok, cfg)["steps"]


def uniform_model():
    """Every position gets the same logits: 0 for text tokens, -100 for tags."""
    model = tiny_model()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)  # the final hidden state is always all-ones
        model.lm_head.weight.zero_()
        model.lm_head.weight[256:] = -100.0 / model.config.n_embd  # tied: only logits matter
    return model


def test_forked_workers_sample_independently():
    """Uniform logits: three workers on the same sub-query write different texts."""
    def force(ep, th):  # script only the organizer: three identical forks, then joins
        org = fork(1, "same") + fork(2, "same") + fork(3, "same") + join(1) + join(2) + join(3) + ANSWER
        if th.role == "organizer":
            return org[th.generated] if th.generated < len(org) else None
        return None
    cfg = E.RunConfig(mode="async", capacity=4, max_worker_tokens=40, temperature=1.0, seed=1)
    ep = E.Executor(uniform_model(), tok, cfg).run(ROWS, force=force)[0]
    outs = [tuple(w.out[:8]) for w in ep.organizer.children.values()]
    assert len(outs) == 3 and len(set(outs)) == 3
    assert all(t < 256 for o in outs for t in o)


def test_greedy_is_deterministic_and_seeds_matter():
    rows = ROWS * 4
    def outs(**kw):
        cfg = E.RunConfig(mode="async", max_organizer_tokens=30, max_worker_tokens=20, **kw)
        return [A.record(e, tok, cfg)["trace"] for e in E.Executor(tiny_model(3), tok, cfg).run(rows)]
    assert outs(temperature=0) == outs(temperature=0, seed=5)
    assert outs(temperature=1.0, seed=2) == outs(temperature=1.0, seed=2)
    assert outs(temperature=1.0, seed=2) != outs(temperature=1.0, seed=3)


def test_parallel_mode_aggregates_by_rule():
    """N=3 workers on the whole question; the union of distinct expressions, first k; the
    organizer decodes nothing, so latency is the longest worker."""
    row = {"task": "countdown", "numbers": [1, 2, 3, 4, 5, 6], "target": 10, "k": 2}
    scripts = {1: worker_script(3, "4+6, 6+4"), 2: worker_script(8, "5*2, 9+1"), 3: worker_script(1, "x")}
    def force(ep, th):
        s = scripts[th.fork_id]
        return s[th.generated] if th.generated < len(s) else None
    cfg = E.RunConfig(mode="parallel", capacity=4)
    ep = E.Executor(tiny_model(), tok, cfg).run([row], force=force)[0]
    rec = A.record(ep, tok, cfg)
    assert rec["answers"] == ["4+6", "5*2"] and rec["correct"] and rec["n_correct"] == 2
    # worker 2 is the longest: 8 + <RETURN> + "5*2, 9+1" + </RETURN> = 18 tokens
    assert rec["latency"] == 18 and rec["format_errors"] == []
    assert rec["concurrency"] == pytest.approx((13 + 18 + 4) / 18, abs=1e-4)


def test_broken_parallel_episode_counts_the_steps_it_ran():
    """A worker that never returns hits its token limit: the episode stops with a format error
    while the organizer waits, and its latency is the steps it ran, not the organizer's 0."""
    row = {"task": "countdown", "numbers": [1, 2, 3, 4, 5, 6], "target": 10, "k": 2}
    def force(ep, th):
        return text("w")[0] if th.fork_id else None  # workers think forever
    cfg = E.RunConfig(mode="parallel", capacity=4, max_worker_tokens=12)
    ep = E.Executor(tiny_model(), tok, cfg).run([row], force=force)[0]
    rec = A.record(ep, tok, cfg)
    assert rec["format_errors"] and not rec["correct"]
    assert rec["latency"] == rec["steps"] == 12


def test_a_row_can_carry_a_structure_hint():
    row = {**ROWS[0], "plan": "F1 J1"}
    ex, cfg, eps = run([SEQUENTIAL], n=1)
    plain = eps[0].organizer.prompt
    eps = E.Executor(tiny_model(), tok, cfg).run([row], force=scripted([SEQUENTIAL]))
    assert tok.decode(eps[0].organizer.prompt) == tok.decode(plain) + "plan F1 J1\n"
    assert A.record(eps[0], tok, cfg)["plan"] == "F1 J1"


def test_parallel_sudoku_majority_vote():
    row = {"task": "sudoku", "puzzle": "1.3.....2..4...1"}
    grid_a, grid_b = "1234341221434321", "1234341221434312"
    scripts = {1: worker_script(2, grid_b), 2: worker_script(2, grid_a), 3: worker_script(5, grid_a)}
    def force(ep, th):
        s = scripts[th.fork_id]
        return s[th.generated] if th.generated < len(s) else None
    cfg = E.RunConfig(mode="parallel", capacity=4)
    rec = A.record(E.Executor(tiny_model(), tok, cfg).run([row], force=force)[0], tok, cfg)
    assert rec["answers"] == [grid_a]


def test_sequential_mode_forbids_forks():
    cfg = E.RunConfig(mode="sequential", capacity=4)
    ep = E.Executor(tiny_model(), tok, cfg).run(ROWS, force=scripted([INTERLEAVED]))[0]
    assert "pool-overflow" in P.error_names(A.record(ep, tok, cfg)["format_errors"])


def test_show_timeline_draws_every_thread():
    _, cfg, eps = run([INTERLEAVED], n=1)
    view = A.show_timeline(A.record(eps[0], tok, cfg))
    lines = view.splitlines()
    assert lines[0].startswith("latency 37 steps") and len(lines) == 5
    assert "." in lines[1] and "#" in lines[3]  # the organizer waited; worker 2 decoded


# ---------------------------------------------------------------- the command line

def cli(*args):
    return subprocess.run([sys.executable, "asyncthink.py", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "random.pt"
    torch.manual_seed(0)
    save_checkpoint(str(path), GPT(GPTConfig.preset("tiny", P.Tokenizer.bytes_level().n_vocab)),
                    tokenizer={"kind": "bytes", "max_forks": P.MAX_FORKS})
    return path


@pytest.mark.parametrize("mode", E.MODES)
def test_solve_writes_complete_records(tmp_path, random_ckpt, mode):
    puzzles = tmp_path / "p.jsonl"
    rows = [{"task": "countdown", "numbers": [2, 3, 5, 7, 11, 13], "target": 24, "k": 4},
            {"task": "sudoku", "puzzle": "1.3.....2..4...1"}]
    puzzles.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.jsonl"
    r = cli("solve", "--ckpt", str(random_ckpt), "--mode", mode, "--input", str(puzzles),
            "--output", str(out), "--max-organizer-tokens", "40", "--max-worker-tokens", "20", "--show", "1")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2
    for rec, row in zip(recs, rows):
        assert {k: rec[k] for k in row} == row and rec["mode"] == mode
        for key in ("answers", "correct", "latency", "concurrency", "tokens", "format_errors", "trace"):
            assert key in rec
    assert "all" in r.stdout and "latency" in r.stdout


def test_solve_errors_are_one_line(tmp_path, random_ckpt):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "countdown", "numbers": [1, 2], "target": 3, "k": 1}\n{not json\n')
    r = cli("solve", "--ckpt", str(random_ckpt), "--input", str(bad), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and ":2:" in r.stderr and "Traceback" not in r.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('{"task": "sudoku", "puzzle": "1.3.....2..4...1"}\n')
    r = cli("solve", "--ckpt", str(tmp_path / "missing.pt"), "--input", str(good), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    other = tmp_path / "other.pt"  # a model whose vocabulary is not the tokenizer's
    save_checkpoint(str(other), GPT(GPTConfig.preset("tiny", 300)), tokenizer={"kind": "bytes", "max_forks": 32})
    r = cli("solve", "--ckpt", str(other), "--input", str(good), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not match" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    r = cli("solve", "--ckpt", str(corrupt), "--input", str(good), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = cli("solve", "--ckpt", str(random_ckpt), "--input", str(good), "--output", str(tmp_path / "o"),
            "--mode", "parallel", "--capacity", "1")
    assert r.returncode == 2 and "capacity" in r.stderr


def test_solve_refuses_an_unwritable_output_before_it_starts(tmp_path, random_ckpt):
    good = tmp_path / "good.jsonl"
    good.write_text('{"task": "sudoku", "puzzle": "1.3.....2..4...1"}\n')
    r = cli("solve", "--ckpt", str(random_ckpt), "--input", str(good),
            "--output", str(tmp_path / "no-such-folder" / "o.jsonl"))
    assert r.returncode == 2 and "no-such-folder" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "solve" not in r.stdout  # nothing was solved


def test_solve_writes_each_record_as_its_episode_ends(random_ckpt):
    """The records reach the file while the run goes on (a killed run keeps them), in the order
    the episodes end; solve still returns them in row order."""
    model, tok = A.load_model(str(random_ckpt))
    rows = [{"task": "countdown", "numbers": [2, 3, 5, 7, 11, 13], "target": 24, "k": 4}] * 3 + \
           [{"task": "sudoku", "puzzle": "1.3.....2..4...1"}] * 3
    cfg = E.RunConfig(mode="async", max_organizer_tokens=40, max_worker_tokens=20, batch_episodes=2, seed=1)
    lines_at_each_write = []

    class Recording(io.StringIO):
        def write(self, text):
            lines_at_each_write.append(self.getvalue().count("\n"))
            return super().write(text)

    out = Recording()
    records = A.solve(model, tok, rows, cfg, progress=False, out=out)
    written = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines_at_each_write == list(range(len(rows)))  # one line per write, one write per episode
    assert [r["task"] for r in records] == [r["task"] for r in rows]  # returned in row order
    key = lambda r: json.dumps(r, sort_keys=True)
    assert sorted(map(key, written)) == sorted(map(key, records))


def test_an_existing_output_survives_a_failed_solve(tmp_path, random_ckpt):
    out = tmp_path / "o.jsonl"
    out.write_text("previous results\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    r = cli("solve", "--ckpt", str(random_ckpt), "--input", str(bad), "--output", str(out))
    assert r.returncode == 2 and out.read_text() == "previous results\n"


def test_solve_accepts_a_pretrained_gpt2_folder(tmp_path):
    """--ckpt may be a GPT-2 folder: weights through the model hook, BPE through tiktoken,
    the protocol's tags appended to both."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    encoder = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges = ["Ġ t", "h e", "1 2"]
    for m in merges:
        encoder["".join(m.split())] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    folder = tmp_path / "gpt2-tiny"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=512,
                               vocab_size=len(encoder))).save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(encoder))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    model, tok2 = A.load_model(str(folder))
    assert model.config.vocab_size == tok2.n_vocab == len(encoder) + len(P.special_token_names())
    puzzles = tmp_path / "p.jsonl"
    puzzles.write_text('{"task": "countdown", "numbers": [2, 3, 5, 7, 11, 13], "target": 24, "k": 4}\n')
    r = cli("solve", "--ckpt", str(folder), "--input", str(puzzles), "--output", str(tmp_path / "o.jsonl"),
            "--max-organizer-tokens", "30", "--max-worker-tokens", "20")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o.jsonl").read_text())["mode"] == "async"


def test_sample_draws_each_id_at_its_probability():
    """Inverse transform sampling against the distribution itself: 100,000 draws of each row
    land on each id within 5 standard errors of its probability, and never on an id of
    probability 0 (first, last, or between two others)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.stack([torch.tensor([0.0, 0.2, 0.5, 0.0, 0.3, 0.0]),
                        torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0]),
                        torch.softmax(torch.randn(6, generator=g) * 2, dim=0)])
    n = 100_000
    ids = E.sample(rows.repeat_interleave(n, dim=0), g).view(3, n)
    for p, drawn in zip(rows, ids):
        freq = torch.bincount(drawn, minlength=6).float() / n
        assert (freq[p == 0] == 0).all()
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (freq, p)


def test_decode_is_one_forward_of_its_threads():
    """Threads in slots 0, 1 and 3 (slot 2 holds a waiting thread) decode in one forward of
    exactly those slots (in slot order), however the model groups them to read the cache (one run over 0..3
    with slot 2 riding along, or one run per thread); each thread's logits equal a full forward
    of its own tokens (oracle), and slot 2 is left as it was. Released slots go out lowest first."""
    from types import SimpleNamespace
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(tok.n_vocab, (n,), generator=g) for n in (5, 9, 7, 3)]
    for run_cost in (10**9, 0):  # one run of slots 0..3; then three runs, one per thread
        ex = E.Executor(model, tok, E.RunConfig(mode="async", capacity=4))
        ex.cache.run_cost = run_cost
        with torch.no_grad():
            for s, seq in enumerate(seqs):
                model.forward_cached(seq[None, :-1], ex.cache, torch.tensor([s]))
        calls, forward = [], model.forward_cached
        model.forward_cached = lambda idx, cache, slots, n_new=None: calls.append((slots.tolist(), n_new.tolist())) or forward(idx, cache, slots, n_new)
        threads = [SimpleNamespace(slot=s, feed=[int(seqs[s][-1])], logits=None) for s in (3, 0, 1)]
        ex.decode(threads)
        del model.forward_cached
        assert calls == [([0, 1, 3], [1, 1, 1])]  # in slot order
        assert ex.cache.lengths.tolist()[:4] == [5, 9, 6, 3]  # slot 2 stays at 6
        for th in threads:
            ref = model(seqs[th.slot][None])[0, -1]
            torch.testing.assert_close(th.logits, ref, atol=1e-5, rtol=1e-5)
            assert th.feed == []
    ex.free_slots = []
    for s in (5, 1, 3):
        ex.release(SimpleNamespace(slot=s))
    assert ex.free_slots == [1, 3, 5]
