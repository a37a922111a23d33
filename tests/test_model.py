"""runtime/model.py: the record's shapes, the virtual-layer schedule, and causality."""

import torch

from runtime.config import ModelConfig
from runtime.model import GPT

TINY = ModelConfig(vocab_size=256, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8,
                   loop_start=1, loop_end=2, num_loops=1, parallel_residual_start=3, xsa_last_n=2)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**TINY.to_dict(), **overrides}))
    model.reset_parameters()
    for p in model.parameters():  # zero-initialized projections would hide bugs: perturb everything
        p.data.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_record_preset_has_the_records_parameter_count():
    with torch.device("meta"):
        model = GPT(ModelConfig())
    assert sum(p.numel() for p in model.parameters()) == 35_944_536


def test_record_depth_recurrence_gives_17_virtual_layers():
    cfg = ModelConfig()
    order = cfg.layer_order(looping=True)
    assert order == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert order[:8] == [0, 1, 2, 3, 4, 5, 3, 4]  # encoder half; the decoder pops its 8 skips
    assert cfg.layer_order(looping=False) == list(range(11))


def test_record_layer_features():
    model = GPT(ModelConfig())
    assert [b.parallel for b in model.blocks] == [False] * 7 + [True] * 4
    assert all(b.attn.xsa for b in model.blocks)
    assert model.blocks[3].norm_scale == 0.5
    assert model.skip_weights.shape == (8, 512) and model.skip_gates.shape == (8, 512)
    assert torch.all(model.blocks[0].attn.q_gain == 5.25)


def test_future_tokens_never_change_past_logits():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 40))
    changed = ids.clone()
    changed[:, 25:] = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_logits_are_softcapped_and_nll_is_a_full_softmax():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        logits = model(ids)
        nll = model(ids[:, :-1], ids[:, 1:])
    assert logits.abs().max() <= 30
    expected = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(nll, expected, atol=1e-5)


def test_xsa_output_is_orthogonal_to_own_value():
    model = tiny_model()
    attn = model.blocks[3].attn
    captured = {}
    attn.out.register_forward_hook(lambda m, inp, out: captured.setdefault("y", inp[0]))
    x = torch.randn(1, 8, 64)
    with torch.no_grad():
        attn(x)
        v = attn.v(x).view(1, 8, 2, 16)
    y = captured["y"].view(1, 8, 2, 2, 16)
    dots = (y * torch.nn.functional.normalize(v, dim=-1).unsqueeze(3)).sum(-1)
    assert dots.abs().max() < 1e-5


def test_looping_changes_the_computation():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        looped = model(ids)
        model.looping = False
        plain = model(ids)
    assert not torch.allclose(looped, plain)
