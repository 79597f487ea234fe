"""
A GPT-2-shaped decoder-only transformer, plus the KV cache an AsyncThink executor
drives to decode many threads (organizer and workers) in one batch.

Read top to bottom:
  1. GPTConfig and the named sizes (tiny / small / medium).
  2. Packed rows (pack, packed_positions): several training sequences in one row.
  3. The model: attention, MLP, block, GPT. Pre-LayerNorm blocks, learned
     position embeddings, input and output embeddings tied, GELU (tanh form,
     exactly as GPT-2, so a Hugging Face checkpoint gives identical logits);
     rotary positions, untied embeddings and the previous-token input ("smear")
     are config switches.
  4. KVCache: one preallocated tensor of keys and one of values, split into
     "slots". Each slot holds one token sequence, and each slot is at its own
     position. GPT.forward_cached appends tokens to some slots and returns logits.
  5. GPT.from_pretrained: load a GPT-2 checkpoint in Hugging Face format.

Sampling lives in the executor.
"""

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # longest sequence the position embedding covers
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as in GPT-2
    layer_norm_eps: float = 1e-5  # GPT-2's value
    rope: bool = False  # rotary position embedding instead of GPT-2's learned one (see rotary())
    tie_embeddings: bool = True  # lm_head reuses the token embedding matrix, as GPT-2 does
    smear: int = 0  # each token's input also carries the 1 to 4 tokens before it (GPT.embed)

    @classmethod
    def preset(cls, name, vocab_size, **overrides):
        """GPTConfig.preset('small', vocab_size=300) -> a config from PRESETS."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(vocab_size=vocab_size, **{**PRESETS[name], **overrides})


# Parameter counts with vocab_size=300 (embeddings included, tied weights counted once):
#   tiny ~0.04M (unit tests), small ~0.8M (the cpu recipe), medium ~25M (the gpu recipe).
# small is sized for a 15-minute CPU budget, where the model sees only a few million tokens:
# at equal wall time n_embd 128 (1.6x the steps) beat 192 (SFT loss 0.088 vs 0.140, distance
# arithmetic 82% vs 63% right; BENCHMARKS.md). A bigger model needs a bigger budget.
# small also has smear 3 (GPT.embed: the three tokens before each input, three 128 x 128 maps):
# the largest accuracy gains measured at this budget (smear 2 over none, then smear 3 over 2:
# the organizer's list copies; BENCHMARKS.md "Smear 3"); medium is not measured with it yet.
# The trained presets use rotary positions: AsyncThink threads copy numbers from their prompt
# and from joined results, and copying needs "look k tokens back" heads, which rotary gives
# for free and a learned table must learn at every position (measured in BENCHMARKS.md).
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=256),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=1024, rope=True, smear=3),
    "medium": dict(n_layer=8, n_head=8, n_embd=512, block_size=2048, rope=True),
}


def rotary_angles(n_pos, head_dim, base=10000.0):
    """(cos, sin), each (n_pos, hd/2): the rotation angles pos * base**(-2i/hd) of every position
    pos < n_pos and channel pair i, computed once per model (CausalSelfAttention keeps them and
    looks its positions up: recomputing them in every layer was a tenth of a decode step)."""
    half = head_dim // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32) / half)  # (hd/2,)
    angles = torch.arange(n_pos, dtype=torch.float32)[:, None] * freqs  # (n_pos, hd/2)
    return angles.cos(), angles.sin()


def rotary(x, cos, sin):
    """Rotate queries or keys by their positions (RoPE, Su et al. 2021).

    x (B, T, nh, hd); cos, sin (B, T, hd/2) or (T, hd/2): rotary_angles at x's positions. Channel
    pairs (i, i + hd/2) turn by the angle pos * base**(-2i/hd). A query at position p and a key at
    position s then meet in the dot product only through p - s: attention sees relative
    positions, whatever p is. Keys are rotated before they go into the KV cache, so cached
    decoding needs nothing more.
    """
    half = x.size(-1) // 2
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def packed_positions(segments):
    """segments (B, T) of non-decreasing ids per row -> (pos (B, T), mask (B, 1, T, T)):
    each token's position within its segment, and True where query t may look at key s
    (same segment, s <= t).

    >>> pos, mask = packed_positions(torch.tensor([[0, 0, 0, 1, 1]]))
    >>> pos.tolist()
    [[0, 1, 2, 0, 1]]
    >>> mask[0, 0].int().tolist()[4]  # the last b sees the two b's only
    [0, 0, 0, 1, 1]
    """
    B, T = segments.shape
    t = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.cummax(torch.where(starts, t, torch.zeros_like(t)), dim=1).values  # segment's start
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return t - first, (same & causal)[:, None]


def pack(seqs, micro_tokens, pads):
    """Pack sequences into rows as long as the longest one, with no padding between them, and
    the rows into micro-batches of about micro_tokens tokens. A sequence is a tuple of
    equal-length per-token lists (input ids, targets, ...); pads gives each field's padding
    value, and its type the field's dtype (an int pad: a long tensor; a float pad: float32).
    Returns [(field tensors..., segments)], each (B, T): segments numbers the sequences
    of a row, and model.forward keeps them apart (own positions, own attention), so a packed
    row computes exactly what each sequence alone would.

    Why pack: a structure's threads are an organizer of ~300-550 tokens and a dozen workers of
    ~100; padded to the longest, 59% of an SFT batch was padding. Sequences go longest first
    into the least filled row with room, so rows come out about equally long:
    lengths [5, 3, 2] -> rows [5] and [3 2], no padding at all. Rows no longer than the longest
    sequence keep attention (quadratic in the row's length) as cheap as padding made it."""
    seqs = sorted(seqs, key=lambda s: -len(s[0]))
    width = len(seqs[0][0])
    rows, filled = [], []  # the sequences of each row, and how many tokens they hold
    for seq in seqs:
        fits = [r for r in range(len(rows)) if filled[r] + len(seq[0]) <= width]
        if not fits:
            rows.append([])
            filled.append(0)
            fits = [len(rows) - 1]
        r = min(fits, key=lambda r: filled[r])
        rows[r].append(seq)
        filled[r] += len(seq[0])
    out, per_batch = [], max(1, micro_tokens // width)
    for first in range(0, len(rows), per_batch):
        group, T = rows[first:first + per_batch], max(filled[first:first + per_batch])
        tensors = [torch.full((len(group), T), pad, dtype=torch.long if isinstance(pad, int)
                              else torch.float32) for pad in pads]
        seg = torch.full((len(group), T), len(seqs), dtype=torch.long)  # padding: a segment of its own
        for b, row in enumerate(group):
            t = 0
            for s, seq in enumerate(row):
                n = len(seq[0])
                for tensor, values in zip(tensors, seq):
                    tensor[b, t:t + n] = torch.tensor(values, dtype=tensor.dtype)
                seg[b, t:t + n] = s
                t += n
        out.append((*tensors, seg))
    return out


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention. One Linear (c_attn) makes queries, keys and values
    for all heads at once; c_proj mixes the heads' outputs back into the residual.

    forward():        the whole sequence at once, causal (training, scoring).
    forward_cached(): new tokens only; their keys/values are written into the cache
                      and the queries attend to everything the slot holds so far.
    """

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.rope = config.rope
        if config.rope:  # not saved in checkpoints: rebuilt from the config
            cos, sin = rotary_angles(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def qkv(self, x, pos):
        """Queries, keys, values, each (B, T, nh, hd); pos (B, T) or (T,) for rotary."""
        B, T, C = x.size()
        nh, hd = self.n_head, C // self.n_head
        qkv = self.c_attn(x)  # (B, T, 3C): queries, keys, values side by side
        qk, v = qkv[..., :2 * C].view(B, T, 2 * nh, hd), qkv[..., 2 * C:].view(B, T, nh, hd)
        if self.rope:  # queries and keys in one rotation
            qk = rotary(qk, self.cos[pos], self.sin[pos])
        return qk[:, :, :nh], qk[:, :, nh:], v

    def forward(self, x, pos, mask=None):
        """x (B, T, C); pos (T,) or (B, T); mask (B, 1, T, T) True where a query may look at a
        key (packed rows), or None for plain causal attention."""
        B, T, C = x.size()
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x, pos))  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def forward_cached(self, x, k_cache, v_cache, pos, write, runs):
        """x (B, T, C) new tokens at positions pos (B, T); k_cache, v_cache (n_slots, nh,
        max_len, hd) are this layer's cache; write = (slots (R, 1), positions (R, T), rows):
        where the rows that append something put their keys and values; runs: how the rows
        read the cache back (ReadRun, see GPT.forward_cached)."""
        B, T, C = x.size()
        q, k, v = self.qkv(x, pos)  # (B, T, nh, hd)
        # 1. write the new keys/values at their positions in their slots (the two index
        #    tensors are apart, so the indexed view is (R, T, nh, hd), the layout of k and v)
        slots, positions, rows = write
        k_cache[slots, :, positions] = k[rows]
        v_cache[slots, :, positions] = v[rows]
        # 2. attention, one run of nearby slots at a time: the run's keys are a view of the
        #    cache (heads first, as attention multiplies them), never a copy. Written out as two
        #    batched matmuls: for a few queries over many cached keys they beat
        #    scaled_dot_product_attention on a CPU (BENCHMARKS.md).
        q = q.transpose(1, 2) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, hd)
        y = torch.empty_like(q)
        for run in runs:
            k_run = k_cache[run.lo:run.hi, :, :run.L]  # (n, nh, L, hd): n slots, riders included
            v_run = v_cache[run.lo:run.hi, :, :run.L]
            if run.at is None:
                q_run = q[run.rows]  # (n, nh, T, hd)
            else:  # the riders between the rows: zero queries
                q_run = q.new_zeros(run.hi - run.lo, *q.shape[1:]).index_copy_(0, run.at, q[run.rows])
            att = q_run @ k_run.transpose(-1, -2)  # (n, nh, T, L)
            if run.blocked is not None:
                att.masked_fill_(run.blocked, float("-inf"))
            y_run = att.softmax(dim=-1) @ v_run  # (n, nh, T, hd)
            y[run.rows] = y_run if run.at is None else y_run[run.at]
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, pos, mask=None):
        x = x + self.attn(self.ln_1(x), pos, mask)
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x, k_cache, v_cache, pos, write, runs):
        x = x + self.attn.forward_cached(self.ln_1(x), k_cache, v_cache, pos, write, runs)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            # learned position embedding (GPT-2); rotary models rotate q and k instead
            wpe=nn.Identity() if config.rope else nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # smear: a learned map of the previous token's embedding, added to each token's input
        if not 0 <= config.smear <= 4:
            raise ValueError(f"smear {config.smear}: a model carries 0 to 4 tokens before each input")
        self.smear = nn.Linear(config.n_embd, config.n_embd, bias=False) if config.smear >= 1 else None
        self.smear2 = nn.Linear(config.n_embd, config.n_embd, bias=False) if config.smear >= 2 else None
        self.smear3 = nn.Linear(config.n_embd, config.n_embd, bias=False) if config.smear >= 3 else None
        self.smear4 = nn.Linear(config.n_embd, config.n_embd, bias=False) if config.smear >= 4 else None
        # Tied embeddings: reading a token in and predicting it out share one matrix. Untying
        # was tried against the small model's "reads out a neighbour of the right number" errors
        # and did not help: the free output layer learned neighbours as alike (BENCHMARKS.md).
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        # nanoGPT / GPT-2 init: N(0, 0.02) everywhere, and the projections that write
        # into the residual stream scaled by 1/sqrt(2 * n_layer), because each layer
        # adds two of them and the residual's variance would otherwise grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for smear in self.smear_maps():
            if smear is not None:
                nn.init.zeros_(smear.weight)  # starts as the plain GPT; training opens it

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def smear_maps(self):
        """The maps of the tokens 1, 2, 3 and 4 back (None where config.smear stops short)."""
        return self.smear, self.smear2, self.smear3, self.smear4

    def embed(self, idx, prev, pos):
        """The input of the first block: idx (B, T) -> (B, T, C).

        With config.smear, token t's input is wte[t] + W wte[prev] (prev (B, T, S): the S tokens
        before it, the nearest first; pos (B, T) or (T,): its position, 0 where a sequence starts
        and there is none). With smear 2 it also gets W2 wte[the token two back], with smear 3
        W3 wte[the token three back], with smear 4 W4 wte[the token four back]. Why:
        copying is "find the earlier X, write what came after it". A plain transformer needs two
        layers for that (one head moves each token's predecessor into it, a second head matches
        the query against it: an induction head), and in our 15-minute runs that circuit forms
        late. With the predecessor already in every input, one head can match it at once
        (Olsson et al. 2022 call these "smeared keys"; modded-nanogpt's smear gate does the same).
        One predecessor is ambiguous when a pair repeats: copying "8+7+2" beside "11+7+4", "+"
        follows "7" in both; the two tokens before ("7", "+") tell them apart one step sooner.
        Two are still ambiguous inside a labelled list: in "A12+8-1, B12+7" the token after
        ("12", "+") is 8 in one item and 7 in the other; three ("B", "12", "+") name the item.
        """
        x = self.transformer.wte(idx)
        for lag, smear in enumerate(self.smear_maps(), start=1):
            if smear is not None:  # no such predecessor near a sequence's start
                has_prev = (pos >= lag).unsqueeze(-1).to(x.dtype)
                x = x + smear(self.transformer.wte(prev[..., lag - 1])) * has_prev
        if not self.config.rope:
            x = x + self.transformer.wpe(pos)
        return x

    def num_params(self):
        """All parameters; the tied embedding matrix is counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, reduction="mean", segments=None):
        """idx (B, T) token ids -> logits (B, T, V).
        With targets (B, T) -> (logits, loss). Targets equal to -1 are ignored.
        reduction='none' gives the per-token loss (B, T), i.e. minus the log-probability
        of each target token (0 at ignored positions), which RL needs.

        segments (B, T), optional: several sequences packed into one row (training without
        padding). Each token then attends only to earlier tokens of its own segment, and
        positions restart at 0 where a segment starts, so every sequence is computed exactly
        as if it were alone in its row. Row [a a a b b] has segments [0 0 0 1 1]:
        positions [0 1 2 0 1], and the b's never see the a's."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if segments is None:
            pos, mask = torch.arange(T, device=idx.device), None  # (T,)
        else:
            pos, mask = packed_positions(segments)
        S = max(1, int(self.config.smear))  # predecessors each input may carry
        prev = torch.stack([F.pad(idx, (lag, 0))[:, :T] for lag in range(1, S + 1)], dim=-1)  # (B, T, S)
        x = self.transformer.drop(self.embed(idx, prev, pos))
        for block in self.transformer.h:
            x = block(x, pos, mask)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T),
                               ignore_index=-1, reduction=reduction)
        if reduction == "none":
            loss = loss.view(B, T)
        return logits, loss

    # ---------------------------------------------------------------- KV cache
    def new_cache(self, n_slots, max_len=None, device=None, dtype=None):
        """A KVCache for this model, by default on the model's device and dtype."""
        p = self.lm_head.weight
        return KVCache(self.config, n_slots, max_len, device or p.device, dtype or p.dtype)

    def forward_cached(self, idx, cache, slots, n_new=None):
        """Append tokens to some cache slots and return their logits.

        idx (B, T): new tokens, row b goes to slot slots[b] (slots: (B,) long, distinct).
        T=1 is one decode step for B threads at different lengths; T>1 is a prefill,
        also into a slot that already holds tokens. Rows of different true lengths are
        right-padded; n_new (B,) gives each row's true count (default: all T). Every
        row's T positions are written, but its length only advances by n_new[b], so the
        padding sits beyond the slot's length and is overwritten by the next append. A row
        with n_new[b] = 0 writes nothing and its slot stays as it was.

        Reading the cache back: the rows are split into runs of nearby slots (read_runs), and
        each run reads its slots lo..hi as one view of the cache, up to its longest row's
        length: no copy, and few keys read that a row does not need. The slots between a run's
        rows (a waiting thread's, a free one) ride along: a zero query, its output dropped.

        The new token j of row b sits at position p = lengths[slot] + j. It may look at
        key position k iff k <= p. That one rule gives both the causal mask aligned to
        the bottom right (all of the cached prefix, and new tokens 0..j) and hides
        whatever stale data lies beyond the slot's length.
        Returns logits (B, T, V); logits at padded positions are meaningless.
        Meant for inference: call model.eval() (no dropout) and wrap in torch.no_grad().
        """
        B, T = idx.size()
        slots, n_new = cache.check_append(slots, n_new, B, T)
        start = cache.lengths[slots]  # (B,)
        written = n_new > 0
        if bool(written.any()) and int((start + T)[written].max()) > cache.max_len:
            raise ValueError(f"KV cache overflow: appending {T} tokens to slots {slots.tolist()} "
                             f"with lengths {start.tolist()} exceeds max_len {cache.max_len}")
        rows = torch.nonzero(written).squeeze(1)  # the rows that append something
        # (B, T); clamped only where a row writes nothing (a full slot riding along)
        pos = (start[:, None] + torch.arange(T, device=slots.device)).clamp(max=cache.max_len - 1)
        write = (slots[rows, None], pos[rows], slice(None) if len(rows) == B else rows)
        pos = pos.to(idx.device)
        runs = cache.read_plan(slots.tolist(), pos)

        # the tokens before each new one: the slot's last S tokens, then the new tokens themselves
        S = cache.last.size(1)
        history = torch.cat([cache.last[slots], idx], dim=1)  # (B, S + T), oldest first
        prev = torch.stack([history[:, S - lag:S - lag + T] for lag in range(1, S + 1)], dim=-1)  # (B, T, S)
        x = self.embed(idx, prev, pos)
        for i, block in enumerate(self.transformer.h):
            x = block.forward_cached(x, cache.k[i], cache.v[i], pos, write, runs)
        logits = self.lm_head(self.transformer.ln_f(x))
        # each writing row's last S tokens of history, in one gather (a row appends n_new of them)
        cols = (n_new[rows] - 1)[:, None] + torch.arange(1, S + 1, device=rows.device)  # (R, S)
        cache.last[slots[rows]] = history[rows[:, None], cols]
        cache.lengths[slots] = start + n_new
        return logits

    # ------------------------------------------------------------ pretrained
    @classmethod
    def from_pretrained(cls, path, vocab_size=None):
        """Load a Hugging Face GPT-2 checkpoint from a local folder holding config.json
        and model.safetensors (or pytorch_model.bin).

        HF's GPT-2 stores its Linear layers as "Conv1D" with weight shape (in, out), so
        those four weights per block are transposed. If vocab_size is larger than the
        checkpoint's (new special tokens, e.g. AsyncThink's <FORK>/<JOIN> tags), the tied
        embedding grows and each new row starts as the mean of the existing rows: an
        "average token", so the new tokens begin with ordinary-sized logits and
        activations instead of random noise or zeros.
        """
        hf, sd_hf = read_hf_folder(path)
        ckpt_vocab = hf["vocab_size"]
        vocab_size = vocab_size or ckpt_vocab
        if vocab_size < ckpt_vocab:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the checkpoint's {ckpt_vocab}")
        config = GPTConfig(vocab_size=vocab_size, block_size=hf["n_positions"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True,
                           layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))
        model = cls(config)
        sd = model.state_dict()

        # HF names, with the "transformer." prefix added where missing; skip the causal
        # mask buffers and lm_head.weight (tied to wte).
        src = {}
        for k, v in sd_hf.items():
            k = k if k.startswith("transformer.") or k.startswith("lm_head.") else "transformer." + k
            if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias") or k == "lm_head.weight":
                continue
            src[k] = v
        want = set(sd) - {"lm_head.weight"}
        if set(src) != want:
            raise ValueError(f"checkpoint keys do not match GPT-2: missing {sorted(want - set(src))}, "
                             f"unexpected {sorted(set(src) - want)}")
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k, v in src.items():
                if k.endswith(conv1d):
                    v = v.t()
                if k == "transformer.wte.weight":  # maybe grow: (ckpt_vocab, C) -> (vocab_size, C)
                    v = torch.cat([v, v.mean(dim=0, keepdim=True).expand(vocab_size - ckpt_vocab, -1)])
                if v.shape != sd[k].shape:
                    raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, "
                                     f"model {tuple(sd[k].shape)}")
                sd[k].copy_(v)
        return model


def read_hf_folder(path):
    """(config.json as a dict, the state dict) of a Hugging Face GPT-2 folder; a missing file or
    another activation function raises a one-line error."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"pretrained folder not found: {path}")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in pretrained folder {path}")
    with open(config_file) as f:
        hf = json.load(f)
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported activation_function {hf['activation_function']!r} in {config_file}")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        from safetensors.torch import load_file
        return hf, load_file(os.path.join(path, "model.safetensors"))
    if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        return hf, torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")


def init_number_embeddings(model, values, periods=(2, 3, 4, 5, 7, 10, 20, 50, 100, 200, 500, 1000),
                           scale=0.05):
    """Add the Fourier features of each number's VALUE to its token embedding, before training.

    values maps token id -> the integer it stands for. A randomly initialised embedding knows
    nothing about 12 being 9 + 3, so every arithmetic fact ("12", "-", "9", "=" -> "3") has to be
    memorised on its own; with cos/sin(2 pi v / T) in the first 2 * len(periods) channels, numbers
    start where arithmetic is a smooth function of the embedding (pretrained LLMs were found to
    represent numbers this way, with periods 2, 5, 10 and 100). The embedding stays trainable,
    and it is tied to the output layer, so predicting a number starts from the same features.
    """
    wte = model.transformer.wte.weight
    periods = periods[:wte.size(1) // 2]
    ids = torch.tensor(list(values.keys()))
    v = torch.tensor(list(values.values()), dtype=torch.float32)[:, None]  # (N, 1)
    angle = 2 * math.pi * v / torch.tensor(periods, dtype=torch.float32)  # (N, P)
    features = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)  # (N, 2P)
    with torch.no_grad():
        wte[ids, :features.size(1)] += scale * features.to(wte.device, wte.dtype)


def read_runs(slots, keys, run_cost):
    """Split a cached forward's rows into runs of nearby slots, each read as one view.

    slots: each row's cache slot (distinct); keys: how many cached keys each row reads. A run
    whose rows span the slots lo..hi reads (hi - lo + 1) x its longest keys: every slot in
    between rides along, and every slot reads as far as the run's longest row. A run also costs
    a few small ops in every layer, worth about run_cost keys. Returns the runs (lists of rows,
    in slot order) of the least total cost, by dynamic programming as in line breaking: the
    cheapest reading of the first j rows ends with some run i..j-1. Worked example, run_cost 100:

        slots [0, 1, 2, 9], keys [900, 100, 120, 110]
        one run            10 x 900 + 100                       = 9100
        [0] [1 2 9]        900 + 100 + 9 x 120 + 100            = 2180
        [0] [1 2] [9]      900 + 100 + 2 x 120 + 100 + 110 + 100 = 1550   <- the rows [[0], [1, 2], [3]]
    """
    order = sorted(range(len(slots)), key=slots.__getitem__)
    n = len(order)
    best, cut = [0] + [math.inf] * n, [0] * (n + 1)  # best[j]: the cheapest reading of rows :j
    for j in range(1, n + 1):
        longest = 0
        for i in range(j - 1, -1, -1):  # the last run: rows i..j-1 in slot order
            longest = max(longest, keys[order[i]])
            run = (slots[order[j - 1]] - slots[order[i]] + 1) * longest + run_cost
            if run >= best[j]:
                break  # starting the run earlier only makes it dearer
            if best[i] + run < best[j]:
                best[j], cut[j] = best[i] + run, i
    runs, j = [], n
    while j > 0:
        runs.append(order[cut[j]:j])
        j = cut[j]
    return runs[::-1]


@dataclass
class ReadRun:
    """One run of read_runs as attention uses it, over the n = hi - lo slots lo..hi-1:
      L        keys each slot reads (the run's longest row)
      rows     (R,) the forward's rows in the run, in slot order (a slice if they are consecutive)
      at       (R,) their places among the n slots; None when the run is exactly those rows
      blocked  (n, 1, T, L) True where a query may not look at a key (beyond its position; a
               rider looks at everything, harmlessly); None where every query sees every key"""
    lo: int
    hi: int
    L: int
    rows: torch.Tensor | slice
    at: torch.Tensor | None
    blocked: torch.Tensor | None


class KVCache:
    """Keys and values of already-processed tokens, so decoding a token costs one
    forward over that token instead of over the whole sequence.

    k, v: (n_layer, n_slots, n_head, max_len, head_dim), preallocated once (heads before
    positions: a slot's keys read back in the layout attention multiplies in).
    lengths: (n_slots,) long, how many positions of each slot are valid.
    last: (n_slots, S) long, each slot's last S tokens, oldest first (the next token's
    predecessors, for smear; S = max(1, config.smear)).
    A slot is one token sequence (one AsyncThink thread); slots are independent and
    each is at its own length. Positions at or beyond a slot's length hold stale data
    that attention never looks at. A forward reads the slots back in runs of nearby
    slots, each a view (read_plan, read_runs).

    Memory: 2 (k and v) * n_layer * n_slots * max_len * n_embd * bytes_per_elem, e.g.
    the 'small' preset with 64 slots of 1024 tokens in float32 is 2*4*64*1024*128*4 = 256 MiB.
    """

    run_cost = 300  # what one more ReadRun costs, in keys read (read_runs; BENCHMARKS.md)

    def __init__(self, config, n_slots, max_len=None, device=None, dtype=None):
        max_len = max_len or config.block_size
        if max_len > config.block_size:
            raise ValueError(f"max_len {max_len} exceeds the model's block_size {config.block_size}")
        shape = (config.n_layer, n_slots, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype or torch.float32)
        self.v = torch.zeros(shape, device=device, dtype=dtype or torch.float32)
        self.lengths = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.last = torch.zeros(n_slots, max(1, int(config.smear)), dtype=torch.long, device=device)
        self.n_slots, self.max_len = n_slots, max_len

    def check_append(self, slots, n_new, B, T):
        """(slots, n_new) as (B,) long tensors for an append of T tokens to B rows (n_new None:
        all T); a slot listed twice, out of range, or a count outside [0, T] raises ValueError."""
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.lengths.device)
        if slots.shape != (B,):
            raise ValueError(f"slots must have shape ({B},), got {tuple(slots.shape)}")
        if slots.unique().numel() != B:
            raise ValueError(f"a slot is listed twice in one forward_cached call: {slots.tolist()}")
        if int(slots.min()) < 0 or int(slots.max()) >= self.n_slots:
            raise ValueError(f"slot index out of range [0, {self.n_slots}): {slots.tolist()}")
        n_new = torch.full((B,), T, dtype=torch.long) if n_new is None else n_new
        n_new = torch.as_tensor(n_new, dtype=torch.long, device=slots.device)
        if int(n_new.min()) < 0 or int(n_new.max()) > T:
            raise ValueError(f"n_new must lie in [0, {T}], got {n_new.tolist()}")
        return slots, n_new

    def read_plan(self, slots, pos):
        """The ReadRuns of a forward whose rows go to slots (a list) with their new tokens at
        pos (B, T): row b reads pos[b, -1] + 1 keys."""
        T, keys = pos.size(1), [p + 1 for p in pos[:, -1].tolist()]
        plan = []
        for run in read_runs(slots, keys, self.run_cost):
            lo, hi, L = slots[run[0]], slots[run[-1]] + 1, max(keys[r] for r in run)
            at = None  # the rows' places in the run, where riders sit between them
            if hi - lo > len(run):
                at = torch.tensor([slots[r] - lo for r in run], device=pos.device)
            # rows given in slot order make each run a slice of them: a view, not a gather
            if run == list(range(run[0], run[-1] + 1)):
                rows = slice(run[0], run[-1] + 1)
            else:
                rows = torch.tensor(run, device=pos.device)
            blocked = None  # a decode run whose rows all read L keys (one row, say) hides nothing
            if T > 1 or any(keys[r] < L for r in run):
                # each slot's query positions; a rider's are L - 1: it looks at every key, harmlessly
                run_pos = pos[rows]
                if at is not None:
                    run_pos = pos.new_full((hi - lo, T), L - 1).index_copy_(0, at, run_pos)
                blocked = torch.arange(L, device=pos.device) > run_pos[:, None, :, None]  # (n, 1, T, L)
            plan.append(ReadRun(lo, hi, L, rows, at, blocked))
        return plan

    def nbytes(self):
        return self.k.nelement() * self.k.element_size() + self.v.nelement() * self.v.element_size()

    def free(self, slot):
        """Forget a slot's tokens; the slot can be reused for a new sequence."""
        self.lengths[slot] = 0

    def reset(self):
        """Free every slot."""
        self.lengths.zero_()


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(path, model, **extra):
    """Write {'config', 'model', **extra} atomically: to a temporary file in the same folder,
    then os.replace onto `path`. A process killed mid-save leaves the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    state = {"config": asdict(model.config), "model": model.state_dict(), **extra}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu"):
    """(model, checkpoint dict) from a file written by save_checkpoint. Anything else (missing,
    truncated, not a checkpoint, weights of another shape) raises a one-line ValueError."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or foreign files fail in many ways inside torch.load
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not an asyncthink checkpoint (no config/model)")
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: weights do not fit the model config: {first}") from None
    return model, ckpt
