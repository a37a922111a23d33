"""builder/train/trainer.py and builder/data/loader.py: distributed equivalence, schedules, data hygiene."""

import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT

from builder.commands import main as cli
from builder.config import TIME_RULE_NAMES, QuantConfig, TrainConfig, apply_overrides
from builder.data.loader import ShuffledSequences
from builder.presets import get_preset
from builder.quant.calibration import LossProbe, collect_hessians
from builder.quant.primitives import encode_matrix
from builder.timebudget import TIME_RULES, describe, estimate_post_training, overtime, timing_summary
from builder.train.averaging import Averages
from builder.train.qat import LateQAT, fake_quantize
from builder.train.trainer import Context, fused_kernels, micro_batches, train
from runtime.config import ModelConfig
from runtime.data import find_data
from runtime.errors import PgError
from runtime.model import GPT

SHORT = ["--set", "train.iterations=3", "--set", "train.ema_decay=0", "--set", "train.micro_batch_tokens=1024"]


def pgbuild(*args, check=True):
    """run_pgbuild with one thread per process: these models are too small to gain from threads,
    and on a shared machine waiting threads make a run many times slower."""
    proc = subprocess.run([sys.executable, "-m", "builder", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"pgbuild {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def train_checkpoint(data, out, *extra):
    pgbuild("train", "--preset", "tiny", "--data", data, "--out", out, *SHORT, *extra)
    return torch.load(out, weights_only=True)


def test_two_processes_match_one_process_with_accumulation(demo_data, tmp_path):
    """gloo DDP over 2 ranks (2 micro-batches each) vs 1 rank with 4: same batch, same weights."""
    single = train_checkpoint(demo_data, tmp_path / "one.pt")
    double = train_checkpoint(demo_data, tmp_path / "two.pt", "--nproc-per-node", 2)
    assert double["provenance"]["world_size"] == 2 and single["provenance"]["world_size"] == 1
    # Not bitwise: the all-reduce sums gradients in another order, and Newton-Schulz runs in bf16 as
    # the records' does, so last-bit gradient differences flip bf16 roundings of the Muon updates and
    # Adam's first steps (g / |g|) amplify them: measured 8.6e-3 at most after 3 steps (fp32 NS: 1e-3).
    for name, value in single["state"].items():
        torch.testing.assert_close(double["state"][name], value, rtol=2e-2, atol=2e-2, msg=name)
    # Each rank keeps the Muon momentum of the matrices it owns; the checkpoint gathers all of it.
    muon_one, muon_two = (ckpt["training"]["optimizers"][0]["state"] for ckpt in (single, double))
    assert len(muon_two) == len(muon_one) > 0
    for index, state in muon_one.items():
        torch.testing.assert_close(muon_two[index]["momentum_buffer"], state["momentum_buffer"], rtol=2e-2, atol=2e-2)


def test_record_preset_trains_on_cpu_with_shrunk_shapes(demo_data, tmp_path):
    ckpt = tmp_path / "record.pt"
    pgbuild("train", "--preset", "record", "--data", demo_data, "--out", ckpt,
                "--set", "train.require_cuda=false", "--set", "model.vocab_size=1024",
                "--set", "model.model_dim=128", "--set", "model.mlp_mult=2", "--set", "train.seq_len=64",
                "--set", "train.batch_tokens=512", "--set", "train.micro_batch_tokens=512",
                "--set", "train.iterations=2")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["preset"]["model"]["num_layers"] == 11 and saved["preset"]["model"]["num_loops"] == 2
    assert saved["provenance"]["steps"] == 2


def test_training_and_calibration_never_read_validation_shards(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    for val in data.glob("fineweb_val_*.bin"):
        val.write_bytes(b"not a shard")  # any read of validation data now fails loudly
    layout = find_data(str(data), 1024)
    preset = apply_overrides(get_preset("tiny"), ["train.iterations=2", "quant.calibration_batches=2",
                                                  "quant.calibration_batch_tokens=2048", "quant.probe_tokens=2048"])
    device = torch.device("cpu")
    result = train(preset, layout, Context(device), report=lambda *_: None)
    assert collect_hessians(result.model, layout, preset.quant, preset.train.seq_len, device, 0, 0, 1)
    LossProbe(result.model, layout, preset.train.seq_len, preset.quant.probe_tokens, device, 0)


def test_loader_slices_one_global_batch_across_ranks(demo_data):
    layout = find_data(str(demo_data), 1024)
    whole, _ = ShuffledSequences(layout.shards("train"), 64, seed=3).next_batch(8)
    halves = [ShuffledSequences(layout.shards("train"), 64, seed=3).next_batch(4, rank, 2)[0] for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
    x, y = ShuffledSequences(layout.shards("train"), 64, seed=3).next_batch(2)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_loader_draws_without_replacement_within_an_epoch(tmp_path):
    from builder.data.build import write_shard

    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(1000) % 60000)
    loader = ShuffledSequences([str(tmp_path / "fineweb_train_000000.bin")], 10, seed=1)
    starts = [int(loader.next_batch(1)[0][0, 0]) for _ in range(99)]
    assert len(set(starts)) == 99


def test_uneven_batch_split_is_refused(demo_data, tmp_path):
    proc = pgbuild("train", "--preset", "tiny", "--data", demo_data, "--out", tmp_path / "x.pt",
                       "--set", "train.micro_batch_tokens=3000", check=False)
    assert proc.returncode == 2 and "does not split" in proc.stderr
    assert not (tmp_path / "x.pt").exists()


def test_a_ranks_share_smaller_than_a_micro_batch_is_one_micro_batch():
    cfg = get_preset("tiny").train  # 4,096 tokens per step, micro-batches of 4,096
    assert micro_batches(cfg, 1) == (1, 4096)
    assert micro_batches(cfg, 2) == (1, 2048)  # the same 4,096 tokens per step
    with pytest.raises(PgError, match="does not split into 3 rank"):
        micro_batches(cfg, 3)


def test_two_process_tiny_build_and_its_refusals_under_torchrun(demo_data, tmp_path):
    out = tmp_path / "a.py"
    proc = pgbuild("train-and-pack", "--preset", "tiny", "--nproc-per-node", 2, "--data", demo_data, "--out", out,
                   "--set", "train.iterations=3", "--eval-tokens", 2000, "--eval-modes", "standard", "--json")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 3 and os.path.getsize(out) == summary["bytes"]
    bad = pgbuild("train-and-pack", "--preset", "tiny", "--nproc-per-node", 2, "--data", demo_data,
                  "--out", tmp_path / "b.py", "--set", "train.batch_tokens=4097", check=False)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "does not split into 2 rank(s)" in errors[0]
    assert "Traceback" not in bad.stderr and not (tmp_path / "b.py").exists()


# ----------------------------------------------------------------------------- in-process runs

@pytest.fixture(autouse=True)
def one_thread():
    """Unit-test matrices are too small to gain from threads, and on a shared machine threads
    waiting on each other make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_preset(*assignments):
    """The tiny preset at unit-test size: 4 layers x 64, 2 micro-batches of 4 x 32 tokens."""
    return apply_overrides(get_preset("tiny"), [
        "model.model_dim=64", "train.seq_len=32", "train.batch_tokens=256", "train.micro_batch_tokens=128",
        "train.max_wallclock_seconds=1000000", "train.log_every=1", *assignments])


def quiet(*_):
    pass


def test_resume_matches_an_uninterrupted_run(demo_data):
    """Stop after 3 of 6 steps, resume: the same weights as 6 straight steps, with warmdown, EMA,
    SWA, late QAT, the WD taper and depth recurrence all switching on around the break."""
    preset = small_preset("train.iterations=6", "train.checkpoint_every=3", "train.warmdown_frac=0.8",
                          "train.qat_threshold=0.9", "train.swa_every=1", "train.swa_start_frac=0.4",
                          "train.ema_decay=0.9", "train.muon_wd_taper=true", "train.muon_wd_taper_start=0.3",
                          "train.enable_looping_at=0.3")
    layout, ctx = find_data(str(demo_data), 1024), Context(torch.device("cpu"))
    saved = []
    straight = train(preset, layout, ctx, report=quiet, save=lambda t: saved.append(t.state_dict()))
    assert [s["steps"] for s in saved] == [3, 6] and saved[0]["qat"] and saved[0]["looping"]
    assert saved[0]["averages"]["swa"]["count"] == 1
    resumed = train(preset, layout, ctx, report=quiet, resume=saved[0])
    assert resumed.steps == 6 and resumed.weights == straight.weights == "swa (4 snapshots)"
    assert [e["loss"] for e in resumed.log] == [e["loss"] for e in straight.log]
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    # A resume that loses state is caught: without the data order the weights differ.
    saved[0]["loader"] = ShuffledSequences(layout.shards("train"), 32, seed=99).state_dict()
    wrong = train(preset, layout, ctx, report=quiet, resume=saved[0])
    assert not torch.equal(wrong.model.blocks[0].mlp.fc.weight, straight.model.blocks[0].mlp.fc.weight)


def test_reserve_shortens_the_training_budget(demo_data):
    layout, ctx = find_data(str(demo_data), 1024), Context(torch.device("cpu"))
    # Everything reserved: the budget is gone after the first step.
    result = train(small_preset("train.iterations=5", "train.max_wallclock_seconds=100", "train.reserve_seconds=100"),
                   layout, ctx, report=quiet)
    assert result.steps == 1 and result.reserve_seconds == 100
    lines = []  # a step cap that binds long before the clock: no estimate is taken
    result = train(small_preset("train.iterations=3", "train.reserve_seconds=0"), layout, ctx, report=lines.append)
    assert result.estimate is None and result.steps == 3 and not any("estimate" in line for line in lines)
    # A clock that binds: the estimate is taken (off the clock) and shortens training.
    result = train(small_preset("train.iterations=100000", "train.max_wallclock_seconds=8", "train.reserve_seconds=0"),
                   layout, ctx, report=lines.append)
    estimate = next(line for line in lines if line.startswith("reserve estimate"))
    assert all(stage in estimate for stage in ("hessians", "gptq", "compress"))
    assert result.reserve_seconds == pytest.approx(sum(result.estimate.values()), abs=0.05)
    assert result.seconds <= 8 - result.reserve_seconds + 1.0  # stopped by the clock, less the reserve
    data_access = small_preset("train.iterations=100000", "train.max_wallclock_seconds=8", "train.reserve_seconds=0",
                               "train.time_rule=data_access")
    data_access = train(data_access, layout, ctx, report=quiet)
    assert data_access.reserve_seconds == pytest.approx(data_access.estimate["hessians"], abs=0.01)


def test_estimate_covers_every_post_training_stage(demo_data):
    preset = small_preset()
    model = GPT(preset.model)
    model.reset_parameters()
    estimate = estimate_post_training(model, find_data(str(demo_data), 1024), preset, torch.device("cpu"))
    assert set(estimate) == {"hessians", "gptq", "compress"} and all(v > 0 for v in estimate.values())


def test_time_rules_count_their_stages():
    seconds = {"train": 500.0, "hessians": 50.0, "gptq": 40.0, "compress": 20.0, "serialize": 1.0, "eval": 99.0}
    strict = timing_summary(seconds, 600, "strict", {"hessians": 45.0})
    assert strict["artifact_production_wallclock"] == strict["counted_seconds"] == 611.0
    assert strict["within_wallclock"] is False and strict["hessians_estimate_seconds"] == 45.0
    assert "OVER by 11.0 s" in describe(seconds, 600, "strict") and "eval" not in describe(seconds, 600)
    assert "over the 600 s limit by 11.0 s" in overtime(seconds, 600, "strict")
    data_access = timing_summary(seconds, 600, "data_access")
    assert data_access["counted_seconds"] == 550.0 and data_access["within_wallclock"] is True
    assert data_access["artifact_production_wallclock"] == 611.0 and overtime(seconds, 600, "data_access") is None
    assert describe(seconds, 600, "data_access").endswith("(gptq 40.0 s, compress 20.0 s, serialize 1.0 s "
                                                          "outside it)")
    assert TIME_RULE_NAMES == tuple(TIME_RULES)


# ----------------------------------------------------------------------------- late QAT, averaging

def qat_model():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=128, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, num_loops=0,
                            parallel_residual_start=-1, xsa_last_n=1))
    model.reset_parameters()
    for name, p in model.named_parameters():  # non-zero output projections, so every matrix matters
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.05)
    return model


def loss_and_grads(forward, model, x, y):
    model.zero_grad()
    loss = forward(x, y).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_late_qat_switches_on_inside_a_compiled_graph():
    """Compiled with QAT off, then switched on: the next step sees the quantized weights (loss and
    straight-through gradients equal an eager model holding q(w)), with no recompilation."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()  # graphs compiled by earlier tests must not count here
    qcfg = QuantConfig(passthrough_max_numel=0)
    model = qat_model()
    reference = copy.deepcopy(model)
    qat = LateQAT(model, qcfg, "sdclip")
    assert len(qat.layers) == 12 and all(bits == 6 for _, _, bits, _ in qat.layers)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    x, y = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    off, _ = loss_and_grads(compiled, model, x, y)
    plain, _ = loss_and_grads(reference, reference, x, y)
    torch.testing.assert_close(off, plain)
    qat.enable()
    on, grads = loss_and_grads(compiled, model, x, y)
    assert counter.frame_count == 1 and abs(on.item() - off.item()) > 1e-4
    with torch.no_grad():
        for name, module, bits, k in qat.layers:
            reference.get_submodule(name).weight.copy_(fake_quantize(module.weight, bits, k, "sdclip"))
    expected, expected_grads = loss_and_grads(reference, reference, x, y)
    torch.testing.assert_close(on, expected)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    qat.remove()
    assert all(type(module) is torch.nn.Linear for _, module in model.named_modules() if "blocks" in _ and
               isinstance(module, torch.nn.Linear))
    assert set(model.state_dict()) == set(reference.state_dict())


def test_qat_grid_is_the_exporters():
    """Fake-quant lands exactly on what the exporter stores when GPTQ has nothing to correct
    (identity Hessian): same symmetric +-qmax codes, same fp16 SDClip row scales."""
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(1)) * 0.02
    qcfg = QuantConfig()
    exported = encode_matrix("blocks.0.mlp.fc.weight", w, torch.eye(64), 6, qcfg.matrix_clip_k, qcfg).dequantize()
    torch.testing.assert_close(fake_quantize(w, 6, qcfg.matrix_clip_k, "sdclip"), torch.as_tensor(exported).float())
    rowmax = fake_quantize(w, 5, 0.0, "rowmax")
    steps = rowmax / (w.abs().amax(dim=1, keepdim=True) / 15)
    assert torch.allclose(steps, steps.round(), atol=1e-4) and abs(steps.abs().max().item() - 15) < 1e-4


def test_swa_averages_its_snapshots_and_takes_precedence_over_ema():
    model = torch.nn.Linear(2, 2, bias=False)
    cfg = TrainConfig(ema_decay=0.5, swa_every=2, swa_start_frac=0.5)
    averages = Averages(model, cfg)
    seen = []
    for step in range(1, 7):
        with torch.no_grad():
            model.weight.fill_(float(step))
        first = averages.update(model, step, frac=step / 6)
        if step >= 3 and step % 2 == 0:
            seen.append(float(step))
        assert first == (step == 4)
    weights, source = averages.final_weights(model)
    assert source == "swa (2 snapshots)" and torch.allclose(weights["weight"], torch.full((2, 2), sum(seen) / 2))
    assert Averages(model, TrainConfig(ema_decay=0.5)).final_weights(model)[1] == "ema"
    assert Averages(model, TrainConfig(ema_decay=0)).final_weights(model)[1] == "last"


# ----------------------------------------------------------------------------- the CLI

def test_cli_resume_and_run_dir(demo_data, tmp_path):
    """`train --resume` continues a 2-step run to 4 steps with the weights of a straight 4-step
    run (constant LR, so the schedule does not depend on the step cap); --run-dir gets the log."""
    flat = [*SHORT[2:], "--set", "train.warmdown_frac=0", "--set", "train.enable_looping_at=0",
            "--set", "model.model_dim=64", "--set", "train.log_every=1"]
    pgbuild("train", "--preset", "tiny", "--data", demo_data, "--out", tmp_path / "four.pt", *flat,
            "--set", "train.iterations=4", "--run-dir", tmp_path / "run")
    pgbuild("train", "--preset", "tiny", "--data", demo_data, "--out", tmp_path / "two.pt", *flat,
            "--set", "train.iterations=2")
    pgbuild("train", "--resume", tmp_path / "two.pt", "--set", "train.iterations=4", "--data", demo_data,
            "--out", tmp_path / "resumed.pt")
    straight, resumed = (torch.load(tmp_path / f, weights_only=True) for f in ("four.pt", "resumed.pt"))
    assert resumed["provenance"]["steps"] == straight["provenance"]["steps"] == 4
    for name, value in straight["state"].items():
        torch.testing.assert_close(resumed["state"][name], value, rtol=0, atol=1e-6, msg=name)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4] and log == straight["training"]["log"]
    assert [e["loss"] for e in resumed["training"]["log"]] == [e["loss"] for e in log]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["model_dim"] == 64
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refused = CliRunner().invoke(cli.main, ["train", "--resume", str(tmp_path / "two.pt"), "--set",
                                            "model.num_layers=2", "--data", str(demo_data)])
    assert refused.exit_code == 2 and "--resume" in refused.output


def test_train_and_pack_run_dir_summary(demo_data, tmp_path):
    run = tmp_path / "run"
    pgbuild("train-and-pack", "--preset", "tiny", "--data", demo_data, "--out", tmp_path / "a.py",
                "--set", "train.iterations=2", "--set", "model.model_dim=64", "--set", "train.checkpoint_every=1",
                "--recipe", "r0409", "--eval-tokens", 2000, "--eval-modes", "standard", "--run-dir", run)
    summary = json.loads((run / "summary.json").read_text())
    assert all(not isinstance(v, (dict, list)) for v in summary.values())
    assert summary["bytes"] == (tmp_path / "a.py").stat().st_size and summary["seed"] == 1337
    assert summary["preset"] == "tiny" and summary["steps"] == 2 and summary["weights"] == "ema"
    assert summary["stopped_by"] == "step cap" and summary["unigram_bpb"] < summary["uniform_bpb"]
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 2  # short run: every step logged
    assert {"prequant_bpb", "standard_bpb", "train_seconds", "hessians_seconds", "gptq_seconds", "compress_seconds",
            "serialize_seconds", "eval_seconds", "artifact_production_wallclock", "counted_seconds",
            "time_rule", "within_wallclock"} <= set(summary)
    assert summary["artifact_production_wallclock"] >= summary["train_seconds"] + summary["hessians_seconds"]
    assert summary["time_rule"] == "strict" and summary["counted_seconds"] == summary["artifact_production_wallclock"]
    assert {p.name for p in run.iterdir()} == {"config.json", "train_log.jsonl", "loss.png", "summary.json",
                                               "checkpoint.pt"}
    assert torch.load(run / "checkpoint.pt", weights_only=True)["training"]["steps"] == 2


def test_the_trainer_takes_each_triton_kernel_only_where_it_applies():
    preset = get_preset("r0427")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    triton = importlib.util.find_spec("triton") is not None
    taken = lambda p, device=cuda: {k for k, fn in fused_kernels(p, device).items() if fn}  # noqa: E731
    with_model = lambda **kw: dataclasses.replace(preset, model=dataclasses.replace(preset.model, **kw))  # noqa: E731
    with_train = lambda **kw: dataclasses.replace(preset, train=dataclasses.replace(preset.train, **kw))  # noqa: E731
    assert taken(preset) == ({"loss", "mlp"} if triton else set())
    if not triton:
        return
    assert taken(preset, cpu) == set()
    assert taken(with_model(record_precision=True)) == set()  # its logits are capped in bf16
    assert taken(with_model(logit_softcap=0.0)) == {"mlp"}
    assert taken(with_train(fused_loss=False)) == {"mlp"}
    assert taken(with_model(mlp_activation="relu2")) == {"loss", "mlp"}
    assert taken(with_model(mlp_activation="gelu")) == {"loss"}
    assert taken(with_train(qat_threshold=0.15)) == {"loss"}  # the fused MLP would bypass its fake-quant weights
    assert taken(with_train(fused_mlp=False)) == {"loss"}
