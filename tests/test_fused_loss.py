"""builder/train/fused_loss.py: the Triton softcapped cross-entropy against the eager loss, through
Triton's interpreter and compiled for an H100 (tests/triton_checks.py: no GPU needed)."""

import pytest
from triton_checks import HOPPER_SHARED_MEMORY, compile_for_hopper, needs_triton, run_interpreted

INTERPRETED = """
    import copy
    import torch
    import torch.nn.functional as F
    from builder.train.fused_loss import softcapped_cross_entropy
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
"""


@needs_triton
def test_the_fused_loss_and_its_gradient_equal_the_eager_loss():
    worst = run_interpreted(INTERPRETED)
    assert worst["torch.float32"][0] < 1e-5 and worst["torch.float32"][1] < 1e-6
    # bf16 gradients: within one bf16 rounding of eager's (itself fp32, rounded).
    assert worst["torch.bfloat16"][0] < 1e-4 and worst["torch.bfloat16"][1] <= 2 ** -9
    assert worst["model"][0] < 1e-5 and worst["model"][1] < 1e-6


SCALARS = {"x_row_stride": "i64", "vocab": "i32", "cap": "fp32"}
POINTERS = {"x_ptr": "*bf16", "targets_ptr": "*i64", "lse_ptr": "*fp32"}
KERNELS = [
    {"name": "_forward_kernel", "signature": {**POINTERS, **SCALARS, "loss_ptr": "*fp32"},
     "constexprs": {"TILE": 1024}},
    {"name": "_backward_kernel", "signature": {**POINTERS, **SCALARS, "grad_loss_ptr": "*fp32",
                                               "grad_x_ptr": "*bf16", "grad_row_stride": "i64"},
     "constexprs": {"TILE": 1024}},
]


@needs_triton
@pytest.mark.parametrize("form", ["installed", "bundled"])
def test_the_kernels_compile_for_hopper(form):
    """Both kernels down to a cubin for sm_90, bf16 logits, from the module as installed and as an
    artifact's training code carries it."""
    from builder.train.fused_loss import VOCAB_TILE

    assert VOCAB_TILE == KERNELS[0]["constexprs"]["TILE"]
    shared = compile_for_hopper("builder.train.fused_loss", form, KERNELS)
    assert len(shared) == 2 and max(shared) <= HOPPER_SHARED_MEMORY
