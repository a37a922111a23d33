"""builder/pipeline.encode_shares: N gloo ranks each quantize their share of the tensors and rank 0
ends with what one process computes alone (the same encodings, the same allocator rows)."""

import pickle
from dataclasses import replace

import numpy as np
import torch
from gloo_ranks import run_on_gloo_ranks

from builder.pipeline import encode_shares
from builder.presets import apply_recipe, get_preset
from builder.quant.policy import Quantizer, is_quantized
from runtime.distributed import Ranks
from runtime.model import GPT

RECIPES = ("r0409", "best")


def quantizer_for_test(recipe):
    """A tiny model's quantizer on synthetic Hessians; `best` without its loss probe (no data)."""
    qcfg = replace(apply_recipe(get_preset("tiny"), recipe).quant, probe_tokens=0)
    torch.manual_seed(0)
    model = GPT(get_preset("tiny").model)
    model.reset_parameters()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(1)
    hessians = {}
    for name, t in state.items():
        if is_quantized(name, t, qcfg):
            x = torch.randn(256, t.shape[1], generator=gen)
            hessians[name] = x.T @ x / len(x)
    return Quantizer(state, hessians, qcfg)


def _rank_main(rank, world, out_dir):
    for recipe in RECIPES:
        quantizer = quantizer_for_test(recipe)
        table = encode_shares(quantizer, Ranks())
        if rank == 0:
            with open(f"{out_dir}/{recipe}.pkl", "wb") as f:
                pickle.dump((table, quantizer.computed(quantizer.quantized_names())), f)
        else:
            assert table is None


def same_encodings(a, b):
    assert a.keys() == b.keys()
    for key in a:
        for (_, x, _), (_, y, _) in zip(a[key].payloads(), b[key].payloads(), strict=True):
            assert np.array_equal(x, y), key


def test_ranks_split_the_tensors_and_rank0_gets_what_one_process_computes(tmp_path):
    run_on_gloo_ranks(_rank_main, 2, str(tmp_path))
    for recipe in RECIPES:
        with open(tmp_path / f"{recipe}.pkl", "rb") as f:
            table, (encodings, _) = pickle.load(f)
        alone = quantizer_for_test(recipe)
        names = alone.quantized_names()
        shares = [alone.share(r, 2) for r in range(2)]
        assert sorted(shares[0] + shares[1]) == sorted(names)
        cost = [sum(alone.state[n].shape[0] * alone.state[n].shape[1] ** 2 for n in share) for share in shares]
        assert abs(cost[0] - cost[1]) <= max(alone.state[n].shape[0] * alone.state[n].shape[1] ** 2 for n in names)
        if recipe == "best":  # the allocator's rows arrive, not the candidates' encodings
            from builder.artifact.budget import candidate_rows
            assert table == {name: candidate_rows(alone, name) for name in names}
        else:
            plan = alone.default_plan()
            assert table == {}
            same_encodings(encodings, {(name, plan[name]): alone.encode(name, plan[name]) for name in names})
