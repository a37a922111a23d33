"""The numeric precision every forward runs in: bf16 autocast on CUDA, plain fp32 on the CPU.

Training, calibration and evaluation all enter `autocast(device)`, so the weights are trained,
quantized and scored in the same precision. (`cfg.record_precision` adds the record's own bf16
casts inside the model, on the CPU too; see GPT.forward.)
"""

import torch


def autocast(device):
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
