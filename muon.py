"""
Muon: the optimizer SFT uses for the transformer's matrices (AdamW for everything else).

A weight matrix W (out, in) maps input directions to output directions. AdamW updates each entry
on its own, so a step is dominated by the few directions with the largest gradients: most of what
the matrix could learn in a step is left unused. Muon (Jordan et al. 2024, modded-nanogpt; nanochat
trains with it too) keeps SGD's momentum M but steps along its *orthogonalised* version: M = U S V^T
(its singular value decomposition) becomes U V^T, every direction moved by the same amount.

    >>> G = torch.tensor([[3.0, 0.0], [0.0, 0.1]])   # one strong direction, one weak
    >>> orthogonalize(G).diagonal().round(decimals=1)  # both move about as much (U V^T: 1 and 1)
    tensor([0.7000, 1.1000])

An SVD every step is slow; five Newton-Schulz iterations, X <- aX + (bA + cA^2)X with A = X X^T
on the normalised M, push every singular value into roughly [0.7, 1.2], which is close enough
and costs a few small matrix products (the constants a, b, c are Jordan's). Measured on the CPU
default: the same SFT loss in about half the steps (BENCHMARKS.md "Muon").

Which parameters: the blocks' 2-D weights (attention and MLP). The embedding (tied to the output
layer), the smear map, biases and LayerNorms stay with AdamW, as in modded-nanogpt: an embedding
row only moves when its token occurs, which is not a matrix acting on directions.
"""

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5):
    """G (m, n) -> about U V^T of G's SVD, by `steps` Newton-Schulz iterations (in float32)."""
    a, b, c = NS_COEFFS
    X = G.float()
    tall = X.size(0) > X.size(1)
    if tall:  # iterate on the wide orientation: A = X X^T is then the smaller square
        X = X.T
    X = X / (X.norm() + 1e-7)  # every singular value <= 1, where the iteration converges
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two rules: groups with muon=True step along the orthogonalised Nesterov
    momentum (lr scaled by sqrt(max(1, out/in)), so tall and wide matrices move alike per entry);
    the other groups are AdamW (decoupled weight decay), the same arithmetic as torch.optim.AdamW.
    Every group has its own lr, so a schedule sets them one by one (train.py: lr * lr_scale)."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, weight_decay=0.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, weight_decay=weight_decay,
                        muon=False, lr_scale=1.0)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["muon"]:
                    self.muon_step(p, group)
                else:
                    self.adamw_step(p, group)

    def muon_step(self, p, group):
        state = self.state[p]
        if not state:
            state["momentum"] = torch.zeros_like(p)
        m, beta = state["momentum"], group["momentum"]
        m.lerp_(p.grad, 1 - beta)                   # m <- beta m + (1 - beta) g
        update = orthogonalize(p.grad.lerp(m, beta))  # Nesterov: look one momentum step ahead
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)

    def adamw_step(self, p, group):
        state = self.state[p]
        if not state:
            state["step"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
        state["step"] += 1
        (b1, b2), t = group["betas"], state["step"]
        state["m"].lerp_(p.grad, 1 - b1)
        state["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        denom = (state["v"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["m"], denom, value=-group["lr"] / (1 - b1 ** t))
