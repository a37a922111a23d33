"""The training loss as one Triton kernel each way: softcapped cross-entropy.

The eager loss caps the logits, z = c * tanh(x / c), as a (tokens, vocab) fp32 tensor, then takes
the cross-entropy; autograd keeps that tensor for the backward. At the records' micro-batch
(98,304 tokens x 8,192 entries) that is 3.2 GB written, read back and held per micro-step. Here
the forward reads the bf16 pre-cap logits x once per row, keeps a running maximum and sum of
exp(z) over vocabulary tiles, and writes two floats per token: the loss (logsumexp(z) - z[target])
and the logsumexp. The backward reads x again and writes dL/dx = g * (softmax(z) - onehot(target))
* (1 - (z / c)^2), recomputing z and softmax(z) from x and the logsumexp. Same math as the eager
loss (tests/test_fused_loss.py compares both ways, through Triton's interpreter on the CPU).

Both kernels are torch custom ops, so a fullgraph torch.compile of the model traces them as single
nodes. The trainer uses them where Triton and CUDA are present (`train.fused_loss`); this module
imports Triton at load, so only import it then.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

VOCAB_TILE = 1024
"""Vocabulary entries one program handles at a time (a power of two; the last tile is masked)."""


@triton.jit
def _capped(x, cap):
    """cap * tanh(x / cap), through exp: Triton's core language has no tanh (libdevice's is the
    GPU vendor's, which the interpreter the tests run lacks)."""
    e = tl.exp(-2.0 * tl.abs(x / cap))
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(x < 0, -t, t)


@triton.jit
def _forward_kernel(x_ptr, x_row_stride, targets_ptr, loss_ptr, lse_ptr, vocab, cap, TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, vocab, TILE):
        cols = start + tl.arange(0, TILE)
        z = _capped(tl.load(x_row + cols, mask=cols < vocab, other=0.0).to(tl.float32), cap)
        z = tl.where(cols < vocab, z, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(targets_ptr + row)
    z_target = _capped(tl.load(x_row + target).to(tl.float32), cap)
    tl.store(loss_ptr + row, lse - z_target)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _backward_kernel(x_ptr, x_row_stride, targets_ptr, lse_ptr, grad_loss_ptr, grad_x_ptr, grad_row_stride,
                     vocab, cap, TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    grad_row = grad_x_ptr + row * grad_row_stride
    lse = tl.load(lse_ptr + row)
    grad_loss = tl.load(grad_loss_ptr + row)
    target = tl.load(targets_ptr + row)
    for start in range(0, vocab, TILE):
        cols = start + tl.arange(0, TILE)
        inside = cols < vocab
        z = _capped(tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32), cap)
        dz = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        slope = 1.0 - (z / cap) * (z / cap)
        tl.store(grad_row + cols, (grad_loss * dz * slope).to(grad_x_ptr.dtype.element_ty), mask=inside)


@torch.library.custom_op("pgbuild::softcapped_ce", mutates_args=())
def softcapped_ce(logits: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """(per-token loss, logsumexp), both fp32 (N,), of pre-cap `logits` (N, V) and `targets` (N,)."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows, vocab = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    _forward_kernel[(rows,)](logits, logits.stride(0), targets.contiguous(), loss, lse, vocab, cap, TILE=VOCAB_TILE)
    return loss, lse


@softcapped_ce.register_fake
def _(logits, targets, cap):
    rows = logits.size(0)
    return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("pgbuild::softcapped_ce_backward", mutates_args=())
def softcapped_ce_backward(logits: Tensor, targets: Tensor, lse: Tensor, grad_loss: Tensor, cap: float) -> Tensor:
    """dL/dlogits (N, V) in the logits' dtype, for the per-token loss gradient `grad_loss` (N,)."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows, vocab = logits.shape
    grad = torch.empty_like(logits)
    _backward_kernel[(rows,)](logits, logits.stride(0), targets.contiguous(), lse, grad_loss.float().contiguous(),
                              grad, grad.stride(0), vocab, cap, TILE=VOCAB_TILE)
    return grad


@softcapped_ce_backward.register_fake
def _(logits, targets, lse, grad_loss, cap):
    return torch.empty_like(logits)


def _save_for_backward(ctx, inputs, output):
    logits, targets, cap = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.cap = cap


def _backward(ctx, grad_loss, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return softcapped_ce_backward(logits, targets, lse, grad_loss, ctx.cap), None, None


softcapped_ce.register_autograd(_backward, setup_context=_save_for_backward)


def softcapped_cross_entropy(logits, targets, cap):
    """Mean over tokens of cross_entropy(cap * tanh(logits / cap), targets); `logits` (N, V)
    before the cap, `targets` (N,). GPT.forward's `fused_loss`."""
    return softcapped_ce(logits, targets, cap)[0].mean()
