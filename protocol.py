"""
The language of asynchronous thinking: tags, tokenizer, prompts, parsing, latency.

One model plays two roles in plain text. As ORGANIZER it reads a question and may

    <FORK-i>sub-query</FORK-i>    start worker i on a self-contained sub-query
    <JOIN-i>                      wait for worker i; the executor then injects
                                  "takeaway</JOIN-i>" into the organizer's context
    <ANSWER>...</ANSWER>          give the final answer (ends the episode)

As WORKER it sees only its sub-query, thinks, and ends with <RETURN>takeaway</RETURN>.

A worked example (capacity c = 3, so at most 2 workers at once):

    organizer prompt   <ORGANIZER>countdown 2 of 2 3 5 7 to 10\n
    organizer output   <FORK-1>5+3 then 2 7 to 10</FORK-1><FORK-2>7*2 then 3 5 to 10</FORK-2>
                       <JOIN-1>5+3+2</JOIN-1> new 1<JOIN-2>7*2-5+...</JOIN-2> ...
                       <ANSWER>5+3+2, 7+3</ANSWER>
    worker 1 prompt    <WORKER>5+3 then 2 7 to 10\n
    worker 1 output    5+3=8 ... <RETURN>5+3+2</RETURN>

Every tag is ONE special token, so the executor drives its state machine from token ids, and
`parse` below turns a finished trajectory (each thread's token ids) into fork/join events and a
list of NAMED format errors. From the events, `timeline` computes the reference latency (decode
steps on the critical path; injected tokens are free) and the thinking concurrency eta.

Recursive organization (`depth` D, default 1 = the paper). At D > 1 a worker may organize too:
it forks its own workers with the same <FORK-i>/<JOIN-i> tags inside its own thread, up to level
D (the organizer is level 0, its workers level 1, theirs level 2). Fork ids are scoped to the
thread that forked them, so a sub-worker is named by its PATH: "2.1" is worker 1 of worker 2 of
the organizer (records and timelines call it "worker 2.1"). A sub-organizer that <JOIN>s waits
exactly as the organizer does, so a join waits on a whole subtree. Worked example, D = 2:

    organizer     <FORK-1>9 of 2 3 9 to 30</FORK-1><JOIN-1>9+3*7</JOIN-1><ANSWER>9+3*7</ANSWER>
    worker 1      <FORK-1>9 3 of ...</FORK-1><FORK-2>9 2 of ...</FORK-2><JOIN-1>..<JOIN-2>..
                  <RETURN>9+3*7</RETURN>
    worker 1.1    ... <RETURN>9+3*7</RETURN>

The pool capacity c counts ONE shared pool across levels: the organizer plus every worker, at
any level, from the step its fork closes to the step its parent's join completes. A fork that
would make c + 1 is a pool overflow, as at depth 1 (there the rule is the organizer's own c - 1
outstanding workers; at D > 1 it depends on when other threads fork and join, so `parse` checks
it on the timeline: `pool_overflows`). A full pool never queues a fork: it is a format error.

The default tokenizer (`Tokenizer.numbers`) has a token for each byte, one for each run of 1-3
digits ("12"), one for each word the traces use, then the protocol's special tokens;
`Tokenizer.bytes_level` keeps only the bytes (every digit one token). `load_gpt2_tokenizer` reads
a pretrained GPT-2's own BPE from a local checkpoint folder instead. Nothing is downloaded.
"""

import os
import random
import re
from dataclasses import dataclass, field

import tempfile

import tiktoken
import tiktoken.load

# -----------------------------------------------------------------------------
# Tags and the tokenizer

MAX_FORKS = 32  # fork ids run 1..MAX_FORKS: 4 special tokens each (<FORK-i> </FORK-i> <JOIN-i> </JOIN-i>)
ORGANIZER, WORKER, PAD = "<ORGANIZER>", "<WORKER>", "<PAD>"
RETURN, RETURN_END = "<RETURN>", "</RETURN>"
ANSWER, ANSWER_END = "<ANSWER>", "</ANSWER>"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The words the synthetic traces write: one token each in Tokenizer.numbers.
WORDS = ("countdown", "sudoku", "plan", "grid", "of", "to", "below", "rest", "have", "ok", "no",
         "none")
# The default tokenizer's pre-split: a number of 1-3 digits, maybe after a space, that does not
# touch another digit or a '.' is one piece (" 12", which BPE then cuts into " " and "12");
# every other digit is a piece of its own, so a Sudoku grid like "12.4...." stays one token per
# cell.
NUMBER_PATTERN = (r""" ?(?<![\d.])\d{1,3}(?![\d.])|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}"""
                  r"""| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def fork_tags(i):
    """The four tag strings of fork id i: ('<FORK-i>', '</FORK-i>', '<JOIN-i>', '</JOIN-i>')."""
    return f"<FORK-{i}>", f"</FORK-{i}>", f"<JOIN-{i}>", f"</JOIN-{i}>"


def special_token_names(max_forks=MAX_FORKS):
    names = [ORGANIZER, WORKER, PAD, RETURN, RETURN_END, ANSWER, ANSWER_END]
    for i in range(1, max_forks + 1):
        names += fork_tags(i)
    return names


class Tokenizer:
    """A tiktoken Encoding plus the ids of the protocol's tags.

    >>> tok = Tokenizer.bytes_level()
    >>> ids = tok.encode("<FORK-2>7*3</FORK-2>")
    >>> len(ids), tok.tag(ids[0])            # 1 tag + 3 bytes + 1 tag
    (5, ('fork', 2))
    """

    def __init__(self, enc: tiktoken.Encoding, max_forks=MAX_FORKS, kind="bytes", folder=None):
        self.enc, self.max_forks, self.kind, self.folder = enc, max_forks, kind, folder
        self.n_vocab = enc.n_vocab
        ids = {name: enc.encode_single_token(name) for name in special_token_names(max_forks)}
        self.organizer, self.worker, self.pad = ids[ORGANIZER], ids[WORKER], ids[PAD]
        self.ret, self.ret_end = ids[RETURN], ids[RETURN_END]
        self.answer, self.answer_end = ids[ANSWER], ids[ANSWER_END]
        # id -> (kind, i): the table the executor's state machine and `parse` read
        self.tags = {self.organizer: ("organizer", 0), self.worker: ("worker", 0), self.pad: ("pad", 0),
                     self.ret: ("return", 0), self.ret_end: ("return_end", 0),
                     self.answer: ("answer", 0), self.answer_end: ("answer_end", 0)}
        for i in range(1, max_forks + 1):
            for kind, name in zip(("fork", "fork_end", "join", "join_end"), fork_tags(i)):
                self.tags[ids[name]] = (kind, i)
        self._by_kind = {v: k for k, v in self.tags.items()}

    @classmethod
    def bytes_level(cls, max_forks=MAX_FORKS):
        """256 byte tokens (ids 0..255) and the special tokens after them. Built offline."""
        if not 1 <= max_forks <= 999:
            raise ValueError(f"max_forks must be in 1..999, got {max_forks}")
        ranks = {bytes([b]): b for b in range(256)}
        specials = {name: 256 + j for j, name in enumerate(special_token_names(max_forks))}
        enc = tiktoken.Encoding(name=f"asyncthink-bytes-{max_forks}", pat_str=GPT2_PATTERN,
                                mergeable_ranks=ranks, special_tokens=specials)
        return cls(enc, max_forks, "bytes")

    @classmethod
    def numbers(cls, max_forks=MAX_FORKS):
        """The default: 256 byte tokens, one token per run of 1-3 digits ("12", "007"), one per
        word the traces use ("below", "ok"), then the tags. Spaces stay tokens of their own.
        Built offline.

        Why numbers get their own tokens: a thread copies numbers all the time (the question's
        numbers into a sub-query, a worker's result into the answer). With one token per digit,
        "the token after the last 2" is ambiguous, and a small model learns to copy only very
        slowly; with "12" one token, copying is looking up the one earlier "12". Arithmetic facts
        become one-token facts too ("12", "*", "11", "=" -> "132"). Why the space is not part of
        the number: then "12" is the same token wherever it stands, so "9-4=5" teaches the same
        fact after a space as at the start of a line. (A first version merged " 12" into one
        token: every number had two ids, and every fact had to be learned twice.)

        >>> tok = Tokenizer.numbers()
        >>> [tok.decode([i]) for i in tok.encode("12 9 of 3 9 12 to 30")]
        ['12', ' ', '9', ' ', 'of', ' ', '3', ' ', '9', ' ', '12', ' ', 'to', ' ', '30']
        >>> [tok.decode([i]) for i in tok.encode("12+9=21 30-21=9: 9-4=5 ok")]
        ['12', '+', '9', '=', '21', ' ', '30', '-', '21', '=', '9', ':', ' ', '9', '-', '4', '=', '5', ' ', 'ok']
        >>> [tok.decode([i]) for i in tok.encode("grid 12.4 x124 =3 1234")]
        ['grid', ' ', '1', '2', '.', '4', ' ', 'x', '124', ' ', '=', '3', ' ', '1', '2', '3', '4']
        """
        if not 1 <= max_forks <= 999:
            raise ValueError(f"max_forks must be in 1..999, got {max_forks}")
        ranks = {bytes([b]): b for b in range(256)}
        for width in (1, 2, 3):  # shorter first, so BPE can always reach the whole number
            for n in range(10 ** width):
                ranks.setdefault(f"{n:0{width}d}".encode(), len(ranks))  # "7", "07", "007", ...
        for word in WORDS:  # every prefix, so BPE's pairwise merges can build the word
            for end in range(2, len(word) + 1):
                ranks.setdefault(word[:end].encode(), len(ranks))
        specials = {name: len(ranks) + j for j, name in enumerate(special_token_names(max_forks))}
        enc = tiktoken.Encoding(name=f"asyncthink-numbers-{max_forks}", pat_str=NUMBER_PATTERN,
                                mergeable_ranks=ranks, special_tokens=specials)
        return cls(enc, max_forks, "numbers")

    def number_values(self):
        """{token id: value} for the tokens that are a number written the usual way ("12", not
        "012"): what model.init_number_embeddings reads. Empty for tokenizers without them."""
        if self.kind != "numbers":
            return {}
        return {self.enc.encode_single_token(str(n)): n for n in range(1000)}

    def spec(self):
        """What a checkpoint stores to rebuild this tokenizer (see from_spec)."""
        spec = {"kind": self.kind, "max_forks": self.max_forks}
        return {**spec, "folder": self.folder} if self.kind == "gpt2" else spec

    @classmethod
    def from_spec(cls, spec):
        """The tokenizer a checkpoint was trained with; older checkpoints were byte-level."""
        spec = spec or {"kind": "bytes"}
        max_forks = spec.get("max_forks", MAX_FORKS)
        if spec.get("kind") == "gpt2":
            return load_gpt2_tokenizer(spec["folder"], max_forks)
        if spec.get("kind", "bytes") not in ("bytes", "numbers"):
            raise ValueError(f"unknown tokenizer kind {spec.get('kind')!r}")
        return cls.numbers(max_forks) if spec.get("kind") == "numbers" else cls.bytes_level(max_forks)

    def encode(self, text):
        return self.enc.encode(text, allowed_special="all")

    def encode_plain(self, text):
        """Text from outside the model (a tool's answer): tag-like text stays text, never a tag."""
        return self.enc.encode(text, disallowed_special=())

    def decode(self, ids):
        return self.enc.decode(list(ids), errors="replace")

    def tag(self, token_id):
        """(kind, i) for a special token, None for ordinary text."""
        return self.tags.get(int(token_id))

    def tag_id(self, kind, i=0):
        """The id of a tag, e.g. tag_id('join', 3) is the id of <JOIN-3>."""
        if kind in ("fork", "fork_end", "join", "join_end") and not 1 <= i <= self.max_forks:
            raise ValueError(f"fork id {i} is out of range 1..{self.max_forks}")
        if (kind, i) not in self._by_kind:
            raise ValueError(f"unknown tag kind {kind!r}")
        return self._by_kind[(kind, i)]


def load_gpt2_tokenizer(folder, max_forks=MAX_FORKS):
    """GPT-2's BPE from a checkpoint folder (encoder.json + vocab.bpe, or HF's vocab.json +
    merges.txt), with the protocol's tags appended after <|endoftext|> (ids 50257, ...)."""
    def first(*names):
        for name in names:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        raise FileNotFoundError(f"{folder}: no {' or '.join(names)} (GPT-2 tokenizer files)")
    encoder_json, merges = first("encoder.json", "vocab.json"), first("vocab.bpe", "merges.txt")
    with open(merges, encoding="utf-8") as f:
        text = f.read()
    if text.endswith("\n"):
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(merges, encoder_json)
    else:  # tiktoken's loader drops the last line, expecting a newline there: give it one
        with tempfile.NamedTemporaryFile("w", suffix=".bpe", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(f.name, encoder_json)
    eot = len(ranks)
    specials = {"<|endoftext|>": eot}
    specials.update({name: eot + 1 + j for j, name in enumerate(special_token_names(max_forks))})
    enc = tiktoken.Encoding(name="gpt2-asyncthink", pat_str=GPT2_PATTERN,
                            mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, max_forks, "gpt2", os.path.abspath(folder))


# -----------------------------------------------------------------------------
# Prompts

def question_text(row):
    """The question a puzzle row asks, in the words the model reads.

    >>> question_text({"task": "countdown", "numbers": [2, 3, 5, 7], "target": 10, "k": 2})
    'countdown 2 of 2 3 5 7 to 10'
    >>> question_text({"task": "sudoku", "puzzle": "1.3.....2..4...1"})
    'sudoku 1.3.....2..4...1'
    """
    if row["task"] == "countdown":
        return f"countdown {row['k']} of {' '.join(map(str, row['numbers']))} to {row['target']}"
    if row["task"] == "sudoku":
        return f"sudoku {row['puzzle']}"
    if row["task"] == "question":  # a person's free question (chat.py): asked as typed
        return row["question"]
    raise ValueError(f"unknown task {row.get('task')!r}")


def organizer_prompt(question, hint=None, capacity=None):
    r"""The organizer's prompt; `hint` is an optional plan, e.g. 'F1 F2 J1 F3 J2 J3'; `capacity`,
    when given, states the pool's c, so one model can be run at any c it was trained for.

    >>> organizer_prompt("countdown 4 of 1 2 5 8 11 12 to 19", capacity=6)
    '<ORGANIZER>countdown 4 of 1 2 5 8 11 12 to 19\ncapacity 6\n'
    """
    return (f"{ORGANIZER}{question}\n" + (f"capacity {capacity}\n" if capacity else "")
            + (f"plan {hint}\n" if hint else ""))


def capacity_range(text):
    """The capacities a model was trained to read: capacity_range("2-16") -> (2, 16); a ValueError
    unless 2 <= lo <= hi <= 16."""
    lo, sep, hi = text.partition("-")
    if not (sep and lo.isdigit() and hi.isdigit() and 2 <= int(lo) <= int(hi) <= 16):
        raise ValueError(f"--capacities must be LO-HI with 2 <= LO <= HI <= 16, got {text!r}")
    return int(lo), int(hi)


def worker_prompt(sub_query):
    return f"{WORKER}{sub_query}\n"


def sample_plan(rng: random.Random, n_forks, capacity):
    """A random valid organizer action sequence ("structure initialization" in the paper):
    n_forks forks, each joined later, never more than capacity-1 outstanding at once.

    >>> sample_plan(random.Random(0), 3, 3)
    ['F1', 'J1', 'F2', 'F3', 'J3', 'J2']
    """
    actions, outstanding, next_id = [], [], 1
    while next_id <= n_forks or outstanding:
        can_fork = next_id <= n_forks and len(outstanding) < capacity - 1
        if can_fork and (not outstanding or rng.random() < 0.5):
            actions.append(f"F{next_id}"); outstanding.append(next_id); next_id += 1
        else:  # join one outstanding worker, usually the oldest
            j = outstanding.pop(0 if rng.random() < 0.7 else rng.randrange(len(outstanding)))
            actions.append(f"J{j}")
    return actions


def window_plan(n_forks, capacity):
    """The sliding window: keep capacity-1 workers busy, join the oldest first (the traces'
    default topology, written out as a plan).

    >>> window_plan(4, 3)
    ['F1', 'F2', 'J1', 'F3', 'J2', 'F4', 'J3', 'J4']
    """
    actions, outstanding = [], []
    for i in range(1, n_forks + 1):
        if len(outstanding) == capacity - 1:
            actions.append(f"J{outstanding.pop(0)}")
        actions.append(f"F{i}")
        outstanding.append(i)
    return actions + [f"J{i}" for i in outstanding]


# -----------------------------------------------------------------------------
# Parsing and validating a trajectory

# The named format errors. Each error in a parse is "<name>: <detail>".
DUPLICATE_ID = "duplicate-id"        # <FORK-i> with an id this organizer already used
POOL_OVERFLOW = "pool-overflow"      # a fork while c-1 workers are forked and not yet joined
UNKNOWN_JOIN = "unknown-join"        # <JOIN-i> of an id never forked (or joined twice)
UNJOINED_FORK = "unjoined-fork"      # a fork never joined before the answer
WRONG_ROLE = "wrong-role"            # e.g. <FORK-i> inside a worker, <RETURN> in the organizer
UNCLOSED_FORK = "unclosed-fork"      # <FORK-i> without its </FORK-i> (or another tag inside it)
STRAY_TAG = "stray-tag"              # a closing tag without its opening, or a prompt marker
MISSING_RETURN = "missing-return"    # a worker without <RETURN>...</RETURN>
MISSING_ANSWER = "missing-answer"    # an organizer without <ANSWER>...</ANSWER>
BAD_ANSWER = "bad-answer"            # an answer that does not parse for the task
ERROR_NAMES = (DUPLICATE_ID, POOL_OVERFLOW, UNKNOWN_JOIN, UNJOINED_FORK, WRONG_ROLE,
               UNCLOSED_FORK, STRAY_TAG, MISSING_RETURN, MISSING_ANSWER, BAD_ANSWER)
# Depth D > 1 only (recursive organizers; at depth 1 a fork or join in a worker is wrong-role):
TOO_DEEP = "too-deep"                # a fork in a worker at level D: its workers would be level D+1
FOREIGN_JOIN = "foreign-join"        # <JOIN-i> of a worker that is not this thread's own: an id its
                                     # parent or a sibling forked (ids are scoped to their thread)
UNJOINED_RETURN = "unjoined-return"  # a worker's </RETURN> while some of its own workers are unjoined
DEPTH_ERROR_NAMES = (TOO_DEEP, FOREIGN_JOIN, UNJOINED_RETURN)


@dataclass
class Event:
    kind: str  # "fork" or "join"
    id: int    # the i of <FORK-i> / <JOIN-i>
    pos: int   # this thread's generated tokens up to and including </FORK-i> or <JOIN-i>


@dataclass
class ParsedThread:
    """One thread of a trajectory, parsed. `generated` counts decode steps: tokens the model
    produced, not the ones the executor injected after a <JOIN-i>."""
    role: str                                     # "organizer", "worker" or "tool"
    generated: int = 0
    events: list = field(default_factory=list)    # Event, in order
    sub_queries: dict = field(default_factory=dict)  # fork id -> sub-query text
    result: str | None = None                     # the <ANSWER> or <RETURN> text
    children: dict = field(default_factory=dict)  # fork id -> ParsedThread (the workers it forked)
    stray_joins: list = field(default_factory=list)  # depth > 1: ids joined that were not its own
                                                     # running workers (parse names them later)


def injected_by_joins(ids, tok: Tokenizer):
    """Which output tokens the executor injected, by the protocol's rule: after a generated
    <JOIN-i>, everything up to and including </JOIN-i> (the worker's takeaway)."""
    mask, inside = [], None
    for t in ids:
        kind, i = tok.tag(t) or ("text", 0)
        mask.append(inside is not None)
        if inside is not None and (kind, i) == ("join_end", inside):
            inside = None
        elif inside is None and kind == "join":
            inside = i
    return mask


def parse_thread(ids, tok: Tokenizer, role, capacity, errors, injected=None, level=0, depth=1):
    """Parse one thread's output ids (prompt excluded) into a ParsedThread, appending named errors.
    `injected` marks the tokens the executor wrote (default: `injected_by_joins`); they are
    not decode steps, but tags among them still act (parallel mode injects its forks).
    `level` is the thread's level (organizer 0), `depth` the D it runs at: at D > 1 a worker
    below level D forks and joins like the organizer, and the pool and the joins that are not
    its own are checked by `parse`, which sees the whole tree."""
    th = ParsedThread(role)
    forked, outstanding = set(), set()
    open_fork, query = None, []   # inside <FORK-i> ... </FORK-i>
    result_kind, result = None, None  # inside <ANSWER> or <RETURN>
    ids = [int(t) for t in ids]
    injected = injected_by_joins(ids, tok) if injected is None else injected
    for t, was_injected in zip(ids, injected):
        kind, i = tok.tag(t) or ("text", 0)
        th.generated += not was_injected
        if open_fork is not None:
            if kind == "text":
                query.append(t)
            elif (kind, i) == ("fork_end", open_fork):
                th.events.append(Event("fork", open_fork, th.generated))
                th.sub_queries[open_fork] = tok.decode(query)
                open_fork = None
            else:
                errors.append(f"{UNCLOSED_FORK}: <FORK-{open_fork}> interrupted by a tag")
                open_fork = None
            continue
        if result_kind is not None:
            end = "answer_end" if result_kind == "answer" else "return_end"
            if kind == "text":
                result.append(t)
                continue
            if kind == end:
                th.result = tok.decode(result)
                break  # the thread is over; the executor stops decoding it here
            errors.append(f"{STRAY_TAG}: tag inside <{result_kind.upper()}>")
            break
        if kind == "text" or (was_injected and kind == "join_end"):
            continue  # thinking text, or a join's injected takeaway and closing tag
        if error := wrong_role(kind, role, level, depth):
            errors.append(error)
            continue
        if kind == "fork":
            fork_errors(i, forked, outstanding, capacity, depth, errors)
            forked.add(i); outstanding.add(i)
            open_fork, query = i, []
        elif kind == "join":
            join_event(th, i, outstanding, depth, errors)
        elif kind in ("answer", "return"):
            result_kind, result = kind, []
        else:
            errors.append(f"{STRAY_TAG}: {tok.decode([t])} generated")
    errors.extend(end_of_thread_errors(th, open_fork, outstanding))
    return th


def fork_errors(i, forked, outstanding, capacity, depth, errors):
    """The checks of <FORK-i>: an id used twice; at depth 1, a fork while the organizer's
    c - 1 workers all run (deeper, the shared pool is checked by `parse` on the whole tree)."""
    if i in forked:
        errors.append(f"{DUPLICATE_ID}: <FORK-{i}> used twice")
    elif depth == 1 and len(outstanding) >= capacity - 1:
        errors.append(f"{POOL_OVERFLOW}: <FORK-{i}> while {len(outstanding)} workers run (c={capacity})")


def join_event(th, i, outstanding, depth, errors):
    """<JOIN-i> in thread th: the join event if worker i runs; at depth > 1 an unknown id may
    be a parent's or a sibling's worker, which only the whole tree tells (stray_join_errors)."""
    if i not in outstanding and depth > 1:
        th.stray_joins.append(i)
    elif i not in outstanding:
        errors.append(f"{UNKNOWN_JOIN}: <JOIN-{i}> of a worker not running")
    else:
        th.events.append(Event("join", i, th.generated))
        outstanding.discard(i)


def wrong_role(kind, role, level=0, depth=1):
    """The error for a tag this thread may not write, else None: a worker answers nothing (and
    at depth 1, the paper's, forks and joins nothing); the organizer returns nothing; at depth
    D > 1 a worker at level D forks nothing (too deep)."""
    if role == "worker" and (kind == "answer" or kind in ("fork", "join") and depth == 1):
        return f"{WRONG_ROLE}: {kind} tag in a worker"
    if kind == "return" and role == "organizer":
        return f"{WRONG_ROLE}: <RETURN> in the organizer"
    if kind == "fork" and level >= depth:
        return f"{TOO_DEEP}: a fork at level {level} (depth {depth})"
    return None


def end_of_thread_errors(th, open_fork, outstanding):
    """What a thread still owed when its tokens ran out: a closed fork, its answer (or return),
    and, before the answer, a join of every worker it forked."""
    errors = []
    if open_fork is not None:
        errors.append(f"{UNCLOSED_FORK}: <FORK-{open_fork}> never closed")
    if th.result is None:
        errors.append(f"{MISSING_ANSWER}: no <ANSWER>...</ANSWER>" if th.role == "organizer"
                      else f"{MISSING_RETURN}: no <RETURN>...</RETURN>")
    elif outstanding and th.role == "worker":
        errors.append(f"{UNJOINED_RETURN}: " + ", ".join(f"<FORK-{i}>" for i in sorted(outstanding))
                      + " not joined before the return")
    elif outstanding:
        errors.append(f"{UNJOINED_FORK}: " + ", ".join(f"<FORK-{i}>" for i in sorted(outstanding))
                      + " not joined before the answer")
    return errors


@dataclass
class Trajectory:
    organizer: ParsedThread
    errors: list      # named format errors, "<name>: <detail>"
    answers: list     # the parsed final answers (strings), [] if none


def parse(organizer_ids, worker_ids: dict, tok: Tokenizer, capacity=4, task=None, injected=None,
          tools=(), depth=1):
    """Parse a whole trajectory: the organizer's output ids (injected join results included) and
    each worker's output ids by path: fork id i (or "i") for the organizer's worker i, "i.j" for
    worker j of worker i (depth > 1). Prompts are not part of the ids. `injected` optionally
    marks the organizer's injected tokens (the executor knows them exactly).

    Workers are attached to the fork that started them; a worker whose fork never closed is
    ignored. A fork that calls one of `tools` (tool_call) has the tool's answer as its ids.
    With `task` ('countdown' or 'sudoku') the answer must parse for that task. At depth > 1 the
    joins that were not a thread's own (stray_join_errors) and the shared pool (pool_overflows)
    are checked on the whole tree.
    """
    errors = []
    org = parse_thread(organizer_ids, tok, "organizer", capacity, errors, injected, depth=depth)
    by_path = {str(path): ids for path, ids in worker_ids.items()}
    attach_workers(org, "", by_path, tok, capacity, errors, tools, depth)
    if depth > 1:
        errors += stray_join_errors(org) + pool_overflows(schedule(org), capacity)
    answers = []
    if org.result is not None and task is not None:
        answers = parse_answer(org.result, task)
        if answers is None:
            errors.append(f"{BAD_ANSWER}: {org.result[:40]!r} is not a {task} answer")
            answers = []
    return Trajectory(org, errors, answers)


def attach_workers(th, path, by_path, tok, capacity, errors, tools, depth, level=0):
    """Parse the workers th forked (found in by_path under path.i) and theirs, depth first."""
    for ev in th.events:
        key = f"{path}.{ev.id}" if path else str(ev.id)
        if ev.kind != "fork" or key not in by_path:
            continue
        if tool_call(th.sub_queries[ev.id], tools):
            th.children[ev.id] = tool_thread(by_path[key], tok)
            continue
        child = parse_thread(by_path[key], tok, "worker", capacity, errors, level=level + 1, depth=depth)
        th.children[ev.id] = child
        attach_workers(child, key, by_path, tok, capacity, errors, tools, depth, level + 1)


def stray_join_errors(th, parent=None):
    """Name each join of an id that was not one of th's running workers (depth > 1), through
    the whole tree: foreign-join if th never forked that id but its parent or a sibling did (ids
    are scoped: <JOIN-2> in worker 1 means worker 1's own worker 2, never the organizer's),
    else unknown-join (an id nobody near forked, or one th already joined)."""
    errors = []
    near = set()
    if parent is not None:
        near = set(parent.sub_queries).union(*(set(s.sub_queries) for s in parent.children.values() if s is not th))
    for i in th.stray_joins:
        if i not in th.sub_queries and i in near:
            errors.append(f"{FOREIGN_JOIN}: <JOIN-{i}> of a worker its parent or a sibling forked")
        else:
            errors.append(f"{UNKNOWN_JOIN}: <JOIN-{i}> of a worker not running")
    for child in th.children.values():
        errors += stray_join_errors(child, th)
    return errors


def parse_text(organizer_text, worker_texts: dict, tok: Tokenizer, capacity=4, task=None, tools=(),
               depth=1):
    """`parse` for hand-written text (tests, notebooks); worker_texts by path (1, "1", "1.2")."""
    return parse(tok.encode(organizer_text), {i: tok.encode(t) for i, t in worker_texts.items()},
                 tok, capacity, task, tools=tools, depth=depth)


def error_names(errors):
    return [e.split(":", 1)[0] for e in errors]


ANSWER_SEPARATOR = ", "


def labelled(parts):
    """A countdown list as the organizer writes it, each expression after its letter:
    labelled(['12+8-1', '12+5+2']) -> 'A12+8-1, B12+5+2'.

    Why the letters: the organizer copies its running list of finds into every tally and then
    into the answer, and a small model copies by looking up the tokens it just wrote. Unlabelled,
    the items of one list share their first tokens ("12+8-1, 12+5+2": after "12" and "+", is it
    8 or 5?) and a copy jumps from item to item. With the letter straight before the first
    number, the two tokens before each early token name the item ("B", "12" -> "+"), so every
    lookup has one answer (BENCHMARKS.md, "Labelled lists")."""
    return ANSWER_SEPARATOR.join(f"{chr(ord('A') + j)}{p}" for j, p in enumerate(parts))


def answer_text(parts, labels=False):
    """The organizer's final answer: answer_text(['5+3+2', '7+3']) -> '<ANSWER>5+3+2, 7+3</ANSWER>';
    with labels=True (countdown traces) -> '<ANSWER>A5+3+2, B7+3</ANSWER>'."""
    return f"{ANSWER}{(labelled(parts) if labels else ANSWER_SEPARATOR.join(parts)) or 'none'}{ANSWER_END}"


_EXPRESSION = re.compile(r"^[0-9+\-*/() ]+$")
_LABEL = re.compile(r"^[A-Z](?=[0-9(])")  # a labelled item's letter (see `labelled`)


def parse_answer(text, task):
    """The answer's parts, or None if it does not parse: countdown answers are expressions
    separated by ', '; a sudoku answer is 16 digits 1-4 (row-major); 'none' is the empty answer.

    >>> parse_answer("5+3+2, 7+3", "countdown")
    ['5+3+2', '7+3']
    >>> parse_answer("A5+3+2, B7+3", "countdown")   # a labelled list: the letters are dropped
    ['5+3+2', '7+3']
    >>> parse_answer("1234341221434321", "sudoku")
    ['1234341221434321']
    """
    text = text.strip()
    if text == "none" and task in ("countdown", "sudoku"):  # nothing found: a valid, empty answer
        return []
    if task == "countdown":
        parts = [_LABEL.sub("", p.strip()) for p in text.split(",")]
        ok = parts and all(p and _EXPRESSION.match(p) and any(c.isdigit() for c in p) for p in parts)
        return parts if ok else None
    if task == "sudoku":
        return [text] if re.fullmatch(r"[1-4]{16}", text) else None
    raise ValueError(f"unknown task {task!r}")


# -----------------------------------------------------------------------------
# Tool calls: a fork whose sub-query names a tool goes to that tool, not to a model worker

TOOLS = ("calc", "check")  # what each one does: tools.py
TOOL_STEPS = 1  # a tool answers within the step after its fork: on the timeline, a worker of one
                # decode step. So a <JOIN-i> of a tool never waits: it comes a step later at least.


def parse_tools(text):
    """The tools of a --tools flag: parse_tools("calc, check") -> ('calc', 'check'); "" -> ().
    An unknown name raises ValueError."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    for name in names:
        if name not in TOOLS:
            raise ValueError(f"unknown tool {name!r}; the tools are {', '.join(TOOLS)}")
    return names


def tool_call(sub_query, tools):
    """(tool, argument) if the sub-query starts with "<tool>:" for one of `tools`, else None.

    >>> tool_call("calc: 12*9+4", ("calc", "check"))
    ('calc', '12*9+4')
    >>> tool_call("12 9 of 3 9 12 to 30", ("calc",)), tool_call("calc: 1+2", ())
    (None, None)
    """
    name, sep, argument = sub_query.partition(":")
    return (name, argument.strip()) if sep and name in tools else None


def tool_thread(ids, tok: Tokenizer):
    """The parsed thread of a tool: TOOL_STEPS decode steps, its answer text as the takeaway."""
    return ParsedThread("tool", generated=TOOL_STEPS, result=tok.decode(ids))


# -----------------------------------------------------------------------------
# Latency and concurrency: the reference, as pure functions of a parsed trajectory

@dataclass
class Span:
    """One thread on the timeline. Steps are global decode steps, numbered from 1."""
    name: str             # "organizer", "worker 3", "worker 3.1" (nested)
    fork_step: int        # the step at which its fork closed (0 for the organizer)
    finish: int           # the step of its last decode
    join_step: int | None  # the step at which its parent's <JOIN-i> was decoded
    tokens: int           # decode steps of its own
    active: list          # [(first_step, last_step)] intervals it decoded in


def timeline(traj: Trajectory):
    """Schedule every thread as the protocol defines it and return the spans, organizer first.

    Every thread decodes one token per step; a forked worker starts decoding the step after its
    </FORK-i>; an organizer at <JOIN-i> pauses until that worker has finished, then continues;
    injected tokens cost nothing. Worked example: the organizer forks at its token 3, joins at
    token 5 and ends at token 8; the worker has 10 tokens. Worker: steps 4..13. Organizer: steps
    1..5, waits, 14..16. Latency 16; active thread-steps 8 + 10 = 18; eta = 18/16.

    Recursively (depth > 1) nothing changes: a sub-organizer schedules its own workers the same
    way, and its finish, which a join of it waits for, comes after its own joins: a join waits
    on the whole subtree. Worked example: worker 1, forked at step 3, forks 1.1 at its token 2
    (step 5) and joins it at token 3 (step 6); 1.1 has 4 tokens (steps 6..9); worker 1 resumes
    at 10 and returns at its token 5 (step 11); an organizer join of worker 1 at step 4 waits
    until 11.
    """
    return schedule(traj.organizer)


def schedule(organizer: ParsedThread):
    """timeline's spans from the parsed organizer thread (parse uses it before a Trajectory exists)."""
    spans = []

    def run(thread, name, start, fork_step):
        span = Span(name, fork_step, start, None, thread.generated, [])
        spans.append(span)
        t, done, finish_of, child_span = start, 0, {}, {}
        def decode(n):  # decode n more tokens of this thread, from step t+1
            nonlocal t
            if span.active and span.active[-1][1] == t:  # no wait since the last run: extend it
                span.active[-1] = (span.active[-1][0], t + n)
            else:
                span.active.append((t + 1, t + n))
            t += n

        for ev in thread.events:
            if ev.pos > done:
                decode(ev.pos - done)
                done = ev.pos
            if ev.kind == "fork" and ev.id in thread.children:
                child_name = f"worker {ev.id}" if thread.role == "organizer" else f"{name}.{ev.id}"
                child_span[ev.id] = run(thread.children[ev.id], child_name, t, t)
                finish_of[ev.id] = child_span[ev.id].finish
            elif ev.kind == "join":
                t = max(t, finish_of.get(ev.id, t))
                if ev.id in child_span and thread.children[ev.id].result is not None:
                    child_span[ev.id].join_step = t  # (a worker that never returned is never joined)
        if thread.generated > done:
            decode(thread.generated - done)
        span.finish = t
        return span

    run(organizer, "organizer", 0, 0)
    return spans


def parent_name(name):
    """The span name of a thread's parent: 'worker 2.1' -> 'worker 2' -> 'organizer'."""
    return name.rsplit(".", 1)[0] if "." in name else "organizer"


def pool_overflows(spans, capacity):
    """The shared pool at depth > 1, checked on the timeline: each worker holds a place from
    its fork's step to its join's step (both included; never joined: to the end), the organizer
    one throughout. A fork overflows if, counting itself, more than c places are held at its
    step. Forks of one step count in the order the executor handles them, creation order: the
    organizer's workers and theirs in the order they were forked, same-step ones by their
    parents' order. Worked example, c = 3: the organizer forks 1 (step 3); worker 1 forks 1.1 at
    step 6 while 1 is running: places organizer, 1, 1.1 = 3, fine; it forks 1.2 at step 8 before
    joining 1.1: 4 places, an overflow."""
    workers, rank, errors = spans[1:], {"organizer": 0}, []
    order = []
    for step in sorted({s.fork_step for s in workers}):
        same = sorted((s for s in workers if s.fork_step == step), key=lambda s: rank[parent_name(s.name)])
        for s in same:
            rank[s.name] = len(rank)
            order.append(s)
    for s in order:
        held = 1 + sum(1 for w in workers
                       if (w.fork_step, rank[w.name]) <= (s.fork_step, rank[s.name])
                       and (w.join_step is None or w.join_step >= s.fork_step))
        if held > capacity:
            errors.append(f"{POOL_OVERFLOW}: {s.name} forked at step {s.fork_step} while "
                          f"{held - 1} threads hold the pool (c={capacity})")
    return errors


def critical_path(traj: Trajectory):
    """Latency: decode steps until the organizer's last token (the critical path)."""
    return timeline(traj)[0].finish


def concurrency(traj: Trajectory):
    """eta = (1/T) * sum over steps t <= T of the number of threads decoding at t."""
    spans = timeline(traj)
    T = spans[0].finish
    if T == 0:
        return 0.0
    busy = sum(max(0, min(b, T) - a + 1) for s in spans for a, b in s.active)
    return busy / T


def plan_of(traj: Trajectory):
    """The organizer's plan, its action sequence, e.g. 'F1 F2 J1 J2' (the language of the plans
    in prompts). A "plan" is this sequence; a "structure" (grpo.py, the paper's word) is one whole
    rollout: an episode, the organizer and all its workers."""
    return " ".join(("F" if ev.kind == "fork" else "J") + str(ev.id) for ev in traj.organizer.events)
