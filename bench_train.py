"""
Training speed: `python bench_train.py [--steps N] [--preset small]`.

1. SFT tokens/s of train.py's step (fresh traces generated every step, as train.py does) vs a
   bare nanoGPT-style loop (forward, backward, clip, AdamW step; batches made beforehand, no
   logging) on the very same micro-batches, alternating step by step so both see the same noise.
   Target: train.py >= 0.9x the bare loop.
2. Model FLOPs utilization: the model's FLOPs per token (6 N for the weights, plus 12 L d T for
   attention at sequence length T, as in the PaLM appendix / nanoGPT) times tokens/s, against a
   measured peak: the best GFLOP/s of a large float32 matmul on this machine.

RL's split between rollout and update is logged per step by `train.py --stage rl`
(rollout_s, update_s, rollout_tokens_per_s in metrics.jsonl).
"""

import argparse
import random
import statistics
import time

import torch

import protocol as P
import train
from model import GPT, GPTConfig


def matmul_peak(n=1024, repeats=10):
    """GFLOP/s of the best of several n x n float32 matmuls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def flops(model, batches):
    """Training FLOPs of one step's micro-batches (forward + backward = 3x forward)."""
    cfg = model.config
    n_weights = sum(p.numel() for n, p in model.named_parameters() if "wpe" not in n and "wte" not in n)
    total = 0
    for x, _, _ in batches:
        B, T = x.shape
        total += B * T * (6 * n_weights + 12 * cfg.n_layer * cfg.n_embd * T + 6 * cfg.n_embd * cfg.vocab_size)
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--preset", default="small", choices=sorted(train.PRESETS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--episodes", type=int, default=None, help="traces per step (default: the preset's)")
    args = ap.parse_args(argv)
    if args.steps <= 1:
        ap.error("--steps must be at least 2")
    cfg = train.parse_args(["--preset", args.preset] + (["--sft-episodes", str(args.episodes)] if args.episodes else []))
    tok = P.Tokenizer.numbers()
    torch.manual_seed(0)
    ours = GPT(GPTConfig.preset(cfg.model, tok.n_vocab))
    bare = GPT(GPTConfig.preset(cfg.model, tok.n_vocab))
    bare.load_state_dict(ours.state_dict())
    opt_ours = train.make_optimizer(ours, cfg.lr, cfg.weight_decay)
    opt_bare = train.make_optimizer(bare, cfg.lr, cfg.weight_decay)
    rng_ours, rng_bare = random.Random(1), random.Random(1)  # the same traces for both
    block = ours.config.block_size
    make = lambda rng: train.micro_batches(train.sft_sequences(cfg, tok, rng, cfg.sft_episodes, block),
                                           cfg.micro_tokens, tok.pad)
    prepared = [make(rng_bare) for _ in range(args.steps)]  # the bare loop's data, made beforehand
    t_ours, t_bare, n_tokens, n_flops, t_data = [], [], [], [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        batches = make(rng_ours)  # train.py makes its traces inside the step
        t_data.append(time.perf_counter() - t0)
        train.sft_step(ours, ours, opt_ours, batches, cfg, "cpu")
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for x, y, seg in prepared[step]:  # nanoGPT: forward, backward, clip, step
            _, loss = bare(x, y, segments=seg)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
        opt_bare.step()
        opt_bare.zero_grad(set_to_none=True)
        t_bare.append(time.perf_counter() - t0)
        n_tokens.append(sum(x.numel() for x, _, _ in batches))
        n_flops.append(flops(ours, batches))
    keep = slice(1, None)  # the first step warms up allocators
    tok_s = lambda times: sum(n_tokens[keep]) / sum(times[keep])
    peak = matmul_peak()
    achieved = sum(n_flops[keep]) / sum(t_ours[keep]) / 1e9
    print(f"SFT speed, preset {args.preset} ({ours.num_params() / 1e6:.2f}M parameters), "
          f"{cfg.sft_episodes} traces per step, {args.steps - 1} timed steps, torch threads {torch.get_num_threads()}")
    print("| loop | padded tokens/s | ratio |")
    print("|---|---|---|")
    print(f"| bare nanoGPT-style loop | {tok_s(t_bare):.0f} | 1.00 |")
    print(f"| train.py step (with trace generation) | {tok_s(t_ours):.0f} | {tok_s(t_ours) / tok_s(t_bare):.2f} |")
    share = sum(t_data[keep]) / sum(t_ours[keep])
    print(f"trace generation: {100 * share:.0f}% of train.py's step time "
          f"(median step {1000 * statistics.median(t_ours[keep]):.0f} ms vs bare {1000 * statistics.median(t_bare[keep]):.0f} ms)")
    print(f"model FLOPs utilization: {achieved:.1f} GFLOP/s of a measured {peak:.1f} GFLOP/s matmul peak "
          f"= {100 * achieved / peak:.0f}% MFU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
