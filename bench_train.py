"""
Training speed: `python bench_train.py [--steps N] [--preset cpu]`.

1. SFT tokens/s of train.py's step (fresh traces generated every step, as train.py does) vs a
   bare nanoGPT-style loop (forward, backward, clip, AdamW step; batches made beforehand, no
   logging) on the very same packed micro-batches, and vs the same bare loop on the same
   sequences padded to the longest of their batch instead (how train.py batched before
   packing), all three alternating step by step so they see the same noise. Tokens are the
   trace tokens trained on or read (padding not counted). Target: train.py >= 0.9x the bare loop.
2. Model FLOPs utilization: the model's FLOPs per token (6 N for the weights, plus 12 L d T for
   attention over a sequence of T tokens, as in the PaLM appendix / nanoGPT) times tokens/s,
   against a measured peak: the best GFLOP/s of a large matmul on this machine, in the dtype
   the step computes in (float32, or bfloat16 under --dtype bfloat16 on CUDA).

On one GPU, the gpu recipe as train.py runs it (bf16 autocast, compiled forward; all three
loops get the same autocast and compile, so the ratios stay like for like):

    python bench_train.py --preset gpu --device cuda --compile --steps 30

RL's split between rollout and update is logged per step by `train.py --stage rl`
(rollout_s, update_s, rollout_tokens_per_s in metrics.jsonl).
"""

import random
import sys
import statistics
import time
from contextlib import nullcontext

import torch

import asyncthink as A
import cli
from bench import matmul_peak, sync
import protocol as P
import train
from model import GPT, GPTConfig


def flops(model, seqs):
    """Training FLOPs of one step's sequences (forward + backward = 3x forward), padding not
    counted: what any batching must compute at least."""
    cfg = model.config
    n_weights = sum(p.numel() for n, p in model.named_parameters() if "wpe" not in n and "wte" not in n)
    per_token = 6 * n_weights + 6 * cfg.n_embd * cfg.vocab_size
    total = 0
    for ids, _ in seqs:
        T = len(ids) - 1
        total += T * (per_token + 12 * cfg.n_layer * cfg.n_embd * T)
    return total


def padded_batches(seqs, micro_tokens, pad_id):
    """The batching train.py used before packing: sequences sorted by length, each group padded
    to its longest (rows x longest <= micro_tokens). [(x, y)]."""
    groups, group = [], []
    for s in sorted(seqs, key=lambda s: len(s[0])):
        if group and (len(group) + 1) * len(s[0]) > micro_tokens:
            groups.append(group)
            group = []
        group.append(s)
    out = []
    for group in groups + [group]:
        T = max(len(ids) for ids, _ in group) - 1
        x = torch.full((len(group), T), pad_id, dtype=torch.long)
        y = torch.full((len(group), T), -1, dtype=torch.long)
        for b, (ids, mask) in enumerate(group):
            x[b, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[b, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
        out.append((x, y))
    return out


def bare_step(fwd, model, opt, batches, device="cpu", autocast=nullcontext()):
    """nanoGPT: forward, backward, clip, step (batches of (x, y) padded, or train.micro_batches'
    packed (x, y, weights, segments): every weight there is 1, so the plain mean is the same loss)."""
    for x, y, *rest in batches:
        with autocast:
            _, loss = fwd(x.to(device), y.to(device), segments=rest[-1].to(device) if rest else None)
            loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_loops(cfg, tok, n_steps, device):
    """Run the three loops on the same traces, alternating step by step. Returns a dict of
    per-step lists (seconds: ours, bare, padded, data; n_tokens, n_flops), the padded batches,
    the model and the autocast train.py chose."""
    torch.manual_seed(0)
    models = [GPT(GPTConfig.preset(cfg.model, tok.n_vocab)).to(device) for _ in range(3)]  # ours, bare, padded
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    ours, bare, padded = models
    fwd_ours, autocast = train.wrap(ours, cfg, 1, device)  # train.py's own forward and autocast
    fwd_bare, fwd_padded = (torch.compile(m) if cfg.compile else m for m in (bare, padded))
    opts = [train.make_optimizer(m, cfg.lr, cfg.weight_decay, cfg.muon_lr) for m in models]
    rng_ours, rng_bare = random.Random(1), random.Random(1)  # the same traces for all three
    seqs = lambda rng: train.sft_sequences(cfg, tok, rng, cfg.sft_episodes, ours.config.block_size)
    prepared = [seqs(rng_bare) for _ in range(n_steps)]  # the bare loops' data, made beforehand
    packed = [train.micro_batches(s, cfg.micro_tokens, tok.pad) for s in prepared]
    padded_data = [padded_batches(s, cfg.micro_tokens, tok.pad) for s in prepared]
    t = {name: [] for name in ("ours", "bare", "padded", "data", "n_tokens", "n_flops")}
    for step in range(n_steps):
        t0 = time.perf_counter()
        batches = train.micro_batches(seqs(rng_ours), cfg.micro_tokens, tok.pad)  # inside the step
        t["data"].append(time.perf_counter() - t0)
        train.sft_step(fwd_ours, opts[0], batches, cfg, device, autocast=autocast)
        sync(device)
        t["ours"].append(time.perf_counter() - t0)
        for fwd, model, opt, data, name in [(fwd_bare, bare, opts[1], packed, "bare"),
                                            (fwd_padded, padded, opts[2], padded_data, "padded")]:
            sync(device)
            t0 = time.perf_counter()
            bare_step(fwd, model, opt, data[step], device, autocast)
            sync(device)
            t[name].append(time.perf_counter() - t0)
        t["n_tokens"].append(sum(len(ids) - 1 for ids, _ in prepared[step]))
        t["n_flops"].append(flops(ours, prepared[step]))
    return t, padded_data, ours, autocast


def report(t, padded_data, model, autocast, args, cfg, device):
    """Print the table, the data share and the MFU, over the steps after warm-up."""
    # the first step warms up allocators; compiling takes a few more (one per new batch shape)
    keep = slice(min(args.steps - 1, 5 if args.compile else 1), None)
    tok_s = lambda times: sum(t["n_tokens"][keep]) / sum(times[keep])
    bf16 = not isinstance(autocast, nullcontext)  # train.wrap autocasts only for bf16 on CUDA
    peak = matmul_peak(8192 if "cuda" in str(device) else 1024, device=device,
                       dtype=torch.bfloat16 if bf16 else torch.float32)
    achieved = sum(t["n_flops"][keep]) / sum(t["ours"][keep]) / 1e9
    padding = 1 - sum(t["n_tokens"]) / sum(x.numel() for batches in padded_data for x, _ in batches)
    print(f"SFT speed, preset {args.preset} ({model.num_params() / 1e6:.2f}M parameters), "
          f"{cfg.sft_episodes} traces per step, {len(t['n_tokens'][keep])} timed steps, device {device}, "
          f"{'bfloat16 autocast' if bf16 else 'float32'}{', compiled' if args.compile else ''}, "
          f"torch threads {torch.get_num_threads()}")
    print("| loop | trace tokens/s | ratio to the bare loop | median step |")
    print("|---|---|---|---|")
    for name, times in [("bare nanoGPT-style loop, packed rows", t["bare"]),
                        ("train.py step (with trace generation)", t["ours"]),
                        (f"bare loop, padded batches ({100 * padding:.0f}% padding)", t["padded"])]:
        print(f"| {name} | {tok_s(times):.0f} | {tok_s(times) / tok_s(t['bare']):.2f} | "
              f"{1000 * statistics.median(times[keep]):.0f} ms |")
    share = sum(t["data"][keep]) / sum(t["ours"][keep])
    print(f"trace generation and packing: {100 * share:.0f}% of train.py's step time")
    print(f"model FLOPs utilization: {achieved:.1f} GFLOP/s of a measured {peak:.1f} GFLOP/s "
          f"{'bf16' if bf16 else 'float32'} matmul peak "
          f"= {100 * achieved / peak:.0f}% MFU (padding not counted)")


def main(argv=None):
    ap = cli.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--preset", default="cpu", choices=sorted(train.PRESETS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--episodes", type=int, default=None, help="traces per step (default: the preset's)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile every loop's forward")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the preset's")
    args = ap.parse_args(argv)
    if args.steps <= 1:
        ap.error("--steps must be at least 2")
    try:
        device = A.pick_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    flags = ["--preset", args.preset] + (["--sft-episodes", str(args.episodes)] if args.episodes else [])
    cfg = train.parse_args(flags + (["--dtype", args.dtype] if args.dtype else []) + ["--compile"] * args.compile)
    tok = P.Tokenizer.numbers()
    report(*time_loops(cfg, tok, args.steps, device), args, cfg, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
