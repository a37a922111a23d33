"""bench/gpu.py: the whole benchmark on CPU at tiny size, and its FLOP count against hand counts."""

import dataclasses
import json
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, load_bench_script, run_bench_script
from triton_checks import needs_triton, run_interpreted

from builder.presets import get_preset
from runtime.model import GPT

SCRIPT = ROOT / "bench" / "gpu.py"


bench = load_bench_script("gpu")


def run_bench(*args):
    return run_bench_script("gpu", *args)


@pytest.fixture(scope="module")
def cpu_run(demo_data, tmp_path_factory):
    """The tiny CPU run; 1024-token TTT chunks so that TTT trains on the 2000 eval tokens."""
    out = tmp_path_factory.mktemp("bench") / "gpu.json"
    proc = run_bench("--data", demo_data, "--preset", "tiny", "--steps", 4, "--eval-tokens", 2000,
                     "--set", "eval.ttt_chunk_tokens=1024", "--json", out)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_cpu_run_prints_every_row(cpu_run):
    table, _ = cpu_run
    assert table.splitlines()[0] == "| part | measurement | value | notes |"
    for phase in ("train, plain (4 layers)", "train, looped (6 virtual layers)"):
        for measurement in ("tokens/s", "ms/step", "model FLOPs/token (fwd+bwd)", "TFLOP/s, MFU", "peak memory",
                            "vs record per GPU"):
            assert f"| {phase} | {measurement} |" in table
    for part in ("eval, sliding (stride 32)", "eval, score-first TTT (1024-token chunks, 1 epochs)"):
        for label in ("runtime.evaluate", "record's way"):
            assert f"| {part} | {label} |" in table
    for check in ("bf16 autocast vs fp32", "flash-attn vs SDPA", "compiled vs eager"):
        assert f"| check | {check}" in table
    assert "torch 2." in table and "| run | date, torch, device |" in table


def test_cpu_run_json_matches_the_table_and_the_evaluators_agree(cpu_run):
    table, payload = cpu_run
    rows = payload["rows"]
    assert len(table.splitlines()) == len(rows) + 2
    assert payload["facts"]["torch"] and payload["facts"]["device"].startswith("CPU")
    flops = {r["part"]: r["value"] for r in rows if r["measurement"] == "model FLOPs/token (fwd+bwd)"}
    assert flops == {"train, plain (4 layers)": 5_508_096, "train, looped (6 virtual layers)": 7_868_928}
    evals = {(r["part"].split(" (")[0], r["measurement"]): r["value"] for r in rows if r["part"].startswith("eval")}
    for mode in ("eval, sliding", "eval, score-first TTT"):
        ours, record = evals[(mode, "runtime.evaluate")], evals[(mode, "record's way")]
        assert ours["tokens"] == record["tokens"] == 1920  # 2000 tokens trimmed to 15 x 128
        # The same computation in fp32 on CPU: the record's loops and runtime.evaluate must agree.
        assert ours["bpb"] == pytest.approx(record["bpb"], abs=1e-4)
    sliding, ttt = evals[("eval, sliding", "runtime.evaluate")], evals[("eval, score-first TTT", "runtime.evaluate")]
    assert ttt["bpb"] != sliding["bpb"]  # TTT did train between chunks
    bf16 = next(r["value"] for r in rows if r["measurement"].startswith("bf16 autocast vs fp32"))
    assert 0 < bf16 < 0.05


def test_flops_of_a_plain_model_by_hand():
    """tiny without recurrence: 4 layers, d=128, 4 heads of 32, 2 KV heads, MLP 512, vocab 1024, T=128."""
    cfg = dataclasses.replace(get_preset("tiny").model, num_loops=0)
    q = out = 128 * 128
    k = v = 128 * 64
    fc = proj = 128 * 512
    linear = 2 * (q + k + v + out + fc + proj)  # per layer per token
    # causal: over a 128-token sequence, 128*129/2 (query, key) pairs per head, each 32 multiply-adds
    # in QK^T and 32 in AV, i.e. 2 * 2 * 32 FLOPs.
    attention = 4 * (2 * 2 * 32) * (128 * 129 // 2) / 128
    head = 2 * 128 * 1024
    forward = 4 * (linear + attention) + head
    assert bench.forward_flops_per_token(cfg, 128, looping=True) == forward == 1_836_032
    assert bench.train_flops_per_token(cfg, 128, looping=True) == 3 * forward


def test_flops_with_recurrence_count_each_pass():
    """tiny loops layers 1..2 once more once looping is on: 6 virtual layers instead of 4."""
    cfg = get_preset("tiny").model
    per_layer = 2 * (128 * 128 * 2 + 128 * 64 * 2 + 128 * 512 * 2) + 2 * 2 * 32 * 4 * 129 // 2
    head = 2 * 128 * 1024
    assert bench.forward_flops_per_token(cfg, 128, looping=False) == 4 * per_layer + head
    assert bench.forward_flops_per_token(cfg, 128, looping=True) == 6 * per_layer + head == 2_622_976


@pytest.mark.parametrize("preset,seq_len", [("tiny", 128), ("record", 2048)])
def test_linear_flops_match_the_built_models_weights(preset, seq_len):
    """Cross-check the config arithmetic against the matrices a built GPT holds, visited in its
    execution order (a looped block once per pass)."""
    cfg = get_preset(preset).model
    model = GPT(cfg)
    for looping in (False, True):
        order = cfg.layer_order(looping)
        weights = sum(model.blocks[i].get_submodule(name).weight.numel() for i in order
                      for name in ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc", "mlp.proj"))
        attention = len(order) * 2 * cfg.num_heads * cfg.head_dim * (seq_len + 1)
        expected = 2 * weights + attention + 2 * model.tok_emb.weight.numel()
        assert bench.forward_flops_per_token(cfg, seq_len, looping) == expected


def test_record_flops_and_peak_lookup():
    cfg = get_preset("record").model
    assert bench.train_flops_per_token(cfg, 2048, looping=False) == 284_722_176
    assert bench.train_flops_per_token(cfg, 2048, looping=True) == 426_298_368
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("Some Other GPU") is None


def test_time_limit_skips_measurements_but_still_prints_the_table(demo_data):
    proc = run_bench("--data", demo_data, "--preset", "tiny", "--steps", 2, "--eval-tokens", 600,
                     "--parts", "eval,checks", "--time-limit", 0)
    assert proc.returncode == 0, proc.stderr
    assert "| eval, sliding (stride 32) | runtime.evaluate | skipped |" in proc.stdout
    assert "| check | bf16 vs fp32 | skipped |" in proc.stdout
    assert "freshly initialized" in proc.stdout


def test_sigterm_still_prints_the_rows_measured_so_far(demo_data, tmp_path):
    """The device tool ends an overlong command with SIGTERM: the table must still come out."""
    out = tmp_path / "gpu.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--data", str(demo_data), "--preset", "tiny", "--steps", "2",
                             "--parts", "train", "--json", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "| tokens/s |" in line:  # the first phase is measured; stop it somewhere after that
            proc.send_signal(signal.SIGTERM)
            break
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1
    assert "| train, plain (4 layers) | tokens/s |" in stdout and "| run | interrupted | signal 15 |" in stdout
    assert json.loads(out.read_text())["rows"][-1]["measurement"] == "interrupted"


def test_bad_input_is_one_error_line(demo_data, tmp_path):
    proc = run_bench("--data", demo_data, "--preset", "tiny", "--parts", "train,bogus")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --parts: unknown part(s) bogus"
    proc = run_bench("--data", tmp_path / "missing", "--preset", "tiny")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and "does not exist" in proc.stderr


class Rows(list):
    def add(self, part, measurement, text, value=None, note=""):
        self.append((measurement, value, note))


def test_compiled_training_check_compares_every_gradient():
    """The GPU run's check of the compiled training graph (flex_attention's backward on a GPU with
    doc_mask; here inductor on the CPU, where the masked path is SDPA's): gradients equal eager's."""
    import torch

    from runtime.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=8,
                      num_loops=0, parallel_residual_start=-1, xsa_last_n=0, doc_mask=True)
    model = GPT(cfg)
    x, y = torch.randint(2, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    x[0, 10] = 1  # a document starts inside the first row
    rows = Rows()
    bench.check_compiled_gradients(rows, model, x, y, torch.device("cpu"), "2 x 32 tokens")
    (measurement, diff, note), = rows
    assert measurement == "compiled vs eager training: |d grad| / |grad|" and 0 <= diff < 1e-5
    assert note == "all parameters, fp32, 2 x 32 tokens"
    assert all(p.grad is None for p in model.parameters())


FUSED_MLP_CHECK = """
    import sys
    import torch
    sys.path.insert(0, "bench")
    import gpu as bench
    from builder.presets import get_preset
    from builder.train.fused_mlp import fused_mlp

    rows = []
    report = type("Rows", (), {"add": lambda self, *row: rows.append(row[1:])})()
    bench.check_fused_mlp(report, get_preset("tiny"), torch.device("cpu"), fused_mlp, tokens=300, repeats=1,
                          backend="aot_eager")
    (measurement, _, values, note), = rows
    print({"measurement": measurement, "note": note, **values})
"""


@needs_triton
def test_fused_mlp_check_times_both_and_compares_gradients():
    """The GPU run's fused-MLP check, run here through Triton's interpreter (the compiled MLP traced
    by aot_eager): both sides timed, bf16 gradients within a few roundings of each other."""
    row = run_interpreted(FUSED_MLP_CHECK)
    assert row["measurement"] == "fused MLP vs compiled MLP: ms per forward+backward, |d grad| / |grad|"
    assert row["fused_ms"] > 0 and row["compiled_ms"] > 0 and 0 <= row["grad_diff"] < 1e-3
    assert row["note"].startswith("300 tokens x ")
