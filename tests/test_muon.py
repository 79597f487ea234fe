"""muon.py against independent oracles: the SVD (U V^T, what Newton-Schulz approximates) and
torch.optim.AdamW (what the non-Muon groups must equal step for step)."""
import torch

import train
from model import GPT, GPTConfig
from muon import MuonAdamW, orthogonalize


def test_orthogonalize_approximates_u_vt_of_the_svd():
    torch.manual_seed(0)
    for shape in [(32, 128), (128, 32), (384, 128)]:
        G = torch.randn(*shape)
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        O = orthogonalize(G)
        s = torch.linalg.svdvals(O)
        assert O.shape == G.shape
        assert 0.6 < s.min() and s.max() < 1.2, (shape, s.min(), s.max())  # Jordan's band
        cosine = (O * (U @ Vh)).sum() / (O.norm() * (U @ Vh).norm())
        assert cosine > 0.97, (shape, cosine)
    # scale-free: the direction of a step does not depend on the gradient's size
    G = torch.randn(16, 48)
    assert torch.allclose(orthogonalize(G), orthogonalize(1000 * G), atol=1e-5)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(1)
    a = torch.nn.Linear(8, 5)
    b = torch.nn.Linear(8, 5)
    b.load_state_dict(a.state_dict())
    ours = MuonAdamW([{"params": a.parameters(), "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for step in range(5):
        x = torch.randn(4, 8)
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_muon_first_step_moves_along_u_vt():
    torch.manual_seed(2)
    W = torch.nn.Parameter(torch.randn(48, 16))  # tall: lr scaled by sqrt(48 / 16)
    W0 = W.detach().clone()
    W.grad = torch.randn(48, 16)
    U, _, Vh = torch.linalg.svd(W.grad, full_matrices=False)
    MuonAdamW([{"params": [W], "muon": True}], lr=0.02).step()
    step = (W0 - W.detach()) / (0.02 * 3 ** 0.5)
    cosine = (step * (U @ Vh)).sum() / (step.norm() * (U @ Vh).norm())
    assert cosine > 0.97


def test_make_optimizer_gives_muon_the_blocks_matrices_only():
    model = GPT(GPTConfig.preset("tiny", 300, smear=True))
    opt = train.make_optimizer(model, 3e-3, 0.1, muon_lr=0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]]
    expected = [n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
    assert sorted(muon) == sorted(expected) and all("ln" not in n and "bias" not in n for n in muon)
    assert not any(n.startswith(("transformer.wte", "smear", "lm_head")) for n in muon)
    assert [g["lr_scale"] for g in opt.param_groups if g["muon"]] == [0.02 / 3e-3]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert isinstance(train.make_optimizer(model, 3e-3, 0.1), torch.optim.AdamW)  # muon_lr 0
