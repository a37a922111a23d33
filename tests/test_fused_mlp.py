"""builder/train/fused_mlp.py: the MLP with its activation in the matmul's epilogue against the
model's own MLP, through Triton's interpreter and compiled for an H100 (tests/triton_checks.py)."""

import pytest
from triton_checks import HOPPER_SHARED_MEMORY, compile_for_hopper, needs_triton, run_interpreted

INTERPRETED = """
    import copy
    import torch
    import torch.nn.functional as F
    from builder.train.fused_mlp import fused_mlp
    from runtime.config import ModelConfig
    from runtime.model import GPT

    def eager(x, fc, proj, slope):
        return F.linear(F.leaky_relu(F.linear(x, fc), slope).square(), proj)

    def outputs_and_grads(fn, x, fc, proj, slope, g):
        x, fc, proj = (t.detach().requires_grad_() for t in (x, fc, proj))
        out = fn(x, fc, proj, slope)
        return [out, *torch.autograd.grad(out, (x, fc, proj), g)]

    torch.manual_seed(0)
    # 3 x 70 = 210 tokens and 200 hidden units: a full and a masked tile each way; K = 40 < one step.
    x, g = torch.randn(3, 70, 40), torch.randn(3, 70, 40)
    fc, proj = 0.2 * torch.randn(200, 40), 0.2 * torch.randn(40, 200)
    result = {}
    for slope in (0.5, 0.0):
        fused = outputs_and_grads(fused_mlp, x, fc, proj, slope, g)
        ref = outputs_and_grads(eager, x, fc, proj, slope, g)
        result[f"fp32 slope {slope}"] = max((a - b).abs().max().item() / b.abs().max().item()
                                            for a, b in zip(fused, ref))
    # bf16: each result's error against float64, the fused one's and the eager one's.
    exact = outputs_and_grads(eager, *(t.double() for t in (x, fc, proj)), 0.5, g.double())
    low = [t.bfloat16() for t in (x, fc, proj)]
    for name, fn in (("fused", fused_mlp), ("eager", eager)):
        got = outputs_and_grads(fn, *low, 0.5, g.bfloat16())
        assert all(t.dtype == torch.bfloat16 for t in got)
        result[f"bf16 {name}"] = [(a.double() - b).abs().max().item() / b.abs().max().item()
                                  for a, b in zip(got, exact)]

    # Through the model, training mode: the loss and every gradient, fused against the model's MLP,
    # eagerly and as one node of a fullgraph compile (aot_eager: traced, no code generated).
    cfg = ModelConfig(vocab_size=300, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=8,
                      num_loops=0, parallel_residual_start=-1, xsa_last_n=0)
    model = GPT(cfg)
    model.reset_parameters()
    fused_model = copy.deepcopy(model).use_fused_kernels(mlp=fused_mlp)
    compiled = torch.compile(fused_model, backend="aot_eager", fullgraph=True)
    ids, targets = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    losses, grads = [], []
    for m in (model, fused_model, compiled):
        loss = m(ids, targets, mean=True)
        losses.append(loss.item())
        grads.append(torch.autograd.grad(loss, list(model.parameters() if m is model else fused_model.parameters())))
    for i, name in ((1, "model"), (2, "compiled")):
        result[name] = (abs(losses[i] - losses[0]),
                        max((a - b).abs().max().item() for a, b in zip(grads[i], grads[0])))
    print(result)
"""


@needs_triton
def test_the_fused_mlp_and_its_gradients_equal_the_eager_mlp():
    result = run_interpreted(INTERPRETED)
    assert result["fp32 slope 0.5"] < 1e-6 and result["fp32 slope 0.0"] < 1e-6
    # bf16: output and gradients as close to float64 as the eager MLP's own (one rounding more or
    # less here and there: the fused path rounds a once, eager's leaky_relu and square twice).
    for fused, eager in zip(result["bf16 fused"], result["bf16 eager"]):
        assert fused < max(2 * eager, 2 ** -8)
    for name in ("model", "compiled"):
        assert result[name][0] < 1e-6 and result[name][1] < 1e-6, name


def kernel_spec(forward):
    """The kernel as the JIT specializes it for the MLP: contiguous activations (stride 1 along K),
    W1ᵀ read down its columns in the forward, W2 along its rows in the backward; the model's
    sizes and pointers divisible by 16."""
    from builder.train import fused_mlp as m

    unit_strides = {"stride_ak": 1, "stride_bk": 1} if forward else {"stride_ak": 1, "stride_bn": 1}
    ints = [n for n in ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn") if n not in unit_strides]
    pointers = ["a_ptr", "b_ptr", "out_ptr", "pre_ptr"]
    return {"name": "_matmul_leaky_relu2_kernel",
            "signature": {**{n: "*bf16" for n in pointers}, **{n: "i32" for n in ints}, "slope": "fp32"},
            "constexprs": {"FORWARD": forward, "IEEE": False, "BLOCK_M": m.BLOCK_M, "BLOCK_N": m.BLOCK_N,
                           "BLOCK_K": m.BLOCK_K, "GROUP_M": m.GROUP_M, **unit_strides},
            "divisible_by_16": pointers + ints, "options": {"num_warps": m.NUM_WARPS, "num_stages": m.NUM_STAGES}}


@needs_triton
@pytest.mark.parametrize("form", ["installed", "bundled"])
def test_the_kernel_compiles_for_hopper_within_its_shared_memory(form):
    """Forward and backward variants, bf16, at the module's tile sizes and stages: down to a cubin
    for sm_90, operand tiles prefetched NUM_STAGES deep in shared memory, within an H100 block's."""
    from builder.train import fused_mlp as m

    shared = compile_for_hopper("builder.train.fused_mlp", form, [kernel_spec(True), kernel_spec(False)])
    pipelined = m.NUM_STAGES * (m.BLOCK_M * m.BLOCK_K + m.BLOCK_K * m.BLOCK_N) * 2  # bf16 bytes
    assert shared == [pipelined, pipelined] and pipelined <= HOPPER_SHARED_MEMORY
