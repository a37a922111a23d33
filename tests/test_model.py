"""runtime/model.py: the record's shapes, the virtual-layer schedule, causality, and every
architecture switch of the seed submissions (init, parameter count, effect, routing)."""

import json

import pytest
import torch

from builder.artifact.audit import tensor_group
from builder.config import TrainConfig, apply_overrides
from builder.presets import get_preset
from builder.quant.policy import is_quantized
from builder.quant.primitives import matrix_group
from builder.train.optim import build_optimizers
from runtime.config import ModelConfig
from runtime.errors import PgError
from runtime.model import GPT, SmearGate, bigram_hash

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


SWITCHES = {  # one entry per architecture switch, sized for TINY
    "relu2": dict(mlp_activation="relu2"),
    "gelu": dict(mlp_activation="gelu"),
    "bigram": dict(bigram_buckets=64, bigram_dim=16),
    "smear": dict(smear_gate=True),
    "gate_dense": dict(attn_gate="dense"),
    "gate_sparse": dict(attn_gate="sparse"),
    "gate_attn_out": dict(attn_gate="attn_out"),
    "value_emb": dict(ve_layers=(1, 3), ve_dim=16),
    "doc_mask": dict(doc_mask=True),
    "two_lanes": dict(parallel_lanes=2),
    "yarn": dict(rope_yarn_len=16),
}
SWITCHES["all"] = {**SWITCHES["relu2"], **SWITCHES["bigram"], **SWITCHES["smear"], **SWITCHES["gate_sparse"],
                   **SWITCHES["value_emb"], **SWITCHES["doc_mask"], **SWITCHES["two_lanes"]}


def token_ids(batch, length, seed=0):
    """Random ids with a BOS (id 1) every 8 tokens, so BOS-masked paths are exercised."""
    ids = torch.randint(2, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, ::8] = 1
    return ids


@pytest.mark.parametrize("switch", ["record"] + list(SWITCHES))
def test_future_tokens_never_change_past_logits(switch):
    model = tiny_model(**SWITCHES.get(switch, {}))
    ids = token_ids(2, 40)
    changed = ids.clone()
    changed[:, 25:] = torch.randint(2, 256, (2, 15))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_switch_changes_the_output_and_every_parameter_gets_a_gradient(switch):
    base, model = tiny_model(), tiny_model(seed=1, **SWITCHES[switch]).train()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    ids = token_ids(2, 24)
    with torch.no_grad():
        assert not torch.allclose(base(ids), model(ids), atol=1e-4)
    model(ids[:, :-1], ids[:, 1:]).mean().backward()
    # DDP (find_unused_parameters=False) needs every parameter in the graph of every step.
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in missing if "table" in n or "lam" in n)


@pytest.mark.parametrize("switch", ["bigram", "smear", "gate_attn_out"])
def test_zero_initialized_switches_start_as_the_identity(switch):
    base = tiny_model()  # perturbed, so attention and MLP outputs are not zero
    model = GPT(ModelConfig(**{**TINY.to_dict(), **SWITCHES[switch]}))
    model.reset_parameters()
    model.load_state_dict(base.state_dict(), strict=False)
    ids = token_ids(2, 24)
    with torch.no_grad():
        assert torch.allclose(base(ids), model.eval()(ids), atol=1e-6)


def test_switches_are_initialized_as_the_records_do():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY.to_dict(), **SWITCHES["all"], "ve_dim": 64})
    model = GPT(cfg)
    model.reset_parameters()
    params = dict(model.named_parameters())
    assert torch.all(params["bigram_emb.table.weight"] == 0)
    assert params["bigram_emb.scale"].item() == pytest.approx(0.05)
    for proj in ("bigram_emb.proj.weight", "value_emb.proj.weight"):  # orthonormal rows or columns
        w = params[proj]
        gram = w @ w.T if w.size(0) <= w.size(1) else w.T @ w
        assert torch.allclose(gram, torch.eye(min(w.shape)), atol=1e-5)
    assert params["value_emb.table.weight"].std().item() == pytest.approx(0.01, rel=0.05)
    assert params["value_emb.scale"].item() == pytest.approx(0.1)
    assert [n for n in params if n.endswith("ve_scale")] == ["blocks.1.ve_scale", "blocks.3.ve_scale"]
    assert all(params[n].item() == 1 for n in ("blocks.1.ve_scale", "blocks.3.ve_scale"))
    assert torch.all(params["smear.gate_w"] == 0) and torch.all(params["smear.lam"] == 0)
    assert params["smear.gate_w"].shape == (1, 12)
    assert params["blocks.0.attn.gate_w"].shape == (4, 12) and torch.all(params["blocks.0.attn.gate_w"] == 0)
    dense = GPT(ModelConfig(**{**TINY.to_dict(), "attn_gate": "dense", "model_dim": 256, "num_heads": 8,
                               "num_kv_heads": 4, "rope_dims": 16}))
    dense.reset_parameters()
    w = dense.blocks[0].attn.gate_w
    assert w.shape == (8, 256) and w.std().item() == pytest.approx(0.01, rel=0.1)


def test_switch_parameter_counts_on_the_record():
    def count(**overrides):
        with torch.device("meta"):
            return sum(p.numel() for p in GPT(ModelConfig(**overrides)).parameters())

    record = count()
    assert count(mlp_activation="relu2") == count(mlp_activation="gelu") == record
    assert count(bigram_buckets=16384, bigram_dim=32) == record + 16384 * 32 + 32 * 512 + 1  # PR #1716
    assert count(ve_layers=(9, 10)) == record + 8192 * 128 + 128 * 256 + 1 + 2
    assert count(attn_gate="dense") == record + 11 * 8 * 512
    assert count(attn_gate="attn_out") == count(attn_gate="sparse") == record + 11 * 8 * 12
    # The 2026-04-27 record (35,945,671) stores lane weights for all 11 layers; 8 never read them.
    assert count(smear_gate=True, attn_gate="sparse", parallel_residual_start=8, parallel_lanes=2) == 35_945_671 - 8 * 6


def test_bigram_hash_is_the_records_int32_formula():
    def int32(v):
        return (v + 2 ** 31) % 2 ** 32 - 2 ** 31

    ids = torch.tensor([[5, 17, 1, 8191, 65535, 65534, 40000]])
    for buckets in (16384, 3072):
        got = bigram_hash(ids, buckets)[0].tolist()
        prev, cur = ids[0, :-1].tolist(), ids[0, 1:].tolist()
        pairs = [(int32(36313 * t) ^ int32(27191 * p)) % (buckets - 1) for p, t in zip(prev, cur)]
        assert got == [buckets - 1] + pairs
        assert all(0 <= b < buckets for b in got)


def test_smear_gate_never_reads_across_a_bos():
    cfg = ModelConfig(**{**TINY.to_dict(), "smear_gate": True})
    smear = SmearGate(cfg)
    with torch.no_grad():
        smear.gate_w.normal_()
        smear.lam.fill_(0.7)
    x = torch.randn(2, 10, 64)
    ids = torch.randint(2, 256, (2, 10))
    ids[:, 4] = cfg.bos_id  # a new document starts at position 4
    changed = x.clone()
    changed[:, :4] = torch.randn(2, 4, 64)  # rewrite the previous document entirely
    with torch.no_grad():
        out, out_changed = smear(x, ids), smear(changed, ids)
        unmasked = smear(changed, torch.full_like(ids, 7))
    assert torch.equal(out[:, 4:], out_changed[:, 4:])
    assert not torch.allclose(unmasked[:, 4], out_changed[:, 4])  # the mask is what blocks the leak
    assert torch.equal(out[:, 0], x[:, 0]) and not torch.allclose(out[:, 5:], x[:, 5:])


@pytest.mark.parametrize("gate, at_zero", [("sparse", 0.5), ("attn_out", 1.0), ("dense", 0.5)])
def test_attention_gates(gate, at_zero):
    attn = GPT(ModelConfig(**{**TINY.to_dict(), "attn_gate": gate})).blocks[0].attn
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        attn.gate_w.zero_()
        assert torch.allclose(attn.head_gates(x), torch.full((2, 6, 4), at_zero))
        attn.gate_w.normal_()
        g = attn.head_gates(x)
        tail = x.clone()
        tail[..., 12:] = 0
        assert g.shape == (2, 6, 4) and torch.equal(g, attn.head_gates(tail)) == (gate != "dense")


def test_documents_are_scored_as_if_alone():
    """With doc_mask, a row's logits are those of each of its documents run on its own (but for
    BigramHash, whose BOS bucket hashes the token before it, as the records' does)."""
    switches = {**SWITCHES["all"], "bigram_buckets": 0}
    model = tiny_model(**switches)
    ids = token_ids(1, 40)  # documents start at 0, 8, 16, 24, 32
    with torch.no_grad():
        together = model(ids)
        alone = torch.cat([model(ids[:, a:a + 8]) for a in range(0, 40, 8)], 1)
    assert torch.allclose(together, alone, atol=1e-5)
    unmasked = tiny_model(**{**switches, "doc_mask": False})
    with torch.no_grad():
        assert not torch.allclose(unmasked(ids), alone, atol=1e-3)


def test_packed_rows_cut_documents_every_max_len_tokens():
    """Documents(max_len): starts at the row's start, each BOS and every max_len tokens after a
    start, as the records pack many windows into one row; a model forward with max_doc_len masks
    attention there even without doc_mask. (SmearGate still reads the token before a cut that is
    no BOS, as the records' does in their packed rows.)"""
    from runtime.attention import Documents

    ids = torch.tensor([[5, 1, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7]])
    starts = Documents.of_tokens(ids, bos_id=1, max_len=3).starts[0].nonzero().flatten().tolist()
    assert starts == [0, 1, 4, 6, 9, 12]
    model = tiny_model(**{**SWITCHES["all"], "bigram_buckets": 0, "smear_gate": False, "doc_mask": False})
    row = token_ids(1, 40)  # documents start at 0, 8, 16, 24, 32: pieces of 4 tokens
    with torch.no_grad():
        alone = torch.cat([model(row[:, a:a + 4]) for a in range(0, 40, 4)], 1)
        assert torch.allclose(model(row, max_doc_len=4), alone, atol=1e-5)


def test_two_lane_decoder_form_and_validation():
    model = tiny_model(**SWITCHES["two_lanes"])
    assert [b.lane_post is not None for b in model.blocks] == [False, False, False, True]
    assert not any(b.parallel for b in model.blocks)
    assert torch.all(GPT(model.cfg).blocks[3].lane_resid == 1.1)  # the record's init
    with pytest.raises(PgError, match="parallel_lanes"):
        ModelConfig(parallel_lanes=3)
    # Decoder [4, 3, 4, 5]: a two-lane layer 4 followed by the one-lane layer 3 is refused.
    with pytest.raises(PgError, match="two-lane"):
        ModelConfig(num_layers=6, loop_start=3, loop_end=4, num_loops=1, parallel_residual_start=4,
                    parallel_lanes=2, xsa_last_n=0)


def test_yarn_scales_the_rope_base_beyond_its_length():
    def rotated(yarn_len, length, base=10000.0):
        attn = GPT(ModelConfig(**{**TINY.to_dict(), "rope_yarn_len": yarn_len, "rope_base": base})).blocks[0].attn
        x = torch.randn(1, length, 4, 16, generator=torch.Generator().manual_seed(0))
        return attn.rotary(x)

    assert torch.equal(rotated(32, 32), rotated(0, 32))  # within the trained length: unchanged
    # Beyond it, the same rotation as RoPE with base * (T / len)^(d / (d - 2)), d = rope_dims = 8.
    assert torch.allclose(rotated(16, 32), rotated(0, 32, base=10000.0 * 2 ** (8 / 6)), atol=1e-6)
    assert not torch.allclose(rotated(16, 32), rotated(0, 32), atol=1e-3)
    with pytest.raises(PgError, match="rope_yarn_len"):
        ModelConfig(rope_yarn_len=-1)


def test_switch_config_validation_and_round_trip():
    cfg = apply_overrides(get_preset("tiny"), ["model.ve_layers=2,3", "model.attn_gate=sparse",
                                               "model.smear_gate=true", "model.bigram_buckets=512"]).model
    assert cfg.ve_layers == (2, 3) and cfg.attn_gate == "sparse" and cfg.smear_gate and cfg.bigram_buckets == 512
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # as read from a manifest
    for bad in (dict(ve_layers=(11,)), dict(ve_layers=("x",)), dict(ve_layers=(3, 3)), dict(attn_gate="gated"),
                dict(mlp_activation="swiglu"), dict(bigram_buckets=1), dict(gate_window=0)):
        with pytest.raises(PgError):
            ModelConfig(**bad)


def test_new_parameters_are_routed_to_optimizers_quantization_and_audit():
    model = GPT(ModelConfig(**{**TINY.to_dict(), **SWITCHES["all"]}))
    muon, adam = build_optimizers(model, TrainConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    embeds, controls = ({names[id(p)] for p in g["params"]} for g in adam.param_groups)
    matrices = {names[id(p)] for p in muon.param_groups[0]["params"]}
    assert {"bigram_emb.table.weight", "value_emb.table.weight"} <= embeds
    assert {"smear.gate_w", "smear.lam", "blocks.2.attn.gate_w", "bigram_emb.scale", "blocks.1.ve_scale"} <= controls
    assert {"bigram_emb.proj.weight", "value_emb.proj.weight"} <= matrices
    assert matrix_group("bigram_emb.table.weight") == "bigram_table"
    assert matrix_group("value_emb.proj.weight") == "ve_proj"
    qcfg = get_preset("record").quant
    assert is_quantized("bigram_emb.table.weight", torch.zeros(16384, 32), qcfg)
    assert not is_quantized("blocks.0.attn.gate_w", torch.zeros(8, 512), qcfg)
    assert {tensor_group(n) for n in ("bigram_emb.table.weight", "bigram_emb.proj.weight", "value_emb.table.weight")} \
        == {"embeddings"}
    assert tensor_group("blocks.0.attn.gate_w") == tensor_group("smear.gate_w") == "control"


def test_lookup_tables_get_identity_hessians_and_projections_real_ones(demo_data):
    from dataclasses import replace

    from builder.quant.calibration import collect_hessians
    from builder.quant.policy import Quantizer
    from runtime.data import find_data

    model = tiny_model(**{**SWITCHES["all"], "vocab_size": 1024, "bigram_buckets": 512})  # tables > passthrough size
    qcfg = replace(get_preset("tiny").quant, calibration_batches=1, calibration_batch_tokens=256)
    hessians = collect_hessians(model, find_data(str(demo_data), 1024), qcfg, 64, torch.device("cpu"), seed=0)
    assert torch.equal(hessians["bigram_emb.table.weight"], torch.eye(16))
    assert torch.equal(hessians["value_emb.table.weight"], torch.eye(16))
    assert hessians["value_emb.proj.weight"].shape == (16, 16)
    assert not torch.equal(hessians["value_emb.proj.weight"], torch.eye(16))
    quantizer = Quantizer(model.state_dict(), hessians, qcfg)
    assert {"bigram_emb.table.weight", "value_emb.table.weight"} <= set(quantizer.quantized_names())


def test_all_switches_trace_as_one_graph():
    """No data-dependent Python control flow: dynamo captures the whole forward without a break."""
    model = tiny_model(**SWITCHES["all"])
    ids = token_ids(2, 16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(ids), model(ids), atol=1e-5)


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
