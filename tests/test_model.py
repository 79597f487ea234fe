"""Oracle tests for model.py: the KV-cached path must give the same logits as a full
uncached forward of the same sequence, and a Hugging Face GPT-2 checkpoint must give
the same logits as transformers' own GPT2LMHeadModel."""

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache, PRESETS, read_runs, rotary, rotary_angles

V = 50
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(params=["learned-positions", "rotary", "rotary-smear", "rotary-smear2", "rotary-smear3",
                        "rotary-smear4"])
def model(request):
    torch.manual_seed(0)
    smear = {"rotary-smear": 1, "rotary-smear2": 2, "rotary-smear3": 3, "rotary-smear4": 4}.get(request.param, 0)
    m = GPT(GPTConfig.preset("tiny", vocab_size=V, block_size=64, rope=request.param != "learned-positions",
                             smear=smear))
    for w in m.smear_maps():  # they start at zero (the plain GPT): open them, or the oracle proves nothing
        if w is not None:
            torch.nn.init.normal_(w.weight, std=0.5)
    return m.eval()


def test_smear_adds_the_previous_tokens_embedding_through_its_map():
    """Oracle by hand: input t = wte[x_t] + W wte[x_{t-1}], and the first token of a sequence
    (also of a packed segment) has no predecessor."""
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("tiny", vocab_size=V, smear=True, rope=True))
    assert m.smear.weight.abs().sum() == 0  # starts as the plain GPT
    torch.nn.init.normal_(m.smear.weight)
    wte, W = m.transformer.wte.weight, m.smear.weight
    idx, pos = torch.tensor([[3, 7, 9, 4]]), torch.tensor([[0, 1, 0, 1]])  # two segments of two
    prev = torch.tensor([[0, 3, 7, 9]])[..., None]  # (B, T, 1)
    x = m.embed(idx, prev, pos)[0]
    expected = torch.stack([wte[3], wte[7] + W @ wte[3], wte[9], wte[4] + W @ wte[9]])
    torch.testing.assert_close(x, expected)


def test_smear2_adds_the_two_previous_tokens_through_their_maps():
    """Oracle by hand: input t = wte[x_t] + W wte[x_{t-1}] + W2 wte[x_{t-2}], each term only where
    that predecessor exists in the sequence; and the full forward builds the same predecessors."""
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("tiny", vocab_size=V, smear=2, rope=True))
    assert m.smear2.weight.abs().sum() == 0
    torch.nn.init.normal_(m.smear.weight)
    torch.nn.init.normal_(m.smear2.weight)
    wte, W, W2 = m.transformer.wte.weight, m.smear.weight, m.smear2.weight
    idx, pos = torch.tensor([[3, 7, 9, 4, 5]]), torch.tensor([[0, 1, 2, 0, 1]])  # segments of 3 and 2
    prev = torch.tensor([[[0, 0], [3, 0], [7, 3], [9, 7], [4, 9]]])  # (B, T, 2): one back, two back
    x = m.embed(idx, prev, pos)[0]
    expected = torch.stack([wte[3], wte[7] + W @ wte[3], wte[9] + W @ wte[7] + W2 @ wte[3],
                            wte[4], wte[5] + W @ wte[4]])
    torch.testing.assert_close(x, expected)


def test_smear3_adds_the_three_previous_tokens_through_their_maps():
    """Oracle by hand, smear 3: input t = wte[x_t] + W wte[x_{t-1}] + W2 wte[x_{t-2}] +
    W3 wte[x_{t-3}], each term only where that predecessor exists in its segment."""
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("tiny", vocab_size=V, smear=3, rope=True))
    assert m.smear3.weight.abs().sum() == 0
    for w in (m.smear, m.smear2, m.smear3):
        torch.nn.init.normal_(w.weight)
    wte, W, W2, W3 = m.transformer.wte.weight, m.smear.weight, m.smear2.weight, m.smear3.weight
    idx, pos = torch.tensor([[3, 7, 9, 4, 5]]), torch.tensor([[0, 1, 2, 3, 0]])  # segments of 4 and 1
    prev = torch.tensor([[[0, 0, 0], [3, 0, 0], [7, 3, 0], [9, 7, 3], [4, 9, 7]]])  # (B, T, 3)
    x = m.embed(idx, prev, pos)[0]
    expected = torch.stack([wte[3], wte[7] + W @ wte[3], wte[9] + W @ wte[7] + W2 @ wte[3],
                            wte[4] + W @ wte[9] + W2 @ wte[7] + W3 @ wte[3], wte[5]])
    torch.testing.assert_close(x, expected)


def test_smear4_adds_the_fourth_token_back_only_where_it_exists():
    """Oracle by hand, smear 4: the fourth token back enters through its own map W4, at position
    4 of a segment and after; position 3 gets the three nearer ones only."""
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("tiny", vocab_size=V, smear=4, rope=True))
    assert m.smear4.weight.abs().sum() == 0
    for w in m.smear_maps():
        torch.nn.init.normal_(w.weight)
    wte = m.transformer.wte.weight
    W = [w.weight for w in m.smear_maps()]
    idx, pos = torch.tensor([[3, 7, 9, 4, 5]]), torch.tensor([[0, 1, 2, 3, 4]])
    prev = torch.tensor([[[0, 0, 0, 0], [3, 0, 0, 0], [7, 3, 0, 0], [9, 7, 3, 0], [4, 9, 7, 3]]])  # (B, T, 4)
    x = m.embed(idx, prev, pos)[0]
    torch.testing.assert_close(x[3], wte[4] + W[0] @ wte[9] + W[1] @ wte[7] + W[2] @ wte[3])
    torch.testing.assert_close(x[4], wte[5] + W[0] @ wte[4] + W[1] @ wte[9] + W[2] @ wte[7] + W[3] @ wte[3])


@pytest.mark.parametrize("smear", [-1, 5])
def test_a_smear_outside_0_to_4_is_refused(smear):
    with pytest.raises(ValueError, match="0 to 4"):
        GPT(GPTConfig.preset("tiny", vocab_size=V, smear=smear))


def test_rotary_is_a_complex_rotation_and_sees_only_relative_position():
    """Oracle: channel pair (i, i + hd/2) read as the complex number x_i + j*x_{i+hd/2} is
    multiplied by exp(j * pos * 10000**(-2i/hd)); and a query/key dot product is unchanged
    when both positions shift by the same amount."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64)  # (B, T, nh, hd)
    pos = torch.tensor([[0, 1, 2, 7, 40], [3, 3, 9, 100, 1000]])
    half = 4
    z = torch.complex(x[..., :half], x[..., half:])
    theta = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    z = z * torch.exp(1j * pos[..., None, None].double() * theta)
    expected = torch.cat([z.real, z.imag], dim=-1)
    cos, sin = rotary_angles(1001, 8)
    torch.testing.assert_close(rotary(x, cos[pos], sin[pos]), expected, atol=1e-5, rtol=1e-5)

    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    def score(p, s):
        p, s = torch.tensor([[p]]), torch.tensor([[s]])
        return (rotary(q, cos[p], sin[p]) * rotary(k, cos[s], sin[s])).sum().item()
    assert score(9, 4) == pytest.approx(score(109, 104), abs=1e-4)
    assert score(9, 4) != pytest.approx(score(9, 5), abs=1e-4)


def full_logits(model, seq):
    """Uncached oracle: logits (T, V) of one 1-D sequence."""
    with torch.no_grad():
        return model(seq[None])[0]


def test_batched_decode_matches_full_forward(model):
    g = torch.Generator().manual_seed(1)
    prompt_lens = [1, 3, 6, 10]
    n_steps = 8
    seqs = [torch.randint(V, (n + n_steps,), generator=g) for n in prompt_lens]
    cache = model.new_cache(n_slots=6, max_len=32)
    slot_of = [4, 0, 5, 2]  # deliberately not 0..B-1
    with torch.no_grad():
        for s, seq, n in zip(slot_of, seqs, prompt_lens):  # prefill each prompt on its own
            logits = model.forward_cached(seq[None, :n], cache, torch.tensor([s]))
            torch.testing.assert_close(logits[0], full_logits(model, seq[:n]), **TOL)
        slots = torch.tensor(slot_of)
        for step in range(n_steps):  # one batched call per step, every slot at its own length
            idx = torch.stack([seq[n + step] for seq, n in zip(seqs, prompt_lens)])[:, None]
            logits = model.forward_cached(idx, cache, slots)  # (B, 1, V)
            for b, (seq, n) in enumerate(zip(seqs, prompt_lens)):
                torch.testing.assert_close(logits[b, 0], full_logits(model, seq[: n + step + 1])[-1], **TOL)
    assert cache.lengths[slots].tolist() == [n + n_steps for n in prompt_lens]


def test_multi_token_append_into_nonempty_slot(model):
    seq = torch.randint(V, (12,), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(n_slots=2, max_len=16)
    with torch.no_grad():
        model.forward_cached(seq[None, :5], cache, torch.tensor([1]))
        logits = model.forward_cached(seq[None, 5:], cache, torch.tensor([1]))
    torch.testing.assert_close(logits[0], full_logits(model, seq)[5:], **TOL)
    assert cache.lengths.tolist() == [0, 12]


def test_free_reuse_and_reset(model):
    g = torch.Generator().manual_seed(3)
    a, b, cont = torch.randint(V, (9,), generator=g), torch.randint(V, (4,), generator=g), torch.randint(V, (5,), generator=g)
    cache = model.new_cache(n_slots=3, max_len=20)
    with torch.no_grad():
        model.forward_cached(a[None], cache, torch.tensor([0]))
        cache.free(0)
        assert int(cache.lengths[0]) == 0
        logits = model.forward_cached(b[None], cache, torch.tensor([0]))  # shorter than the stale data
        torch.testing.assert_close(logits[0], full_logits(model, b), **TOL)

        model.forward_cached(a[None], cache, torch.tensor([1]))
        for i, tok in enumerate(cont):  # slot 1 decodes on; slot 0 is not disturbed
            logits = model.forward_cached(tok.view(1, 1), cache, torch.tensor([1]))
            torch.testing.assert_close(logits[0, 0], full_logits(model, torch.cat([a, cont[: i + 1]]))[-1], **TOL)
        logits = model.forward_cached(cont[None, :2], cache, torch.tensor([0]))
        torch.testing.assert_close(logits[0], full_logits(model, torch.cat([b, cont[:2]]))[-2:], **TOL)
    cache.reset()
    assert cache.lengths.tolist() == [0, 0, 0]


def test_batched_prefill_with_right_padding(model):
    g = torch.Generator().manual_seed(4)
    cache = model.new_cache(n_slots=3, max_len=24)
    prefix = torch.randint(V, (4,), generator=g)
    with torch.no_grad():
        model.forward_cached(prefix[None], cache, torch.tensor([1]))  # slot 1 already holds 4 tokens
        news = [torch.randint(V, (n,), generator=g) for n in (7, 3, 5)]
        T = max(len(x) for x in news)
        idx = torch.full((3, T), 7, dtype=torch.long)  # pad token 7: any id will do
        for i, x in enumerate(news):
            idx[i, : len(x)] = x
        slots, n_new = torch.tensor([0, 1, 2]), torch.tensor([len(x) for x in news])
        logits = model.forward_cached(idx, cache, slots, n_new=n_new)
        olds = [torch.tensor([], dtype=torch.long), prefix, torch.tensor([], dtype=torch.long)]
        for i, (old, x) in enumerate(zip(olds, news)):
            torch.testing.assert_close(logits[i, : len(x)], full_logits(model, torch.cat([old, x]))[len(old):], **TOL)
        assert cache.lengths.tolist() == [7, 4 + 3, 5]
        # next decode step: padding written beyond each length must not leak in
        nxt = torch.randint(V, (3,), generator=g)
        logits = model.forward_cached(nxt[:, None], cache, slots)
        for i, (old, x) in enumerate(zip(olds, news)):
            ref = full_logits(model, torch.cat([old, x, nxt[i : i + 1]]))[-1]
            torch.testing.assert_close(logits[i, 0], ref, **TOL)


def test_rows_with_nothing_new_write_nothing(model):
    """One forward over the consecutive slots 1..4, where slot 2 (full to the last position)
    and slot 3 (free) come along with n_new = 0.
    Oracle: the live rows' logits equal the full forward's, and the riders' slots are untouched
    (keys, values, length, last token)."""
    g = torch.Generator().manual_seed(6)
    cache = model.new_cache(n_slots=5, max_len=16)
    seqs = {1: torch.randint(V, (5,), generator=g), 2: torch.randint(V, (16,), generator=g),
            4: torch.randint(V, (9,), generator=g)}
    with torch.no_grad():
        for s, seq in seqs.items():
            model.forward_cached(seq[None], cache, torch.tensor([s]))
        before = [t.clone() for t in (cache.k, cache.v, cache.lengths, cache.last)]
        nxt = torch.randint(V, (4, 1), generator=g)
        logits = model.forward_cached(nxt, cache, torch.tensor([1, 2, 3, 4]), n_new=torch.tensor([1, 0, 0, 1]))
        for row, s in ((0, 1), (3, 4)):
            ref = full_logits(model, torch.cat([seqs[s], nxt[row]]))[-1]
            torch.testing.assert_close(logits[row, 0], ref, **TOL)
    for old, new in zip(before, (cache.k, cache.v, cache.lengths, cache.last)):
        torch.testing.assert_close(old[..., 2:4, :, :, :] if old.dim() == 5 else old[2:4],
                                   new[..., 2:4, :, :, :] if new.dim() == 5 else new[2:4])
    assert cache.lengths.tolist() == [0, 6, 16, 0, 10]


def read_cost(slots, keys, runs, run_cost):
    return sum((max(slots[r] for r in run) - min(slots[r] for r in run) + 1) * max(keys[r] for r in run)
               + run_cost for run in runs)


def test_read_runs_by_hand_and_against_every_split():
    """The docstring's worked example; then against brute force: every way of cutting the rows,
    in slot order, into runs of consecutive rows (2^(n-1) of them); read_runs must find one of
    the least cost, and its runs must hold every row once, in slot order."""
    assert read_runs([0, 1, 2, 9], [900, 100, 120, 110], 100) == [[0], [1, 2], [3]]
    assert read_runs([0, 1, 2, 9], [900, 100, 120, 110], 10**6) == [[0, 1, 2, 3]]
    assert read_runs([], [], 5) == []
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 8, (1,), generator=g))
        slots = torch.randperm(12, generator=g)[:n].tolist()
        keys = torch.randint(1, 1000, (n,), generator=g).tolist()
        run_cost = [0, 30, 1000, 10**6][int(torch.randint(4, (1,), generator=g))]
        order = sorted(range(n), key=slots.__getitem__)
        best = min(read_cost(slots, keys, [order[a:b] for a, b in zip((0, *cuts), (*cuts, n))], run_cost)
                   for k in range(n) for cuts in itertools.combinations(range(1, n), k))
        runs = read_runs(slots, keys, run_cost)
        assert [r for run in runs for r in run] == order
        assert read_cost(slots, keys, runs, run_cost) == best


@pytest.mark.parametrize("run_cost", [0, 10**9])
def test_runs_with_riders_give_each_row_its_full_forward_logits(model, run_cost):
    """Rows in slots 4, 0, 5 and 2 (slot 1 holds a longer thread that is not in the forward,
    slot 3 is free) decode one token each and then append three (a prefill), read as one run of
    slots 0..5 with riders (run_cost huge) or one run per row (0). Oracle: each row's logits
    equal a full forward of its whole sequence, and slot 1 is untouched."""
    g = torch.Generator().manual_seed(8)
    cache = model.new_cache(n_slots=6, max_len=32)
    cache.run_cost = run_cost
    seqs = {s: torch.randint(V, (n,), generator=g) for s, n in ((0, 12), (1, 20), (2, 3), (4, 7), (5, 1))}
    with torch.no_grad():
        for s, seq in seqs.items():
            model.forward_cached(seq[None], cache, torch.tensor([s]))
        before = (cache.k[:, 1].clone(), cache.v[:, 1].clone(), int(cache.lengths[1]), cache.last[1].clone())
        slots = [4, 0, 5, 2]
        for T in (1, 3):
            new = torch.randint(V, (4, T), generator=g)
            logits = model.forward_cached(new, cache, torch.tensor(slots))
            for row, s in enumerate(slots):
                seqs[s] = torch.cat([seqs[s], new[row]])
                torch.testing.assert_close(logits[row], full_logits(model, seqs[s])[-T:], **TOL)
    for old, now in zip(before, (cache.k[:, 1], cache.v[:, 1], int(cache.lengths[1]), cache.last[1])):
        assert torch.equal(torch.as_tensor(old), torch.as_tensor(now))


def test_bad_cache_use_is_loud(model):
    cache = model.new_cache(n_slots=2, max_len=8)
    with torch.no_grad():
        model.forward_cached(torch.zeros(1, 6, dtype=torch.long), cache, torch.tensor([0]))
        with pytest.raises(ValueError, match="overflow"):
            model.forward_cached(torch.zeros(1, 3, dtype=torch.long), cache, torch.tensor([0]))
        with pytest.raises(ValueError, match="twice"):
            model.forward_cached(torch.zeros(2, 1, dtype=torch.long), cache, torch.tensor([1, 1]))
    assert cache.lengths.tolist() == [6, 0]  # failed calls change nothing
    with pytest.raises(ValueError):
        model.new_cache(n_slots=1, max_len=65)  # beyond block_size 64
    c = model.config
    assert cache.nbytes() == 2 * c.n_layer * 2 * 8 * c.n_embd * 4
    assert KVCache(c, n_slots=3, max_len=5).k.shape == (c.n_layer, 3, c.n_head, 5, c.n_embd // c.n_head)


def test_per_token_loss(model):
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(V, (3, 10), generator=g)
    targets = torch.randint(V, (3, 10), generator=g)
    targets[0, :4] = -1
    targets[2, 7:] = -1
    logits, loss = model(idx, targets, reduction="none")
    assert loss.shape == (3, 10)
    logp = F.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = torch.where(targets == -1, torch.zeros_like(logp), -logp)
    torch.testing.assert_close(loss, expected, **TOL)
    _, mean_loss = model(idx, targets)
    torch.testing.assert_close(mean_loss, expected.sum() / (targets != -1).sum(), **TOL)


def make_hf(tmp_path, fmt):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100,
                                  bos_token_id=0, eos_token_id=0,
                                  initializer_range=0.3)  # large weights: exact vs tanh GELU would differ
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
    else:  # pytorch_model.bin, with keys lacking the "transformer." prefix (an old style)
        cfg.save_pretrained(tmp_path)
        sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
        torch.save(sd, tmp_path / "pytorch_model.bin")
    return hf


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_matches_hf(tmp_path, fmt):
    hf = make_hf(tmp_path, fmt)
    assert (tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")).exists()
    model = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(100, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)

    big = GPT.from_pretrained(str(tmp_path), vocab_size=110).eval()
    assert big.config.vocab_size == 110
    with torch.no_grad():
        torch.testing.assert_close(big(idx)[..., :100], hf(idx).logits, atol=1e-4, rtol=1e-4)
    wte = big.transformer.wte.weight
    assert big.lm_head.weight is wte
    torch.testing.assert_close(wte[100:], wte[:100].mean(0).expand(10, -1))


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        GPT.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(str(tmp_path))
    make_hf(tmp_path, "safetensors")
    with pytest.raises(ValueError, match="smaller"):
        GPT.from_pretrained(str(tmp_path), vocab_size=50)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(str(tmp_path))


def test_presets():
    with torch.device("meta"):  # shapes only, no memory or init time
        counts = {name: GPT(GPTConfig.preset(name, vocab_size=300)).num_params() for name in PRESETS}
    assert 500_000 <= counts["small"] <= 3_000_000, counts
    assert counts["tiny"] < counts["small"] < counts["medium"]
    with pytest.raises(ValueError, match="tiny"):
        GPTConfig.preset("huge", vocab_size=300)


def test_packed_rows_compute_each_sequence_as_if_alone(model):
    """Oracle: a row packing three sequences (segments) gives, at every position, the logits
    of that sequence's own forward in a row by itself."""
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in (7, 3, 5)]
    row = torch.cat(seqs)[None]  # (1, 15)
    segments = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])[None]
    packed = model(row, segments=segments)[0]
    alone = torch.cat([model(s[None])[0] for s in seqs])
    torch.testing.assert_close(packed, alone, **TOL)


def test_untied_embeddings_are_two_matrices_and_survive_a_checkpoint(tmp_path):
    from model import load_checkpoint, save_checkpoint
    torch.manual_seed(0)
    tied = GPT(GPTConfig.preset("tiny", vocab_size=V))
    untied = GPT(GPTConfig.preset("tiny", vocab_size=V, tie_embeddings=False))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() - tied.num_params() == V * tied.config.n_embd  # one more V x C
    with torch.no_grad():
        untied.lm_head.weight.zero_()  # the output alone changes: the input embedding stays
    save_checkpoint(str(tmp_path / "u.pt"), untied)
    loaded, _ = load_checkpoint(str(tmp_path / "u.pt"))
    assert not loaded.config.tie_embeddings and loaded.lm_head.weight.abs().sum() == 0
    torch.testing.assert_close(loaded.transformer.wte.weight, untied.transformer.wte.weight)
