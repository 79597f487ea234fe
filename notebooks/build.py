"""
Build the course notebooks from this file, so they read (and diff) as Python source.

    python notebooks/build.py              # write the five .ipynb files, without outputs
    python notebooks/build.py --execute    # ... and run them top to bottom, saving the outputs
    python notebooks/build.py --execute 2  # only notebooks whose name starts with "2"

The committed notebooks carry the outputs of `--execute` at the normal settings. With
ASYNCTHINK_QUICK=1 in the environment the notebooks shrink their steps and sizes (CI runs them
that way, tests/test_notebooks.py), so never commit a quick run's outputs.

Each notebook is a list of cells: md("...") for text, code("...") for code. A notebook's first
code cell makes the project's modules importable, whether the kernel starts in notebooks/ (as
Jupyter does) or in the project's folder.
"""

import argparse
import os
import sys
import textwrap
import time

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))


def md(text):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text):
    return new_code_cell(textwrap.dedent(text).strip())


SETUP = code("""
    import os, sys
    HERE = os.path.abspath("notebooks" if os.path.isdir("notebooks") else ".")
    sys.path[:0] = [os.path.dirname(HERE), HERE]  # the project's modules, and course.py beside this notebook
    from course import QUICK  # ASYNCTHINK_QUICK=1 (CI) shrinks steps and sizes
    print("quick mode" if QUICK else "normal mode")
""")


# =============================================================================
# 1. The protocol

PROTOCOL = [
    md("""
    # 1. The protocol: how one model organizes its own thinking

    AsyncThink (*The Era of Agentic Organization*, arXiv 2510.26658) lets **one** language model
    play two roles in plain text:

    * the **organizer** reads the question, starts workers on sub-queries with
      `<FORK-i>sub-query</FORK-i>`, keeps thinking while they work, waits for one with `<JOIN-i>`
      and finally answers with `<ANSWER>...</ANSWER>`;
    * a **worker** sees only its sub-query (not the organizer's context), thinks, and hands back a
      short takeaway with `<RETURN>...</RETURN>`.

    In this notebook you will

    1. write a trajectory by hand and let `protocol.parse` validate it,
    2. compute its **latency** (the critical path) and its **concurrency η** by hand, then check them
       against `protocol.critical_path`, `protocol.concurrency` and `protocol.timeline`,
    3. draw its timeline,
    4. see why *parallel thinking* (fork the question N times, vote) is a special case,
    5. meet every named **format error**.

    Everything here is pure Python: no model, no training. It runs in seconds.
    """),
    SETUP,
    md("""
    ## What the organizer and a worker read

    A puzzle is a row of data. Here: *countdown* — give `k = 2` different expressions that make the
    target 10 from the numbers 2 3 5 7 (each number at most once). The organizer's prompt is the
    question; a worker's prompt is only its sub-query.
    """),
    code("""
    import protocol as P

    row = {"task": "countdown", "numbers": [2, 3, 5, 7], "target": 10, "k": 2}
    question = P.question_text(row)
    print(repr(P.organizer_prompt(question)))
    print(repr(P.worker_prompt("5 3 to 10")))
    """),
    md("""
    The tokenizer is byte-level: every character is one token, and every **tag is one special
    token**. So the executor can run a little state machine on token ids, and counting tokens by
    hand is easy: count characters, and count each tag as 1.
    """),
    code("""
    tok = P.Tokenizer.bytes_level()
    ids = tok.encode("<FORK-2>7*3</FORK-2>")
    for t in ids:
        print(f"{t:4d}  {tok.decode([t])!r:14}  tag={tok.tag(t)}")
    print("vocabulary:", tok.n_vocab, "tokens = 256 bytes +", tok.n_vocab - 256, "special tokens")
    """),
    md("""
    This notebook counts tokens by hand, so it uses the byte-level tokenizer: one token per
    character. The models `train.py` trains use `P.Tokenizer.numbers()`, which also has one token
    per number of up to 3 digits (`"12"` is one token wherever it stands; the space before it is a
    token of its own) and one per word the traces write (`"below"`, `"ok"`): a thread copies
    numbers all the time, and copying one token is far easier for a small model than copying digit
    by digit.
    """),
    code("""
    num = P.Tokenizer.numbers()
    print([num.decode([t]) for t in num.encode("<FORK-2>12 9 of 3 9 12 to 30</FORK-2>")])
    print("vocabulary:", num.n_vocab, "tokens")
    """),
    md("""
    ## A trajectory written by hand

    Pool capacity **c = 3**: the organizer plus at most 2 running workers. The organizer splits the
    search by first step: worker 1 tries `5 3`, worker 2 tries `7 3`.

    | thread | text it produces (prompt not included) |
    |---|---|
    | organizer | `<FORK-1>5 3 to 10</FORK-1><FORK-2>7 3 to 10</FORK-2>hmm<JOIN-1>`**`5+3+2</JOIN-1>`**`<JOIN-2>`**`7+3</JOIN-2>`**`<ANSWER>5+3+2, 7+3</ANSWER>` |
    | worker 1 | `5+3=8 8+2=10<RETURN>5+3+2</RETURN>` |
    | worker 2 | `7+3=10<RETURN>7+3</RETURN>` |

    The **bold** parts are not written by the model: when the organizer emits `<JOIN-i>`, the
    executor *injects* the worker's takeaway and the closing `</JOIN-i>` into the organizer's context.
    Injected tokens are prefilled, not decoded, so they cost no decoding step.
    """),
    code("""
    organizer = ("<FORK-1>5 3 to 10</FORK-1><FORK-2>7 3 to 10</FORK-2>hmm"
                 "<JOIN-1>5+3+2</JOIN-1><JOIN-2>7+3</JOIN-2><ANSWER>5+3+2, 7+3</ANSWER>")
    workers = {1: "5+3=8 8+2=10<RETURN>5+3+2</RETURN>",
               2: "7+3=10<RETURN>7+3</RETURN>"}

    traj = P.parse_text(organizer, workers, tok, capacity=3, task="countdown")
    print("format errors:", traj.errors)
    print("answers:      ", traj.answers)
    print("structure:    ", P.plan_of(traj))
    print("events:       ", traj.organizer.events)
    print("sub-queries:  ", traj.organizer.sub_queries)
    print("decoded tokens: organizer", traj.organizer.generated,
          {f"worker {i}": w.generated for i, w in traj.organizer.children.items()})
    """),
    md("""
    ### Counting the organizer's tokens by hand

    An event's `pos` is the number of tokens the organizer has *decoded* up to and including the tag.

    | segment | decoded tokens | organizer tokens so far | event |
    |---|---|---|---|
    | `<FORK-1>` + `5 3 to 10` (9 characters) + `</FORK-1>` | 1 + 9 + 1 = 11 | 11 | fork 1 at pos 11 |
    | `<FORK-2>` + `7 3 to 10` + `</FORK-2>` | 11 | 22 | fork 2 at pos 22 |
    | `hmm` | 3 | 25 | |
    | `<JOIN-1>` | 1 | 26 | join 1 at pos 26 |
    | `5+3+2</JOIN-1>` (injected) | 0 | 26 | |
    | `<JOIN-2>` | 1 | 27 | join 2 at pos 27 |
    | `7+3</JOIN-2>` (injected) | 0 | 27 | |
    | `<ANSWER>` + `5+3+2, 7+3` (10 characters) + `</ANSWER>` | 12 | **39** | |

    Workers: `5+3=8 8+2=10` (12) + `<RETURN>` + `5+3+2` (5) + `</RETURN>` = **19** tokens;
    `7+3=10` (6) + `<RETURN>` + `7+3` (3) + `</RETURN>` = **11** tokens.
    """),
    code("""
    assert [(e.kind, e.id, e.pos) for e in traj.organizer.events] == \\
        [("fork", 1, 11), ("fork", 2, 22), ("join", 1, 26), ("join", 2, 27)]
    assert traj.organizer.generated == 39
    assert [w.generated for w in traj.organizer.children.values()] == [19, 11]
    print("the hand count agrees with protocol.parse")
    """),
    md("""
    ## Latency: the critical path, by hand

    The protocol's clock: **every running thread decodes one token per step**, all in parallel.

    * A worker forked at step *s* (its `</FORK-i>` was decoded at step *s*) decodes its first token at
      step *s + 1*.
    * At `<JOIN-i>` the organizer pauses until worker *i* has finished; a join completes at
      **max(organizer's own progress, fork step + worker's length)**.
    * Injected tokens are free.

    **Latency** is the step at which the organizer decodes its last token. Step by step:

    | global steps | organizer | worker 1 (19 tokens) | worker 2 (11 tokens) | threads decoding |
    |---|---|---|---|---|
    | 1–11 | tokens 1–11; `</FORK-1>` at step 11 | | | 1 |
    | 12–22 | tokens 12–22; `</FORK-2>` at step 22 | tokens 1–11 | | 2 |
    | 23–26 | tokens 23–26; `<JOIN-1>` at step 26 | tokens 12–15 | tokens 1–4 | 3 |
    | 27–30 | **waits**: worker 1 ends at 11 + 19 = 30 | tokens 16–19 (done) | tokens 5–8 | 2 |
    | 31 | token 27 = `<JOIN-2>` | | token 9 | 2 |
    | 32–33 | **waits**: worker 2 ends at 22 + 11 = 33 | | tokens 10–11 (done) | 1 |
    | 34–45 | tokens 28–39: the answer | | | 1 |

    So the **latency is 45 steps**, although 39 + 19 + 11 = **69** tokens were decoded.

    **Thinking concurrency** η = (1/T) Σ_t a_t, the average number of threads decoding per step on the
    critical path of length T. From the last column:

    η = (11·1 + 11·2 + 4·3 + 4·2 + 1·2 + 2·1 + 12·1) / 45 = 69 / 45 ≈ **1.533**

    (η equals total tokens / latency here: every thread decodes only inside the organizer's lifetime.
    A single thread writing the same 69 tokens would need 69 steps.)
    """),
    code("""
    spans = P.timeline(traj)
    for s in spans:
        print(s)

    assert P.critical_path(traj) == 45
    assert abs(P.concurrency(traj) - 69 / 45) < 1e-12
    org, w1, w2 = spans
    assert org.active == [(1, 26), (31, 31), (34, 45)]           # decoding runs, with the two waits
    assert (w1.fork_step, w1.active, w1.join_step) == (11, [(12, 30)], 30)
    assert (w2.fork_step, w2.active, w2.join_step) == (22, [(23, 33)], 33)
    print(f"latency {P.critical_path(traj)} steps, eta {P.concurrency(traj):.3f}: the table above is right")
    """),
    md("""
    ## Drawing the timeline

    One row per thread, the global step on the x axis. Green arrows are forks, red arrows joins; the
    hatched band is where the organizer waits. (The drawing code is `gantt` in `notebooks/course.py`.)
    """),
    code("""
    %matplotlib inline
    import matplotlib.pyplot as plt
    from course import gantt

    gantt(spans, f"hand-written trajectory: latency {P.critical_path(traj)} steps, "
                 f"η = {P.concurrency(traj):.2f} (c = 3)")
    plt.show()
    """),
    md("""
    Read the picture against the table: the organizer waits twice (steps 27–30 for worker 1 and
    32–33 for worker 2). Had it written a longer thought instead of `hmm` (a few tokens longer:
    exercise 1 finds how many), the waits would shrink and the latency would stay 45 — free thinking. That is what the RL stage's concurrency reward
    encourages.

    **Sequential thinking** is the special case with no fork at all: one thread, η = 1, latency =
    the number of tokens it decodes.
    """),
    code("""
    alone = P.parse_text("5+3=8 8+2=10 7+3=10<ANSWER>5+3+2, 7+3</ANSWER>", {}, tok, capacity=1, task="countdown")
    print("errors", alone.errors, "| latency", P.critical_path(alone), "| eta", P.concurrency(alone))
    assert P.critical_path(alone) == alone.organizer.generated == 19 + 12  # 19 characters of thought, 12 of answer
    assert P.concurrency(alone) == 1.0
    """),
    md("""
    ## Parallel thinking is a special case

    *Parallel thinking* forks the **whole question** to N workers at the start, joins them all at
    the end and aggregates their answers (here: the union of distinct expressions; for Sudoku a
    majority vote). It is a fixed organizer policy, so the executor writes the organizer's forks,
    joins and answer itself: all **injected**, the organizer decodes nothing.

    Worked example, N = 3 workers of 30, 42 and 25 tokens, all starting at step 1:

    * latency = max(30, 42, 25) = **42** steps (the slowest worker sets the pace),
    * η = (30 + 42 + 25) / 42 = 97 / 42 ≈ **2.31**.

    We pass `injected` (one flag per organizer token) to `protocol.parse`: that is exactly what the
    executor does in parallel mode.
    """),
    code("""
    lengths = {1: 30, 2: 42, 3: 25}
    found = {1: "5+3+2", 2: "7+3", 3: "5+3+2"}
    def worker_text(i):  # filler thinking, then the takeaway: exactly lengths[i] tokens
        return "x" * (lengths[i] - 2 - len(found[i])) + f"<RETURN>{found[i]}</RETURN>"

    par_text = ("".join(f"<FORK-{i}>{question}</FORK-{i}>" for i in lengths)
                + "".join(f"<JOIN-{i}>{found[i]}</JOIN-{i}>" for i in lengths)
                + P.answer_text(["5+3+2", "7+3"]))
    par_ids = tok.encode(par_text)
    parallel = P.parse(par_ids, {i: tok.encode(worker_text(i)) for i in lengths}, tok, capacity=4,
                       task="countdown", injected=[True] * len(par_ids))
    print("errors", parallel.errors, "| structure", P.plan_of(parallel),
          "| latency", P.critical_path(parallel), "| eta", round(P.concurrency(parallel), 3))
    assert P.critical_path(parallel) == 42 and abs(P.concurrency(parallel) - 97 / 42) < 1e-12

    gantt(P.timeline(parallel), "parallel thinking, N = 3: latency = the slowest worker (42 steps)")
    plt.show()
    """),
    md("""
    What if the organizer had to *write* those forks itself? Each fork is `<FORK-i>` + the
    28-character question + `</FORK-i>` = 30 decoded tokens, so worker 3 could only start at step 90
    and the latency grows to 127: the text of a sub-query is on the critical path. That is why an
    AsyncThink organizer learns short sub-queries.
    """),
    code("""
    written = P.parse_text(par_text, {i: worker_text(i) for i in lengths}, tok, capacity=4, task="countdown")
    print("organizer writes its forks: latency", P.critical_path(written), "eta", round(P.concurrency(written), 3))
    assert P.critical_path(written) == 127
    """),
    md("""
    ## Format errors, by name

    A model can write anything, and the executor must never crash or hang on it. `protocol.parse`
    reports every problem as a **named format error** (`"<name>: <detail>"`); the executor ends an
    episode at its first one, and RL gives such a trajectory the format penalty.

    | name | what went wrong |
    |---|---|
    | `duplicate-id` | `<FORK-i>` with an id this organizer already used |
    | `pool-overflow` | a fork while c−1 workers are forked and not yet joined |
    | `unknown-join` | `<JOIN-i>` of an id never forked (or joined twice) |
    | `unjoined-fork` | a fork never joined before the answer |
    | `wrong-role` | an organizer tag in a worker, or `<RETURN>` in the organizer |
    | `unclosed-fork` | `<FORK-i>` without its `</FORK-i>` |
    | `stray-tag` | a closing tag without its opening, or a prompt marker |
    | `missing-return` | a worker without `<RETURN>...</RETURN>` |
    | `missing-answer` | an organizer without `<ANSWER>...</ANSWER>` |
    | `bad-answer` | an answer that does not parse for the task |

    One minimal broken trajectory for each (organizer text, worker texts, capacity):
    """),
    code("""
    A, R = "<ANSWER>7+3</ANSWER>", "<RETURN>7+3</RETURN>"
    broken = {
        "duplicate-id":   ("<FORK-1>a</FORK-1><JOIN-1>x</JOIN-1><FORK-1>b</FORK-1><JOIN-1>y</JOIN-1>" + A, {1: R}, 4),
        "pool-overflow":  ("<FORK-1>a</FORK-1><FORK-2>b</FORK-2><JOIN-1>x</JOIN-1><JOIN-2>y</JOIN-2>" + A, {1: R, 2: R}, 2),
        "unknown-join":   ("<JOIN-3>x</JOIN-3>" + A, {}, 4),
        "unjoined-fork":  ("<FORK-1>a</FORK-1>" + A, {1: R}, 4),
        "wrong-role":     ("<FORK-1>a</FORK-1><JOIN-1>x</JOIN-1>" + A, {1: "<JOIN-1>" + R}, 4),
        "unclosed-fork":  ("<FORK-1>5 3 to 10", {}, 4),
        "stray-tag":      ("</FORK-2>" + A, {}, 4),
        "missing-return": ("<FORK-1>a</FORK-1><JOIN-1>x</JOIN-1>" + A, {1: "thinking..."}, 4),
        "missing-answer": ("thinking...", {}, 4),
        "bad-answer":     ("<ANSWER>ten</ANSWER>", {}, 4),
    }
    assert sorted(broken) == sorted(P.ERROR_NAMES)  # one example per named error
    for name, (org_text, worker_texts, c) in broken.items():
        errors = P.parse_text(org_text, worker_texts, tok, capacity=c, task="countdown").errors
        assert P.error_names(errors)[0] == name, (name, errors)
        print(f"{name}  (c = {c})")
        print(f"    organizer: {org_text}")
        for i, text in worker_texts.items():
            print(f"    worker {i}:  {text}")
        for e in errors:
            print(f"    -> {e}")
    """),
    md("""
    Some broken trajectories carry more than one error: an unclosed fork also means no answer. The
    first error is the one the executor stops at.

    ## Exercises

    1. **Free thinking.** Replace `hmm` in the hand-written organizer by a 6-character thought. Predict
       the new latency and η with the step table before running the cells, then check with
       `P.critical_path` and `P.concurrency`. How long can the thought get before the latency grows?
    2. **Interleave.** Rewrite the trajectory as `F1 J1 F2 J2` (join worker 1 before forking worker 2).
       Compute its latency by hand, then with the code. Why is it slower than `F1 F2 J1 J2`?
    3. **Capacity.** Parse the hand-written trajectory with `capacity=2`. Which named error do you get,
       and at which tag? Add a third worker with c = 3 and find the smallest c that accepts it.
    4. **Parallel vs async.** In the parallel example, what is the latency if the slowest worker
       (42 tokens) is cut to 20? Write an async trajectory that finds the same two answers with a
       lower latency than 42 steps, and draw it with `gantt`.
    """),
]


# =============================================================================
# 2. The executor

EXECUTOR = [
    md("""
    # 2. The executor: organizers and workers decoding together

    Notebook 1 *computed* a latency from a finished trajectory. The executor (`executor.py`)
    *produces* trajectories: it runs the model, and every step it decodes **one token for every
    running thread of every episode in a single batched forward pass**. One step is five phases
    (`Executor.step`): admit queued threads into free cache slots, push pending tokens into the
    cache, sample, advance each thread's state machine, retire the episodes that ended. A forked worker thus really
    thinks at the same time as its organizer, and wall-clock time follows the critical path, not
    the total token count.

    In this notebook you will

    1. take the KV cache apart, tensor by tensor,
    2. follow a scripted episode step by step and slot by slot: prefills, batched decode steps, a
       fork, a wait, a join,
    3. measure how much faster batched decoding is than decoding thread by thread, or without a cache.

    The model has random weights: it cannot fork on its own, so the episode follows a **script**
    (the tests and `bench.py` do the same). Every scripted token still costs a full decode step.
    """),
    SETUP,
    md("""
    ## The KV cache, tensor by tensor

    A transformer decodes token *t* by attending over the keys and values of tokens 0..*t*. Storing
    them (the **KV cache**) makes one decoding step cost one token's forward instead of the whole
    prefix's. AsyncThink has many threads of different lengths, so the cache is split into
    **slots**, one thread per slot, each slot at its own length:

    * `k`, `v`: `(n_layer, n_slots, n_head, max_len, head_dim)`, allocated once;
    * `lengths`: `(n_slots,)`, how many positions of each slot hold real tokens.

    We use the `tiny` model preset (2 layers, 2 heads, 32 channels) so that the numbers stay small.
    """),
    code("""
    import torch
    import protocol as P
    from model import GPT, GPTConfig

    tok = P.Tokenizer.bytes_level()
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", tok.n_vocab)).eval()
    c = model.config
    print(c)
    print(f"{model.num_params():,} parameters (random weights)")

    cache = model.new_cache(n_slots=3, max_len=64)
    print("k      ", tuple(cache.k.shape), cache.k.dtype)
    print("v      ", tuple(cache.v.shape), cache.v.dtype)
    print("lengths", tuple(cache.lengths.shape), cache.lengths.tolist())
    """),
    md("""
    Memory, by hand: 2 tensors (k and v) × `n_layer` × `n_slots` × `max_len` × `n_embd` × 4 bytes
    (float32) = 2 × 2 × 3 × 64 × 32 × 4 = **98,304 bytes**. The `small` model with 64 slots of 1024
    tokens needs 2 × 4 × 64 × 1024 × 128 × 4 bytes = 256 MiB: the cache, not the 1M-parameter
    model, fills the memory.
    """),
    code("""
    formula = 2 * c.n_layer * cache.n_slots * cache.max_len * c.n_embd * 4
    print(cache.nbytes(), "bytes; by hand", formula)
    assert cache.nbytes() == formula == 98_304
    """),
    md("""
    ### Prefill, then decode — every slot at its own length

    `model.forward_cached(idx, cache, slots, n_new)` appends tokens to some slots and returns their
    logits. A **prefill** pushes a whole prompt (T > 1 tokens); a **decode step** pushes one token
    per row (T = 1). Rows of different lengths are right-padded, and `n_new` tells each row's true
    count. Below, the organizer's prompt goes into slot 0 and a worker's prompt into slot 2 in one
    padded prefill; slot 1 stays free.
    """),
    code("""
    org_prompt = tok.encode(P.organizer_prompt("countdown 2 of 2 3 5 7 to 10"))
    wrk_prompt = tok.encode(P.worker_prompt("5 3 to 10"))
    T = max(len(org_prompt), len(wrk_prompt))
    idx = torch.tensor([org_prompt + [tok.pad] * (T - len(org_prompt)),
                        wrk_prompt + [tok.pad] * (T - len(wrk_prompt))])       # (2, T), right-padded
    n_new = torch.tensor([len(org_prompt), len(wrk_prompt)])
    with torch.no_grad():
        logits = model.forward_cached(idx, cache, torch.tensor([0, 2]), n_new)
    print("prefill idx", tuple(idx.shape), "-> logits", tuple(logits.shape))
    print("lengths after the prefill:", cache.lengths.tolist())
    assert cache.lengths.tolist() == [len(org_prompt), 0, len(wrk_prompt)] == [30, 0, 11]
    """),
    md("""
    Now one **decode step** for both threads at once: each row samples (here: takes the argmax of)
    its next token from the logits at its own last real position, and pushes it. One forward,
    `idx` of shape `(2, 1)`, two slots at lengths 30 and 11.

    How can one batched attention respect two different lengths? The new token of row *b* sits at
    position *p* = `lengths[slot]`, and it may look at key position *k* iff **k ≤ p**. That single
    rule gives the causal mask and hides whatever stale data lies beyond a slot's length.
    """),
    code("""
    last = logits[torch.arange(2), n_new - 1]          # (2, V): each row's last real position
    nxt = last.argmax(-1)                                # (2,)
    start = cache.lengths[torch.tensor([0, 2])].clone()  # positions of the new tokens: [30, 11]
    with torch.no_grad():
        step_logits = model.forward_cached(nxt[:, None], cache, torch.tensor([0, 2]))
    print("decode idx", tuple(nxt[:, None].shape), "tokens", [tok.decode([t]) for t in nxt.tolist()])
    print("lengths after one decode step:", cache.lengths.tolist())

    key_pos = torch.arange(int(start.max()) + 1)
    mask = key_pos[None, :] <= start[:, None]            # (2, L): which keys each row attends to
    for b, slot in enumerate([0, 2]):
        print(f"row {b} (slot {slot}, position {int(start[b])}) attends to {int(mask[b].sum())} keys")
    """),
    md("""
    **Check against an oracle.** The cache is only a speed trick: the logits must equal those of a
    plain forward pass over each thread's whole sequence, without any cache.
    """),
    code("""
    with torch.no_grad():
        for b, prompt in enumerate([org_prompt, wrk_prompt]):
            full = model(torch.tensor([prompt + [int(nxt[b])]]))[0]  # logits (T, V), no cache
            err = (full[-1] - step_logits[b, 0]).abs().max().item()
            print(f"row {b}: max |cached - uncached| = {err:.2e}")
            assert err < 1e-4
    """),
    md("""
    ## A scripted episode, followed slot by slot

    We replay the trajectory of notebook 1 (c = 3, organizer forks 1 and 2, thinks `hmm`, joins both,
    answers). `force(episode, thread)` hands the executor the next **generated** token of the script;
    the join results (`5+3+2</JOIN-1>`) are not in the script: the executor injects them itself.

    To watch it work we subclass the executor and take notes: every `forward` call (which slots,
    at which lengths) and, after every step, each thread's state.
    """),
    code("""
    import asyncthink as A, executor as E

    organizer = ("<FORK-1>5 3 to 10</FORK-1><FORK-2>7 3 to 10</FORK-2>hmm"
                 "<JOIN-1>5+3+2</JOIN-1><JOIN-2>7+3</JOIN-2><ANSWER>5+3+2, 7+3</ANSWER>")
    workers = {1: "5+3=8 8+2=10<RETURN>5+3+2</RETURN>", 2: "7+3=10<RETURN>7+3</RETURN>"}
    org_ids = tok.encode(organizer)
    script = {0: [t for t, injected in zip(org_ids, P.injected_by_joins(org_ids, tok)) if not injected],
              **{i: tok.encode(text) for i, text in workers.items()}}
    print("organizer script:", len(script[0]), "generated tokens; workers:", {i: len(s) for i, s in script.items() if i})

    def force(episode, thread):  # thread.fork_id: 0 for the organizer, i for worker i
        s = script[thread.fork_id]
        return s[thread.generated] if thread.generated < len(s) else None

    def name(th):
        return "O" if th.role == "organizer" else f"W{th.fork_id}"

    class Watcher(E.Executor):
        \"\"\"The executor, taking notes: every forward call, and every thread after every step.\"\"\"
        def __init__(self, *args):
            super().__init__(*args)
            self.calls, self.notes = [], []

        def forward(self, idx, slots, n_new):
            held = {th.slot: name(th) for ep in self.active for th in ep.threads if th.slot is not None}
            self.calls.append(dict(step=self.clock + 1, shape=tuple(idx.shape),  # runs in step clock + 1
                                   rows=[(held.get(s, "free"), s, int(self.cache.lengths[s]), n)
                                         for s, n in zip(slots.tolist(), n_new.tolist())]))
            return super().forward(idx, slots, n_new)

        def sample_and_advance(self, threads):
            slot_before = {name(th): th.slot for th in threads}
            super().sample_and_advance(threads)
            ep = threads[0].episode
            note = {}
            for th in ep.threads:
                decoded = [t for t, injected in zip(th.out, th.injected) if not injected]
                note[name(th)] = dict(state=th.state, pending=len(th.feed),
                                      slot=th.slot if th.slot is not None else slot_before.get(name(th)),
                                      decoded=tok.decode(decoded[-1:]) if name(th) in slot_before else None,
                                      length=int(self.cache.lengths[th.slot]) if th.slot is not None else None)
            self.notes.append(note)

    row = {"task": "countdown", "numbers": [2, 3, 5, 7], "target": 10, "k": 2}
    cfg = E.RunConfig(mode="async", capacity=3, batch_episodes=1, temperature=0)
    ex = Watcher(model, tok, cfg)
    episode = ex.run([row], force=force)[0]
    rec = A.record(episode, tok, cfg)
    print("slots:", ex.n_slots, "| stop:", episode.stop_reason, "| errors:", rec["format_errors"],
          "| answers:", rec["answers"], "| latency:", rec["latency"], "| eta:", rec["concurrency"])
    """),
    md("""
    ### The slot table

    One line per step. Each slot shows the thread in it (O organizer, W*i* worker *i*), the token it
    decoded in this step, and the slot's length in the cache after the step. Note the one-step lag:
    a token decoded in step *s* enters the cache at the start of step *s + 1*, in the forward pass
    that computes the logits for the next token. `waits`: an organizer paused at a `<JOIN-i>`;
    `+n to push`: tokens to prefill in the next step (a join's injected takeaway);
    `done`: the thread has ended and its slot is free again.
    """),
    code("""
    def cell(who, n):
        token = repr(n["decoded"]) if n["decoded"] is not None else ""  # decoded in this step
        if n["state"] == "done":
            status = "done"
        elif n["state"] == "waiting":
            status = f"waits, len {n['length']}"
        elif n["decoded"] is None:
            status = f"+{n['pending']} to push, len {n['length']}"
        else:
            status = f"len {n['length']}"
        return f"{who:<2} {token:<11} {status}"

    W = 33
    print(f"{'step':>4} | " + " | ".join(f"{'slot ' + str(s):<{W}}" for s in range(ex.n_slots)) + " | queued")
    for step, note in enumerate(ex.notes, start=1):
        cells = [""] * ex.n_slots
        for who, n in note.items():
            if n["slot"] is not None and (n["state"] != "done" or n["decoded"] is not None):
                cells[n["slot"]] = cell(who, n)
        queued = " ".join(who for who, n in note.items() if n["state"] == "queued")
        print(f"{step:>4} | " + " | ".join(f"{c:<{W}}" for c in cells) + f" | {queued}")
    """),
    md("""
    Things to find in the table:

    * **step 11**: the organizer decodes `</FORK-1>`; worker 1 is created and queued. In step 12 it gets
      slot 1, its 11-token prompt is **prefilled** and it decodes its first token — the same step.
    * **steps 23–26**: three threads decode in each step.
    * **step 26**: the organizer decodes `<JOIN-1>`, but worker 1 is still running: the organizer
      **waits** (it does not decode, its slot keeps its length).
    * **step 30**: worker 1 decodes `</RETURN>` and frees its slot; the organizer wakes up with
      `<JOIN-1>` plus the injected takeaway `5+3+2</JOIN-1>` to push: 7 tokens, one prefill in step 31,
      which also gives it the logits to decode `<JOIN-2>` — and wait again, for worker 2.
    * the last step is 45, exactly the latency computed by hand in notebook 1.

    ### One batched decode step

    Here are the forward calls of step 24: a **single** forward with `idx` of shape `(3, 1)` — the
    organizer and both workers, each in its own slot at its own length.
    """),
    code("""
    for call in ex.calls:
        if call["step"] == 24:
            print(f"step {call['step']}: idx {call['shape']}")
            for who, slot, length, n in call["rows"]:
                if n == 0:  # a slot between two decoding ones: its row writes nothing
                    print(f"    {who} in slot {slot}: rides along (n_new = 0), its slot stays at {length} tokens")
                else:
                    print(f"    {who} in slot {slot}, {length} tokens cached -> its new token goes to position {length}")
    sizes = [call["shape"][0] for call in ex.calls if call["shape"][1] == 1]
    print("rows per decode forward over the episode:", sizes)
    """),
    md("""
    The executor's own clock must agree with the protocol's reference (`protocol.timeline` on the
    trajectory it produced). Both views of the timeline:
    """),
    code("""
    %matplotlib inline
    import matplotlib.pyplot as plt
    from course import gantt

    traj = A.trajectory(episode, tok, cfg)
    assert rec["latency"] == P.critical_path(traj) == len(ex.notes) == 45
    print(A.show_timeline(rec))
    gantt(rec["trace"]["timeline"], f"the executor's timeline of the scripted episode (latency {rec['latency']} steps)")
    plt.show()
    """),
    md("""
    ## Speed: batched vs per-thread vs naive decoding

    Three ways to decode exactly the same threads (the functions come from `bench.py`):

    * **executor**: one batched `forward_cached` per step over every running thread of every episode;
    * **per-thread loop** (`bench.decode_alone`): each thread alone on a 1-slot cache, one forward per token;
    * **naive** (`bench.decode_naive`): no cache — the whole prefix goes through the model for every token.

    Each episode follows `bench.py`'s script (an organizer that forks 4 workers, c = 5; 2 in quick mode). We measure
    generated tokens per second while more episodes run at once. The per-thread loop and the naive
    way decode one thread at a time, so their speed cannot grow with the number of episodes; the
    executor's batch grows with it. Timings are live: this machine's, best of 2.
    """),
    code("""
    import tasks, bench

    s = bench.QUICK if QUICK else bench.Script()
    org_script, worker_script = bench.scripts(tok, s)
    bench_force = bench.forcer(org_script, worker_script)
    capacity = s.workers + 1
    torch.manual_seed(0)
    speed_model = GPT(GPTConfig.preset("tiny" if QUICK else "small", tok.n_vocab)).eval()
    need = 128 + len(org_script) + s.workers * len(worker_script)  # as bench.py sizes a slot
    max_len = min(speed_model.config.block_size, 128 * -(-need // 128))
    counts = [1, 2, 4] if QUICK else [1, 2, 4, 8]
    puzzles = tasks.make_puzzles("countdown", "small", n=max(counts), seed=0)
    print(f"model: {speed_model.num_params() / 1e6:.2f}M parameters; torch threads: {torch.get_num_threads()}; "
          f"script: organizer {len(org_script)} tokens + {s.workers} workers x {len(worker_script)} tokens")

    def best(fn, repeats=2):
        return min(bench.timed(fn, "cpu") for _ in range(repeats))

    speed = {}
    with torch.no_grad():
        for n in counts:
            run_cfg = E.RunConfig(mode="async", capacity=capacity, batch_episodes=n, max_len=max_len)
            ex_n = E.Executor(speed_model, tok, run_cfg)
            threads = [th for ep in ex_n.run(puzzles[:n], force=bench_force) for th in ep.threads]  # warm-up
            tokens = sum(th.generated for th in threads)
            speed[n] = dict(tokens=tokens,
                            executor=tokens / best(lambda: ex_n.run(puzzles[:n], force=bench_force)),
                            loop=tokens / best(lambda: bench.decode_alone(speed_model, threads, max_len, "cpu")))
            print(f"{n:2d} episodes, {tokens:5d} tokens: executor {speed[n]['executor']:6.0f} tok/s, "
                  f"per-thread loop {speed[n]['loop']:5.0f} tok/s")
        one_episode = [th for th in threads if th.episode.index == 0]
        naive = sum(th.generated for th in one_episode) / best(lambda: bench.decode_naive(speed_model, one_episode, "cpu"))
    print(f"naive (one episode's threads, no cache): {naive:.0f} tok/s")
    """),
    code("""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(counts, [speed[n]["executor"] for n in counts], "o-", label="executor (batched, KV cache)")
    ax.plot(counts, [speed[n]["loop"] for n in counts], "s-", label="per-thread loop (KV cache)")
    ax.plot(counts, [naive] * len(counts), "^--", label="naive (no cache)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("episodes decoded at once (each: 1 organizer + %d workers)" % s.workers)
    ax.set_ylabel("throughput (generated tokens / s)")
    ax.set_title("decoding speed on this machine's CPU (%s model)" % ("tiny" if QUICK else "small"))
    ax.legend()
    ax.grid(alpha=0.3)
    plt.show()
    top = counts[-1]
    print(f"at {top} episodes: executor / loop = {speed[top]['executor'] / speed[top]['loop']:.1f}x, "
          f"executor / naive = {speed[top]['executor'] / naive:.1f}x")
    """),
    md("""
    What to read in the plot: the per-thread loop and the naive way stay flat (one thread at a time),
    while the executor's throughput climbs with the batch, because a forward over B rows costs much
    less than B forwards on a CPU (and far less still on a GPU). The gain flattens as attention over
    long, padded slots starts to dominate; `BENCHMARKS.md` measures that with the full benchmark
    (`python bench.py`) and names the levers.

    **Does the critical path predict wall-clock time?** Decode one scripted episode as AsyncThink,
    then the same number of tokens as one sequential thread. The protocol predicts a speedup of
    total tokens / critical path.
    """),
    code("""
    with torch.no_grad():
        async_ex = E.Executor(speed_model, tok, E.RunConfig(mode="async", capacity=capacity, batch_episodes=1, max_len=max_len))
        ep1 = async_ex.run(puzzles[:1], force=bench_force)[0]
        total = sum(th.generated for th in ep1.threads)
        path = P.critical_path(A.trajectory(ep1, tok, async_ex.cfg))
        seq_ex = E.Executor(speed_model, tok, E.RunConfig(mode="sequential", capacity=1, batch_episodes=1, max_len=max_len))
        seq_force = bench.forcer(bench.text(total - 3) + [tok.answer, ord("7"), tok.answer_end], [])
        t_async = best(lambda: async_ex.run(puzzles[:1], force=bench_force), 3)
        t_seq = best(lambda: seq_ex.run(puzzles[:1], force=seq_force), 3)
    print(f"{total} tokens, critical path {path} steps: predicted speedup {total / path:.2f}x, "
          f"measured {t_seq / t_async:.2f}x ({t_seq:.3f} s sequential vs {t_async:.3f} s async)")
    """),
    md("""
    The measured speedup falls a little short of the prediction on a CPU: a decode step over 5 rows
    costs somewhat more than a step over 1 row, and each forked worker's prompt is one more prefill.
    On a GPU a step of 5 rows costs about the same as a step of 1.

    ## Exercises

    1. **Memory.** How many bytes does the cache of the `small` model take for `batch_episodes=32`,
       `capacity=4` and slots of 1024 tokens? Compute it by hand, then check with
       `GPT(GPTConfig.preset("small", tok.n_vocab)).new_cache(...).nbytes()`.
    2. **Queueing.** Rerun the scripted episode with `E.RunConfig(..., n_slots=2)`. Worker 2 must wait
       for a free slot: find where in the slot table. Does the reported `latency` change? Does
       `rec["steps"]` (the executor's real steps)? Why are they different numbers?
    3. **No waiting.** Change the organizer's script so it never waits (think longer before each
       `<JOIN-i>`). How many steps does the episode take, and how many decode rows per step on average?
    4. **Where the time goes.** Add `bench.Script(worker_think=120)` to the speed section (longer
       workers). Does the executor's advantage over the per-thread loop grow or shrink? Profile one
       `ex_n.run` with `torch.profiler` and find the most expensive operator.
    """),
]


# =============================================================================
# 3. Training

TRAINING = [
    md("""
    # 3. Training: format SFT, then reinforcement learning

    AsyncThink is trained in two stages (`train.py`):

    1. **Cold-start format SFT.** The model imitates organizer and worker traces. The paper had
       GPT-4o write them; here small solvers do (`traces.py`), so every line of arithmetic is true.
       After SFT the model knows the *format* (forks, joins, answers) but is not yet accurate.
    2. **RL with a GRPO variant** (`grpo.py`). The executor rolls out G whole structures (organizer +
       all its workers) per question; one reward scores each structure; the group-relative advantage
       trains *every generated token of every thread* of that structure.

    In this notebook you will look at the three trace formats, run a short SFT and a short RL run,
    and compute the GRPO reward, advantages and loss by hand on a worked example.
    """),
    SETUP,
    md("""
    ## Three thinking modes, three trace formats

    One countdown puzzle (small preset: 6 numbers in 1–12, target 10–30, k = 4 distinct expressions), one
    trace per mode, all written by `traces.make_trace`:

    * **sequential** — the organizer alone searches, one attempt after another, keeping a tally;
    * **parallel** — the organizer forks the whole question to N = c − 1 workers, joins all, answers
      the union;
    * **async** — the organizer forks one sub-query per *pair of numbers*, keeps up to c − 1 workers
      running, tallies each join (`ok` and the answers so far, or `no`), and stops forking once it
      has k answers; the final answer is a copy of the last tally.
    """),
    code("""
    import random
    import protocol as P, tasks, traces

    tok = P.Tokenizer.numbers()  # the tokenizer train.py uses
    row = tasks.make_puzzles("countdown", "small", n=1, seed=0, split="train")[0]
    print(row)
    example = {mode: traces.make_trace(row, mode, random.Random(0), capacity=4, hint_share=0.0)
               for mode in ("sequential", "parallel", "async")}
    print("\\n======== sequential ========\\n" + example["sequential"].text())
    """),
    code("""
    print("======== parallel ========\\n" + example["parallel"].text())
    """),
    code("""
    print("======== async ========\\n" + example["async"].text())
    """),
    md("""
    ### What the model is trained on

    A trace is a list of `(text, trained)` pieces per thread. Prompts, and the takeaways the executor
    would inject after `<JOIN-i>`, are **not** trained on: the model never has to predict them. Below,
    the async organizer with its untrained pieces in `«…»`; then each mode's reference latency and η
    from `protocol` (the traces are trajectories like any other).
    """),
    code("""
    print("".join(text if trained else f"«{text}»" for text, trained in example["async"].organizer))
    print()
    print(f"{'mode':<11} {'threads':>7} {'tokens':>7} {'trained':>8} {'latency':>8} {'eta':>5}  answers")
    for mode, trace in example.items():
        seqs = trace.sequences(tok)  # [(ids, trained_mask)] per thread
        traj = trace.parse(tok, capacity=4)
        assert traj.errors == []
        print(f"{mode:<11} {len(seqs):>7} {sum(len(ids) for ids, _ in seqs):>7} "
              f"{sum(sum(m) for _, m in seqs):>8} {P.critical_path(traj):>8} {P.concurrency(traj):>5.2f}  "
              f"{len(trace.answers)} of k = {row['k']}")
    """),
    md("""
    ## A short SFT run

    `train.py` is the command a user types; we run it into a temporary folder. The `tiny` preset
    (a 2-layer, 32-channel model) trains in seconds on a CPU; it is far too small to *solve* anything,
    but the loss curve shows the mechanics. Every step draws fresh puzzles, writes their traces and
    takes one AdamW step on the trained tokens; the loss is the mean cross-entropy per trained token,
    in nats.

    A check you can do by hand: a freshly initialised model predicts almost uniformly over the
    1,526-token vocabulary of `P.Tokenizer.numbers()`, so its first loss should be close to
    **ln 1526 ≈ 7.33 nats**.
    """),
    code("""
    import math, tempfile
    from course import train, metrics

    run_dir = tempfile.mkdtemp(prefix="asyncthink-course-")
    sft_steps = 20 if QUICK else 400
    train("--stage", "sft", "--preset", "tiny", "--run-dir", run_dir, "--sft-steps", sft_steps)
    sft = metrics(run_dir, "sft")
    print(f"{len(sft)} steps; loss {sft[0]['loss']:.3f} -> {sft[-1]['loss']:.3f} nats/token; ln({tok.n_vocab}) = {math.log(tok.n_vocab):.3f}")
    assert abs(sft[0]["loss"] - math.log(tok.n_vocab)) < 0.3
    """),
    code("""
    %matplotlib inline
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot([r["step"] for r in sft], [r["loss"] for r in sft], label="training loss")
    ax.axhline(math.log(tok.n_vocab), color="grey", ls="--", label=f"uniform guess, ln {tok.n_vocab}")
    ax.set_xlabel("SFT step (fresh traces every step)")
    ax.set_ylabel("loss (nats per trained token)")
    ax.set_title("format SFT of the tiny model on async countdown traces")
    ax.legend()
    ax.grid(alpha=0.3)
    plt.show()
    """),
    md("""
    The loss falls fast at first (the format: tags, the fixed words of the tally, the shape of a
    line of arithmetic) and then slowly. A model of this size needs thousands of steps to get the
    numbers right: the default `cpu` recipe (the 1M-parameter `small` model, `python train.py --stage sft`, which
    fills an 18-minute budget: ~3,500 steps on a 2-core box, its matrices trained with Muon,
    `muon.py`, each input carrying the three tokens before it, "smear 3") finds, on 500 test
    puzzles, at least one correct expression in 97-99% of them, two in 91-96%, three in 73-86% and
    all four in 40-65% (three seeds), with 0-2% format errors. The workers find all four between
    them more often than that: the organizer loses them when it copies its running list of finds
    into the next tally and the answer. The letters that label the list's items (`ok A12+8-1,
    B12+5+2`) and the three tokens each input carries (after "B", "12", "+" only one item goes on)
    make those copies unambiguous: all four went from 8% to 18% with the letters and from 18% to
    40% with smear 3, on one seed. `BENCHMARKS.md` keeps the figures, `diagnose.py` the reasons.

    ## The GRPO reward, by hand

    One reward per **structure** (a whole organizer + workers rollout), from its executor record:

    * R = R_FE = −0.5 if the trajectory has any format error, else
    * R = R_A + λ·R_η, with accuracy R_A = min(distinct correct, k) / k (only the first k answers
      count) and concurrency R_η = min(η / c, τ) / τ — capped at τ so that forking for its own sake
      stops paying.

    Worked example: G = 4 structures of one question, k = 4, c = 4, and the defaults τ = 0.75,
    λ = 0.2, R_FE = −0.5.

    | structure | format | correct | η | R_A | R_η | R |
    |---|---|---|---|---|---|---|
    | 1 | ok | 4 | 2.0 | 4/4 = 1.0 | min(2.0/4, 0.75)/0.75 = 0.667 | 1.0 + 0.2·0.667 = **1.133** |
    | 2 | ok | 2 | 1.0 | 2/4 = 0.5 | min(1.0/4, 0.75)/0.75 = 0.333 | 0.5 + 0.2·0.333 = **0.567** |
    | 3 | error | – | – | – | – | **−0.500** |
    | 4 | ok | 0 | 1.6 | 0.0 | min(1.6/4, 0.75)/0.75 = 0.533 | 0.0 + 0.2·0.533 = **0.107** |

    Structure 4 answers nothing correctly yet earns 0.107 for thinking concurrently: λ keeps that
    share small. Why τ = 0.75 and not 0.5: the SFT model already runs at η ≈ 2.35 of c = 4
    (η/c ≈ 0.59); with τ = 0.5 nearly every structure would sit at the cap, R_η = 1, and the
    reward would say nothing about structure. Why −0.5 and not −1: a penalty worth four correct
    answers made "break the format less" (fewer forks, shorter episodes) the cheapest way up.
    """),
    code("""
    import grpo

    def record(n_correct, eta, errors=()):  # the fields of an executor record that the reward reads
        return {"task": "countdown", "k": 4, "n_correct": n_correct, "concurrency": eta, "format_errors": list(errors)}

    group = [record(4, 2.0), record(2, 1.0), record(0, 0.0, ["pool-overflow: <FORK-4> while 3 workers run (c=4)"]),
             record(0, 1.6)]
    rewards = [grpo.reward(r, capacity=4) for r in group]  # the defaults: tau 0.75, lam 0.2, R_FE -0.5
    for i, r in enumerate(rewards, 1):
        print(f"structure {i}: R_A {r.accuracy:.2f}  R_eta {r.concurrency:.3f}  format error {r.format_error!s:5}  R {r.total:+.3f}")
    assert [round(r.total, 3) for r in rewards] == [1.133, 0.567, -0.5, 0.107]
    """),
    md("""
    ## Group-relative advantages, by hand

    GRPO needs no value network: a structure's advantage is its reward compared with the other
    structures **of the same question**, A = (R − mean) / std.

    * mean = (1.133 + 0.567 − 0.500 + 0.107) / 4 = 1.307 / 4 = **0.327**
    * deviations: 0.807, 0.240, −0.827, −0.220; squares: 0.651, 0.058, 0.683, 0.048
    * std (population) = √(1.440 / 4) = √0.360 = **0.600**
    * A = 0.807/0.600 = **1.344**, 0.240/0.600 = **0.400**, −0.827/0.600 = **−1.378**, −0.220/0.600 = **−0.367**

    Every token that the model generated in structure 1 — in the organizer and in every worker —
    is pushed up with weight 1.344; every token of structure 3 down with weight 1.378. If all G
    rewards are equal (say, all −0.5), the advantages are 0 and the group teaches nothing. And a
    group that differs only by noise (η 2.3401 against 2.3399) must not get full-size advantages:
    the std is floored at 0.1 (`grpo.STD_FLOOR`), so its advantages stay near 0.

    `train.py --credit thread` adds what the paper's single reward cannot say: each worker's
    `<RETURN>` is checked against the puzzle (+1 per correct expression, −1 per wrong one) and
    ranked against the workers that got the same sub-query in the other structures of the group
    (`grpo.thread_advantages`); the organizer keeps the structure's advantage.
    """),
    code("""
    advs = grpo.advantages([r.total for r in rewards], group=4)
    print([round(a, 3) for a in advs])
    assert [round(a, 3) for a in advs] == [1.344, 0.4, -1.378, -0.367]
    assert grpo.advantages([-0.5] * 4, group=4) == [0.0] * 4  # no variance, no signal
    print("noise only:", [round(a, 4) for a in grpo.advantages([0.5001, 0.4999], group=2)])
    """),
    md("""
    ## The clipped policy loss, by hand

    For each generated token t, the ratio r_t = exp(log p_new − log p_old) compares the current
    policy with the one that produced the rollout. Both are log-probabilities of the policy that
    sampled, softmax(logits / T) at the rollout temperature T (`--temperature`, 0.7): scoring the
    untempered softmax(logits) would train a different policy from the one that explored, and the
    first update's ratio would not be 1. PPO's clipped surrogate is

    L = − Σ_t min(r_t·A, clip(r_t, 1 − ε, 1 + ε)·A)

    (summed here; `train.py` divides by the number of generated tokens). With ε = 0.2: when A > 0, a
    token whose probability already rose by more than 20% earns nothing more; when A < 0, one that
    already fell by more than 20% is pushed no further.

    Hand-made tensors: 2 threads × 3 positions, a 2-token vocabulary with all logits 0, so
    log p_new = −ln 2 everywhere, and we pick log p_old = −ln 2 − ln r to get the ratios r we want.
    Row 1 has A = +1, row 2 has A = −1 and its last position is not a generated token (y = −1: a
    prompt or injected token, no loss).

    | row | A | r | r·A | clip(r, 0.8, 1.2)·A | min |
    |---|---|---|---|---|---|
    | 1 | +1 | 1.0 | 1.0 | 1.0 | 1.0 |
    | 1 | +1 | 1.5 | 1.5 | 1.2 | **1.2** (clipped) |
    | 1 | +1 | 0.5 | 0.5 | 0.8 | **0.5** |
    | 2 | −1 | 1.0 | −1.0 | −1.0 | −1.0 |
    | 2 | −1 | 1.5 | −1.5 | −1.2 | **−1.5** |
    | 2 | −1 | (0.5) | – | – | masked |

    Sum of the mins = 1.0 + 1.2 + 0.5 − 1.0 − 1.5 = 0.2, so **L = −0.2** (−0.04 per generated
    token). Tokens whose |r − 1| > ε: 1.5 and 0.5 in row 1, 1.5 in row 2 = **3** (only the second
    of row 1 actually lost its gradient to the clip). Entropy: ln 2 per token × 5 tokens = **3.466**.
    """),
    code("""
    import torch

    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]])
    logits = torch.zeros(2, 3, 2)                           # (B, T, V): p = 1/2 for both tokens
    y = torch.tensor([[0, 1, 0], [1, 0, -1]])               # target ids, -1 = no loss
    old = -math.log(2) - torch.log(ratios)                  # log p_old, so that exp(log p_new - log p_old) = r
    adv = torch.tensor([1.0, -1.0])

    loss, kl, stats = grpo.policy_loss(logits, y, old, adv, clip_eps=0.2)
    n_generated = int((y != -1).sum())
    print(f"L = {loss.item():.4f} (per generated token {loss.item() / n_generated:.4f}), stats {stats}")
    assert abs(loss.item() - (-0.2)) < 1e-6 and n_generated == 5
    assert stats["clipped"] == 3 and abs(stats["entropy"] - 5 * math.log(2)) < 1e-5
    """),
    md("""
    ### GRPO when the rewards do vary: a three-armed bandit

    Before the real RL run, see the same three functions move a policy. A toy policy chooses one of
    three "structures" (logits θ, one per arm); each arm has a made-up chance of a fully correct
    answer and an η. Each step samples G = 8 choices, scores them with `grpo.reward`, turns the
    rewards into `grpo.advantages` and takes two Adam steps on `grpo.policy_loss`. The expected
    rewards are 0.5 + 0.2·0.5 = 0.6 (sequential), 0.6 + 0.2·1 = 0.8 (parallel) and 0.8 + 0.2·1 = 1.0
    (async), so the probability of "async" should rise.
    """),
    code("""
    arms = ["sequential", "parallel", "async"]
    p_correct, arm_eta = [0.5, 0.6, 0.8], [1.0, 2.25, 2.0]  # made up; c = 4
    gen = torch.Generator().manual_seed(0)
    theta = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    history = []
    for step in range(150):
        with torch.no_grad():
            logp_old = torch.log_softmax(theta, -1)
            choice = torch.multinomial(logp_old.exp(), 8, replacement=True, generator=gen)  # G = 8 rollouts
            solved = (torch.rand(8, generator=gen) < torch.tensor(p_correct)[choice]).tolist()
        recs = [{"task": "sudoku", "n_correct": int(ok), "concurrency": arm_eta[a], "format_errors": []}
                for a, ok in zip(choice.tolist(), solved)]
        adv = torch.tensor(grpo.advantages([grpo.reward(r, capacity=4).total for r in recs], group=8))
        for _ in range(2):  # inner updates on the same rollouts: the ratio moves away from 1
            loss, _, _ = grpo.policy_loss(theta.expand(8, 1, 3), choice[:, None], logp_old[choice][:, None], adv, 0.2)
            opt.zero_grad(); (loss / 8).backward(); opt.step()
        history.append(torch.softmax(theta, -1).tolist())

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for j, arm in enumerate(arms):
        ax.plot([100 * h[j] for h in history], label=arm)
    ax.set_xlabel("GRPO step (8 rollouts each)")
    ax.set_ylabel("probability of choosing the arm (%)")
    ax.set_title("GRPO on a three-armed bandit: the best-rewarded structure wins")
    ax.legend(); ax.grid(alpha=0.3)
    plt.show()
    print("final probabilities:", {a: round(p, 2) for a, p in zip(arms, history[-1])})
    """),
    md("""
    ## A short RL run

    Now the real thing: `python train.py --stage rl` starts from the SFT checkpoint in the same
    folder. Each step draws questions, rolls out G structures per question with the batched
    executor (temperature 0.7), scores them, and updates. `metrics.jsonl` logs per step: the mean
    reward, the accuracy (share of fully solved puzzles), the latency (critical path, decoding steps),
    η, the format-error rate and the share of groups skipped because all their rewards were equal.
    """),
    code("""
    rl_steps = 2 if QUICK else 40
    train("--stage", "rl", "--preset", "tiny", "--run-dir", run_dir, "--rl-steps", rl_steps)
    rl = metrics(run_dir, "rl")
    steps = [r["step"] for r in rl]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    panels = [("reward", "mean reward R (−1 = format error)", 1, "reward"),
              ("accuracy", "share of rollouts (%)", 100, "accuracy: puzzles fully solved"),
              ("latency", "latency (decoding steps)", 1, "latency: critical path"),
              ("eta", "η (threads decoding per step)", 1, "concurrency η")]
    for ax, (key, label, scale, title) in zip(axes.flat, panels):
        ax.plot(steps, [scale * r[key] for r in rl], marker=".", label=key)
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0, 1].plot(steps, [100 * r["format_error_rate"] for r in rl], marker=".", color="tab:red",
                    label="format errors")
    axes[0, 0].set_ylim(-1.1, 1.3)  # R lies in [-1, 1 + lambda]
    axes[0, 1].set_ylim(-5, 105)
    axes[0, 1].legend()
    fig.suptitle("a short RL run of the tiny model, from its SFT checkpoint")
    fig.tight_layout()
    plt.show()
    mean = lambda key: sum(r[key] for r in rl) / len(rl)
    print(f"over {len(rl)} steps: format errors in {100 * mean('format_error_rate'):.0f}% of rollouts, "
          f"groups skipped (all rewards equal) {100 * mean('skipped_groups'):.0f}%, "
          f"mean reward {mean('reward'):+.2f}, latency {mean('latency'):.1f} steps, eta {mean('eta'):.2f}")
    """),
    md("""
    **Read it honestly.** The tiny model after a few hundred SFT steps cannot yet write a valid
    trajectory within the tiny preset's token budget (a few dozen tokens per thread, far shorter than
    a real trace), so almost every rollout ends in a format error and earns −1. A group whose rewards
    are all −1 has advantage 0 and is skipped: **no reward variance, no learning** — the paper's
    "without format SFT" ablation in miniature, and the reason the cold-start SFT exists. Latency
    and η still move, because they describe where the broken episodes stopped.

    RL starts to work once SFT makes valid trajectories common enough for some rollouts of a group to
    beat the others. With the default `cpu` recipe (`python train.py --stage sft`, then `--stage rl`),
    `BENCHMARKS.md` records the format-error rate falling from 84% to 66% over the first three RL
    steps: the format penalty is the first thing RL can use.

    ## RL that moves: real runs of the small model

    The tiny run above is too small to learn. These are the per-step logs (`metrics.jsonl`) of real
    RL runs of the default small model on a 2-core CPU, committed in `notebooks/rl_runs/` (each ~10
    minutes; the commands are printed below). Two things RL visibly learned:

    * **Structure.** A model whose SFT traces keep a random number of workers busy
      (`--width-share 0.8`: most traces without a plan run only 1 or 2 of the c − 1 = 3 workers at
      once) samples narrow structures, η/c ≈ 0.36. With the concurrency reward at weight λ = 1, RL
      widens them step by step; with λ = 0 (the same questions, the same sampling seeds) it does not.
    * **When to call a tool.** A model trained to hand every find to the `check` tool calls it less
      and less: the episodes that call end worse, so RL's shared reward alone removes the habit; a
      price per call (`--tool-cost 0.05`) removes it faster.
    """),
    code("""
    import json, os
    from course import ROOT
    from train import smooth   # the trailing mean curves.png draws
    runs_dir = os.path.join(ROOT, "notebooks", "rl_runs")
    read = lambda name: [json.loads(line) for line in open(os.path.join(runs_dir, name + ".jsonl"))]
    panels = [("eta_over_c", "structure: eta / c of the sampled episodes", "eta / c",
               [("width_lam1", "λ = 1 (concurrency rewarded)", "tab:green"),
                ("width_lam0", "λ = 0 (accuracy only)", "tab:grey")]),
              ("tool_calls", "tools: check calls per sampled episode", "calls per episode",
               [("tools_cost0", "no price per call", "tab:blue"),
                ("tools_cost005", "--tool-cost 0.05", "tab:red")])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (key, title, ylabel, runs) in zip(axes, panels):
        for name, label, color in runs:
            rows = read(name)
            steps, ys = [r["step"] for r in rows], [r[key] for r in rows]
            ax.plot(steps, ys, color=color, alpha=0.3)
            ax.plot(steps, smooth(ys, 6), color=color, label=label)
        ax.set_title(title)
        ax.set_xlabel("RL step (16 episodes each)"); ax.set_ylabel(ylabel); ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.show()
    print(open(os.path.join(runs_dir, "COMMANDS.md")).read())
    """),
    md("""
    Greedy, on 500 fresh test puzzles, paired (`python asyncthink.py compare`, BENCHMARKS.md):
    the widened model runs at η 2.3 instead of 1.5, its critical path a quarter shorter at the same
    accuracy (on a second seed the same widening cost 7 points of all-correct: structure is learned
    robustly, accuracy kept on one seed of two), and the tool model after RL makes no calls at
    all, with ≥1, ≥2 and ≥3 each ~5 points higher. Read the curves with the
    numbers: per step they are 16 episodes of fresh questions, so they are noisy (faint: raw;
    solid: mean of the last six steps), and later questions happen to be longer in every run.

    ## Exercises

    1. **Reward by hand.** With τ = 0.3 and λ = 0.5 (flags `--tau 0.3 --lam 0.5`), recompute the
       reward table and the four advantages by hand, then check with `grpo.reward` and
       `grpo.advantages`. Which structure gains most from the change?
    2. **Clipping.** In the loss example, set A = −1 for row 1 too. Which tokens are clipped now? Compute
       L by hand, then check. Then call `policy_loss` with `clip_eps=10` (no clipping): what changes?
    3. **Longer SFT.** Rerun the SFT cell with `--sft-steps 1500` and the RL cell with
       `--max-organizer-tokens 200 --max-worker-tokens 100`. Does the format-error rate of the RL run
       drop below 100%? Does anything get skipped less?
    4. **Another mode.** Train with `--mode sequential` and `--mode parallel` into new run folders and
       compare the SFT loss curves. Which format is easiest to imitate, and why (look at the traces)?
    """),
]


# =============================================================================
# 4. Experiments

EXPERIMENTS = [
    md("""
    # 4. Experiments: the accuracy–latency frontier

    The paper's claim is a trade-off: AsyncThink reaches **higher accuracy at lower latency** than
    sequential and parallel thinking. On multi-solution countdown (their model: Qwen3-4B):

    | method | ≥1 correct | ≥2 | ≥3 | all 4 |
    |---|---|---|---|---|
    | sequential | 88.0 | 83.8 | 80.0 | 70.5 |
    | parallel | 97.1 | 92.8 | 86.2 | 68.6 |
    | AsyncThink | 99.5 | 98.8 | 96.8 | 89.0 |

    and on math, 28% lower latency than parallel thinking at the same accuracy. A result like this
    is best read as points on an **accuracy–latency plane**: up is better, left is better, and a
    method *dominates* another if it is both.

    This notebook plots that plane for this project:

    1. the experiment results in `results/results.json` if you have run the experiments command,
       otherwise a small run made right here (tiny model, the three modes, a few SFT steps, evaluated
       with the executor);
    2. the *teachers*: the solver-written traces the models imitate, at several budgets and
       capacities — the frontier a perfect imitation would reach.
    """),
    SETUP,
    md("""
    ## Results: from `results/results.json`, or a small run

    The experiments command (`python experiments.py`) writes `results/results.json`:
    `{"rows": [{name, mode, task, capacity, all_correct, ge1, latency, eta, tokens,
    format_error_rate, ...}, ...]}`, accuracies and rates in percent. We read what is there and
    tolerate missing keys. (Set `ASYNCTHINK_RESULTS` to read another file.)
    """),
    code("""
    import json, math
    from course import ROOT

    def pick(row, *keys):
        \"\"\"The first of `keys` present in the row (names differ between writers), else None.\"\"\"
        return next((row[k] for k in keys if row.get(k) is not None), None)

    def normalise(row):
        return dict(name=pick(row, "name") or pick(row, "mode") or "?", mode=pick(row, "mode") or "?",
                    task=pick(row, "task") or "countdown", capacity=pick(row, "capacity", "c"),
                    all_correct=pick(row, "all_correct"), ge1=pick(row, "ge1"),
                    latency=pick(row, "latency"), eta=pick(row, "eta", "concurrency"), tokens=pick(row, "tokens"),
                    format_error_rate=pick(row, "format_error_rate"))

    results_path = os.environ.get("ASYNCTHINK_RESULTS") or os.path.join(ROOT, "results", "results.json")
    source = results_path if os.path.exists(results_path) else None
    results = [normalise(r) for r in json.load(open(results_path)).get("rows", [])] if source else []
    unique = {}  # a results file may list a row twice (e.g. in two tables): keep the first
    for r in results:
        unique.setdefault((r["task"], r["name"]), r)
    results = list(unique.values())
    print(f"{len(results)} rows from {source}" if source else "no results/results.json: a small run follows")
    """),
    md("""
    If there were no results, we make them: for each thinking mode, format SFT of the tiny model on
    that mode's traces (`python train.py --stage sft --preset tiny --mode MODE`), then greedy
    evaluation on fresh **test** puzzles with the executor (`asyncthink.solve`), capacity c = 4.
    Sequential runs the organizer alone; parallel forks the question to 3 workers and answers by rule;
    async lets the model organize itself.
    """),
    code("""
    import tempfile
    import torch
    import asyncthink as A, tasks
    from course import train

    def evaluate(ckpt, mode, rows, capacity=4):
        \"\"\"Greedy episodes with the executor; one results row (percentages, means).\"\"\"
        model, tok = A.load_model(ckpt)
        cfg = A.RunConfig(mode=mode, capacity=capacity, temperature=0.0, max_organizer_tokens=200,
                          max_worker_tokens=100, batch_episodes=len(rows))
        recs = A.solve(model, tok, rows, cfg, progress=False)
        mean = lambda f: sum(f(r) for r in recs) / len(recs)
        return dict(name=f"tiny SFT, {mode}", mode=mode, task=rows[0]["task"], capacity=capacity,
                    all_correct=100 * mean(lambda r: r["correct"]), ge1=100 * mean(lambda r: r["n_correct"] >= 1),
                    latency=mean(lambda r: r["latency"]), eta=mean(lambda r: r["concurrency"]),
                    tokens=mean(lambda r: r["tokens"]), format_error_rate=100 * mean(lambda r: bool(r["format_errors"])),
                    stops=sorted({r["stop_reason"] for r in recs}))

    if not results:
        test_rows = tasks.make_puzzles("countdown", "small", n=4 if QUICK else 32, seed=1, split="test")
        for mode in ("sequential", "parallel", "async"):
            run_dir = tempfile.mkdtemp(prefix=f"asyncthink-{mode}-")
            train("--stage", "sft", "--preset", "tiny", "--mode", mode, "--run-dir", run_dir,
                  "--sft-steps", 10 if QUICK else 300, echo=1)
            results.append(evaluate(os.path.join(run_dir, "sft.pt"), mode, test_rows))
        source = f"a small run here ({len(test_rows)} test puzzles per mode)"
    """),
    code("""
    cols = ["name", "task", "capacity", "all_correct", "ge1", "latency", "eta", "tokens", "format_error_rate"]
    fmt = lambda v: "–" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)
    print("source:", source)
    print(" | ".join(f"{c:>17}" if i else f"{c:<26}" for i, c in enumerate(cols)))
    for r in results:
        print(" | ".join(f"{fmt(r.get(c)):>17}" if i else f"{fmt(r.get(c)):<26}" for i, c in enumerate(cols)))
    """),
    code("""
    %matplotlib inline
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = {"sequential": "tab:blue", "parallel": "tab:orange", "async": "tab:green"}
    shown = [r for r in results if r["latency"] is not None and r["all_correct"] is not None]
    task_names = sorted({r["task"] for r in shown})
    fig, axes = plt.subplots(1, len(task_names), figsize=(6.5 * len(task_names), 4.5), squeeze=False)
    for ax, task in zip(axes[0], task_names):
        labels = {}  # models at the same point share one label
        for r in (r for r in shown if r["task"] == task):
            c = colors.get(r["mode"], "tab:grey")
            ax.scatter(r["latency"], r["all_correct"], color=c, s=60)
            if r["ge1"] is not None:
                ax.scatter(r["latency"], r["ge1"], facecolors="none", edgecolors=c, s=60)
            labels.setdefault((round(r["latency"]), round(r["all_correct"])), []).append(r["name"])
        for (x, y), names in labels.items():
            ax.annotate("\\n".join(names), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xlabel("latency (decoding steps on the critical path)")
        ax.set_ylabel("accuracy (% of test puzzles)")
        ax.set_ylim(-5, 105)
        ax.set_title(f"{task}: accuracy vs latency of the trained models")
        ax.grid(alpha=0.3)
    axes[0, -1].legend(handles=[Line2D([], [], marker="o", ls="", color=c, label=m) for m, c in colors.items()]
                       + [Line2D([], [], marker="o", ls="", color="k", label="all correct"),
                          Line2D([], [], marker="o", ls="", markerfacecolor="none", color="k", label="≥1 correct")],
                       fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    plt.show()
    for r in results:
        print(f"{r['name']:<26} format errors {fmt(r['format_error_rate'])}%"
              + (f"  episodes stopped by: {r['stops']}" if r.get("stops") else ""))
    """),
    md("""
    **What this shows, honestly.** If these points come from the small run above, they are all at
    0% accuracy: a tiny model (tens of thousands of parameters) after a few hundred SFT steps writes
    the right *kind* of text but not a valid, correct trajectory (the format-error rate and the stop
    reasons say how the episodes ended — usually a token limit or a malformed tag). Their latencies
    then measure where the episodes broke off, not how fast each mode thinks: **no frontier can be
    read from them.** Run the experiments command (`python experiments.py`, the default `cpu` budget
    or `--budget gpu`) and rerun this notebook to get the real comparison; points at 0% with 100%
    format errors mean the same there.

    ## The teachers' frontier

    What *can* be measured at no cost: the solver-written traces the models imitate. For each trace
    we take its critical path (`protocol.critical_path`) and whether it found all k = 4 answers.
    Sweeping the pool capacity c (parallel thinking forks N = c − 1 copies of the question; async
    thinking keeps up to c − 1 workers running) draws each mode's accuracy–latency curve;
    sequential thinking is a single point.
    """),
    code("""
    import random
    import protocol as P, traces

    tok = P.Tokenizer.numbers()
    puzzles = tasks.make_puzzles("countdown", "small", n=12 if QUICK else 100, seed=3, split="test")

    def teacher(mode, capacity):
        \"\"\"Mean latency, mean eta and % of traces with all k answers, over the puzzles.\"\"\"
        rng, lat, eta, full = random.Random(0), [], [], 0
        for row in puzzles:
            trace = traces.make_trace(row, mode, rng, capacity, hint_share=0.0)
            traj = trace.parse(tok, capacity)
            lat.append(P.critical_path(traj)); eta.append(P.concurrency(traj))
            full += len(trace.answers) >= row["k"]
        return dict(latency=sum(lat) / len(lat), eta=sum(eta) / len(eta), accuracy=100 * full / len(puzzles))

    capacities = [2, 3, 4, 5, 6]
    curves = {"sequential": [teacher("sequential", 1)],
              "parallel, N = c − 1 = 1–5": [teacher("parallel", c) for c in capacities],
              "async, c = 2–6": [teacher("async", c) for c in capacities]}
    for name, pts in curves.items():
        print(f"{name:<30}", "  ".join(f"({p['latency']:.0f} steps, {p['accuracy']:.0f}%, η {p['eta']:.1f})" for p in pts))
    """),
    code("""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.3))
    for (name, pts), color in zip(curves.items(), colors.values()):
        left.plot([p["latency"] for p in pts], [p["accuracy"] for p in pts], "o-", color=color, label=name)
    left.set_xlabel("latency (decoding steps on the critical path)")
    left.set_ylabel("traces with all k = 4 answers (%)")
    left.set_ylim(-5, 105)
    left.set_title("teachers: accuracy vs latency")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    right.axhline(curves["sequential"][0]["latency"], color=colors["sequential"], ls="--", label="sequential")
    for (name, pts), color in list(zip(curves.items(), colors.values()))[1:]:
        right.plot(capacities, [p["latency"] for p in pts], "o-", color=color, label=name)
    right.set_xlabel("pool capacity c (organizer + at most c − 1 workers)")
    right.set_ylabel("latency (decoding steps on the critical path)")
    right.set_xticks(capacities)
    right.set_title("teachers: latency vs capacity")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle(f"solver-written countdown traces, {len(puzzles)} test puzzles")
    fig.tight_layout()
    plt.show()

    seq = curves["sequential"][0]
    for name, pts in list(curves.items())[1:]:
        best = min(pts, key=lambda p: p["latency"])
        c = capacities[pts.index(best)]
        print(f"{name}: lowest latency at c = {c}: {best['latency']:.0f} steps vs sequential {seq['latency']:.0f} "
              f"({seq['latency'] / best['latency']:.2f}x), all k found in {best['accuracy']:.0f}% vs {seq['accuracy']:.0f}%")
    """),
    md("""
    How to read it. Sequential thinking pays for every attempt on its single thread. Parallel
    thinking makes every worker repeat a whole search of its own, and the organizer waits for the
    slowest, so more workers buy accuracy (when a single search can fail) but never latency. Async
    thinking splits one search into small sub-queries, so its critical path shrinks as c grows —
    until the organizer's own text (writing sub-queries, tallying joins) dominates; c = 2 (one worker
    at a time) is sequential search plus the cost of writing sub-queries.

    The numbers above are computed live from `traces.py`, so they follow its current format; the
    shape to look for is the paper's: async left of sequential at equal accuracy. These traces are
    only the starting point. RL with the concurrency reward is meant to move a trained model beyond
    its teacher, and the first plot, filled with real experiment results, is where that must show.

    ## Exercises

    1. **The reward's knobs.** Train RL twice from the same SFT checkpoint, once with
       `--tau 0.25 --lam 0.2` and once with `--tau 0.75 --lam 0.5`
       (`python train.py --stage rl --run-dir RUN --tau ...`), evaluate both, and add them to the first
       plot. Before running: which should have the higher η? Which is more at risk of forking for
       its own sake?
    2. **Capacity.** Evaluate one async checkpoint with `evaluate(ckpt, "async", rows, capacity=c)` for
       c = 2, 3, 4, 6 (and train one with `--capacity 6`). How do latency and η change? Compare with the
       teachers' async curve.
    3. **Another task.** Redo the small run and the teachers' frontier with `--task sudoku`
       (`tasks.make_puzzles("sudoku", ...)`, traces of Sudoku 4×4). The paper evaluates Sudoku
       zero-shot after countdown training: try evaluating a countdown checkpoint on Sudoku puzzles.
    4. **Dominance.** In the teachers' plots, at which capacities does async dominate sequential
       (no higher latency and no lower accuracy)? Does parallel ever? Look at one async trace in
       notebook 3 and name what on its organizer's critical path you would shorten to move the curve
       further left.
    """),
]

# =============================================================================
# 5. Beyond the paper

BEYOND = [
    md("""
    # 5. Beyond the paper: tool workers

    The paper ends with directions it did not build. This notebook shows the one that is built
    here: **heterogeneous workers**. A forked sub-query may go to a *tool* instead of the model,
    named by a prefix in the sub-query, and the tool's answer comes back at `<JOIN-i>` exactly like a
    worker's takeaway:

        <FORK-3>calc: 12*9+4</FORK-3> ... <JOIN-3>112</JOIN-3>
        <FORK-4>check: 12*2-5</FORK-4> ... <JOIN-4>ok</JOIN-4>

    * `calc` computes an expression exactly (fractions, never Python's `eval`);
    * `check` runs the episode's own verifier on a proposed answer: "ok" or "no: the reason".

    Nothing else changes: the protocol, the executor's five phases, the critical path and the
    record are the ones of notebooks 1 and 2.
    """),
    SETUP,
    code("""
    import protocol as P, tools
    row = {"task": "countdown", "numbers": [1, 2, 5, 8, 11, 12], "target": 19, "k": 4}
    for name, argument in [("calc", "12*9+4"), ("calc", "7/2"), ("calc", "1/0"), ("calc", "__import__('os')"),
                           ("check", "12*2-5"), ("check", "12+8-2"), ("check", "12*2-5*1")]:
        print(f"{name}: {argument:<18} -> {tools.run_tool(name, argument, row)}")
    print(P.tool_call("check: 12*2-5", ("calc", "check")), P.tool_call("12 8 of 1 2 5 8 11 12 to 19", P.TOOLS))
    """),
    md("""
    A malformed request is not an exception: it is an answer (`error: ...`) that the organizer reads,
    as a person reads a calculator's "E". The executor can never be crashed by what a model writes
    into a sub-query (the fuzz tests send it random token streams with tool calls in them).

    ## A tool inside an episode

    A random model cannot be trusted to call a tool, so we script the organizer as in notebook 2:
    it forks a worker on a pair, checks the worker's find with the `check` tool, and answers. The
    executor runs with `tools=("check",)`; without it, the same sub-query would go to a model worker.
    """),
    code("""
    import torch
    import asyncthink as A, executor as E
    from model import GPT, GPTConfig

    tok = P.Tokenizer.bytes_level()
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", tok.n_vocab)).eval()
    organizer = "<FORK-1>12 2 of 1 2 5 8 11 12 to 19</FORK-1>hmm<JOIN-1><FORK-2>check: 12*2-5</FORK-2><JOIN-2><ANSWER>12*2-5</ANSWER>"
    script = {0: tok.encode(organizer), 1: tok.encode("12*2=24 24-19=5 ok<RETURN>12*2-5</RETURN>")}

    def force(episode, thread):
        s = script[thread.fork_id]
        return s[thread.generated] if thread.generated < len(s) else None

    cfg = E.RunConfig(mode="async", capacity=3, batch_episodes=1, temperature=0, tools=("check",))
    episode = E.Executor(model, tok, cfg).run([row], force=force)[0]
    rec = A.record(episode, tok, cfg)
    print(rec["trace"]["organizer"])
    print("tool calls:", rec["tool_calls"], "| workers:", rec["trace"]["workers"])
    print(A.show_timeline(rec))
    """),
    md("""
    Read the timeline: worker 1 decodes for many steps; the tool (`worker 2 (check)`) is active in
    **one** step, the one after its fork (`protocol.TOOL_STEPS = 1`), so the organizer's `<JOIN-2>`
    never waits for it. A tool takes no KV-cache slot (it decodes nothing), but it holds one of the
    pool's c − 1 places until it is joined, like any worker. The executor's steps and the protocol's
    reference agree exactly, as they do for model workers:
    """),
    code("""
    %matplotlib inline
    import matplotlib.pyplot as plt
    from course import gantt

    traj = A.trajectory(episode, tok, cfg)
    spans = P.timeline(traj)
    for s in spans:
        print(f"{s.name:<10} forked at {s.fork_step:>3}, finished at {s.finish:>3}, active {s.active}")
    assert rec["latency"] == P.critical_path(traj)
    gantt(rec["trace"]["timeline"], f"a worker and a check tool (latency {rec['latency']} steps)")
    plt.show()
    """),
    md("""
    ## Traces that check

    `python train.py --stage sft --tools check --check-share 0.5` writes half of the async countdown
    traces (those without a plan) with a check of every expression a worker returned; the tally keeps
    only what the tool calls `ok`. The solvers' workers are always right, so in those traces a fifth
    of the workers that found something return a wrong variant instead (one number off by one, the
    small model's usual mistake); their own threads are not trained on, but the organizer learns
    what a `no` means: leave it out.
    """),
    code("""
    import random, traces
    puzzle = {"task": "countdown", "numbers": [2, 3, 6, 8, 11, 12], "target": 23, "k": 4}
    for seed in range(40):  # the first trace in which a worker returned a mistake
        trace = traces.make_trace(puzzle, "async", random.Random(seed), 4, hint_share=0.0, check_share=1.0)
        if any(answer != "ok" for answer in trace.tools.values()):
            break
    print("".join(text for text, _ in trace.organizer))
    """),
    md("""
    What checking costs and buys, measured (BENCHMARKS.md, "Tool workers"): the organizer's trace
    grows by about 160 tokens and its critical path by a fifth; the model trained on such traces is
    compared with one trained without, on the same 500 test puzzles.

    ## A person in the organization

    Nothing in the protocol says a thread must be a model. `python chat.py --human organizer` lets a
    person organize: the person types `fork <sub-query>`, `join <i>`, `answer <text>`, and model workers
    decode while the person types (`--human worker` is the other way round: the model organizes, and
    forks routed to the person wait for the person's `return <takeaway>`). The person's lines are
    written into the organizer's thread exactly as a model organizer writes them, so the session is an
    ordinary record: parsed, verified and drawn like any other.

    Below, a scripted session (chat.py's tests do the same): the two workers write scripted tokens, so
    the timing can be counted by hand; each of the person's lines arrives 4 decode steps after the one
    before, and `join 1` waits until worker 1 returns.
    """),
    code("""
    import chat

    def worker_script(n_think, result):
        return tok.encode("w" * n_think) + [tok.ret] + tok.encode(result) + [tok.ret_end]

    scripts = {1: worker_script(30, "12*2-5"), 2: worker_script(8, "none")}
    def force_workers(episode, thread):
        s = scripts.get(thread.fork_id, [])
        return s[thread.generated] if thread.generated < len(s) else None

    cfg = E.RunConfig(capacity=4, temperature=0.0, batch_episodes=1)
    session = chat.Session(model, tok, cfg, row, "organizer", steps_per_line=4, force=force_workers)
    chat.converse(session, chat.Script(["fork 12 2 of 1 2 5 8 11 12 to 19", "fork 11 8 of 1 2 5 8 11 12 to 19",
                                        "join 1", "join 2", "answer 12*2-5"]))
    rec = session.record()
    print(rec["trace"]["organizer"])
    print("the person's lines (decode step, line):", [(e["step"], e["line"]) for e in rec["chat"]])
    print("correct:", rec["correct"], "| latency", rec["latency"], "| eta", rec["concurrency"])
    print(A.show_timeline(rec))
    """),
    md("""
    The organizer's row is the person's: active while typing, idle (`.`) while `join 1` waits for
    worker 1; worker 2 had returned long before. Latency and η are counted on the same step clock as
    for a model organizer, and `human_s` in the record keeps the person's wall-clock seconds beside
    them. On a terminal, `python chat.py --ckpt runs/countdown-async/rl.pt --human organizer` is the
    live version (README, "Humans in the organization").

    ## Recursive organizers: a worker that organizes

    With `--depth 2` a worker may fork its own workers, with the same tags inside its own thread; its
    `<JOIN-i>` waits exactly as the organizer's does, so a join of a sub-organizer waits on its whole
    subtree. Ids are scoped to the thread that forked them: worker `2.1` is worker 1 of worker 2. The
    pool capacity c is one pool shared by every level. The depth-2 countdown traces
    (`traces.countdown_tree_trace`) give each larger number of a pair a sub-organizer, which forks a
    pair worker per pair. Below, one such trace at c = 8, replayed through the executor (every thread
    writes its trace's tokens), and its timeline next to the protocol's reference.
    """),
    code("""
    import tasks
    num = P.Tokenizer.numbers()
    row2 = tasks.make_puzzles("countdown", "small", n=1, seed=3, split="train")[0]
    tree = traces.make_trace(row2, "async", random.Random(0), 8, depth=2)
    tree_scripts = {}
    for path, pieces in [("", tree.organizer), *tree.workers.items()]:
        ids, mask = traces.encode(pieces[1:], num)   # the trained tokens, the ones a model writes
        tree_scripts[path] = [t for t, m in zip(ids, mask) if m]

    def force_tree(episode, thread):
        s = tree_scripts.get(thread.path, [])
        return s[thread.generated] if thread.generated < len(s) else num.pad

    torch.manual_seed(0)
    replayer = GPT(GPTConfig.preset("tiny", num.n_vocab, block_size=2048, n_layer=1)).eval()
    cfg2 = E.RunConfig(capacity=8, depth=2, batch_episodes=1, temperature=0, max_organizer_tokens=2000,
                       max_worker_tokens=2000, max_episode_tokens=20000)
    (tree_episode,) = E.Executor(replayer, num, cfg2).run([row2], force=force_tree)
    tree_rec = A.record(tree_episode, num, cfg2)
    print(A.show_timeline(tree_rec))
    print("the protocol's critical path:", P.critical_path(tree.parse(num, 8)), "| errors:", tree_rec["format_errors"])
    """),
    md("""
    Read the sub-organizers' rows (`worker 1`, `worker 2`, ...): they think, fork their pair workers
    (`worker 1.1`, ...), wait at their joins (`.`) and return their finds to the organizer. On the
    paper preset (12 numbers, 66 pairs) one organizer's ids stop at 32 pairs, while the tree reaches
    them all and finds about twice the answers (BENCHMARKS.md, "Recursive organizers").

    ## Exercises

    1. **calc for the workers.** At depth 1 workers cannot fork. Write traces where the organizer
       uses `calc` to compute a distance a worker would otherwise compute, and measure with
       `traces.py stats` what that does to latency.
    2. **The price of a call.** Train RL from a checking model with `--tool-cost 0.02` and with 0:
       does it learn to skip checks of expressions that are always right (e.g. "12+7" for 19)?
    3. **Another tool.** Add a tool to `tools.py` (say `left: 2 5 8` → the numbers of the question
       not in the list) and to `protocol.TOOLS`. Which of the worker's errors would it remove?
    """),
]


NOTEBOOKS = {
    "1_protocol": PROTOCOL,
    "2_executor": EXECUTOR,
    "3_training": TRAINING,
    "4_experiments": EXPERIMENTS,
    "5_beyond": BEYOND,
}


def build(name):
    nb = new_notebook(cells=NOTEBOOKS[name])
    nb.metadata.update(kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
                       language_info={"name": "python"})
    return nb


def execute(nb, cwd=HERE, timeout=900):
    """Run a notebook top to bottom in a fresh python3 kernel (cwd: notebooks/); returns it
    with its outputs. Raises nbclient's CellExecutionError at the first failing cell."""
    from nbclient import NotebookClient
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": cwd}}).execute()
    return nb


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write (and optionally execute) the course notebooks.")
    ap.add_argument("--execute", action="store_true", help="run them and save the outputs")
    ap.add_argument("only", nargs="*", help="name prefixes, e.g. 1 3_training (default: all)")
    args = ap.parse_args(argv)
    for name in NOTEBOOKS:
        if args.only and not any(name.startswith(p) for p in args.only):
            continue
        nb = build(name)
        if args.execute:
            t0 = time.perf_counter()
            execute(nb)
            print(f"{name}: executed in {time.perf_counter() - t0:.0f} s")
        path = os.path.join(HERE, name + ".ipynb")
        nbformat.write(nb, path)
        print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    sys.exit(main())
