"""Quantization, in layers: primitives (SDClip grids, GPTQ, errors, pruning costs), transforms
(Hadamard, AWQ, LQER, int8 control tensors), calibration (Hessians and loss probes from training
batches) and policy (the recipes that choose an encoding per tensor)."""
