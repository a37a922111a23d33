"""torch.compile as the record compiles (fullgraph, static shapes), at reduced record shapes.

fullgraph=True raises at a graph break, so a compile that completes proves there is none; the
graph counts (`TrainResult.compilations`, a counting backend for the evaluator's loops) prove
that only the states the forward really has (recurrence off/on, training/scoring) get graphs,
never one per batch. Counts use the "aot_eager" backend (the same dynamo graphs, forward and
backward, without code generation); one training run goes through inductor for real.
"""

import copy
import dataclasses
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from builder.config import apply_overrides
from builder.presets import get_preset
from builder.provenance import of_training
from builder.train.trainer import Context, train
from runtime.data import find_data, load_tokens
from runtime.distributed import Ranks
from runtime.errors import PgError
from runtime.lora_ttt import documents, lora_ttt
from runtime.model import GPT
from runtime.ttt import score_first_ttt
from runtime.windows import score_windows, sliding_windows

CPU = torch.device("cpu")
RECORD_SHAPES = ["model.num_layers=4", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
                 "model.vocab_size=1024", "model.loop_start=1", "model.loop_end=2", "model.parallel_residual_start=2",
                 "model.xsa_last_n=2", "train.seq_len=64", "train.batch_tokens=256", "train.micro_batch_tokens=128",
                 "train.require_cuda=false", "train.max_wallclock_seconds=1000000", "train.auto_reserve=false",
                 "train.compile_cpu=true", "train.compile_warmup_steps=0", "eval.seq_len=64", "eval.stride=16",
                 "eval.batch_seqs=4", "eval.ttt_chunk_tokens=256", "eval.ttt_batch_seqs=2", "eval.ttt_epochs=1"]
"""The record preset (recurrence over layers 1-2, parallel residuals from 2, XSA on the last 2) at
4 x 64, two micro-batches per step; compiled on the CPU."""


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Graphs of other tests must not count here, nor ours use up their recompile budget."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def record(*sets):
    return apply_overrides(get_preset("record"), RECORD_SHAPES + list(sets))


def run(preset, demo_data):
    return train(preset, find_data(str(demo_data), 1024), Context(CPU), report=lambda *_: None)


def test_training_step_is_one_graph_per_recurrence_state(demo_data):
    """Recurrence switches on at step 2 and late QAT at step 3, mid-run: one recompile for the
    looped graph, none for QAT (its gate is a tensor the graph reads), no graph break."""
    preset = record("train.compile_backend=aot_eager", "train.iterations=4", "train.enable_looping_at=0.5",
                    "train.qat_threshold=0.5")
    result = run(preset, demo_data)
    assert [(e["looping"], e["qat"]) for e in result.log] == [(False, False), (False, False), (True, False),
                                                              (True, True)]
    assert result.compilations == 2 and not counters["graph_break"]
    assert of_training(preset, result, 1)["compilations"] == 2  # what summary.json records
    assert run(record("train.compile=false", "train.iterations=1"), demo_data).compilations == 0


def test_inductor_compiles_the_training_step_on_cpu(demo_data):
    """A real inductor compile (2 layers: a sequential and a parallel block, XSA on the last; one
    graph, recurrence off), training as the eager model does; the CPU default stays eager."""
    sets = ["model.num_layers=2", "model.num_loops=0", "model.parallel_residual_start=1", "model.xsa_last_n=1",
            "train.iterations=2", "train.compile_warmup_steps=1"]
    compiled = run(record(*sets), demo_data)
    eager = run(record(*sets, "train.compile_cpu=false"), demo_data)
    assert compiled.compilations == 1 and eager.compilations == 0  # the warmup step compiled it
    for got, want in zip(compiled.log, eager.log, strict=True):
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-4)
    for name, value in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)
    assert not get_preset("tiny").train.compile_cpu and not get_preset("record").train.compile_cpu


@pytest.fixture(scope="module")
def scoring(demo_data):
    """A record-shaped model, its eval settings and validation tokens."""
    preset = record()
    torch.manual_seed(0)
    model = GPT(preset.model)
    model.reset_parameters()
    for p in model.parameters():  # non-zero output projections, so the scores depend on every layer
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.05)
    tokens = torch.from_numpy(load_tokens(find_data(str(demo_data), 1024), "val", 4000).astype("int64"))
    return model, tokens, preset.eval


def compiled_counted(model, counter=None):
    """`model` compiled as runtime/evaluate.py compiles it, graphs counted (aot_eager)."""
    counter = counter or CompileCounterWithBackend("aot_eager")
    return torch.compile(model, backend=counter, dynamic=False, fullgraph=True), counter


def test_scoring_is_one_graph_whatever_the_batch_count(scoring):
    """Standard and sliding windows over a short and a longer stream, from 2 to 17 batches, each
    time with a short last batch: one graph for all of them."""
    model, tokens, cfg = scoring
    compiled, counter = compiled_counted(model)
    for positions in (400, 1100):
        eager_nll, nll = torch.zeros(positions), torch.zeros(positions)
        for stride in (cfg.seq_len, cfg.stride):  # standard, then sliding
            windows = sliding_windows(positions, cfg.seq_len, stride)
            assert len(windows) % cfg.batch_seqs  # the last batch is a short one
            score_windows(compiled, tokens, windows, nll, cfg.batch_seqs, CPU)
            score_windows(model, tokens, windows, eager_nll, cfg.batch_seqs, CPU)
            torch.testing.assert_close(nll, eager_nll, rtol=0, atol=1e-5)
    assert counter.frame_count == 1 and not counters["graph_break"]


def test_score_first_ttt_graphs_do_not_grow_with_the_chunks(scoring):
    """TTT scores and trains chunk after chunk: one scoring and one training graph, for 2 chunks
    as for 4 (a shorter last one), well within dynamo's recompile limit."""
    model, tokens, cfg = scoring
    counter = CompileCounterWithBackend("aot_eager")
    graphs = []
    for positions in (2 * cfg.ttt_chunk_tokens, 4 * cfg.ttt_chunk_tokens - 40):
        compiled, _ = compiled_counted(copy.deepcopy(model), counter)
        nll = torch.zeros(positions)
        windows = sliding_windows(positions, cfg.seq_len, cfg.stride)
        score_first_ttt(compiled, tokens[:positions + 1], windows, nll, cfg, Ranks(), CPU)
        assert torch.isfinite(nll).all() and (nll > 0).all()
        graphs.append(counter.frame_count)
    assert graphs == [2, 2] and not counters["graph_break"]


def test_lora_ttt_graphs_do_not_grow_with_the_batches(scoring):
    """LoRA TTT compiled as runtime/evaluate.py compiles it (dynamic: windows grow chunk by chunk),
    one adapter set reset for every batch, a phase after the first batch: as many graphs for one
    batch as for three (a short last one among them), and the eager scores, so the adapters' slot
    indices, rewritten in place, are read as inputs, never baked in. Dynamo's graphs run by its
    eager backend (AOT autograd traces dynamic shapes slowly); bench/lora_compile.py compiles the
    mode with inductor for real."""
    model, tokens, cfg = scoring
    cfg = dataclasses.replace(cfg, lora_chunk_tokens=16, lora_rank=4, lora_batch_docs=2, lora_group_rows=2,
                              lora_phases=1, lora_phase_docs=2)
    tokens = tokens[:301].clone()
    tokens[[0, 60, 128, 180, 240]] = model.cfg.bos_id  # five documents of 52 to 68 tokens
    docs = documents(tokens, model.cfg.bos_id)
    graphs = []
    for num_docs in (2, 5):
        positions = docs[num_docs - 1][1]
        counter = CompileCounterWithBackend("eager")
        compiled = torch.compile(copy.deepcopy(model), backend=counter, dynamic=True, fullgraph=True)
        nll, eager_nll = torch.zeros(positions), torch.zeros(positions)
        lora_ttt(compiled, tokens[:positions + 1], nll, cfg, Ranks(), CPU)
        lora_ttt(copy.deepcopy(model), tokens[:positions + 1], eager_nll, cfg, Ranks(), CPU)
        torch.testing.assert_close(nll, eager_nll, rtol=0, atol=1e-4)
        graphs.append(counter.frame_count)
        torch._dynamo.reset()
    assert graphs[0] == graphs[1] <= 3 and not counters["graph_break"]


def test_unknown_backend_is_one_error_line(demo_data):
    with pytest.raises(PgError, match="train.compile_backend"):
        run(record("train.compile_backend=no_such_backend"), demo_data)
