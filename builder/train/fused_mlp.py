"""The MLP's up-projection and its activation, LeakyReLU(h, s)², as one Triton matmul each way.

Training otherwise computes h = x W1ᵀ with cuBLAS and the activation a = leaky(h)² as a separate
pass that reads h back and writes a; its backward reads h again to turn the gradient of a into
dh. Here the activation lives in the matmul's epilogue, while the tile of h is still in registers:

    forward   one kernel writes h and a (both kept for the backward, as the record does);
    backward  dh = (g W2) ⊙ f'(h) in one kernel whose epilogue reads h,
              f'(h) = 2h where h > 0, else 2s²h;

and the rest are cuBLAS matmuls: out = a W2ᵀ, dW2 = gᵀ a, dW1 = dhᵀ x, dx = dh W1. At the records'
shape (98,304 tokens x 2,048 hidden per GPU and layer) each pass skips reading and writing one
bf16 (tokens x hidden) tensor. The 2026-04-27 record fuses the same way with a Hopper-only TMA
kernel; this one loads through pointers, so it runs wherever Triton does, and in Triton's
interpreter, where tests/test_fused_mlp.py compares it with the eager MLP. relu² is slope 0.

The whole MLP is one torch custom op with its backward registered, so a fullgraph torch.compile
traces it as a single node. The trainer uses it where Triton and CUDA are present
(`train.fused_mlp`); this module imports Triton at load, so only import it then.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64
"""Output tile (tokens x hidden units) of one program, and the depth of each step over K."""
GROUP_M = 8
"""Programs walk the output in column strips GROUP_M tiles tall, so that consecutive programs
reuse the same weight tiles while they are in L2."""
NUM_WARPS, NUM_STAGES = 8, 4
"""Launch settings: 8 warps share a 128 x 128 fp32 accumulator (64 registers each); 4 stages of
prefetched operand tiles take 128 KiB of shared memory, inside Hopper's 227 KiB."""


@triton.jit
def _matmul_leaky_relu2_kernel(a_ptr, b_ptr, out_ptr, pre_ptr, M, N, K,
                               stride_am, stride_ak, stride_bk, stride_bn, slope,
                               FORWARD: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = A B for A (M, K) and B (K, N), any strides. FORWARD: pre = C and out = leaky(C)²;
    else out = C ⊙ f'(pre). `pre` and `out` are contiguous (M, N)."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    strip = GROUP_M * tiles_n
    first_m = (pid // strip) * GROUP_M
    strip_height = min(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % strip) % strip_height
    tile_n = (pid % strip) // strip_height

    rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    depth = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rows[:, None] * stride_am + depth[None, :] * stride_ak
    b_tile = b_ptr + depth[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        inside = depth < K - k
        a = tl.load(a_tile, mask=(rows[:, None] < M) & inside[None, :], other=0.0)
        b = tl.load(b_tile, mask=inside[:, None] & (cols[None, :] < N), other=0.0)
        if IEEE:  # fp32 operands: full fp32 products, as the eager matmul (not TF32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk

    dtype = out_ptr.dtype.element_ty
    offsets = rows[:, None] * N + cols[None, :]
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    # Rounded to the output dtype first, as the eager matmul's output is before its activation.
    c = acc.to(dtype).to(tl.float32)
    if FORWARD:
        tl.store(pre_ptr + offsets, c.to(dtype), mask=inside)
        act = tl.where(c > 0, c, slope * c)
        tl.store(out_ptr + offsets, (act * act).to(dtype), mask=inside)
    else:
        h = tl.load(pre_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (c * tl.where(h > 0, 2.0 * h, 2.0 * slope * slope * h)).to(dtype), mask=inside)


def _matmul_leaky_relu2(a, b, slope, pre=None):
    """(pre, out) = (a @ b, leaky(a @ b)²) without `pre`; with it, (a @ b) ⊙ f'(pre)."""
    (m, k), n = a.shape, b.shape[1]
    forward = pre is None
    out = a.new_empty(m, n)
    if forward:
        pre = a.new_empty(m, n)
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    _matmul_leaky_relu2_kernel[grid](a, b, out, pre.contiguous(), m, n, k, a.stride(0), a.stride(1),
                                     b.stride(0), b.stride(1), slope, FORWARD=forward,
                                     IEEE=a.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                     BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, num_warps=NUM_WARPS,
                                     num_stages=NUM_STAGES)
    return (pre, out) if forward else out


@torch.library.custom_op("pgbuild::leaky_relu2_mlp", mutates_args=())
def leaky_relu2_mlp(x: Tensor, fc: Tensor, proj: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """(output, h, a): the MLP's output (x's shape with proj's rows as last dim) and, for the
    backward, its pre-activation h and activation a as (tokens, hidden)."""
    rows = x.reshape(-1, x.shape[-1])
    h, a = _matmul_leaky_relu2(rows, fc.t(), slope)
    return (a @ proj.t()).view(*x.shape[:-1], proj.shape[0]), h, a


@leaky_relu2_mlp.register_fake
def _(x, fc, proj, slope):
    tokens = x.numel() // x.shape[-1]
    return (x.new_empty(*x.shape[:-1], proj.shape[0]), x.new_empty(tokens, fc.shape[0]),
            x.new_empty(tokens, fc.shape[0]))


@torch.library.custom_op("pgbuild::leaky_relu2_mlp_backward", mutates_args=())
def leaky_relu2_mlp_backward(grad: Tensor, x: Tensor, fc: Tensor, proj: Tensor, h: Tensor, a: Tensor,
                             slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dfc, dproj) for the output gradient `grad`."""
    g = grad.reshape(-1, grad.shape[-1])
    dh = _matmul_leaky_relu2(g, proj, slope, pre=h)
    return (dh @ fc).view_as(x), dh.t() @ x.reshape(-1, x.shape[-1]), g.t() @ a


@leaky_relu2_mlp_backward.register_fake
def _(grad, x, fc, proj, h, a, slope):
    return torch.empty_like(x), torch.empty_like(fc), torch.empty_like(proj)


def _save_for_backward(ctx, inputs, output):
    x, fc, proj, slope = inputs
    ctx.save_for_backward(x, fc, proj, output[1], output[2])
    ctx.slope = slope


def _backward(ctx, grad, _grad_h, _grad_a):
    return *leaky_relu2_mlp_backward(grad.contiguous(), *ctx.saved_tensors, ctx.slope), None


leaky_relu2_mlp.register_autograd(_backward, setup_context=_save_for_backward)


def fused_mlp(x, fc_weight, proj_weight, slope):
    """proj(leaky_relu(fc(x), slope)²) in autocast's dtype where it is on, else x's; MLP.forward's
    `fused`."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return leaky_relu2_mlp(x.to(dtype).contiguous(), fc_weight.to(dtype), proj_weight.to(dtype), slope)[0]
