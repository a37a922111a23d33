"""builder/optim.py: Newton-Schulz orthogonalizes, Muon's update rule, the schedules."""

import torch

from builder.config import TrainConfig
from builder.optim import NEWTON_SCHULZ, Muon, build_optimizers, lr_multiplier, muon_momentum, newton_schulz
from runtime.config import ModelConfig
from runtime.model import GPT


def test_newton_schulz_flattens_the_spectrum():
    g = torch.randn(64, 128) @ torch.diag(torch.logspace(-2, 1, 128))
    for name, coefficients in NEWTON_SCHULZ.items():
        s = torch.linalg.svdvals(newton_schulz(g, coefficients, 5).float())
        assert s.max() < 1.3 and s.min() > 0.3, (name, s.min(), s.max())
    assert newton_schulz(g.T, NEWTON_SCHULZ["classic"], 5).shape == (128, 64)


def test_muon_applies_weight_decay_and_orthogonal_step():
    p = torch.nn.Parameter(torch.randn(32, 32))
    before = p.detach().clone()
    p.grad = torch.randn(32, 32)
    opt = Muon([p], lr=0.1, momentum=0.0, weight_decay=0.5)
    opt.step()
    update = (before * (1 - 0.05) - p.detach()) / 0.1
    s = torch.linalg.svdvals(update)
    assert s.max() < 1.3 and s.min() > 0.3


def test_optimizer_groups_follow_the_records_split():
    cfg = ModelConfig(vocab_size=128, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, loop_start=0,
                      loop_end=1, num_loops=1, parallel_residual_start=1, xsa_last_n=1)
    model = GPT(cfg)
    muon, adam = build_optimizers(model, TrainConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in muon.param_groups[0]["params"]}
    assert all(n.endswith("weight") and "blocks" in n for n in muon_names) and len(muon_names) == 12
    embed, control = adam.param_groups
    assert [names[id(p)] for p in embed["params"]] == ["tok_emb.weight"]
    assert {"skip_weights", "skip_gates", "blocks.0.resid_mix", "blocks.0.attn.q_gain"} <= \
        {names[id(p)] for p in control["params"]}
    assert embed["lr"] == 0.03 and control["lr"] == 0.02 and muon.param_groups[0]["lr"] == 0.022


def test_wallclock_schedule():
    assert lr_multiplier(0.2, 0.72, 0.0) == 1.0
    assert abs(lr_multiplier(0.64, 0.72, 0.0) - 0.5) < 1e-9
    assert lr_multiplier(0.999, 0.72, 0.1) == 0.1


def test_momentum_warmup():
    cfg = TrainConfig()
    assert muon_momentum(0, cfg) == 0.92
    assert abs(muon_momentum(750, cfg) - 0.955) < 1e-9
    assert muon_momentum(5000, cfg) == 0.99
