"""builder/train/optim.py: Newton-Schulz orthogonalizes, Muon's update rule, the schedules."""

import pytest
import torch

from builder.config import NEWTON_SCHULZ_NAMES, TrainConfig
from builder.train.optim import (
    NEWTON_SCHULZ,
    Muon,
    Schedule,
    apply_schedule,
    build_optimizers,
    lr_multiplier,
    muon_momentum,
    muon_wd_multiplier,
    newton_schulz,
    schedule_at,
)
from runtime.config import ModelConfig
from runtime.errors import PgError
from runtime.model import GPT


def test_newton_schulz_flattens_the_spectrum():
    torch.manual_seed(0)
    g = torch.randn(64, 128) @ torch.diag(torch.logspace(-2, 1, 128))
    for name in NEWTON_SCHULZ:
        s = torch.linalg.svdvals(newton_schulz(g, name, 5).float())
        assert s.max() < 1.3 and s.min() > 0.3, (name, s.min(), s.max())
    assert newton_schulz(g.T, "classic", 5).shape == (128, 64)


def test_muon_applies_weight_decay_and_orthogonal_step():
    torch.manual_seed(0)  # a square gaussian's smallest singular value is near 0 for some seeds
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


def test_polar_express_is_what_muon_runs_and_lands_closer_to_orthogonal():
    g = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.logspace(-2, 1, 128))
    spread = {name: (torch.linalg.svdvals(newton_schulz(g, name, 5).float()) - 1).abs().max().item()
              for name in NEWTON_SCHULZ}
    assert spread["polar_express"] < 0.2 < spread["classic"]
    model = GPT(ModelConfig(vocab_size=128, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, num_loops=0,
                            parallel_residual_start=-1, xsa_last_n=0))
    muon, _ = build_optimizers(model, TrainConfig(newton_schulz_coefficients="polar_express"))
    assert muon.coefficients == "polar_express"
    assert NEWTON_SCHULZ_NAMES == tuple(NEWTON_SCHULZ)
    with pytest.raises(PgError, match="newton_schulz_coefficients"):
        TrainConfig(newton_schulz_coefficients="quintic")


def test_muon_weight_decay_taper():
    on = TrainConfig(muon_wd_taper=True)
    assert muon_wd_multiplier(0.5, on) == 1.0 and muon_wd_multiplier(0.7, on) == 1.0
    assert abs(muon_wd_multiplier(0.85, on) - 0.75) < 1e-9 and abs(muon_wd_multiplier(1.0, on) - 0.5) < 1e-9
    assert muon_wd_multiplier(0.95, TrainConfig()) == 1.0  # off by default


def test_schedule_reaches_every_group():
    """The LR multiplier (with its MIN_LR floor), momentum and the WD taper land in the groups;
    AdamW's weight decay is not tapered."""
    cfg = TrainConfig(muon_wd_taper=True, min_lr=0.1, warmdown_frac=0.5)
    model = GPT(ModelConfig(vocab_size=128, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, num_loops=0,
                            parallel_residual_start=-1, xsa_last_n=0))
    muon, adam = build_optimizers(model, cfg)
    sched = schedule_at(2000, 0.99, cfg)
    assert sched == Schedule(lr_mul=0.1, momentum=0.99, wd_mul=sched.wd_mul)
    assert abs(sched.wd_mul - (0.5 + 0.5 / 30)) < 1e-9  # 29/30 of the way from 0.70 to 1
    apply_schedule([muon, adam], sched)
    assert abs(muon.param_groups[0]["lr"] - 0.1 * cfg.matrix_lr) < 1e-12
    assert abs(muon.param_groups[0]["weight_decay"] - sched.wd_mul * cfg.muon_weight_decay) < 1e-12
    assert muon.param_groups[0]["momentum"] == 0.99
    assert [g["weight_decay"] for g in adam.param_groups] == [cfg.embed_weight_decay, cfg.scalar_weight_decay]
    assert abs(adam.param_groups[0]["lr"] - 0.1 * cfg.embed_lr) < 1e-12
