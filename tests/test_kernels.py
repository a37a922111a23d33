"""builder/train/kernels.py: the Triton softcapped cross-entropy against the eager loss.

No GPU here: the kernels run through Triton's interpreter (TRITON_INTERPRET=1, read when the
kernels are defined, hence a fresh process) and are compiled for Hopper by Triton's own compiler,
which needs no device, so a kernel the interpreter would forgive but the GPU's compiler rejects
fails here too; compiled both from the module and from the minified text an artifact carries.
"""

import ast
import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT

from builder.presets import get_preset
from builder.train.trainer import fused_loss_applies

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

INTERPRETED = textwrap.dedent("""
    import copy
    import torch
    import torch.nn.functional as F
    from builder.train.kernels import softcapped_cross_entropy
    from runtime.config import ModelConfig
    from runtime.model import GPT

    torch.manual_seed(0)
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        # 2,500 entries: two full 1,024-entry tiles and a masked one; logits well past the cap.
        logits = (20 * torch.randn(9, 2500)).to(dtype).requires_grad_()
        targets = torch.randint(0, 2500, (9,))
        fused = softcapped_cross_entropy(logits, targets, 30.0)
        (fused_grad,) = torch.autograd.grad(fused, logits)
        eager = F.cross_entropy(30 * torch.tanh(logits.float() / 30), targets)
        (eager_grad,) = torch.autograd.grad(eager, logits)
        assert fused_grad.dtype == dtype
        worst[str(dtype)] = (abs(fused.item() - eager.item()), (fused_grad - eager_grad).abs().max().item())

    # Through the model: the mean loss and every parameter's gradient, fused against eager.
    cfg = ModelConfig(vocab_size=300, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=8,
                      num_loops=0, parallel_residual_start=-1, xsa_last_n=0)
    model = GPT(cfg)
    model.reset_parameters()
    fused_model = copy.deepcopy(model)
    fused_model.fused_loss = softcapped_cross_entropy
    ids, targets = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    losses = []
    for m in (model, fused_model):
        loss = m(ids, targets, mean=True)
        loss.backward()
        losses.append(loss.item())
    grads = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), fused_model.parameters()))
    worst["model"] = (abs(losses[0] - losses[1]), grads)
    print(worst)
""")


@needs_triton
def test_the_fused_loss_and_its_gradient_equal_the_eager_loss():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    worst = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert worst["torch.float32"][0] < 1e-5 and worst["torch.float32"][1] < 1e-6
    # bf16 gradients: within one bf16 rounding of eager's (itself fp32, rounded).
    assert worst["torch.bfloat16"][0] < 1e-4 and worst["torch.bfloat16"][1] <= 2 ** -9
    assert worst["model"][0] < 1e-5 and worst["model"][1] < 1e-6


COMPILE_FOR_HOPPER = textwrap.dedent("""
    import linecache, sys, types
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if sys.argv[1] == "bundled":  # as an artifact carries it: minified, run from its text (templates/bootstrap.py)
        from builder.artifact.sources import training_sources
        source = training_sources()["builder.train.kernels"]
        name = "<artifact.py:builder.train.kernels>"
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        kernels = types.ModuleType("builder.train.kernels")
        exec(compile(source, name, "exec"), kernels.__dict__)
    else:
        from builder.train import kernels

    pointers = {"x_ptr": "*bf16", "targets_ptr": "*i64", "lse_ptr": "*fp32"}
    scalars = {"x_row_stride": "i64", "vocab": "i32", "cap": "fp32", "TILE": "constexpr"}
    signatures = {
        kernels._forward_kernel: {**pointers, "loss_ptr": "*fp32", **scalars},
        kernels._backward_kernel: {**pointers, "grad_loss_ptr": "*fp32", "grad_x_ptr": "*bf16",
                                   "grad_row_stride": "i64", **scalars},
    }
    for kernel, signature in signatures.items():
        source = ASTSource(fn=kernel, signature={n: signature[n] for n in kernel.arg_names},
                           constexprs={"TILE": kernels.VOCAB_TILE})
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
    print("compiled", len(signatures))
""")


@needs_triton
@pytest.mark.parametrize("form", ["installed", "bundled"])
def test_the_kernels_compile_for_hopper(form):
    """Both kernels through Triton's compiler down to a cubin for sm_90 (an H100), bf16 logits,
    from the module as installed and as an artifact's training code carries it (a fresh process
    each: the module registers its custom ops once)."""
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER, form], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "compiled 2", proc.stderr


def test_the_trainer_takes_the_fused_loss_only_where_it_applies():
    preset = get_preset("r0427")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert not fused_loss_applies(preset, cpu)
    with_model = lambda **kw: dataclasses.replace(preset, model=dataclasses.replace(preset.model, **kw))  # noqa: E731
    assert not fused_loss_applies(with_model(record_precision=True), cuda)  # it caps in bf16
    assert not fused_loss_applies(with_model(logit_softcap=0.0), cuda)
    off = dataclasses.replace(preset, train=dataclasses.replace(preset.train, fused_loss=False))
    assert not fused_loss_applies(off, cuda)
    assert fused_loss_applies(preset, cuda) == (importlib.util.find_spec("triton") is not None)
