"""Quantization: calibration Hessians, GPTQ and its grids, transforms, and the recipes that choose
an encoding per tensor."""
