"""pgbuild's `record` preset and `r0409` recipe against the 2026-04-09 record's own code.

The reference script (../shared/reference/r0409_train_gpt.py, loaded by tests/oracle.py) runs at
reduced shapes on the CPU in fp32, on the same weights (converted by builder.train.importer) and the
same batches as pgbuild: GPTQ codes and scales, calibration Hessians, Muon steps and the first
training losses. On the CPU neither side runs the record's CUDA autocast, so both forwards are
fp32; the reference model is therefore kept in fp32 rather than cast to bf16 as its train_model
does (without autocast that cast would run its whole forward in bf16).
"""

import pytest
import torch

from builder.config import apply_overrides
from builder.data.loader import ShuffledSequences
from builder.presets import apply_recipe, get_preset
from builder.quant.calibration import collect_hessians
from builder.quant.policy import Quantizer
from builder.train.importer import R0409_BLOCK_NAMES, from_r0409
from builder.train.optim import Muon, schedule_at
from builder.train.trainer import Context, Trainer
from runtime.data import find_data
from runtime.model import GPT
from tests.oracle import load_reference

VOCAB = 1024


def shapes(layers, dim, seq_len, batch_tokens, loop_end):
    """The same reduced record for both: (reference env vars, pgbuild --set overrides)."""
    heads = dim // 32
    env = dict(VOCAB_SIZE=VOCAB, NUM_LAYERS=layers, MODEL_DIM=dim, EMBEDDING_DIM=dim, NUM_HEADS=heads,
               NUM_KV_HEADS=heads // 2, LOOP_START=1, LOOP_END=loop_end, PARALLEL_RESIDUAL_START=loop_end + 1,
               XSA_LAST_N=layers, QK_GAIN_INIT=5.25, TRAIN_SEQ_LEN=seq_len, TRAIN_BATCH_TOKENS=batch_tokens,
               ITERATIONS=20, MAX_WALLCLOCK_SECONDS=0, WARMUP_STEPS=0)
    sets = [f"model.vocab_size={VOCAB}", f"model.num_layers={layers}", f"model.model_dim={dim}",
            f"model.num_heads={heads}", f"model.num_kv_heads={heads // 2}", "model.loop_start=1",
            f"model.loop_end={loop_end}", f"model.parallel_residual_start={loop_end + 1}",
            f"model.xsa_last_n={layers}", "train.require_cuda=false", "train.compile=false",
            f"train.seq_len={seq_len}", f"train.batch_tokens={batch_tokens}",
            f"train.micro_batch_tokens={batch_tokens // 8}",  # the record accumulates 8 micro-batches
            "train.iterations=20", "train.max_wallclock_seconds=1e9"]
    return env, sets


def reference_model(ref, perturb):
    """The reference GPT with its own init (seeded), optionally with every weight perturbed so
    that the zero-initialized projections carry signal too."""
    torch.manual_seed(0)
    model = ref.GPT(ref.Hyperparameters())
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
    return model


class SameBatches:
    """Hands the reference's `collect_hessians` the batches pgbuild's calibration draws: the
    training shards through pgbuild's sampler with the seed `collect_hessians` uses."""

    def __init__(self, layout, seq_len, seqs, seed):
        self.loader = ShuffledSequences(layout.shards("train"), seq_len, seed=seed + 1)
        self.seqs = seqs

    def next_batch(self, _global_tokens, _grad_accum_steps):
        return self.loader.next_batch(self.seqs)


@pytest.fixture(scope="module")
def quantization_case(demo_data):
    """(reference module, reference model, pgbuild preset with the r0409 recipe, pgbuild model,
    Hessians from both sides) at a width where every block matrix exceeds the reference's
    65,536-element quantization threshold."""
    env, sets = shapes(layers=3, dim=384, seq_len=64, batch_tokens=8 * 128, loop_end=1)
    ref = load_reference("r0409", **env)
    preset = apply_recipe(apply_overrides(get_preset("record"), sets + [
        "quant.calibration_batches=3", "quant.calibration_batch_tokens=128"]), "r0409")
    ref_model = reference_model(ref, perturb=True)
    model = GPT(preset.model)
    model.load_state_dict(from_r0409(ref_model.state_dict(), preset.model))
    ref_model.looping_active = model.looping = True  # as both calibrate after training
    layout = find_data(str(demo_data), VOCAB)
    seed = preset.train.seed
    ours = collect_hessians(model, layout, preset.quant, 64, torch.device("cpu"), seed)
    h = ref.Hyperparameters()
    feeder = SameBatches(layout, 64, preset.quant.calibration_batch_tokens // 64, seed)
    theirs = ref.collect_hessians(ref_model, feeder, h, torch.device("cpu"), preset.quant.calibration_batches)
    return ref, ref_model, preset, model, ours, theirs


def pgbuild_name(name):
    """The pgbuild name of a reference tensor name."""
    blocks, layer, rest = (name.split(".", 2) + ["", ""])[:3]
    return f"{blocks}.{layer}.{R0409_BLOCK_NAMES[rest]}" if rest in R0409_BLOCK_NAMES else name


def test_hessians_match_the_reference(quantization_case):
    """Same model, same batches: the same x^T x sums. The reference averages over batches and
    pgbuild over token uses (a looped layer counts each pass), so each pair agrees up to a
    positive factor, divided out here by the trace; the forwards differ by last-bit RoPE
    frequencies (pgbuild computes base**-f, the record 1/base**f), hence a relative tolerance."""
    _, _, _, _, ours, theirs = quantization_case
    assert len(theirs) == 3 * 6 + 1  # every block matrix of the 3 layers, and the tied embedding
    for name, h_ref in theirs.items():
        h_ours = ours[pgbuild_name(name)]
        torch.testing.assert_close(h_ours / h_ours.trace(), h_ref / h_ref.trace(), rtol=1e-4, atol=1e-8,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_gptq_codes_and_scales_match_the_reference(quantization_case):
    """The record's quantizer (gptq_mixed_quantize: int6 k=12.85 block matrices, int8 k=20
    embedding) and pgbuild's r0409 plan give the same codes and fp16 scales, bit for bit, on the
    same weights and Hessians; one Hessian gets dead input columns (never-active inputs)."""
    ref, ref_model, preset, model, _, theirs = quantization_case
    hessians = {name: h.clone() for name, h in theirs.items()}
    dead = torch.arange(0, 384, 37)
    hessians["blocks.0.mlp.fc.weight"][dead, :] = 0
    hessians["blocks.0.mlp.fc.weight"][:, dead] = 0
    ref_state = ref_model.state_dict()
    result, meta = ref.gptq_mixed_quantize(ref_state, hessians, ref.Hyperparameters())
    quantized = [name for name, how in meta.items() if how.startswith("gptq")]
    # The reference's codes laid out as pgbuild's tensors (q/k rows of the second rotary half negated).
    codes = from_r0409({name: result[name + ".q"].float() if name in quantized else t
                        for name, t in ref_state.items()}, preset.model)

    quantizer = Quantizer(model.state_dict(), {pgbuild_name(n): h for n, h in hessians.items()}, preset.quant)
    plan = quantizer.default_plan()
    assert sorted(plan) == sorted(pgbuild_name(name) for name in quantized)
    for name in quantized:
        ours = quantizer.encode(pgbuild_name(name), plan[pgbuild_name(name)])
        assert ours.enc == meta[name].split("(")[1].rstrip(")"), name
        assert torch.equal(torch.from_numpy(ours.data).float(), codes[pgbuild_name(name)]), name
        assert torch.equal(torch.from_numpy(ours.scales), result[name + ".scale"]), name


def test_five_muon_steps_match_the_reference():
    """The record's Muon and pgbuild's, both at the record's settings, on the same matrices and
    gradients: the same parameters after each of five steps, bit for bit."""
    ref = load_reference("r0409")
    h, cfg = ref.Hyperparameters(), get_preset("record").train
    assert (h.matrix_lr, h.muon_momentum, h.muon_wd, h.muon_backend_steps) == (
        cfg.matrix_lr, cfg.muon_momentum, cfg.muon_weight_decay, cfg.newton_schulz_steps)
    assert h.muon_row_normalize and cfg.newton_schulz_coefficients == "classic"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    matrices = [torch.randn(shape, generator=gen) * 0.05 for shape in ((128, 128), (64, 128), (512, 128), (128, 512))]
    theirs = [torch.nn.Parameter(m.clone().to(device)) for m in matrices]
    ours = [torch.nn.Parameter(m.clone().to(device)) for m in matrices]
    ref_muon = ref.Muon(theirs, lr=h.matrix_lr, momentum=h.muon_momentum, backend_steps=h.muon_backend_steps,
                        weight_decay=h.muon_wd, row_normalize=h.muon_row_normalize)
    muon = Muon(ours, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay,
                coefficients=cfg.newton_schulz_coefficients, ns_steps=cfg.newton_schulz_steps)
    for step in range(5):
        for a, b in zip(theirs, ours):
            a.grad = torch.randn(a.shape, generator=gen).to(device)
            b.grad = a.grad.clone()
        ref_muon.step()
        muon.step()
        for a, b in zip(theirs, ours):
            assert torch.equal(a, b), f"step {step + 1}: {(a - b).abs().max().item():.3g} apart"


LOSS_TOL = 1e-4
"""The issue's bound. Measured: all 20 losses bit-identical, which took the record's exact loss
reduction (cross_entropy's own mean), its momentum interpolation, fused AdamW, bf16 Newton-Schulz
and separately normed inputs of a parallel block's two branches (the gradients then sum in the
same order)."""


def reference_step(ref, h, model, optimizers, step, x, y):
    """One step of the record's train_model at `step` of h.iterations, on the step's batch (x, y):
    its looping switch, LR warmdown, momentum warmup, 8 accumulated micro-batches, grad clip."""
    frac = step / h.iterations  # its training_frac without a wallclock cap
    if not model.looping_active and frac >= h.enable_looping_at:
        model.looping_active = True
    lr_scale = max((1 - frac) / h.warmdown_frac, h.min_lr) if frac >= 1 - h.warmdown_frac else 1.0
    optimizers.zero_grad_all()
    loss_sum = torch.zeros(())
    for xm, ym in zip(x.chunk(h.grad_accum_steps), y.chunk(h.grad_accum_steps)):
        loss = model(xm, ym)
        loss_sum += loss.detach()
        (loss / h.grad_accum_steps).backward()
    ramp = min(step / h.muon_momentum_warmup_steps, 1.0)
    for muon_group in optimizers.optimizer_muon.param_groups:
        muon_group["momentum"] = (1 - ramp) * h.muon_momentum_warmup_start + ramp * h.muon_momentum
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
    torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip_norm)
    optimizers.step()
    return float(loss_sum) / h.grad_accum_steps


def test_first_20_training_losses_match_the_reference(demo_data):
    """The record's GPT and optimizers and pgbuild's Trainer (record preset, reduced), from the
    same initial weights (the reference's init, converted) on the same 20 batches, with step-based
    schedules: depth recurrence switches on at step 7 and the warmdown starts at step 6 in both."""
    env, sets = shapes(layers=4, dim=64, seq_len=32, batch_tokens=8 * 32, loop_end=2)
    ref = load_reference("r0409", **env)
    h = ref.Hyperparameters()
    ref_model = reference_model(ref, perturb=False)
    optimizers = ref.Optimizers(h, ref_model)
    preset = apply_overrides(get_preset("record"), sets)
    layout = find_data(str(demo_data), VOCAB)
    trainer = Trainer(preset, layout, Context(torch.device("cpu")))
    trainer.model.load_state_dict(from_r0409(ref_model.state_dict(), preset.model))
    loader = ShuffledSequences(layout.shards("train"), 32, seed=1)
    batches = [loader.next_batch(8) for _ in range(20)]

    theirs = [reference_step(ref, h, ref_model, optimizers, step, x, y) for step, (x, y) in enumerate(batches)]
    ours = []
    for step, batch in enumerate(batches):
        frac = step / preset.train.iterations  # as builder.train.trainer.train computes it without a clock
        sched = schedule_at(step, frac, preset.train)
        trainer.switches(sched, frac)
        ours.append(float(trainer.step(sched, batch)) / trainer.accum)
    assert ref_model.looping_active and trainer.model.looping
    assert abs(ours[0] - theirs[0]) <= 1e-5
    gaps = [abs(a - b) for a, b in zip(ours, theirs)]
    assert max(gaps) <= LOSS_TOL, f"losses apart by {max(gaps):.3g} at step {gaps.index(max(gaps))}"
