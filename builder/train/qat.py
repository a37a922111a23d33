"""Late QAT: train the block matrices through the export's quantization grid for the last steps.

Each quantized block matrix (attention q/k/v/out, MLP fc/proj: every `nn.Linear` the quantizer
encodes at `quant.matrix_bits`, not the embedding) computes its output with

    w_q = w + gate * (q(w) - w).detach()

where q rounds each row to the export's grid: codes clamped to +-qmax = 2^(bits-1) - 1 times a per-row
scale. The straight-through estimator passes gradients to w unchanged. Two pitfalls of the records
are avoided:

- Their on/off switch was a Python class attribute, which torch.compile constant-folded, so QAT
  never ran. Here the switch is `gate`, a 0-dim tensor buffer shared by every QAT layer: compiled
  graphs read it as an input, so flipping it changes the very next step without a recompile.
- They trained on a [-32, 31] grid of rowmax/31 and exported +-31. Here the grid is the
  exporter's own: symmetric +-qmax, and by default (`train.qat_scale = "sdclip"`) the exporter's
  SDClip row scale k*std/qmax at the recipe's bits and k (`"rowmax"`: rowmax/qmax, the records'
  rule, symmetric). GPTQ's error feedback and a budget fit that lowers bits still move the final
  codes; the Hessian-aware clip is not modelled.

QAT lives in the builder only: the layers are swapped in place (class and a non-persistent
buffer, so parameter names and state dicts do not change) and swapped back after training. The
price of a switch the compiler cannot fold: with `qat_threshold` > 0 the rounding is computed on
every forward, also before the gate opens (elementwise work over the matrices, small next to the
matmuls; not measured on a GPU here).
"""

import torch
import torch.nn.functional as F
from torch import nn

from builder.quant.policy import is_quantized, recipe_bits_and_k
from builder.quant.primitives import matrix_group, sdclip_scales


def fake_quantize(w, bits, k, rule):
    """w rounded to its per-row grid (forward value only; no gradient flows through it)."""
    w = w.detach().float()
    qmax = 2 ** (bits - 1) - 1
    if rule == "sdclip":
        scales = sdclip_scales(w, bits, k)
    else:
        scales = (w.abs().amax(dim=1) / qmax).clamp_min(1e-8)
    return torch.clamp(torch.round(w / scales[:, None]), -qmax, qmax) * scales[:, None]


class _QATLinear:
    """Mixed into a Linear's class: its forward reads the weight through the fake-quant gate."""

    def forward(self, x):
        w = self.weight
        w = w + self.qat_gate * (fake_quantize(w, self.qat_bits, self.qat_k, self.qat_rule) - w).detach()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


_SUBCLASSES = {}


def _qat_class(cls):
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"QAT{cls.__name__}", (_QATLinear, cls), {})
    return _SUBCLASSES[cls]


def qat_layers(model, qcfg):
    """(name, module, bits, k) of every block matrix the exporter quantizes at the matrix bits."""
    out = []
    for name, module in model.named_modules():
        key = name + ".weight"
        if isinstance(module, nn.Linear) and name.startswith("blocks.") and matrix_group(key) \
                and is_quantized(key, module.weight, qcfg):
            out.append((name, module, *recipe_bits_and_k(key, qcfg)))
    return out


class LateQAT:
    """Installs fake-quant on `model`'s block matrices, off until `enable()`. Install it after the
    model reached its device (the gate is one tensor shared by all layers) and before
    torch.compile, so the compiled graph contains the fake-quant path."""

    def __init__(self, model, qcfg, rule):
        device = next(model.parameters()).device
        self.gate = torch.zeros((), device=device)
        self.active = False
        self.layers = qat_layers(model, qcfg)
        self._classes = [type(module) for _, module, _, _ in self.layers]
        for (_, module, bits, k), cls in zip(self.layers, self._classes):
            module.__class__ = _qat_class(cls)
            module.qat_bits, module.qat_k, module.qat_rule = bits, k, rule
            module.register_buffer("qat_gate", self.gate, persistent=False)

    def enable(self, on=True):
        self.gate.fill_(1.0 if on else 0.0)
        self.active = on

    def remove(self):
        """Restore plain layers (after training, before the weights are averaged and exported)."""
        for (_, module, _, _), cls in zip(self.layers, self._classes):
            module.__class__ = cls
            del module.qat_gate, module.qat_bits, module.qat_k, module.qat_rule
        self.layers, self._classes = [], []
