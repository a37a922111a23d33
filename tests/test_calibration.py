"""builder/quant/calibration.collect_hessians under DDP: N gloo ranks, each forwarding its share of every
calibration batch, give every rank the Hessians of one process."""

from dataclasses import replace

import torch
from gloo_ranks import run_on_gloo_ranks

from builder.presets import get_preset
from builder.quant.calibration import collect_hessians
from runtime.data import find_data
from runtime.model import GPT

CPU = torch.device("cpu")
SEQ_LEN = 64
# Three sequences per batch split 1 + 2 over two ranks; one sequence leaves rank 0 with none.
SPLITS = {"uneven": 3, "one_rank_idle": 1}


def calibration(seqs):
    return replace(get_preset("tiny").quant, calibration_batches=2, calibration_batch_tokens=seqs * SEQ_LEN)


def model_for_test():
    torch.manual_seed(0)
    model = GPT(get_preset("tiny").model)
    model.reset_parameters()
    for p in model.parameters():  # zero-initialized projections would give zero Hessians downstream
        p.data.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _rank_main(rank, world, data, out_dir):
    layout = find_data(data, 1024)
    for name, seqs in SPLITS.items():
        hessians = collect_hessians(model_for_test(), layout, calibration(seqs), SEQ_LEN, CPU, 0, rank, world)
        torch.save(hessians, f"{out_dir}/{name}.rank{rank}.pt")


def test_two_gloo_ranks_give_every_rank_the_one_process_hessians(demo_data, tmp_path):
    run_on_gloo_ranks(_rank_main, 2, str(demo_data), str(tmp_path))
    layout = find_data(str(demo_data), 1024)
    for name, seqs in SPLITS.items():
        single = collect_hessians(model_for_test(), layout, calibration(seqs), SEQ_LEN, CPU, 0)
        ranks = [torch.load(tmp_path / f"{name}.rank{r}.pt") for r in range(2)]
        for shared in ranks:
            assert shared.keys() == single.keys()
            for key, h in single.items():
                # Only the order of the float sums differs (partial sums per rank, then the all-reduce).
                torch.testing.assert_close(shared[key], h, rtol=1e-5, atol=1e-6 * float(h.abs().max()), msg=key)
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in single)
        assert not torch.equal(single["blocks.0.mlp.fc.weight"], torch.zeros_like(single["blocks.0.mlp.fc.weight"]))
